"""Out-of-range accesses and grid limits of kernels/*.cu, in the fast (fibers) emulator, found by
`python -m gpuconv mutants`: mutants whose stray read or write lands on memory no value check looks
at (the next image, a tile row multiplied by 0, past the last output), and grid-stride loops that
only a grid past one launch's limits runs twice. Kept apart from test_kernel_killers.py because they
are the slowest of the kernel tests: the mutation tool runs them last."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

CASES_FILE = Path(__file__).parent / "emulator_kernels" / "emulation_cases.py"
_spec = importlib.util.spec_from_file_location("emulation_cases", CASES_FILE)
cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cases)

F64 = np.float64
# out-of-bounds accesses, seen in the fast (fibers) emulator: every buffer sits between guard zones


GUARD = 2048  # elements on each side of every buffer


class GuardedBuffers:
    """np.empty / np.zeros of a float or int dtype (what the launch code allocates through under
    emulation: buffers, max pooling's saved indices) return arrays in the middle of a larger
    allocation filled with a guard pattern: a signalling NaN in a float (-1 in an int). An
    out-of-bounds read brings a NaN into the result; an out-of-bounds write changes a guard element,
    which check() reports, even when it writes back arithmetic on the guard's own NaN (an in-place
    `y[i] = y[i] + b` one past the end): arithmetic returns the quiet NaN, other bits. Inputs go
    through copy()."""

    def __init__(self):
        self.raw = []

    def _make(self, shape, dtype):
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        raw = self.real_empty(count + 2 * GUARD, dtype)
        bits, pattern = _guard_pattern(dtype)
        raw.view(bits)[:] = pattern
        self.raw.append(raw)
        return raw[GUARD:GUARD + count].reshape(shape)

    def copy(self, array):
        out = self._make(array.shape, array.dtype)
        out[...] = array
        return out

    def __enter__(self):
        self.real_empty, self.real_zeros = np.empty, np.zeros

        def empty(shape, dtype=float, order="C", **kwargs):
            if order != "C" or kwargs or np.dtype(dtype).kind not in "fi":
                return self.real_empty(shape, dtype, order, **kwargs)
            # NaN-filled (an int: -1, which names no pixel): an element a kernel never writes shows up
            return self._make(shape, dtype)

        def zeros(shape, dtype=float, order="C", **kwargs):
            if order != "C" or kwargs or np.dtype(dtype).kind not in "fi":
                return self.real_zeros(shape, dtype, order, **kwargs)
            out = self._make(shape, dtype)
            out[...] = 0
            return out

        np.empty, np.zeros = empty, zeros
        return self

    def __exit__(self, *exc):
        np.empty, np.zeros = self.real_empty, self.real_zeros

    def check(self, what):
        for raw in self.raw:
            bits, pattern = _guard_pattern(raw.dtype)
            words = raw.view(bits)
            assert (words[:GUARD] == pattern).all() and (words[-GUARD:] == pattern).all(), (
                f"{what}: a kernel wrote outside a buffer (a guard zone changed)")


def _guard_pattern(dtype):
    """(unsigned view dtype, guard value): a signalling NaN for float32/float64 (quiet bit clear,
    payload non-zero), all bits set otherwise."""
    dtype = np.dtype(dtype)
    bits = np.dtype(f"u{dtype.itemsize}")
    if dtype == np.float32:
        return bits, bits.type(0x7FA00000)
    if dtype == np.float64:
        return bits, bits.type(0x7FF4000000000000)
    return bits, bits.type(np.iinfo(bits).max)


def guarded_conv(case, dtype, algo):
    from gpuconv import ops
    from gpuconv.cuda import emulation
    _, _, stride, padding, dilation, groups = case
    x, w, b, dy = cases.conv_inputs(case, dtype)
    with GuardedBuffers() as buffers, emulation():
        x, w, b, dy = (buffers.copy(a) for a in (x, w, b, dy))
        y = ops.conv2d(x, w, b, stride, padding, dilation, groups, algo=algo)
        dx, dw, db = ops.conv2d_backward(dy, x, w, stride, padding, dilation, groups, algo=algo)
        result = {"y": np.array(y), "dx": np.array(dx), "dw": np.array(dw), "db": np.array(db)}
    buffers.check(f"conv {case} {algo}")
    return result


GUARDED_CONV_CASES = [
    ((2, 3, 9, 11), (4, 3, 3, 3), 1, 1, 1, 1),           # padding on every side, partial tiles
    ((1, 4, 8, 7), (6, 2, 3, 2), (2, 1), (1, 0), (1, 2), 2),  # groups: the last group's channels
    ((2, 20, 5, 4), (18, 20, 2, 3), 1, (0, 1), 1, 1),    # C and K past one 16-channel tile
]


@pytest.mark.parametrize("algo", ["direct", "im2col"])
@pytest.mark.parametrize("case", GUARDED_CONV_CASES, ids=lambda c: "x{}-w{}".format(*c[:2]))
def test_conv_reads_and_writes_stay_inside_their_buffers(case, algo):
    # A bound or guard slip whose out-of-range access lands on memory the test does not look at
    # (the next image, a row of the tile that is multiplied by 0, past the last output) passes
    # every value check; with guard zones around every buffer it turns into NaN or a changed guard.
    expected = cases.conv_outputs(case, F64)
    got = guarded_conv(case, F64, algo)
    bad = cases.mismatches(got, expected, F64)
    assert not bad, f"conv {case} {algo}: {bad} differ from the NumPy path"


@pytest.mark.parametrize("case", [
    ("max", (2, 2, 7, 7), 3, 2, 1, None), ("avg", (2, 2, 7, 6), (3, 2), (2, 1), (1, 1), True),
    ("avg", (2, 2, 6, 7), (2, 3), (1, 2), (1, 1), False), ("lp", (2, 2, 7, 6), (3, 2), (2, 1), 0, 1.5),
], ids=lambda c: c[0])
def test_pool_reads_and_writes_stay_inside_their_buffers(case):
    from gpuconv.cuda import emulation
    x, dy = cases.pool_inputs(case, F64)
    expected = cases.pool_outputs(case, F64)
    with GuardedBuffers() as buffers, emulation():
        x, dy = buffers.copy(x), buffers.copy(dy)
        got = {name: np.array(value) for name, value in cases.pool_results(case, x, dy).items()}
    buffers.check(f"pool {case}")
    bad = cases.mismatches(got, expected, F64)
    assert not bad, f"pool {case}: {bad} differ from the NumPy path"

def test_conv_without_bias_reads_no_bias():
    # With has_bias = 0 the launcher passes a 1-element placeholder: reading b[channel] anyway is
    # out of range for every channel but the first.
    from gpuconv import ops
    from gpuconv.cuda import emulation
    case = ((2, 3, 6, 5), (5, 3, 2, 2), 1, 1, 1, 1)
    x, w, _, _ = cases.conv_inputs(case, F64)
    expected = ops.conv2d(x, w, None, 1, 1)
    for algo in ("direct", "im2col"):
        with GuardedBuffers() as buffers, emulation():
            y = np.array(ops.conv2d(buffers.copy(x), buffers.copy(w), None, 1, 1, algo=algo))
        buffers.check(f"conv without bias ({algo})")
        np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12, err_msg=algo)


def test_conv_shared_tiles_stay_in_bounds_under_asan():
    # Shared memory is one arena per block in the fast emulator, so a store past the end of the last
    # __shared__ array (a tile dimension off by one) hits unused arena and changes no result; under
    # ASan every __shared__ array is its own allocation. R = 3*3*3 = 27 > TILE_R: two tiles.
    from gpuconv.cuda import emulate
    from gpuconv.cuda import runtime as compiler
    with emulate.emulation():
        module = compiler.load_module("conv2d.cu", compiler.template_instances(compiler.KERNELS["conv2d.cu"]))
    emulate.build_all([(module, "asan")])
    code = (f"import importlib.util\n"
            f"spec = importlib.util.spec_from_file_location('emulation_cases', {str(CASES_FILE)!r})\n"
            f"cases = importlib.util.module_from_spec(spec)\n"
            f"spec.loader.exec_module(cases)\n"
            f"import numpy as np\n"
            f"cases.check_against_numpy([((1, 3, 5, 4), (17, 3, 3, 3), 1, 1, 1, 1)], algos=('direct',))\n"
            f"print('all matched')\n")
    result = emulate.run_sanitized("asan", code, timeout=300)
    assert "AddressSanitizer" not in result.stderr, result.stderr[-4000:]
    assert result.returncode == 0 and "all matched" in result.stdout, result.stderr[-4000:]


# the grid-stride kernels over flat counts: several blocks (count > one block's threads), and more
# elements than the launcher's capped grid holds, so the loop takes a second step
# (shape, inner, relu settings): the large case runs the ReLU alone, to keep the test short
ELEMENTWISE_SHAPES = {"blocks": ((4, 6, 5, 7), 35, (0, 1)), "grid-stride": ((4096 * 256 + 300, 3), 1, (1,))}


@pytest.mark.parametrize("shape, inner, relus", list(ELEMENTWISE_SHAPES.values()), ids=list(ELEMENTWISE_SHAPES))
def test_elementwise_epilogues_stay_inside_their_buffers(shape, inner, relus):
    # bias_act and relu_backward: a loop bound one past the end reads and writes the element after
    # the buffer, which no value check sees; a wrong step repeats bias_act's in-place add.
    from gpuconv.cuda import emulation
    from gpuconv.ops import elementwise_cuda
    assert elementwise_cuda.MAX_BLOCKS * elementwise_cuda.THREADS == 4096 * 256
    rng = np.random.default_rng(3)
    y0, b = rng.standard_normal(shape), rng.standard_normal(shape[1])
    dy = rng.standard_normal(shape)
    for relu in relus:
        expected = y0 + b.reshape((1, -1) + (1,) * (len(shape) - 2))
        expected = np.maximum(expected, 0) if relu else expected
        with GuardedBuffers() as buffers, emulation():
            y = buffers.copy(y0)
            elementwise_cuda.bias_act(y, buffers.copy(b), inner, relu)
            dx = np.array(elementwise_cuda.relu_backward(buffers.copy(dy), y))
            y = np.array(y)
        buffers.check(f"bias_act / relu_backward (relu={relu})")
        np.testing.assert_allclose(y, expected, rtol=1e-15, atol=1e-15)
        np.testing.assert_array_equal(dx, np.where(expected > 0, dy, 0))


OPTIMIZER_SHAPES = {"blocks": [(7,), (30, 11), (1,)], "grid-stride": [(7,), (513, 512), (1,)]}


@pytest.mark.parametrize("shapes", list(OPTIMIZER_SHAPES.values()), ids=list(OPTIMIZER_SHAPES))
@pytest.mark.parametrize("name, kwargs", [("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
                                          ("Adam", dict(lr=0.01, weight_decay=0.01))])
def test_the_fused_optimizer_stays_inside_its_flat_buffers(name, kwargs, shapes):
    # sgd_update / adam_update over flat buffers of 338 elements (two blocks) and of 262,664 (more
    # than the launcher's 1024 blocks of 256 threads): an access one past the end lands in the
    # guard zone (in a real step, on whatever CuPy's pool put next); a wrong step skips or repeats.
    from gpuconv import optim
    from gpuconv.cuda import emulation
    from gpuconv.nn import Parameter
    assert optim.FUSED_MAX_BLOCKS * optim.FUSED_THREADS == 1024 * 256
    rng = np.random.default_rng(4)
    start = [rng.standard_normal(shape) for shape in shapes]
    grads = [[rng.standard_normal(shape) for shape in shapes] for _ in range(2)]

    def run(emulated):
        params = [Parameter(a.copy(), f"p{i}") for i, a in enumerate(start)]
        opt = getattr(optim, name)(params, **kwargs)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.copy()
            opt.step()
        if emulated:
            assert opt.flat is not None  # the fused path ran
        return [np.array(p.data) for p in params]

    expected = run(False)
    with GuardedBuffers() as buffers, emulation():
        got = run(True)
    buffers.check(f"{name} fused step")
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# grids past one launch's limits: the grid-stride loops over grid.y / grid.z run a second time
# (last: the conv case emulates 65535 blocks of 256 threads, the slowest kernel test)


@pytest.mark.parametrize("mode, extra", [("max", None), ("avg", True), ("lp", 2.0)])
def test_pool_with_more_planes_than_one_grid_holds(mode, extra):
    # N*C = 65538 > 65535: the pool kernels' FOR_EACH_PLANE loop over grid.y takes a second step.
    case = (mode, (32769, 2, 2, 3), 2, 1, 0, extra)
    bad = cases.mismatches(cases.emulated(cases.pool_outputs, case, F64), cases.pool_outputs(case, F64), F64)
    assert not bad, f"pool {case}: {bad} differ from the NumPy path"


def test_conv_with_more_batch_groups_than_one_grid_holds():
    # N*groups = 65538 > 65535 (the launcher's cap on grid.z of the direct kernels and on grid.y of
    # im2col and col2im): only here do the kernels' grid-stride loops take a second step, where a
    # slip in the stride or the loop bound would lose or repeat images.
    case = ((32769, 2, 1, 3), (2, 1, 1, 2), 1, 0, 1, 2)
    expected = cases.conv_outputs(case, F64)
    for algo in ("direct", "im2col"):
        bad = cases.mismatches(cases.emulated(cases.conv_outputs, case, F64, algo), expected, F64)
        assert not bad, f"conv {case} {algo}: {bad} differ from the NumPy path"
