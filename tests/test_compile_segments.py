"""Partial lowering (gpuconv/compiler.py): a chain the executor can lower in part runs its runs of
lowerable layers as plans of their own and the rest eagerly, with the eager model's results.

Each test builds the same model twice from one seed: one copy runs compiled, the other eagerly
(the reference), so state the forward changes (BatchNorm's running statistics, Dropout's random
generator) advances alike in both. Logits, every p.grad, the input gradient and the buffers are
compared; the tape tells how many plans ran. Every test runs with the batch's second part in a
worker process and in a worker thread.
"""
import numpy as np
import pytest

import gpuconv
from gpuconv import nn, optim
from gpuconv import functional as F
from gpuconv.compiler import PlanFunction
from gpuconv.models import LeNet5, SimpleCNN

pytestmark = pytest.mark.usefixtures("worker_kind")  # processes and threads, one worker (conftest.py)


class Scale(nn.Module):
    """A module with its own forward (a learned per-channel scale): one eager step."""

    def __init__(self, channels):
        self.gain = nn.Parameter(np.linspace(0.5, 1.5, channels, dtype=np.float32).reshape(1, channels, 1, 1))

    def forward(self, x):
        return x * self.gain


def conv_block(rng, c_in, c_out):
    """Conv -> ReLU -> MaxPool(2): the plan fuses it, so a run holding it is worth a plan."""
    return [nn.Conv2d(c_in, c_out, 3, padding=1, rng=rng), nn.ReLU(), nn.MaxPool2d(2)]


def with_batchnorm(seed):
    rng = np.random.default_rng(seed)
    return nn.Sequential(*conv_block(rng, 1, 4), nn.BatchNorm2d(4), *conv_block(rng, 4, 6), nn.Flatten(),
                         nn.Linear(6 * 4 * 4, 5, rng=rng))


def with_dropout(seed):
    rng = np.random.default_rng(seed)
    return nn.Sequential(*conv_block(rng, 1, 4), nn.Flatten(), nn.Linear(4 * 8 * 8, 12, rng=rng), nn.ReLU(),
                         nn.Dropout(0.4, seed=seed), nn.Linear(12, 5, rng=rng))


def with_custom_module_nested(seed):
    """Nested plain Sequentials are opened; Scale and LPPool2d run eagerly between two plans."""
    rng = np.random.default_rng(seed)
    return nn.Sequential(nn.Sequential(*conv_block(rng, 1, 3)), Scale(3),
                         nn.Sequential(nn.Sequential(*conv_block(rng, 3, 4)), nn.LPPool2d(2, 2)),
                         nn.Flatten(), nn.Linear(4 * 2 * 2, 5, rng=rng))


def with_shared_conv(seed):
    """One Conv2d used twice (BatchNorm between): its gradient is both uses' contributions."""
    rng = np.random.default_rng(seed)
    shared = nn.Conv2d(3, 3, 3, padding=1, rng=rng)
    return nn.Sequential(*conv_block(rng, 1, 3), nn.BatchNorm2d(3), shared, nn.ReLU(), nn.MaxPool2d(2),
                         nn.BatchNorm2d(3), shared, nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(3 * 2 * 2, 5, rng=rng))


# model -> the plans one training-mode forward runs
MODELS = {"batchnorm": (with_batchnorm, 1), "dropout": (with_dropout, 1),
          "custom-nested": (with_custom_module_nested, 2), "shared-conv": (with_shared_conv, 1)}


def images(rng, batch):
    x = rng.standard_normal((batch, 1, 16, 16)).astype(np.float32)
    x[:, :, :3] = 0  # ties in the pools, as an image's blank border gives
    return x


def plans_on_tape(y):
    """The PlanFunctions that made y (the nodes of the tape behind it)."""
    found, seen, stack = [], set(), [y.creator]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, PlanFunction):
            found.append(node)
        stack += [creator for _, creator in node.inputs]
    return found


