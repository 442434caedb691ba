"""Residual blocks in the CPU executor (gpuconv/nn/cpu_plan.py: RESIDUALS, cpu_ops.ResidualOp):
nn.Residual and the zoo's BasicBlock (with its ShortcutA) lower into one plan op whose body and
shortcut branches are added, with the eager model's results.

Each test runs a model compiled and the same model eagerly (the reference) on the same batch and
compares logits, the input gradient and every p.grad; the tape tells whether a plan ran. Every
test runs with the batch's second part in a worker process and in a worker thread.
"""
import numpy as np
import pytest

import gpuconv
from gpuconv import nn
from gpuconv import functional as F
from gpuconv.models import BasicBlock, ResNet, ShortcutA
from gpuconv.nn import cpu_plan, cpu_workers
from gpuconv.nn.cpu_ops import ResidualOp
from test_compile_segments import plans_on_tape


pytestmark = pytest.mark.usefixtures("worker_kind")  # processes and threads, one worker (conftest.py)


def randomize_statistics(model, seed, mean_spread=0.2):
    """Running statistics and affine parameters away from (0, 1, 1, 0), so that an eval-mode
    BatchNorm is not the identity -> the model."""
    rng = np.random.default_rng(seed)
    for layer in model.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean[...] = rng.standard_normal(layer.num_features) * mean_spread
            layer.running_var[...] = rng.uniform(0.5, 2.0, layer.num_features)
            if layer.weight is not None:
                layer.weight.data[...] = rng.uniform(0.5, 1.5, layer.num_features)
                layer.bias.data[...] = rng.standard_normal(layer.num_features) * 0.1
    return model


def plans_in(out):
    """How many plans (PlanFunction nodes) made `out`."""
    return len(plans_on_tape(out))


def step(model, x, labels):
    """Logits, input gradient and every p.grad (copies) of one forward and backward."""
    for p in model.parameters():
        p.grad = None
    xt = gpuconv.tensor(x, requires_grad=True)
    out = model(xt)
    F.cross_entropy(out, labels).backward()
    return out, xt.grad.copy(), [None if p.grad is None else p.grad.copy() for p in model.parameters()]


def check_matches_eager(model, x, labels, plans=1, rtol=1e-4):
    """The compiled model gives the eager one's results, running `plans` plans."""
    eager_out, eager_dx, eager_grads = step(model, x, labels)
    compiled = gpuconv.compile(model)
    out, dx, grads = step(compiled, x, labels)
    assert plans_in(out) == plans
    np.testing.assert_allclose(out.data, eager_out.data, rtol=rtol, atol=rtol * np.abs(eager_out.data).max())
    np.testing.assert_allclose(dx, eager_dx, rtol=rtol, atol=rtol * np.abs(eager_dx).max())
    names = [name for name, _ in model.named_parameters()]
    for name, got, want in zip(names, grads, eager_grads):
        assert (got is None) == (want is None), name
        if want is not None:
            np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max(), err_msg=name)
    return compiled


def batch(seed, shape):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape).astype(np.float32), rng.integers(0, 5, shape[0])


# ----------------------------------------------------------------------------------------------
# the zoo's ResNet: lowers whole, in eval mode and in training mode (batch statistics)


@pytest.mark.parametrize("depth", [8, 14])
def test_resnet_in_eval_runs_as_one_plan(depth):
    model = ResNet(depth, in_channels=3, num_classes=5, seed=depth)
    randomize_statistics(model, depth)
    model.eval()
    x, labels = batch(1, (64, 3, 12, 12))
    compiled = check_matches_eager(model, x, labels)
    assert compiled.unsupported is None
    ops = compiled._plan.ops
    blocks = [op for op in ops if isinstance(op, ResidualOp)]
    assert len(blocks) == 3 * (depth - 2) // 6
    # the stage-opening blocks carry the option-A shortcut, the others the identity
    assert [len(block.shortcut) for block in blocks[:(depth - 2) // 6]] == [0] * ((depth - 2) // 6)
    assert sum(len(block.shortcut) == 1 for block in blocks) == 2


def test_resnet_in_training_runs_as_one_plan():
    """Its BatchNorms normalize by the batch (cpu_ops.BatchNormTrainOp): one plan, the eager
    results (the first step of a fresh ResNet: float32 gradients through eight BatchNorms that
    train agree to about 1e-4 between any two summation orders)."""
    model = ResNet(8, in_channels=1, num_classes=5, seed=0)
    x, labels = batch(2, (64, 1, 8, 8))
    compiled = check_matches_eager(model, x, labels, rtol=1e-3)
    assert compiled.unsupported is None and compiled.uses_executor(x)


def test_resnet_eval_after_training_steps_keeps_eager_results():
    """train() steps update the running statistics (in the plan); eval() then uses the new ones."""
    model = ResNet(8, in_channels=1, num_classes=5, seed=3)
    compiled = gpuconv.compile(model)
    for seed in range(2):
        x, labels = batch(seed, (64, 1, 8, 8))
        step(compiled, x, labels)
    model.eval()
    x, labels = batch(9, (64, 1, 8, 8))
    check_matches_eager(model, x, labels)


# ----------------------------------------------------------------------------------------------
# nn.Residual: a user's residual net, in training mode too (no batch statistics)


def residual_net(seed, shortcut="identity", activation=nn.ReLU, body_end=None):
    rng = np.random.default_rng(seed)
    stride = 1 if shortcut == "identity" else 2
    channels = 6 if shortcut == "identity" else 8
    body = [nn.Conv2d(6, channels, 3, stride=stride, padding=1, rng=rng), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, rng=rng)]
    if body_end is not None:
        body.append(body_end())
    projection = None if shortcut == "identity" else nn.Conv2d(6, channels, 1, stride=2, rng=rng)
    block = nn.Residual(nn.Sequential(*body), projection, None if activation is None else activation())
    side = 8 // stride
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1, rng=rng), nn.ReLU(), nn.MaxPool2d(2), block,
                         nn.Flatten(), nn.Linear(channels * side * side, 5, rng=rng))


