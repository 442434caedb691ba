"""gpuconv/ops/conv_cpu.py, the CPU conv for groups == 1: the batch in parts over the worker
threads and each part in chunks, against the im2col reference of conv.py (itself checked against
a per-pixel reference in test_ops_conv.py), for every split of the batch into parts and chunks."""
import gc
import threading
import weakref

import numpy as np
import pytest

import gpuconv
from gpuconv import blas
from gpuconv.ops import conv, conv_cpu

# (x shape, w shape, stride, padding, dilation): stride 1 takes the input gradient as a
# convolution of dy, other strides (and padding wider than the kernel) add the columns back.
# These run in float64, which never takes the batch-innermost layout (tested below).
SHAPES = [
    ((7, 3, 9, 8), (4, 3, 3, 3), (1, 1), (1, 1), (1, 1)),
    ((5, 2, 9, 10), (3, 2, 3, 2), (2, 2), (1, 0), (1, 1)),
    ((6, 4, 11, 9), (5, 4, 3, 3), (1, 2), (2, 1), (2, 1)),
    ((3, 2, 8, 8), (2, 2, 2, 3), (3, 1), (0, 2), (1, 2)),
    ((4, 3, 6, 6), (2, 3, 1, 1), (1, 1), (1, 1), (1, 1)),  # padding wider than the kernel's reach
    ((5, 1, 12, 12), (6, 1, 5, 5), (1, 1), (0, 0), (1, 1)),  # LeNet-5's conv1, smaller
    ((3, 20, 6, 7), (3, 20, 3, 3), (1, 1), (1, 1), (1, 1)),  # stride 1, 180-long columns: rows
    ((4, 17, 7, 6), (5, 17, 3, 3), (1, 1), (2, 1), (2, 1)),  # the same, dilated
    ((5, 18, 9, 8), (4, 18, 3, 3), (2, 2), (1, 1), (1, 1)),  # strided, 18 channels
    ((4, 3, 9, 9), (2, 3, 3, 3), (1, 1), (2, 2), (2, 2)),    # dilated stride 1: wide rows
]


@pytest.mark.parametrize("shape, layout", [
    (((128, 1, 28, 28), (6, 1, 5, 5), (1, 1), (2, 2), (1, 1)), "_RowRuns"),   # LeNet-5 conv1
    (((128, 6, 14, 14), (16, 6, 5, 5), (1, 1), (0, 0), (1, 1)), "_RowRuns"),  # LeNet-5 conv2
    (((128, 16, 32, 32), (16, 16, 3, 3), (1, 1), (1, 1), (1, 1)), "_RowRuns"),
    (((1, 16, 32, 32), (16, 16, 3, 3), (1, 1), (1, 1), (1, 1)), "_Wide"),     # one image: 32 columns
    (((1, 16, 32, 32), (32, 16, 3, 3), (2, 2), (1, 1), (1, 1)), "_Rows"),   # strided
    (((1, 16, 32, 32), (16, 16, 3, 3), (1, 1), (2, 2), (2, 2)), "_Wide"),   # dilated, 144 rows
    (((1, 32, 16, 16), (32, 32, 3, 3), (1, 1), (2, 2), (2, 2)), "_Rows"),   # dilated, 288 rows
    (((16, 256, 28, 28), (256, 256, 3, 3), (1, 1), (1, 1), (1, 1)), "_Rows"),  # one image a chunk: 28 columns
    (((128, 64, 16, 16), (64, 64, 3, 3), (1, 1), (1, 1), (1, 1)), "_RowRuns"),  # 112 columns
])
def test_layout_per_shape(shape, layout):
    geo = conv_cpu._Geometry(*shape)
    assert conv_cpu._layout_class(geo, np.float32).__name__ == layout


def test_every_layout_is_tested(monkeypatch):
    monkeypatch.setattr(conv_cpu, "ROW_RUNS_MIN_COLUMNS", 0)  # as the row-runs fixtures below set it
    names = {conv_cpu._layout_class(conv_cpu._Geometry(*shape), np.float64).__name__ for shape in SHAPES}
    assert names == {"_Rows", "_Wide", "_RowRuns"}


