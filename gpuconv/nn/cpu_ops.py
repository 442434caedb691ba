"""The ops of the fast CPU path (gpuconv/nn/cpu_plan.py), one class per layer kind, on
batch-innermost arrays: spatial [C, H, W, n], dense [F, n]. Each op sets itself up from the per-image
input shape, then runs forward and backward on one thread's chunk of images, reusing that chunk's
buffers. See cpu_plan.py's docstring for why this layout and these fusions are fast.
"""
import functools
import math
import operator

import numpy as np

from ..ops._args import conv_output_size
from . import layers as L


DX_GROUP_BYTES = 512 * 1024  # a conv's input-gradient products go a group of rows at a time (_input_grad_by_rows)


class Unsupported(Exception):
    """A layer or configuration this plan does not run; the caller falls back to the layers."""


# ----------------------------------------------------------------------------------------------
# buffers


def buffer(store, key, shape, zero=False, dtype=np.float32):
    """A cached array for `key`, reallocated only when the shape changes. zero=True arrays are
    zeroed when (re)allocated: callers rely on parts they never write (padding) staying zero."""
    array = store.get(key)
    if array is None or array.shape != shape:
        array = np.zeros(shape, dtype) if zero else np.empty(shape, dtype)
        store[key] = array
    return array


def shared(store, name, shape):
    """A view of one flat buffer that every op of a thread shares (the columns: the largest
    array, used by one op at a time), grown to the largest shape asked for."""
    size = math.prod(shape)
    flat = store.get(name)
    if flat is None or flat.size < size:
        flat = store[name] = np.empty(size, np.float32)
    return flat[:size].reshape(shape)


def shared_view(store, name, shape):
    """shared(store, name, shape) as the same view object while that flat buffer stays (so views
    built over it are kept: kept_views). Its contents are whatever the last user left."""
    shared(store, name, shape)  # the thread's flat buffer, grown to this size
    return kept_views(store, (name, shape), lambda flat: flat[:math.prod(shape)].reshape(shape), store[name])


def root(array):
    """The array owning `array`'s memory (NumPy keeps a view's base pointing at the owner)."""
    return array if array.base is None else array.base


class GradientPool:
    """A thread's gradient buffers for the backward: an op takes its input gradient's buffer here
    and the chain that called it gives the buffer back once the op before has read it, so a chain
    keeps about two gradients at a time, not one per op (InceptionNet at batch 128 kept 77 MiB of
    per-op gradient buffers). Buffers are flat float32 arrays, lent as views of the shape asked
    for; one whose contents a deferred weight gradient still reads (`hold`) returns to the pool at
    `flush`. Each chunk's backward starts with every buffer free in the order they were made, so
    the same backward takes the same buffers every step, and views built over them are kept
    (kept_views)."""

    def __init__(self):
        self.flats, self.free, self.lent = [], [], {}
        self.held, self.pending = set(), []
        self.views = {}  # (id(flat), shape) -> the view lent: the same object step after step

    def start(self):
        """A chunk's backward begins: nothing is lent any more."""
        self.free, self.lent = list(self.flats), {}
        self.held.clear()
        self.pending.clear()

    def take(self, shape):
        """A float32 array of `shape` no other lent gradient uses (contents undefined)."""
        size = math.prod(shape)
        fits = [flat for flat in self.free if flat.size >= size]
        if fits:
            flat = min(fits, key=lambda flat: flat.size)  # the first of the smallest that fit
        else:
            if self.free:  # the largest free buffer is too small: it is replaced by one that fits
                self._drop(max(self.free, key=lambda flat: flat.size))
            flat = np.empty(size, np.float32)
            self.flats.append(flat)
            self.free.append(flat)
        self.free = [other for other in self.free if other is not flat]
        self.lent[id(flat)] = flat
        key = (id(flat), tuple(shape))
        view = self.views.get(key)
        if view is None:
            view = self.views[key] = flat[:size].reshape(shape)
        return view

    def _drop(self, flat):
        self.flats = [other for other in self.flats if other is not flat]
        self.free = [other for other in self.free if other is not flat]
        self.views = {key: view for key, view in self.views.items() if key[0] != id(flat)}

    def hold(self, array):
        """`array`'s buffer is read later (a deferred weight gradient): kept until flush(). None:
        every buffer lent now (a deferred computation that does not say what it reads)."""
        if array is None:
            self.held.update(self.lent)
        elif id(root(array)) in self.lent:
            self.held.add(id(root(array)))

    def give_back(self, array, *still_used):
        """`array`'s buffer is free again, unless it is not lent here or one of `still_used` (the
        gradient the caller goes on with) is in it."""
        owner = root(array)
        if id(owner) not in self.lent or any(root(other) is owner for other in still_used if other is not None):
            return
        del self.lent[id(owner)]
        (self.pending if id(owner) in self.held else self.free).append(owner)

    def flush(self):
        """The deferred weight gradients have run: what they held is free."""
        self.free += self.pending
        self.pending.clear()
        self.held.clear()


def gradients(scratch):
    """The thread's GradientPool, kept in its scratch."""
    pool = scratch.get("gradient pool")
    if pool is None:
        pool = scratch["gradient pool"] = GradientPool()
    return pool


def kept_views(store, key, make, *bases):
    """make(*bases), built once and kept in store[key] while the same base arrays come back.
    The buffers are reused step after step, and so are the views over them. Building one costs
    microseconds of Python, and Python between NumPy calls costs a two-thread step more than its
    own time (measured: docs/performance.md, "Figures from the code's comments")."""
    entry = store.get(key)
    if entry is None or not all(map(operator.is_, entry[0], bases)):
        entry = store[key] = (bases, make(*bases))
    return entry[1]


class Chunk:
    """The images [start, stop) that one thread runs; `store` keeps its buffers across steps,
    `saved` what this step's backward needs."""

    def __init__(self, start, stop):
        self.start, self.stop, self.n = start, stop, stop - start
        self.store, self.saved = {}, {}


def route_to_first_max(dy, targets, equal, remaining):
    """Max-pool backward: targets[i] = dy where tap i is its window's first maximum, else 0.
    `equal` gives, for every tap but the last, where it equals the window's maximum. Taps in
    order take `dy * equal` (all or nothing per window) and leave `dy - taken` in `remaining`;
    the last tap takes what is left, since some tap holds the maximum."""
    for index, flags in enumerate(equal):
        np.multiply(dy, flags, out=targets[index])
        dy = np.subtract(dy, targets[index], out=targets[-1] if index == len(targets) - 2 else remaining)
    if len(targets) == 1:
        np.copyto(targets[0], dy)


# ----------------------------------------------------------------------------------------------
# ops on batch-innermost arrays: spatial [C, H, W, n], dense [F, n]


class Op:
    needs_own_output = False  # does backward read this op's output? (then nothing may overwrite it)
    owns_dy = False  # is the output gradient a plan buffer that nothing reads after this backward? (else the caller's)
    # Does its forward or backward need sums over the whole batch (BatchNormTrainOp)? Then it has
    # forward_steps / backward_steps, generators that yield for them (see "Meetings" below).
    meets = False

    def setup(self, shape):
        """Per-image input shape -> per-image output shape; raises Unsupported."""
        raise NotImplementedError

    # (running_mean, running_var)-like arrays to read instead of the layer's own buffers() for one
    # forward (a recomputed one: cpu_plan._Plan.forward), or None
    override = None

    def params(self):
        return []

    def buffers(self):
        """(owner, attribute name) of each array the op reads besides its parameters."""
        return []

    def rename(self, prefix):
        """Key this op's buffers and saved arrays under `prefix` too (`index` is their key): an op
        inside a residual block must not share them with the plan's op of the same index."""
        self.index = (prefix, self.index)


