"""2-D max, average and power-average (Lp) pooling on NCHW arrays: forward and backward.

The public functions validate and normalise their arguments, then dispatch: CuPy arrays (or
kernel emulation) go to pool_cuda.py, NumPy arrays to the path below.

The NumPy path loops over the KH*KW kernel taps, never over pixels: for each tap one strided slice
of the input lines up with the outputs whose window holds that tap, so the whole batch moves at
once. Taps that land in the padding are clipped off the slices (conv._tap_range), which stands
for -inf padding in max pooling and zero padding in the others without building a padded copy.
Overlapping windows (stride < kernel) need nothing special: within one tap, distinct outputs read
distinct inputs, so the backward's slice-adds never collide.
"""
import math

import numpy as np

from ..backend import get_array_module, uses_cuda_kernels
from ..errors import ArgumentError, ShapeError
from ._args import check_float_array, check_same_dtype, conv_output_size, pair, same_device
from .conv import _tap_range


# ----------------------------------------------------------------------------------------------
# argument handling shared by both paths


def _check_pool_args(x, kernel_size, stride, padding):
    """-> (kernel, stride, padding, out_hw) as int pairs, or raise naming the bad argument."""
    check_float_array(x, "x", 4)
    kernel = pair(kernel_size, "kernel_size", minimum=1)
    stride = kernel if stride is None else pair(stride, "stride", minimum=1)
    padding = pair(padding, "padding", minimum=0)
    if padding[0] > kernel[0] // 2 or padding[1] > kernel[1] // 2:
        raise ArgumentError(f"padding: expected at most half the kernel size (kernel_size={kernel} "
                            f"allows padding <= {(kernel[0] // 2, kernel[1] // 2)}), got {padding}; "
                            "use a larger kernel or less padding")
    out_hw = tuple(conv_output_size(s, k, st, p) for s, k, st, p in zip(x.shape[2:], kernel, stride, padding))
    if min(out_hw) < 1:
        raise ShapeError(f"x: input {x.shape[2]}x{x.shape[3]} with padding {padding} is smaller than "
                         f"the pooling window {kernel[0]}x{kernel[1]}; use a larger input or a smaller kernel")
    return kernel, stride, padding, out_hw


def _check_norm_type(norm_type):
    if (isinstance(norm_type, bool) or not isinstance(norm_type, (int, float, np.integer, np.floating))
            or not math.isfinite(norm_type) or norm_type <= 0):
        raise ArgumentError(f"norm_type: expected a finite number > 0 (2 for an L2 pool), got {norm_type!r}")
    return float(norm_type)


def _check_count_include_pad(count_include_pad):
    if not isinstance(count_include_pad, (bool, np.bool_)):
        raise ArgumentError(f"count_include_pad: expected True or False, got {count_include_pad!r}")
    return bool(count_include_pad)


def _check_dy(dy, x, out_hw):
    check_float_array(dy, "dy", 4)
    same_device(dy, x)
    check_same_dtype(dy=dy, x=x)
    expected = tuple(x.shape[:2]) + out_hw
    if tuple(dy.shape) != expected:
        raise ShapeError(f"dy: expected shape {expected} (the shape of the pool's output), got {tuple(dy.shape)}")


def _forward(mode, x, kernel_size, stride, padding, norm_type, count_include_pad, return_indices=False):
    kernel, stride, padding, out_hw = _check_pool_args(x, kernel_size, stride, padding)
    if uses_cuda_kernels(x):
        from . import pool_cuda
        return pool_cuda.pool2d_forward(mode, x, kernel, stride, padding, norm_type, count_include_pad,
                                        return_indices)
    y = pool2d_forward_numpy(mode, x, kernel, stride, padding, norm_type, count_include_pad)
    if return_indices:
        return y, max_pool_indices_numpy(x, kernel, stride, padding, out_hw)
    return y