@pytest.fixture(params=[0, 1, 2], ids=lambda n: f"workers{n}")
def workers(request):
    gpuconv.set_cpu_workers(request.param)
    yield request.param
    gpuconv.set_cpu_workers(None)


@pytest.fixture(params=["one-image-chunks", "default-chunks", "default-chunks-row-runs"])
def chunk_bytes(request, monkeypatch):
    """Every layout's chunks of one image, or of their default size. The small shapes here make
    products narrower than ROW_RUNS_MIN_COLUMNS, so the row-runs cases lift that bound: stride-1
    convs then take _RowRuns whatever their chunk."""
    if request.param == "one-image-chunks":
        for name in ("CHUNK_BYTES", "ROW_RUNS_BYTES", "BATCH_INNER_BYTES"):
            monkeypatch.setattr(conv_cpu, name, 1)
    if request.param != "default-chunks":
        monkeypatch.setattr(conv_cpu, "ROW_RUNS_MIN_COLUMNS", 0)
    return request.param


def _arrays(shape, dtype, seed=0):
    x_shape, w_shape, stride, padding, dilation = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    return x, w, b, stride, padding, dilation


@pytest.mark.parametrize("shape", SHAPES, ids=range(len(SHAPES)))
def test_forward_and_gradients_match_the_im2col_reference(shape, workers, chunk_bytes):
    x, w, b, stride, padding, dilation = _arrays(shape, np.float64)
    expected = conv.conv2d_forward_numpy(x, w, b, stride, padding, dilation, 1)
    y = conv_cpu.conv2d_forward(x, w, b, stride, padding, dilation)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    dy = np.random.default_rng(1).standard_normal(y.shape)
    want = conv.conv2d_backward_numpy(dy, x, w, stride, padding, dilation, 1)
    got = conv_cpu.conv2d_backward(dy, x, w, stride, padding, dilation, True, True, True)
    for name, g, e in zip(("dx", "dw", "db"), got, want):
        assert g.shape == e.shape and g.dtype == e.dtype, name
        np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True)])
def test_each_gradient_alone(need, workers):
    x, w, _, stride, padding, dilation = _arrays(SHAPES[1], np.float64)
    dy = np.random.default_rng(2).standard_normal(conv.conv2d_forward_numpy(
        x, w, None, stride, padding, dilation, 1).shape)
    want = conv.conv2d_backward_numpy(dy, x, w, stride, padding, dilation, 1)
    got = conv_cpu.conv2d_backward(dy, x, w, stride, padding, dilation, need[0], need[2], need[1])
    for g, e, needed in zip(got, want, (need[0], need[1], need[2])):
        if needed:
            np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-12)
        else:
            assert g is None


def test_float32_matches_float64_and_keeps_its_dtype(workers):
    x, w, b, stride, padding, dilation = _arrays(SHAPES[0], np.float32)
    y = conv_cpu.conv2d_forward(x, w, b, stride, padding, dilation)
    assert y.dtype == np.float32
    exact = conv_cpu.conv2d_forward(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64),
                                    stride, padding, dilation)
    np.testing.assert_allclose(y, exact, rtol=1e-5, atol=1e-5)


def test_same_bits_every_call_for_a_worker_count(workers):
    """The split comes from the batch size and the worker count alone: repeated calls (threads
    finishing in any order) give the same bits, the summed filter and bias gradients included."""
    x, w, b, stride, padding, dilation = _arrays(((33, 4, 10, 10), (8, 4, 3, 3), (1, 1), (1, 1), (1, 1)),
                                                 np.float32)
    dy = np.random.default_rng(3).standard_normal((33, 8, 10, 10)).astype(np.float32)
    first = conv_cpu.conv2d_backward(dy, x, w, stride, padding, dilation, True, True, True)
    for _ in range(5):
        again = conv_cpu.conv2d_backward(dy, x, w, stride, padding, dilation, True, True, True)
        for a, e in zip(again, first):
            assert np.array_equal(a, e)


