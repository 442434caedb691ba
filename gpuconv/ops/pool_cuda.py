"""GPU launch code for pooling: kernels/pool2d.cu.

Called by pool.py with validated arguments: mode in {"max", "avg", "lp"}, kernel/stride/padding int
pairs, norm_type a float (used by "lp"), count_include_pad a bool (used by "avg"). Every kernel runs
one thread per pixel of a plane (grid.x) and strides over the N*C planes (grid.y); backward kernels
gather over the windows covering their input pixel, so overlapping windows are deterministic.
"""
import numpy as np

from ..backend import device_scope, get_array_module
from ..cuda.runtime import device_errors, empty, get_kernel, launch
from ..errors import ArgumentError, ShapeError

SOURCE = "pool2d.cu"
MAX_THREADS = 256
MAX_GRID_Y = 65535
INT32_MAX = 2**31 - 1


def _launch_shape(pixels, planes):
    """Whole warps up to MAX_THREADS per block, so small planes do not leave blocks mostly idle."""
    threads = max(32, min(MAX_THREADS, -(-pixels // 32) * 32))
    return (-(-pixels // threads), min(planes, MAX_GRID_Y), 1), (threads, 1, 1)


def _sizes(x_shape, kernel, stride, padding):
    n, c, h, w = (int(s) for s in x_shape)
    oh = (h + 2 * padding[0] - kernel[0]) // stride[0] + 1
    ow = (w + 2 * padding[1] - kernel[1]) // stride[1] + 1
    if oh < 1 or ow < 1:
        raise ShapeError(f"pool2d: the window {kernel} does not fit the padded input {h}x{w} "
                         f"(padding {padding}); use a smaller kernel_size")
    for what, count in (("N*C", n * c), ("H*W", h * w), ("OH*OW", oh * ow)):
        if count > INT32_MAX:
            raise ArgumentError(f"pool2d: {what} = {count} exceeds the CUDA kernels' 32-bit range; "
                                "use a smaller batch or image")
    return n * c, h, w, oh, ow


def _window_scalars(h, w, oh, ow, kernel, stride, padding):
    return tuple(np.int32(v) for v in (h, w, oh, ow, kernel[0], kernel[1],
                                       stride[0], stride[1], padding[0], padding[1]))


def _mode_scalars(mode, dtype, norm_type, count_include_pad):
    if mode == "avg":
        return (np.int32(bool(count_include_pad)),)
    if mode == "lp":
        return (np.dtype(dtype).type(norm_type),)
    return ()


def _check_mode(mode):
    if mode not in ("max", "avg", "lp"):
        raise ArgumentError(f"mode: expected 'max', 'avg' or 'lp', got {mode!r}")


def pool2d_forward(mode, x, kernel, stride, padding, norm_type, count_include_pad, return_indices=False):
    """y, or for mode "max" with return_indices (y, indices): int32 (N, C, OH, OW), each window's
    argmax as the flat offset ih*W + iw in its plane, which pool2d_backward reads."""
    _check_mode(mode)
    xp = get_array_module(x)
    planes, h, w, oh, ow = _sizes(x.shape, kernel, stride, padding)
    shapes = {"x": x.shape}
    save = mode == "max" and return_indices
    with device_scope(x), device_errors(f"{mode}_pool2d", shapes):
        x = xp.ascontiguousarray(x)
        y = empty(xp, x.shape[:2] + (oh, ow), x.dtype, "y")
        indices = empty(xp, y.shape if save else (1,), np.int32, "indices")
        if y.size == 0:
            return (y, indices) if save else y
        grid, block = _launch_shape(oh * ow, planes)
        head = (x, y, indices, np.int32(save)) if mode == "max" else (x, y)
        args = (head + (np.int32(planes),) + _window_scalars(h, w, oh, ow, kernel, stride, padding)
                + _mode_scalars(mode, x.dtype, norm_type, count_include_pad))
        launch(get_kernel(SOURCE, f"{mode}_pool2d_forward", x.dtype), grid, block, args,
               op_name=f"{mode}_pool2d", shapes=shapes)
    return (y, indices) if save else y


def pool2d_backward(mode, dy, x, kernel, stride, padding, norm_type, count_include_pad, saved=None):
    """dx. `saved` is what the forward kept: for "max" its indices (return_indices), for "lp" its
    output y; when None the forward is run again to get them (one extra launch)."""
    _check_mode(mode)
    xp = get_array_module(dy, x)
    planes, h, w, oh, ow = _sizes(x.shape, kernel, stride, padding)
    shapes = {"dy": dy.shape, "x": x.shape}
    with device_scope(x), device_errors(f"{mode}_pool2d_backward", shapes):
        dy = xp.ascontiguousarray(dy)
        x = xp.ascontiguousarray(x)
        dx = empty(xp, x.shape, x.dtype, "dx")
        if dx.size == 0:
            return dx
        if saved is not None and tuple(saved.shape) != tuple(dy.shape):
            raise ShapeError(f"{'indices' if mode == 'max' else 'y'}: expected the pool output's shape "
                             f"{tuple(dy.shape)}, got {tuple(saved.shape)}")
        if mode == "max":
            if saved is None:
                saved = pool2d_forward(mode, x, kernel, stride, padding, norm_type, count_include_pad, True)[1]
            elif saved.dtype != np.int32:
                raise ArgumentError(f"indices: expected int32 (max_pool2d(..., return_indices=True)), "
                                    f"got {saved.dtype}")
            inputs = (dy, xp.ascontiguousarray(saved))
        elif mode == "avg":
            inputs = (dy,)
        else:  # lp's gradient needs the forward output
            if saved is None:
                saved = pool2d_forward(mode, x, kernel, stride, padding, norm_type, count_include_pad)
            inputs = (dy, x, xp.ascontiguousarray(saved))
        grid, block = _launch_shape(h * w, planes)
        args = (inputs + (dx, np.int32(planes)) + _window_scalars(h, w, oh, ow, kernel, stride, padding)
                + _mode_scalars(mode, x.dtype, norm_type, count_include_pad))
        launch(get_kernel(SOURCE, f"{mode}_pool2d_backward", x.dtype), grid, block, args,
               op_name=f"{mode}_pool2d_backward", shapes=shapes)
    return dx
