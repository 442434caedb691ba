"""HOSTILE TESTS (session 9's hostile tester) for residual blocks in gpuconv.compile (commit bf3a9b0:
nn.Residual and the zoo's BasicBlock / ShortcutA lowered into cpu_ops.ResidualOp).

The rule attacked: a compiled model gives the eager model's results (logits, input gradient, every
p.grad, BatchNorm buffers) to float32 rounding, in worker processes and in worker threads, with one
worker so that a batch of >= 48 is split; what it cannot lower runs eagerly with the same results or
the same error; it never hangs, never changes the user's model or process-wide state.

Tests named test_hostile_* failed on bf3a9b0: each is a finding (its docstring says what, and where
the cause was), fixed in 95c43b0. The others are guards of the hardest cases that held. Tests that take the
`kind` fixture run once with worker processes and once with worker threads.
"""
import sys

import numpy as np
import pytest

import gpuconv
import hostile_child
from gpuconv import functional as F
from gpuconv import nn
from gpuconv.models import BasicBlock, ResNet
from gpuconv.nn import cpu_plan, cpu_workers
import test_compile_residual as residual_tests
from test_compile_residual import plans_in


@pytest.fixture
def kind(worker_kind):
    """conftest.worker_kind: worker processes or worker threads, one worker."""
    return worker_kind


# ----------------------------------------------------------------------------------------------
# helpers


def rng_of(seed):
    return np.random.default_rng(seed)


def images(seed, shape):
    return rng_of(seed).standard_normal(shape).astype(np.float32)


def randomize_statistics(model, seed):
    """test_compile_residual's, the running means spread wider."""
    return residual_tests.randomize_statistics(model, seed, mean_spread=0.3)


def step(network, model, x, input_grad=True):
    """One forward and backward of (out * out).sum() -> (out, dx, {name: p.grad copy}, state copies)."""
    model.zero_grad()
    xt = gpuconv.tensor(x, requires_grad=input_grad)
    out = network(xt)
    (out * out).sum().backward()
    grads = {name: None if p.grad is None else p.grad.copy() for name, p in model.named_parameters()}
    return out, (xt.grad.copy() if input_grad else None), grads, model.state_dict()


