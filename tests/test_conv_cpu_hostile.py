"""Hostile tests of gpuconv/ops/conv_cpu.py after the _RowRuns / _BatchInner commits (35481e4..0105bc1).

BUGS FOUND (the tests marked "BUG" fail at 8a05dc7; the worker-count ones are fixed by bc03a29,
the filter gradient's memory by cbd40b6):
* test_BUG_backward_never_mixes_two_worker_counts /
  test_BUG_set_cpu_workers_from_another_thread_never_mixes_bits: conv2d_backward of a stride-1
  conv that is not batch-innermost (float64, or more than 7 input channels) runs two parallel
  regions, the gather (dx) and the filter gradient, and each read the worker count on its own.
  set_cpu_workers() from another thread between the two gave a result that belongs to neither
  worker count (19 of 60 calls while a thread toggled 1 <-> 2): its bits depended on timing.
  test_BUG_batch_norm_statistics_never_mix_two_worker_counts: norm_cpu.batch_stats, the same
  (the mean's region, then the variance's).
* test_BUG_row_runs_filter_gradient_memory_of_wide_convs: _RowRuns' filter gradient makes one
  (OH, KH*C*KW, O) product per chunk, OH copies of dW, fresh for every chunk. At wide convs
  (256-1024 channels) that is 5-50x dW of temporaries (the layout it replaced, _Rows: 2-9x) and
  the filter gradient measured 2.2-4.4x slower than at f7e3ec2.

What held is checked by the other tests here (kept: they are cheap).
"""
import gc
import threading
import tracemalloc
import weakref

import numpy as np
import pytest

import gpuconv
import hostile_child
from gpuconv import blas
from gpuconv.nn import cpu_plan
from gpuconv.ops import conv, conv_cpu


@pytest.fixture(autouse=True)
def row_runs_for_narrow_products(monkeypatch):
    """These tests were written when every stride-1 conv took _RowRuns; their small shapes make
    narrow products, which now take the older layouts (ROW_RUNS_MIN_COLUMNS): keep _RowRuns here."""
    monkeypatch.setattr(conv_cpu, "ROW_RUNS_MIN_COLUMNS", 0)


@pytest.fixture
def restore_workers():
    yield
    gpuconv.set_cpu_workers(None)