def _backward(mode, dy, x, kernel_size, stride, padding, norm_type, count_include_pad, saved=None):
    """`saved` (the forward's max indices or lp output) lets the CUDA path skip re-finding them; the
    NumPy path recomputes what it needs and ignores it."""
    kernel, stride, padding, out_hw = _check_pool_args(x, kernel_size, stride, padding)
    _check_dy(dy, x, out_hw)
    if uses_cuda_kernels(x):
        from . import pool_cuda
        return pool_cuda.pool2d_backward(mode, dy, x, kernel, stride, padding, norm_type, count_include_pad,
                                         saved)
    return pool2d_backward_numpy(mode, dy, x, kernel, stride, padding, norm_type, count_include_pad)


# ----------------------------------------------------------------------------------------------
# public API. stride defaults to kernel_size; padding must be <= kernel_size // 2 (PyTorch's rule).


def max_pool2d(x, kernel_size, stride=None, padding=0, return_indices=False):
    """Window maximum, -inf padding. A window holding a NaN outputs NaN. return_indices=True gives
    (y, indices): int32, each window's first maximum (first NaN) as the flat offset ih*W + iw in
    its plane; max_pool2d_backward(..., indices=indices) then reads them instead of re-finding them."""
    return _forward("max", x, kernel_size, stride, padding, 0.0, True, bool(return_indices))  # host: an argument


def max_pool2d_backward(dy, x, kernel_size, stride=None, padding=0, indices=None):
    """Each output's gradient goes to its window's first maximum in row-major order (its first NaN
    if the window holds one). `indices` from max_pool2d(..., return_indices=True) spares the GPU
    path a second search (the NumPy path finds the maxima itself)."""
    return _backward("max", dy, x, kernel_size, stride, padding, 0.0, True, indices)


def avg_pool2d(x, kernel_size, stride=None, padding=0, count_include_pad=True):
    """Window mean, zero padding; count_include_pad=False divides by the unpadded element count."""
    count_include_pad = _check_count_include_pad(count_include_pad)
    return _forward("avg", x, kernel_size, stride, padding, 0.0, count_include_pad)


def avg_pool2d_backward(dy, x, kernel_size, stride=None, padding=0, count_include_pad=True):
    count_include_pad = _check_count_include_pad(count_include_pad)
    return _backward("avg", dy, x, kernel_size, stride, padding, 0.0, count_include_pad)


def lp_pool2d(x, norm_type, kernel_size, stride=None):
    """(sum over the window of x**p) ** (1/p), no padding (torch.nn.functional.lp_pool2d)."""
    return _forward("lp", x, kernel_size, stride, 0, _check_norm_type(norm_type), True)


def lp_pool2d_backward(dy, x, norm_type, kernel_size, stride=None, y=None):
    """d/dx_i = x_i**(p-1) * out**(1-p) * dy, and 0 for windows whose sum is 0. `y`, the forward's
    output, spares the GPU path re-running the forward."""
    return _backward("lp", dy, x, kernel_size, stride, 0, _check_norm_type(norm_type), True, y)


# ----------------------------------------------------------------------------------------------
# NumPy path, same signatures as pool_cuda's launchers: mode in {"max", "avg", "lp"}, kernel,
# stride and padding validated int pairs, norm_type a float (0.0 unless mode == "lp"),
# count_include_pad a bool. Public so the CUDA tests can use it as the reference.


def _taps(x_hw, out_hw, kernel, stride, padding):
    """Yield (tap index, input slices, output slices) for each kernel tap in row-major order."""
    for i in range(kernel[0]):
        rows = _tap_range(i, x_hw[0], out_hw[0], stride[0], padding[0], 1)
        for j in range(kernel[1]):
            cols = _tap_range(j, x_hw[1], out_hw[1], stride[1], padding[1], 1)
            if rows is not None and cols is not None:
                yield i * kernel[1] + j, (Ellipsis, rows[0], cols[0]), (Ellipsis, rows[1], cols[1])


def _out_hw(x, kernel, stride, padding):
    return tuple(conv_output_size(s, k, st, p) for s, k, st, p in zip(x.shape[2:], kernel, stride, padding))


