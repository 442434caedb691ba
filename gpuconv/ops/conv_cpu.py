"""conv2d on the CPU for groups == 1: forward and backward, the batch in parts over the cores and
each part in chunks of images whose columns fit in the core's cache.

Called by conv.py with validated arguments (stride, padding, dilation are int pairs; padding is
symmetric), like conv_cuda.py's launchers beside it. conv.py's conv2d_forward_numpy /
conv2d_backward_numpy (im2col of the whole batch, one batched product) stay the reference and run
grouped convolutions.

Why not im2col of the whole batch (measured, docs/performance.md, "conv ops on the CPU"):
* Its column matrix is C*KH*KW times the output's size (85 MB for ResNet-20's first stage at batch
  128). A fresh buffer of that size is page-faulted in on every call and written and read through
  main memory, which took longer than the products.
* OpenBLAS splits a product with 16 output channels poorly over threads: a 2-thread GEMM of that
  shape ran at 1.1x its 1-thread speed.
So the batch is split into equal parts, one per core (the caller's thread and the CPU executor's
worker threads, gpuconv.nn.cpu_plan.run_in_parts, with a 1-thread BLAS for the region), and a
part runs in chunks of a few images: the chunk's input is copied channels-last into a zero-padded
buffer, its columns (one row per output pixel, (kh, kw, c) along the row) are KH*KW strided
copies, and one product with the (KH*KW*C, O) weight gives the chunk's output channels-last,
transposed into NCHW while copied out. Every buffer is a chunk's, allocated once per part and
reused by each chunk, so it stays in the cache and is freed with the call.

The backward recomputes a chunk's columns (cheaper than keeping them), takes the part's filter and
bias gradients from them and from dy, and adds the columns' gradient (dy @ W) back tap by tap into
a padded channels-last buffer. The parts' filter and bias gradients are summed in part order; the
split depends on the batch size and the worker count alone, so a result never depends on timing.
"""
import numpy as np

# A chunk's column matrix aims at this size: a core's L2 (1 MiB here) plus a share of L3 measured
# best among 0.25-8 MiB (docs/performance.md).
CHUNK_BYTES = 3 << 19


class _Geometry:
    """Shapes and slices of one convolution, shared by the forward and the backward."""

    def __init__(self, x_shape, w_shape, stride, padding, dilation, itemsize):
        self.n, self.c, self.h, self.w = x_shape
        self.o, _, self.kh, self.kw = w_shape
        (self.sh, self.sw), (self.ph, self.pw), (self.dh, self.dw) = stride, padding, dilation
        self.padded = (self.h + 2 * self.ph, self.w + 2 * self.pw)
        self.oh = (self.padded[0] - self.dh * (self.kh - 1) - 1) // self.sh + 1
        self.ow = (self.padded[1] - self.dw * (self.kw - 1) - 1) // self.sw + 1
        self.k = self.kh * self.kw * self.c  # a column's length
        per_image = self.oh * self.ow * self.k * itemsize
        self.chunk = max(1, min(self.n, CHUNK_BYTES // per_image))

    def taps(self):
        """(i, j, window) for each kernel tap: the padded input's pixels it reads, as slices."""
        for i in range(self.kh):
            rows = slice(i * self.dh, i * self.dh + self.sh * (self.oh - 1) + 1, self.sh)
            for j in range(self.kw):
                cols = slice(j * self.dw, j * self.dw + self.sw * (self.ow - 1) + 1, self.sw)
                yield i, j, (slice(None), rows, cols)

    def interior(self):
        return (slice(None), slice(self.ph, self.ph + self.h), slice(self.pw, self.pw + self.w))


class _Chunks:
    """One part's reused buffers: the padded channels-last input and the column matrix."""

    def __init__(self, geo, dtype):
        self.geo = geo
        self.padded = np.zeros((geo.chunk,) + geo.padded + (geo.c,), dtype=dtype)  # borders stay 0
        self.cols = np.empty((geo.chunk, geo.oh, geo.ow, geo.kh, geo.kw, geo.c), dtype=dtype)

    def ranges(self, start, stop):
        for first in range(start, stop, self.geo.chunk):
            yield first, min(first + self.geo.chunk, stop)

    def columns(self, x, first, last):
        """The (pixels, KH*KW*C) columns of images first..last-1 (a view of the reused buffer)."""
        m, geo = last - first, self.geo
        padded = self.padded[:m]
        padded[geo.interior()] = x[first:last].transpose(0, 2, 3, 1)
        cols = self.cols[:m]
        if geo.dw == 1:
            # Channels-last, the KW taps of one kernel row are one contiguous run of KW*C values
            # of the padded row: one copy per kernel row, with runs KW times longer than a tap's.
            n_stride, h_stride, w_stride, c_stride = padded.strides
            for i in range(geo.kh):
                rows = padded[:, i * geo.dh:]
                windows = np.lib.stride_tricks.as_strided(
                    rows, (m, geo.oh, geo.ow, geo.kw * geo.c),
                    (n_stride, h_stride * geo.sh, w_stride * geo.sw, c_stride), writeable=False)
                cols[:, :, :, i] = windows.reshape(m, geo.oh, geo.ow, geo.kw, geo.c)
        else:
            for i, j, window in geo.taps():
                cols[:, :, :, i, j] = padded[window]
        return cols.reshape(-1, geo.k)


def _weight_rows(w):
    """(O, C, KH, KW) -> (KH*KW*C, O), the row order of the columns."""
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0)).reshape(-1, w.shape[0])


