"""The measurements behind the choices in gpuconv/ops/conv_cpu.py, norm_cpu.py and relu_backward
(docs/performance.md, "conv ops on the CPU"). Run from the repository root, on a quiet machine:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python docs/experiments/cpu_conv_choices.py

Each line is a median of repeated calls in this one process; compare within a line, never across
machines or days.
"""
import time

import numpy as np

import gpuconv
from gpuconv import blas
from gpuconv.bench.timing import time_cpu
from gpuconv.ops import activation, conv, conv_cpu, cpu_parts, norm


def median_ms(function, repeat=15):
    """The bench's own timing: one unmeasured call, then the median of `repeat`."""
    return 1e3 * time_cpu(function, repeat, warmup=0)["median_s"]


def page_faults():
    """A fresh buffer is faulted in page by page; a reused one is not (ResNet-20's stage-1 im2col
    matrix at batch 128 is 85 MB)."""
    size = 85_000_000 // 4
    src = np.ones(size, np.float32)
    reused = np.empty_like(src)
    fresh = median_ms(lambda: np.copyto(np.empty_like(src), src), 7)
    again = median_ms(lambda: np.copyto(reused, src), 7)
    print(f"copy 85 MB into a fresh buffer {fresh:.1f} ms, into a reused one {again:.1f} ms")


def gemm_threads():
    """OpenBLAS's second thread on a product with 16 output channels (ResNet-20's first stage)."""
    a = np.random.rand(9232, 144).astype(np.float32)
    b = np.random.rand(144, 16).astype(np.float32)
    two = median_ms(lambda: a @ b, 30)
    with blas.num_threads(1):
        one = median_ms(lambda: a @ b, 30)
    print(f"(9232x144)@(144x16): 1 BLAS thread {one:.3f} ms, {blas.get_num_threads()} threads {two:.3f} ms "
          f"({one / two:.2f}x)")


def as_strided_cost():
    x = np.zeros((4, 34, 34, 16), np.float32)
    calls = 2000
    start = time.perf_counter()
    for _ in range(calls):
        np.lib.stride_tricks.as_strided(x, (4, 32, 32, 3, 16), (x.strides[0], x.strides[1], x.strides[2],
                                                                 x.strides[2], x.strides[3]))
    print(f"np.lib.stride_tricks.as_strided: {1e6 * (time.perf_counter() - start) / calls:.1f} us a call")


def relu_backward_mask():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 16, 32, 32)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    where = median_ms(lambda: np.where(x > 0, dy, 0))
    masked = median_ms(lambda: activation.relu_backward(dy, x))
    print(f"relu backward (128, 16, 32, 32): np.where {where:.2f} ms, bits AND mask {masked:.2f} ms "
          f"({where / masked:.1f}x)")


def batch_norm():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((128, 16, 32, 32)) * 2 + 3).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    weight, bias = np.ones(16, np.float32), np.zeros(16, np.float32)
    _, mean, _, invstd = norm.batch_norm2d(x, weight, bias)
    rows = []
    for label, on_cpu in (("whole-array", lambda x: False), ("norm_cpu", norm._on_cpu)):
        original, norm._on_cpu = norm._on_cpu, on_cpu
        try:
            rows.append((label, median_ms(lambda: norm.batch_norm2d(x, weight, bias)),
                         median_ms(lambda: norm.batch_norm2d_backward(dy, x, weight, mean, invstd))))
        finally:
            norm._on_cpu = original
    print("batch norm (128, 16, 32, 32): " + "; ".join(f"{label} forward {f:.2f} ms, backward {b:.2f} ms"
                                                      for label, f, b in rows))


SHAPES = [  # (C, O, kernel, stride, padding, side): LeNet-5's and ResNet-20's convs
    (1, 6, 5, 1, 2, 28), (6, 16, 5, 1, 0, 14), (3, 16, 3, 1, 1, 32), (16, 16, 3, 1, 1, 32),
    (16, 32, 3, 2, 1, 32), (32, 32, 3, 1, 1, 16), (32, 64, 3, 2, 1, 16), (64, 64, 3, 1, 1, 8)]


def _with_layout(layout, function):
    """function() with `layout` for every conv (the batch-innermost backward off)."""
    return _with_layout_class(lambda geo, dtype: layout, function)


def _with_layout_class(choose, function):
    """function() with conv_cpu._layout_class = choose (the batch-innermost backward off)."""
    original, inner = conv_cpu._layout_class, conv_cpu._batch_inner
    conv_cpu._layout_class, conv_cpu._batch_inner = choose, (lambda *args: False)
    try:
        return function()
    finally:
        conv_cpu._layout_class, conv_cpu._batch_inner = original, inner