def assert_close(actual, expected, rtol=1e-5):
    """rtol of the largest magnitude: entries near zero cancel in sums, elementwise rtol is noise."""
    scale = float(np.abs(expected).max()) or 1.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


class Pair:
    """The same model twice: `fast` compiled, `slow` eager."""

    def __init__(self, make, seed=0):
        self.fast_model, self.slow_model = make(seed), make(seed)
        self.fast = gpuconv.compile(self.fast_model)

    def step(self, x, labels, need_dx=True, zero_grad=True):
        """One forward and backward of each -> (the compiled forward's plan count, its logits)."""
        results = []
        for network, model in ((self.fast, self.fast_model), (self.slow_model, self.slow_model)):
            if zero_grad:
                model.zero_grad()
            inputs = gpuconv.tensor(x, requires_grad=True) if need_dx else x
            logits = network(inputs)
            F.cross_entropy(logits, labels).backward()
            results.append((logits, inputs.grad if need_dx else None))
        (fast, fast_dx), (slow, slow_dx) = results
        assert not plans_on_tape(slow)  # the uncompiled model never enters the executor
        assert_close(fast.data, slow.data)
        if need_dx:
            assert fast_dx.dtype == np.float32
            assert_close(fast_dx, slow_dx)
        self.assert_same_state()
        return len(plans_on_tape(fast)), fast

    def assert_same_state(self):
        slow = dict(self.slow_model.named_parameters())
        for name, p in self.fast_model.named_parameters():
            assert (p.grad is None) == (slow[name].grad is None), name
            if p.grad is not None:
                assert p.grad.dtype == np.float32 and p.grad.shape == p.shape, name
                assert_close(p.grad, slow[name].grad)
        for (name, a), b in zip(self.fast_model.state_dict().items(), self.slow_model.state_dict().values()):
            assert_close(np.asarray(a, np.float64), np.asarray(b, np.float64))  # running statistics too


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_mixed_models_match_the_eager_model(name, batch, rng):
    make, plans = MODELS[name]
    pair = Pair(make)
    x, labels = images(rng, batch), rng.integers(0, 5, batch)
    assert pair.fast.uses_executor(x)
    count, _ = pair.step(x, labels, need_dx=batch != 1)  # one image: no input gradient asked
    assert count == plans


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gradients_accumulate_over_two_steps(name, rng):
    """Two backwards without zero_grad() add into every p.grad, as the eager model's do."""
    pair = Pair(MODELS[name][0])
    for batch in (64, 7):
        x, labels = images(rng, batch), rng.integers(0, 5, batch)
        assert pair.step(x, labels, zero_grad=False)[0] == MODELS[name][1]


def test_switching_train_and_eval_picks_other_segments(rng):
    """Dropout lowers in eval only: training runs the conv run as a plan and Dropout eagerly (the
    same random draws as the eager model's), eval the whole model as one plan; back and forth."""
    pair = Pair(with_dropout)
    x, labels = images(rng, 64), rng.integers(0, 5, 64)
    for mode, plans in (("train", 1), ("eval", 1), ("train", 1), ("eval", 1)):
        for model in (pair.fast_model, pair.slow_model):
            getattr(model, mode)()
        whole_forwards = pair.fast._plan.forwards
        count, logits = pair.step(x, labels)
        assert count == plans
        node = logits.creator
        if mode == "eval":  # the whole model is one plan (self._plan), the same as before partial lowering
            assert isinstance(node, PlanFunction) and pair.fast._plan.forwards == whole_forwards + 1
            assert pair.fast.unsupported is None
        else:  # the last Linear ran eagerly, after the eager Dropout
            assert isinstance(node, F.LinearFunction)
            assert "Dropout" in pair.fast.unsupported


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_batchnorm_in_eval_mode_lowers_and_matches(batch, rng):
    """BatchNorm in eval uses its running statistics (set by training steps, which run the whole
    model as one plan too, then its weight and bias moved off 1 and 0): the whole model is one plan
    in either mode, with the eager model's results."""
    pair = Pair(with_batchnorm)
    for _ in range(3):
        x, labels = images(rng, 32), rng.integers(0, 5, 32)
        assert pair.step(x, labels)[0] == 1
    for model in (pair.fast_model, pair.slow_model):
        model[3].weight.data[:] = np.linspace(0.5, 2.0, 4, dtype=np.float32)
        model[3].bias.data[:] = np.linspace(-0.3, 0.3, 4, dtype=np.float32)
        model.eval()
    assert pair.fast.unsupported is None
    x, labels = images(rng, batch), rng.integers(0, 5, batch)
    assert pair.step(x, labels, need_dx=batch != 1)[0] == 1
    for model in (pair.fast_model, pair.slow_model):  # back to training: the batch's statistics again
        model.train()
    assert pair.step(x[:2].repeat(4, axis=0), labels[:2].repeat(4))[0] == 1