def test_public_conv2d_takes_this_path_for_one_group_and_a_large_batch(monkeypatch):
    """Below REFERENCE_MAX_BYTES of whole-batch columns, and for groups, the reference path runs."""
    calls = []
    real_forward, real_backward = conv_cpu.conv2d_forward, conv_cpu.conv2d_backward
    monkeypatch.setattr(conv_cpu, "conv2d_forward", lambda *a: calls.append("forward") or real_forward(*a))
    monkeypatch.setattr(conv_cpu, "conv2d_backward", lambda *a: calls.append("backward") or real_backward(*a))
    w = np.ones((4, 4, 3, 3), np.float32)
    small = np.ones((2, 4, 5, 5), np.float32)   # 2 * 36 * 9 * 4 bytes of columns
    gpuconv.ops.conv2d(small, w)
    gpuconv.ops.conv2d(small, np.ones((4, 2, 3, 3), np.float32), groups=2)
    assert calls == []
    large = np.ones((64, 4, 32, 32), np.float32)  # 64 * 36 * 900 * 4 = 8.3 MB
    y = gpuconv.ops.conv2d(large, w)
    gpuconv.ops.conv2d_backward(y, large, w)
    # float32 with 4 input channels: the batch-innermost layout takes both gradients (no gather)
    assert calls == ["forward", "backward"]
    conv_cpu.conv2d_backward(y.astype(np.float64), large.astype(np.float64), w.astype(np.float64),
                             (1, 1), (0, 0), (1, 1), True, True, True)
    assert calls[2:] == ["backward", "forward"]  # float64: the stride-1 input gradient is a conv of dy
    gpuconv.ops.conv2d(large, np.ones((4, 2, 3, 3), np.float32), groups=2)
    assert len(calls) == 4
    monkeypatch.setattr(conv_cpu, "REFERENCE_MAX_BYTES", 0)
    gpuconv.ops.conv2d(small, w)
    assert calls[-1] == "forward"


@pytest.mark.parametrize("shape, layout, method", [(SHAPES[0], "_RowRuns", "matrices"),
                                                   (SHAPES[-1], "_Wide", "columns")])
def test_blas_threads_restored_and_a_parts_error_reaches_the_caller(shape, layout, method, monkeypatch):
    gpuconv.set_cpu_workers(1)
    try:
        before = blas.get_num_threads()
        x, w, b, stride, padding, dilation = _arrays(shape, np.float32)
        conv_cpu.conv2d_forward(x, w, b, stride, padding, dilation)
        assert blas.get_num_threads() == before
        monkeypatch.setattr(conv_cpu, "ROW_RUNS_MIN_COLUMNS", 0)
        geo = conv_cpu._Geometry(x.shape, w.shape, stride, padding, dilation)
        assert conv_cpu._layout_class(geo, np.float32).__name__ == layout
        real = getattr(getattr(conv_cpu, layout), method)

        def failing(self, x, first, *rest):
            if first > 0:  # the worker thread's part
                raise MemoryError("part failed")
            return real(self, x, first, *rest)

        monkeypatch.setattr(getattr(conv_cpu, layout), method, failing)
        with pytest.raises(MemoryError, match="part failed"):
            conv_cpu.conv2d_forward(x, w, b, stride, padding, dilation)
        assert blas.get_num_threads() == before
        monkeypatch.setattr(getattr(conv_cpu, layout), method, real)
        # the region's lock was released: the next call runs
        np.testing.assert_allclose(conv_cpu.conv2d_forward(x, w, b, stride, padding, dilation),
                                   conv.conv2d_forward_numpy(x, w, b, stride, padding, dilation, 1),
                                   rtol=1e-5, atol=1e-5)
    finally:
        gpuconv.set_cpu_workers(None)


def test_worker_threads_keep_no_reference_to_the_callers_arrays():
    gpuconv.set_cpu_workers(1)
    try:
        x, w, b, stride, padding, dilation = _arrays(SHAPES[0], np.float32)
        y = conv_cpu.conv2d_forward(x, w, b, stride, padding, dilation)
        refs = [weakref.ref(a) for a in (x, w, y)]
        del x, w, y
        gc.collect()
        assert [r() for r in refs] == [None, None, None]
    finally:
        gpuconv.set_cpu_workers(None)


