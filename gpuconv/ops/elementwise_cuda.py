"""GPU launch code for kernels/elementwise.cu: a layer's bias add fused with its ReLU, and ReLU's
backward, each one launch where CuPy would run two or three elementwise kernels."""
import numpy as np

from ..backend import device_scope, get_array_module
from ..cuda.runtime import device_errors, empty, get_kernel, launch

SOURCE = "elementwise.cu"
THREADS = 256
MAX_BLOCKS = 4096  # grid-stride beyond


def _grid(count):
    return (max(1, min(MAX_BLOCKS, -(-count // THREADS))), 1, 1), (THREADS, 1, 1)


def bias_act(y, b, inner, relu):
    """In place: y = act(y + b[channel]), channel = (flat index // inner) % len(b); act = ReLU or
    the identity. y is C-contiguous."""
    if y.size == 0:
        return y
    xp = get_array_module(y, b)
    with device_scope(y), device_errors("bias + activation", {"y": y.shape}):
        grid, block = _grid(y.size)
        launch(get_kernel(SOURCE, "bias_act", y.dtype), grid, block,
               (y, xp.ascontiguousarray(b), np.int64(y.size), np.int32(inner), np.int32(b.shape[0]), np.int32(relu)),
               op_name="bias + activation", shapes={"y": y.shape})
    return y


def relu_backward(dy, y):
    """dy where y > 0, else 0, in one launch (dy and y C-contiguous, same shape)."""
    xp = get_array_module(dy, y)
    with device_scope(dy), device_errors("relu_backward", {"dy": dy.shape}):
        dx = empty(xp, dy.shape, dy.dtype, "dx")
        if dx.size:
            grid, block = _grid(dx.size)
            launch(get_kernel(SOURCE, "relu_backward", dy.dtype), grid, block,
                   (dy, xp.ascontiguousarray(y), dx, np.int64(dx.size)), op_name="relu_backward",
                   shapes={"dy": dy.shape})
    return dx
