"""Branches concatenated along the channels in the CPU executor (nn.Concat, cpu_ops.ConcatOp): an
Inception-like block lowers into one plan op, a chain per branch writing its own block of channels,
with the eager model's results.

Each test runs a model compiled and the same model eagerly (the reference: nn.Concat's forward is
gpuconv.cat of the branches) on the same batch and compares logits, the input gradient and every
p.grad; the tape tells whether a plan ran. Every test runs with the batch's second part in a worker
process and in a worker thread.
"""
import numpy as np
import pytest

import gpuconv
from gpuconv import nn
from gpuconv.errors import ShapeError
from gpuconv.nn import cpu_plan, cpu_workers
from gpuconv.nn.cpu_ops import ConcatOp, ResidualOp
from test_compile_segments import plans_on_tape
from test_compile_residual import (batch, check_fails_as_eager, check_matches_eager, check_sgd_follows_eager,
                                   randomize_statistics, step)


pytestmark = pytest.mark.usefixtures("worker_kind")  # processes and threads, one worker (conftest.py)


def inception(channels, rng, after=None):
    """Four branches on `channels` inputs: 1x1; 1x1 -> 3x3; 5x5 -> BatchNorm; the identity."""
    return nn.Concat(
        nn.Conv2d(channels, 4, 1, rng=rng),
        nn.Sequential(nn.Conv2d(channels, 3, 1, rng=rng), nn.ReLU(), nn.Conv2d(3, 5, 3, padding=1, rng=rng)),
        nn.Sequential(nn.Conv2d(channels, 2, 5, padding=2, bias=False, rng=rng), nn.BatchNorm2d(2)),
        nn.Identity())


def inception_net(seed, after=nn.ReLU):
    rng = np.random.default_rng(seed)
    layers = [nn.Conv2d(2, 6, 3, padding=1, rng=rng), nn.ReLU(), nn.MaxPool2d(2), inception(6, rng)]
    if after is not None:
        layers.append(after())
    return nn.Sequential(*layers, nn.MaxPool2d(2), nn.Flatten(), nn.Linear(17 * 4 * 4, 5, rng=rng))


def concat_ops(compiled):
    return [op for op in compiled._plan.ops if isinstance(op, ConcatOp)]


@pytest.mark.parametrize("after", [nn.ReLU, nn.Tanh, None])
def test_inception_block_trains_as_one_plan(after):
    model = inception_net(1, after)
    model[3][2][1].eval()  # a BatchNorm in training would need the whole batch's statistics
    randomize_statistics(model, 1)
    x, labels = batch(2, (64, 2, 16, 16))
    compiled = check_matches_eager(model, x, labels)
    assert compiled.unsupported is None
    (op,) = concat_ops(compiled)
    assert [len(chain) for chain in op.branches] == [1, 3, 2, 1]
    assert [(block.start, block.stop) for block in op.blocks] == [(0, 4), (4, 9), (9, 11), (11, 17)]


def test_an_activation_after_the_concat_runs_in_place_on_its_buffer():
    model = inception_net(3, nn.ReLU)
    model.eval()
    compiled = gpuconv.compile(model)
    x, labels = batch(4, (64, 2, 16, 16))
    step(compiled, x, labels)
    ops = compiled._plan.ops
    assert isinstance(ops[1], ConcatOp) and ops[2].in_place


def test_the_input_gradient_sums_every_branch():
    """Four branches reading x, whose gradients are exact (the identity, an empty Sequential, a
    Tanh computed by the reference's formula): the sums agree to the rounding of their order (the
    reference adds the leaf's gradients in the order its graph reaches them, the plan in branch
    order)."""
    model = nn.Sequential(nn.Concat(nn.Identity(), nn.Tanh(), nn.Sequential(), nn.Identity()))
    x, _ = batch(6, (64, 3, 6, 6))
    dy = np.random.default_rng(7).standard_normal((64, 12, 6, 6)).astype(np.float32) * 1e3
    grads = []
    for net in (model, gpuconv.compile(model)):
        xt = gpuconv.tensor(x, requires_grad=True)
        out = net(xt)
        out.backward(gpuconv.tensor(dy))
        grads.append(xt.grad)
    assert len(plans_on_tape(out)) == 1
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-6, atol=1e-6 * np.abs(grads[0]).max())


def test_dense_branches_concatenate_their_features():
    """After Flatten, dim 1 is the features: [F, n] in the plan, each branch a block of rows."""
    rng = np.random.default_rng(7)
    heads = nn.Concat(nn.Linear(48, 6, rng=rng), nn.Sequential(nn.Linear(48, 3, rng=rng), nn.Tanh()))
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, rng=rng), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), heads,
                          nn.ReLU(), nn.Linear(9, 5, rng=rng))
    x, labels = batch(8, (64, 1, 8, 8))
    compiled = check_matches_eager(model, x, labels)
    assert len(concat_ops(compiled)) == 1