@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_eval_first_and_last(affine, rng):
    """BatchNorm as a plan's first op (its input the caller's) and as its last (its output
    gradient the caller's), with and without weight and bias."""
    def make(seed):
        rng = np.random.default_rng(seed)
        first, last = nn.BatchNorm2d(1, affine=affine), nn.BatchNorm2d(3, affine=affine, eps=1e-3)
        for bn, value in ((first, 0.3), (last, -0.2)):
            bn.running_mean[:] = value
            bn.running_var[:] = np.linspace(0.5, 2.0, bn.num_features, dtype=np.float32)
        model = nn.Sequential(first, *conv_block(rng, 1, 3), last)
        return model.eval()
    pair = Pair(make)
    x, labels = images(rng, 64), rng.integers(0, 3, 64)
    # the loss reads the (64, 3, 8, 8) map flattened by the eager ops after it
    for network, model in ((pair.fast, pair.fast_model), (pair.slow_model, pair.slow_model)):
        model.zero_grad()
        inputs = gpuconv.tensor(x, requires_grad=True)
        y = network(inputs)
        (y * y).sum().backward()
        model.dx = inputs.grad
        model.y = y
    assert len(plans_on_tape(pair.fast_model.y)) == 1
    assert_close(pair.fast_model.y.data, pair.slow_model.y.data)
    assert_close(pair.fast_model.dx, pair.slow_model.dx)
    pair.assert_same_state()


def test_sgd_training_follows_the_eager_model(rng):
    pair = Pair(with_shared_conv, seed=3)
    optimizers = [optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (pair.fast_model, pair.slow_model)]
    for batch in (64, 61, 64):
        x, labels = images(rng, batch), rng.integers(0, 5, batch)
        pair.step(x, labels, need_dx=False)
        for optimizer in optimizers:
            optimizer.step()
    for (name, a), b in zip(pair.fast_model.state_dict().items(), pair.slow_model.state_dict().values()):
        assert_close(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-4)


def test_segments_the_executor_cannot_take_run_eagerly(rng, monkeypatch):
    """float64 and kernel emulation run the whole model eagerly; a NaN makes a plan's output
    non-finite, and that segment runs its layers eagerly: the eager model's bits in each case."""
    pair = Pair(with_dropout)
    x, labels = images(rng, 8), rng.integers(0, 5, 8)
    x[2, 0, 8, 8] = np.nan
    assert pair.fast.uses_executor(x)  # a plan would take it, and hands a NaN back
    fast, slow = pair.fast(x), pair.slow_model(x)
    assert not plans_on_tape(fast) and np.isnan(fast.data[2]).all()
    np.testing.assert_array_equal(fast.data, slow.data)
    x = images(rng, 8)
    assert not pair.fast.uses_executor(x.astype(np.float64))
    monkeypatch.setenv("GPUCONV_EMULATE", "1")
    assert not pair.fast.uses_executor(x)
    fast, slow = pair.fast(x), pair.slow_model(x)
    assert not plans_on_tape(fast)
    np.testing.assert_array_equal(fast.data, slow.data)