@pytest.mark.parametrize("shortcut", ["identity", "projection"])
@pytest.mark.parametrize("activation", [nn.ReLU, nn.Tanh, None])
def test_residual_trains_as_one_plan(shortcut, activation):
    model = residual_net(4, shortcut, activation)
    x, labels = batch(5, (64, 2, 16, 16))
    compiled = check_matches_eager(model, x, labels)
    assert compiled.unsupported is None


@pytest.mark.parametrize("body_end", [nn.Tanh, nn.Identity, nn.ReLU])
def test_residual_whose_body_output_is_read_again(body_end):
    """A body ending in an op whose backward reads its output (or in the identity, whose output
    is another op's): the sum goes into a buffer of its own, never over that output."""
    model = residual_net(6, "identity", nn.ReLU, body_end)
    x, labels = batch(7, (64, 2, 16, 16))
    check_matches_eager(model, x, labels)


@pytest.mark.parametrize("activation", [nn.ReLU, None])
def test_both_branches_read_the_gradient_a_fused_conv_pool_may_overwrite(activation):
    """A body ending in conv -> ReLU -> max pool (one fused op, which masks its output gradient in
    place when that gradient is the plan's own) beside a pooling shortcut: the body must leave the
    gradient the shortcut reads intact."""
    rng = np.random.default_rng(21)
    body = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, rng=rng), nn.ReLU(), nn.MaxPool2d(2))
    block = nn.Residual(body, nn.AvgPool2d(2), None if activation is None else activation())
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1, rng=rng), nn.Tanh(), block, nn.Flatten(),
                          nn.Linear(6 * 4 * 4, 5, rng=rng))
    x, labels = batch(22, (64, 2, 8, 8))
    compiled = check_matches_eager(model, x, labels)
    assert compiled._plan.ops[2].body[0].pool == (2, 2)


def test_nested_residuals_keep_their_buffers_apart():
    """A Residual in another's body: every op keys its buffers under its own blocks (rename)."""
    rng = np.random.default_rng(8)
    inner = nn.Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, rng=rng), nn.Tanh()), activation=nn.ReLU())
    outer = nn.Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, rng=rng), inner,
                                      nn.Conv2d(4, 4, 3, padding=1, rng=rng)), activation=nn.ReLU())
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, rng=rng), outer, nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 5, rng=rng))
    x, labels = batch(9, (64, 1, 8, 8))
    compiled = check_matches_eager(model, x, labels)
    keys = [op.index for op in compiled._plan.ops[1].body + compiled._plan.ops[1].body[1].body]
    assert len(set(keys)) == len(keys)


def test_several_steps_of_sgd_follow_the_eager_model():
    check_sgd_follows_eager(residual_net(10), residual_net(10), (64, 2, 16, 16))


def check_sgd_follows_eager(eager, fast, shape, steps=3):
    """Two copies of a model, one compiled, trained side by side with SGD and momentum on the same
    batches: the parameters stay together (to float32 rounding)."""
    compiled = gpuconv.compile(fast)
    optimizers = [gpuconv.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (eager, fast)]
    for seed in range(steps):
        x, labels = batch(20 + seed, shape)
        for model, optimizer in zip((eager, compiled), optimizers):
            optimizer.zero_grad()
            F.cross_entropy(model(gpuconv.tensor(x)), labels).backward()
            optimizer.step()
    for (name, a), b in zip(eager.named_parameters(), fast.parameters()):
        np.testing.assert_allclose(b.data, a.data, rtol=1e-4, atol=1e-5, err_msg=name)