def _data(x_shape, w_shape, dtype, stride=1, padding=1, dilation=1, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    y = conv.conv2d_forward_numpy(x, w, None, conv.pair(stride, "s"), conv.pair(padding, "p"),
                                  conv.pair(dilation, "d"), 1)
    dy = rng.standard_normal(y.shape).astype(dtype)
    return x, w, dy


# ----------------------------------------------------------------------------------------------
# BUG: one call, two worker counts


def test_BUG_backward_never_mixes_two_worker_counts(monkeypatch, restore_workers):
    """BUG (fails at 8a05dc7). Another thread calling set_cpu_workers(2) while this thread's
    backward (workers 1) is between its gather and its filter gradient: the result must be the
    workers-1 result or the workers-2 result, bit for bit. It was dx of one and dW of the other
    (dx's bits depend on the split too: a chunk's product width). The change is injected right
    after the gather, where a real thread's call lands at random (next test)."""
    x, w, dy = _data((33, 16, 12, 12), (16, 16, 3, 3), np.float64)
    assert conv_cpu.takes(x.shape, w.shape, 1, (12, 12), 8)
    results = {}
    for workers in (1, 2):
        gpuconv.set_cpu_workers(workers)
        results[workers] = gpuconv.ops.conv2d_backward(dy, x, w, padding=1)
    assert not np.array_equal(results[1][0], results[2][0]) and not np.array_equal(results[1][1], results[2][1]), \
        "the scenario needs dx and dW that differ between worker counts"
    real_forward = conv_cpu.conv2d_forward

    def gather_then_another_thread_sets_workers(*args, **kwargs):
        y = real_forward(*args, **kwargs)
        gpuconv.set_cpu_workers(2)
        return y

    gpuconv.set_cpu_workers(1)
    monkeypatch.setattr(conv_cpu, "conv2d_forward", gather_then_another_thread_sets_workers)
    got = gpuconv.ops.conv2d_backward(dy, x, w, padding=1)
    matches = [all(np.array_equal(g, e) for g, e in zip(got, results[workers])) for workers in (1, 2)]
    assert any(matches), ("dx equals the result of workers=%s, dW of workers=%s" % (
        [k for k in (1, 2) if np.array_equal(got[0], results[k][0])],
        [k for k in (1, 2) if np.array_equal(got[1], results[k][1])]))


def test_BUG_set_cpu_workers_from_another_thread_never_mixes_bits(tmp_path):
    """BUG (fails at 8a05dc7), the same with a real thread toggling set_cpu_workers(1) / (2)
    every 0.5 ms: every call's result must be one of the two worker counts' results."""
    prelude = r'''
import faulthandler, json, os, threading, time, zlib
faulthandler.dump_traceback_later(float(os.environ["HOSTILE_HANG_S"]), exit=True)
import numpy as np
import gpuconv
'''
    r = hostile_child.run_child(tmp_path, prelude, r'''
        def digest(a):
            return zlib.crc32(np.ascontiguousarray(a).tobytes())
        rng = np.random.default_rng(0)
        x = rng.standard_normal((33, 16, 12, 12)); w = rng.standard_normal((16, 16, 3, 3))
        dy = rng.standard_normal((33, 16, 12, 12))
        def call():
            return [digest(a) for a in gpuconv.ops.conv2d_backward(dy, x, w, padding=1)]
        gpuconv.set_cpu_workers(1); one = call()
        gpuconv.set_cpu_workers(2); two = call()
        stop = threading.Event()
        def toggle():
            while not stop.is_set():
                gpuconv.set_cpu_workers(1); time.sleep(0.0005)
                gpuconv.set_cpu_workers(2); time.sleep(0.0005)
        t = threading.Thread(target=toggle); t.start()
        mixed = sum(call() not in (one, two) for _ in range(40))
        stop.set(); t.join()
        print("RESULT " + json.dumps(dict(mixed=mixed)), flush=True)
    ''', 60, "toggle_workers")
    assert r["mixed"] == 0, f"{r['mixed']} of 40 results belong to neither worker count"


def test_BUG_batch_norm_statistics_never_mix_two_worker_counts(monkeypatch, restore_workers):
    """BUG (fails at 8a05dc7; norm_cpu, the same kind): batch_stats sums the mean in one region
    and the variance in another; set_cpu_workers(2) from another thread between them gave the
    mean of workers=1 and a variance of neither count."""
    from gpuconv.ops import cpu_parts, norm_cpu
    x = (np.random.default_rng(0).standard_normal((33, 16, 24, 24)) * 3 + 1).astype(np.float32)
    results = {}
    for workers in (1, 2):
        gpuconv.set_cpu_workers(workers)
        results[workers] = norm_cpu.batch_stats(x)
    assert not np.array_equal(results[1][1], results[2][1]), "the scenario needs variances that differ"
    real, calls = cpu_parts.summed, []

    def summed_then_another_thread_sets_workers(*args):
        total = real(*args)
        calls.append(1)
        if len(calls) == 1:
            gpuconv.set_cpu_workers(2)
        return total

    gpuconv.set_cpu_workers(1)
    monkeypatch.setattr(cpu_parts, "summed", summed_then_another_thread_sets_workers)
    mean, var = norm_cpu.batch_stats(x)
    assert any(np.array_equal(mean, results[k][0]) and np.array_equal(var, results[k][1]) for k in (1, 2))


# ----------------------------------------------------------------------------------------------
# BUG: the filter gradient of wide stride-1 convs


def test_BUG_row_runs_filter_gradient_memory_of_wide_convs(restore_workers):
    """BUG (performance; fails at 8a05dc7). The filter gradient alone (need_dx=False) of a
    512-channel 3x3 conv on 7x7 maps: _RowRuns' per-chunk (OH, KH*C*KW, O) product holds OH
    copies of dW (66 MB here per chunk, allocated afresh), 15x dW at the peak with two parts
    where _Rows (f7e3ec2) held 3.3x; timed interleaved against f7e3ec2's conv_cpu at batch 32:
    375 against 170 ms, and 789 against 181 ms at (16, 256, 28, 28). A few copies of dW per part
    are fair; OH copies per chunk are not."""
    gpuconv.set_cpu_workers(1)
    x, w, dy = _data((4, 512, 7, 7), (512, 512, 3, 3), np.float32)
    conv_cpu.conv2d_backward(dy, x, w, (1, 1), (1, 1), (1, 1), False, False, True)  # the threads exist
    gc.collect()
    tracemalloc.start()
    try:
        conv_cpu.conv2d_backward(dy, x, w, (1, 1), (1, 1), (1, 1), False, False, True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 6 * w.nbytes, f"the filter gradient's peak is {peak / w.nbytes:.1f}x dW's size"


# ----------------------------------------------------------------------------------------------
# what held


@pytest.mark.parametrize("case", [
    ((300, 3, 4, 4), (8, 3, 7, 7), 1, 3, 1),        # kernel larger than the map, padding 3
    ((500, 1, 2, 2), (4, 1, 5, 5), 1, 3, 1),        # padding wider than the kernel's reach
    ((200, 5, 1, 1), (6, 5, 3, 3), 1, 5, 1),        # 1x1 maps, padding 5
    ((64, 7, 30, 1), (5, 7, 3, 1), 1, (1, 0), 1),   # OW = 1
    ((64, 2, 28, 7), (5, 2, 30, 9), 1, 1, 1),       # kernel = padded input: 1x1 output
    ((37, 6, 17, 11), (9, 6, 5, 2), 1, (4, 7), 1),  # H != W, KH != KW, padding > kernel
    ((3, 300, 3, 3), (200, 300, 3, 3), 1, 1, 1),    # many channels, tiny maps, batch 3 (not / parts)
], ids=range(7))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_extreme_shapes_against_the_float64_reference(case, dtype, monkeypatch, restore_workers):
    monkeypatch.setattr(conv_cpu, "REFERENCE_MAX_BYTES", 0)  # conv_cpu at every size
    xs, ws, stride, padding, dilation = case
    x, w, dy = _data(xs, ws, np.float64, stride, padding, dilation)
    w /= np.sqrt(np.prod(ws[1:]))
    s, p, d = (conv.pair(a, "a") for a in (stride, padding, dilation))
    y_ref = conv.conv2d_forward_numpy(x, w, None, s, p, d, 1)
    g_ref = conv.conv2d_backward_numpy(dy, x, w, s, p, d, 1)
    tol = 2e-5 if dtype == np.float32 else 1e-12
    for workers in (0, 2):
        gpuconv.set_cpu_workers(workers)
        X, W, DY = (a.astype(dtype) for a in (x, w, dy))
        got = (gpuconv.ops.conv2d(X, W, None, stride, padding, dilation),) + \
            gpuconv.ops.conv2d_backward(DY, X, W, stride, padding, dilation)
        for name, g, e in zip(("y", "dx", "dw", "db"), got, (y_ref,) + g_ref):
            assert g.dtype == dtype and g.shape == e.shape, name
            np.testing.assert_allclose(g, e, rtol=tol, atol=tol * np.abs(e).max(), err_msg=f"{name} {workers}")


def _odd_layouts(x):
    """x as arrays with other memory layouts; the same values."""
    readonly = x.copy()
    readonly.flags.writeable = False
    strided = np.zeros(x.shape + (2,), x.dtype)
    strided[..., 1] = x
    return {
        "readonly": readonly,
        "fortran": np.asfortranarray(x),
        "negative strides": x[::-1, :, ::-1, ::-1].copy()[::-1, :, ::-1, ::-1],
        "every other float": strided[..., 1],
        "batch innermost": np.ascontiguousarray(x.transpose(1, 2, 3, 0)).transpose(3, 0, 1, 2),
    }


@pytest.mark.parametrize("channels, padding", [(3, 0), (3, 1), (16, 1)])
def test_odd_memory_layouts_give_the_same_bits(channels, padding, monkeypatch, restore_workers):
    """Read-only, Fortran-order, negative-stride, strided and batch-innermost x, w and dy give the
    bits of contiguous ones (db: see below), in one-image chunks too (a one-image [C, H, W, 1] view of a
    contiguous x is C-contiguous: the batch-innermost layout then reads x in place)."""
    for chunk in (1, None):
        if chunk:
            monkeypatch.setattr(conv_cpu, "ROW_RUNS_BYTES", 1)
            monkeypatch.setattr(conv_cpu, "BATCH_INNER_BYTES", 1)
        for workers in (0, 2):
            gpuconv.set_cpu_workers(workers)
            x, w, dy = _data((5, channels, 8, 8), (4, channels, 3, 3), np.float32, padding=padding)
            args = ((1, 1), (padding, padding), (1, 1))
            want = (conv_cpu.conv2d_forward(x, w, None, *args),) + conv_cpu.conv2d_backward(dy, x, w, *args, True, True, True)
            for (name, xo), wo, dyo in zip(_odd_layouts(x).items(), _odd_layouts(w).values(), _odd_layouts(dy).values()):
                got = (conv_cpu.conv2d_forward(xo, wo, None, *args),) + conv_cpu.conv2d_backward(dyo, xo, wo, *args, True, True, True)
                for g, e in zip(got[:3], want[:3]):
                    assert np.array_equal(g, e), name
                # db is NumPy's dy.sum over a chunk, whose order follows dy's memory layout (a
                # Fortran dy: other last bits, as in conv.py's reference)
                np.testing.assert_allclose(got[3], want[3], rtol=1e-5, err_msg=name)


def test_memory_mapped_read_only_input(tmp_path, restore_workers):
    x, w, dy = _data((40, 3, 16, 16), (8, 3, 3, 3), np.float32)
    path = tmp_path / "x.bin"
    x.tofile(path)
    mapped = np.memmap(path, np.float32, "r", shape=x.shape)
    for workers in (0, 1):
        gpuconv.set_cpu_workers(workers)
        for g, e in zip(gpuconv.ops.conv2d_backward(dy, mapped, w, padding=1),
                        gpuconv.ops.conv2d_backward(dy, x, w, padding=1)):
            assert np.array_equal(g, e)
    del mapped


def test_dy_aliasing_x(restore_workers):
    """dy and x one array (a 'same' conv with as many filters as channels): nothing is written
    into either."""
    x, w, _ = _data((40, 4, 16, 16), (4, 4, 3, 3), np.float32)
    before = x.copy()
    got = gpuconv.ops.conv2d_backward(x, x, w, padding=1)
    want = gpuconv.ops.conv2d_backward(x.copy(), x.copy(), w, padding=1)
    assert np.array_equal(x, before)
    for g, e in zip(got, want):
        assert np.array_equal(g, e)


def test_nan_and_inf_in_x_follow_the_true_sums_in_row_runs(restore_workers):
    """_RowRuns has no junk columns: a NaN or an inf pixel reaches exactly the outputs and the
    filter-gradient taps whose sums hold it (conv.py's wide-row reference spreads NaN further
    into dW through its junk columns, 0 * NaN; so does _Wide, dilated stride-1)."""
    x, w, dy = _data((6, 12, 8, 8), (4, 12, 3, 3), np.float64)
    x[1, 3, 0, 7], x[4, 5, 6, 2] = np.nan, np.inf
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))  # n c oh ow kh kw
    y_true = np.einsum("ocij,ncabij->noab", w, windows)
    dw_true = np.einsum("noab,ncabij->ocij", dy, windows)
    gpuconv.set_cpu_workers(1)
    with np.errstate(invalid="ignore"):
        y = conv_cpu.conv2d_forward(x, w, None, (1, 1), (1, 1), (1, 1))
        _, dw, _ = conv_cpu.conv2d_backward(dy, x, w, (1, 1), (1, 1), (1, 1), False, False, True)
    for got, want in ((y, y_true), (dw, dw_true)):
        assert np.array_equal(np.isnan(got), np.isnan(want)) and np.array_equal(np.isinf(got), np.isinf(want))