class ConvOp(Op):
    """Conv2d (groups=1), optionally fused with a following [ReLU ->] MaxPool2d(k, stride k).

    Fused, the output positions are ordered pool-tap-major, (a, b, PH, PW) with output row
    oh = PH*k + a: every pooling tap is then one contiguous block, so pooling, routing the
    gradient to the maxima and the filter gradient all run on contiguous arrays, and positions
    no window covers are never computed. With dilation 1 the product needs no im2col
    (_row_matrices), and its shifted-row copy R is kept for dW; with dilation > 1 it builds
    the columns, in one buffer per thread, and rebuilds them in the backward.
    """

    passing = None  # which of the thread's two passing buffers holds the output (mark_passing_outputs), or None
    # Rebuild the row copy R in the backward from the input (kept by the op before) instead of
    # keeping it from the forward: set by the plan for plans that meet (cpu_plan._compile)
    recompute_rows = False

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
        # A 1x1 conv of stride 1 without padding or pooling reads its input in place: its R would be
        # a copy of x, which the previous op keeps anyway (InceptionNet's 1x1 convs kept 37 MiB of
        # copies at batch 128)
        self.pointwise = (self.kernel, self.stride, tuple(self.padding), self.pool) == ((1, 1), (1, 1), (0, 0), None)
        # Few filters make the per-row GEMMs too thin for OpenBLAS's kernels. Then one GEMM per
        # pooling row does all A*B taps of its windows with a banded weight (see _row_weight): it
        # reads R about A*B times less for (band area)/(KH*KW) times the FLOPs. It paid off below
        # 8 filters and stopped paying at 8 and above (the measured grid is in docs/performance.md,
        # "Figures from the code's comments"): hence the threshold.
        self.banded = self.row_path and self.pool is not None and self.filters < 8
        self.block = self.pool if self.banded else (1, 1)  # output rows, columns per GEMM row block
        self.band = tuple((r - 1) * s + k for r, s, k in zip(self.block, self.stride, self.kernel))
        if self.pool is None:
            self.positions, self.pooled_hw = self.out_hw, self.out_hw  # natural order (OH, OW)
            return (self.filters,) + self.out_hw
        self.pooled_hw = (self.out_hw[0] // self.pool[0], self.out_hw[1] // self.pool[1])
        if min(self.pooled_hw) < 1:
            raise Unsupported("empty pool output")
        self.positions = self.pool + self.pooled_hw  # tap-major (a, b, PH, PW)
        self.window_taps = self.pool[0] * self.pool[1]  # positions per pooling window
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

    def _row_matrices(self, x, store, key, n, views_key=None):
        """Convolution without im2col (dilation 1). R[b, ih, c, kw, pw, n] = x[c, ih, (B*pw + b)*S + kw, n]
        holds every input row shifted by each kw and thinned to pooling column b: KH times less
        than the columns. Ordered (kh, c, kw), the column rows of output row (a, PH) are then one
        contiguous block of R, rows R[(A*PH + a)*S : ... + KH], i.e. a plain matrix
        M[a, b, PH] [KH*C*KW, PW*n] inside R; neighbouring rows' matrices overlap in memory.
        Banded, R has one column group holding the band of (B-1)*S + KW shifts, and one block,
        rows R[A*PH*S : ... + (A-1)*S + KH], serves a whole pooling row. Returns the blocks as
        one view [A or 1, B or 1, PH, rows, PW*n]: one batched matmul does the conv. R lives in
        store[key]; the forward keeps it for the backward's dW (it is small)."""
        if self.pointwise:  # R would be x itself: read it in place, no copy kept
            return kept_views(store, (key, "pointwise views"), self._pointwise_matrices, x)
        b = self.pool[1] if self.pool else 1
        shape = (b // self.block[1], x.shape[1], self.channels, self.band[1], self.pooled_hw[1], n)
        # views_key given: `key` names one flat buffer of the thread's, shared by such convs (recompute_rows)
        rows = buffer(store, key, shape) if views_key is None else shared_view(store, key, shape)
        source, matrices = kept_views(store, views_key or (key, "views"), self._row_views, x, rows)
        np.copyto(rows, source)
        return matrices

    @staticmethod
    def _pointwise_matrices(x):
        """A 1x1 conv's row matrices [1, 1, H, C, W*n] as a view of x [C, H, W, n] (contiguous):
        output row h reads input row h of every channel, W*n values each, H*W*n apart."""
        c, h, w, n = x.shape
        return np.ndarray((1, 1, h, c, w * n), x.dtype, buffer=x, strides=(0, 0, x.strides[1], x.strides[0],
                                                                           x.itemsize))

    def _row_views(self, x, rows):
        """(the view of x that fills R, R's blocks as matrices) for _row_matrices."""
        (a, b), (ph, pw), (sh, sw) = self.pool or (1, 1), self.pooled_hw, self.stride
        sc, srow, scol, sn = x.strides
        source = np.ndarray(rows.shape, x.dtype, buffer=x, strides=(sw * scol, srow, sc, scol, b * sw * scol, sn))
        rb, rih, _, rkw, _, _ = rows.strides
        matrices = np.ndarray((a // self.block[0], rows.shape[0], ph, self.band[0] * self.channels * self.band[1],
                               pw * x.shape[3]), x.dtype, buffer=rows,
                              strides=(sh * rih, rb, a * sh * rih, rkw, rows.itemsize))
        return source, matrices

    def _row_weight(self, store):
        """W in the row order of _row_matrices: [F, KH*C*KW], or banded [F*A*B, band_h*C*band_w]
        where row (f, a, b) holds W[f] (as (kh, c, kw)) shifted by (a*SH, b*SW), zero elsewhere."""
        w = self.layer.weight.data.transpose(0, 2, 1, 3)
        if not self.banded:
            return w.reshape(self.filters, -1)  # a copy unless C == 1
        band = buffer(store, (self.index, "band"), (self.filters,) + self.pool + (self.band[0], self.channels,
                                                                                   self.band[1]), zero=True)
        taps, matrix = kept_views(store, (self.index, "band views"),
                                  lambda band: (self._taps_in_band(band), band.reshape(-1, band[0, 0, 0].size)), band)
        np.copyto(taps, w[:, None, None])
        return matrix

    def _taps_in_band(self, band, axes=(0, 1, 2, 3, 4, 5)):
        """The view taps[f, a, b, kh, c, kw] of a banded array whose axes are [F, A, B, band_h, C,
        band_w] in the order `axes`: tap (a, b)'s kernel sits a*SH rows and b*SW columns into the
        band, so a and b step that much further."""
        step = dict(zip(axes, band.strides))
        strides = (step[0], step[1] + self.stride[0] * step[3], step[2] + self.stride[1] * step[5],
                   step[3], step[4], step[5])
        shape = (self.filters,) + self.pool + (self.kernel[0], self.channels, self.kernel[1])
        return np.ndarray(shape, band.dtype, buffer=band, strides=strides)

    def _by_output_row(self, array, n):
        """[F, A, B, PH, PW, n] -> the view [A or 1, B or 1, PH, F or F*A*B, PW*n] that pairs with
        _row_matrices; banded, rows (f, a, b) are evenly spaced in the contiguous array."""
        (a, b), (ph, pw) = self.pool or (1, 1), self.pooled_hw
        view = array.reshape(self.filters, a, b, ph, pw * n).transpose(1, 2, 3, 0, 4)
        if not self.banded:
            return view
        _, sb, sph, _, sn = view.strides
        return np.ndarray((1, 1, ph, self.filters * a * b, pw * n), array.dtype, buffer=array,
                          strides=(0, 0, sph, sb, sn))

    def _keeps_rows(self):
        """Does the forward keep R for the backward?"""
        return self.row_path and not self.pointwise and not self.recompute_rows

    def _rebuilds_rows(self):
        """Does the backward rebuild R from the forward's input instead?"""
        return self.row_path and not self.pointwise and self.recompute_rows

    def _rows_for(self, x, chunk, scratch, n):
        """R of the padded input x: kept in the chunk's store, or, where the backward rebuilds it,
        in a buffer of the thread's that every conv with R of that shape shares."""
        if self._rebuilds_rows():
            return self._row_matrices(x, scratch, "shared rows", n, views_key=(self.index, "shared rows views"))
        return self._row_matrices(x, chunk.store, (self.index, "rows"), n)

    def _product(self, x, y, chunk, scratch, n):
        """y = W @ columns(x), y [F, *positions, n]; returns the row matrices (or None)."""
        if self.row_path:
            matrices = self._rows_for(x, chunk, scratch, n)
            by_row = kept_views(chunk.store, (self.index, "y by row"), lambda y: self._by_output_row(y, n), y)
            np.matmul(self._row_weight(chunk.store), matrices, out=by_row)
            return matrices
        weight = self.layer.weight.data.reshape(self.filters, -1)
        cols = self._columns(x, shared(scratch, "cols", (self.channels,) + self.kernel + self.positions + (n,)))
        np.matmul(weight, cols.reshape(self.rows, -1), out=y.reshape(self.filters, -1))
        return None

    def _weight_grad(self, x, matrices, dy, scratch, n):
        """dW = dy @ columns(x).T, in the weight's shape; dy [F, *positions, n]."""
        shape = self.layer.weight.data.shape
        if self.row_path:
            # M @ dy.T per output row or pooling row: OpenBLAS runs this orientation faster
            dy_t = kept_views(scratch, (self.index, "dy by row"),
                              lambda dy: self._by_output_row(dy, n).transpose(0, 1, 2, 4, 3), dy)
            partial = buffer(scratch, (self.index, "partial"), matrices.shape[:-1] + dy_t.shape[-1:])
            np.matmul(matrices, dy_t, out=partial)
            # Sum the row products first, over partial's contiguous leading axes, then pick the taps
            # out of that one small matrix: NumPy's reduce over the strided taps of every row was
            # an order of magnitude slower (unbanded, the same sums in the same order; banded, the
            # pooling rows are now summed before the taps).
            summed = buffer(scratch, (self.index, "summed"), partial.shape[-2:])
            np.add.reduce(partial.reshape((-1,) + summed.shape), axis=0, out=summed)
            taps = kept_views(scratch, (self.index, "summed taps"), self._taps_of_sum, summed)
            return np.add.reduce(taps, axis=(0, 1), out=np.empty(shape, summed.dtype))  # C order, like W
        cols = self._columns(x, shared(scratch, "cols", (self.channels,) + self.kernel + self.positions + (n,)))
        return np.matmul(dy.reshape(self.filters, -1), cols.reshape(self.rows, -1).T).reshape(shape)

    def _taps_of_sum(self, summed):
        """The summed row products of _weight_grad as [A, B, F, C, KH, KW]: summed over the first two
        axes (the pooling taps, banded; size 1 otherwise), dW."""
        f, c, kh, kw = self.layer.weight.data.shape
        if not self.banded:  # [KH*C*KW, F]
            return summed.reshape(kh, c, kw, f).transpose(3, 1, 0, 2)[None, None]
        # banded: [band rows, F*A*B]; tap (a, b) sits (a*SH, b*SW) into the band
        (band_h, band_w) = self.band
        band = summed.reshape((band_h, c, band_w, f) + self.pool)
        t = self._taps_in_band(band, axes=(3, 4, 5, 0, 1, 2)).strides
        return np.ndarray(self.pool + (f, c, kh, kw), summed.dtype, buffer=band,
                          strides=(t[1], t[2], t[0], t[4], t[3], t[5]))

    def _by_tap(self, y):
        """The fused conv output [F, A, B, PH, PW, n] as [F, A*B, PH, PW, n]: one block per tap."""
        return y.reshape((self.filters, self.window_taps) + self.pooled_hw + y.shape[-1:])

    def _padded(self, chunk, x, scratch=None):
        """x [C, H, W, n] as the contiguous, zero-padded input the products read. With `scratch`
        (a forward), a conv that keeps its row copy R (row_path, not pointwise) pads into one
        buffer of the thread's that every such conv shares, its borders zeroed each time: its
        backward reads R, never the padded input again (InceptionNet's 3x3 convs kept 17.5 MiB of
        padded copies at batch 128, ResNet-20's inference plan one per conv)."""
        (ph, pw), (h, w) = self.padding, self.in_hw
        if ph or pw or not x.flags.c_contiguous:
            shape = (self.channels, h + 2 * ph, w + 2 * pw, chunk.n)
            if scratch is not None and self.row_path and not self.pointwise:
                padded = shared_view(scratch, "padded", shape)
                for border in ((slice(None), slice(0, ph)), (slice(None), slice(ph + h, None)),
                               (slice(None), slice(ph, ph + h), slice(0, pw)),
                               (slice(None), slice(ph, ph + h), slice(pw + w, None))):
                    padded[border] = 0
            else:
                padded = buffer(chunk.store, (self.index, "x"), shape, zero=True)
            padded[:, ph:ph + h, pw:pw + w, :] = x
            x = padded
        return x

    def restore(self, chunk, x):
        """What a forward (without pooling) saves for the backward, without computing its output:
        for a backward on its own (conv2d_backward on the CPU, gpuconv/ops/conv_cpu.py)."""
        x = self._padded(chunk, x)
        matrices = self._row_matrices(x, chunk.store, (self.index, "rows"), chunk.n) if self.row_path else None
        chunk.saved[self.index] = dict(source=x, y=None, matrices=matrices)

    def forward(self, chunk, x, scratch):
        n, key, f = chunk.n, self.index, self.filters
        given = x
        x = self._padded(chunk, x, scratch)
        shape = (f,) + self.positions + (n,)
        if self.passing is None:
            y = buffer(chunk.store, (key, "y"), shape)
        else:  # read by the forward alone (mark_passing_outputs)
            y = shared_view(scratch, ("passing", self.passing), shape)
        matrices = self._product(x, y, chunk, scratch, n)
        chunk.saved[key] = dict(source=x, y=y, matrices=matrices)
        if self._rebuilds_rows():
            chunk.saved[key].update(given=given, matrices=None)  # R is rebuilt from `given`
        bias = self.layer.bias.data.reshape(-1, 1, 1, 1) if self.layer.bias is not None else None
        if self.pool is None:
            if bias is not None:
                y += bias
            return y
        taps = self._by_tap(y)
        peak = buffer(chunk.store, (key, "peak"), (f,) + self.pooled_hw + (n,))
        np.maximum.reduce(taps, axis=1, out=peak)  # propagates NaN, like the reference
        chunk.saved[key].update(peak=peak)
        if self.layer.training and self.window_taps > 1:
            self._equal_taps(chunk, chunk.saved[key])  # now, while y is still in the caches
        if self.window_taps > 1 and "equal" not in chunk.saved[key]:
            out = buffer(chunk.store, (key, "out"), peak.shape)  # a backward may want the maxima for its flags
        else:
            out = peak  # nothing reads the maxima again: one array fewer in the caches
        if bias is not None:
            np.add(peak, bias, out=out)
        elif out is not peak:
            np.copyto(out, peak)
        if self.relu:  # the mask is kept for the backward
            mask = np.greater(out, 0, out=buffer(chunk.store, (key, "mask"), out.shape, dtype=bool))
            np.multiply(out, mask, out=out)
            chunk.saved[key]["mask"] = mask
        return out

    def backward(self, chunk, dy, need_dx, grads, scratch):
        saved = chunk.saved[self.index]
        n, key, layer, f = chunk.n, self.index, self.layer, self.filters
        if self.pool is not None:
            # Each pooled gradient goes to its window's first maximum (and nowhere where the
            # ReLU was off), routed on the 4x smaller pooled arrays with few calls (the GIL).
            if self.relu:  # in place where the gradient is the plan's own: one buffer fewer
                dmask = dy if self.owns_dy and dy.flags.c_contiguous else buffer(scratch, (key, "dmask"), dy.shape)
                dy = np.multiply(dy, saved["mask"], out=dmask)
            if layer.bias is not None:  # every window's gradient lands on exactly one tap
                grads.add(layer.bias, np.add.reduce(dy.reshape(f, -1), axis=1))
            equal = self._equal_taps(chunk, saved) if self.window_taps > 1 else None
            # The routed gradient overwrites y, which nothing reads after `equal`: one array of
            # y's size less in the caches, which made a step measurably faster.
            dfull = saved["y"]
            targets, flags = kept_views(chunk.store, (key, "route views"), lambda dfull, equal: (
                [self._by_tap(dfull)[:, tap] for tap in range(self.window_taps)],
                [] if equal is None else [equal[:, tap] for tap in range(self.window_taps - 1)]), dfull, equal)
            # what the taps leave goes into dmask (nothing reads it after), else into a buffer of its own
            remaining = dy if self.relu else buffer(scratch, (key, "remaining"), dy.shape)
            route_to_first_max(dy, targets, flags, remaining)
            dy = dfull
        elif layer.bias is not None:
            grads.add(layer.bias, np.add.reduce(dy, axis=(1, 2, 3)))
        if saved["matrices"] is None and "given" in saved:  # rebuild R (recompute_rows), then use it at once
            source = self._padded(chunk, saved["given"], scratch)
            grads.add(layer.weight, self._weight_grad(source, self._rows_for(source, chunk, scratch, n), dy, scratch,
                                                      n))
        else:
            grads.add_later(layer.weight, lambda: self._weight_grad(saved["source"], saved["matrices"], dy, scratch,
                                                                    n), reads=dy)
        if not need_dx:
            return None
        dx = gradients(scratch).take(saved["source"].shape)
        if self.row_path and self.stride[0] == 1:
            self._input_grad_by_rows(dy, dx, scratch, n)
        else:
            dx.fill(0)
            self._input_grad_by_columns(dy, dx, scratch, n)
        (ph, pw), (h, w) = self.padding, self.in_hw
        return dx[:, ph:ph + h, pw:pw + w, :]

    def _equal_taps(self, chunk, saved):
        """Which pooling taps (all but the last) equal their window's maximum, bool
        [F, taps - 1, PH, PW, n]; computed once per forward (by the forward in training mode,
        else by the first backward, before it overwrites y) and kept for further backwards."""
        if "equal" not in saved:
            y, peak = saved["y"], saved["peak"]
            flags = buffer(chunk.store, (self.index, "equal"), (self.filters, self.window_taps - 1) +
                           peak.shape[1:], dtype=bool)
            first_taps, peaks = kept_views(chunk.store, (self.index, "equal views"),
                                           lambda y, peak: (self._by_tap(y)[:, :-1], peak[:, None]), y, peak)
            saved["equal"] = np.equal(first_taps, peaks, out=flags)
        return saved["equal"]

    def _natural(self, dy, target, scratch):
        """Write dy (this op's output gradient, [F, *positions, n]) into `target` [OH, F, OW, n]
        in natural position order; positions no pooling window covers are left alone (zero)."""
        windows, source = kept_views(scratch, (self.index, "natural views"), self._natural_views, dy, target)
        np.copyto(windows, source)

    def _natural_views(self, dy, target):
        f, n = self.filters, dy.shape[-1]
        if self.pool is None:
            return target, dy.transpose(1, 0, 2, 3)
        (a, b), (qh, qw) = self.pool, self.pooled_hw
        return (target[:qh * a, :, :qw * b].reshape(qh, a, f, qw, b, n),
                dy.reshape(f, a, b, qh, qw, n).transpose(3, 1, 0, 4, 2, 5))

    def _input_grad_by_rows(self, dy, dx, scratch, n):
        """dx = conv_transpose(dy) for stride 1 along H, dilation 1, without col2im. Along H it
        is the row trick again: with dy as [OH, F, OW*n], input row ih meets output rows
        ih-KH+1 .. ih, one contiguous block of dy, neighbours overlapping: ih gets
        Wt[C*KW, KH*F] @ that block (fewer rows at the edges). That leaves [Hp, C, KW, OW, n], to
        sum over kw into dx (col2im would add KH*KW times more)."""
        f, c, (kh, kw), (oh, ow) = self.filters, self.channels, self.kernel, self.out_hw
        hp, wp, sw = dx.shape[1], dx.shape[2], self.stride[1]
        # dy in natural order, in a buffer every conv of the thread shares (30 MiB of InceptionNet's
        # plan at batch 128 when each had its own): positions no pooling window covers get 0
        rows = shared_view(scratch, "dy_rows", (oh, f, ow * n))
        if self.pool is not None:
            covered = (self.pooled_hw[0] * self.pool[0], self.pooled_hw[1] * self.pool[1])
            rows[covered[0]:] = 0
            rows.reshape(oh, f, ow, n)[:covered[0], :, covered[1]:] = 0
        # Wt[(c, kw), (j, f)] = W[f, c, KH-1-j, kw]: block j of input row ih's rows is output row
        # ih + j - (KH-1), which meets kernel row KH-1-j
        weight = buffer(scratch, (self.index, "dx_weight"), (c * kw, kh * f))
        np.copyto(weight.reshape(c, kw, kh, f), self.layer.weight.data[:, :, ::-1, :].transpose(1, 3, 2, 0))
        # With stride 1, each product row (c, kw) is written into a row of Wp*n floats whose last
        # (KW-1)*n stay zero. Read back with the row stride shortened by n, row (c, kw) then appears
        # shifted right by kw columns, so the sum over kw is one reduce over [KW, C, Hp, Wp*n] that
        # writes dx, in less than half the time of KW slice-adds into a zeroed dx.
        # The products take KW times dx's memory, so they go a group of input rows at a time
        # through one buffer of about DX_GROUP_BYTES, which the reduce reads back while it is
        # still in the core's cache (an L2 of about that size).
        width = (wp if sw == 1 else ow) * n
        group = hp if sw != 1 else max(1, min(hp, DX_GROUP_BYTES // (c * kw * width * dx.itemsize)))
        out = shared_view(scratch, "dx_rows", (group, c * kw, width))
        out[:, :, ow * n:] = 0  # the (KW-1)*n values past each product row: see above
        dy_rows, groups = kept_views(scratch, (self.index, "dx views"), self._row_products, rows, weight, out, dx)
        self._natural(dy, dy_rows, scratch)
        for products, shifted, target in groups:
            for weights, blocks, by_row in products:
                np.matmul(weights, blocks, out=by_row)
            if shifted is not None:
                np.add.reduce(shifted, axis=0, out=target)  # kw first: faster than reducing axis 2
        if sw == 1:
            return
        dx.fill(0)
        by_row = out.reshape(hp, c, kw, ow, n).transpose(1, 0, 2, 3, 4)
        for j in range(kw):
            dx[:, :, j:j + (ow - 1) * sw + 1:sw, :] += by_row[:, :, j]

    def _row_products(self, rows, weight, out, dx):
        """For _input_grad_by_rows: `rows` as [OH, F, OW, n], and per group of
        `len(out)` input rows the products as (weights, blocks, by_row) operand triples into `out`,
        with, for stride 1, the shifted view of `out` whose sum over kw is those rows of dx (and
        the rows of dx as its target)."""
        f, (kh, kw), (oh, ow) = self.filters, self.kernel, self.out_hw
        hp, n, size = dx.shape[1], dx.shape[3], len(out)
        by_row = out[:, :, :ow * n]
        r0, r1, r2 = rows.strides  # blocks[ih - (KH-1)]: output rows ih-KH+1 .. ih, for inner rows ih
        blocks = np.ndarray((max(0, oh - kh + 1), kh * f, ow * n), rows.dtype, buffer=rows, strides=(r0, r1, r2))
        c, wp, (p0, p1, _) = self.channels, dx.shape[2], out.strides
        groups = []
        for start in range(0, hp, size):
            stop = min(hp, start + size)
            # Rows KH-1 .. OH-1 meet all KH output rows: one batched product. The 2(KH-1) edge rows
            # meet fewer (zero rows around dy to give them full blocks was slower: more products).
            inner = range(max(kh - 1, start), min(oh, stop))
            products = [(weight, blocks[inner.start - (kh - 1):inner.stop - (kh - 1)],
                         by_row[inner.start - start:inner.stop - start])] if len(inner) else []
            for ih in (ih for ih in range(start, stop) if ih not in inner):
                first, last = max(0, kh - 1 - ih), min(kh - 1, oh + kh - 2 - ih)
                products.append((weight[:, first * f:(last + 1) * f],
                                 rows[ih + first - (kh - 1):ih + last - (kh - 2)].reshape(-1, ow * n),
                                 by_row[ih - start]))
            shifted = target = None
            if self.stride[1] == 1:
                shifted = np.ndarray((kw, c, stop - start, wp * n), dx.dtype, buffer=out,
                                     strides=(p1 - n * dx.itemsize, kw * p1, p0, dx.itemsize))
                target = dx.reshape(c, hp, wp * n)[:, start:stop]
            groups.append((products, shifted, target))
        return rows.reshape(oh, f, ow, n), groups

    def _input_grad_by_columns(self, dy, dx, scratch, n):
        """dx += col2im(W.T @ dy): any stride and dilation."""
        f, c, (kh, kw) = self.filters, self.channels, self.kernel
        (oh, ow), (sh, sw), (dh, dw) = self.out_hw, self.stride, self.dilation
        if self.pool is not None:  # back to natural (OH, OW) order; rows no window covers get 0
            natural = buffer(scratch, (self.index, "natural"), (oh, f, ow, n), zero=True)
            self._natural(dy, natural, scratch)
            dy = natural.transpose(1, 0, 2, 3)
        dcols = shared(scratch, "cols", (c, kh, kw, oh, ow, n))
        np.matmul(self.layer.weight.data.reshape(f, -1).T, dy.reshape(f, -1), out=dcols.reshape(self.rows, -1))
        for i in range(kh):
            for j in range(kw):
                dx[:, i * dh:i * dh + (oh - 1) * sh + 1:sh, j * dw:j * dw + (ow - 1) * sw + 1:sw, :] += dcols[:, i, j]


class PoolOp(Op):
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
        y = buffer(chunk.store, (self.index, "y"), (x.shape[0],) + self.out_hw + (chunk.n,))
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
        dx = gradients(scratch).take(x.shape)
        (kh, kw), (oh, ow) = self.kernel, self.out_hw
        dx[:, oh * kh:] = 0  # rows and columns past the last window
        dx[:, :, ow * kw:] = 0
        targets = self._taps(dx)
        if self.mode == "avg":
            share = np.divide(dy, dy.dtype.type(self.kernel[0] * self.kernel[1]))
            for target in targets:
                np.copyto(target, share)
            return dx
        route_to_first_max(dy, targets, (tap == y for tap in self._taps(x)[:-1]),
                           buffer(scratch, (self.index, "remaining"), dy.shape))
        return dx


class BatchNormEvalOp(Op):
    """BatchNorm2d in eval mode with running statistics: a per-channel affine map,
    y = (x - running_mean) * scale + bias with scale = weight / sqrt(running_var + eps), computed as
    gpuconv/ops/norm.py's eval path does (so the forward is the same float32 arithmetic); the
    backward treats the statistics as constants, as that path does: dx = dy * scale,
    dweight = sum(dy * (x - mean)) * invstd, dbias = sum(dy). (Training mode: BatchNormTrainOp.)"""

    def __init__(self, layer, index):
        self.layer, self.index = layer, index

    def setup(self, shape):
        if len(shape) != 3 or shape[0] != self.layer.num_features:
            raise Unsupported("batch norm channels")
        return shape

    def params(self):
        layer = self.layer
        return [layer.weight, layer.bias] if layer.weight is not None else []

    def buffers(self):
        """The arrays besides the parameters it reads: worker processes get them too."""
        return [(self.layer, "running_mean"), (self.layer, "running_var")]

    def forward(self, chunk, x, scratch):
        layer = self.layer
        running_mean, running_var = self.override or (layer.running_mean, layer.running_var)
        # the eval path's order: invstd in x's dtype, then scale = invstd * weight
        invstd = 1 / np.sqrt(running_var.astype(np.float32) + np.float32(layer.eps))
        mean = running_mean.astype(np.float32)
        y = buffer(chunk.store, (self.index, "y"), x.shape)
        np.subtract(x, mean[:, None, None, None], out=y)
        chunk.saved[self.index] = (x, mean, invstd, _scale_and_shift(y, layer, invstd))
        return y

    def backward(self, chunk, dy, need_dx, grads, scratch):
        x, mean, invstd, scale = chunk.saved[self.index]
        layer = self.layer
        if layer.weight is not None:
            # the thread's one buffer for every batch norm's backward, as BatchNormTrainOp's: one
            # op's backward uses it at a time (it held one the size of its input per op: 96 MiB for
            # ResNet-20 at batch 128)
            centred = shared_view(scratch, "centred", x.shape)
            np.subtract(x, mean[:, None, None, None], out=centred)
            centred *= dy
            grads.add(layer.weight, np.add.reduce(centred, axis=(1, 2, 3)) * invstd)
            grads.add(layer.bias, np.add.reduce(dy, axis=(1, 2, 3)))
        if not need_dx:
            return None
        dx = gradients(scratch).take(dy.shape)
        np.multiply(dy, scale[:, None, None, None], out=dx)
        return dx


class BatchNormTrainOp(Op):
    """BatchNorm2d on the batch's statistics (training mode, or no running statistics), PyTorch's
    semantics as gpuconv/ops/norm.py computes them: the mean over (N, H, W) per channel first, then
    the biased variance of the centred values; y = (x - mean) * invstd * weight + bias. The backward
    differentiates through the statistics: dx = scale * (dy - mean(dy) - xhat * mean(dy * xhat)).

    The plan splits the batch over its parts, so the sums behind these run in two steps: each part
    sums its own images, yields the sums to the plan, and goes on with the whole batch's (a
    meeting, see "Meetings" below): the mean, then the centred squares in the forward, sum(dy) and
    sum(dy * (x - mean)) in the backward. The running statistics are the plan's to update, once
    per forward, after every part has finished (cpu_plan._Plan.update_running_stats)."""

    meets = True

    def __init__(self, layer, index):
        self.layer, self.index = layer, index
        self.batch_mean = self.batch_var = None  # of the last forward (meet), for the running statistics

    def setup(self, shape):
        if len(shape) != 3 or shape[0] != self.layer.num_features:
            raise Unsupported("batch norm channels")
        self.shape = tuple(shape)
        return shape

    def params(self):
        layer = self.layer
        return [layer.weight, layer.bias] if layer.weight is not None else []

    def forward(self, chunk, x, scratch):
        return finish(self.forward_steps(chunk, x, scratch))

    def backward(self, chunk, dy, need_dx, grads, scratch):
        return finish(self.backward_steps(chunk, dy, need_dx, grads, scratch))

    def forward_steps(self, chunk, x, scratch):
        layer, c = self.layer, x.shape[0]
        count = x.size // c  # values per channel in this part
        mean = yield (self, "sum", np.add.reduce(x.reshape(c, -1), axis=1), count)
        y = buffer(chunk.store, (self.index, "y"), x.shape)
        np.subtract(x, mean[:, None, None, None], out=y)  # centred; scaled in place below
        var = yield (self, "squares", _row_dots(y, y), count)
        invstd = 1 / np.sqrt(var + np.float32(layer.eps))
        chunk.saved[self.index] = (x, mean, invstd, _scale_and_shift(y, layer, invstd))
        return y

    def backward_steps(self, chunk, dy, need_dx, grads, scratch):
        x, mean, invstd, scale = chunk.saved[self.index]
        layer, c = self.layer, x.shape[0]
        # one buffer of the thread's for every such op: one op's backward uses it at a time (a
        # meeting suspends this thread's chunk, and no other chunk of the thread runs meanwhile)
        centred = shared_view(scratch, "centred", x.shape)
        np.subtract(x, mean[:, None, None, None], out=centred)
        sums = np.stack([np.add.reduce(dy.reshape(c, -1), axis=1), _row_dots(dy, centred)])  # this part's
        if layer.weight is not None:
            grads.add(layer.weight, sums[1] * invstd)  # sum(dy * xhat); the plan adds the parts'
            grads.add(layer.bias, sums[0].copy())
        if not need_dx:
            return None
        dbias, dcentred, count = yield (self, "gradient sums", sums, x.size // c)
        dx = gradients(scratch).take(dy.shape)
        np.multiply(dy, scale[:, None, None, None], out=dx)
        centred *= (-scale * invstd * invstd * dcentred / count)[:, None, None, None]
        dx += centred
        dx += (-scale * dbias / count)[:, None, None, None]
        return dx

    def meet(self, what, sums, counts):
        """The whole batch's figures from each part's `sums` over its `counts` values per channel
        (in part order: the same bits every time) -> what every part goes on with."""
        total = sums[0].copy()
        for other in sums[1:]:
            total += other
        count = np.float32(sum(counts))
        if what == "sum":
            self.batch_mean = total / count
            return self.batch_mean
        if what == "squares":
            self.batch_var = total / count
            return self.batch_var
        return total[0], total[1], count  # "gradient sums": sum dy, sum dy * (x - mean)


def _scale_and_shift(y, layer, invstd):
    """The centred y [C, ...] times invstd * weight plus bias per channel, in place -> the scale
    invstd * weight. The eager path's order: invstd in y's dtype, then the scale."""
    scale = invstd if layer.weight is None else invstd * layer.weight.data
    y *= scale[:, None, None, None]
    if layer.bias is not None:
        y += layer.bias.data[:, None, None, None]
    return scale


def _row_dots(a, b):
    """Per channel of two [C, ...] arrays, the sum of a * b: one dot product per channel."""
    c = a.shape[0]
    return np.matmul(a.reshape(c, 1, -1), b.reshape(c, -1, 1)).reshape(c)


class GlobalAvgPoolOp(Op):
    """AdaptiveAvgPool2d(1), the global average pool: each channel's map -> its mean,
    [C, H, W, n] -> [C, 1, 1, n]. The reference takes NumPy's mean over (H, W) too; only the order
    of the float32 sum differs (float32 rounding)."""

    def __init__(self, index):
        self.index = index

    def setup(self, shape):
        if len(shape) != 3:
            raise Unsupported("spatial op on a flat input")
        c, h, w = shape
        self.in_hw = (h, w)
        return (c, 1, 1)

    def forward(self, chunk, x, scratch):
        y = buffer(chunk.store, (self.index, "y"), (x.shape[0], 1, 1, chunk.n))
        np.mean(x, axis=(1, 2), keepdims=True, out=y)
        return y

    def backward(self, chunk, dy, need_dx, grads, scratch):
        if not need_dx:
            return None
        dx = gradients(scratch).take((dy.shape[0],) + self.in_hw + (chunk.n,))
        h, w = self.in_hw
        np.divide(dy, dy.dtype.type(h * w), out=dx)  # each pixel's share, broadcast over the map, as the reference
        return dx


class ActivationOp(Op):
    def __init__(self, layer, index, in_place):
        self.layer, self.index, self.in_place = layer, index, in_place
        self.kind = {L.ReLU: "relu", L.Tanh: "tanh", L.Sigmoid: "sigmoid"}[type(layer)]
        self.needs_own_output = True

    def setup(self, shape):
        return shape

    def forward(self, chunk, x, scratch):
        y = x if self.in_place else buffer(chunk.store, (self.index, "y"), x.shape)
        if self.kind == "relu":  # the mask is kept: the backward is then one multiply
            mask = np.greater(x, 0, out=buffer(chunk.store, (self.index, "mask"), x.shape, dtype=bool))
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
        if self.kind == "relu":  # y is the mask x > 0
            # into dy itself when it is a plan buffer nothing reads again: one gradient buffer
            # fewer per ReLU kept in the thread's scratch (30 of InceptionNet's 331 MiB)
            return np.multiply(dy, y, out=dy if self.owns_dy else gradients(scratch).take(y.shape))
        dx = gradients(scratch).take(y.shape)
        if self.kind == "tanh":
            np.multiply(y, y, out=dx)
            np.subtract(1, dx, out=dx)
        else:
            np.subtract(1, y, out=dx)
            dx *= y
        dx *= dy
        return dx


class FlattenOp(Op):
    def __init__(self, index):
        self.index = index

    def setup(self, shape):
        self.shape = shape
        return (int(np.prod(shape)),)

    def forward(self, chunk, x, scratch):
        return np.ascontiguousarray(x).reshape(-1, chunk.n)

    def backward(self, chunk, dy, need_dx, grads, scratch):
        return dy.reshape(self.shape + (chunk.n,))


class IdentityOp(Op):
    def __init__(self, index):
        self.index = index

    def setup(self, shape):
        return shape

    def forward(self, chunk, x, scratch):
        return x

    def backward(self, chunk, dy, need_dx, grads, scratch):
        return dy


class LinearOp(Op):
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
        y = buffer(chunk.store, (self.index, "y"), (weight.shape[0], chunk.n))
        np.matmul(weight, x, out=y)
        if self.layer.bias is not None:
            y += self.layer.bias.data[:, None]
        chunk.saved[self.index] = x
        return y

    def backward(self, chunk, dy, need_dx, grads, scratch):
        x, layer = chunk.saved[self.index], self.layer
        # deferred in every thread: see "Threads" in cpu_plan.py
        grads.add_later(layer.weight, lambda: np.matmul(dy, x.T), always=True, reads=dy)
        if layer.bias is not None:
            grads.add_later(layer.bias, lambda: np.add.reduce(dy, axis=1), always=True, reads=dy)
        if not need_dx:
            return None
        dx = gradients(scratch).take(x.shape)
        np.matmul(layer.weight.data.T, dy, out=dx)
        return dx


# ----------------------------------------------------------------------------------------------
# chains of ops, and a residual block: two chains whose outputs are added


SPATIAL_OPS = (ConvOp, PoolOp, GlobalAvgPoolOp, BatchNormEvalOp, BatchNormTrainOp)


def setup_chain(ops, shape, copied_at_end=False):
    """Set each op up for the output shape of the one before -> the chain's per-image output shape.
    `copied_at_end`: the chain's output is copied away before anything else runs (a Concat's
    branch, the plan's output). Raises Unsupported."""
    for op in ops:
        if isinstance(op, SPATIAL_OPS) and len(shape) != 3:
            raise Unsupported("spatial op on a flat input")
        shape = tuple(op.setup(shape))
    mark_passing_outputs(ops, copied_at_end)
    return shape


def mark_passing_outputs(ops, copied_at_end):
    """Give a conv's output a buffer of the thread's (ConvOp.passing) where only the forward reads
    it: a conv without pooling whose output, through in-place ReLUs (which keep masks, not their
    input), goes into a conv that copies it into its own row copy R (row path, not pointwise: its
    backward reads R alone), or is the chain's output copied away. Neither the conv's nor the
    ReLUs' backward reads it. Such outputs alternate between two buffers (a conv reading one
    writes the other). Every conv of InceptionNet but its pooled stem passes its output so: 30 MiB
    of outputs fewer at batch 128."""
    slot = 0
    for position, op in enumerate(ops):
        if not isinstance(op, ConvOp):
            continue
        op.passing = None
        after = position + 1
        while after < len(ops) and isinstance(ops[after], ActivationOp) and ops[after].kind == "relu" \
                and ops[after].in_place:
            after += 1
        reader = ops[after] if after < len(ops) else None
        if op.pool is None and ((reader is None and copied_at_end) or (
                isinstance(reader, ConvOp) and reader._keeps_rows())):
            op.passing, slot = slot, 1 - slot


def mark_owned_gradients(ops, owned):
    """Set each op's owns_dy, last op first: the last one's is `owned` (is the gradient it gets a
    plan buffer nothing reads after it?); every op but Flatten and Identity returns a gradient
    buffer of its own, which the op before it then owns."""
    for op in reversed(ops):
        op.owns_dy = owned
        owned = owned or not isinstance(op, (FlattenOp, IdentityOp))


class BranchingOp(Op):
    """An op made of chains of ops (ResidualOp, ConcatOp): what the plan asks of every op, gathered
    from the chains'. Their ops keep their keys apart by their `index`, renamed under this op's
    and their chain's name (`rename`)."""

    def chains(self):
        """(name, chain of ops) of each chain, in the order they run in the forward."""
        raise NotImplementedError

    def ops(self):
        return [op for _, chain in self.chains() for op in chain]

    def rename(self, prefix):
        super().rename(prefix)
        self._rename_chains(prefix)

    def _rename_chains(self, prefix):
        for name, chain in self.chains():
            for op in chain:
                op.rename((prefix, name))

    def params(self):
        return [p for op in self.ops() for p in op.params()]

    def buffers(self):
        return [entry for op in self.ops() for entry in op.buffers()]

    @property
    def override(self):
        """The arrays its ops read instead of their layers' buffers, when one is set (see Op)."""
        ops = self.ops()
        if all(op.override is None for op in ops):
            return None
        return tuple(array for op in ops for array in
                     (op.override or [getattr(owner, name) for owner, name in op.buffers()]))

    @override.setter
    def override(self, arrays):
        at = 0
        for op in self.ops():
            count = len(op.buffers())
            if count:
                op.override = None if arrays is None else tuple(arrays[at:at + count])
                at += count

    @functools.cached_property
    def meets(self):  # asked for every op of every chunk's forward and backward; the chains never change
        return any(op.meets for op in self.ops())

    def forward(self, chunk, x, scratch):
        return finish(self.forward_steps(chunk, x, scratch))

    def backward(self, chunk, dy, need_dx, grads, scratch):
        return finish(self.backward_steps(chunk, dy, need_dx, grads, scratch))


# ----------------------------------------------------------------------------------------------
# Meetings: sums over the whole batch in the middle of a forward or backward
#
# A BatchNorm that trains needs each channel's mean and variance over the whole batch, which the
# plan splits over its parts. Its forward_steps and backward_steps are generators: they yield
# (op, what, this part's sums) and get the whole batch's figures back (op.meet). The chains and
# the branching ops pass the yields up (`yield from`), so a yield keeps its place inside residual
# blocks and branches; the plan runs every part up to the same yield, meets, and sends the reply
# to each (cpu_plan._Plan._in_rounds). Ops that never meet run as plain calls.


def finish(steps):
    """Run forward_steps / backward_steps to the end where no meeting can come (a plan without a
    BatchNorm that trains) -> its result."""
    try:
        request = next(steps)
    except StopIteration as done:
        return done.value
    steps.close()
    raise RuntimeError(f"{type(request[0]).__name__} needs sums over the whole batch: it runs in the plan's rounds")


def forward_chain_steps(chain, chunk, h, scratch):
    """The forward of a chain of ops, as a generator that passes its ops' meetings up."""
    for op in chain:
        if op.meets:
            h = yield from op.forward_steps(chunk, h, scratch)
        else:
            h = op.forward(chunk, h, scratch)
    return h


def backward_chain_steps(chain, chunk, dy, need_dx, grads, scratch):
    """The backward of a chain of ops, last op first -> the chain's input gradient, as a generator
    that passes its ops' meetings up. Each gradient an op of the chain made goes back to the
    thread's pool once the op before has read it (dy, the caller's, stays)."""
    pool, d = gradients(scratch), dy
    for position in range(len(chain) - 1, -1, -1):
        op, wanted = chain[position], need_dx or position > 0
        if op.meets:
            new = yield from op.backward_steps(chunk, d, wanted, grads, scratch)
        else:
            new = op.backward(chunk, d, wanted, grads, scratch)
        if root(d) is not root(dy):
            pool.give_back(d, new)
        d = new
    return d


def backward_chain(chain, chunk, dy, need_dx, grads, scratch):
    """backward_chain_steps run to the end (no meetings)."""
    return finish(backward_chain_steps(chain, chunk, dy, need_dx, grads, scratch))


def owns_output(op):
    """Whether an op's output is a buffer of its own that its backward does not read (the next op
    may then write into it: an add, an activation in place)."""
    return isinstance(op, (BatchNormEvalOp, BatchNormTrainOp, LinearOp, ConcatOp)) or (isinstance(op, ConvOp) and op.pool is None)


class ResidualOp(BranchingOp):
    """A residual block, post(body(x) + shortcut(x)): three chains of ops (shortcut empty for the
    identity, post empty for nothing after the add, else e.g. a ReLU), lowered from a block's
    layers as cpu_plan.RESIDUALS lists them.

    Forward: the body, then the shortcut, both from x (neither writes into x); the sum goes into the
    body's last output when nothing reads that again (a batch norm's or a conv's own buffer), else
    into a buffer of its own, and post runs in place on it. Backward: post, then the body and the
    shortcut from the same gradient, which neither may overwrite (their last op does not own it);
    dx is their sum, as the reference adds x's two gradients (two terms: either order gives the
    same float32 bits)."""

    def __init__(self, index, body, shortcut, post):
        self.index, self.body, self.shortcut, self.post = index, body, shortcut, post
        self._rename_chains(index)
        if post and isinstance(post[0], ActivationOp):
            post[0].in_place = True  # the sum is this block's own buffer, read by nothing else
        self.add_in_place = bool(body) and owns_output(body[-1])
        self.needs_own_output = bool(post) and post[-1].needs_own_output

    def chains(self):
        return (("body", self.body), ("shortcut", self.shortcut), ("post", self.post))

    def setup(self, shape):
        if not self.body:
            raise Unsupported("residual block without a body")
        self.in_shape = tuple(shape)
        out = setup_chain(self.body, shape)
        other = setup_chain(self.shortcut, shape)
        if other != out:
            raise Unsupported(f"residual branches of different shapes {out} and {other}")
        mark_owned_gradients(self.body, False)  # both branches read the same gradient
        mark_owned_gradients(self.shortcut, False)
        return setup_chain(self.post, out)

    @property
    def owns_dy(self):
        return bool(self.post) and self.post[-1].owns_dy

    @owns_dy.setter
    def owns_dy(self, owned):
        mark_owned_gradients(self.post, owned)

    def forward_steps(self, chunk, x, scratch):
        h = yield from forward_chain_steps(self.body, chunk, x, scratch)
        s = yield from forward_chain_steps(self.shortcut, chunk, x, scratch)
        total = h if self.add_in_place else buffer(chunk.store, (self.index, "sum"), h.shape)
        np.add(h, s, out=total)
        return (yield from forward_chain_steps(self.post, chunk, total, scratch))

    def backward_steps(self, chunk, dy, need_dx, grads, scratch):
        incoming = dy
        dy = yield from backward_chain_steps(self.post, chunk, dy, True, grads, scratch)
        body = yield from backward_chain_steps(self.body, chunk, dy, need_dx, grads, scratch)
        shortcut = yield from backward_chain_steps(self.shortcut, chunk, dy, need_dx, grads, scratch)
        pool, dx = gradients(scratch), None
        if need_dx:
            dx = np.add(body, shortcut, out=pool.take(self.in_shape + (chunk.n,)))
        # the block's own gradients (the incoming one stays: the caller gives it back)
        for own in {id(root(d)): d for d in (body, shortcut, dy) if d is not None}.values():
            if root(own) is not root(incoming):
                pool.give_back(own)
        return dx


class ConcatOp(BranchingOp):
    """Branches side by side on one input, their outputs concatenated along the channels (or the
    features of a flat input): one chain of ops per branch (empty for the identity), lowered from
    an nn.Concat with dim=1.

    The layout makes this cheap: the channels are the outermost axis of [C, H, W, n] (features of
    [F, n]), so branch i's output is one contiguous block of the output, channels c_i .. c_i+1,
    and its part of the output gradient is a contiguous view of dy. Forward: every branch from x
    (none writes into x), each copied into its block of this op's own buffer. Backward: each branch
    from its block of dy (a branch's last op may write into its block only when this op owns dy:
    the blocks do not overlap); dx is the branches' input gradients summed in branch order (the
    reference's autograd adds them in the order its graph reaches them: with three branches or more
    the float32 sums may differ in the last bits)."""

    def __init__(self, index, branches, dim=1):
        self.index, self.branches, self.dim, self._owns_dy = index, branches, dim, False
        self._rename_chains(index)

    def chains(self):
        return tuple((position, chain) for position, chain in enumerate(self.branches))

    def setup(self, shape):
        if not self.branches:
            raise Unsupported("Concat without branches")
        if self.dim % (len(shape) + 1) != 1:  # the batch is the first axis of the layers' arrays
            raise Unsupported(f"Concat along dim {self.dim} of {len(shape) + 1}-dimensional arrays (not the channels)")
        self.in_shape = tuple(shape)
        outs = [setup_chain(chain, shape, copied_at_end=True) for chain in self.branches]
        if any(len(out) != len(outs[0]) or out[1:] != outs[0][1:] for out in outs):
            raise Unsupported(f"Concat branches of shapes {outs}: they differ beyond the channels")
        edges = np.cumsum([0] + [out[0] for out in outs]).tolist()
        self.blocks = [slice(first, last) for first, last in zip(edges, edges[1:])]
        self.out_shape = (edges[-1],) + tuple(outs[0][1:])
        return self.out_shape

    @property
    def owns_dy(self):
        return self._owns_dy

    @owns_dy.setter
    def owns_dy(self, owned):
        self._owns_dy = owned
        for chain in self.branches:
            mark_owned_gradients(chain, owned)

    def forward_steps(self, chunk, x, scratch):
        out = buffer(chunk.store, (self.index, "out"), self.out_shape + (chunk.n,))
        for block, chain in zip(self.blocks, self.branches):
            h = yield from forward_chain_steps(chain, chunk, x, scratch)
            np.copyto(out[block], h)
        return out

    def backward_steps(self, chunk, dy, need_dx, grads, scratch):
        pool = gradients(scratch)
        dx = pool.take(self.in_shape + (chunk.n,)) if need_dx else None
        for position, (block, chain) in enumerate(zip(self.blocks, self.branches)):
            d = yield from backward_chain_steps(chain, chunk, dy[block], need_dx, grads, scratch)
            if need_dx:
                if position == 0:
                    np.copyto(dx, d)
                else:
                    dx += d
            if d is not None and root(d) is not root(dy):  # a branch's own gradient (not dy's block)
                pool.give_back(d)
        return dx