def test_two_user_threads_at_once_each_get_their_own_result():
    """Regions run one at a time (one lock): two threads calling conv2d get correct results."""
    gpuconv.set_cpu_workers(1)
    try:
        inputs = [_arrays(SHAPES[i], np.float64, seed=i) for i in (0, 2)]
        expected = [conv.conv2d_forward_numpy(*a[:2], a[2], *a[3:], 1) for a in inputs]
        results, errors = {}, []

        def run(index):
            try:
                for _ in range(20):
                    results[index] = conv_cpu.conv2d_forward(*inputs[index])
            except BaseException as error:  # reported below
                errors.append(error)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads) and not errors
        for i in range(2):
            np.testing.assert_allclose(results[i], expected[i], rtol=1e-12, atol=1e-12)
    finally:
        gpuconv.set_cpu_workers(None)


# ----------------------------------------------------------------------------------------------
# float32 stride-1 convs: the backward with the input gradient runs in the batch-innermost layout
# (_BatchInner: the CPU executor's ConvOp) below BATCH_INNER_MAX_CHANNELS + 1 input channels,
# else in _RowRuns with the gather; float64 never takes _BatchInner, so float32 is checked
# against float64.

INNER_SHAPES = [
    ((7, 3, 9, 8), (4, 3, 3, 3), (1, 1), (1, 1), (1, 1)),
    ((5, 1, 12, 12), (6, 1, 5, 5), (1, 1), (2, 2), (1, 1)),   # LeNet-5's conv1, smaller
    ((6, 6, 9, 9), (16, 6, 5, 5), (1, 1), (0, 0), (1, 1)),    # LeNet-5's conv2, smaller
    ((3, 20, 6, 7), (3, 20, 3, 3), (1, 1), (1, 1), (1, 1)),   # 20 channels: _RowRuns and the gather
    ((3, 8, 6, 7), (9, 8, 3, 3), (1, 1), (1, 1), (1, 1)),     # 8 channels: the same
    ((3, 7, 6, 7), (9, 7, 3, 3), (1, 1), (1, 1), (1, 1)),     # 7 channels: _BatchInner
    ((4, 3, 6, 6), (2, 3, 1, 1), (1, 1), (1, 1), (1, 1)),     # padding wider than the kernel's reach
    ((4, 2, 7, 5), (3, 2, 2, 3), (1, 1), (0, 1), (1, 1)),     # even, non-square kernel
]


@pytest.mark.parametrize("shape, inner", [
    (INNER_SHAPES[0], True), (INNER_SHAPES[3], False), (INNER_SHAPES[4], False), (INNER_SHAPES[5], True),
    (((1, 1, 28, 28), (6, 1, 5, 5), (1, 1), (2, 2), (1, 1)), True),
    (((1, 16, 32, 32), (32, 3, 3, 3), (2, 2), (1, 1), (1, 1)), False),  # strided
    (SHAPES[2], False),  # dilated
])
def test_batch_inner_per_shape(shape, inner):
    geo = conv_cpu._Geometry(*shape)
    assert conv_cpu._batch_inner(geo, np.float32) is inner
    assert not conv_cpu._batch_inner(geo, np.float64)


def _relative_error(got, want):
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


