"""Activations, dropout, linear and softmax cross-entropy: values, float64 gradient checks,
dtype preservation and layout handling."""
import numpy as np
import pytest

from gpuconv.gradcheck import gradcheck
from gpuconv.ops import (cross_entropy, cross_entropy_backward, dropout, dropout_backward, linear,
                         linear_backward, log_softmax, relu, relu_backward, sigmoid, sigmoid_backward,
                         softmax, softmax_cross_entropy, tanh, tanh_backward)

DTYPES = [np.float32, np.float64]


def away_from_zero(shape, seed=0):
    """Random values with |x| >= 0.1, so relu is differentiable wherever the gradcheck probes."""
    x = np.random.default_rng(seed).uniform(0.1, 2.0, shape)
    return x * np.where(np.random.default_rng(seed + 1).random(shape) < 0.5, -1, 1)


# -- activations -------------------------------------------------------------------------------

ACTIVATIONS = {
    # name: (forward, backward taking (dy, x, y), reference)
    "relu": (relu, lambda dy, x, y: relu_backward(dy, x), lambda x: np.where(x > 0, x, 0.0)),
    "tanh": (tanh, lambda dy, x, y: tanh_backward(dy, y), np.tanh),
    "sigmoid": (sigmoid, lambda dy, x, y: sigmoid_backward(dy, y), lambda x: 1 / (1 + np.exp(-x))),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4, 5)])
def test_activation_forward(name, dtype, shape):
    forward, _, reference = ACTIVATIONS[name]
    x = away_from_zero(shape).astype(dtype)
    y = forward(x)
    assert y.dtype == dtype and y.shape == shape and y.flags.c_contiguous
    np.testing.assert_allclose(y, reference(x.astype(np.float64)), rtol=1e-6 if dtype == np.float32 else 1e-14)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_gradient(name):
    forward, backward, _ = ACTIVATIONS[name]
    x = away_from_zero((2, 3, 4, 3))
    gradcheck(forward, [x], lambda dy, x: backward(dy, x, forward(x)))


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_float32_gradient_matches_float64(name):
    forward, backward, _ = ACTIVATIONS[name]
    x, dy = away_from_zero((4, 5)), np.random.default_rng(5).standard_normal((4, 5))
    g64 = backward(dy, x, forward(x))
    x32, dy32 = x.astype(np.float32), dy.astype(np.float32)
    g32 = backward(dy32, x32, forward(x32))
    assert g32.dtype == np.float32
    np.testing.assert_allclose(g32, g64, rtol=1e-5, atol=1e-6)


def test_relu_keeps_nan_and_backward_accepts_output():
    x = np.array([-1.0, 0.0, 2.0, np.nan])
    y = relu(x)
    assert np.isnan(y[3]) and list(y[:3]) == [0.0, 0.0, 2.0]
    dy = np.ones(3)
    np.testing.assert_array_equal(relu_backward(dy, x[:3]), relu_backward(dy, y[:3]))
    np.testing.assert_array_equal(relu_backward(dy, x[:3]), [0.0, 0.0, 1.0])


def test_sigmoid_is_stable_in_the_tails():
    x = np.array([-1000.0, -40.0, 0.0, 40.0, 1000.0])
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        y = sigmoid(x)
    np.testing.assert_allclose(y, [0.0, np.exp(-40.0), 0.5, 1.0, 1.0], rtol=1e-12, atol=0)
    assert sigmoid(np.float32([-200, 200])).tolist() == [0.0, 1.0]


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_non_contiguous_input(name):
    forward, backward, _ = ACTIVATIONS[name]
    x = away_from_zero((4, 6)).astype(np.float32)
    odd = np.asfortranarray(x)[::-1][::-1]
    np.testing.assert_array_equal(forward(odd), forward(x))
    assert forward(odd).flags.c_contiguous
    dy = np.ones_like(x)
    np.testing.assert_array_equal(backward(np.asfortranarray(dy), odd, forward(odd)), backward(dy, x, forward(x)))


