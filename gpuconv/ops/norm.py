"""Batch normalization over (N, H, W) per channel of NCHW arrays (Ioffe & Szegedy 2015), PyTorch's
semantics: training normalizes by the batch's mean and biased variance; eval by running
statistics. The array-module expressions here run on the GPU as CuPy's own reductions and
elementwise kernels; NumPy arrays go to norm_cpu.py, the same math over the batch in parts and
cache-sized chunks.
"""
import numpy as np

from ..backend import get_array_module, uses_cuda_kernels
from ..errors import ShapeError
from . import norm_cpu
from ._args import check_float_array, check_same_dtype, same_device

_AXES = (0, 2, 3)  # everything but the channel


def _on_cpu(x):
    """NumPy arrays of norm_cpu.MIN_BYTES or more run in norm_cpu.py (the batch in parts over the
    cores); CuPy arrays, the CUDA emulator's, and smaller arrays run the array-module expressions
    here."""
    return isinstance(x, np.ndarray) and x.nbytes >= norm_cpu.MIN_BYTES and not uses_cuda_kernels(x)


def _per_channel(v):
    return v.reshape(1, -1, 1, 1)


def _check(x, weight, bias):
    check_float_array(x, "x", 4)
    channels = x.shape[1]
    for name, v in (("weight", weight), ("bias", bias)):
        if v is not None:
            same_device(x, v)
            if tuple(v.shape) != (channels,):
                raise ShapeError(f"{name}: expected shape ({channels},), one value per channel of x "
                                 f"{tuple(x.shape)}, got {tuple(v.shape)}")
    # one dtype: with a float64 weight, the whole-array expressions would give a float64 y and
    # norm_cpu (larger arrays) a float32 one
    check_same_dtype(x=x, weight=weight, bias=bias)


def batch_norm2d(x, weight, bias, mean=None, var=None, eps=1e-5):
    """-> (y, mean, var, invstd). With mean/var None (training) they are the batch's statistics over
    N, H, W (biased variance); else the given running statistics are used. y = (x - mean) * invstd
    * weight + bias; weight/bias None mean 1 and 0."""
    _check(x, weight, bias)
    xp = get_array_module(x)
    on_cpu = _on_cpu(x)
    if on_cpu:
        x = np.ascontiguousarray(x)
    if mean is None:
        if x.shape[0] * x.shape[2] * x.shape[3] < 2:
            raise ShapeError(f"x: batch norm in training needs more than one value per channel, got "
                             f"shape {tuple(x.shape)}; use a larger batch or model.eval()")
        mean, var = norm_cpu.batch_stats(x) if on_cpu else (x.mean(axis=_AXES), x.var(axis=_AXES))
    invstd = 1 / xp.sqrt(var.astype(x.dtype) + x.dtype.type(eps))
    mean = mean.astype(x.dtype)
    scale = invstd if weight is None else invstd * weight
    if on_cpu:
        return norm_cpu.normalize(x, mean, scale, bias), mean, var, invstd
    y = (x - _per_channel(mean)) * _per_channel(scale)
    if bias is not None:
        y += _per_channel(bias)
    return y, mean, var, invstd


def batch_norm2d_backward(dy, x, weight, mean, invstd, training=True, need_dx=True):
    """Gradients of batch_norm2d -> (dx or None, dweight, dbias). training=True differentiates
    through the batch statistics too; training=False treats mean and invstd as constants."""
    check_float_array(dy, "dy", 4)
    check_same_dtype(dy=dy, x=x, weight=weight)
    if dy.shape != x.shape:
        raise ShapeError(f"dy: expected x's shape {tuple(x.shape)}, got {tuple(dy.shape)}")
    scale = invstd if weight is None else invstd * weight
    if _on_cpu(x):
        return norm_cpu.backward(np.ascontiguousarray(dy), np.ascontiguousarray(x), mean, invstd, scale,
                                 training, need_dx)
    xhat = (x - _per_channel(mean)) * _per_channel(invstd)
    dbias = dy.sum(axis=_AXES)
    dweight = (dy * xhat).sum(axis=_AXES)
    if not need_dx:
        return None, dweight, dbias
    if not training:
        return dy * _per_channel(scale), dweight, dbias
    count = x.dtype.type(x.shape[0] * x.shape[2] * x.shape[3])
    # dx = scale * (dy - mean(dy) - xhat * mean(dy * xhat)), the three terms of d/dx through mean and var
    dx = dy - _per_channel(dbias / count)
    dx -= xhat * _per_channel(dweight / count)
    dx *= _per_channel(scale)
    return dx, dweight, dbias