def assert_close(got, want, rtol=1e-4, what="", floor=0.0):
    """rtol of the largest finite magnitude of `want`, or of `floor` if larger."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    finite = want[np.isfinite(want)]
    scale = np.abs(finite).max() if finite.size else 1.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(scale, floor, 1e-30), equal_nan=True,
                               err_msg=what)


def assert_same_step(eager, compiled, plans=1, input_grad=True, grad_floor=0.0):
    """`grad_floor`: the least magnitude a parameter gradient is compared at (a conv bias before a
    BatchNorm that trains has a gradient of 0 plus rounding, which no relative tolerance fits)."""
    (e_out, e_dx, e_grads, e_state), (c_out, c_dx, c_grads, c_state) = eager, compiled
    if plans is not None:
        assert plans_in(c_out) == plans
    assert_close(c_out.data, e_out.data, what="logits")
    if input_grad:
        assert_close(c_dx, e_dx, what="input gradient")
    for name, want in e_grads.items():
        assert (c_grads[name] is None) == (want is None), name
        if want is not None:
            assert_close(c_grads[name], want, what=name, floor=grad_floor)
    assert list(c_state) == list(e_state)
    for name in e_state:
        assert_close(c_state[name], e_state[name], what=name)


def check(make, x, plans=1, input_grad=True):
    """make() twice (same seed): one copy run eagerly, the other compiled; the same step."""
    eager_model, fast_model = make(), make()
    fast = gpuconv.compile(fast_model)
    assert_same_step(step(eager_model, eager_model, x, input_grad), step(fast, fast_model, x, input_grad),
                     plans, input_grad)
    return fast


def resnet8(seed=3, in_channels=1):
    return randomize_statistics(ResNet(8, in_channels=in_channels, num_classes=5, seed=seed), seed + 1).eval()


# ----------------------------------------------------------------------------------------------
# FINDINGS (fail on bf3a9b0)


def frozen_batchnorm_block(seed=0):
    """A training model whose BatchNorms are frozen (eval), the usual way to fine-tune: the blocks are
    in training mode, their BatchNorms in eval mode, so everything lowers."""
    rng = rng_of(seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, rng=rng), BasicBlock(4, 8, 2, rng=rng), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 5, rng=rng))
    randomize_statistics(model, seed + 1).train()
    for layer in model.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.eval()
    return model


def eval_dropout_residual(seed=0):
    """An nn.Residual in training mode holding a Dropout switched to eval (the identity)."""
    rng = rng_of(seed)
    body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, rng=rng), nn.Dropout(0.5).eval(), nn.ReLU())
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, rng=rng), nn.Residual(body, activation=nn.Tanh()),
                         nn.Flatten(), nn.Linear(4 * 8 * 8, 5, rng=rng))


@pytest.mark.parametrize("make", [frozen_batchnorm_block, eval_dropout_residual], ids=["frozen-bn", "eval-dropout"])
def test_hostile_a_training_block_with_an_eval_layer_inside_runs_in_worker_processes(kind, make):
    """BUG (processes only; threads are right): a residual block in training mode holding a layer in
    eval mode (a frozen BatchNorm2d in a BasicBlock, a Dropout in eval in an nn.Residual) lowers in
    the caller, but the worker process rebuilds the block with `layer.train(spec["training"])`
    (gpuconv/nn/cpu_workers.py:134, build()), which switches every layer inside to the block's mode:
    its BatchNorm is then in training mode, the worker's plan does not compile, and every forward
    raises "WorkerError: part 1 of the batch (CPU worker process N) raised AttributeError: '_Plan'
    object has no attribute 'out_shape'". Each child already carries its own mode in its spec:
    `layer.training = spec["training"]` there would keep them. (cpu_workers._run, line 565, now also
    calls layer.train(flag) on every F after a mode change; with ops already compiled that only moves
    when ConvOp computes its equal taps, not the results.)"""
    check(make, images(1, (64, 1, 8, 8)))


def test_hostile_resnet_with_numpy_integer_widths_runs_in_worker_processes(kind):
    """BUG (processes only): ResNet(widths=np.array([4, 8, 16])) (widths computed with NumPy) gives
    ShortcutA NumPy ints as out_channels; the worker description of ShortcutA (gpuconv/models.py:199,
    cpu_workers.describable(ShortcutA, ...)) passes them to json.dumps, and every forward raises
    "TypeError: Object of type int64 is not JSON serializable" (cpu_workers._ensure_setup). Eager and
    threads run. int() in the settings lambda (or in ShortcutA.__init__) would do."""
    check(lambda: randomize_statistics(ResNet(8, in_channels=1, num_classes=5, widths=np.array([4, 8, 16]),
                                              seed=0), 1).eval(), images(2, (64, 1, 8, 8)))


def test_hostile_residual_flops_with_a_sequential_activation():
    """BUG: nn.Residual(body, activation=nn.Sequential(nn.ReLU())) runs (eagerly and compiled), but
    its flops() raises AttributeError ("'Sequential' object has no attribute 'flops'"), and so does
    the summary() of any model holding it: Residual.flops calls self.activation.flops(...) directly
    (gpuconv/nn/sequential.py:168) instead of _flops_and_shape, which the body and the shortcut get."""
    rng = rng_of(0)
    block = nn.Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, rng=rng)), activation=nn.Sequential(nn.ReLU()))
    plain = nn.Residual(nn.Sequential(block.body[0]), activation=nn.ReLU())
    assert block(images(0, (2, 4, 8, 8))).shape == (2, 4, 8, 8)
    assert block.flops((1, 4, 8, 8), (1, 4, 8, 8)) == plain.flops((1, 4, 8, 8), (1, 4, 8, 8))
    nn.Sequential(block).summary((1, 4, 8, 8), print_fn=None)


@pytest.mark.parametrize("case", ["pooling activation", "Sequential subclass body"])
def test_hostile_residual_output_shape_is_its_forwards(case):
    """BUG: Residual.output_shape (gpuconv/nn/sequential.py:160) is the body's output shape: an
    activation that changes the shape (activation=nn.MaxPool2d(2): forward (2, 4, 4, 4),
    output_shape (2, 4, 8, 8)) is ignored, so summary() prints the wrong shape and the rows after it
    (and compiler._output_shape, which uses_executor reads) go on from it. And _flops_and_shape
    (sequential.py:130) opens only an exact nn.Sequential: a body that is a Sequential subclass
    keeping Sequential's forward (which cpu_plan.steps opens, and which lowers) raises
    AttributeError ('MySeq' object has no attribute 'output_shape'), and so does summary()."""
    class MySeq(nn.Sequential):
        pass
    rng = rng_of(0)
    if case == "pooling activation":
        block = nn.Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, rng=rng)), activation=nn.MaxPool2d(2))
    else:
        block = nn.Residual(MySeq(nn.Conv2d(4, 4, 3, padding=1, rng=rng), nn.ReLU()))
    x = images(0, (2, 4, 8, 8))
    assert tuple(block.output_shape(x.shape)) == block(x).shape
    table = nn.Sequential(block).summary((1, 4, 8, 8), print_fn=None)
    assert table["layers"][0]["output_shape"] == (1,) + block(x).shape[1:]


def test_hostile_a_residual_holding_a_fused_conv_pool_is_worth_a_plan():
    """BUG (a slower path, and `unsupported` says what is not so): cpu_plan.fused_conv_pools (which
    compiler._worth_a_plan asks whether a run of lowerable steps between eager ones gets a plan)
    counts only top-level ConvOps, not those inside a ResidualOp's branches
    (gpuconv/nn/cpu_plan.py:229). A run holding nn.Residual(Sequential(Conv2d, ReLU, MaxPool2d(2)),
    AvgPool2d(2)) after an eager LeakyReLU runs eagerly, and `unsupported` says "steps 2-4
    (Residual, Flatten, Linear) eagerly: no conv fused with a pool", though the lowering fuses that
    conv with its pool (its plan would run it fused, as the whole-model plan does)."""
    rng = rng_of(0)
    block = nn.Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, rng=rng), nn.ReLU(), nn.MaxPool2d(2)),
                        nn.AvgPool2d(2), nn.ReLU())
    assert cpu_plan.fused_conv_pools(list(block.body)) == 1
    assert cpu_plan.fused_conv_pools([block]) == 1
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, rng=rng), nn.LeakyReLU(), block, nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3, rng=rng))
    compiled = gpuconv.compile(model)
    clauses = compiled.unsupported.split("; ")
    assert not any("Residual" in c and "no conv fused with a pool" in c for c in clauses), compiled.unsupported
    assert compiled.uses_executor(images(1, (64, 1, 8, 8)))


def test_hostile_unsupported_hints_at_residual_only_where_it_helps():
    """Cosmetic: since bf3a9b0 every layer kind the registry lacks gets the hint "(its forward is
    Python the executor cannot lower; a residual connection written as nn.Residual lowers)"
    (cpu_plan.unlowerable, gpuconv/nn/cpu_plan.py:183), library layers too: "step 1 LeakyReLU (...
    a residual connection written as nn.Residual lowers)", "step 3 LPPool2d (...)", where writing
    anything as nn.Residual changes nothing. The hint belongs to modules with a forward of their own."""
    rng = rng_of(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, rng=rng), nn.LeakyReLU(), nn.Conv2d(4, 4, 3, rng=rng), nn.LPPool2d(2, 2))
    text = gpuconv.compile(model).unsupported
    assert "LeakyReLU" in text and "LPPool2d" in text
    assert "nn.Residual" not in text, text


# ----------------------------------------------------------------------------------------------
# GUARDS (hold on bf3a9b0): residual structures


def shared_layer_model(seed=0):
    """One Conv2d object in the body and as the shortcut: its gradient is the sum of both uses."""
    rng = rng_of(seed)
    conv = nn.Conv2d(4, 4, 3, padding=1, rng=rng)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, rng=rng),
                         nn.Residual(nn.Sequential(conv, nn.ReLU()), conv, nn.ReLU()), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 5, rng=rng))


def residual_twice_model(seed=0):
    """One nn.Residual instance as two consecutive steps."""
    rng = rng_of(seed)
    block = nn.Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, rng=rng), nn.Tanh()), activation=nn.ReLU())
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, rng=rng), block, block, nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 5, rng=rng))


def residual_shortcut_model(seed=0):
    """A shortcut that is itself a residual block, with a 1x1 conv (no padding: it keeps its input
    array as the source of its weight gradient) reading the outer block's input."""
    rng = rng_of(seed)
    shortcut = nn.Residual(nn.Sequential(nn.Conv2d(4, 4, 1, rng=rng)), activation=nn.Tanh())
    body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, rng=rng), nn.ReLU(), nn.Conv2d(4, 4, 1, rng=rng))
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, rng=rng), nn.Residual(body, shortcut, nn.ReLU()),
                         nn.Flatten(), nn.Linear(4 * 8 * 8, 5, rng=rng))


