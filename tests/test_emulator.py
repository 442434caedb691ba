"""The CUDA emulator itself, on small kernels written to pin down its execution model
(tests/emulator_kernels/*.cu): barriers, per-block NaN-filled shared memory, thread orders, indices,
argument checks, and the ASan / TSan modes (in subprocesses, which load the sanitizer runtime)."""
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gpuconv import backend
from gpuconv.cuda import emulate
from gpuconv.cuda.emulate import EmulatedModule, KernelArgumentError
from gpuconv.errors import KernelError

KERNELS = Path(__file__).parent / "emulator_kernels"
ORDERS = emulate.ORDERS


def load(name, **kwargs):
    return EmulatedModule(path=KERNELS / name, **kwargs)


@pytest.fixture(scope="module")
def reduce_module():
    return load("reduce.cu", name_expressions=["reverse_in_block<float>", "reverse_in_block<double>"])


@pytest.fixture(scope="module")
def misc():
    return load("misc.cu")


def block_sums(module, kernel, x, order, threads=256):
    blocks = -(-x.size // threads)
    out = np.zeros(blocks, np.float32)
    module.get_function(kernel)(blocks, threads, (x, out, np.int32(x.size)), thread_order=order, seed=7)
    return out


def reference_block_sums(x, threads=256):
    padded = np.zeros(-(-x.size // threads) * threads, np.float64)
    padded[:x.size] = x
    return padded.reshape(-1, threads).sum(axis=1)


# ---------------------------------------------------------------------------------------------
# barriers and thread order


@pytest.mark.parametrize("order", ORDERS)
def test_tree_reduction_with_barriers_is_right_in_every_order(reduce_module, order):
    x = np.random.default_rng(0).random(1000).astype(np.float32)
    out = block_sums(reduce_module, "block_sum", x, order)
    np.testing.assert_allclose(out, reference_block_sums(x), rtol=1e-5)


def test_tree_reduction_without_barriers_is_wrong_in_some_order(reduce_module):
    x = np.random.default_rng(0).random(1000).astype(np.float32)
    expected = reference_block_sums(x)
    wrong = [order for order in ORDERS
             if not np.allclose(block_sums(reduce_module, "block_sum_unsynced", x, order), expected, rtol=1e-5)]
    # Sequential threads in reverse order happen to finish each subtree before its parent reads it;
    # forward and random order read partial sums nobody wrote yet (NaN).
    assert "forward" in wrong and "random" in wrong


@pytest.mark.parametrize("order", ORDERS)
def test_thread_and_block_order(misc, order):
    threads, blocks = 32, 3
    log = np.zeros(threads * blocks + 1, np.int32)
    misc.get_function("record_order")(blocks, threads, (log,), thread_order=order, seed=3)
    ran = log[:-1]
    assert log[-1] == threads * blocks
    assert sorted(ran) == list(range(threads * blocks))
    if order == "forward":
        assert list(ran) == list(range(threads * blocks))
    elif order == "reverse":
        assert list(ran) == list(range(threads * blocks))[::-1]
    else:
        assert list(ran) != sorted(ran)
        block_of = ran // threads  # blocks still run one at a time
        assert all((block_of[i * threads:(i + 1) * threads] == block_of[i * threads]).all() for i in range(blocks))


def test_order_comes_from_the_emulation_context(misc):
    log = np.zeros(9, np.int32)
    with emulate.emulation(order="reverse"):
        misc.get_function("record_order")(1, 8, (log,))
    assert list(log[:8]) == list(range(8))[::-1]


def test_order_from_the_environment(misc, monkeypatch):
    monkeypatch.setenv("GPUCONV_EMULATE_ORDER", "reverse")
    log = np.zeros(9, np.int32)
    misc.get_function("record_order")(1, 8, (log,))
    assert list(log[:8]) == list(range(8))[::-1]
    monkeypatch.setenv("GPUCONV_EMULATE_ORDER", "sideways")
    with pytest.raises(KernelError, match="GPUCONV_EMULATE_ORDER"):
        misc.get_function("record_order")(1, 8, (log,))


def test_emulation_context_switches_backend_dispatch():
    with emulate.emulation():
        assert backend.emulation_enabled()
        with emulate.emulation(False):
            assert not backend.emulation_enabled()
        assert backend.emulation_enabled()
    assert backend._emulation_override == []


def test_thread_returning_while_others_wait_raises(misc):
    out = np.zeros(8, np.float32)
    with pytest.raises(KernelError, match=r"early_exit.*block \(1,0,0\).*thread \(3,0,0\) returned while 7"):
        misc.get_function("early_exit")(2, 8, (out,), thread_order="reverse")


def test_threads_at_different_barriers_raise(misc):
    out = np.zeros(8, np.float32)
    with pytest.raises(KernelError, match="divergent_barriers.*same __syncthreads"):
        misc.get_function("divergent_barriers")(1, 8, (out,))


# ---------------------------------------------------------------------------------------------
# shared memory


def test_unwritten_static_shared_memory_reads_as_nan(misc):
    out, out_int = np.zeros(64, np.float32), np.zeros(64, np.int32)
    misc.get_function("read_unwritten_shared")(1, 64, (out, out_int))
    np.testing.assert_array_equal(out[:32], np.arange(32))
    assert np.isnan(out[32:]).all()
    np.testing.assert_array_equal(out_int[32:], -1)


def test_shared_memory_is_refilled_for_every_block(misc):
    # Block 0 writes what block 1 would read if shared memory carried over; it must not.
    out = np.zeros(16, np.float64)
    misc.get_function("read_dynamic_shared")(2, 8, (out,), shared_mem=8 * 8)
    for block in out.reshape(2, 8):
        np.testing.assert_array_equal(block[::2], 2.0 * np.arange(0, 8, 2))
        assert np.isnan(block[1::2]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dynamic_shared_memory_of_a_template_kernel(reduce_module, dtype):
    x = np.arange(96, dtype=dtype)
    out = np.zeros_like(x)
    name = f"reverse_in_block<{'float' if dtype == np.float32 else 'double'}>"
    reduce_module.get_function(name)(3, 32, (x, out), shared_mem=32 * x.itemsize)
    np.testing.assert_array_equal(out, x.reshape(3, 32)[:, ::-1].ravel())


def test_shared_memory_limit(reduce_module):
    x = np.zeros(32, np.float32)
    with pytest.raises(KernelError, match="49153 bytes exceeds"):
        reduce_module.get_function("reverse_in_block<float>")(1, 32, (x, x), shared_mem=48 * 1024 + 1)


def test_shared_declarations_are_rewritten():
    source = textwrap.dedent("""
        template<typename T> __global__ void k(T* y) {
            __shared__ T tile[16][17];  // a __shared__ in a comment; is not rewritten
            __shared__ __align__(8) int count;
            extern __shared__ __align__(16) unsigned char raw[];
        }""")
    rewritten = emulate.rewrite_shared(source)
    assert "auto& tile = ::emu::shared_var<T [16][17], 0>();" in rewritten
    assert "auto& count = ::emu::shared_var<int , 1>();" in rewritten
    assert "unsigned char* raw = ::emu::dynamic_shared<unsigned char>();" in rewritten
    assert rewritten.count("\n") == source.count("\n")
    with pytest.raises(KernelError, match="file-scope"):
        emulate.rewrite_shared("__shared__ float global_tile[4];")
    with pytest.raises(KernelError, match="one __shared__ array per declaration"):
        emulate.rewrite_shared("__global__ void k() { __shared__ float a[4], b[4]; }")


# ---------------------------------------------------------------------------------------------
# indices, parameters, math


@pytest.mark.parametrize("grid, block", [((3, 2, 2), (4, 3, 2)), (5, (7,)), ((1, 4), (2, 2, 8))])
def test_grid_and_block_indices(misc, grid, block):
    g = (grid,) if isinstance(grid, int) else grid
    g, b = g + (1,) * (3 - len(g)), block + (1,) * (3 - len(block))
    out = np.full((g[2], g[1], g[0], b[2], b[1], b[0], 12), -7, np.int32)
    misc.get_function("record_indices")(grid, block, (out,), thread_order="random")
    bz, by, bx, tz, ty, tx = np.indices(out.shape[:6])
    expected = np.stack([bx, by, bz, tx, ty, tz] + [np.full_like(bx, v) for v in b + g], axis=-1)
    np.testing.assert_array_equal(out, expected)


def test_64_bit_parameters_and_indices(misc):
    n = 1000
    out = np.zeros(n, np.float64)
    base, mask = 2 ** 40 + 5, 2 ** 63 - 1
    misc.get_function("index64")(4, 256, (out, np.int64(base), np.uint64(mask), np.int32(-3),
                                           np.float32(0.5), np.float64(0.25), np.int64(n)))
    i = np.arange(n, dtype=np.int64)
    np.testing.assert_array_equal(out, ((base - 3 * i) & mask).astype(np.float64) * 0.25 + 0.5)


def test_math_functions(misc):
    x, xd = np.array([2.0], np.float32), np.array([2.0])
    out_f, out_d, out_i = np.zeros(14, np.float32), np.zeros(9), np.zeros(4, np.int64)
    misc.get_function("math_functions")(1, 1, (x, out_f, xd, out_d, out_i))
    v = np.float32(2)
    expected_f = [np.exp(v), np.log(v), v ** 1.5, np.sqrt(v), v, v, v, 1 / np.sqrt(v), v, v, 1, 0, np.exp(v), v]
    np.testing.assert_allclose(out_f, np.array(expected_f, np.float32), rtol=1e-6)
    np.testing.assert_allclose(out_d, [np.exp(2), np.log(2), 2 ** 1.5, np.sqrt(2), 2, 2, 0.5, 2, 2], rtol=1e-15)
    np.testing.assert_array_equal(out_i, [2, 2, -5, 2 ** 32])  # min(-1, 2u) is unsigned: 2


def test_argument_checks(misc):
    kernel = misc.get_function("scale")
    x = np.ones(10, np.float32)
    kernel(1, 32, (x, np.float32(2), np.int32(10)))
    np.testing.assert_array_equal(x, 2)
    with pytest.raises(KernelArgumentError, match=r"argument 1 is a numpy.float64 scalar, the kernel expects float"):
        kernel(1, 32, (x, np.float64(2), np.int32(10)))
    with pytest.raises(TypeError, match="Python int .*numpy.int32"):
        kernel(1, 32, (x, np.float32(2), 10))
    with pytest.raises(TypeError, match="Python float"):
        kernel(1, 32, (x, 2.0, np.int32(10)))
    with pytest.raises(KernelArgumentError, match="float64 array, the kernel expects a pointer to float"):
        kernel(1, 32, (x.astype(np.float64), np.float32(2), np.int32(10)))
    with pytest.raises(KernelArgumentError, match="expects int: pass numpy.int32"):
        kernel(1, 32, (x, np.float32(2), np.int64(10)))
    with pytest.raises(KernelArgumentError, match="takes 3 arguments, 2 were given"):
        kernel(1, 32, (x, np.float32(2)))
    with pytest.raises(KernelArgumentError, match="not C-contiguous"):
        kernel(1, 32, (np.ones(20, np.float32)[::2], np.float32(2), np.int32(10)))
    with pytest.raises(KernelArgumentError, match="expects float by value"):
        kernel(1, 32, (x, x, np.int32(10)))
    with pytest.raises(KernelError, match="zero dimension"):
        kernel(0, 32, (x, np.float32(2), np.int32(10)))
    with pytest.raises(KernelError, match="exceeds CUDA's limits"):
        kernel(1, (32, 64), (x, np.float32(2), np.int32(10)))


def test_unknown_kernel_and_unsupported_cuda(misc):
    with pytest.raises(KernelError, match="no kernel 'nope'"):
        misc.get_function("nope")
    module = EmulatedModule("extern \"C\" __global__ void k(float* y) { y[0] = __shfl_down_sync(0xffffffff, y[0], 1); }",
                            filename="warp.cu")
    with pytest.raises(KernelError, match="could not compile warp.cu"):
        module.get_function("k")(1, 32, (np.zeros(1, np.float32),))


@pytest.mark.slow
def test_ucontext_fallback_matches(reduce_module):
    module = load("reduce.cu", context="ucontext")
    x = np.random.default_rng(1).random(600).astype(np.float32)
    for order in ORDERS:
        np.testing.assert_array_equal(block_sums(module, "block_sum", x, order),
                                      block_sums(reduce_module, "block_sum", x, order))


# ---------------------------------------------------------------------------------------------
# sanitizer modes (subprocesses)


def run_in_sanitizer(mode, body):
    code = "import numpy as np\nfrom gpuconv.cuda.emulate import EmulatedModule\n" + textwrap.dedent(body)
    return emulate.run_sanitized(mode, code, timeout=300)


def test_sanitizer_modes_refuse_to_load_without_their_runtime(misc):
    with pytest.raises(KernelError, match="run_sanitized"):
        misc.compile(mode="asan")


@pytest.mark.slow
def test_asan_mode_catches_out_of_bounds_global_and_shared_accesses():
    load("misc.cu").compile(mode="asan", load=False)
    path = KERNELS / "misc.cu"
    clean = run_in_sanitizer("asan", f"""
        m = EmulatedModule(path={str(path)!r})
        x = np.ones(100, np.float32)
        m.get_function("scale")(4, 32, (x, np.float32(3), np.int32(100)))
        assert (x == 3).all()
        try:
            m.get_function("early_exit")(1, 32, (x,))
        except Exception as e:
            print("raised:", type(e).__name__)
        m.get_function("scale")(4, 32, (x, np.float32(2), np.int32(100)))  # fibers reusable after an abort
        print("clean run finished", x[0])
    """)
    assert clean.returncode == 0, clean.stderr[-3000:]
    assert "raised: KernelError" in clean.stdout and "clean run finished 6.0" in clean.stdout
    assert "AddressSanitizer" not in clean.stderr

    global_overflow = run_in_sanitizer("asan", f"""
        m = EmulatedModule(path={str(path)!r})
        m.get_function("write_past_end")(4, 32, (np.zeros(100, np.float32), np.int32(100)))
    """)
    assert "AddressSanitizer: heap-buffer-overflow" in global_overflow.stderr
    assert "in write_past_end" in global_overflow.stderr and "misc.cu:" in global_overflow.stderr

    shared_overflow = run_in_sanitizer("asan", f"""
        m = EmulatedModule(path={str(path)!r})
        m.get_function("shared_past_end")(1, 32, (np.zeros(32, np.float32),))
    """)
    assert "AddressSanitizer: heap-buffer-overflow" in shared_overflow.stderr
    assert "in shared_past_end" in shared_overflow.stderr


@pytest.mark.slow
def test_threads_mode_tsan_reports_the_missing_barrier_only():
    load("reduce.cu").compile(mode="threads", load=False)
    body = """
        m = EmulatedModule(path={path!r})
        x = np.random.default_rng(0).random(300).astype(np.float32)
        out = np.zeros(2, np.float32)
        m.get_function({kernel!r})(2, 256, (x, out, np.int32(300)))
        print("sum", out.sum(dtype=np.float64), x.sum(dtype=np.float64))
    """
    path = str(KERNELS / "reduce.cu")
    correct = run_in_sanitizer("threads", body.format(path=path, kernel="block_sum"))
    assert correct.returncode == 0, correct.stderr[-3000:]
    assert "ThreadSanitizer" not in correct.stderr
    total, expected = map(float, correct.stdout.split()[1:3])
    assert abs(total - expected) < 1e-3
    racy = run_in_sanitizer("threads", body.format(path=path, kernel="block_sum_unsynced"))
    assert "WARNING: ThreadSanitizer: data race" in racy.stderr
    assert "block_sum_unsynced" in racy.stderr and "reduce.cu:" in racy.stderr
    assert racy.returncode == 66


@pytest.mark.slow
def test_threads_mode_runs_the_execution_model_checks_too():
    load("misc.cu").compile(mode="threads", load=False)
    result = run_in_sanitizer("threads", f"""
        m = EmulatedModule(path={str(KERNELS / "misc.cu")!r})
        out = np.full((2, 1, 3, 4, 2, 1, 12), -7, np.int32)
        m.get_function("record_indices")((3, 1, 2), (1, 2, 4), (out,))
        print("indices", out[1, 0, 2, 3, 1, 0, :6].tolist())
        values, counts = np.zeros(64, np.float32), np.zeros(64, np.int32)
        m.get_function("read_unwritten_shared")(1, 64, (values, counts))
        print("unwritten", np.isnan(values[32:]).all(), (counts[32:] == -1).all(), values[5])
        for name in ("early_exit", "divergent_barriers"):
            try:
                m.get_function(name)(1, 8, (np.zeros(8, np.float32),))
            except Exception as e:
                print(name, "raised:", str(e).split("): ", 1)[1])
    """)
    assert result.returncode == 0 and "ThreadSanitizer" not in result.stderr, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "indices [2, 0, 1, 0, 1, 3]" in lines  # blockIdx (2, 0, 1), threadIdx (0, 1, 3)
    assert "unwritten True True 5.0" in lines
    # which side notices first (the returning thread or one arriving at the barrier) is up to the OS
    assert any(line.startswith("early_exit raised: block (0,0,0): thread (") and "returned" in line
               for line in lines)
    assert any(line.startswith("divergent_barriers raised:") and "while other threads wait" in line
               for line in lines)
