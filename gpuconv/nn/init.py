"""Weight initialisers, drawn on the CPU from a seeded generator so every device starts from the
same numbers (the model is moved afterwards).

fan_in = in_channels/groups * kH * kW for a conv (the size of one local receptive field), in_features
for a dense layer.
"""
import math

import numpy as np

_default_rng = np.random.default_rng(0)


def manual_seed(seed):
    """Re-seed the generator layers draw from when no `rng` is given (like torch.manual_seed)."""
    global _default_rng
    _default_rng = np.random.default_rng(seed)


def default_rng():
    return _default_rng


def fans(shape):
    receptive_field = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return shape[1] * receptive_field, shape[0] * receptive_field


def he_normal(shape, rng, dtype=np.float32):
    """Kaiming He et al. 2015: std sqrt(2 / fan_in), for ReLU networks."""
    fan_in, _ = fans(shape)
    return (rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(dtype)


def glorot_uniform(shape, rng, dtype=np.float32):
    """Glorot & Bengio 2010: U(-a, a), a = sqrt(6 / (fan_in + fan_out)), for tanh/sigmoid."""
    fan_in, fan_out = fans(shape)
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, shape).astype(dtype)


def lecun_normal(shape, rng, dtype=np.float32):
    """LeCun et al. 1998: std sqrt(1 / fan_in)."""
    fan_in, _ = fans(shape)
    return (rng.standard_normal(shape) * math.sqrt(1.0 / fan_in)).astype(dtype)


INITIALIZERS = {"he": he_normal, "glorot": glorot_uniform, "lecun": lecun_normal}


def initialize(shape, scheme, rng=None, dtype=np.float32):
    if scheme not in INITIALIZERS:
        from ..errors import ArgumentError
        raise ArgumentError(f"init: expected one of {sorted(INITIALIZERS)}, got {scheme!r}")
    return INITIALIZERS[scheme](shape, rng if rng is not None else _default_rng, dtype)