def nested_sequentials_model(seed=0):
    """Nested Sequentials, Identity, Dropout in eval and Flatten inside the branches, a Sequential as
    the activation; the whole model in eval."""
    rng = rng_of(seed)
    body = nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, rng=rng), nn.Identity()), nn.Dropout(0.5),
                         nn.Sequential(nn.ReLU()), nn.Flatten())
    block = nn.Residual(body, nn.Sequential(nn.Identity(), nn.Flatten()), nn.Sequential(nn.Tanh()))
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, rng=rng), block, nn.Linear(4 * 8 * 8, 5, rng=rng)).eval()


def sum_into_batchnorm_model(seed=0):
    """Bodies ending in an eval BatchNorm (the sum goes into its output) with a 1x1 projection, a
    BatchNorm shared by body and shortcut, and an activation in place after a BatchNorm."""
    rng = rng_of(seed)
    shared = nn.BatchNorm2d(4)
    first = nn.Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, rng=rng), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Conv2d(4, 4, 3, padding=1, rng=rng), shared),
                        nn.Sequential(nn.Conv2d(4, 4, 1, rng=rng), shared), nn.ReLU())
    second = nn.Residual(nn.Sequential(nn.BatchNorm2d(4), nn.Tanh(), nn.Conv2d(4, 4, 1, rng=rng)))
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, rng=rng), first, second, nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 5, rng=rng))
    return randomize_statistics(model, seed + 1).eval()