@pytest.mark.parametrize("shape", INNER_SHAPES, ids=range(len(INNER_SHAPES)))
def test_float32_stride_one_matches_float64(shape, workers, chunk_bytes):
    x, w, b, stride, padding, dilation = _arrays(shape, np.float32)
    wide = [a.astype(np.float64) for a in (x, w, b)]
    y = conv_cpu.conv2d_forward(x, w, b, stride, padding, dilation)
    expected = conv.conv2d_forward_numpy(*wide, stride, padding, dilation, 1)
    assert y.dtype == np.float32 and y.shape == expected.shape
    assert _relative_error(y, expected) < 1e-5
    dy = np.random.default_rng(1).standard_normal(y.shape).astype(np.float32)
    want = conv.conv2d_backward_numpy(dy.astype(np.float64), wide[0], wide[1], stride, padding, dilation, 1)
    got = conv_cpu.conv2d_backward(dy, x, w, stride, padding, dilation, True, True, True)
    for name, g, e in zip(("dx", "dw", "db"), got, want):
        assert g.dtype == np.float32 and g.shape == e.shape, name
        assert _relative_error(g, e) < 1e-5, name
    for need_dx, need_bias, need_dw in [(True, False, False), (False, True, False), (False, False, True)]:
        alone = conv_cpu.conv2d_backward(dy, x, w, stride, padding, dilation, need_dx, need_bias, need_dw)
        for name, g, e, needed in zip(("dx", "dw", "db"), alone, want, (need_dx, need_dw, need_bias)):
            if needed:  # dw and db alone may take another layout than with dx: float32 rounding apart
                assert g.dtype == np.float32 and _relative_error(g, e) < 1e-5, name
            else:
                assert g is None
    assert np.array_equal(conv_cpu.conv2d_backward(dy, x, w, stride, padding, dilation, True, False, False)[0],
                          got[0])  # dx: the same layout with or without the other gradients


def test_batch_inner_leaves_its_inputs_alone(workers):
    x, w, b, stride, padding, dilation = _arrays(INNER_SHAPES[1], np.float32)
    dy = np.random.default_rng(4).standard_normal((5, 6, 12, 12)).astype(np.float32)
    copies = [a.copy() for a in (x, w, b, dy)]
    conv_cpu.conv2d_forward(x, w, b, stride, padding, dilation)
    conv_cpu.conv2d_backward(dy, x, w, stride, padding, dilation, True, True, True)
    for a, copy in zip((x, w, b, dy), copies):
        assert np.array_equal(a, copy)


def test_batch_inner_reads_strided_views(workers):
    """x, w and dy may be views (a slice of a larger batch, a transposed weight)."""
    x, w, b, stride, padding, dilation = _arrays(INNER_SHAPES[0], np.float32)
    big = np.concatenate([x, x], axis=0)[::2]
    wt = np.ascontiguousarray(w.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)
    y = conv_cpu.conv2d_forward(big, wt, b, stride, padding, dilation)
    assert np.array_equal(y, conv_cpu.conv2d_forward(np.ascontiguousarray(big), w, b, stride, padding, dilation))
    dy = np.random.default_rng(5).standard_normal((2,) + y.shape).astype(np.float32)[0]
    got = conv_cpu.conv2d_backward(dy[:, :, :, :], big, wt, stride, padding, dilation, True, True, True)
    want = conv_cpu.conv2d_backward(np.ascontiguousarray(dy), np.ascontiguousarray(big), w, stride, padding,
                                    dilation, True, True, True)
    for g, e in zip(got, want):
        assert np.array_equal(g, e)


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[2], SHAPES[3], SHAPES[8]], ids=range(4))
def test_row_runs_computes_strided_convs_too(shape, chunk_bytes, monkeypatch):
    """_RowRuns runs stride 1 only (_layout_class), but its row and column steps are general."""
    if shape[4] != (1, 1):
        shape = shape[:4] + ((1, 1),)
    monkeypatch.setattr(conv_cpu, "_layout_class", lambda geo, dtype: conv_cpu._RowRuns)
    x, w, b, stride, padding, dilation = _arrays(shape, np.float64)
    expected = conv.conv2d_forward_numpy(x, w, b, stride, padding, dilation, 1)
    np.testing.assert_allclose(conv_cpu.conv2d_forward(x, w, b, stride, padding, dilation), expected,
                               rtol=1e-12, atol=1e-12)
    dy = np.random.default_rng(1).standard_normal(expected.shape)
    want = conv.conv2d_backward_numpy(dy, x, w, stride, padding, dilation, 1)[1]
    got = conv_cpu.conv2d_backward(dy, x, w, stride, padding, dilation, False, False, True)[1]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
