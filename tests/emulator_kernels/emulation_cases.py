"""Shapes and helpers that run gpuconv's conv/pool ops through the emulated CUDA kernels and compare
them with the NumPy path. Shared by tests/test_emulated_kernels.py, tests/test_mutations.py and the
sanitizer subprocesses they start (which import this file by path), so it needs no pytest."""
import contextlib

import numpy as np

from gpuconv import ops
from gpuconv.cuda import runtime as compiler
from gpuconv.cuda.emulate import ORDERS, emulation

# x shape, weight shape, stride, padding, dilation, groups. Partial tiles everywhere: P not a
# multiple of 64, K not of 16, R not of 16; LeNet's two convolutions; groups and depthwise.
CONV_CASES = [
    ((2, 3, 9, 11), (4, 3, 3, 3), 1, 1, 1, 1),
    ((1, 4, 8, 7), (6, 2, 3, 2), (2, 1), (1, 0), (1, 2), 2),
    ((2, 2, 5, 5), (17, 2, 1, 1), 1, 0, 1, 1),
    ((1, 6, 12, 12), (16, 6, 5, 5), 1, 0, 1, 1),
    ((2, 4, 6, 6), (4, 1, 3, 3), 2, 1, 1, 4),
    ((1, 1, 28, 28), (6, 1, 5, 5), 1, 2, 1, 1),
    ((1, 2, 3, 1), (1, 2, 1, 1), (2, 1), 0, 1, 1),  # found by the random-shape test: a NumPy-path bug
]

# mode, x shape, kernel, stride, padding, count_include_pad (avg) or norm_type (lp).
POOL_CASES = [
    ("max", (2, 3, 8, 9), 2, None, 0, None),
    ("max", (1, 2, 7, 7), 3, 2, 1, None),
    ("max", (2, 2, 5, 6), (3, 2), (1, 2), (1, 1), None),
    ("avg", (2, 3, 8, 9), 2, None, 0, True),
    ("avg", (1, 2, 7, 7), 3, 2, 1, True),
    ("avg", (2, 2, 5, 6), (3, 2), (1, 2), (1, 1), False),
    ("lp", (2, 2, 7, 6), 3, 2, 0, 2.0),
    ("lp", (1, 3, 5, 7), (2, 3), 1, 0, 3.0),
]

TOLERANCE = {np.float32: 1e-5, np.float64: 1e-12}


@contextlib.contextmanager
def nan_filled_empty():
    """numpy.empty returns NaN-filled float arrays inside the block, so an output element a kernel
    never writes shows up as NaN instead of as whatever the allocator left there."""
    real_empty = np.empty

    def empty(shape, dtype=float, order="C", **kwargs):
        array = real_empty(shape, dtype, order, **kwargs)
        if array.dtype.kind == "f":
            array.fill(np.nan)
        return array

    np.empty = empty
    try:
        yield
    finally:
        np.empty = real_empty


def emulated(function, *args, order="forward", seed=0, mode=None, **kwargs):
    with nan_filled_empty(), emulation(order=order, seed=seed, mode=mode):
        return function(*args, **kwargs)


@contextlib.contextmanager
def kernel_sources(sources):
    """Run the launchers on replacement .cu texts ({"conv2d.cu": text, ...}) inside the block."""
    real_read = compiler.read_source

    def read(name):
        return sources[name] if name in sources else real_read(name)

    compiler.read_source = read
    saved_modules, saved_kernels = dict(compiler._modules), dict(compiler._kernels)
    compiler._modules.clear()
    compiler._kernels.clear()  # kernels are cached apart from their modules: drop both
    try:
        yield
    finally:
        compiler.read_source = real_read
        compiler._modules.clear()
        compiler._kernels.clear()
        compiler._modules.update(saved_modules)
        compiler._kernels.update(saved_kernels)


def conv_inputs(case, dtype, seed=0):
    x_shape, w_shape, stride, padding, dilation, groups = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    y = ops.conv2d(x, w, b, stride, padding, dilation, groups)
    dy = rng.standard_normal(y.shape).astype(dtype)
    return x, w, b, dy


def conv_outputs(case, dtype, algo="auto", seed=0):
    """{"y", "dx", "dw", "db"} of one conv case through whatever path is active."""
    _, _, stride, padding, dilation, groups = case
    x, w, b, dy = conv_inputs(case, dtype, seed)
    y = ops.conv2d(x, w, b, stride, padding, dilation, groups, algo=algo)
    dx, dw, db = ops.conv2d_backward(dy, x, w, stride, padding, dilation, groups, algo=algo)
    return {"y": y, "dx": dx, "dw": dw, "db": db}


def pool_inputs(case, dtype, seed=0):
    mode, x_shape = case[0], case[1]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    if mode == "lp":  # odd powers of negative numbers have no real root: keep lp's input positive
        x = np.abs(x) + dtype(0.1)
    dy = rng.standard_normal(pool_forward(case, x).shape).astype(dtype)
    return x, dy