def _window_sum(x, kernel, stride, padding, out_hw):
    total = np.zeros(x.shape[:2] + out_hw, dtype=x.dtype)
    for _, src, dst in _taps(x.shape[2:], out_hw, kernel, stride, padding):
        total[dst] += x[src]
    return total


def _avg_divisor(x, kernel, stride, padding, out_hw, count_include_pad):
    """The kernel area, or per output the number of window elements inside the unpadded input."""
    if count_include_pad or padding == (0, 0):
        return kernel[0] * kernel[1]
    counts = []
    for size, out, k, s, p in zip(x.shape[2:], out_hw, kernel, stride, padding):
        start = np.arange(out) * s - p
        counts.append(np.minimum(start + k, size) - np.maximum(start, 0))
    return np.outer(counts[0], counts[1]).astype(x.dtype)


def _lp_sum_and_output(x, kernel, stride, p, out_hw):
    window_sum = _window_sum(np.power(x, p), kernel, stride, (0, 0), out_hw)
    with np.errstate(invalid="ignore"):  # a negative sum (odd p) gives NaN, as in PyTorch
        return window_sum, np.power(window_sum, 1.0 / p)


def pool2d_forward_numpy(mode, x, kernel, stride, padding, norm_type=0.0, count_include_pad=True):
    out_hw = _out_hw(x, kernel, stride, padding)
    if mode == "max":
        y = np.full(x.shape[:2] + out_hw, -np.inf, dtype=x.dtype)
        for _, src, dst in _taps(x.shape[2:], out_hw, kernel, stride, padding):
            np.maximum(y[dst], x[src], out=y[dst])  # propagates NaN
        return y
    if mode == "avg":
        y = _window_sum(x, kernel, stride, padding, out_hw)
        y /= _avg_divisor(x, kernel, stride, padding, out_hw, count_include_pad)
        return y
    if mode == "lp":
        return _lp_sum_and_output(x, kernel, stride, norm_type, out_hw)[1]
    raise ArgumentError(f"mode: expected 'max', 'avg' or 'lp', got {mode!r}")


def _first_argmax_taps(x, kernel, stride, padding, out_hw):
    """Per output, the tap index of its window's first maximum (first NaN if any), row-major."""
    best = np.full(x.shape[:2] + out_hw, -np.inf, dtype=x.dtype)
    index_type = np.int16 if kernel[0] * kernel[1] < 2 ** 15 else np.int32
    which = np.full(best.shape, -1, dtype=index_type)
    for tap, src, dst in _taps(x.shape[2:], out_hw, kernel, stride, padding):
        value, best_so_far, which_so_far = x[src], best[dst], which[dst]
        # strictly greater keeps the first of equal maxima; the first NaN wins and then stays,
        # because nothing compares greater than NaN; `which < 0` takes a window's first real tap
        # so an all -inf window still has an owner.
        take = value > best_so_far
        take |= np.isnan(value) & ~np.isnan(best_so_far)
        take |= which_so_far < 0
        np.copyto(best_so_far, value, where=take)
        np.copyto(which_so_far, tap, where=take)
    return which


def max_pool_indices_numpy(x, kernel, stride, padding, out_hw):
    """What the CUDA forward saves: int32 per output, the flat offset ih*W + iw of its window's
    first maximum (first NaN) in the plane."""
    tap = _first_argmax_taps(x, kernel, stride, padding, out_hw).astype(np.int64)
    oh = np.arange(out_hw[0]).reshape(-1, 1)
    ow = np.arange(out_hw[1]).reshape(1, -1)
    ih = oh * stride[0] - padding[0] + tap // kernel[1]
    iw = ow * stride[1] - padding[1] + tap % kernel[1]
    return (ih * x.shape[3] + iw).astype(np.int32)