@pytest.mark.parametrize("make", [shared_layer_model, residual_twice_model, residual_shortcut_model,
                                  nested_sequentials_model, sum_into_batchnorm_model],
                         ids=["shared-layer", "twice", "residual-shortcut", "nested-sequentials", "sum-into-bn"])
def test_residual_structures_match_eager(kind, make):
    check(make, images(1, (64, 2, 8, 8)))


def test_flat_residuals_of_linear_layers_and_a_top_level_block(kind):
    def make():
        rng = rng_of(0)
        return nn.Sequential(nn.Linear(10, 16, rng=rng),
                             nn.Residual(nn.Sequential(nn.Linear(16, 16, rng=rng), nn.ReLU(),
                                                       nn.Linear(16, 16, rng=rng)), activation=nn.ReLU()),
                             nn.Residual(nn.Linear(16, 16, rng=rng)), nn.Linear(16, 3, rng=rng))
    check(make, images(2, (64, 10)))

    def top():  # the model is the block, its input needs no gradient
        rng = rng_of(1)
        return nn.Residual(nn.Sequential(nn.Linear(6, 6, rng=rng), nn.Tanh()), nn.Linear(6, 6, rng=rng), nn.ReLU())
    check(top, images(3, (64, 6)), input_grad=False)


@pytest.mark.parametrize("size", [7, 9])
def test_basic_blocks_with_stride_two_on_odd_sizes(kind, size):
    def make():
        rng = rng_of(0)
        side = -(-(-(-size // 2)) // 2)
        model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, rng=rng), BasicBlock(4, 8, 2, rng=rng),
                              BasicBlock(8, 8, 1, rng=rng), BasicBlock(8, 16, 2, rng=rng), nn.Flatten(),
                              nn.Linear(16 * side * side, 5, rng=rng))
        return randomize_statistics(model, 1).eval()
    check(make, images(size, (64, 1, size, size)))


@pytest.mark.parametrize("batch", [1, 47, 48, 49, 130])
def test_resnet_in_eval_at_batch_sizes_around_the_split_and_the_chunk(kind, batch):
    check(resnet8, images(batch, (batch, 1, 7, 7)))


def test_non_finite_input_through_residual_blocks_runs_eagerly(kind):
    x = images(5, (64, 1, 8, 8))
    x[3, 0, 2, 2], x[40, 0, 1, 1] = np.nan, np.inf
    with np.errstate(all="ignore"):
        check(resnet8, x, plans=0)


def test_float64_residual_model_runs_eagerly_with_its_results(kind):
    def make():
        rng = rng_of(0)
        return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, rng=rng, dtype=np.float64),
                             nn.Residual(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, rng=rng, dtype=np.float64)),
                                         activation=nn.ReLU()), nn.Flatten(),
                             nn.Linear(3 * 8 * 8, 4, rng=rng, dtype=np.float64))
    check(make, images(0, (64, 1, 8, 8)).astype(np.float64), plans=0)


