"""Optimizers and schedules against the formulas, written out by hand."""
import math

import numpy as np
import pytest

from gpuconv import optim
from gpuconv.errors import ArgumentError, CheckpointError
from gpuconv.nn import Parameter


def make_param(value=(1.0, -2.0), grad=(0.5, 0.25)):
    p = Parameter(np.array(value, np.float64))
    p.grad = np.array(grad, np.float64)
    return p


def test_sgd_plain_momentum_and_nesterov_follow_pytorch_formulas():
    p = make_param()
    optim.SGD([p], lr=0.1).step()
    np.testing.assert_allclose(p.data, [1 - 0.05, -2 - 0.025])

    p, g = make_param(), np.array([0.5, 0.25])
    opt = optim.SGD([p], lr=0.1, momentum=0.9)
    opt.step()
    opt.step()  # v1 = g, v2 = 0.9 g + g
    np.testing.assert_allclose(p.data, np.array([1.0, -2.0]) - 0.1 * (g + 1.9 * g))

    p = make_param()
    opt = optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    opt.step()
    grad = g + 0.01 * np.array([1.0, -2.0])
    np.testing.assert_allclose(p.data, np.array([1.0, -2.0]) - 0.1 * (grad + 0.9 * grad))


def test_adam_first_step_moves_each_weight_by_lr():
    p = make_param()
    optim.Adam([p], lr=0.01).step()
    # with bias correction the first step is lr * g / (|g| + eps) = lr * sign(g)
    np.testing.assert_allclose(p.data, [1 - 0.01, -2 - 0.01], rtol=1e-6)


def test_float32_parameters_stay_float32():
    p = Parameter(np.ones(3, np.float32))
    p.grad = np.ones(3, np.float32)
    for opt in (optim.SGD([p], lr=0.1, momentum=0.9), optim.Adam([p])):
        opt.step()
        assert p.data.dtype == np.float32


def test_schedules():
    p = make_param()
    opt = optim.SGD([p], lr=1.0)
    cosine = optim.CosineAnnealingLR(opt, T_max=4)
    lrs = []
    for _ in range(4):
        cosine.step()
        lrs.append(opt.lr)
    np.testing.assert_allclose(lrs, [(1 + math.cos(math.pi * k / 4)) / 2 for k in range(1, 5)])
    opt = optim.SGD([p], lr=1.0)
    step = optim.StepLR(opt, step_size=2, gamma=0.5)
    lrs = []
    for _ in range(4):
        step.step()
        lrs.append(opt.lr)
    assert lrs == [1.0, 0.5, 0.5, 0.25]


@pytest.mark.parametrize("lr", [0, -0.1, float("nan"), float("inf")])
def test_learning_rate_must_be_positive_and_finite(lr):
    with pytest.raises(ArgumentError, match="lr"):
        optim.SGD([make_param()], lr=lr)


def test_optimizer_argument_errors():
    with pytest.raises(ArgumentError, match="params"):
        optim.SGD([], lr=0.1)
    with pytest.raises(ArgumentError, match="nesterov"):
        optim.SGD([make_param()], lr=0.1, nesterov=True)
    with pytest.raises(ArgumentError, match="betas"):
        optim.Adam([make_param()], betas=(0.9, 1.0))


def test_state_dict_round_trip_continues_identically():
    a, b = make_param(), make_param()
    opt_a = optim.Adam([a], lr=0.1)
    opt_a.step()
    opt_b = optim.Adam([b], lr=0.1).load_state_dict(opt_a.state_dict())
    b.data = a.data.copy()
    opt_a.step()
    opt_b.step()
    np.testing.assert_array_equal(a.data, b.data)
    with pytest.raises(CheckpointError, match="steps"):
        optim.Adam([b]).load_state_dict({"lr": 0.1, "initial_lr": 0.1})


def test_zero_grad_clears_and_step_skips_parameters_without_a_gradient():
    """Gradients accumulate in p.grad until zero_grad() sets them to None; step() then leaves a
    parameter with no gradient alone (as torch.optim does)."""
    p, q = make_param(), make_param()
    opt = optim.SGD([p, q], lr=0.1, momentum=0.9)
    q.grad = None
    opt.step()
    np.testing.assert_allclose(p.data, [1 - 0.05, -2 - 0.025])
    np.testing.assert_array_equal(q.data, [1.0, -2.0])
    assert opt.state["velocity"][1] is None
    opt.zero_grad()
    assert p.grad is None and q.grad is None


def test_a_step_from_backward_follows_the_formula():
    """The training step of the tape: loss.backward() fills p.grad, step() uses it."""
    p = Parameter(np.array([1.0, -2.0]))
    opt = optim.SGD([p], lr=0.1)
    loss = (p ** 2).sum()  # d/dp = 2p
    opt.zero_grad()
    loss.backward()
    np.testing.assert_allclose(p.grad, [2.0, -4.0])
    opt.step()
    np.testing.assert_allclose(p.data, [1.0 - 0.2, -2.0 + 0.4])
    (p ** 2).sum().backward()
    (p ** 2).sum().backward()  # without zero_grad the two gradients add up
    np.testing.assert_allclose(p.grad, [2.0 + 4 * 0.8, -4.0 - 4 * 1.6])
