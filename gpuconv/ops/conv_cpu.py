"""conv2d on the CPU for groups == 1: forward and backward, the batch in parts over the cores and
each part in chunks of images whose columns fit in the core's cache.

Called by conv.py with validated arguments (stride, padding, dilation are int pairs; padding is
symmetric), like conv_cuda.py's launchers beside it. conv.py's conv2d_forward_numpy /
conv2d_backward_numpy (im2col of the whole batch, one batched product) stay the reference and run
grouped convolutions.

Why not im2col of the whole batch (the measurements: docs/performance.md, "Any CNN on the CPU",
sessions 6 and 7, made by docs/experiments/cpu_conv_choices.py):
* Its column matrix is C*KH*KW times the input's size (tens of MB for ResNet-20 at batch 128).
  A fresh buffer of that size is page-faulted in on every call and written and read through main
  memory; a chunk's columns stay in the cache.
* OpenBLAS's own threads help a product with few output channels little and unevenly; two parts,
  each with a 1-thread BLAS, keep both cores busy through the copies as well as the products.
So the batch is split into equal parts, one per core (the caller's thread and the CPU executor's
worker threads, gpuconv.nn.cpu_plan.run_in_parts, with a 1-thread BLAS for the region), and a
part runs in chunks of a few images, the chunk's copies about a core's cache. Every buffer is a
part's, allocated once and reused by each chunk, so it stays in the cache and is freed with the
call. The layout is chosen per shape (_layout_class, _batch_inner):
* _RowRuns, stride and dilation 1 (most convs of a CNN): the chunk's images sit between the
  channels and the width, R[H', C, KW, m, OW]; every output row's columns are one contiguous
  block of R, read in place by the product (no im2col), and the copies move whole rows.
* _Rows, channels-last: one row per output pixel, one product (pixels, KH*KW*C) @ (KH*KW*C, O);
  the copies move runs of KW*C values. Any stride; strided convs.
* _Wide, channels-first on wide rows (stride 1, dilated): every kernel tap is one long
  contiguous run, and W (O, C*KH*KW) @ columns gives each image channels-first.
* _BatchInner, the backward of float32 stride-1 convs with few input channels: the CPU
  executor's ConvOp on [C, H, W, n] chunks, whose input gradient by rows and filter gradient
  share one copy of the input.

The backward recomputes a chunk's columns (cheaper than keeping them) for the filter gradient.
With stride 1 the input gradient is a convolution of dy (a gather); otherwise the columns'
gradient dy @ W is added back tap by tap. The parts' filter and bias gradients are summed in part
order; the split depends on the batch size and the worker count alone, so a result never depends
on timing.
"""
import types

import numpy as np

from . import cpu_parts
from ._args import conv_output_size

# A chunk's column matrix aims at this size: a core's L2 (1 MiB here) plus a share of L3; the best
# of 0.25-8 MiB at ResNet-20's shapes (docs/performance.md).
CHUNK_BYTES = 3 << 19
# Dilated stride-1 convs (the others take _RowRuns) use the wide layout for columns of at most
# this many rows (C*KH*KW): measured before _RowRuns existed on undilated convs, LeNet-5's conv1
# (25) and ResNet's stem (27) and first stage (144) were faster wide, LeNet-5's conv2 (150) and
# ResNet's later stages (288, 576) faster channels-last.
WIDE_MAX_COLUMN = 144