def _with_batch_inner(policy, function, **settings):
    """function() with conv_cpu._batch_inner = policy and conv_cpu's constants set as given."""
    saved = {name: getattr(conv_cpu, name) for name in settings}
    original = conv_cpu._batch_inner
    conv_cpu._batch_inner = policy
    for name, value in settings.items():
        setattr(conv_cpu, name, value)
    try:
        return function()
    finally:
        conv_cpu._batch_inner = original
        for name, value in saved.items():
            setattr(conv_cpu, name, value)


def row_runs(batch=128):
    """Session 7's stride-1 layouts, interleaved, per stride-1 shape: the forward and the filter
    gradient in _RowRuns against session 6's rows / wide layouts; the backward with all three
    gradients and the input gradient alone, in _BatchInner against _RowRuns with the gather
    (BATCH_INNER_MAX_CHANNELS); the whole backward by _RowRuns' chunk size (ROW_RUNS_BYTES)."""
    session6 = lambda geo, dtype: conv_cpu._layout_before_row_runs(geo)
    always, never = (lambda *args: True), (lambda *args: False)
    for c, o, k, s, p, side in SHAPES:
        if s != 1:
            continue
        rng = np.random.default_rng(0)
        x = rng.standard_normal((batch, c, side, side)).astype(np.float32)
        w = rng.standard_normal((o, c, k, k)).astype(np.float32)
        stride, padding, one = (s, s), (p, p), (1, 1)
        dy = rng.standard_normal(conv_cpu.conv2d_forward(x, w, None, stride, padding, one).shape).astype(np.float32)
        forward = lambda: conv_cpu.conv2d_forward(x, w, None, stride, padding, one)
        filter_grad = lambda: conv_cpu.conv2d_backward(dy, x, w, stride, padding, one, False, False, True)
        input_grad = lambda: conv_cpu.conv2d_backward(dy, x, w, stride, padding, one, True, False, False)
        backward = lambda: conv_cpu.conv2d_backward(dy, x, w, stride, padding, one, True, True, True)
        candidates = {
            "forward session 6": lambda: _with_layout_class(session6, forward),
            "forward row runs": forward,
            "filter gradient session 6": lambda: _with_layout_class(session6, filter_grad),
            "filter gradient row runs": filter_grad,
            "input gradient batch-inner": lambda: _with_batch_inner(always, input_grad),
            "input gradient gather": lambda: _with_batch_inner(never, input_grad),
            "backward batch-inner": lambda: _with_batch_inner(always, backward),
            "backward row runs + gather": lambda: _with_batch_inner(never, backward)}
        for size in (1 << 18, 1 << 19, 1 << 20, 1 << 21, 1 << 22):
            candidates[f"backward row runs + gather, {size >> 10} KiB chunks"] = lambda size=size: _with_batch_inner(
                never, backward, ROW_RUNS_BYTES=size)
        times = _interleaved(candidates, rounds=6, calls=2)
        print(f"c{c}-{o}k{k}s{s}@{side}: " + ", ".join(f"{name} {ms:.2f}" for name, ms in times.items()) + " ms")


def wide_convs():
    """_RowRuns against session 6's layouts for 3x3 stride-1 convs from 16 to 512 channels, the
    forward and the input gradient (the gather), interleaved: where its products get too narrow
    (ROW_RUNS_MIN_COLUMNS). `columns` is the chunk's images times OW."""
    session6 = lambda geo, dtype: conv_cpu._layout_before_row_runs(geo)
    row_runs = lambda geo, dtype: conv_cpu._RowRuns
    one = (1, 1)
    for n, c, side in ((16, 256, 28), (32, 512, 7), (32, 256, 14), (32, 128, 32), (64, 64, 32), (128, 64, 16),
                       (128, 32, 32), (128, 64, 8), (128, 16, 32)):
        rng = np.random.default_rng(0)
        x = rng.standard_normal((n, c, side, side)).astype(np.float32)
        w = rng.standard_normal((c, c, 3, 3)).astype(np.float32)
        dy = rng.standard_normal(x.shape).astype(np.float32)
        geo = conv_cpu._Geometry(x.shape, w.shape, one, one, one)
        forward = lambda: conv_cpu.conv2d_forward(x, w, None, one, one, one)
        input_grad = lambda: conv_cpu.conv2d_backward(dy, x, w, one, one, one, True, False, False)
        times = _interleaved({"forward row runs": lambda: _with_layout_class(row_runs, forward),
                              "forward session 6": lambda: _with_layout_class(session6, forward),
                              "input gradient row runs": lambda: _with_layout_class(row_runs, input_grad),
                              "input gradient session 6": lambda: _with_layout_class(session6, input_grad)},
                             rounds=4, calls=2)
        print(f"batch {n}, c{c}@{side}, columns {conv_cpu._RowRuns.chunk_of(geo, x.dtype) * geo.ow}: "
              + ", ".join(f"{name} {ms:.2f}" for name, ms in times.items()) + " ms")


