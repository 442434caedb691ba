"""Fully connected layer: y = x @ w.T + b, with w of shape (out_features, in_features) as in PyTorch."""
import numpy as np

from ..backend import get_array_module, uses_cuda_kernels
from ..errors import ArgumentError, ShapeError
from . import cpu_parts
from ._args import check_float_array, check_input_weight_bias, check_same_dtype, same_device


def _matmul(xp, a, b):
    """a @ b; on the CPU under the parallel regions' lock (cpu_parts.alone): another thread's region
    sets OpenBLAS to one thread for its length, and its sums differ in the last bits between thread
    counts at some shapes (a weight gradient whose batch is 1000), so the bits would depend on when
    this call ran."""
    if xp is not np:
        return xp.matmul(a, b)
    return cpu_parts.alone(np.matmul, a, b)


def _check(x, w, b):
    check_input_weight_bias(x, w, b, 2)
    if x.shape[1] != w.shape[1]:
        raise ShapeError(f"x: expected {w.shape[1]} features per sample (weight.shape[1]; weight is "
                         f"(out_features, in_features)), got x shape {tuple(x.shape)}; flatten "
                         "conv outputs with x.reshape(len(x), -1)")
    if b is not None and b.shape[0] != w.shape[0]:
        raise ShapeError(f"bias: expected shape ({w.shape[0]},) to match weight.shape[0], got {tuple(b.shape)}")


def linear(x, w, b=None, activation=None):
    """x: (N, in_features), w: (out_features, in_features), b: (out_features,) or None -> (N, out).
    activation="relu" applies ReLU to the result (on a GPU fused with the bias add: one launch)."""
    _check(x, w, b)
    if activation not in (None, "relu"):
        raise ArgumentError(f"activation: expected None or 'relu', got {activation!r}")
    xp = get_array_module(x)
    y = _matmul(xp, x, w.T)  # BLAS reads the transpose in place, no copy
    relu = activation == "relu"
    if uses_cuda_kernels(x) and b is not None:
        from . import elementwise_cuda
        return elementwise_cuda.bias_act(y, b, 1, relu)
    if b is not None:
        y += b
    return xp.maximum(y, 0, out=y) if relu else y


def linear_backward(dy, x, w, need_dx=True):
    """-> (dx or None, dw, db) for y = linear(x, w, b)."""
    _check(x, w, None)
    check_float_array(dy, "dy", 2)
    same_device(dy, x)
    check_same_dtype(dy=dy, x=x)
    if dy.shape != (x.shape[0], w.shape[0]):
        raise ShapeError(f"dy: expected shape {(x.shape[0], w.shape[0])} (linear's output), got {tuple(dy.shape)}")
    xp = get_array_module(x)
    dw = _matmul(xp, dy.T, x)
    db = dy.sum(axis=0)
    dx = _matmul(xp, dy, w) if need_dx else None
    return dx, dw, db