@pytest.mark.parametrize("last", ["plan's output", "before a linear"])
def test_branches_whose_fused_conv_pool_may_overwrite_its_gradient_block(last):
    """A branch ending in conv -> ReLU -> max pool (one fused op, which masks its output gradient in
    place when that gradient is the plan's own) beside other branches: it may write into its own
    block of the gradient only, and never into the caller's gradient (the plan's output)."""
    rng = np.random.default_rng(9)
    branches = nn.Concat(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, rng=rng), nn.ReLU(), nn.MaxPool2d(2)),
                         nn.AvgPool2d(2), nn.Sequential(nn.Conv2d(3, 2, 3, padding=1, rng=rng), nn.ReLU(),
                                                        nn.MaxPool2d(2)))
    layers = [nn.Conv2d(2, 3, 3, padding=1, rng=rng), nn.Tanh(), branches]
    if last == "before a linear":
        layers += [nn.Flatten(), nn.Linear(9 * 4 * 4, 5, rng=rng)]
    model = nn.Sequential(*layers)
    x, _ = batch(10, (64, 2, 8, 8))
    eager = model(gpuconv.tensor(x))
    dy = np.random.default_rng(11).standard_normal(eager.shape).astype(np.float32)
    kept = dy.copy()
    results = []
    for net in (model, gpuconv.compile(model)):
        for p in model.parameters():
            p.grad = None
        xt = gpuconv.tensor(x, requires_grad=True)
        out = net(xt)
        out.backward(gpuconv.tensor(dy))
        results.append([out.data, xt.grad] + [p.grad.copy() for p in model.parameters()])
        np.testing.assert_array_equal(dy, kept)  # the caller's gradient is left as it was
    for got, want in zip(results[1], results[0]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert len(plans_on_tape(out)) == 1


@pytest.mark.parametrize("concat_at", ["start", "end"])
def test_concat_and_residual_nest_with_their_buffers_apart(concat_at):
    """A Concat in a residual body (at its end, the block adds the shortcut into the Concat's own
    buffer), and a Residual as a Concat's branch: every op keys its buffers under its own
    containers (rename)."""
    rng = np.random.default_rng(12)
    inner = nn.Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, rng=rng), nn.Tanh()), activation=nn.ReLU())
    if concat_at == "start":
        concat = nn.Concat(inner, nn.Conv2d(4, 4, 1, rng=rng))
        body = nn.Sequential(concat, nn.Conv2d(8, 4, 3, padding=1, rng=rng))
    else:
        concat = nn.Concat(inner, nn.Conv2d(4, 2, 1, rng=rng), nn.Sequential(nn.Conv2d(4, 2, 3, padding=1, rng=rng)))
        body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, rng=rng), nn.ReLU(), concat)
    outer = nn.Residual(body, nn.Conv2d(4, 8, 1, rng=rng) if concat_at == "end" else None, activation=nn.ReLU())
    width = 8 if concat_at == "end" else 4
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, rng=rng), outer, nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(width * 4 * 4, 5, rng=rng))
    x, labels = batch(13, (64, 1, 8, 8))
    compiled = check_matches_eager(model, x, labels)
    block = compiled._plan.ops[1]
    (op,) = [op for op in block.body if isinstance(op, ConcatOp)]
    assert isinstance(block, ResidualOp) and block.add_in_place
    assert isinstance(block.body[-1], ConcatOp) == (concat_at == "end")
    keys = [op.index for op in block.ops() + op.ops() + op.branches[0][0].ops()]
    assert len(set(keys)) == len(keys)


def test_a_concat_along_another_dim_runs_eagerly_and_says_why():
    rng = np.random.default_rng(14)
    model = nn.Sequential(nn.Concat(nn.Conv2d(2, 3, 3, padding=1, rng=rng), nn.Conv2d(2, 3, 1, rng=rng), dim=2),
                          nn.Flatten(), nn.Linear(3 * 16 * 8, 5, rng=rng))
    x, labels = batch(15, (64, 2, 8, 8))
    compiled = gpuconv.compile(model)
    assert not compiled.uses_executor(x)
    assert "Concat: Concat along dim 2" in compiled.unsupported
    out, _, _ = step(compiled, x, labels)
    assert out.shape == (64, 5)


def test_branches_of_different_sizes_run_eagerly_with_its_error():
    rng = np.random.default_rng(16)
    model = nn.Sequential(nn.Concat(nn.Conv2d(2, 3, 3, padding=1, rng=rng), nn.Conv2d(2, 3, 3, rng=rng)))
    check_fails_as_eager(model, batch(17, (64, 2, 8, 8))[0])


def test_several_steps_of_sgd_follow_the_eager_model():
    eager, fast = inception_net(18), inception_net(18)
    for model in (eager, fast):
        model[3][2][1].eval()
    check_sgd_follows_eager(eager, fast, (64, 2, 16, 16))