def _interleaved(candidates, rounds=8, calls=3):
    """{name: median over rounds of the fastest of `calls` calls}, the candidates taking turns
    within each round, in reverse order every other round, so that neither drift nor the
    candidate run just before (the reference's 85 MB buffers slowed the next one) favours any."""
    for function in candidates.values():
        function()
    best = {name: [] for name in candidates}
    for turn in range(rounds):
        order = list(candidates.items())
        for name, function in (order[::-1] if turn % 2 else order):
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                function()
                times.append(time.perf_counter() - start)
            best[name].append(min(times))
    return {name: 1e3 * float(np.median(values)) for name, values in best.items()}


def layouts_and_reference(batch=128):
    """Per shape, interleaved: the whole-batch im2col reference's forward, each layout's forward and
    filter gradient (wide needs stride 1), and the input gradient by gather (a conv of dy, stride
    1) or tap by tap (channels-last, as strided convs take it)."""
    for c, o, k, s, p, side in SHAPES:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((batch, c, side, side)).astype(np.float32)
        w = rng.standard_normal((o, c, k, k)).astype(np.float32)
        stride, padding, one = (s, s), (p, p), (1, 1)
        dy = rng.standard_normal(conv.conv2d_forward_numpy(x, w, None, stride, padding, one, 1).shape
                                 ).astype(np.float32)
        layouts = {"rows": conv_cpu._Rows, "wide": conv_cpu._Wide} if s == 1 else {"rows": conv_cpu._Rows}
        candidates = {"forward im2col reference": lambda: conv.conv2d_forward_numpy(
            x, w, None, stride, padding, one, 1)}
        for name, layout in layouts.items():
            candidates[f"forward {name}"] = lambda layout=layout: _with_layout(
                layout, lambda: conv_cpu.conv2d_forward(x, w, None, stride, padding, one))
            candidates[f"filter gradient {name}"] = lambda layout=layout: _with_layout(
                layout, lambda: conv_cpu.conv2d_backward(dy, x, w, stride, padding, one, False, False, True))
        candidates["input gradient reference"] = lambda: conv.conv2d_backward_numpy(
            dy, x, w, stride, padding, one, 1, "auto", True, False, False)
        if s == 1:
            candidates["input gradient gather"] = lambda: _with_batch_inner(lambda *args: False, lambda: (
                conv_cpu.conv2d_backward(dy, x, w, stride, padding, one, True, False, False)))
        candidates["input gradient tap by tap"] = lambda: _scatter(dy, x, w, stride, padding)
        times = _interleaved(candidates)
        chosen = conv_cpu._layout_class(conv_cpu._Geometry(x.shape, w.shape, stride, padding, one), x.dtype)
        print(f"c{c}-{o}k{k}s{s}@{side} (chosen: {chosen.__name__}): "
              + ", ".join(f"{name} {ms:.2f}" for name, ms in times.items()) + " ms")


def _scatter(dy, x, w, stride, padding):
    """The input gradient tap by tap in the _Rows layout, as strided convs take it."""
    geo = conv_cpu._Geometry(x.shape, w.shape, stride, padding, (1, 1))
    dx = np.empty_like(x)

    def part(start, stop):
        layout = conv_cpu._Rows(geo, x.dtype)
        weights = layout.weight_matrix(w)
        for first, last in cpu_parts.ranges(start, stop, layout.chunk):
            layout.add_input_grad(dy, weights, first, last, dx)

    cpu_parts.in_parts(part, geo.n)
    return dx


def chunk_sizes(batch=128):
    """The forward at ResNet-20's three stride-1 shapes by CHUNK_BYTES (the rows / wide layouts'
    chunks), interleaved."""
    for c, side in ((16, 32), (32, 16), (64, 8)):
        x = np.random.rand(batch, c, side, side).astype(np.float32)
        w = np.random.rand(c, c, 3, 3).astype(np.float32)
        original = conv_cpu.CHUNK_BYTES

        def at(size):
            conv_cpu.CHUNK_BYTES = size
            try:
                return _with_layout_class(lambda geo, dtype: conv_cpu._layout_before_row_runs(geo),
                                          lambda: conv_cpu.conv2d_forward(x, w, None, (1, 1), (1, 1), (1, 1)))
            finally:
                conv_cpu.CHUNK_BYTES = original

        sizes = (1 << 18, 1 << 19, 1 << 20, 3 << 19, 1 << 21, 1 << 22, 1 << 23)
        times = _interleaved({f"{size / 2**20:g} MiB": lambda size=size: at(size) for size in sizes}, rounds=3)
        print(f"c{c}@{side} forward by CHUNK_BYTES: " + ", ".join(f"{k} {v:.2f}" for k, v in times.items()) + " ms")