def test_float64_model_runs_eagerly(rng):
    """A float64 model on a float64 batch: no plan takes it, every segment runs eagerly."""
    def make(seed):
        model = with_dropout(seed)
        for p in model.parameters():
            p.data = p.data.astype(np.float64)
        return model
    pair = Pair(make)
    x = images(rng, 8).astype(np.float64)
    assert not pair.fast.uses_executor(x)
    fast, slow = pair.fast(x), pair.slow_model(x)
    assert not plans_on_tape(fast) and fast.data.dtype == np.float64
    np.testing.assert_array_equal(fast.data, slow.data)


def with_scaled_convs(seed):
    """A module with its own forward between each conv and its pool: no run holds a fused conv."""
    rng = np.random.default_rng(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, rng=rng), Scale(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 6, 3, padding=1, rng=rng), Scale(6), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(6 * 4 * 4, 10, rng=rng))


def test_runs_without_a_fused_conv_pool_run_eagerly(rng):
    """A module of its own (Scale) splits every conv from its pool: no run is worth a plan, so the
    compiled model is the eager one (same bits), and says why."""
    pair = Pair(with_scaled_convs)
    x, labels = images(rng, 8), rng.integers(0, 10, 8)
    assert not pair.fast.uses_executor(x)
    fast, slow = pair.fast(x), pair.slow_model(x)
    assert not plans_on_tape(fast)
    np.testing.assert_array_equal(fast.data, slow.data)
    text = pair.fast.unsupported
    assert "step 1 Scale" in text and "not worth a plan" in text


def test_unsupported_names_the_eager_steps():
    assert gpuconv.compile(LeNet5()).unsupported is None
    compiled = gpuconv.compile(with_custom_module_nested(0))
    assert "step 3 Scale" in compiled.unsupported and "step 7 LPPool2d" in compiled.unsupported
    assert "Scale" in gpuconv.compile(Scale(2)).unsupported  # a model that is one eager step


def test_a_plan_whose_input_shape_it_cannot_take_runs_eagerly(rng):
    """The second conv block sees a 1x1 map (its pool would be empty): that segment runs eagerly
    (and the eager pool says what it says), the first still runs its plan."""
    rng2 = np.random.default_rng(0)
    model = nn.Sequential(*conv_block(rng2, 1, 2), Scale(2), nn.Conv2d(2, 2, 1, rng=rng2), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten())
    compiled = gpuconv.compile(model)
    x = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)  # 3 -> pool -> 1 -> the second pool: empty
    assert compiled.uses_executor(x)
    second = compiled._current_segments()[-1]
    assert second.plan is not None and not compiled._plan_for(second, np.empty((4, 2, 1, 1), np.float32))


# ----------------------------------------------------------------------------------------------
# AdaptiveAvgPool2d(1), the global average pool, lowered


def with_global_pool(seed):
    """A whole chain the executor lowers: convs, then the global average pool and a Linear."""
    rng = np.random.default_rng(seed)
    return nn.Sequential(*conv_block(rng, 1, 4), nn.Conv2d(4, 6, 3, padding=1, rng=rng), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5, rng=rng))


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_global_average_pool_lowers_and_matches(batch, rng):
    pair = Pair(with_global_pool)
    x, labels = images(rng, batch), rng.integers(0, 5, batch)
    assert pair.fast.unsupported is None  # the whole model is one plan
    count, logits = pair.step(x, labels, need_dx=batch != 1)
    assert count == 1 and isinstance(logits.creator, PlanFunction)