# -- dropout -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.25, 0.5, 0.9])
def test_dropout_scales_kept_values_and_keeps_1_minus_p(p, dtype):
    x = np.random.default_rng(0).standard_normal((200, 100)).astype(dtype)
    y, mask = dropout(x, p, np.random.default_rng(1))
    assert y.dtype == dtype and mask.dtype == np.bool_ and mask.shape == x.shape
    np.testing.assert_allclose(y, np.where(mask, x / (1 - p), 0), rtol=1e-6)
    assert abs(mask.mean() - (1 - p)) < 0.01
    dy = np.random.default_rng(2).standard_normal(x.shape).astype(dtype)
    dx = dropout_backward(dy, mask, p)
    assert dx.dtype == dtype
    np.testing.assert_allclose(dx, np.where(mask, dy / (1 - p), 0), rtol=1e-6)


def test_dropout_is_reproducible_and_replays_a_mask():
    x = np.ones((5, 7), np.float32)
    y1, m1 = dropout(x, 0.5, np.random.default_rng(3))
    y2, m2 = dropout(x, 0.5, np.random.default_rng(3))
    np.testing.assert_array_equal(m1, m2)
    y3, m3 = dropout(x * 2, 0.5, mask=m1)
    assert m3 is m1
    np.testing.assert_array_equal(y3, 2 * y1)


def test_dropout_gradient():
    x = np.random.default_rng(0).standard_normal((3, 4))
    _, mask = dropout(x, 0.3, np.random.default_rng(0))
    gradcheck(lambda x: dropout(x, 0.3, mask=mask)[0], [x], lambda dy, x: dropout_backward(dy, mask, 0.3))


# -- linear ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_forward(dtype, with_bias):
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((5, 4)).astype(dtype), rng.standard_normal((3, 4)).astype(dtype)
    b = rng.standard_normal(3).astype(dtype) if with_bias else None
    y = linear(x, w, b)
    expected = np.array([[sum(x[n, i] * float(w[o, i]) for i in range(4)) for o in range(3)] for n in range(5)])
    if with_bias:
        expected += b
    assert y.dtype == dtype and y.shape == (5, 3) and y.flags.c_contiguous
    np.testing.assert_allclose(y, expected, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)


def test_linear_gradient():
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((4, 6)), rng.standard_normal((3, 6)), rng.standard_normal(3)
    gradcheck(linear, [x, w, b], lambda dy, x, w, b: linear_backward(dy, x, w))


def test_linear_backward_without_dx_and_odd_layouts():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal((3, 6)).astype(np.float32)
    dy = rng.standard_normal((4, 3)).astype(np.float32)
    dx, dw, db = linear_backward(dy, x, w)
    none, dw2, db2 = linear_backward(np.asfortranarray(dy), x[::-1][::-1], np.asfortranarray(w), need_dx=False)
    assert none is None and dw2.dtype == np.float32
    np.testing.assert_allclose(dw2, dw, rtol=1e-6)
    np.testing.assert_allclose(db2, db, rtol=1e-6)
    np.testing.assert_allclose(linear(np.asfortranarray(x), w), linear(x, w), rtol=1e-6)


# -- softmax and the loss ----------------------------------------------------------------------

def reference_cross_entropy(logits, labels):
    logits = logits.astype(np.float64)
    losses = [np.log(np.sum(np.exp(row))) - row[label] for row, label in zip(logits, labels)]
    return float(np.mean(losses))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label_dtype", [np.int64, np.int32, np.uint8])
def test_cross_entropy_value_and_gradient(dtype, label_dtype):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 10)).astype(dtype)
    labels = rng.integers(0, 10, 6).astype(label_dtype)
    loss, dlogits = softmax_cross_entropy(logits, labels)
    assert isinstance(loss, float) and dlogits.dtype == dtype and dlogits.shape == logits.shape
    assert loss == pytest.approx(reference_cross_entropy(logits, labels), rel=1e-6)
    expected = softmax(logits.astype(np.float64))
    expected[np.arange(6), labels] -= 1
    np.testing.assert_allclose(dlogits, expected / 6, rtol=1e-5, atol=1e-7)