@pytest.mark.parametrize("method", ["_RowRuns.forward", "_RowRuns.filter_grad", "_BatchInner.backward"])
@pytest.mark.parametrize("where", ["worker", "caller"])
def test_memory_error_in_a_part_leaves_lock_and_blas_as_they_were(method, where, monkeypatch, restore_workers):
    gpuconv.set_cpu_workers(1)
    monkeypatch.setattr(conv_cpu, "REFERENCE_MAX_BYTES", 0)
    dtype = np.float32 if method.startswith("_BatchInner") else np.float64
    x, w, dy = _data((40, 3, 16, 16), (8, 3, 3, 3), dtype)
    want = gpuconv.ops.conv2d_backward(dy, x, w, padding=1)
    threads = blas.get_num_threads()
    cls, name = method.split(".")
    real = getattr(getattr(conv_cpu, cls), name)

    def fails(self, *args):
        if (where == "worker") == threading.current_thread().name.startswith(cpu_plan.OP_THREADS):
            raise MemoryError("injected")
        return real(self, *args)

    monkeypatch.setattr(getattr(conv_cpu, cls), name, fails)
    refs = [weakref.ref(a) for a in (x, w, dy)]
    with pytest.raises(MemoryError):
        gpuconv.ops.conv2d(x, w, padding=1)
        gpuconv.ops.conv2d_backward(dy, x, w, padding=1)
    monkeypatch.setattr(getattr(conv_cpu, cls), name, real)
    assert not cpu_plan._region_lock.locked() and blas.get_num_threads() == threads
    for g, e in zip(gpuconv.ops.conv2d_backward(dy, x, w, padding=1), want):
        assert np.array_equal(g, e)
    del x, w, dy, want
    gc.collect()
    assert all(r() is None for r in refs), "a part's frames keep the arrays"


