"""The fast CPU path: a Sequential run as one plan in the batch-innermost layout.

Sequential.forward/backward hand a float32 NumPy batch to `forward(model, x)` / `backward(model,
dy, need_dx)` below. When every layer is one this module knows (Conv2d with groups=1, ReLU, Tanh,
Sigmoid, MaxPool2d/AvgPool2d with stride == kernel and no padding, Flatten, Linear, Dropout when
it is the identity), the model runs here; otherwise `forward` returns None and the layers run one
by one, which stays the reference. Gradients match that reference to float32 rounding.

Why it is faster than the layers (figures: the commit messages of this file):

* Layout. Activations live as [C, H, W, n] (n, the images of a chunk, innermost); dense ones as
  [features, n]. A conv's product W @ columns is then already the next layer's input, Flatten is
  a free reshape ([C*H*W, n] in NCHW's flatten order), and NCHW is converted only at the edges.
* No im2col. With the column rows ordered (kh, c, kw), the columns of one output row are a
  contiguous block of R[ih, c, kw, ow, n] = x[c, ih, ow*S + kw, n], KH times smaller than the
  im2col matrix: each output row is a GEMM reading R in place (see _Conv._row_matrices). The input
  gradient uses the same trick along H on the output gradient, then KW slice-adds, not col2im.
* Fusion. conv -> ReLU -> max pool runs as conv -> max pool -> (+bias, ReLU) on the 4x smaller
  map: max pooling commutes with adding a per-channel constant and with ReLU. Its output
  positions are ordered pool-tap-major, so each pooling tap is one contiguous block for the max,
  for routing the gradient to the first maximum and for dW. Ties are decided on the raw conv
  output, before the bias; only where the float32 bias add rounds two different raw values to
  the same number can the layers (first of the equal sums) and the plan (the larger raw value,
  as exact arithmetic would) route a gradient differently.
* Threads. NumPy's elementwise work runs on one core and OpenBLAS's threaded small GEMMs stall
  when the other core is busy. So the batch is split into one part per BLAS thread, each part runs
  the whole network in its own Python thread (NumPy releases the GIL inside every large call)
  with a single-threaded BLAS (set process-wide for the length of the call, then restored), and
  the parts' parameter gradients are summed. Two joins per training step, none per layer. The
  thread count is NumPy's BLAS thread count, so "2 threads" means the same as for the BLAS alone.
* Memory. Buffers are allocated once per (chunk, layer) or per thread and reused while the batch
  size stays; no im2col matrix is kept (R is KH times smaller). What the caller receives
  (logits, input gradient, every p.grad) is always a new array.

Non-finite logits (a NaN or Inf anywhere upstream reaches them) make `forward` run the layers
instead, so the reference rules for NaN in max pooling apply and backward follows the same path.
Switch the plan off with `model.use_fast_cpu(False)` or, for the process, `cpu_plan.enabled = False`.
"""
import contextlib
import math
import os
import sys
import threading
import weakref

import numpy as np

from .. import blas
from ..backend import emulation_enabled
from ..errors import DTypeError, ShapeError
from ..functional._args import conv_output_size
from . import layers as L

enabled = True          # process-wide switch; Sequential.use_fast_cpu(False) switches one model off
MIN_CHUNK = 24          # fewer images than this per thread is not worth a thread (measured: 32 -> 1 thread)
SWITCH_INTERVAL = 0.0002  # seconds: Python's thread switch interval while the plan's threads run
MAX_CHUNK = 128         # a thread runs its share in chunks of at most this many images

_plans = weakref.WeakKeyDictionary()  # model -> its _Plan (kept off the model: no state in vars())
_workers = []           # _Worker threads for the parallel regions (created on first use)
_workers_pid = None
_region_lock = threading.Lock()


class Unsupported(Exception):
    """A layer or configuration this plan does not run; the caller falls back to the layers."""


# ----------------------------------------------------------------------------------------------
# buffers


def _buffer(store, key, shape, zero=False, dtype=np.float32):
    """A cached array for `key`, reallocated only when the shape changes. zero=True arrays are
    zeroed when (re)allocated: callers rely on parts they never write (padding) staying zero."""
    array = store.get(key)
    if array is None or array.shape != shape:
        array = np.zeros(shape, dtype) if zero else np.empty(shape, dtype)
        store[key] = array
    return array


def _shared(store, name, shape):
    """A view of one flat buffer that every op of a thread shares (the columns: the largest
    array, used by one op at a time), grown to the largest shape asked for."""
    size = math.prod(shape)
    flat = store.get(name)
    if flat is None or flat.size < size:
        flat = store[name] = np.empty(size, np.float32)
    return flat[:size].reshape(shape)


class _Chunk:
    """The images [start, stop) that one thread runs; `store` keeps its buffers across steps,
    `saved` what this step's backward needs."""

    def __init__(self, start, stop):
        self.start, self.stop, self.n = start, stop, stop - start
        self.store, self.saved = {}, {}


