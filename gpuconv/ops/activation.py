"""Elementwise activations and dropout, forward/backward pairs on NumPy or CuPy arrays.

Each op is a few array-module calls; on the GPU, ReLU's backward is one kernel of its own
(ops/elementwise_cuda.py) instead of CuPy's compare and select. On the CPU, ReLU's forward and
backward on large C-contiguous float32 or float64 arrays (RELU_MIN_BYTES, and
cpu_parts.ELEMENTWISE_MIN_BYTES) run in parts over the cores (cpu_parts.elementwise), where NumPy
would run one whole-array call on one core: the same bits either way.
Backward functions take whichever of x or y makes the gradient cheapest (PyTorch does the same).
"""
import numbers

import numpy as np

from ..backend import get_array_module, uses_cuda_kernels
from ..errors import ArgumentError, DTypeError, ShapeError
from . import cpu_parts
from ._args import check_float_array, check_same_dtype, same_device


def _prepare(x, name="x"):
    check_float_array(x, name)
    return get_array_module(x).ascontiguousarray(x)


def _prepare_pair(dy, other, other_name):
    check_float_array(dy, "dy")
    check_float_array(other, other_name)
    same_device(dy, other)
    check_same_dtype(dy=dy, **{other_name: other})
    if dy.shape != other.shape:
        raise ShapeError(f"dy: expected the shape of {other_name}, {tuple(other.shape)}, got {tuple(dy.shape)}")
    xp = get_array_module(dy)
    return xp, xp.ascontiguousarray(dy), other


_IN_PARTS_DTYPES = (np.float32, np.float64)
# ReLU's forward only streams memory, which one core nearly keeps up with: in parts it ran 1.0-1.2x
# as fast on 8 MiB, 1.00-1.06x on 6 MiB and mostly slower on 4 MiB (median of five runs 0.93x) on a
# 2-core VM. Its backward, a mask and an AND, gains from cpu_parts.ELEMENTWISE_MIN_BYTES up.
RELU_MIN_BYTES = 8 << 20


def _in_parts(*arrays, min_bytes=None):
    """Large C-contiguous float32/float64 NumPy arrays: ReLU runs them in parts over the cores."""
    return arrays[0].dtype in _IN_PARTS_DTYPES and cpu_parts.elementwise_in_parts(*arrays, min_bytes=min_bytes)


def relu(x):
    """max(x, 0); NaN stays NaN."""
    x = _prepare(x)
    if _in_parts(x, min_bytes=RELU_MIN_BYTES):
        return cpu_parts.elementwise(_relu_into, x)
    return get_array_module(x).maximum(x, 0)


def _relu_into(x, out):
    np.maximum(x, 0, out=out)


def relu_backward(dy, x):
    """dy where x > 0, else 0. Passing relu's output y instead of x gives the same result."""
    xp, dy, x = _prepare_pair(dy, x, "x")
    if uses_cuda_kernels(dy):
        from . import elementwise_cuda
        return elementwise_cuda.relu_backward(dy, x)
    if _in_parts(dy, x):  # a non-contiguous x takes the whole-array call below, as it did
        return cpu_parts.elementwise(_keep_where_positive, dy, x)
    if xp is np and dy.dtype.itemsize in _SAME_SIZE_INTS:
        return _keep_where_positive(dy, x)
    return xp.where(x > 0, dy, 0)


def _keep_where_positive(dy, x, out=None):
    """dy where x > 0, else +0 (also where dy is NaN, as np.where would give): dy's bits ANDed with
    a mask of all ones or all zeros, into `out` if given (dy's dtype and shape). np.where picks
    element by element and took several times as long on an activation of mixed signs
    (docs/performance.md, "Any CNN on the CPU, session 6")."""
    ints = _SAME_SIZE_INTS[dy.dtype.itemsize]
    mask = np.negative(np.greater(x, 0).view(np.int8))  # -1 (every bit set) where x > 0, else 0
    out_ints = None if out is None else out.view(ints)
    return np.bitwise_and(dy.view(ints), mask, out=out_ints, dtype=ints).view(dy.dtype)


_SAME_SIZE_INTS = {2: np.int16, 4: np.int32, 8: np.int64}


def tanh(x):
    x = _prepare(x)
    return get_array_module(x).tanh(x)


def tanh_backward(dy, y):
    """dy * (1 - y**2), with y = tanh(x)."""
    xp, dy, y = _prepare_pair(dy, y, "y")
    grad = xp.multiply(y, y)
    xp.subtract(1, grad, out=grad)
    grad *= dy
    return grad