# ----------------------------------------------------------------------------------------------
# GUARDS: changes after compile, between forward and backward, between steps


def bn_residual_model(seed=0):
    rng = rng_of(seed)
    block = nn.Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, rng=rng), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Conv2d(4, 4, 3, padding=1, rng=rng), nn.BatchNorm2d(4)),
                        nn.Conv2d(4, 4, 1, rng=rng), nn.ReLU())
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, rng=rng), nn.ReLU(), nn.MaxPool2d(2), block,
                          BasicBlock(4, 8, 2, rng=rng), nn.Flatten(), nn.Linear(8 * 4 * 4, 5, rng=rng))
    return randomize_statistics(model, seed + 1).eval()


CHANGES = {
    "activation None": lambda block, rng: setattr(block, "activation", None),
    "shortcut None": lambda block, rng: setattr(block, "shortcut", None),
    "body replaced": lambda block, rng: setattr(block, "body", nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, rng=rng),
                                                                             nn.Tanh())),
    "layer appended to the body": lambda block, rng: block.body.append(nn.Sigmoid()),
    "BatchNorm put in training": lambda block, rng: block.body[1].train(),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_block_changed_after_compile_runs_as_changed(kind, change):
    eager_model, fast_model = bn_residual_model(), bn_residual_model()
    fast = gpuconv.compile(fast_model)
    x = images(1, (64, 1, 16, 16))
    step(fast, fast_model, x)
    for model in (eager_model, fast_model):
        CHANGES[change](model[3], rng_of(9))
    # a block with a BatchNorm in training lowers too (the whole model one plan)
    eager = step(eager_model, eager_model, x)
    floor = 1e-2 * max(np.abs(g).max() for g in eager[2].values()) if change == "BatchNorm put in training" else 0.0
    assert_same_step(eager, step(fast, fast_model, x), plans=1, grad_floor=floor)


