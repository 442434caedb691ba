"""Argument checking and normalisation shared by the NumPy ops and the CUDA launchers.

Errors name the argument, what was expected and what was given, so a user never meets a NumPy
broadcasting error from deep inside an op.
"""
import numpy as np

from ..backend import get_array_module
from ..errors import ArgumentError, DTypeError, ShapeError

SUPPORTED_DTYPES = (np.float32, np.float64)


def pair(value, name, minimum=None):
    """An int or a pair of ints -> (h, w). `minimum` bounds each entry from below."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        result = (int(value), int(value))
    elif (isinstance(value, (tuple, list)) and len(value) == 2
          and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)):
        result = (int(value[0]), int(value[1]))
    else:
        raise ArgumentError(f"{name}: expected an int or a pair of ints, got {value!r}")
    if minimum is not None and min(result) < minimum:
        raise ArgumentError(f"{name}: expected every entry >= {minimum}, got {value!r}")
    return result


def conv_output_size(size, kernel, stride, padding, dilation=1):
    """floor((W + 2P - D(K-1) - 1) / S) + 1, the textbook output size of a conv or pool window."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def check_float_array(x, name, ndim=None):
    """x must be a float32/float64 NumPy or CuPy array of rank `ndim`."""
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise DTypeError(f"{name}: expected a NumPy or CuPy array, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise DTypeError(f"{name}: expected dtype float32 or float64, got {x.dtype}; "
                         f"convert with {name}.astype(numpy.float32)")
    if ndim is not None and x.ndim != ndim:
        layout = {4: " (N, C, H, W)", 2: " (N, features)"}.get(ndim, "")
        hint = ""
        if name == "x" and x.ndim == ndim - 1 and ndim in (2, 4):
            # One image (C, H, W) or one feature vector: PyTorch's conv and pool layers would take
            # it unbatched, gpuconv's do not (a single image through LeNet-5 would then meet
            # Flatten's batch axis wrongly), so the message says how to make it a batch of one.
            hint = "; a single sample needs a batch dimension: x[None] (and take [0] of the result)"
        raise ShapeError(f"{name}: expected a {ndim}-D array{layout}, got shape {tuple(x.shape)}{hint}")


def check_same_dtype(**arrays):
    dtypes = {name: a.dtype for name, a in arrays.items() if a is not None}
    if len(set(dtypes.values())) > 1:
        given = ", ".join(f"{n}={d}" for n, d in dtypes.items())
        raise DTypeError(f"expected one dtype for all arrays, got {given}; cast them with .astype()")


def same_device(*arrays):
    """The array module of the arrays; raises DeviceMismatchError when they are on different devices."""
    return get_array_module(*arrays)


def check_input_weight_bias(x, w, b, ndim):
    """The shared checks of a layer op: x and weight float arrays of rank `ndim`, bias 1-D or None,
    all on one device and of one dtype."""
    check_float_array(x, "x", ndim)
    check_float_array(w, "weight", ndim)
    if b is not None:
        check_float_array(b, "bias", 1)
    same_device(x, w, b)
    check_same_dtype(x=x, weight=w, bias=b)