# Below this size of the whole batch's im2col matrix, conv.py's reference path (one product over
# the whole batch, the BLAS's own threads) is faster than the parts' hand-overs: the crossover of
# a forward and backward measured between 0.9 and 2.3 MiB at LeNet-5's and ResNet-20's shapes
# (docs/performance.md, "Any CNN on the CPU, session 7"; 4 MiB before _RowRuns).
REFERENCE_MAX_BYTES = 3 << 19
# _RowRuns copies a chunk of about this many bytes (its R and products): of 0.25-4 MiB, the fastest
# whole backward at 4 of the 6 stride-1 shapes of LeNet-5 and ResNet-20 (docs/performance.md, "Any
# CNN on the CPU, session 7"; smaller chunks cost more Python and thinner products than they gain).
ROW_RUNS_BYTES = 2 << 20
# _RowRuns' filter gradient makes [OH, KH*C*KW, O] products per chunk: beyond this size (wide
# convs; ResNet-20's and LeNet-5's stay under 1.2 MB) the filter gradient takes _Rows or _Wide.
ROW_RUNS_DW_MAX_BYTES = 2 << 20
# ... and the forward too once its products are narrower than this (a chunk of one or two images
# of 7-32 pixels' width): from 128 channels on, with 28-32 columns, _RowRuns measured 1.05-1.5x
# slower than _Rows; at ResNet-20's shapes (96-224 columns) 1.1-2x faster (docs/performance.md).
ROW_RUNS_MIN_COLUMNS = 64
# Up to this many input channels (LeNet-5's 1 and 6, ResNet's stem's 3) a float32 stride-1
# backward that needs the input gradient runs in the batch-innermost layout (_BatchInner), whose
# input gradient by rows and filter gradient share one copy of the input: 1.15-1.5x faster than
# the gather with _RowRuns' filter gradient; from 8 channels on the two were within 3-8%.
BATCH_INNER_MAX_CHANNELS = 7
# _BatchInner's chunks: about this many bytes of input copies, output and padded input.
BATCH_INNER_BYTES = 4 << 20


def takes(x_shape, w_shape, groups, out_hw, itemsize):
    """Whether a conv of these shapes runs here (else in conv.py's whole-batch reference path)."""
    columns = x_shape[0] * w_shape[1] * w_shape[2] * w_shape[3] * out_hw[0] * out_hw[1] * itemsize
    return groups == 1 and columns > REFERENCE_MAX_BYTES