@pytest.mark.parametrize("change", ["load_state_dict", "to and a new array", "in place", "train() and a training step"])
def test_backward_after_another_forward_and_new_statistics(kind, change):
    """Forward x1, forward x2 (another batch size: the plan's activations are replaced), the
    statistics change, then x1's backward: the plan recomputes x1's forward with the statistics it
    read, block by block."""
    results = backward_after_changed_statistics(bn_residual_model, change)
    assert plans_in(results[1][0]) == 1
    assert_same_step(results[0], results[1], plans=None)


def backward_after_changed_statistics(make_model, change):
    """Eagerly, then compiled, on a new make_model() each: forward x1 (64 images), forward x2 (50:
    the plan's activations are replaced), change_statistics, x1's backward -> for each, (x1's
    output, its input gradient, {name: p.grad}, the state_dict after)."""
    x1, x2 = images(2, (64, 1, 16, 16)), images(3, (50, 1, 16, 16))
    results = []
    for compiled in (False, True):
        model = make_model()
        network = gpuconv.compile(model) if compiled else model
        xt = gpuconv.tensor(x1, requires_grad=True)
        y = network(xt)
        network(x2)
        change_statistics(model, network, change, x2)
        model.zero_grad()
        (y * y).sum().backward()
        results.append((y, xt.grad.copy(), {n: p.grad.copy() for n, p in model.named_parameters()},
                        model.state_dict()))
    return results


def change_statistics(model, network, change, x):
    """Change the model's BatchNorm running statistics after a forward, the way `change` says: a
    load_state_dict; `in place`; `new arrays` (running_mean rebound), after `to` as well (`to and a
    new array`); a training step on x (`train() and a training step`), back in eval mode after
    it for `a training step`."""
    norms = [layer for layer in model.modules() if isinstance(layer, nn.BatchNorm2d)]
    if change == "load_state_dict":
        model.load_state_dict({k: (v * 1.5 + 0.5 if "running" in k else v) for k, v in model.state_dict().items()})
    elif change in ("new arrays", "to and a new array"):
        if change == "to and a new array":
            model.to("cpu")
        for layer in norms:
            layer.running_mean = layer.running_mean + 1.0
    elif change == "in place":
        for layer in norms:
            layer.running_var *= 3.0
    elif change in ("a training step", "train() and a training step"):
        model.train()
        other = network(x)
        (other * other).sum().backward()
        if change == "a training step":
            model.eval()
    else:
        raise ValueError(f"change_statistics: no change {change!r}")


def test_resnet_switching_train_and_eval_between_steps(kind):
    """Training steps and eval steps (one plan each: batch statistics, running statistics), SGD with
    momentum: the parameters and running statistics follow the eager model's."""
    models = [randomize_statistics(ResNet(8, in_channels=1, num_classes=5, seed=4), 5) for _ in range(2)]
    sgd_through_train_and_eval(models, (64, 1, 8, 8), lambda network, out, mode: plans_in(out) == 1)


def sgd_through_train_and_eval(models, shape, as_expected):
    """Two copies of a model, the second compiled, take SGD steps with momentum in train, eval,
    train, eval mode on the same batches of `shape`: as_expected(compiled network, its output,
    mode) holds at each step, and parameters and running statistics end as the eager model's."""
    networks = [models[0], gpuconv.compile(models[1])]
    optimizers = [gpuconv.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
    for index, mode in enumerate(["train", "eval", "train", "eval"]):
        x, labels = images(10 + index, shape), rng_of(index).integers(0, 5, shape[0])
        for model, network, optimizer in zip(models, networks, optimizers):
            model.train(mode == "train")
            optimizer.zero_grad()
            out = network(gpuconv.tensor(x))
            F.cross_entropy(out, labels).backward()
            optimizer.step()
            if network is networks[1]:
                assert as_expected(network, out, mode), (mode, network.unsupported)
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert_close(b, a, rtol=2e-4, what=name)


def many_residual_plans_model(seed=0, blocks=cpu_workers.MAX_PLANS + 2):
    """More plans than a worker process keeps arenas for, each holding a residual block with an eval
    BatchNorm (a LeakyReLU after each block runs eagerly and splits the plans)."""
    rng = rng_of(seed)
    layers, channels = [], 1
    for _ in range(blocks):
        block = nn.Residual(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, rng=rng), nn.BatchNorm2d(3)),
                            activation=nn.ReLU())
        layers += [nn.Conv2d(channels, 3, 3, padding=1, rng=rng), nn.ReLU(), nn.MaxPool2d(1), block, nn.LeakyReLU()]
        channels = 3
    model = randomize_statistics(nn.Sequential(*layers, nn.Flatten(), nn.Linear(3 * 8 * 8, 5, rng=rng)), seed + 1)
    for layer in model.modules():
        if isinstance(layer, nn.Residual):
            layer.eval()
    return model