def sigmoid(x):
    """1 / (1 + exp(-x)), evaluated through exp(-|x|) so it neither overflows nor loses the tails."""
    x = _prepare(x)
    xp = get_array_module(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1, e) / (1 + e)


def sigmoid_backward(dy, y):
    """dy * y * (1 - y), with y = sigmoid(x)."""
    xp, dy, y = _prepare_pair(dy, y, "y")
    grad = xp.subtract(1, y)
    grad *= y
    grad *= dy
    return grad


def _check_p(p):
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p < 1:
        raise ArgumentError(f"p: expected a drop probability in [0, 1), got {p!r}")
    return float(p)


def dropout(x, p, rng=None, mask=None):
    """Inverted dropout -> (y, mask): y = x * mask / (1 - p), mask True where x is kept.

    rng: a numpy.random.Generator (or cupy.random.Generator) that draws the mask; None draws from
    a fresh unseeded one. On a GPU the mask is drawn there, by a CuPy generator seeded once from a
    NumPy `rng`. Pass `mask` instead to replay a mask. Each element is kept with
    probability 1 - p, and the scaling keeps the expected value of y equal to x.
    """
    p = _check_p(p)
    x = _prepare(x)
    xp = get_array_module(x)
    if mask is None:
        if rng is not None and not hasattr(rng, "random"):
            raise ArgumentError(f"rng: expected a numpy.random.Generator, got {type(rng).__name__}; "
                                "create one with numpy.random.default_rng(seed)")
        if xp.__name__ == "cupy":
            # Drawn on the GPU: a host mask would be drawn and copied every step.
            generator = rng if type(rng).__module__.startswith("cupy") else \
                _device_generator(xp, rng, device_id_of(x))
            mask = generator.random(x.shape, dtype=np.float32) >= p
        else:
            rng = np.random.default_rng() if rng is None else rng
            mask = xp.asarray(rng.random(x.shape, dtype=np.float32) >= p)
    else:
        _check_mask(mask, x.shape)
        same_device(x, mask)
    y = xp.multiply(x, mask)
    y *= 1.0 / (1.0 - p)
    return y, mask


# id(host Generator) -> (that Generator, {device id: CuPy Generator}). NumPy Generators take no weak
# references; holding the Generator keeps its id from being reused. One entry per Dropout layer.
_device_generators = {}
_unseeded_generators = {}  # device id -> CuPy Generator, for rng=None


def device_id_of(x):
    return x.device.id


def _device_generator(xp, rng, device_id):
    """The CuPy generator that stands for the host Generator `rng` on GPU `device_id`: seeded once
    from `rng`, so a seeded layer (nn.Dropout(seed=...)) gives a reproducible sequence of masks on
    each device, and then kept, so no state is set up per call."""
    if rng is None:
        generator = _unseeded_generators.get(device_id)
        if generator is None:
            generator = _unseeded_generators[device_id] = xp.random.default_rng()
        return generator
    per_device = _device_generators.setdefault(id(rng), (rng, {}))[1]
    generator = per_device.get(device_id)
    if generator is None:
        generator = per_device[device_id] = xp.random.default_rng(int(rng.integers(2 ** 63)))
    return generator


def _check_mask(mask, shape):
    if not hasattr(mask, "dtype") or mask.dtype != np.bool_:
        raise DTypeError(f"mask: expected the boolean array dropout returned, got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)}")
    if tuple(mask.shape) != tuple(shape):
        raise ShapeError(f"mask: expected shape {tuple(shape)}, got {tuple(mask.shape)}")


def dropout_backward(dy, mask, p):
    """dy * mask / (1 - p), with the mask dropout returned."""
    p = _check_p(p)
    dy = _prepare(dy, "dy")
    _check_mask(mask, dy.shape)
    same_device(dy, mask)
    grad = get_array_module(dy).multiply(dy, mask)
    grad *= 1.0 / (1.0 - p)
    return grad


def leaky_relu(x, negative_slope=0.01):
    """x where x > 0, else negative_slope * x."""
    x = _prepare(x)
    xp = get_array_module(x)
    return xp.where(x > 0, x, x * x.dtype.type(negative_slope))


def leaky_relu_backward(dy, x, negative_slope=0.01):
    """dy where x > 0, else negative_slope * dy."""
    xp, dy, x = _prepare_pair(dy, x, "x")
    return xp.where(x > 0, dy, dy * dy.dtype.type(negative_slope))