def _in_parts(function, batch):
    # Imported here: gpuconv.nn imports the ops, so a module-level import would be circular.
    from ..nn.cpu_plan import run_in_parts
    return run_in_parts(function, batch)


def conv2d_forward(x, w, b, stride, padding, dilation):
    geo = _Geometry(x.shape, w.shape, stride, padding, dilation, x.itemsize)
    w_rows = _weight_rows(w)
    y = np.empty((geo.n, geo.o, geo.oh, geo.ow), dtype=x.dtype)
    bias = None if b is None else b.reshape(-1, 1, 1)

    def part(start, stop):
        chunks = _Chunks(geo, x.dtype)
        out = np.empty((geo.chunk * geo.oh * geo.ow, geo.o), dtype=x.dtype)
        for first, last in chunks.ranges(start, stop):
            cols = chunks.columns(x, first, last)
            rows = np.matmul(cols, w_rows, out=out[:len(cols)])
            nchw = rows.reshape(last - first, geo.oh, geo.ow, geo.o).transpose(0, 3, 1, 2)
            if bias is None:
                y[first:last] = nchw
            else:
                np.add(nchw, bias, out=y[first:last])

    _in_parts(part, geo.n)
    return y


def conv2d_backward(dy, x, w, stride, padding, dilation, need_dx, need_bias, need_dw):
    geo = _Geometry(x.shape, w.shape, stride, padding, dilation, x.itemsize)
    w_rows = _weight_rows(w)
    dx = None
    full_padding = tuple(d * (k - 1) - p for d, k, p in zip(dilation, w.shape[2:], padding))
    if need_dx and stride == (1, 1) and min(full_padding) >= 0:
        # With stride 1 the input gradient is a convolution of dy: the flipped filters, input and
        # output channels swapped, padded to the full kernel. It gathers (the forward's copies and
        # one product) instead of adding the columns' gradient back tap by tap, which measured
        # 1.8x slower (docs/performance.md).
        flipped = w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]
        dx = conv2d_forward(dy, flipped, None, (1, 1), full_padding, dilation)
        need_dx = False
    elif need_dx:
        dx = np.empty(x.shape, dtype=x.dtype)

    def part(start, stop):
        chunks = _Chunks(geo, x.dtype)
        dy_rows = np.empty((geo.chunk, geo.oh, geo.ow, geo.o), dtype=dy.dtype)
        dx_padded = np.empty_like(chunks.padded) if need_dx else None
        dw = db = None
        for first, last in chunks.ranges(start, stop):
            m = last - first
            rows = dy_rows[:m]
            rows[...] = dy[first:last].transpose(0, 2, 3, 1)
            rows = rows.reshape(-1, geo.o)
            if need_bias:
                db = _accumulate(db, rows.sum(axis=0))
            if need_dw:
                dw = _accumulate(dw, chunks.columns(x, first, last).T @ rows)  # (KH*KW*C, O)
            if need_dx:
                # the columns' gradient, into the column buffer (free again), added back tap by tap
                dcols = np.matmul(rows, w_rows.T, out=chunks.cols[:m].reshape(-1, geo.k))
                dcols = dcols.reshape(chunks.cols[:m].shape)
                grad = dx_padded[:m]
                grad[...] = 0
                for i, j, window in geo.taps():
                    grad[window] += dcols[:, :, :, i, j]
                dx[first:last] = grad[geo.interior()].transpose(0, 3, 1, 2)
        return dw, db

    dw = db = None
    for part_dw, part_db in _in_parts(part, geo.n):  # in part order: the same sums every time
        dw = _accumulate(dw, part_dw) if need_dw else None
        db = _accumulate(db, part_db) if need_bias else None
    if need_dw:
        dw = dw.reshape(geo.kh, geo.kw, geo.c, geo.o).transpose(3, 2, 0, 1).copy()
    return dx, dw, db


def _accumulate(total, value):
    """total + value, in place once there is a total (the first value is a fresh array)."""
    if total is None:
        return value
    total += value
    return total
