"""GPU launch code for conv2d: kernels/conv2d.cu plus cuBLAS GEMMs through xp.matmul.

Called by conv.py with validated arguments (stride, padding, dilation are int pairs; padding is
symmetric). Arrays stay on their device: each launcher makes the input's GPU current (device_scope) and
allocates there (runtime.empty: CuPy on a GPU, the emulator's metered buffers under emulation), so
no activation is ever copied to the host and cuda:N works for any N.

Two algorithms:
  direct  implicit GEMM tiled through shared memory, each thread a register micro-tile; the tile
          shape follows the channel count (tile_config). Filter and bias gradients are two-pass
          reductions: partial sums per block into a small workspace, then one fixed-order sum each.
  im2col  im2col -> one 2-D cuBLAS GEMM per group over the whole batch chunk -> (col2im for dx).
          Transposes are GEMM flags, never copies (CuPy's 3-D matmul would make its operands
          contiguous, copying the whole column buffer). Needs a column buffer of C*KH*KW*N*OH*OW
          elements plus one of K*N*OH*OW, so the batch is processed in chunks that keep every
          chunk-sized buffer together under COLUMN_BUDGET_BYTES.
"auto" uses im2col when the GEMM is big enough for cuBLAS to win: the reduction length
C/groups*KH*KW >= 64 and K/groups >= 16 output channels per group (LeNet's conv2: 150 and 16).
Otherwise (few input channels like LeNet's conv1, depthwise convolutions) direct avoids the column
buffer and its extra memory traffic.
Both are deterministic: no atomics, every sum in a fixed order.
"""
import numpy as np

from ..backend import device_scope, get_array_module
from ..cuda.runtime import device_errors, empty, gemm, get_kernel, launch, source_constant, zeros
from ..errors import ArgumentError, ShapeError

SOURCE = "conv2d.cu"

# The tile limits have one source, the #defines of kernels/conv2d.cu.
TILE_R = source_constant(SOURCE, "TILE_R")
PIXELS_PER_THREAD = source_constant(SOURCE, "PIXELS_PER_THREAD")
CHANNELS_PER_THREAD = source_constant(SOURCE, "CHANNELS_PER_THREAD")
MAX_TILE_P = source_constant(SOURCE, "MAX_TILE_P")
MAX_TILE_K = source_constant(SOURCE, "MAX_TILE_K")
REDUCE_THREADS = source_constant(SOURCE, "REDUCE_THREADS")
FILTER_TAPS = source_constant(SOURCE, "FILTER_TAPS")
# Pass 1 of the gradient reductions aims at this many blocks: a few per SM of a large GPU (132 on
# an H100). A constant, not the GPU's SM count, so that the sums (and their bits) are device-independent.
REDUCTION_BLOCKS = 512
ELEMENTWISE_THREADS = 256
MAX_GRID_YZ = 65535

# auto: im2col + cuBLAS from this GEMM size on (see the module docstring).
IM2COL_MIN_REDUCTION = 64
IM2COL_MIN_CHANNELS = 16

COLUMN_BUDGET_BYTES = 256 * 1024 * 1024

INT32_MAX = 2**31 - 1


def choose_algo(x_shape, w_shape, groups):
    """'direct' or 'im2col' for algo='auto' (see the module docstring)."""
    out_channels, in_per_group, kh, kw = w_shape
    reduction = in_per_group * kh * kw
    if reduction >= IM2COL_MIN_REDUCTION and out_channels // groups >= IM2COL_MIN_CHANNELS:
        return "im2col"
    return "direct"


# The direct kernels' tiles, (largest channel count per group, tile channels, tile pixels), in
# increasing order of channels; see tile_config.
TILE_CONFIGS = (
    ("narrow", 8, 8, 128),
    ("medium", 16, 16, 64),
    ("wide", None, 32, 64),
)