class _Geometry:
    """Shapes of one convolution, shared by the forward and the backward."""

    def __init__(self, x_shape, w_shape, stride, padding, dilation):
        self.n, self.c, self.h, self.w = x_shape
        self.o, _, self.kh, self.kw = w_shape
        (self.sh, self.sw), (self.ph, self.pw), (self.dh, self.dw) = stride, padding, dilation
        self.padded = (self.h + 2 * self.ph, self.w + 2 * self.pw)
        self.oh = conv_output_size(self.h, self.kh, self.sh, self.ph, self.dh)
        self.ow = conv_output_size(self.w, self.kw, self.sw, self.pw, self.dw)
        self.k = self.kh * self.kw * self.c  # a column's length

    def chunk_of(self, column_bytes_per_image):
        return max(1, min(self.n, CHUNK_BYTES // column_bytes_per_image))


def _stride_one(geo):
    return (geo.sh, geo.sw, geo.dh, geo.dw) == (1, 1, 1, 1)


def _batch_inner(geo, dtype):
    """Whether a backward that needs the input gradient runs in _BatchInner (with the filter
    gradient, if wanted): float32 stride-1 convs with few input channels."""
    return dtype == np.float32 and _stride_one(geo) and geo.c <= BATCH_INNER_MAX_CHANNELS


def _layout_class(geo, dtype):
    """The layout of a conv's forward and filter gradient (and of the gather, a forward):
    _RowRuns for stride-1 convs whose chunk's products are at least ROW_RUNS_MIN_COLUMNS wide."""
    if _stride_one(geo) and _RowRuns.chunk_of(geo, dtype) * geo.ow >= ROW_RUNS_MIN_COLUMNS:
        return _RowRuns
    return _layout_before_row_runs(geo)


def _layout_before_row_runs(geo):
    return _Wide if (geo.sh, geo.sw) == (1, 1) and geo.k <= WIDE_MAX_COLUMN else _Rows


def _filter_grad_class(geo, dtype):
    """The layout of a backward's filter gradient: _layout_class's, except that _RowRuns' per-row
    products, [OH, KH*C*KW, O] per chunk (OH copies of dW), are kept within ROW_RUNS_DW_MAX_BYTES; wider
    convs take the layouts from before _RowRuns (at (32, 512, 7, 7) 3x3, _RowRuns' filter gradient
    took 2.2x the time and 4.5x the memory of _Rows')."""
    layout = _layout_class(geo, dtype)
    if layout is _RowRuns and geo.oh * geo.k * geo.o * np.dtype(dtype).itemsize > ROW_RUNS_DW_MAX_BYTES:
        return _layout_before_row_runs(geo)
    return layout


class _Rows:
    """Channels-last: a chunk's input is copied into a zero-padded (m, H', W', C) buffer; its
    columns are one row per output pixel, (kh, kw, c) along the row, and the product is
    (pixels, KH*KW*C) @ (KH*KW*C, O), the output channels-last. Any stride and dilation."""

    def __init__(self, geo, dtype):
        self.geo = geo
        self.chunk = geo.chunk_of(geo.oh * geo.ow * geo.k * np.dtype(dtype).itemsize)
        self.padded = np.zeros((self.chunk,) + geo.padded + (geo.c,), dtype=dtype)  # borders stay 0
        self.cols = np.empty((self.chunk, geo.oh, geo.ow, geo.kh, geo.kw, geo.c), dtype=dtype)
        self.out = self.dy_buffer = self.grad = None  # made on first use: a call needs only some
        self.row_windows = None
        if geo.dw == 1:
            # The KW taps of one kernel row are one contiguous run of KW*C values of the padded
            # row: one copy per kernel row, with runs KW times longer than a tap's. The windows
            # are views of the reused buffer, made once per part (as_strided is slow to call).
            n_stride, h_stride, w_stride, c_stride = self.padded.strides
            self.row_windows = [np.lib.stride_tricks.as_strided(
                self.padded[:, i * geo.dh:], (self.chunk, geo.oh, geo.ow, geo.kw, geo.c),
                (n_stride, h_stride * geo.sh, w_stride * geo.sw, w_stride, c_stride), writeable=False)
                for i in range(geo.kh)]

    @staticmethod
    def weight_matrix(w):
        """(O, C, KH, KW) -> (KH*KW*C, O), the row order of the columns."""
        return np.ascontiguousarray(w.transpose(2, 3, 1, 0)).reshape(-1, w.shape[0])

    @staticmethod
    def weight_grad(geo, dw):
        """The summed (KH*KW*C, O) product back in the weight's (O, C, KH, KW) order."""
        return dw.reshape(geo.kh, geo.kw, geo.c, geo.o).transpose(3, 2, 0, 1).copy()

    def taps(self):
        """(i, j, window) for each kernel tap: the padded input's pixels it reads, as slices."""
        geo = self.geo
        for i in range(geo.kh):
            rows = slice(i * geo.dh, i * geo.dh + geo.sh * (geo.oh - 1) + 1, geo.sh)
            for j in range(geo.kw):
                cols = slice(j * geo.dw, j * geo.dw + geo.sw * (geo.ow - 1) + 1, geo.sw)
                yield i, j, (slice(None), rows, cols)

    def interior(self):
        geo = self.geo
        return (slice(None), slice(geo.ph, geo.ph + geo.h), slice(geo.pw, geo.pw + geo.w))

    def columns(self, x, first, last):
        """The (pixels, KH*KW*C) columns of images first..last-1 (a view of the reused buffer)."""
        m = last - first
        self.padded[:m][self.interior()] = x[first:last].transpose(0, 2, 3, 1)
        cols = self.cols[:m]
        if self.row_windows is not None:
            for i, windows in enumerate(self.row_windows):
                cols[:, :, :, i] = windows[:m]
        else:
            padded = self.padded[:m]
            for i, j, window in self.taps():
                cols[:, :, :, i, j] = padded[window]
        return cols.reshape(-1, self.geo.k)

    def forward(self, x, w_matrix, first, last, y):
        geo, m = self.geo, last - first
        if self.out is None:
            self.out = np.empty((self.chunk * geo.oh * geo.ow, geo.o), dtype=x.dtype)
        cols = self.columns(x, first, last)
        rows = np.matmul(cols, w_matrix, out=self.out[:len(cols)])
        y[first:last] = rows.reshape(m, geo.oh, geo.ow, geo.o).transpose(0, 3, 1, 2)

    def _dy_rows(self, dy, first, last):
        geo, m = self.geo, last - first
        if self.dy_buffer is None:
            self.dy_buffer = np.empty((self.chunk, geo.oh, geo.ow, geo.o), dtype=dy.dtype)
        rows = self.dy_buffer[:m]
        rows[...] = dy[first:last].transpose(0, 2, 3, 1)
        return rows.reshape(-1, geo.o)

    def filter_grad(self, x, dy, first, last):
        """This chunk's (KH*KW*C, O) filter gradient, columns.T @ dy's rows."""
        return self.columns(x, first, last).T @ self._dy_rows(dy, first, last)

    def add_input_grad(self, dy, w_matrix, first, last, dx):
        """dx of images first..last-1: the columns' gradient dy @ W.T, added back tap by tap into
        a padded channels-last buffer (its borders, the padding, are dropped)."""
        m = last - first
        if self.grad is None:
            self.grad = np.empty_like(self.padded)
        rows = self._dy_rows(dy, first, last)
        dcols = np.matmul(rows, w_matrix.T, out=self.cols[:m].reshape(-1, self.geo.k))
        dcols = dcols.reshape(self.cols[:m].shape)
        grad = self.grad[:m]
        grad[...] = 0
        for i, j, window in self.taps():
            grad[window] += dcols[:, :, :, i, j]
        dx[first:last] = grad[self.interior()].transpose(0, 3, 1, 2)


class _Wide:
    """Channels-first on wide rows, for stride 1: in the zero-padded (m, C, H', W') buffer every
    kernel tap is one contiguous run of the flattened image, so a chunk's (C*KH*KW, P) columns
    are C*KH*KW long copies; output pixel (oh, ow) is column oh * W' + ow, and the W' - OW
    columns past each output row are junk, cropped from y (and zero in dy, adding nothing to dW).
    The product W (O, C*KH*KW) @ columns is each image's output already channels-first. Few
    input channels make the channels-last rows short, which this layout avoids."""

    def __init__(self, geo, dtype):
        self.geo = geo
        self.width = geo.padded[1]
        self.size = (geo.oh - 1) * self.width + geo.ow  # columns per image, junk included
        self.chunk = geo.chunk_of(geo.k * self.size * np.dtype(dtype).itemsize)
        self.padded = np.zeros((self.chunk, geo.c) + geo.padded, dtype=dtype)  # borders stay 0
        self.cols = np.empty((self.chunk, geo.c, geo.kh, geo.kw, self.size), dtype=dtype)
        self.offsets = [(i, j, i * geo.dh * self.width + j * geo.dw)
                        for i in range(geo.kh) for j in range(geo.kw)]
        self.wide = None  # the output-sized buffer, made on first use

    @staticmethod
    def weight_matrix(w):
        return w.reshape(w.shape[0], -1)

    @staticmethod
    def weight_grad(geo, dw):
        return dw.reshape(geo.o, geo.c, geo.kh, geo.kw)

    def columns(self, x, first, last):
        geo, m = self.geo, last - first
        padded = self.padded[:m]
        padded[:, :, geo.ph:geo.ph + geo.h, geo.pw:geo.pw + geo.w] = x[first:last]
        flat = padded.reshape(m, geo.c, -1)
        cols = self.cols[:m]
        for i, j, offset in self.offsets:
            cols[:, :, i, j] = flat[:, :, offset:offset + self.size]
        return cols.reshape(m, geo.k, self.size)

    def _wide_rows(self, m):
        """(m, O, OH, W') view of a reused output-sized buffer whose junk columns stay zero."""
        geo = self.geo
        if self.wide is None:
            self.wide = np.zeros((self.chunk, geo.o, geo.oh * self.width), dtype=self.padded.dtype)
        return self.wide[:m]

    def forward(self, x, w_matrix, first, last, y):
        geo, m = self.geo, last - first
        wide = self._wide_rows(m)
        np.matmul(w_matrix, self.columns(x, first, last), out=wide[:, :, :self.size])
        y[first:last] = wide.reshape(m, geo.o, geo.oh, self.width)[..., :geo.ow]

    def filter_grad(self, x, dy, first, last):
        """This chunk's (O, C*KH*KW) filter gradient, the sum over its images of dy @ columns.T."""
        geo, m = self.geo, last - first
        wide = self._wide_rows(m)
        wide.reshape(m, geo.o, geo.oh, self.width)[..., :geo.ow] = dy[first:last]
        cols = self.columns(x, first, last)
        return np.matmul(wide[:, :, :self.size], cols.transpose(0, 2, 1)).sum(axis=0)


class _RowRuns:
    """The images of a chunk between the channels and the width, for stride and dilation 1: a
    chunk's input is copied (with zeros for the padding) into R[H', C, KW, m, OW], R[ih, c, kw,
    i, ow] = x_padded[i, c, ih, ow + kw], in runs of OW values (a transpose of whole rows, not of
    single values as the batch-innermost layout needs). With the rows ordered (kh, c, kw), output
    row oh's columns are then one contiguous block of R (rows oh .. oh + KH - 1), a matrix
    (KH*C*KW, m*OW) read in place: no im2col, KH times less copying, and one batched product
    W @ M[oh] gives [OH, O, m, OW], back to NCHW in runs of OW again. It computes any stride
    (rows SH apart, columns copied SW apart) but runs stride-1 convs only: at ResNet-20's strided
    shapes it was no faster than _Rows, and slower with their input gradient (docs/performance.md)."""

    def __init__(self, geo, dtype):
        self.geo, self.dtype = geo, dtype
        self.chunk = self.chunk_of(geo, dtype)
        # kernel column j reads input column ow*SW + j - PW: the output columns where that is inside
        self.copies = []
        for j in range(geo.kw):
            first = max(0, -(-(geo.pw - j) // geo.sw))
            last = min(geo.ow, (geo.w - 1 + geo.pw - j) // geo.sw + 1)
            if first < last:
                start = first * geo.sw + j - geo.pw
                self.copies.append((j, slice(first, last), slice(start, start + (last - first - 1) * geo.sw + 1,
                                                                 geo.sw)))
        self.buffers = {}  # chunk size -> (R, its row matrices, the products' buffer)

    @staticmethod
    def chunk_of(geo, dtype):
        """Images per chunk: R and the products of one image, within ROW_RUNS_BYTES."""
        image = (geo.padded[0] * geo.c * geo.kw + geo.oh * geo.o) * geo.ow * np.dtype(dtype).itemsize
        return max(1, min(geo.n, ROW_RUNS_BYTES // image))

    @staticmethod
    def weight_matrix(w):
        """(O, C, KH, KW) -> (O, KH*C*KW), the row order of R's blocks."""
        return np.ascontiguousarray(w.transpose(0, 2, 1, 3)).reshape(w.shape[0], -1)

    @staticmethod
    def weight_grad(geo, dw):
        return dw.reshape(geo.o, geo.kh, geo.c, geo.kw).transpose(0, 2, 1, 3).copy()

    def _buffers(self, m):
        entry = self.buffers.get(m)
        if entry is None:  # once per part and chunk size (a part's last chunk may be shorter)
            geo = self.geo
            rows = np.zeros((geo.padded[0], geo.c, geo.kw, m, geo.ow), self.dtype)  # the padding stays 0
            step = rows.strides[2]  # row (kh, c, kw) of a block is R[oh + kh, c, kw]: evenly spaced
            matrices = np.ndarray((geo.oh, geo.kh * geo.c * geo.kw, m * geo.ow), self.dtype, buffer=rows,
                                  strides=(geo.sh * rows.strides[0], step, rows.itemsize))
            products = np.empty((geo.oh, geo.o, m * geo.ow), self.dtype)
            entry = self.buffers[m] = (rows, matrices, products)
        return entry

    def matrices(self, x, first, last):
        """Images first..last-1 copied into R -> (R's row matrices [OH, KH*C*KW, m*OW], products buffer)."""
        geo = self.geo
        rows, matrices, products = self._buffers(last - first)
        images = x[first:last].transpose(2, 1, 0, 3)  # [H, C, m, W]
        for j, out_columns, in_columns in self.copies:
            rows[geo.ph:geo.ph + geo.h, :, j, :, out_columns] = images[..., in_columns]
        return matrices, products

    def forward(self, x, w_matrix, first, last, y):
        geo, m = self.geo, last - first
        matrices, products = self.matrices(x, first, last)
        np.matmul(w_matrix, matrices, out=products)
        y[first:last] = products.reshape(geo.oh, geo.o, m, geo.ow).transpose(2, 1, 0, 3)

    def filter_grad(self, x, dy, first, last):
        """This chunk's (O, KH*C*KW) filter gradient: the sum over output rows of (M @ dy's row.T).T."""
        geo, m = self.geo, last - first
        matrices, products = self.matrices(x, first, last)
        rows = products.reshape(geo.oh, geo.o, m, geo.ow)
        rows[...] = dy[first:last].transpose(2, 1, 0, 3)
        # M @ dy.T per output row (this orientation measured faster), summed over the rows
        return np.matmul(matrices, products.transpose(0, 2, 1)).sum(axis=0).T


class _BatchInner:
    """Batch innermost, as the CPU executor runs a whole network (gpuconv/nn/cpu_plan.py): a chunk
    of images is transposed to [C, H, W, n] and its backward run by the executor's own conv,
    ConvOp (gpuconv/nn/cpu_ops.py), whose input gradient by rows (no col2im) and filter gradient
    share one row copy of the input; the input gradient is transposed back. Float32 only (the
    executor's buffers are float32); stride 1 with few input channels (_batch_inner)."""

    def __init__(self, geo, w):
        from ..nn.cpu_ops import Chunk, ConvOp, gradients
        self.geo, self.make_chunk, self.gradients = geo, Chunk, gradients
        self.op = ConvOp(_ConvLayer(geo, w), 0)
        self.op.setup((geo.c, geo.h, geo.w))
        # per image: the input's row copy (R), the output gradient, the padded input
        image = 4 * geo.c * (geo.padded[0] * geo.kw * geo.ow + geo.padded[0] * geo.padded[1]) \
            + 4 * geo.o * geo.oh * geo.ow
        self.chunk = max(1, min(geo.n, BATCH_INNER_BYTES // image))
        self.store, self.scratch = {}, {}  # the part's buffers, reused chunk after chunk

    def _chunk(self, first, last):
        chunk = self.make_chunk(first, last)
        chunk.store = self.store
        return chunk

    def backward(self, x, dy, first, last, dx, need_dw):
        """Writes dx[first:last]; returns this chunk's filter gradient if need_dw, else None."""
        geo, chunk = self.geo, self._chunk(first, last)
        self.gradients(self.scratch).start()  # the last chunk's input gradient is copied out: free again
        self.op.restore(chunk, x[first:last].transpose(1, 2, 3, 0))
        d = self.store.get("dy")
        if d is None or d.shape[-1] != chunk.n:
            d = self.store["dy"] = np.empty((geo.o, geo.oh, geo.ow, chunk.n), np.float32)
        np.copyto(d, dy[first:last].transpose(1, 2, 3, 0))
        grads = _FilterGrad(need_dw)
        np.copyto(dx[first:last].transpose(1, 2, 3, 0), self.op.backward(chunk, d, True, grads, self.scratch))
        return grads.value


class _ConvLayer:
    """What ConvOp reads of an nn.Conv2d: the bias is added by the callers here."""
    groups, bias, training = 1, None, False

    def __init__(self, geo, w):
        self.in_channels, self.weight = geo.c, types.SimpleNamespace(data=w)
        self.stride, self.padding, self.dilation = (geo.sh, geo.sw), (geo.ph, geo.pw), (geo.dh, geo.dw)


class _FilterGrad:
    """ConvOp's gradient sink (cpu_plan._Grads' interface): keeps the filter gradient if wanted."""

    def __init__(self, wanted):
        self.wanted, self.value = wanted, None

    def add_later(self, param, compute, always=False, reads=None):
        if self.wanted:
            self.value = compute()


def _batch_inner_backward(geo, dy, x, w, need_bias, need_dw):
    dx = np.empty(x.shape, dtype=x.dtype)

    def part(start, stop):
        layout = _BatchInner(geo, w)
        dw = db = None
        for first, last in cpu_parts.ranges(start, stop, layout.chunk):
            if need_bias:
                db = _accumulate(db, dy[first:last].sum(axis=(0, 2, 3)))
            chunk_dw = layout.backward(x, dy, first, last, dx, need_dw)
            dw = _accumulate(dw, chunk_dw) if need_dw else None
        return dw, db

    dw = db = None
    for part_dw, part_db in cpu_parts.in_parts(part, geo.n):  # in part order: the same sums every time
        dw = _accumulate(dw, part_dw) if need_dw else None
        db = _accumulate(db, part_db) if need_bias else None
    return dx, dw, db


def conv2d_forward(x, w, b, stride, padding, dilation):
    geo = _Geometry(x.shape, w.shape, stride, padding, dilation)
    y = np.empty((geo.n, geo.o, geo.oh, geo.ow), dtype=x.dtype)

    def part(start, stop):
        layout = _layout_class(geo, x.dtype)(geo, x.dtype)  # a part's buffers are its own
        weights = layout.weight_matrix(w)
        for first, last in cpu_parts.ranges(start, stop, layout.chunk):
            layout.forward(x, weights, first, last, y)
            if b is not None:
                y[first:last] += b.reshape(-1, 1, 1)

    cpu_parts.in_parts(part, geo.n)
    return y


def conv2d_backward(dy, x, w, stride, padding, dilation, need_dx, need_bias, need_dw):
    geo = _Geometry(x.shape, w.shape, stride, padding, dilation)
    if need_dx and _batch_inner(geo, x.dtype):
        return _batch_inner_backward(geo, dy, x, w, need_bias, need_dw)
    # the gather and the filter gradient are two regions: one worker count for both, else a
    # set_cpu_workers from another thread between them gave dx of one count and dW of another
    with cpu_parts.one_worker_count():
        return _backward_by_layout(geo, dy, x, w, need_dx, need_bias, need_dw)


def _backward_by_layout(geo, dy, x, w, need_dx, need_bias, need_dw):
    """conv2d_backward in the layout of _layout_class (the input gradient by the gather, a
    forward, where it can)."""
    stride, padding, dilation = (geo.sh, geo.sw), (geo.ph, geo.pw), (geo.dh, geo.dw)
    dx = None
    full_padding = tuple(d * (k - 1) - p for d, k, p in zip(dilation, w.shape[2:], padding))
    if need_dx and stride == (1, 1) and min(full_padding) >= 0:
        # With stride 1 the input gradient is a convolution of dy: the flipped filters, input and
        # output channels swapped, padded to the full kernel. It gathers (the forward's copies and
        # one product) instead of adding the columns' gradient back tap by tap, which measured
        # slower at every stride-1 shape of ResNet-20 (docs/performance.md).
        flipped = w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]
        dx = conv2d_forward(dy, flipped, None, (1, 1), full_padding, dilation)
        need_dx = False
    elif need_dx:
        dx = np.empty(x.shape, dtype=x.dtype)
    if not (need_dx or need_dw):
        return dx, None, dy.sum(axis=(0, 2, 3)) if need_bias else None

    def part(start, stop):
        layout = _filter_grad_class(geo, x.dtype)(geo, x.dtype) if need_dw else None
        scatter = None  # dx added back tap by tap: strided convs, always in the _Rows layout
        if need_dx:
            scatter = layout if isinstance(layout, _Rows) else _Rows(geo, x.dtype)
        weights = scatter.weight_matrix(w) if need_dx else None
        dw = db = None
        chunk = min(user.chunk for user in (layout, scatter) if user is not None)  # fits both buffers
        for first, last in cpu_parts.ranges(start, stop, chunk):
            if need_bias:
                db = _accumulate(db, dy[first:last].sum(axis=(0, 2, 3)))
            if need_dw:
                dw = _accumulate(dw, layout.filter_grad(x, dy, first, last))
            if need_dx:
                scatter.add_input_grad(dy, weights, first, last, dx)
        return dw, db

    dw = db = None
    for part_dw, part_db in cpu_parts.in_parts(part, geo.n):  # in part order: the same sums every time
        dw = _accumulate(dw, part_dw) if need_dw else None
        db = _accumulate(db, part_db) if need_bias else None
    if need_dw:
        dw = _filter_grad_class(geo, x.dtype).weight_grad(geo, dw)
    return dx, dw, db


def _accumulate(total, value):
    """total + value, in place once there is a total (the first value is a fresh array)."""
    if total is None:
        return value
    total += value
    return total