def test_global_average_pool_as_the_output_and_between_eager_steps(rng):
    """The pool ends a plan (its output NCHW, its output gradient the caller's) after a BatchNorm
    and before a Scale; the input gradient through it is the eager one's."""
    def make(seed):
        rng = np.random.default_rng(seed)
        return nn.Sequential(nn.BatchNorm2d(1), *conv_block(rng, 1, 3), nn.AdaptiveAvgPool2d(1), Scale(3),
                             nn.Flatten(), nn.Linear(3, 5, rng=rng))
    pair = Pair(make)
    x, labels = images(rng, 64), rng.integers(0, 5, 64)
    assert pair.step(x, labels)[0] == 1


def test_other_adaptive_sizes_run_eagerly(rng):
    model = nn.Sequential(*conv_block(np.random.default_rng(0), 1, 2), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    compiled = gpuconv.compile(model)
    assert "output_size=1" in compiled.unsupported
    x = images(rng, 8)
    assert compiled.uses_executor(x)  # the conv block before it still runs its plan
    fast, slow = compiled(x), model(x)
    assert len(plans_on_tape(fast)) == 1
    assert_close(fast.data, slow.data)


def test_uses_executor_follows_the_shapes_between_segments(rng):
    """uses_executor runs nothing: the shape reaching a plan comes from the eager layers'
    output_shape, and a plan that could not take it does not count."""
    def model(pool):
        rng2 = np.random.default_rng(0)
        return nn.Sequential(nn.LPPool2d(2, pool), *conv_block(rng2, 1, 2), nn.Flatten())
    x = images(rng, 4)  # 16 x 16
    fits, too_small = gpuconv.compile(model(2)), gpuconv.compile(model(16))  # 8 x 8, or 1 x 1 for the pool
    assert fits.uses_executor(x) and not too_small.uses_executor(x)
    assert len(plans_on_tape(fits(x))) == 1
    # a module without output_shape (Scale) before the plan: taken to run it
    scaled = gpuconv.compile(nn.Sequential(Scale(1), *conv_block(np.random.default_rng(0), 1, 2)))
    assert scaled.uses_executor(x) and len(plans_on_tape(scaled(x))) == 1


def simple_cnn_eval(seed):
    """SimpleCNN (conv -> BatchNorm -> pool -> ReLU blocks) with running statistics, weights and
    biases off their defaults, in eval mode: one whole-model plan with BatchNorm right after convs."""
    model = SimpleCNN(widths=(4, 6), hidden=8, image_size=16, seed=seed)
    rng = np.random.default_rng(seed)
    for layer in model:
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean[:] = rng.uniform(-0.2, 0.2, layer.num_features)
            layer.running_var[:] = rng.uniform(0.5, 2.0, layer.num_features)
            layer.weight.data[:] = rng.uniform(0.5, 1.5, layer.num_features)
            layer.bias.data[:] = rng.uniform(-0.2, 0.2, layer.num_features)
    return model.eval()


@pytest.mark.parametrize("batch", [7, 64])
def test_simple_cnn_in_eval_is_one_plan_and_matches(batch, rng):
    pair = Pair(simple_cnn_eval)
    assert pair.fast.unsupported is None
    x, labels = images(rng, batch), rng.integers(0, 10, batch)
    assert pair.step(x, labels)[0] == 1


def test_backward_twice_through_batchnorm_after_a_conv(rng):
    """A second backward (retain_graph) reads what BatchNorm kept of the conv's output: the conv's
    first backward must not have written over it."""
    model = simple_cnn_eval(0)
    compiled = gpuconv.compile(model)
    x, labels = images(rng, 8), rng.integers(0, 10, 8)
    inputs = gpuconv.tensor(x, requires_grad=True)
    loss = F.cross_entropy(compiled(inputs), labels)
    loss.backward(retain_graph=True)
    first = inputs.grad.copy(), {name: p.grad.copy() for name, p in model.named_parameters()}
    model.zero_grad()
    inputs.grad = None
    loss.backward()
    np.testing.assert_array_equal(inputs.grad, first[0])
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(p.grad, first[1][name])