def _max_pool_backward(dx, dy, x, kernel, stride, padding, out_hw):
    """dx += each output's gradient at its window's first maximum (first NaN if any)."""
    taps = list(_taps(x.shape[2:], out_hw, kernel, stride, padding))
    y = pool2d_forward_numpy("max", x, kernel, stride, padding)
    if np.isnan(y).any():
        which = _first_argmax_taps(x, kernel, stride, padding, out_hw)
        for tap, src, dst in taps:
            dx[src] += np.where(which[dst] == tap, dy[dst], 0)
        return
    # Without NaN, a window's maximum is its first tap equal to y; `unclaimed` marks the windows
    # whose maximum no earlier tap has taken, so later equal taps (ties) get nothing.
    disjoint = stride[0] >= kernel[0] and stride[1] >= kernel[1]
    unclaimed = np.ones(y.shape, dtype=bool)
    for _, src, dst in taps:
        hit = x[src] == y[dst]
        hit &= unclaimed[dst]
        unclaimed[dst] ^= hit
        if disjoint:  # every input belongs to at most one window: write, don't accumulate
            np.multiply(dy[dst], hit, out=dx[src])
        else:
            dx[src] += dy[dst] * hit


def pool2d_backward_numpy(mode, dy, x, kernel, stride, padding, norm_type=0.0, count_include_pad=True):
    out_hw = _out_hw(x, kernel, stride, padding)
    dx = np.zeros(x.shape, dtype=x.dtype)
    if mode == "max":
        _max_pool_backward(dx, dy, x, kernel, stride, padding, out_hw)
        return dx
    if mode == "avg":
        share = dy / _avg_divisor(x, kernel, stride, padding, out_hw, count_include_pad)
    elif mode == "lp":
        window_sum, y = _lp_sum_and_output(x, kernel, stride, norm_type, out_hw)
        with np.errstate(divide="ignore", invalid="ignore"):
            # out**(1-p) == out / sum; a zero sum has zero gradient by convention
            share = np.where(window_sum != 0, dy * y / window_sum, 0)
    else:
        raise ArgumentError(f"mode: expected 'max', 'avg' or 'lp', got {mode!r}")
    for _, src, dst in _taps(x.shape[2:], out_hw, kernel, stride, padding):
        dx[src] += share[dst]
    if mode == "lp":
        with np.errstate(divide="ignore", invalid="ignore"):
            dx *= np.power(x, norm_type - 1.0)
    return dx


def _adaptive_bounds(size, out):
    """PyTorch's adaptive windows: cell i covers [floor(i*size/out), ceil((i+1)*size/out))."""
    return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]


def adaptive_avg_pool2d(x, output_size):
    """Average over adaptive windows so the output is output_size (an int or a pair); output 1 is
    the global average pool of ResNets."""
    check_float_array(x, "x", 4)
    oh, ow = pair(output_size, "output_size", minimum=1)
    xp = get_array_module(x)
    n, c, h, w = x.shape
    if (oh, ow) == (1, 1):
        return x.mean(axis=(2, 3), keepdims=True)
    y = xp.empty((n, c, oh, ow), x.dtype)
    for i, (top, bottom) in enumerate(_adaptive_bounds(h, oh)):
        for j, (left, right) in enumerate(_adaptive_bounds(w, ow)):
            y[:, :, i, j] = x[:, :, top:bottom, left:right].mean(axis=(2, 3))
    return y


def adaptive_avg_pool2d_backward(dy, x_shape, output_size):
    """Each window's gradient spread evenly over its pixels (windows may overlap: they add)."""
    oh, ow = pair(output_size, "output_size", minimum=1)
    xp = get_array_module(dy)
    n, c, h, w = x_shape
    if (oh, ow) == (1, 1):
        return xp.broadcast_to(dy / dy.dtype.type(h * w), tuple(x_shape)).copy()
    dx = xp.zeros(tuple(x_shape), dy.dtype)
    for i, (top, bottom) in enumerate(_adaptive_bounds(h, oh)):
        for j, (left, right) in enumerate(_adaptive_bounds(w, ow)):
            area = dy.dtype.type((bottom - top) * (right - left))
            dx[:, :, top:bottom, left:right] += (dy[:, :, i, j] / area)[:, :, None, None]
    return dx
