"""gpuconv's real CUDA kernels (kernels/*.cu) and launchers, run through the CPU emulator of the CUDA
execution model and compared with the NumPy path: every thread order, both conv algorithms, float32
and float64, random shapes, determinism, ASan and TSan runs, and a whole LeNet-5 training step."""
import importlib.util
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gpuconv import ops
from gpuconv.cuda import emulate
from gpuconv.cuda import runtime as compiler
from gpuconv.cuda.emulate import ORDERS

CASES_FILE = Path(__file__).parent / "emulator_kernels" / "emulation_cases.py"
_spec = importlib.util.spec_from_file_location("emulation_cases", CASES_FILE)
cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cases)

DTYPES = [np.float32, np.float64]
PROPERTY = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_outputs_match(actual, expected, dtype, what):
    bad = cases.mismatches(actual, expected, dtype)
    assert not bad, f"{what}: {bad} differ from the NumPy path"


def assert_bit_identical(results, what):
    first = results[0]
    for other in results[1:]:
        assert cases.identical(first, other), f"{what}: results differ between thread orders/runs"


# ---------------------------------------------------------------------------------------------
# fixed shapes: every order, both algorithms, both dtypes


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("algo", ["direct", "im2col"])
@pytest.mark.parametrize("case", cases.CONV_CASES, ids=lambda c: "x{}-w{}".format(*c[:2]))
def test_conv2d_forward_backward_in_every_order(case, algo, dtype):
    expected = cases.conv_outputs(case, dtype)
    results = [cases.emulated(cases.conv_outputs, case, dtype, algo, order=order, seed=5) for order in ORDERS]
    for order, result in zip(ORDERS, results):
        assert_outputs_match(result, expected, dtype, f"conv {algo} {order}")
    # Every reduction runs in a fixed order, so the thread schedule must not change a single bit.
    assert_bit_identical(results, f"conv {algo}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("case", cases.POOL_CASES, ids=lambda c: f"{c[0]}-x{c[1]}-k{c[2]}-s{c[3]}-p{c[4]}")
def test_pool2d_forward_backward_in_every_order(case, dtype):
    expected = cases.pool_outputs(case, dtype)
    results = [cases.emulated(cases.pool_outputs, case, dtype, order=order, seed=5) for order in ORDERS]
    for order, result in zip(ORDERS, results):
        assert_outputs_match(result, expected, dtype, f"{case[0]} pool {order}")
    assert_bit_identical(results, f"{case[0]} pool")


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_max_pool_ties_and_nan_match_numpy_exactly(dtype):
    x = np.random.default_rng(3).integers(0, 3, (2, 2, 7, 8)).astype(dtype)
    x[0, 0, 1, 1] = np.nan
    x[1, 1, 4, 6] = np.nan
    case = ("max", x.shape, 3, 2, 1, None)
    expected = cases.pool_outputs(case, dtype, x=x)
    for order in ORDERS:
        result = cases.emulated(cases.pool_outputs, case, dtype, x=x, order=order)
        # The winners (and so y, and where dx is non-zero) must agree exactly; dx sums overlapping
        # windows' gradients, in an order that may differ from NumPy's.
        np.testing.assert_array_equal(result["y"], expected["y"], err_msg=f"y ({order})")
        np.testing.assert_array_equal(result["dx"] != 0, expected["dx"] != 0, err_msg=f"dx ({order})")
        np.testing.assert_allclose(result["dx"], expected["dx"], rtol=cases.TOLERANCE[dtype],
                                   err_msg=f"dx ({order})")


def test_same_padding_with_an_even_kernel():
    x = np.random.default_rng(0).standard_normal((2, 3, 7, 6))
    w = np.random.default_rng(1).standard_normal((4, 3, 4, 2))
    dy = np.random.default_rng(2).standard_normal((2, 4, 7, 6))
    expected = ops.conv2d(x, w, None, padding="same"), ops.conv2d_backward(dy, x, w, padding="same")
    for algo in ("direct", "im2col"):
        y = cases.emulated(ops.conv2d, x, w, None, padding="same", algo=algo)
        grads = cases.emulated(ops.conv2d_backward, dy, x, w, padding="same", algo=algo)
        np.testing.assert_allclose(y, expected[0], rtol=1e-12, atol=1e-12)
        for got, want in zip(grads, expected[1]):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_repeated_runs_are_bit_identical():
    case = cases.CONV_CASES[3]
    runs = [cases.emulated(cases.conv_outputs, case, np.float32, "direct", order="random", seed=seed)
            for seed in (1, 2)]
    assert_bit_identical(runs, "two random-order runs")


# ---------------------------------------------------------------------------------------------
# random shapes


@st.composite
def conv_configs(draw):
    groups = draw(st.integers(1, 3))
    c_per_group, k_per_group = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    assume(c_per_group * groups >= 2)
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    h, w = draw(st.integers(1, 13)), draw(st.integers(1, 13))
    assume(h + 2 * padding[0] >= dilation[0] * (kh - 1) + 1 and w + 2 * padding[1] >= dilation[1] * (kw - 1) + 1)
    n = draw(st.integers(1, 3))
    return ((n, c_per_group * groups, h, w), (k_per_group * groups, c_per_group, kh, kw),
            stride, padding, dilation, groups)


@pytest.mark.slow
@PROPERTY
@given(case=conv_configs(), algo=st.sampled_from(["direct", "im2col"]), order=st.sampled_from(ORDERS),
       dtype=st.sampled_from(DTYPES))
def test_conv2d_random_shapes(case, algo, order, dtype):
    expected = cases.conv_outputs(case, dtype)
    result = cases.emulated(cases.conv_outputs, case, dtype, algo, order=order, seed=9)
    assert_outputs_match(result, expected, dtype, f"conv {case} {algo} {order}")


@st.composite
def pool_configs(draw):
    mode = draw(st.sampled_from(["max", "avg", "lp"]))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (0, 0) if mode == "lp" else (draw(st.integers(0, kernel[0] // 2)),
                                           draw(st.integers(0, kernel[1] // 2)))
    h, w = draw(st.integers(1, 11)), draw(st.integers(1, 11))
    assume(h + 2 * padding[0] >= kernel[0] and w + 2 * padding[1] >= kernel[1])
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), h, w)
    extra = {"max": None, "avg": draw(st.booleans()), "lp": draw(st.sampled_from([1.0, 2.0, 3.0]))}[mode]
    return (mode, shape, kernel, stride, padding, extra)


@pytest.mark.slow
@PROPERTY
@given(case=pool_configs(), order=st.sampled_from(ORDERS), dtype=st.sampled_from(DTYPES))
def test_pool2d_random_shapes(case, order, dtype):
    expected = cases.pool_outputs(case, dtype)
    result = cases.emulated(cases.pool_outputs, case, dtype, order=order, seed=9)
    assert_outputs_match(result, expected, dtype, f"pool {case} {order}")


# ---------------------------------------------------------------------------------------------
# LeNet-5: a whole training step through the emulated kernels


@pytest.mark.parametrize("pool", ["max", "avg"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_lenet5_training_step_matches_numpy(dtype, pool):
    import gpuconv
    from gpuconv import functional
    from gpuconv.models import LeNet5

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 1, 28, 28)).astype(dtype)
    labels = rng.integers(0, 10, 3)

    def step(compiled):
        model = LeNet5(pool=pool, seed=1, dtype=dtype)
        net = gpuconv.compile(model) if compiled else model
        eager = not net.uses_executor(x) if compiled else True
        loss = functional.cross_entropy(net(x), labels)
        loss.backward()
        return eager, loss.item(), [(name, p.grad) for name, p in model.named_parameters()]

    _, loss, grads = step(compiled=False)
    # As the trainer runs it: gpuconv.compile must leave an emulated run to the layers, whose ops
    # then launch the kernels.
    eager, emulated_loss, emulated_grads = cases.emulated(step, compiled=True, order="random", seed=3)
    assert eager
    rtol = cases.TOLERANCE[dtype] * 10  # the errors of five layers add up
    assert emulated_loss == pytest.approx(loss, rel=rtol)
    for (name, want), (_, got) in zip(grads, emulated_grads):
        scale = float(np.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=name)


# ---------------------------------------------------------------------------------------------
# sanitizer runs of the real kernels (subprocesses)


def real_modules():
    """The EmulatedModules the launchers use, built exactly as runtime.load_module builds them."""
    with emulate.emulation():
        return [compiler.load_module(name, compiler.template_instances(compiler.KERNELS[name]))
                for name in ("conv2d.cu", "pool2d.cu")]


def sanitizer_run(mode, call):
    emulate.build_all((module, mode) for module in real_modules())
    code = textwrap.dedent(f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("emulation_cases", {str(CASES_FILE)!r})
        cases = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cases)
        import numpy as np
        {call}
        print("all matched")
    """)
    return emulate.run_sanitized(mode, code, timeout=500)


@pytest.mark.slow
def test_kernels_under_asan():
    result = sanitizer_run("asan", "cases.check_against_numpy(cases.CONV_CASES[:2] + cases.CONV_CASES[4:5], "
                                   "cases.POOL_CASES[1::2], dtypes=(np.float32, np.float64))")
    assert "AddressSanitizer" not in result.stderr, result.stderr[-4000:]
    assert result.returncode == 0 and "all matched" in result.stdout, result.stderr[-4000:]


@pytest.mark.slow
def test_kernels_under_tsan_have_no_races():
    # R = 18 > TILE_R: two tiles, so both barriers of the tile loop matter
    tiny_conv = [((1, 2, 5, 4), (2, 1, 2, 3), 1, 1, 1, 2), ((1, 2, 4, 3), (2, 2, 3, 3), 1, 1, 1, 1)]
    tiny_pool = [("max", (1, 2, 4, 5), 3, 2, 1, None), ("avg", (1, 1, 5, 4), 2, 1, 1, False),
                 ("lp", (1, 1, 4, 4), 2, 2, 0, 2.0)]
    result = sanitizer_run("threads", f"cases.check_against_numpy({tiny_conv!r}, {tiny_pool!r})")
    assert "ThreadSanitizer" not in result.stderr, result.stderr[-4000:]
    assert result.returncode == 0 and "all matched" in result.stdout, result.stderr[-4000:]