def small_sizes():
    """The thresholds: a conv's forward and backward on conv.py's whole-batch path against
    conv_cpu's parts by batch size (REFERENCE_MAX_BYTES, the whole batch's im2col size), batch norm
    forward + backward whole-array against norm_cpu (norm_cpu.MIN_BYTES), interleaved."""
    rng = np.random.default_rng(0)
    one = (1, 1)
    for c, o, k, p, side in ((1, 6, 5, 2, 28), (6, 16, 5, 0, 14), (16, 16, 3, 1, 32), (64, 64, 3, 1, 8)):
        for batch in (4, 8, 16, 32, 64):
            x = rng.standard_normal((batch, c, side, side)).astype(np.float32)
            w = rng.standard_normal((o, c, k, k)).astype(np.float32)
            pad = (p, p)
            y = conv.conv2d_forward_numpy(x, w, None, one, pad, one, 1)
            dy = rng.standard_normal(y.shape).astype(np.float32)
            columns = x.itemsize * batch * c * k * k * y.shape[2] * y.shape[3]
            times = _interleaved({
                "whole batch": lambda: (conv.conv2d_forward_numpy(x, w, None, one, pad, one, 1),
                                        conv.conv2d_backward_numpy(dy, x, w, one, pad, one, 1)),
                "parts": lambda: (conv_cpu.conv2d_forward(x, w, None, one, pad, one),
                                  conv_cpu.conv2d_backward(dy, x, w, one, pad, one, True, True, True))},
                rounds=6)
            print(f"c{c}-{o}k{k}@{side} forward + backward, batch {batch}, columns {columns / 2**20:.2f} MiB: "
                  + ", ".join(f"{name} {ms:.3f}" for name, ms in times.items()) + " ms")
    for batch in (8, 32):  # 512 KiB and 2 MiB of (batch, 64, 16, 16) float32
        x = rng.standard_normal((batch, 64, 16, 16)).astype(np.float32)
        dy = rng.standard_normal(x.shape).astype(np.float32)
        weight, bias = np.ones(64, np.float32), np.zeros(64, np.float32)

        def step(on_cpu):
            original, norm._on_cpu = norm._on_cpu, on_cpu
            try:
                _, mean, _, invstd = norm.batch_norm2d(x, weight, bias)
                norm.batch_norm2d_backward(dy, x, weight, mean, invstd)
            finally:
                norm._on_cpu = original

        times = _interleaved({"whole-array": lambda: step(lambda a: False),
                              "norm_cpu": lambda: step(lambda a: True)}, calls=10)
        print(f"batch norm forward + backward, {x.nbytes >> 10} KiB: "
              + ", ".join(f"{k} {v:.2f}" for k, v in times.items()) + " ms")


def relu_in_parts():
    """ReLU and its backward in one call against in parts over the cores (cpu_parts), which was
    tried and dropped: memory-bound, the second core buys little or nothing."""
    for batch in (32, 64, 128):  # 2, 4 and 8 MiB of (batch, 16, 32, 32) float32
        rng = np.random.default_rng(0)
        x = rng.standard_normal((batch, 16, 32, 32)).astype(np.float32)
        dy = rng.standard_normal(x.shape).astype(np.float32)

        def forward_in_parts():
            y = np.empty_like(x)
            cpu_parts.each_chunk(lambda i: np.maximum(x[i], 0, out=y[i]), x, 1 << 19)

        def backward_in_parts():
            dx = np.empty_like(dy)
            cpu_parts.each_chunk(lambda i: dx.__setitem__(i, activation.relu_backward(dy[i], x[i])), dy, 1 << 19)

        times = _interleaved({"forward one call": lambda: activation.relu(x), "forward in parts": forward_in_parts,
                              "backward one call": lambda: activation.relu_backward(dy, x),
                              "backward in parts": backward_in_parts}, calls=5)
        print(f"ReLU, {x.nbytes >> 20} MiB: " + ", ".join(f"{k} {v:.2f}" for k, v in times.items()) + " ms")


if __name__ == "__main__":
    print(f"workers: {gpuconv.get_cpu_workers()}, BLAS threads: {blas.get_num_threads()}")
    page_faults()
    gemm_threads()
    as_strided_cost()
    relu_backward_mask()
    batch_norm()
    layouts_and_reference()
    row_runs()
    wide_convs()
    chunk_sizes()
    small_sizes()
    relu_in_parts()
