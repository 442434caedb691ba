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
    allocation whose guard zones hold a NaN bit pattern (all bits set; -1 in an int): an
    out-of-bounds read brings a NaN into the result, an out-of-bounds write changes a guard byte,
    which check() reports. Inputs go through copy()."""

    def __init__(self):
        self.raw = []

    def _make(self, shape, dtype):
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        raw = self.real_empty(count + 2 * GUARD, dtype)
        raw.view(np.uint8)[:] = 0xFF
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
            bytes_ = raw.view(np.uint8)
            guard = GUARD * raw.itemsize
            assert (bytes_[:guard] == 0xFF).all() and (bytes_[-guard:] == 0xFF).all(), (
                f"{what}: a kernel wrote outside a buffer (a guard zone changed)")


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