# ----------------------------------------------------------------------------------------------
# ops on batch-innermost arrays: spatial [C, H, W, n], dense [F, n]


class _Op:
    needs_own_output = False  # does backward read this op's output? (then nothing may overwrite it)

    def setup(self, shape):
        """Per-image input shape -> per-image output shape; raises Unsupported."""
        raise NotImplementedError

    def params(self):
        return []


class _Conv(_Op):
    """Conv2d (groups=1), optionally fused with a following [ReLU ->] MaxPool2d(k, stride k).

    Fused, the output positions are ordered pool-tap-major, (a, b, PH, PW) with output row
    oh = PH*k + a: every pooling tap is then one contiguous block, so pooling, routing the
    gradient to the maxima and the filter gradient all run on contiguous arrays, and positions
    no window covers are never computed. With dilation 1 the product needs no im2col
    (_row_matrices), and its shifted-row copy R is kept for dW; with dilation > 1 it builds
    the columns, in one buffer per thread, and rebuilds them in the backward.
    """

    def __init__(self, layer, index, pool=None, relu=False):
        self.layer, self.index, self.pool, self.relu = layer, index, pool, relu

    def setup(self, shape):
        layer = self.layer
        c, h, w = shape
        if layer.groups != 1 or c != layer.in_channels or layer.weight.data.shape[1] != c:
            raise Unsupported("conv groups or channels")
        self.kernel = tuple(layer.weight.data.shape[2:])
        self.stride, self.dilation = layer.stride, layer.dilation
        if layer.padding == "same":
            totals = [d * (k - 1) for k, d in zip(self.kernel, self.dilation)]
            if self.stride != (1, 1) or any(t % 2 for t in totals):
                raise Unsupported("asymmetric 'same' padding")
            self.padding = (totals[0] // 2, totals[1] // 2)
        else:
            self.padding = layer.padding
        self.channels, self.in_hw = c, (h, w)
        self.out_hw = tuple(conv_output_size(s, k, st, p, d) for s, k, st, p, d in
                            zip((h, w), self.kernel, self.stride, self.padding, self.dilation))
        if min(self.out_hw) < 1:
            raise Unsupported("empty conv output")
        self.filters = layer.weight.data.shape[0]
        self.rows = c * self.kernel[0] * self.kernel[1]
        self.row_path = self.dilation == (1, 1)
        if self.pool is None:
            self.positions, self.pooled_hw = self.out_hw, self.out_hw  # natural order (OH, OW)
            return (self.filters,) + self.out_hw
        self.pooled_hw = (self.out_hw[0] // self.pool[0], self.out_hw[1] // self.pool[1])
        if min(self.pooled_hw) < 1:
            raise Unsupported("empty pool output")
        self.positions = self.pool + self.pooled_hw  # tap-major (a, b, PH, PW)
        return (self.filters,) + self.pooled_hw

    def params(self):
        layer = self.layer
        return [layer.weight] + ([layer.bias] if layer.bias is not None else [])

    def _columns(self, x, out):
        """im2col into `out` [C, KH, KW, *positions, n] from the (padded) input [C, H', W', n]."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        sc, srow, scol, sn = x.strides
        if self.pool is None:
            oh, ow = self.out_hw
            shape = (x.shape[0], kh, kw, oh, ow, x.shape[3])
            strides = (sc, dh * srow, dw * scol, sh * srow, sw * scol, sn)
        else:  # output row oh = PH*k + a reads input row oh*stride + kh*dilation
            (ph, pw), (a, b) = self.pooled_hw, self.pool
            shape = (x.shape[0], kh, kw, a, b, ph, pw, x.shape[3])
            strides = (sc, dh * srow, dw * scol, sh * srow, sw * scol, a * sh * srow, b * sw * scol, sn)
        # np.ndarray over x's memory: the same view as as_strided, without its Python overhead
        np.copyto(out, np.ndarray(shape, x.dtype, buffer=x, strides=strides))
        return out

    def _row_matrices(self, x, store, key, n):
        """Convolution without im2col (dilation 1). R[b, ih, c, kw, pw, n] = x[c, ih, (B*pw + b)*S + kw, n]
        holds every input row shifted by each kw and thinned to pooling column b: KH times less
        than the columns. Ordered (kh, c, kw), the column rows of output row (a, PH) are then one
        contiguous block of R, rows R[(A*PH + a)*S : ... + KH], i.e. a plain matrix
        M[a, b, PH] [KH*C*KW, PW*n] inside R; neighbouring rows' matrices overlap in memory.
        Returns M as one view [A, B, PH, KH*C*KW, PW*n]: one batched matmul does the conv.
        R lives in store[key]; the forward keeps it for the backward's dW (it is small)."""
        (kh, kw), (a, b), (ph, pw), (sh, sw) = self.kernel, self.pool or (1, 1), self.pooled_hw, self.stride
        sc, srow, scol, sn = x.strides
        rows = _buffer(store, key, (b, x.shape[1], self.channels, kw, pw, n))
        np.copyto(rows, np.ndarray(rows.shape, x.dtype, buffer=x,
                                   strides=(sw * scol, srow, sc, scol, b * sw * scol, sn)))
        rb, rih, _, rkw, _, _ = rows.strides
        return np.ndarray((a, b, ph, self.rows, pw * n), x.dtype, buffer=rows,
                          strides=(sh * rih, rb, a * sh * rih, rkw, rows.itemsize))

    def _row_weight(self):
        """W as [F, KH*C*KW], the row order of _row_matrices (a copy unless C == 1)."""
        return self.layer.weight.data.transpose(0, 2, 1, 3).reshape(self.filters, -1)

    def _by_output_row(self, array, n):
        """[F, A, B, PH, PW, n] -> the view [A, B, PH, F, PW*n] that pairs with _row_matrices."""
        (a, b), (ph, pw) = self.pool or (1, 1), self.pooled_hw
        return array.reshape(self.filters, a, b, ph, pw * n).transpose(1, 2, 3, 0, 4)

    def _product(self, x, y, chunk, scratch, n):
        """y = W @ columns(x), y [F, *positions, n]; returns the row matrices (or None)."""
        if self.row_path:
            matrices = self._row_matrices(x, chunk.store, (self.index, "rows"), n)
            np.matmul(self._row_weight(), matrices, out=self._by_output_row(y, n))
            return matrices
        weight = self.layer.weight.data.reshape(self.filters, -1)
        cols = self._columns(x, _shared(scratch, "cols", (self.channels,) + self.kernel + self.positions + (n,)))
        np.matmul(weight, cols.reshape(self.rows, -1), out=y.reshape(self.filters, -1))
        return None

    def _weight_grad(self, x, matrices, dy, scratch, n):
        """dW = dy @ columns(x).T, in the weight's shape; dy [F, *positions, n]."""
        shape = self.layer.weight.data.shape
        if self.row_path:
            # [KK, F] per output row (M @ dy.T): OpenBLAS runs this orientation 10-15% faster
            partial = np.matmul(matrices, self._by_output_row(dy, n).transpose(0, 1, 2, 4, 3))
            f, c, kh, kw = shape
            total = np.add.reduce(partial.reshape(-1, kh, c, kw, f), axis=0)
            return np.ascontiguousarray(total.transpose(3, 1, 0, 2))
        cols = self._columns(x, _shared(scratch, "cols", (self.channels,) + self.kernel + self.positions + (n,)))
        return np.matmul(dy.reshape(self.filters, -1), cols.reshape(self.rows, -1).T).reshape(shape)

    def forward(self, chunk, x, scratch):
        n, c, (h, w) = chunk.n, self.channels, self.in_hw
        (ph, pw), key, f = self.padding, self.index, self.filters
        if ph or pw or not x.flags.c_contiguous:
            padded = _buffer(chunk.store, (key, "x"), (c, h + 2 * ph, w + 2 * pw, n), zero=True)
            padded[:, ph:ph + h, pw:pw + w, :] = x
            x = padded
        y = _buffer(chunk.store, (key, "y"), (f,) + self.positions + (n,))
        matrices = self._product(x, y, chunk, scratch, n)
        chunk.saved[key] = dict(source=x, y=y, matrices=matrices)
        bias = self.layer.bias.data.reshape(-1, 1, 1, 1) if self.layer.bias is not None else None
        if self.pool is None:
            if bias is not None:
                y += bias
            return y
        taps = y.reshape((f, -1) + self.pooled_hw + (n,))
        peak = _buffer(chunk.store, (key, "peak"), (f,) + self.pooled_hw + (n,))
        np.maximum.reduce(taps, axis=1, out=peak)  # propagates NaN, like the reference
        out = _buffer(chunk.store, (key, "out"), peak.shape)
        if bias is not None:
            np.add(peak, bias, out=out)
        else:
            np.copyto(out, peak)
        chunk.saved[key].update(peak=peak)
        if self.relu:  # the mask is kept for the backward
            mask = np.greater(out, 0, out=_buffer(chunk.store, (key, "mask"), out.shape, dtype=bool))
            np.multiply(out, mask, out=out)
            chunk.saved[key]["mask"] = mask
        return out

    def backward(self, chunk, dy, need_dx, grads, scratch):
        saved = chunk.saved[self.index]
        n, key, layer, f = chunk.n, self.index, self.layer, self.filters
        if self.pool is not None:
            # Each pooled gradient goes to its window's first maximum (and nowhere where the
            # ReLU was off). Taps in order take `remaining * equal`, which is all or nothing per
            # window, and leave `remaining - taken`; the last tap takes what is left (some tap
            # equals the maximum). All on the 4x smaller pooled arrays, and few calls (the GIL).
            taps = saved["y"].reshape((f, -1) + self.pooled_hw + (n,))
            count = taps.shape[1]
            if self.relu:
                dy = np.multiply(dy, saved["mask"], out=_buffer(scratch, (key, "dmask"), dy.shape))
            if layer.bias is not None:  # every window's gradient lands on exactly one tap
                grads.add(layer.bias, np.add.reduce(dy.reshape(f, -1), axis=1))
            dfull = _buffer(scratch, (key, "dfull"), (f,) + self.positions + (n,))
            routed = dfull.reshape(taps.shape)
            if count == 1:
                np.copyto(routed[:, 0], dy)
            else:
                equal = np.equal(taps[:, :-1], saved["peak"][:, None],
                                 out=_buffer(scratch, (key, "equal"), (f, count - 1) + dy.shape[1:], dtype=bool))
                remaining = _buffer(scratch, (key, "remaining"), dy.shape)
                for tap in range(count - 1):
                    np.multiply(dy, equal[:, tap], out=routed[:, tap])
                    dy = np.subtract(dy, routed[:, tap], out=routed[:, -1] if tap == count - 2 else remaining)
            dy = dfull
        elif layer.bias is not None:
            grads.add(layer.bias, np.add.reduce(dy, axis=(1, 2, 3)))
        grads.add(layer.weight, self._weight_grad(saved["source"], saved["matrices"], dy, scratch, n))
        if not need_dx:
            return None
        dx = _buffer(scratch, (key, "dx"), saved["source"].shape)
        dx.fill(0)
        if self.row_path and self.stride[0] == 1:
            self._input_grad_by_rows(dy, dx, scratch, n)
        else:
            self._input_grad_by_columns(dy, dx, scratch, n)
        (ph, pw), (h, w) = self.padding, self.in_hw
        return dx[:, ph:ph + h, pw:pw + w, :]

    def _natural(self, dy, target):
        """Write dy (this op's output gradient, [F, *positions, n]) into `target` [OH, F, OW, n]
        in natural position order; positions no pooling window covers are left alone (zero)."""
        f, n = self.filters, dy.shape[-1]
        if self.pool is None:
            np.copyto(target, dy.transpose(1, 0, 2, 3))
            return
        (a, b), (qh, qw) = self.pool, self.pooled_hw
        windows = target[:qh * a, :, :qw * b].reshape(qh, a, f, qw, b, n)
        np.copyto(windows, dy.reshape(f, a, b, qh, qw, n).transpose(3, 1, 0, 4, 2, 5))

    def _input_grad_by_rows(self, dy, dx, scratch, n):
        """dx += conv_transpose(dy) for stride 1 along H, dilation 1, without col2im. Along H it
        is the row trick again: with dy as [rows, F, OW*n], zero-padded by KH-1 rows at both ends,
        input row ih gets Wt[C*KW, KH*F] @ (rows ih .. ih+KH-1 of the padded dy), one contiguous
        block, neighbours overlapping. That leaves a [Hp, C, KW, OW, n] array, summed over kw
        into dx by KW slice-adds (col2im would add KH*KW times more)."""
        f, c, (kh, kw), (oh, ow) = self.filters, self.channels, self.kernel, self.out_hw
        hp, sw = dx.shape[1], self.stride[1]
        rows = _buffer(scratch, (self.index, "dy_rows"), (oh + 2 * (kh - 1), f, ow * n), zero=True)
        self._natural(dy, rows[kh - 1:kh - 1 + oh].reshape(oh, f, ow, n))
        r0, r1, r2 = rows.strides
        blocks = np.ndarray((hp, kh * f, ow * n), rows.dtype, buffer=rows, strides=(r0, r1, r2))
        # block j of rows ih.. is output row ih + j - (KH-1), which meets kernel row kh = KH-1-j
        weight = self.layer.weight.data[:, :, ::-1, :].transpose(1, 3, 2, 0).reshape(c * kw, kh * f)
        by_row = _shared(scratch, "cols", (hp, c * kw, ow * n))
        # Rows KH-1 .. OH-1 meet all KH output rows: one batched product. The 2(KH-1) edge rows
        # meet fewer; multiplying their zero padding too would cost 29% more for LeNet's conv2.
        inner = range(kh - 1, oh)
        if len(inner):
            np.matmul(weight, blocks[inner.start:inner.stop], out=by_row[inner.start:inner.stop])
        for ih in (ih for ih in range(hp) if ih not in inner):
            first, last = max(0, kh - 1 - ih), min(kh - 1, oh + kh - 2 - ih)
            np.matmul(weight[:, first * f:(last + 1) * f], rows[ih + first:ih + last + 1].reshape(-1, ow * n),
                      out=by_row[ih])
        by_row = by_row.reshape(hp, c, kw, ow, n).transpose(1, 0, 2, 3, 4)
        for j in range(kw):
            dx[:, :, j:j + (ow - 1) * sw + 1:sw, :] += by_row[:, :, j]

    def _input_grad_by_columns(self, dy, dx, scratch, n):
        """dx += col2im(W.T @ dy): any stride and dilation."""
        f, c, (kh, kw) = self.filters, self.channels, self.kernel
        (oh, ow), (sh, sw), (dh, dw) = self.out_hw, self.stride, self.dilation
        if self.pool is not None:  # back to natural (OH, OW) order; rows no window covers get 0
            natural = _buffer(scratch, (self.index, "natural"), (oh, f, ow, n), zero=True)
            self._natural(dy, natural)
            dy = natural.transpose(1, 0, 2, 3)
        dcols = _shared(scratch, "cols", (c, kh, kw, oh, ow, n))
        np.matmul(self.layer.weight.data.reshape(f, -1).T, dy.reshape(f, -1), out=dcols.reshape(self.rows, -1))
        for i in range(kh):
            for j in range(kw):
                dx[:, i * dh:i * dh + (oh - 1) * sh + 1:sh, j * dw:j * dw + (ow - 1) * sw + 1:sw, :] += dcols[:, i, j]


class _Pool(_Op):
    """MaxPool2d / AvgPool2d with stride == kernel and no padding (LeNet's pools)."""

    def __init__(self, layer, index):
        self.layer, self.index = layer, index
        self.mode = "max" if type(layer) is L.MaxPool2d else "avg"
        self.needs_own_output = self.mode == "max"

    def setup(self, shape):
        layer = self.layer
        if layer.stride != layer.kernel_size or layer.padding != (0, 0) or len(shape) != 3:
            raise Unsupported("pool with stride != kernel or padding")
        c, h, w = shape
        self.kernel = layer.kernel_size
        self.in_hw, self.out_hw = (h, w), (h // self.kernel[0], w // self.kernel[1])
        if min(self.out_hw) < 1:
            raise Unsupported("empty pool output")
        return (c,) + self.out_hw

    def _taps(self, x):
        (kh, kw), (oh, ow) = self.kernel, self.out_hw
        return [x[:, i:oh * kh:kh, j:ow * kw:kw, :] for i in range(kh) for j in range(kw)]

    def forward(self, chunk, x, scratch):
        taps = self._taps(x)
        y = _buffer(chunk.store, (self.index, "y"), (x.shape[0],) + self.out_hw + (chunk.n,))
        np.copyto(y, taps[0])
        for tap in taps[1:]:
            if self.mode == "max":
                np.maximum(y, tap, out=y)  # propagates NaN, like the reference
            else:
                y += tap
        if self.mode == "avg":
            y /= y.dtype.type(self.kernel[0] * self.kernel[1])  # the reference's sum, then divide
        chunk.saved[self.index] = dict(x=x, y=y)
        return y

    def backward(self, chunk, dy, need_dx, grads, scratch):
        saved = chunk.saved[self.index]
        x, y = saved["x"], saved["y"]
        dx = _buffer(scratch, (self.index, "dx"), x.shape, zero=True)  # rows past the last window stay 0
        targets = self._taps(dx)
        if self.mode == "avg":
            share = np.divide(dy, dy.dtype.type(self.kernel[0] * self.kernel[1]))
            for target in targets:
                np.copyto(target, share)
            return dx
        # first maximum of each window takes the gradient; the last tap gets what is left
        remaining = _buffer(scratch, (self.index, "remaining"), dy.shape)
        taps = self._taps(x)
        for index in range(len(taps) - 1):
            np.multiply(dy, taps[index] == y, out=targets[index])
            np.subtract(dy, targets[index], out=targets[-1] if index == len(taps) - 2 else remaining)
            dy = remaining
        if len(taps) == 1:
            np.copyto(targets[0], dy)
        return dx


class _Activation(_Op):
    def __init__(self, layer, index, in_place):
        self.layer, self.index, self.in_place = layer, index, in_place
        self.kind = {L.ReLU: "relu", L.Tanh: "tanh", L.Sigmoid: "sigmoid"}[type(layer)]
        self.needs_own_output = True

    def setup(self, shape):
        return shape

    def forward(self, chunk, x, scratch):
        y = x if self.in_place else _buffer(chunk.store, (self.index, "y"), x.shape)
        if self.kind == "relu":  # the mask is kept: the backward is then one multiply
            mask = np.greater(x, 0, out=_buffer(chunk.store, (self.index, "mask"), x.shape, dtype=bool))
            np.multiply(x, mask, out=y)
            chunk.saved[self.index] = mask
            return y
        elif self.kind == "tanh":
            np.tanh(x, out=y)
        else:  # the reference's formula, so the float32 results agree bit for bit
            e = np.exp(-np.abs(x))
            np.divide(np.where(x >= 0, np.float32(1), e), 1 + e, out=y)
        chunk.saved[self.index] = y
        return y

    def backward(self, chunk, dy, need_dx, grads, scratch):
        y = chunk.saved[self.index]
        dx = _buffer(scratch, (self.index, "dx"), y.shape)
        if self.kind == "relu":
            return np.multiply(dy, y, out=dx)  # y is the mask x > 0
        if self.kind == "tanh":
            np.multiply(y, y, out=dx)
            np.subtract(1, dx, out=dx)
        else:
            np.subtract(1, y, out=dx)
            dx *= y
        dx *= dy
        return dx


class _Flatten(_Op):
    def __init__(self, index):
        self.index = index

    def setup(self, shape):
        self.shape = shape
        return (int(np.prod(shape)),)

    def forward(self, chunk, x, scratch):
        return np.ascontiguousarray(x).reshape(-1, chunk.n)

    def backward(self, chunk, dy, need_dx, grads, scratch):
        return dy.reshape(self.shape + (chunk.n,))


class _Identity(_Op):
    def __init__(self, index):
        self.index = index

    def setup(self, shape):
        return shape

    def forward(self, chunk, x, scratch):
        return x

    def backward(self, chunk, dy, need_dx, grads, scratch):
        return dy


class _Linear(_Op):
    def __init__(self, layer, index):
        self.layer, self.index = layer, index

    def setup(self, shape):
        if len(shape) != 1 or shape[0] != self.layer.weight.data.shape[1]:
            raise Unsupported("linear input size")
        return (self.layer.weight.data.shape[0],)

    def params(self):
        layer = self.layer
        return [layer.weight] + ([layer.bias] if layer.bias is not None else [])

    def forward(self, chunk, x, scratch):
        weight = self.layer.weight.data
        y = _buffer(chunk.store, (self.index, "y"), (weight.shape[0], chunk.n))
        np.matmul(weight, x, out=y)
        if self.layer.bias is not None:
            y += self.layer.bias.data[:, None]
        chunk.saved[self.index] = x
        return y

    def backward(self, chunk, dy, need_dx, grads, scratch):
        x, layer = chunk.saved[self.index], self.layer
        grads.add(layer.weight, np.matmul(dy, x.T))
        if layer.bias is not None:
            grads.add(layer.bias, np.add.reduce(dy, axis=1))
        if not need_dx:
            return None
        dx = _buffer(scratch, (self.index, "dx"), x.shape)
        np.matmul(layer.weight.data.T, dy, out=dx)
        return dx


# ----------------------------------------------------------------------------------------------
# compiling a Sequential into ops


def _signature(model, x):
    """What the compiled ops depend on; any change recompiles (cheap: a tuple per layer)."""
    parts = [x.shape[1:]]
    for layer in model:
        kind = type(layer)
        if kind is L.Conv2d:
            parts.append((id(layer), kind, layer.stride, layer.padding, layer.dilation, layer.groups,
                          layer.weight.data.shape, layer.bias is None))
        elif kind is L.Linear:
            parts.append((id(layer), kind, layer.weight.data.shape, layer.bias is None))
        elif kind in (L.MaxPool2d, L.AvgPool2d):
            parts.append((id(layer), kind, layer.kernel_size, layer.stride, layer.padding))
        elif kind is L.Dropout:
            parts.append((id(layer), kind, layer.training and layer.p > 0))
        else:
            parts.append((id(layer), kind))
    return tuple(parts)


def _compile(layers, input_shape):
    """Layers -> ops, fusing conv [-> ReLU] -> MaxPool2d(k, stride k). Raises Unsupported."""
    ops, index = [], 0
    while index < len(layers):
        layer, kind = layers[index], type(layers[index])
        following = [type(l) for l in layers[index + 1:index + 3]]
        if kind is L.Conv2d:
            relu = following[:1] == [L.ReLU]
            pool_at = index + 1 + relu
            pool = layers[pool_at] if pool_at < len(layers) else None
            if (type(pool) is L.MaxPool2d and pool.stride == pool.kernel_size
                    and pool.padding == (0, 0)):
                ops.append(_Conv(layer, index, pool=pool.kernel_size, relu=relu))
                index = pool_at + 1
                continue
            ops.append(_Conv(layer, index))
        elif kind in (L.MaxPool2d, L.AvgPool2d):
            ops.append(_Pool(layer, index))
        elif kind in (L.ReLU, L.Tanh, L.Sigmoid):
            # In place when nothing reads the previous output again (conv without pool, linear).
            in_place = bool(ops) and not ops[-1].needs_own_output and isinstance(ops[-1], (_Conv, _Linear))
            ops.append(_Activation(layer, index, in_place))
        elif kind is L.Flatten:
            ops.append(_Flatten(index))
        elif kind is L.Linear:
            ops.append(_Linear(layer, index))
        elif kind is L.Dropout and not (layer.training and layer.p > 0):
            ops.append(_Identity(index))
        else:
            raise Unsupported(f"layer {kind.__name__}")
        index += 1
    shape = tuple(input_shape)
    for op in ops:
        if isinstance(op, (_Conv, _Pool)) and len(shape) != 3:
            raise Unsupported("spatial op on a flat input")
        shape = op.setup(shape)
    return ops, shape


class _Grads:
    """Per-thread parameter gradients: the first contribution is kept (a fresh array from a
    matmul or a sum), later ones are added to it."""

    def __init__(self):
        self.arrays = {}

    def add(self, param, value):
        key = id(param)
        if key in self.arrays:
            self.arrays[key][1] += value
        else:
            self.arrays[key] = [param, value]


# ----------------------------------------------------------------------------------------------
# running


class _Worker:
    """A persistent thread running one call at a time, handed over and back by two plain locks.
    (A ThreadPoolExecutor's submit and result go through Condition objects: more Python, with
    the GIL held, at the start and end of every parallel region: measured 2% of a LeNet-5 step.)
    Calls are numbered, so a result left behind by an interrupted wait is never taken for the
    next call's."""

    def __init__(self):
        self.go, self.done = threading.Lock(), threading.Lock()
        self.go.acquire()
        self.done.acquire()
        self.ticket, self.call, self.outcome = 0, None, None
        threading.Thread(target=self._loop, name="gpuconv-cpu", daemon=True).start()

    def _loop(self):
        while True:
            self.go.acquire()
            ticket, function, argument = self.call
            try:
                self.outcome = (ticket, True, function(argument))
            except BaseException as error:  # handed to the caller, raised there
                self.outcome = (ticket, False, error)
            self.done.release()

    def submit(self, function, argument):
        self.ticket += 1
        self.call = (self.ticket, function, argument)
        self.go.release()

    def result(self):
        while True:
            self.done.acquire()
            ticket, ok, value = self.outcome
            if ticket == self.ticket:
                break
        self.outcome = None
        if not ok:
            raise value
        return value


def _run_parallel(function, parts):
    """function(part) for each part; the first in this thread, the others in worker threads.
    One caller at a time (a second waits): the workers and the BLAS setting are process-wide."""
    global _workers, _workers_pid
    if len(parts) == 1:
        return [function(parts[0])]
    with _region_lock:
        if _workers_pid != os.getpid():  # a forked child inherits the objects, not the threads
            _workers, _workers_pid = [], os.getpid()
        while len(_workers) < len(parts) - 1:
            _workers.append(_Worker())
        workers = _workers[:len(parts) - 1]
        for worker, part in zip(workers, parts[1:]):
            worker.submit(function, part)
        results, error = [], None
        try:
            results.append(function(parts[0]))
        except BaseException as caught:
            error = caught
        for worker in workers:  # wait for all before anything returns or raises
            try:
                results.append(worker.result())
            except BaseException as caught:
                error = error or caught
        if error is not None:
            raise error
        return results


@contextlib.contextmanager
def _switch_interval(seconds):
    """Python's thread switch interval (process-wide) set to `seconds` for a block, then restored.

    A thread whose NumPy call has finished waits for the GIL while the other thread holds it; the
    holder lets go at its next large NumPy call, but one short call after another (the dense
    layers, the pooling bookkeeping) can retake it before the sleeping waiter wakes up (a wake-up
    costs ~50 us on a VM). The waiter only forces a hand-over after the switch interval (5 ms by
    default); 0.2 ms bounds that. A small effect on a noisy 2-core VM (LeNet-5, blocks of steps
    alternating 5 ms / 0.2 ms in one process): median step -2% to -8% in six runs at batch 64,
    128 and 256, the 10th percentile within +-5%."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


class _Plan:
    def __init__(self, model):
        self.model = weakref.ref(model)
        self.signature = None
        self.ops = None
        self.parts = []          # per thread: list of _Chunk
        self.active = False      # did the last forward run here (so backward must too)?
        self.threads = 1
        self.batch = None
        self.layout_key = None
        self.scratch = []        # per thread: buffers its ops reuse chunk after chunk

    def prepare(self, model, x):
        """Compile if the model or input shape changed; False if the plan cannot run this model."""
        signature = _signature(model, x)
        if signature != self.signature:
            self.signature = signature
            try:
                self.ops, self.out_shape = _compile(list(model), x.shape[1:])
            except Unsupported:
                self.ops = None
            self.layout_key = None
            self.parts, self.scratch = [], []
        if self.ops is None:
            return False
        for op in self.ops:
            for p in op.params():
                if not isinstance(p.data, np.ndarray) or p.data.dtype != np.float32:
                    return False
        return True

    def layout(self, batch):
        """Split the batch over threads (one per BLAS thread while each gets MIN_CHUNK images),
        and each thread's share into chunks of at most MAX_CHUNK images run one after another."""
        threads = max(1, min(blas.get_num_threads() if blas.available() else 1, batch // MIN_CHUNK))
        if (batch, threads, MAX_CHUNK) == self.layout_key:
            return
        old = {chunk.n: chunk.store for part in self.parts for chunk in part}
        bounds = [batch * t // threads for t in range(threads + 1)]
        self.parts = []
        for start, stop in zip(bounds, bounds[1:]):
            count = -(-(stop - start) // MAX_CHUNK)
            edges = [start + (stop - start) * i // count for i in range(count + 1)]
            part = [_Chunk(a, b) for a, b in zip(edges, edges[1:])]
            for chunk in part:  # a chunk of a size seen before takes over its buffers
                chunk.store = old.pop(chunk.n, chunk.store)
            self.parts.append(part)
        while len(self.scratch) < threads:
            self.scratch.append({})
        del self.scratch[threads:]
        self.batch, self.threads, self.layout_key = batch, threads, (batch, threads, MAX_CHUNK)
        blas.warm_up()

    def forward(self, x):
        batch = x.shape[0]
        self.layout(batch)
        self.input_shape = x.shape[1:]
        spatial_in = x.ndim == 4
        out = np.empty((batch,) + tuple(self.out_shape), np.float32)

        def run(thread):
            scratch = self.scratch[thread]
            for chunk in self.parts[thread]:
                chunk.saved = {}
                h = x[chunk.start:chunk.stop]
                h = h.transpose(1, 2, 3, 0) if spatial_in else h.T
                for op in self.ops:
                    h = op.forward(chunk, h, scratch)
                target = out[chunk.start:chunk.stop]
                np.copyto(target.transpose(*range(1, target.ndim), 0), h)

        self._in_threads(run)
        return out

    def backward(self, dy, need_dx):
        expected = (self.batch,) + tuple(self.out_shape)
        if not isinstance(dy, np.ndarray) or dy.dtype != np.float32:
            raise DTypeError(f"dy: expected a float32 NumPy array like the model's output, got "
                             f"{getattr(dy, 'dtype', type(dy).__name__)}")
        if dy.shape != expected:
            raise ShapeError(f"dy: expected shape {expected} (the shape of the model's output), "
                             f"got {tuple(dy.shape)}")
        dx = None

        def run(thread):
            grads, scratch = _Grads(), self.scratch[thread]
            for chunk in self.parts[thread]:
                d = dy[chunk.start:chunk.stop]
                d = d.transpose(*range(1, d.ndim), 0)
                for position in range(len(self.ops) - 1, -1, -1):
                    op = self.ops[position]
                    d = op.backward(chunk, d, need_dx or position > 0, grads, scratch)
                if need_dx:
                    target = dx[chunk.start:chunk.stop]
                    np.copyto(target.transpose(*range(1, target.ndim), 0), d)
            return grads

        if need_dx:
            dx = np.empty((self.batch,) + tuple(self.input_shape), np.float32)
        results = self._in_threads(run)
        total = results[0].arrays
        for other in results[1:]:
            for key, (param, value) in other.arrays.items():
                total[key][1] += value
        for op in self.ops:
            for p in op.params():
                p.grad = total[id(p)][1] if id(p) in total else None
        return dx

    def _in_threads(self, function):
        if self.threads == 1:
            return [function(0)]
        with blas.num_threads(1), _switch_interval(SWITCH_INTERVAL):
            return _run_parallel(function, list(range(self.threads)))


def _plan_for(model, x):
    if not (enabled and getattr(model, "fast_cpu", False)):
        return None
    if type(x) is not np.ndarray or x.dtype != np.float32 or x.ndim not in (2, 4) or x.shape[0] == 0:
        return None
    if emulation_enabled():
        return None
    plan = _plans.get(model)
    if plan is None:
        plan = _plans[model] = _Plan(model)
    if not plan.prepare(model, x):
        return None
    return plan


def forward(model, x):
    """The model's output for x by the plan, or None when the layers must run (and then they
    will also run the backward)."""
    plan = _plan_for(model, x)
    previous = _plans.get(model)
    if previous is not None:
        previous.active = False
    if plan is None:
        return None
    y = plan.forward(x)
    if not np.isfinite(y).all():
        return None  # let the layers recompute it: their NaN rules decide the gradients
    plan.active = True
    return y


def backward(model, dy, need_dx):
    """(True, dx or None) when the last forward ran by the plan, else (False, None)."""
    plan = _plans.get(model)
    if plan is None or not plan.active:
        return False, None
    return True, plan.backward(dy, need_dx)