def test_cross_entropy_gradcheck():
    rng = np.random.default_rng(1)
    logits, labels = rng.standard_normal((5, 4)), rng.integers(0, 4, 5)
    dlogits = softmax_cross_entropy(logits, labels)[1]
    gradcheck(lambda z: softmax_cross_entropy(z, labels)[0], [logits], [dlogits], dy=np.float64(1.0))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_cross_entropy_pair_gradcheck(reduction, label_smoothing):
    """The pair F.cross_entropy's autograd Function calls (and the training step with it)."""
    rng = np.random.default_rng(2)
    logits, labels = rng.standard_normal((5, 4)), rng.integers(0, 4, 5)
    forward = lambda z: cross_entropy(z, labels, reduction, label_smoothing)[0]  # noqa: E731
    dloss = rng.standard_normal(5) if reduction == "none" else np.float64(rng.standard_normal())
    _, probs = cross_entropy(logits, labels, reduction, label_smoothing)
    dlogits = cross_entropy_backward(dloss, probs, labels, reduction, label_smoothing)
    gradcheck(forward, [logits], [dlogits], dy=dloss)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_pair_matches_softmax_cross_entropy(dtype):
    rng = np.random.default_rng(3)
    logits, labels = rng.standard_normal((6, 10)).astype(dtype), rng.integers(0, 10, 6)
    loss, probs = cross_entropy(logits, labels)
    dlogits = cross_entropy_backward(np.ones((), dtype), probs, labels)
    expected_loss, expected_dlogits = softmax_cross_entropy(logits, labels)
    assert loss.dtype == dlogits.dtype == dtype and loss.shape == ()
    assert float(loss) == pytest.approx(expected_loss, rel=1e-6)
    np.testing.assert_allclose(dlogits, expected_dlogits, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_is_stable_for_huge_logits(dtype):
    logits = np.array([[1000.0, 0.0, -1000.0], [-5e4, 5e4, 0.0]], dtype)
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        loss, dlogits = softmax_cross_entropy(logits, np.array([0, 0]))
    assert loss == pytest.approx(1e5 / 2, rel=1e-6)
    assert np.isfinite(dlogits).all()


def test_softmax_and_log_softmax():
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32) * 50
    s, ls = softmax(x), log_softmax(x)
    assert s.dtype == ls.dtype == np.float32
    np.testing.assert_allclose(s.sum(axis=1), 1, rtol=1e-6)
    np.testing.assert_allclose(np.exp(ls), s, rtol=1e-5, atol=1e-30)
    np.testing.assert_allclose(softmax(x.T, axis=0), s.T, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("gpuconv").cuda_available(), reason="needs a CUDA GPU")
def test_elementwise_ops_linear_and_loss_run_on_cupy_and_match_numpy():
    import cupy
    rng = np.random.default_rng(0)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in [(4, 6), (3, 6), (3,)])
    labels = np.array([0, 2, 1, 2])
    gx, gw, gb, glabels = (cupy.asarray(a) for a in (x, w, b, labels))
    for f in (relu, tanh, sigmoid, softmax, log_softmax):
        np.testing.assert_allclose(f(gx).get(), f(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(linear(gx, gw, gb).get(), linear(x, w, b), rtol=1e-5)
    for got, want in zip(linear_backward(gx[:, :3], gx, gw), linear_backward(x[:, :3], x, w)):
        np.testing.assert_allclose(got.get(), want, rtol=1e-5)
    loss, dlogits = softmax_cross_entropy(gx, glabels)
    assert loss == pytest.approx(softmax_cross_entropy(x, labels)[0], rel=1e-5)
    loss, probs = cross_entropy(gx, glabels)
    grad = cross_entropy_backward(cupy.ones((), np.float32), probs, glabels)
    assert isinstance(loss, cupy.ndarray) and isinstance(grad, cupy.ndarray)
    np.testing.assert_allclose(grad.get(), dlogits.get(), rtol=1e-5, atol=1e-7)
    y, mask = dropout(gx, 0.5, np.random.default_rng(0))
    assert isinstance(y, cupy.ndarray) and isinstance(mask, cupy.ndarray)
    assert isinstance(dropout_backward(gx, mask, 0.5), cupy.ndarray)