def test_more_residual_plans_than_a_worker_keeps(kind):
    for seed in range(2):
        check(many_residual_plans_model, images(seed, (64, 1, 8, 8)), plans=cpu_workers.MAX_PLANS + 2)


def test_segments_of_residual_blocks_between_eager_layers(kind):
    """Residual blocks in plans of their own between a seeded Dropout in training and a LeakyReLU,
    the same block instance in two segments."""
    def make():
        rng = rng_of(0)
        first = nn.Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, rng=rng), nn.ReLU(),
                                          nn.Conv2d(4, 4, 3, padding=1, rng=rng)), activation=nn.ReLU())
        second = nn.Residual(nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, rng=rng), nn.Tanh()),
                             nn.Conv2d(6, 6, 1, rng=rng), nn.ReLU())
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, rng=rng), nn.ReLU(), nn.MaxPool2d(2), first,
                             nn.Dropout(0.3, seed=5), nn.Conv2d(4, 6, 3, padding=1, rng=rng), nn.ReLU(),
                             nn.MaxPool2d(2), second, nn.LeakyReLU(), second, nn.Flatten(),
                             nn.Linear(6 * 4 * 4, 5, rng=rng))
    check(make, images(1, (64, 1, 16, 16)), plans=2)


# ----------------------------------------------------------------------------------------------
# GUARDS: the model, its state, the process


def test_residual_state_dict_round_trip_in_pytorch_order():
    def make(seed):
        rng = rng_of(seed)
        block = nn.Residual(nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1, rng=rng), nn.BatchNorm2d(4)),
                            nn.Sequential(nn.Conv2d(2, 4, 1, stride=2, bias=False, rng=rng)), nn.ReLU())
        return randomize_statistics(nn.Sequential(block, nn.Flatten(), nn.Linear(4 * 4 * 4, 3, rng=rng)), seed).eval()
    source, target = make(0), make(1)
    keys = [k for k in source.state_dict() if not k.endswith("num_batches_tracked")]
    assert keys == ["0.body.0.weight", "0.body.0.bias", "0.body.1.weight", "0.body.1.bias", "0.body.1.running_mean",
                    "0.body.1.running_var", "0.shortcut.0.weight", "2.weight", "2.bias"]
    compiled = gpuconv.compile(target)
    x = images(0, (64, 2, 8, 8))
    compiled(x)  # a plan compiled with the old arrays
    target.load_state_dict(source.state_dict())
    assert_close(compiled(x).data, source(x).data)


def test_two_threads_running_one_compiled_resnet_in_eval(kind):
    model = resnet8()
    batches = {i: images(20 + i, (64, 1, 8, 8)) for i in range(2)}
    infer_in_threads(gpuconv.compile(model), batches, {i: model(x).data for i, x in batches.items()}, rounds=15)