def test_branches_of_different_shapes_run_eagerly_with_its_error():
    """A body that changes the shape without a shortcut to match: the plan cannot take it, the
    eager add raises, as the model itself would."""
    rng = np.random.default_rng(11)
    model = nn.Sequential(nn.Residual(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, rng=rng))), nn.Flatten())
    check_fails_as_eager(model, batch(12, (64, 2, 8, 8))[0])


def check_fails_as_eager(model, x):
    """The plan cannot take `x`: the compiled model runs eagerly and raises the model's own error."""
    compiled = gpuconv.compile(model)
    assert not compiled.uses_executor(x)
    with pytest.raises(Exception) as eager_error:
        model(x)
    with pytest.raises(type(eager_error.value)):
        compiled(x)


def test_a_layer_replaced_inside_a_block_after_compile_is_run():
    model = ResNet(8, in_channels=1, num_classes=5, seed=13)
    model.eval()
    compiled = gpuconv.compile(model)
    x, labels = batch(14, (64, 1, 8, 8))
    step(compiled, x, labels)
    block = model.layer2[0]
    block.conv2 = nn.Conv2d(32, 32, 3, padding=1, bias=False, rng=np.random.default_rng(15))
    randomize_statistics(block, 16)
    out, dx, grads = step(compiled, x, labels)
    assert plans_in(out) == 1
    eager_out, eager_dx, eager_grads = step(model, x, labels)
    np.testing.assert_allclose(out.data, eager_out.data, rtol=1e-4, atol=1e-4)
    assert grads[[p is block.conv2.weight for p in model.parameters()].index(True)] is not None


def test_recomputed_forward_reads_the_statistics_of_its_own_forward():
    """A second forward replaces the first one's activations and the statistics change before the
    first backward: the plan recomputes the first forward with the statistics it read (copies),
    block by block, so the gradients are the first forward's."""
    model = ResNet(8, in_channels=1, num_classes=5, seed=17)
    randomize_statistics(model, 17)
    model.eval()
    x, labels = batch(18, (64, 1, 8, 8))
    _, want_dx, want_grads = step(model, x, labels)
    compiled = gpuconv.compile(model)
    xt = gpuconv.tensor(x, requires_grad=True)
    loss = F.cross_entropy(compiled(xt), labels)
    compiled(batch(19, (64, 1, 8, 8))[0])  # replaces the saved activations
    for layer in model.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean += 1.0  # in place: the arrays the first forward read
    for p in model.parameters():
        p.grad = None
    loss.backward()
    np.testing.assert_allclose(xt.grad, want_dx, rtol=1e-4, atol=1e-4 * np.abs(want_dx).max())
    for got, want in zip([p.grad for p in model.parameters()], want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


# ----------------------------------------------------------------------------------------------
# the pieces


def test_worker_description_rebuilds_a_block_as_the_same_ops():
    block = BasicBlock(4, 8, stride=2, rng=np.random.default_rng(0))
    block.eval()
    params = block.parameters()
    index_of = {id(p): i for i, p in enumerate(params)}
    spec = cpu_workers.describe(block, index_of)
    rebuilt = cpu_workers.build(spec, params)
    assert isinstance(rebuilt, nn.Residual) and not rebuilt.training
    original, copy = cpu_plan._Plan(), cpu_plan._Plan()
    x = np.empty((1, 4, 8, 8), np.float32)
    assert original.prepare([block], x) and copy.prepare([rebuilt], x)
    kinds = lambda plan: [type(op).__name__ for op in plan.ops[0].ops()]  # noqa: E731
    assert kinds(copy) == kinds(original) == ["ConvOp", "BatchNormEvalOp", "ActivationOp", "ConvOp",
                                               "BatchNormEvalOp", "ShortcutAOp", "ActivationOp"]
    assert [id(p) for p in copy.params()] == [id(p) for p in original.params()]
    shortcut = rebuilt.shortcut[0]
    assert isinstance(shortcut, ShortcutA) and (shortcut.in_channels, shortcut.out_channels, shortcut.stride) == (4, 8, 2)


def test_residual_module_checks_its_arguments_and_names_its_children():
    with pytest.raises(TypeError, match="Residual: body must be a gpuconv.nn.Module, got NoneType"):
        nn.Residual(None)
    with pytest.raises(TypeError, match="Residual: shortcut must be a gpuconv.nn.Module or None, got int"):
        nn.Residual(nn.Identity(), 3)
    block = nn.Residual(nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1)), nn.Conv2d(2, 4, 1, stride=2),
                        nn.ReLU())
    assert list(block.state_dict()) == ["body.0.weight", "body.0.bias", "shortcut.weight", "shortcut.bias"]
    assert block.output_shape((1, 2, 9, 9)) == (1, 4, 5, 5)
    conv = block.body[0].flops((1, 2, 9, 9), (1, 4, 5, 5))
    projection = block.shortcut.flops((1, 2, 9, 9), (1, 4, 5, 5))
    assert block.flops((1, 2, 9, 9), (1, 4, 5, 5)) == conv + projection + 2 * 4 * 5 * 5
