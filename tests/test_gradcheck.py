"""The gradient-check helper itself: it must pass right gradients and catch wrong ones."""
import numpy as np
import pytest

from gpuconv.gradcheck import gradcheck, numerical_grad


def test_numerical_grad_of_a_square_is_twice_x():
    x = np.array([[1.0, -2.0], [0.5, 3.0]])
    np.testing.assert_allclose(numerical_grad(lambda v: v ** 2, x), 2 * x, rtol=1e-8)


def test_numerical_grad_weights_by_dy_and_leaves_x_alone():
    x = np.array([1.0, 2.0, 3.0])
    before = x.copy()
    dy = np.array([1.0, 0.0, -2.0])
    np.testing.assert_allclose(numerical_grad(np.sin, x, dy=dy), np.cos(x) * dy, rtol=1e-8)
    np.testing.assert_array_equal(x, before)


def test_numerical_grad_works_in_float64_for_float32_input():
    x = np.float32([0.1, 0.2])
    grad = numerical_grad(lambda v: np.exp(v), x, eps=1e-6)
    assert grad.dtype == np.float64
    np.testing.assert_allclose(grad, np.exp(x.astype(np.float64)), rtol=1e-6)


def test_gradcheck_accepts_correct_gradients_of_several_inputs():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((4, 2))
    gradcheck(lambda a, b: a @ b, [a, b], lambda dy, a, b: (dy @ b.T, a.T @ dy))


def test_gradcheck_skips_inputs_whose_gradient_is_none():
    a, b = np.ones(3), np.ones(3)
    gradcheck(lambda a, b: a * b, [a, b], lambda dy, a, b: (dy * b, None))


def test_gradcheck_reports_the_worst_index_and_both_values():
    x = np.array([1.0, 2.0, 3.0])

    def wrong(dy, x):
        grad = 2 * x * dy
        grad[1] += 0.5
        return (grad,)

    with pytest.raises(AssertionError, match=r"input 0.*1 of 3 elements.*index \(1,\).*analytic.*numerical"):
        gradcheck(lambda x: x ** 2, [x], wrong)


def test_gradcheck_with_precomputed_gradients_needs_dy():
    x = np.array([1.0, 2.0])
    gradcheck(lambda x: x ** 2, [x], [2 * x], dy=np.ones(2))
    with pytest.raises(ValueError, match="dy"):
        gradcheck(lambda x: x ** 2, [x], [2 * x])


def test_gradcheck_rejects_wrong_shape_or_count():
    x = np.ones((2, 2))
    with pytest.raises(AssertionError, match="shape"):
        gradcheck(lambda x: x * 3, [x], lambda dy, x: (np.ones(4),))
    with pytest.raises(AssertionError, match="2 gradients for 1 inputs"):
        gradcheck(lambda x: x * 3, [x], lambda dy, x: (dy, dy))


def test_gradcheck_treats_nan_gradient_as_failure():
    with pytest.raises(AssertionError):
        gradcheck(lambda x: x * 3, [np.ones(2)], lambda dy, x: (np.full(2, np.nan),))


def test_gradcheck_passes_an_array_level_op_pair():
    """The documented use: an op's forward/backward pair of gpuconv.ops against central differences."""
    from gpuconv import ops
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((1, 2, 5, 5)), rng.standard_normal((3, 2, 3, 3))
    gradcheck(lambda x, w: ops.conv2d(x, w, stride=2), [x, w],
              lambda dy, x, w: ops.conv2d_backward(dy, x, w, stride=2, need_bias=False)[:2])


def test_gradcheck_passes_the_tape_of_a_tensor_op():
    """Gradients the tape computes (x.grad after backward(dy)) check against the op's forward."""
    import gpuconv
    from gpuconv import functional as F
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((2, 1, 4, 4)), rng.standard_normal((2, 1, 2, 2))

    def tape(dy, x, w):
        tx, tw = gpuconv.tensor(x, requires_grad=True), gpuconv.tensor(w, requires_grad=True)
        F.relu(F.conv2d(tx, tw, padding=1)).backward(dy)
        return tx.grad, tw.grad

    gradcheck(lambda x, w: F.relu(F.conv2d(x, w, padding=1)).data, [x + 0.01, w], tape)