def infer_in_threads(compiled, batches, expected, rounds, atol=None, join_s=60):
    """A thread per key of `batches` runs its batch through one compiled model `rounds` times: no
    error, no hang (join_s), each thread its expected[key] logits (rtol 1e-4; atol 1e-4 of their
    largest unless given)."""
    import threading
    failures = []

    def infer(key):
        tolerance = 1e-4 * np.abs(expected[key]).max() if atol is None else atol
        for _ in range(rounds):
            try:
                y = compiled(batches[key]).data
            except Exception as error:
                failures.append(f"{key}: {type(error).__name__}: {error}")
                return
            if not np.allclose(y, expected[key], rtol=1e-4, atol=tolerance):
                failures.append(f"{key}: wrong logits")
                return

    threads = [threading.Thread(target=infer, args=(key,), daemon=True) for key in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(join_s)
    assert not any(thread.is_alive() for thread in threads), "hang"
    assert not failures, failures


def test_compiled_residual_steps_leave_process_settings_and_the_model_alone(kind):
    from gpuconv import blas
    interval, threads = sys.getswitchinterval(), blas.get_num_threads()
    model = bn_residual_model()
    before = {k: v.copy() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    compiled = gpuconv.compile(model)
    assert compiled.uses_executor(images(0, (64, 1, 16, 16)))
    for seed in range(2):
        step(compiled, model, images(seed, (64, 1, 16, 16)))
    assert sys.getswitchinterval() == interval and blas.get_num_threads() == threads
    assert [m.training for m in model.modules()] == modes
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)


def test_a_resnet_lowers_whole_in_training_and_in_eval():
    compiled = gpuconv.compile(ResNet(8, in_channels=1, num_classes=5, seed=0))
    assert compiled.unsupported is None
    assert compiled.uses_executor(np.zeros((4, 1, 8, 8), np.float32))
    compiled.eval()
    assert compiled.unsupported is None


PRELUDE = r'''
import faulthandler, json, os, signal, sys, time
faulthandler.dump_traceback_later(float(os.environ["HOSTILE_HANG_S"]), exit=True)
import numpy as np
import gpuconv
from gpuconv import nn
from gpuconv.models import ResNet
from gpuconv.nn import cpu_plan, cpu_workers
cpu_plan.processes = True
'''


@pytest.mark.skipif(not cpu_workers.supported(), reason="no worker processes on this platform")
def test_a_worker_killed_between_a_resnet_forward_and_its_backward(tmp_path):
    """SIGKILL to the idle worker after a compiled ResNet's forward: the backward raises WorkerError
    naming the death and leaves no p.grad; the next step matches the eager model."""
    r = hostile_child.run_child(tmp_path, PRELUDE, r'''
    def make():
        model = ResNet(8, in_channels=1, num_classes=5, seed=3)
        rng = np.random.default_rng(4)
        for layer in model.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean[...] = rng.standard_normal(layer.num_features) * 0.3
                layer.running_var[...] = rng.uniform(0.5, 2.0, layer.num_features)
        return model.eval()
    def grads(network, model, x):
        model.zero_grad()
        y = network(gpuconv.tensor(x))
        (y * y).sum().backward()
        return [p.grad.copy() for p in model.parameters()]
    eager, model = make(), make()
    net = gpuconv.compile(model)
    x = np.random.default_rng(0).standard_normal((64, 1, 8, 8)).astype(np.float32)
    grads(net, model, x)
    old = cpu_workers._pool.processes[0].process.pid
    model.zero_grad()
    y = net(gpuconv.tensor(x))
    os.kill(old, signal.SIGKILL)
    time.sleep(0.2)
    out = {"caught": None}
    try:
        (y * y).sum().backward()
    except Exception as error:
        out["caught"] = [type(error).__name__, str(error)]
    out["partial"] = any(p.grad is not None for p in model.parameters())
    got, want = grads(net, model, x), grads(eager, eager, x)
    out["next"] = all(np.allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max()) for a, b in zip(got, want))
    out["new_worker"] = cpu_workers._pool.processes[0].process.pid != old
    print("RESULT " + json.dumps(out))
    ''', 60, "killed_worker_resnet")
    assert r["caught"] is not None and r["caught"][0] == "WorkerError" and "died" in r["caught"][1], r["caught"]
    assert not r["partial"]
    assert r["next"] and r["new_worker"]