# ----------------------------------------------------------------------------------------------
# the pieces


def test_worker_description_rebuilds_a_concat_as_the_same_ops():
    rng = np.random.default_rng(19)
    block = inception(3, rng)
    block.eval()
    params = block.parameters()
    index_of = {id(p): i for i, p in enumerate(params)}
    spec = cpu_workers.describe(block, index_of)
    rebuilt = cpu_workers.build(spec, params)
    assert isinstance(rebuilt, nn.Concat) and rebuilt.dim == 1 and not rebuilt.training
    original, copy = cpu_plan._Plan(), cpu_plan._Plan()
    x = np.empty((1, 3, 8, 8), np.float32)
    assert original.prepare([block], x) and copy.prepare([rebuilt], x)
    kinds = lambda plan: [[type(op).__name__ for op in chain] for chain in plan.ops[0].branches]  # noqa: E731
    assert kinds(copy) == kinds(original) == [["ConvOp"], ["ConvOp", "ActivationOp", "ConvOp"],
                                              ["ConvOp", "BatchNormEvalOp"], ["IdentityOp"]]
    assert [id(p) for p in copy.params()] == [id(p) for p in original.params()]


def test_concat_module_checks_its_arguments_names_its_children_and_counts():
    with pytest.raises(TypeError, match="Concat: expected at least one branch, got none"):
        nn.Concat()
    with pytest.raises(TypeError, match="Concat: branch 1 must be a gpuconv.nn.Module, got int"):
        nn.Concat(nn.Identity(), 3)
    with pytest.raises(TypeError, match="Concat: dim must be an int, got str"):
        nn.Concat(nn.Identity(), dim="1")
    block = nn.Concat(nn.Conv2d(2, 4, 3, padding=1), nn.Sequential(nn.Conv2d(2, 3, 1), nn.ReLU()), nn.Identity())
    assert list(block.state_dict()) == ["0.weight", "0.bias", "1.0.weight", "1.0.bias"]
    assert block.output_shape((1, 2, 9, 9)) == (1, 9, 9, 9)
    conv = block[0].flops((1, 2, 9, 9), (1, 4, 9, 9))
    pointwise = block[1].flops((1, 2, 9, 9), (1, 3, 9, 9)) if hasattr(block[1], "flops") else None
    assert block.flops((1, 2, 9, 9), (1, 9, 9, 9)) > conv
    if pointwise is not None:
        assert block.flops((1, 2, 9, 9), (1, 9, 9, 9)) >= conv + pointwise
    assert isinstance(block[1:], nn.Concat) and len(block[1:]) == 2
    with pytest.raises(ShapeError, match="Concat: branch 1 gives shape \\(1, 3, 7, 7\\), branch 0 \\(1, 4, 9, 9\\)"):
        nn.Concat(nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(2, 3, 3)).output_shape((1, 2, 9, 9))
    y = block(gpuconv.tensor(np.ones((2, 2, 9, 9), np.float32)))
    assert y.shape == (2, 9, 9, 9)
    np.testing.assert_array_equal(y.data[:, 7:], np.ones((2, 2, 9, 9), np.float32))  # the identity's block


def test_a_dim_that_is_not_the_channels_for_this_input_runs_eagerly():
    """dim=-1 lowers for a flat input (its features) but is the width of NCHW: the plan's setup,
    which knows the rank, refuses it, and the model runs eagerly with the eager results."""
    rng = np.random.default_rng(30)
    model = nn.Sequential(nn.Concat(nn.Conv2d(2, 2, 3, padding=1, rng=rng), nn.Identity(), dim=-1),
                          nn.Flatten(), nn.Linear(2 * 8 * 16, 5, rng=rng))
    x, labels = batch(31, (64, 2, 8, 8))
    assert model[0][1:].dim == -1
    compiled = gpuconv.compile(model)
    assert compiled.unsupported is None and not compiled.uses_executor(x)
    want, _, _ = step(model, x, labels)
    got, _, _ = step(compiled, x, labels)
    np.testing.assert_allclose(got.data, want.data, rtol=1e-5, atol=1e-6)


def test_cat_and_concat_name_a_dim_out_of_range():
    a = gpuconv.tensor(np.ones((2, 3, 4, 4), np.float32))
    with pytest.raises(gpuconv.errors.ArgumentError, match="cat: dim 4 is out of range for 4-dimensional tensors"):
        gpuconv.cat([a, a], dim=4)
    assert gpuconv.cat([a, a], dim=np.int64(-3)).shape == (2, 6, 4, 4)
    block = nn.Concat(nn.Identity(), nn.Identity(), dim=np.int64(-5))
    assert type(block.dim) is int
    with pytest.raises(gpuconv.errors.ArgumentError, match="Concat: dim -5 is out of range"):
        block(a)
