"""Numerical gradient checking, DeZero-style: compare an op's analytic backward with central
differences of its forward.

    from gpuconv.gradcheck import gradcheck
    gradcheck(lambda x, w: ops.conv2d(x, w, stride=2),
              [x, w],
              lambda dy, x, w: ops.conv2d_backward(dy, x, w, stride=2, need_bias=False)[:2])

Check in float64 (inputs are cast to it): float32 central differences are too noisy to tell a
small bug from rounding. Tiny shapes are enough; the cost is two forward calls per input element.
"""
import numpy as np

from .backend import get_array_module


def _to_numpy(a):
    xp = get_array_module(a)
    return a.get() if xp is not np else np.asarray(a)


def numerical_grad(f, x, eps=1e-6, dy=None):
    """Gradient of sum(f(x) * dy) with respect to x by central differences, as float64.

    f takes one array and returns an array (or a scalar); dy defaults to ones. x is not modified
    (a float64 copy is perturbed one element at a time).
    """
    x = np.array(_to_numpy(x), dtype=np.float64)  # a fresh copy we are free to perturb
    grad = np.zeros_like(x)
    flat_x, flat_grad = x.reshape(-1), grad.reshape(-1)

    def weighted(value):
        value = np.asarray(_to_numpy(value), dtype=np.float64)
        return float(np.sum(value if dy is None else value * dy))

    for i in range(flat_x.size):
        original = flat_x[i]
        flat_x[i] = original + eps
        plus = weighted(f(x))
        flat_x[i] = original - eps
        minus = weighted(f(x))
        flat_x[i] = original
        flat_grad[i] = (plus - minus) / (2 * eps)
    return grad


def assert_allclose_grad(name, analytic, numeric, rtol, atol):
    """Raise AssertionError naming the worst element (index, both values) when they disagree."""
    analytic = np.asarray(_to_numpy(analytic), dtype=np.float64)
    if analytic.shape != numeric.shape:
        raise AssertionError(f"{name}: analytic gradient has shape {analytic.shape}, "
                             f"expected {numeric.shape}")
    excess = np.abs(analytic - numeric) - (atol + rtol * np.abs(numeric))
    excess = np.where(np.isnan(excess), np.inf, excess)  # a NaN on either side is a failure
    if excess.size and excess.max() > 0:
        worst = np.unravel_index(int(np.argmax(excess)), excess.shape)
        bad = int((excess > 0).sum())
        raise AssertionError(
            f"{name}: gradient mismatch at {bad} of {excess.size} elements; worst at index "
            f"{tuple(int(i) for i in worst)}: analytic {analytic[worst]!r}, numerical "
            f"{numeric[worst]!r} (rtol={rtol}, atol={atol})")


def gradcheck(f, inputs, grads, dy=None, eps=1e-6, rtol=1e-5, atol=1e-6, seed=0):
    """Check analytic gradients of f(*inputs) against central differences.

    inputs: a list of arrays (cast to float64). grads: either a callable grads(dy, *inputs)
    returning one gradient per input (None to skip an input), or that list already computed for
    the given dy. dy: the output gradient; random (seeded) by default, which catches more bugs
    than ones. Returns None; raises AssertionError with the worst index and both values.
    """
    inputs = [np.array(_to_numpy(a), dtype=np.float64) for a in inputs]
    out_shape = np.shape(_to_numpy(f(*inputs)))
    if dy is None:
        if not callable(grads):
            raise ValueError("gradcheck: pass dy when grads are precomputed, so both sides use it")
        dy = np.random.default_rng(seed).standard_normal(out_shape)
    dy = np.asarray(_to_numpy(dy), dtype=np.float64)
    analytic = grads(dy, *inputs) if callable(grads) else grads
    analytic = list(analytic) if isinstance(analytic, (list, tuple)) else [analytic]
    if len(analytic) != len(inputs):
        raise AssertionError(f"grads returned {len(analytic)} gradients for {len(inputs)} inputs")
    for k, (grad, x) in enumerate(zip(analytic, inputs)):
        if grad is None:
            continue

        def f_of_one(value, k=k):
            args = list(inputs)
            args[k] = value
            return f(*args)

        assert_allclose_grad(f"input {k}", grad, numerical_grad(f_of_one, x, eps, dy), rtol, atol)