def test_gradcheck_through_nn_conv2d_in_float64(monkeypatch, restore_workers):
    """Autograd through F.conv2d on this path (REFERENCE_MAX_BYTES = 0), each input's gradient
    needed or not."""
    from gpuconv import Tensor, functional as F
    from gpuconv.gradcheck import gradcheck
    monkeypatch.setattr(conv_cpu, "REFERENCE_MAX_BYTES", 0)
    rng = np.random.default_rng(0)
    cases = [((3, 2, 5, 6), (3, 2, 3, 2), 1, (3, 0), 1), ((2, 9, 4, 4), (2, 9, 3, 3), 1, 1, 1),
             ((3, 2, 7, 6), (3, 2, 3, 3), 2, 1, 1), ((2, 3, 3, 3), (2, 3, 5, 5), 1, 1, 1),
             ((3, 2, 4, 4), (2, 2, 2, 2), 1, "same", 1)]
    gpuconv.set_cpu_workers(1)
    for xs, ws, s, p, d in cases:
        for need in ((True, True, True), (False, True, True), (True, False, True), (True, True, False)):
            arrays = [rng.standard_normal(xs), rng.standard_normal(ws), rng.standard_normal(ws[0])]

            def f(x, w, b):
                return F.conv2d(Tensor(x), Tensor(w), Tensor(b), stride=s, padding=p, dilation=d).data

            def grads(dy, x, w, b):
                ts = [Tensor(a, requires_grad=r) for a, r in zip((x, w, b), need)]
                (F.conv2d(*ts, stride=s, padding=p, dilation=d) * Tensor(dy)).sum().backward()
                return [t.grad if r else None for t, r in zip(ts, need)]

            gradcheck(f, arrays, grads)