def pool_forward(case, x):
    mode, _, kernel, stride, padding, extra = case
    if mode == "max":
        return ops.max_pool2d(x, kernel, stride, padding)
    if mode == "avg":
        return ops.avg_pool2d(x, kernel, stride, padding, count_include_pad=extra)
    return ops.lp_pool2d(x, extra, kernel, stride)


def pool_backward(case, dy, x):
    mode, _, kernel, stride, padding, extra = case
    if mode == "max":
        return ops.max_pool2d_backward(dy, x, kernel, stride, padding)
    if mode == "avg":
        return ops.avg_pool2d_backward(dy, x, kernel, stride, padding, count_include_pad=extra)
    return ops.lp_pool2d_backward(dy, x, extra, kernel, stride)


def pool_outputs(case, dtype, seed=0, x=None):
    if x is None:
        x, dy = pool_inputs(case, dtype, seed)
    else:
        dy = np.random.default_rng(seed).standard_normal(pool_forward(case, x).shape).astype(dtype)
    return pool_results(case, x, dy)


def pool_results(case, x, dy):
    """y and dx of one pool case; for max also the saved argmax indices and the backward that reads
    them, for lp the backward given the forward's output."""
    outputs = {"y": pool_forward(case, x), "dx": pool_backward(case, dy, x)}
    mode, _, kernel, stride, padding, extra = case
    if mode == "max":  # the forward's saved argmax, and the backward that reads it
        y, indices = ops.max_pool2d(x, kernel, stride, padding, return_indices=True)
        outputs.update(indices=indices, dx_saved=ops.max_pool2d_backward(dy, x, kernel, stride, padding,
                                                                         indices=indices))
    elif mode == "lp":  # the backward given the forward's output instead of re-running it
        outputs["dx_saved"] = ops.lp_pool2d_backward(dy, x, extra, kernel, stride, y=outputs["y"])
    return outputs


def mismatches(actual, expected, dtype):
    """Names of the outputs that differ beyond the dtype's tolerance (NaN where the reference has
    none counts as a difference)."""
    rtol = TOLERANCE[dtype]
    bad = []
    for name, want in expected.items():
        got = actual[name]
        if want is None or got is None:
            if (want is None) != (got is None):
                bad.append(name)
            continue
        scale = max(1.0, float(np.nanmax(np.abs(want))) if want.size and not np.isnan(want).all() else 1.0)
        if got.shape != want.shape or got.dtype != want.dtype or not np.allclose(
                got, want, rtol=rtol, atol=rtol * scale, equal_nan=True):
            bad.append(name)
    return bad


def identical(a, b):
    return all((a[k] is None and b[k] is None) or np.array_equal(a[k], b[k], equal_nan=True) for k in a)


def check_against_numpy(conv_cases=(), pool_cases=(), dtypes=(np.float32,), algos=("direct", "im2col"),
                        orders=("forward",)):
    """Raise AssertionError naming the first case whose emulated results differ from NumPy's."""
    for dtype in dtypes:
        for case in conv_cases:
            expected = conv_outputs(case, dtype)
            for algo in algos:
                for order in orders:
                    bad = mismatches(emulated(conv_outputs, case, dtype, algo, order=order), expected, dtype)
                    assert not bad, f"conv {case} {dtype.__name__} {algo} {order}: {bad} differ"
        for case in pool_cases:
            expected = pool_outputs(case, dtype)
            for order in orders:
                bad = mismatches(emulated(pool_outputs, case, dtype, order=order), expected, dtype)
                assert not bad, f"pool {case} {dtype.__name__} {order}: {bad} differ"


def findings(conv_cases=(), pool_cases=(), dtypes=(np.float32,), algos=("direct",), orders=ORDERS):
    """What the fibers-mode checks see, as a set of strings: 'mismatch' (differs from NumPy in some
    order), 'nan' (a NaN the reference lacks), 'order-dependent' (orders disagree bit for bit),
    'error: ...' (the emulator raised)."""
    found = set()
    for dtype in dtypes:
        runs = []
        for case in conv_cases:
            runs += [(lambda c=case, a=algo: conv_outputs(c, dtype, a), conv_outputs(case, dtype))
                     for algo in algos]
        for case in pool_cases:
            runs.append((lambda c=case: pool_outputs(c, dtype), pool_outputs(case, dtype)))
        for run, expected in runs:
            results = []
            for order in orders:
                try:
                    results.append(emulated(run, order=order, seed=11))
                except Exception as exc:  # the emulator refusing a kernel is a finding too
                    found.add(f"error: {type(exc).__name__}: {str(exc)[:300]}")
                    continue
                if mismatches(results[-1], expected, dtype):
                    found.add("mismatch")
                if any(np.isnan(v).any() and not np.isnan(expected[k]).any()
                       for k, v in results[-1].items() if v is not None):
                    found.add("nan")
            if any(not identical(results[0], r) for r in results[1:]):
                found.add("order-dependent")
    return found