class TileConfig:
    """One tile of the direct kernels: `channels` x `pixels` outputs per block, block (pixels /
    PIXELS_PER_THREAD, channels / CHANNELS_PER_THREAD) threads, each a CHANNELS_PER_THREAD x
    PIXELS_PER_THREAD register micro-tile."""

    def __init__(self, name, channels, pixels):
        if not (0 < channels <= MAX_TILE_K and channels % CHANNELS_PER_THREAD == 0
                and 0 < pixels <= MAX_TILE_P and pixels % PIXELS_PER_THREAD == 0):
            raise ArgumentError(f"conv2d tile {name!r}: expected channels (a multiple of {CHANNELS_PER_THREAD}, "
                                f"at most MAX_TILE_K = {MAX_TILE_K}) and pixels (a multiple of "
                                f"{PIXELS_PER_THREAD}, at most MAX_TILE_P = {MAX_TILE_P}), got {channels} x {pixels}")
        self.name, self.channels, self.pixels = name, channels, pixels
        self.block = (pixels // PIXELS_PER_THREAD, channels // CHANNELS_PER_THREAD, 1)

    def grid(self, pixels, channels, planes):
        """Blocks for `pixels` outputs per plane, `channels` per group, `planes` = N * groups."""
        return (_cdiv(pixels, self.pixels), _cdiv(channels, self.channels), min(planes, MAX_GRID_YZ))

    def useful_fraction(self, pixels, channels):
        """Useful multiply-adds / issued ones for `pixels` outputs per plane and `channels` per group:
        the issued ones include the tile's padding channels and pixels (the reduction stops at its
        last row, so it pads no rows)."""
        return (pixels * channels) / (_cdiv(pixels, self.pixels) * self.pixels
                                      * _cdiv(channels, self.channels) * self.channels)

    def __repr__(self):
        return f"{self.name} {self.channels}ch x {self.pixels}px"


_TILES = [(limit, TileConfig(name, channels, pixels)) for name, limit, channels, pixels in TILE_CONFIGS]


def tile_config(channels):
    """The direct kernels' tile for `channels` output channels per block column: the forward's
    K/groups, backward-data's C/groups. Few channels (LeNet's conv1 has 6) get a narrow, long tile,
    so little of the block computes padding channels:

        channels per group   tile (channels x pixels)   block (threads)
        1 .. 8               narrow  8 x 128             32 x 2
        9 .. 16              medium 16 x 64              16 x 4
        17 ..                wide   32 x 64              16 x 8

    Each thread computes a 4 x 4 register micro-tile (CHANNELS_PER_THREAD x PIXELS_PER_THREAD): per
    reduction row 8 shared-memory loads serve 16 multiply-adds. A function of the shape alone."""
    if channels < 1:
        raise ArgumentError(f"conv2d tile: expected at least 1 channel per group, got {channels}")
    return next(tile for limit, tile in _TILES if limit is None or channels <= limit)  # the last has no limit


def conv2d_forward(x, w, b, stride, padding, dilation, groups, algo, relu=False):
    """y, or relu(y) with relu=True: the ReLU (and the bias) fused into the kernel's epilogue."""
    xp = get_array_module(x, w, b)
    geometry = _Geometry(x.shape, w.shape, stride, padding, dilation, groups)
    shapes = {"x": x.shape, "weight": w.shape}
    algo = choose_algo(x.shape, w.shape, groups) if algo == "auto" else algo
    with device_scope(x), device_errors("conv2d", shapes):
        x = xp.ascontiguousarray(x)
        w = xp.ascontiguousarray(w)
        if geometry.empty:
            y = zeros(xp, geometry.y_shape, x.dtype, "y")
            y = y if b is None else y + b.reshape(1, -1, 1, 1)
            return xp.maximum(y, 0) if relu else y
        if algo == "direct":
            return _forward_direct(xp, x, w, b, geometry, shapes, relu)
        return _forward_im2col(xp, x, w, b, geometry, shapes, relu)


def conv2d_backward(dy, x, w, stride, padding, dilation, groups, algo, need_dx, need_bias, need_dw=True):
    xp = get_array_module(dy, x, w)
    geometry = _Geometry(x.shape, w.shape, stride, padding, dilation, groups)
    shapes = {"dy": dy.shape, "x": x.shape, "weight": w.shape}
    algo = choose_algo(x.shape, w.shape, groups) if algo == "auto" else algo
    with device_scope(x), device_errors("conv2d_backward", shapes):
        dy = xp.ascontiguousarray(dy)
        x = xp.ascontiguousarray(x)
        w = xp.ascontiguousarray(w)
        if geometry.empty:
            dx = zeros(xp, x.shape, x.dtype, "dx") if need_dx else None
            db = zeros(xp, (w.shape[0],), x.dtype, "db") if need_bias else None
            return dx, zeros(xp, w.shape, x.dtype, "dw") if need_dw else None, db
        if algo == "direct":
            dx = _backward_data_direct(xp, dy, w, x.shape, geometry, shapes) if need_dx else None
            dw, db = None, None
            if need_dw:  # one reduction gives both
                dw, db = _filter_and_bias_gradients(xp, dy, x, geometry, need_bias, shapes)
            elif need_bias:
                db = _bias_gradient(xp, dy, geometry, shapes)
            return dx, dw, db
        db = _bias_gradient(xp, dy, geometry, shapes) if need_bias else None
        if not (need_dx or need_dw):
            return None, None, db
        dx, dw = _backward_im2col(xp, dy, x, w, geometry, need_dx, need_dw, shapes)
    return dx, dw, db


class _Geometry:
    """Every size a conv kernel takes, checked to fit the kernels' 32-bit counters."""

    def __init__(self, x_shape, w_shape, stride, padding, dilation, groups):
        self.N, self.C, self.H, self.W = (int(s) for s in x_shape)
        self.K, _, self.KH, self.KW = (int(s) for s in w_shape)
        (self.sh, self.sw), (self.ph, self.pw), (self.dh, self.dw) = stride, padding, dilation
        self.groups = int(groups)
        self.OH = (self.H + 2 * self.ph - self.dh * (self.KH - 1) - 1) // self.sh + 1
        self.OW = (self.W + 2 * self.pw - self.dw * (self.KW - 1) - 1) // self.sw + 1
        if self.OH < 1 or self.OW < 1:
            raise ShapeError(f"conv2d: the kernel {self.KH}x{self.KW} (dilation {dilation}) does not fit "
                             f"the padded input {self.H}x{self.W} (padding {padding}); pad more or "
                             "use a smaller kernel")
        self.Cg, self.Kg = self.C // self.groups, self.K // self.groups
        self.P = self.OH * self.OW
        self.R = self.Cg * self.KH * self.KW
        self.y_shape = (self.N, self.K, self.OH, self.OW)
        self.empty = self.N == 0 or self.C == 0 or self.K == 0
        for what, count in (("H*W", self.H * self.W), ("OH*OW", self.P), ("N*C", self.N * self.C),
                            ("N*K", self.N * self.K), ("K*C/groups*KH*KW", self.K * self.R),
                            # the gradient reduction's elements: weights, then biases (reduce_slices' int count)
                            ("K*C/groups*KH*KW + K", self.K * self.R + self.K),
                            ("C*KH*KW", self.C * self.KH * self.KW)):
            if count > INT32_MAX:
                raise ArgumentError(f"conv2d: {what} = {count} exceeds the CUDA kernels' 32-bit range; "
                                    "use a smaller batch or image")

    def scalars(self):
        """The shared int parameters: N C H W K KH KW OH OW stride pad dilation groups."""
        return tuple(np.int32(v) for v in (
            self.N, self.C, self.H, self.W, self.K, self.KH, self.KW, self.OH, self.OW,
            self.sh, self.sw, self.ph, self.pw, self.dh, self.dw, self.groups))

    def with_batch(self, n):
        chunk = object.__new__(_Geometry)
        chunk.__dict__.update(self.__dict__)
        chunk.N = n
        return chunk


def _cdiv(a, b):
    return -(-a // b)


def _threads_for(count):
    """Threads per block for `count` work items: whole warps, at most ELEMENTWISE_THREADS, so a small
    plane (LeNet's 5x5 pool output) does not leave most of a 256-thread block idle."""
    return max(32, min(ELEMENTWISE_THREADS, _cdiv(count, 32) * 32))


def _forward_direct(xp, x, w, b, g, shapes, relu=False):
    y = empty(xp, g.y_shape, x.dtype, "y")
    bias = b if b is not None else zeros(xp, (1,), x.dtype, "no bias")
    kernel = get_kernel(SOURCE, "conv2d_forward_direct", x.dtype)
    tile = tile_config(g.Kg)
    launch(kernel, tile.grid(g.P, g.Kg, g.N * g.groups), tile.block,
           (x, w, xp.ascontiguousarray(bias), y) + g.scalars() + (np.int32(b is not None), np.int32(relu)),
           op_name="conv2d (direct)", shapes=shapes)
    return y


def _backward_data_direct(xp, dy, w, x_shape, g, shapes):
    dx = empty(xp, x_shape, dy.dtype, "dx")
    kernel = get_kernel(SOURCE, "conv2d_backward_data_direct", dy.dtype)
    tile = tile_config(g.Cg)
    launch(kernel, tile.grid(g.H * g.W, g.Cg, g.N * g.groups), tile.block, (dy, w, dx) + g.scalars(),
           op_name="conv2d_backward data (direct)", shapes=shapes)
    return dx


def _slices(items, blocks):
    """How many ranges pass 1 of a gradient reduction splits the N*OH*OW items of each sum into:
    enough for about REDUCTION_BLOCKS blocks in all, each thread at least one item. A function of
    the shape alone, so the rounding (and the bits) are the same on every run and every GPU."""
    by_blocks = _cdiv(REDUCTION_BLOCKS, max(1, blocks))
    return int(max(1, min(by_blocks, _cdiv(items, REDUCE_THREADS), MAX_GRID_YZ)))  # host: shape arithmetic


def _filter_and_bias_gradients(xp, dy, x, g, need_bias, shapes):
    """dw (and db) of the direct algorithm: conv2d_backward_filter_partial, then reduce_slices."""
    pairs, tap_tiles = g.K * g.Cg, _cdiv(g.KH * g.KW, FILTER_TAPS)
    slices = _slices(g.N * g.P, pairs * tap_tiles)
    weights = g.K * g.R
    count = weights + (g.K if need_bias else 0)
    partial = empty(xp, (slices, count), x.dtype, "gradient partial sums")
    launch(get_kernel(SOURCE, "conv2d_backward_filter_partial", x.dtype), (pairs, tap_tiles, slices),
           (REDUCE_THREADS, 1, 1), (dy, x, partial) + g.scalars() + (np.int32(slices), np.int32(need_bias)),
           op_name="conv2d_backward filter (direct)", shapes=shapes)
    dw = empty(xp, (g.K, g.Cg, g.KH, g.KW), x.dtype, "dw")
    db = empty(xp, (g.K,), x.dtype, "db") if need_bias else None
    _reduce_slices(partial, dw, db if need_bias else dw, weights, count, slices, shapes)
    return dw, db


def _reduce_slices(partial, first, second, first_count, count, slices, shapes):
    threads = _threads_for(count)
    launch(get_kernel(SOURCE, "reduce_slices", partial.dtype), (_cdiv(count, threads), 1, 1), (threads, 1, 1),
           (partial, first, second, np.int32(first_count), np.int32(count), np.int32(slices)),
           op_name="conv2d_backward gradient sums", shapes=shapes)


def _bias_gradient(xp, dy, g, shapes):
    slices = _slices(g.N * g.P, g.K)
    partial = empty(xp, (slices, g.K), dy.dtype, "bias partial sums")
    launch(get_kernel(SOURCE, "conv2d_backward_bias_partial", dy.dtype), (g.K, slices, 1), (REDUCE_THREADS, 1, 1),
           (dy, partial, np.int32(g.N), np.int32(g.K), np.int32(g.P), np.int32(slices)),
           op_name="conv2d_backward bias", shapes=shapes)
    db = empty(xp, (g.K,), dy.dtype, "db")
    _reduce_slices(partial, db, db, g.K, g.K, slices, shapes)
    return db


def _batch_chunks(g, itemsize):
    """(start, stop) batch ranges whose chunk-sized buffers together (the columns, C*KH*KW*OH*OW per
    sample, and the channel-major output or gradient, K*OH*OW per sample) stay under
    COLUMN_BUDGET_BYTES, and under the kernels' 32-bit line count."""
    per_sample = (g.C * g.KH * g.KW + g.K) * g.P
    chunk = max(1, min(COLUMN_BUDGET_BYTES // max(1, per_sample * itemsize),
                       INT32_MAX // max(1, g.C * g.KH * g.KW)))
    return [(start, min(start + chunk, g.N)) for start in range(0, g.N, chunk)]


def _columns(xp, x, g, shapes, col=None):
    """(groups, C/groups*KH*KW, n*OH*OW) columns of a batch chunk x (im2col), into `col` if given."""
    n = x.shape[0]
    if col is None:
        col = empty(xp, (g.C * g.KH * g.KW, n, g.P), x.dtype, "columns")
    kernel = get_kernel(SOURCE, "im2col", x.dtype)
    grid = (_cdiv(g.P, _threads_for(g.P)), min(g.C * g.KH * g.KW * n, MAX_GRID_YZ), 1)
    launch(kernel, grid, (_threads_for(g.P), 1, 1), (x, col) + _im2col_scalars(g, n),
           op_name="conv2d im2col", shapes=shapes)
    return col.reshape(g.groups, g.R, n * g.P)


def _im2col_scalars(g, n):
    return tuple(np.int32(v) for v in (n, g.C, g.H, g.W, g.KH, g.KW, g.OH, g.OW,
                                       g.sh, g.sw, g.ph, g.pw, g.dh, g.dw))


def _forward_im2col(xp, x, w, b, g, shapes, relu=False):
    y = empty(xp, g.y_shape, x.dtype, "y")
    w_groups = w.reshape(g.groups, g.Kg, g.R)
    bias = xp.ascontiguousarray(b) if b is not None else None  # None: has_bias=0, never read
    output = get_kernel(SOURCE, "im2col_output", x.dtype)
    for start, stop in _batch_chunks(g, x.itemsize):
        n = stop - start
        col = _columns(xp, x[start:stop], g, shapes)
        y_chunk = empty(xp, (g.groups, g.Kg, n * g.P), x.dtype, "y chunk")  # channel-major, batch inside
        for group in range(g.groups):
            gemm(xp, w_groups[group], col[group], y_chunk[group], op_name="conv2d im2col GEMM", shapes=shapes)
        # channel-major chunk -> NCHW, + bias, ReLU if asked: one pass
        count = n * g.K * g.P
        threads = _threads_for(count)
        launch(output, (min(_cdiv(count, threads), 1 << 16), 1, 1), (threads, 1, 1),
               (y_chunk, y_chunk if bias is None else bias, y[start:stop], np.int32(n), np.int32(g.K), np.int32(g.P),
                np.int32(b is not None), np.int32(relu)), op_name="conv2d im2col output", shapes=shapes)
        del col, y_chunk  # free before the next chunk allocates its own
    return y


def _backward_im2col(xp, dy, x, w, g, need_dx, need_dw, shapes):
    w_groups = w.reshape(g.groups, g.Kg, g.R)
    dx = empty(xp, x.shape, x.dtype, "dx") if need_dx else None
    dw = empty(xp, (g.groups, g.Kg, g.R), w.dtype, "dw") if need_dw else None
    for index, (start, stop) in enumerate(_batch_chunks(g, x.itemsize)):
        n = stop - start
        # dy of the chunk, channel-major (K, n*OH*OW): the GEMMs' layout; one explicit, budgeted copy
        dy_chunk = empty(xp, (g.groups, g.Kg, n * g.P), dy.dtype, "dy chunk")
        dy_chunk.reshape(g.K, n, g.P)[...] = dy[start:stop].reshape(n, g.K, g.P).transpose(1, 0, 2)
        col = empty(xp, (g.C * g.KH * g.KW, n, g.P), x.dtype, "columns")
        columns = dcol = None
        if need_dw:
            columns = _columns(xp, x[start:stop], g, shapes, col)
            for group in range(g.groups):  # dw[g] (+)= dy[g] @ col[g].T, chunks in order: deterministic
                gemm(xp, dy_chunk[group], columns[group], dw[group], transb=True, beta=float(index > 0),
                     op_name="conv2d_backward filter GEMM", shapes=shapes)
        if need_dx:
            dcol = col.reshape(g.groups, g.R, n * g.P)  # the columns are read: reuse their buffer
            for group in range(g.groups):  # dcol[g] = w[g].T @ dy[g]
                gemm(xp, w_groups[group], dy_chunk[group], dcol[group], transa=True,
                     op_name="conv2d_backward data GEMM", shapes=shapes)
            kernel = get_kernel(SOURCE, "col2im", x.dtype)
            threads = _threads_for(g.H * g.W)
            grid = (_cdiv(g.H * g.W, threads), min(n * g.C, MAX_GRID_YZ), 1)
            launch(kernel, grid, (threads, 1, 1), (dcol, dx[start:stop]) + _im2col_scalars(g, n),
                   op_name="conv2d_backward col2im", shapes=shapes)
        col = columns = dcol = dy_chunk = None  # every view dropped: freed before the next chunk allocates
    return dx, dw.reshape(w.shape) if need_dw else None