@pytest.mark.parametrize("channels", [3, 20], ids=["wide", "rows"])
@pytest.mark.parametrize("padding", [0, 1, 4])
def test_stride_one_filter_gradient_in_the_layouts_before_row_runs(channels, padding, monkeypatch, restore_workers):
    """_filter_grad_class sends wide convs' filter gradient back to _Wide (C*KH*KW <= 144) or
    _Rows; here every conv does (ROW_RUNS_DW_MAX_BYTES = 0), against the float64 reference,
    with the gather for dx beside it."""
    monkeypatch.setattr(conv_cpu, "ROW_RUNS_DW_MAX_BYTES", 0)
    x, w, dy = _data((7, channels, 9, 8), (5, channels, 3, 4), np.float64, padding=padding)
    geo = conv_cpu._Geometry(x.shape, w.shape, (1, 1), (padding, padding), (1, 1))
    assert conv_cpu._filter_grad_class(geo, x.dtype) is (conv_cpu._Wide if channels == 3 else conv_cpu._Rows)
    args = ((1, 1), (padding, padding), (1, 1))
    want = conv.conv2d_backward_numpy(dy, x, w, *args, 1)
    for workers in (0, 2):
        gpuconv.set_cpu_workers(workers)
        for need_dx in (False, True):
            got = conv_cpu.conv2d_backward(dy, x, w, *args, need_dx, True, True)
            for name, g, e in zip(("dx", "dw", "db"), got, want):
                if g is not None:
                    np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-12, err_msg=name)
