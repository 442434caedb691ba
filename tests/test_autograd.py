"""Autograd end to end: models that define only forward(), checked against central differences.

Every gradient check runs in float64 (layers built with dtype=np.float64, float64 inputs) and
compares the tape's gradients of the input and of every parameter with
gpuconv.gradcheck.numerical_grad of the same forward run under no_grad(). Random model graphs
come from a seeded generator (the seed is the test id, so a failure replays exactly); fixed
structures cover each building block on its own. The rest pins down the tape's bookkeeping
(accumulation, zero_grad, no_grad, retain_graph), state_dict keys and round trips, BatchNorm2d's
running statistics against PyTorch's formulas, and cross_entropy against a NumPy formula.
"""
import gc
import weakref

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

import gpuconv
from gpuconv import functional as F
from gpuconv import nn, optim
from gpuconv.gradcheck import assert_allclose_grad, numerical_grad

F64 = np.float64
RTOL, ATOL = 1e-5, 1e-7


# ----------------------------------------------------------------------------------------------
# helpers


def conv(rng, c_in, c_out, k=3, **kw):
    return nn.Conv2d(c_in, c_out, k, rng=rng, dtype=F64, **kw)


def bn(c, **kw):
    return nn.BatchNorm2d(c, dtype=F64, **kw)


def randomize_bn(layer, rng):
    """Non-trivial affine parameters and running statistics, so eval mode is not the identity."""
    if layer.affine:
        layer.weight.data = rng.uniform(0.5, 1.5, layer.num_features)
        layer.bias.data = rng.standard_normal(layer.num_features) * 0.3
    if layer.track_running_stats:
        layer.running_mean = rng.standard_normal(layer.num_features) * 0.3
        layer.running_var = rng.uniform(0.5, 2.0, layer.num_features)
    return layer


def forward_array(model, x):
    with gpuconv.no_grad():
        return model(gpuconv.tensor(x)).data


def check_model_grads(model, x, seed=0, rtol=RTOL, atol=ATOL, names=None):
    """Backward of model(x) with a random output gradient vs central differences, for the input
    and every parameter (or those in `names`). Returns the analytic gradients {name: array}
    ('input' for x)."""
    x_t = gpuconv.tensor(x, requires_grad=True)
    out = model(x_t)
    assert out.requires_grad and out.dtype == F64
    dy = np.random.default_rng(seed).standard_normal(out.shape)
    out.backward(dy)
    grads = {"input": x_t.grad}
    assert_allclose_grad("input", x_t.grad, numerical_grad(lambda v: forward_array(model, v), x, dy=dy),
                         rtol, atol)
    params = [(n, p) for n, p in model.named_parameters() if names is None or n in names]
    assert params, "the model has no parameters to check"
    for name, p in params:
        assert p.grad is not None, f"{name}: no gradient"
        assert p.grad.shape == p.shape and p.grad.dtype == F64, name
        saved = p.data

        def run(v, p=p):
            p.data = v
            return forward_array(model, x)

        try:
            numeric = numerical_grad(run, saved, dy=dy)
        finally:
            p.data = saved
        assert_allclose_grad(name, p.grad, numeric, rtol, atol)
        grads[name] = p.grad
    return grads


def tensor_gradcheck(f, arrays, seed=0, rtol=RTOL, atol=ATOL):
    """f(*tensors) -> Tensor; check the gradient of every input against central differences."""
    leaves = [gpuconv.tensor(a, requires_grad=True) for a in arrays]
    out = f(*leaves)
    dy = np.random.default_rng(seed).standard_normal(out.shape)
    out.backward(dy)
    for k, (leaf, a) in enumerate(zip(leaves, arrays)):
        def one(v, k=k):
            args = [gpuconv.tensor(b) for b in arrays]
            args[k] = gpuconv.tensor(v)
            with gpuconv.no_grad():
                return f(*args).data
        assert leaf.grad is not None, f"input {k}: no gradient"
        assert_allclose_grad(f"input {k}", leaf.grad, numerical_grad(one, a, dy=dy), rtol, atol)


# ----------------------------------------------------------------------------------------------
# building blocks (channels in == channels out), Modules that define forward() only


class Residual(nn.Module):
    """The issue's block: one activation instance applied twice."""

    def __init__(self, c, rng, act=None):
        self.conv1, self.bn1 = conv(rng, c, c, padding=1, bias=False), bn(c)
        self.conv2, self.bn2 = conv(rng, c, c, padding=1, bias=False), bn(c)
        self.act = act if act is not None else nn.ReLU()

    def forward(self, x):
        y = self.act(self.bn1(self.conv1(x)))
        return self.act(x + self.bn2(self.conv2(y)))


class ReusedConv(nn.Module):
    """One conv layer instance applied twice (its weight gets two gradient contributions)."""

    def __init__(self, c, rng):
        self.conv = conv(rng, c, c, padding=1)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x):
        return self.conv(self.act(self.conv(x)))


class SharedWeight(nn.Module):
    """Two conv layers (different dilation, own biases) sharing one weight Parameter."""

    def __init__(self, c, rng):
        self.a = conv(rng, c, c, padding=1)
        self.b = conv(rng, c, c, padding=2, dilation=2)
        self.b.weight = self.a.weight
        self.b.bias.data = rng.standard_normal(c) * 0.1

    def forward(self, x):
        return self.b(F.relu(self.a(x))) + x


class CatBranches(nn.Module):
    """Inception-like: concatenate x and two conv branches along channels, mix with a 1x1 conv."""

    def __init__(self, c, rng):
        self.one = conv(rng, c, 1, k=1)
        self.three = conv(rng, c, 2, padding=1, bias=False)
        self.mix = conv(rng, c + 3, c, k=1)

    def forward(self, x):
        return self.mix(gpuconv.cat([x, self.one(x), F.relu(self.three(x))], dim=1))


class BNTrain(nn.Module):
    def __init__(self, c, rng):
        self.norm = randomize_bn(bn(c, momentum=float(rng.choice([0.1, 0.5])),
                                    affine=bool(rng.integers(2))), rng)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x):
        return self.act(self.norm(x))


class BNEval(nn.Module):
    def __init__(self, c, rng):
        self.norm = randomize_bn(bn(c, affine=bool(rng.integers(2))), rng).eval()

    def forward(self, x):
        return F.relu(self.norm(x)) - x * 0.5


class Broadcasting(nn.Module):
    """Arithmetic between tensors of broadcast shapes and with Python scalars."""

    def __init__(self, c, rng):
        self.scale = nn.Parameter(rng.uniform(0.5, 1.5, (1, c, 1, 1)))
        self.shift = nn.Parameter(rng.standard_normal((c, 1, 1)) * 0.1)
        self.row = nn.Parameter(rng.standard_normal((1, 1, 1, 1)) * 0.1 + 1.0)

    def forward(self, x):
        centered = x - x.mean(dim=(2, 3), keepdim=True)
        energy = (x ** 2).sum(dim=1, keepdim=True) * 0.1
        return centered * self.scale + self.shift - energy / (2.0 + self.row * self.row) + 1.0 / (2.0 + x * x)


class ChannelRoll(nn.Module):
    """Indexing and cat: roll the channels by one, then a 1x1 conv."""

    def __init__(self, c, rng):
        self.mix = conv(rng, c, c, k=1)

    def forward(self, x):
        return self.mix(gpuconv.cat([x[:, 1:], x[:, :1]], dim=1)) + x[:, :, :, :]


POOLS = [lambda: nn.MaxPool2d(2), lambda: nn.AvgPool2d(3, stride=2, padding=1),
         lambda: nn.MaxPool2d(3, stride=1, padding=1), lambda: nn.AvgPool2d(2, stride=1),
         lambda: nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
         lambda: nn.AdaptiveAvgPool2d(3), lambda: nn.AdaptiveAvgPool2d(1)]


class Pool(nn.Module):
    def __init__(self, c, rng, kind=None):
        self.pool = POOLS[int(rng.integers(len(POOLS))) if kind is None else kind]()

    def forward(self, x):
        return self.pool(x)


BLOCKS = [Residual, ReusedConv, SharedWeight, CatBranches, BNTrain, BNEval, Broadcasting, ChannelRoll, Pool]


class Head(nn.Module):
    def __init__(self, c, rng, kind, classes=3):
        self.kind = kind
        if kind == "gap":
            self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(c, classes, rng=rng, dtype=F64)
        elif kind == "adaptive2":
            self.pool, self.fc = nn.AdaptiveAvgPool2d(2), nn.Linear(4 * c, classes, rng=rng, dtype=F64)
        else:
            self.pool, self.fc = None, None  # a Linear on the flattened map, built lazily by size
        self.rng, self.classes = rng, classes

    def forward(self, x):
        if self.pool is not None:
            x = self.pool(x)
        x = x.flatten(1)
        if self.fc is None:
            self.fc = nn.Linear(x.shape[1], self.classes, rng=self.rng, dtype=F64)
        return self.fc(x)


INPUT_SHAPE = (2, 1, 5, 5)


class RandomNet(nn.Module):
    def __init__(self, seed):
        rng = np.random.default_rng(seed)
        self.c = c = 2
        self.stem = conv(rng, 1, c, padding=1, bias=bool(rng.integers(2)))
        kinds = list(rng.choice(len(BLOCKS), size=int(rng.integers(2, 6)), replace=True))
        pools = [k for k in kinds if BLOCKS[k] is Pool]
        for extra in pools[1:]:  # at most one pool: the map stays large enough for the next blocks
            kinds.remove(extra)
        self.blocks = nn.ModuleList([BLOCKS[k](c, rng) for k in kinds])
        self.head = Head(c, rng, ["gap", "adaptive2", "flatten"][int(rng.integers(3))])
        forward_array(self, np.zeros(INPUT_SHAPE))  # builds the head's lazy Linear before any check

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def input_for(shape, seed):
    return np.random.default_rng(1000 + seed).standard_normal(shape) + 0.05


# ----------------------------------------------------------------------------------------------
# gradient checks of whole models


@pytest.mark.parametrize("block", BLOCKS, ids=[b.__name__ for b in BLOCKS])
def test_each_block_gradcheck(block):
    rng = np.random.default_rng(7)
    model = block(2, rng)  # blocks set their own modes: BNEval's norm is in eval
    if block is Pool:  # no parameters of its own: a conv in front gets the gradient through it
        model = nn.Sequential(conv(rng, 2, 2, padding=1), model)
    check_model_grads(model, input_for((2, 2, 5, 5), 7), seed=7)


@pytest.mark.parametrize("kind", range(len(POOLS)))
def test_each_pool_gradcheck(kind):
    rng = np.random.default_rng(kind)
    model = nn.Sequential(conv(rng, 1, 2, padding=1), Pool(2, rng, kind))
    check_model_grads(model, input_for((2, 1, 5, 5), kind), seed=kind)


SEEDS = range(30)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_model_graph_gradcheck(seed):
    model = RandomNet(seed)
    check_model_grads(model, input_for(INPUT_SHAPE, seed), seed=seed)


def test_random_graphs_cover_every_block():
    """The seeds above exercise every block kind at least once (else the list of seeds must grow)."""
    nets = [RandomNet(seed) for seed in SEEDS]
    assert {type(b) for net in nets for b in net.blocks} == set(BLOCKS)
    assert {net.head.kind for net in nets} == {"gap", "adaptive2", "flatten"}


def test_model_gradcheck_through_cross_entropy():
    rng = np.random.default_rng(3)

    class Net(nn.Module):
        def __init__(self):
            self.body = nn.Sequential(conv(rng, 1, 3, padding=1), bn(3), nn.ReLU(), nn.MaxPool2d(2))
            self.head = nn.Linear(3 * 2 * 2, 4, rng=rng, dtype=F64)

        def forward(self, x):
            return F.cross_entropy(self.head(self.body(x).flatten(1)), np.array([0, 3, 1]),
                                   label_smoothing=0.1)

    check_model_grads(Net(), input_for((3, 1, 4, 4), 3))


def test_the_helper_catches_a_wrong_gradient():
    """check_model_grads must fail when a backward is wrong: a ReLU whose backward lets all
    gradient through."""

    class LeakyByMistake(F.Function):
        def forward(self, x):
            return np.maximum(x, 0)

        def backward(self, g):
            return g

    class Net(nn.Module):
        def __init__(self):
            self.conv = conv(np.random.default_rng(0), 1, 2, padding=1)

        def forward(self, x):
            return LeakyByMistake()(self.conv(x))

    with pytest.raises(AssertionError, match="gradient mismatch"):
        check_model_grads(Net(), input_for((2, 1, 4, 4), 0))


# ----------------------------------------------------------------------------------------------
# the headline bug: one ReLU instance used twice


def test_one_relu_used_twice_in_a_residual_block_gives_correct_dx():
    rng = np.random.default_rng(11)
    block = Residual(3, rng)
    for layer in (block.bn1, block.bn2):
        randomize_bn(layer, rng)
    x = input_for((2, 3, 4, 4), 11)
    grads = check_model_grads(block, x, seed=11)

    # the same weights with two ReLU instances give exactly the same gradients
    twin = Residual(3, np.random.default_rng(0))
    twin.load_state_dict(block.state_dict())
    relu_a, relu_b = nn.ReLU(), nn.ReLU()

    def forward(x):
        y = relu_a(twin.bn1(twin.conv1(x)))
        return relu_b(x + twin.bn2(twin.conv2(y)))

    twin.forward = forward
    x_t = gpuconv.tensor(x, requires_grad=True)
    out = twin(x_t)
    out.backward(np.random.default_rng(11).standard_normal(out.shape))
    np.testing.assert_allclose(x_t.grad, grads["input"], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(twin.conv1.weight.grad, grads["conv1.weight"], rtol=1e-12, atol=1e-14)


def test_relu_used_twice_on_one_tensor_sums_both_paths():
    """y = relu(x) + relu(x) through the same instance: dy/dx = 2 where x > 0, 0 elsewhere."""
    act = nn.ReLU()
    x = gpuconv.tensor(np.array([-1.5, -0.2, 0.3, 2.0]), requires_grad=True)
    (act(x) + act(x) * 3.0).sum().backward()
    np.testing.assert_array_equal(x.grad, [0.0, 0.0, 4.0, 4.0])


# ----------------------------------------------------------------------------------------------
# Tensor arithmetic with broadcasting, shapes and indexing


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
@pytest.mark.parametrize("shapes", [((2, 3, 4), (3, 1)), ((2, 1, 4), (1, 3, 1)), ((4,), (2, 3, 4)),
                                    ((2, 3), ())], ids=["trailing", "both", "left-small", "0-d"])
def test_broadcasting_arithmetic_gradcheck(op, shapes):
    rng = np.random.default_rng(5)
    a = rng.standard_normal(shapes[0])
    b = rng.uniform(0.5, 1.5, shapes[1]) * rng.choice([-1, 1], shapes[1])  # away from 0 for div
    f = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b,
         "mul": lambda a, b: a * b, "div": lambda a, b: a / b}[op]
    tensor_gradcheck(f, [a, b])


@settings(max_examples=40, derandomize=True, deadline=None)
@given(shapes=hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=4, max_side=3),
       op=st.sampled_from(["add", "sub", "mul", "div"]), seed=st.integers(0, 2 ** 16))
def test_broadcasting_arithmetic_gradcheck_any_shapes(shapes, op, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shapes.input_shapes[0])
    b = rng.uniform(0.5, 1.5, shapes.input_shapes[1]) * rng.choice([-1, 1], shapes.input_shapes[1])
    f = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b,
         "mul": lambda a, b: a * b, "div": lambda a, b: a / b}[op]
    out = f(gpuconv.tensor(a), gpuconv.tensor(b))
    assert out.shape == shapes.result_shape
    tensor_gradcheck(f, [a, b], seed=seed)


def test_scalar_and_numpy_operands_gradcheck():
    rng = np.random.default_rng(6)
    a = rng.uniform(0.5, 2.0, (3, 4))
    const = rng.standard_normal(4)
    tensor_gradcheck(lambda t: 2.0 - t * 3.0 + 1.0 / t + const * t - t / 4.0 + (-t) ** 3 + t ** 0.5, [a])
    tensor_gradcheck(lambda t: const + t, [a])   # ndarray on the left: Tensor.__radd__
    tensor_gradcheck(lambda t: const / t, [a])   # Tensor.__rtruediv__


def test_reductions_reshape_matmul_indexing_gradcheck():
    rng = np.random.default_rng(8)
    a, w = rng.standard_normal((2, 3, 4)), rng.standard_normal((12, 5))
    tensor_gradcheck(lambda t: t.sum(dim=1) * t.mean(dim=(0, 2), keepdim=True).sum(), [a])
    tensor_gradcheck(lambda t, w: t.reshape(2, 12) @ w, [a, w])
    tensor_gradcheck(lambda t, w: t.flatten(1) @ w - t.view(2, -1).mean(), [a, w])
    tensor_gradcheck(lambda t: t[1, ::-1, 1:3] * t[0, :, :2], [a])
    tensor_gradcheck(lambda t: t[:, [0, 0, 2]] * 2.0, [a])  # repeated indices add up
    tensor_gradcheck(lambda t, w: gpuconv.cat([t, t * 2.0, w.reshape(-1)[:6].reshape(2, 3, 1)], dim=2), [a, w])


def test_repeated_fancy_index_gradient_is_the_count():
    x = gpuconv.tensor(np.zeros(4), requires_grad=True)
    x[np.array([0, 2, 2, 2, 3])].sum().backward()
    np.testing.assert_array_equal(x.grad, [1.0, 0.0, 3.0, 1.0])


# ----------------------------------------------------------------------------------------------
# accumulation, zero_grad, no_grad, retain_graph


def _small_net(seed=0):
    rng = np.random.default_rng(seed)
    return nn.Sequential(conv(rng, 1, 2, padding=1), bn(2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(2, 3, rng=rng, dtype=F64))


def _grads(model):
    return {name: p.grad.copy() for name, p in model.named_parameters()}


def test_two_backward_calls_add_their_gradients_and_zero_grad_clears():
    model = _small_net()
    x, y = input_for((4, 1, 4, 4), 1), np.array([0, 1, 2, 1])
    F.cross_entropy(model(gpuconv.tensor(x)), y).backward()
    once = _grads(model)
    assert all(np.abs(g).max() > 0 for g in once.values())
    F.cross_entropy(model(gpuconv.tensor(x)), y).backward()
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, 2 * once[name], rtol=1e-12, err_msg=name)

    opt = optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    F.cross_entropy(model(gpuconv.tensor(x)), y).backward()
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, once[name], rtol=1e-12, err_msg=name)
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_input_leaf_accumulates_too_and_grad_is_not_aliased():
    x = gpuconv.tensor(np.arange(3.0), requires_grad=True)
    (x * 2.0).sum().backward()
    (x * x).sum().backward()
    np.testing.assert_array_equal(x.grad, [2.0, 4.0, 6.0])

    x.grad = None
    g = np.ones(3)
    (x + 0.0).backward(g)  # Add passes g through unchanged: the leaf must copy it, not keep it
    g[:] = 5.0
    np.testing.assert_array_equal(x.grad, [1.0, 1.0, 1.0])
    x.grad = None
    x.sum().backward()  # a broadcast (read-only) gradient: .grad must still be writable
    x.grad += g
    np.testing.assert_array_equal(x.grad, [6.0, 6.0, 6.0])


def test_no_grad_records_no_graph_and_keeps_nothing():
    model = _small_net()
    data = input_for((2, 1, 4, 4), 2)
    with gpuconv.no_grad():
        assert not gpuconv.is_grad_enabled()
        out = model(gpuconv.tensor(data, requires_grad=True))
    assert gpuconv.is_grad_enabled()
    assert not out.requires_grad and out.creator is None and out.is_leaf
    with pytest.raises(RuntimeError, match="does not require grad"):
        out.sum().backward()
    assert all(p.grad is None for p in model.parameters())
    np.testing.assert_allclose(out.data, model(gpuconv.tensor(data)).data, rtol=1e-12)

    # nothing kept: the input array dies with its last reference under no_grad ...
    def input_survives(grad_mode):
        array = input_for((2, 1, 4, 4), 3)
        ref = weakref.ref(array)
        with (gpuconv.enable_grad() if grad_mode else gpuconv.no_grad()):
            out = model[0](gpuconv.Tensor(array))  # conv saves its input for the weight gradient
        del array
        gc.collect()
        alive = ref() is not None
        del out
        return alive

    assert not input_survives(False)
    assert input_survives(True)  # ... while the recorded graph keeps it for backward


def test_no_grad_as_decorator_and_nested_enable_grad_and_restored_after_error():
    @gpuconv.no_grad()
    def infer(t):
        return t * 2.0

    x = gpuconv.tensor(np.ones(2), requires_grad=True)
    assert not infer(x).requires_grad
    with gpuconv.no_grad():
        with gpuconv.enable_grad():
            assert (x * 2.0).requires_grad
        assert not (x * 2.0).requires_grad
    with pytest.raises(ValueError):
        with gpuconv.no_grad():
            raise ValueError("boom")
    assert gpuconv.is_grad_enabled() and (x * 2.0).requires_grad


def test_backward_twice_needs_retain_graph():
    model = _small_net()
    x = input_for((3, 1, 4, 4), 4)
    loss = F.cross_entropy(model(gpuconv.tensor(x)), np.array([0, 1, 2]))
    loss.backward()
    once = _grads(model)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()

    model.zero_grad()
    loss = F.cross_entropy(model(gpuconv.tensor(x)), np.array([0, 1, 2]))
    loss.backward(retain_graph=True)
    loss.backward()
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, 2 * once[name], rtol=1e-12, err_msg=name)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()  # the second call did not retain


def test_backward_needs_a_gradient_for_non_scalars():
    x = gpuconv.tensor(np.ones((2, 2)), requires_grad=True)
    with pytest.raises(Exception, match="grad"):
        (x * 2.0).backward()
    (x * 2.0).backward(np.full((2, 2), 0.5))
    np.testing.assert_array_equal(x.grad, np.ones((2, 2)))


# ----------------------------------------------------------------------------------------------
# a forward that branches in Python


class Branchy(nn.Module):
    def __init__(self, rng):
        self.conv = conv(rng, 1, 2, padding=1)
        self.extra = conv(rng, 2, 2, padding=1)
        self.fc_big = nn.Linear(2, 3, rng=rng, dtype=F64)
        self.fc_small = nn.Linear(2 * 2 * 2, 3, rng=rng, dtype=F64)
        self.use_extra = True

    def forward(self, x):
        y = F.relu(self.conv(x))
        if self.use_extra:
            y = y + F.leaky_relu(self.extra(y), 0.1)
        if x.shape[-1] > 4:  # large images: global pool; small: flatten
            return self.fc_big(F.adaptive_avg_pool2d(y, 1).flatten(1))
        return self.fc_small(y.flatten(1)) if x.shape[-1] == 2 else self.fc_small(F.max_pool2d(y, 2).flatten(1))


@pytest.mark.parametrize("use_extra", [True, False])
@pytest.mark.parametrize("size", [6, 4, 2])
def test_forward_branching_in_python_gradcheck(use_extra, size):
    model = Branchy(np.random.default_rng(9))
    model.use_extra = use_extra
    x = input_for((2, 1, size, size), 9)
    x_t = gpuconv.tensor(x, requires_grad=True)
    model(x_t).sum().backward()
    used = {"conv.weight", "conv.bias"} | ({"extra.weight", "extra.bias"} if use_extra else set()) | \
        ({"fc_big.weight", "fc_big.bias"} if size > 4 else {"fc_small.weight", "fc_small.bias"})
    assert {n for n, p in model.named_parameters() if p.grad is not None} == used
    model.zero_grad()
    check_model_grads(model, x, seed=size, names=used)


# ----------------------------------------------------------------------------------------------
# state_dict


class Block(nn.Module):
    def __init__(self, c, rng):
        self.conv1, self.bn1 = conv(rng, c, c, padding=1, bias=False), bn(c)
        self.conv2, self.bn2 = conv(rng, c, c, padding=1, bias=False), bn(c)
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.act(self.bn1(self.conv1(x)))
        return self.act(x + self.bn2(self.conv2(y)))


class Net(nn.Module):
    def __init__(self, seed):
        rng = np.random.default_rng(seed)
        self.stem = conv(rng, 1, 3, padding=1, bias=False)
        self.bn = bn(3)
        self.layer1 = nn.Sequential(Block(3, rng), Block(3, rng))
        self.extras = nn.ModuleList([nn.Identity(), bn(3, affine=False), bn(3, track_running_stats=False)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 4, rng=rng, dtype=F64)
        self.temperature = nn.Parameter(np.array([1.5]))  # assigned after children: still listed first

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.layer1(x)
        for m in self.extras:
            x = m(x)
        return self.fc(self.pool(x).flatten(1)) / self.temperature


BN_KEYS = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


def test_state_dict_keys_are_pytorchs():
    """The keys and order torch.nn.Module.state_dict() gives for the same tree: per module its own
    parameters, then its buffers, then its children depth first; None parameters and buffers
    (bias=False, affine=False, track_running_stats=False) are left out."""
    expected = ["temperature", "stem.weight"] + [f"bn.{k}" for k in BN_KEYS]
    for b in ("0", "1"):
        for i in ("1", "2"):
            expected += [f"layer1.{b}.conv{i}.weight"] + [f"layer1.{b}.bn{i}.{k}" for k in BN_KEYS]
    expected += ["extras.1.running_mean", "extras.1.running_var", "extras.1.num_batches_tracked",
                 "extras.2.weight", "extras.2.bias", "fc.weight", "fc.bias"]
    state = Net(0).state_dict()
    assert list(state) == expected
    assert state["bn.num_batches_tracked"].shape == () and state["bn.num_batches_tracked"].dtype == np.int64
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    assert [n for n, _ in Net(0).named_parameters()] == [k for k in expected if not k.endswith(buffers)]


def test_shared_parameter_appears_once_in_parameters_but_under_both_names_in_state_dict():
    block = SharedWeight(2, np.random.default_rng(0))
    assert [n for n, _ in block.named_parameters()] == ["a.weight", "a.bias", "b.bias"]
    assert list(block.state_dict()) == ["a.weight", "a.bias", "b.weight", "b.bias"]  # as PyTorch


def _train_steps(model, steps, seed):
    rng = np.random.default_rng(seed)
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        x, y = rng.standard_normal((4, 1, 6, 6)), rng.integers(0, 4, 4)
        loss = F.cross_entropy(model(gpuconv.tensor(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_state_dict_round_trip_with_batchnorm_buffers():
    model = Net(0)
    _train_steps(model, 3, seed=1)
    state = model.state_dict()
    assert int(state["layer1.1.bn2.num_batches_tracked"]) == 3
    assert not np.allclose(state["layer1.0.bn1.running_var"], 1.0)

    x = gpuconv.tensor(input_for((3, 1, 6, 6), 5))
    fresh = Net(1).eval()
    model.eval()
    with gpuconv.no_grad():
        expected = model(x).data
        assert not np.allclose(fresh(x).data, expected)  # a different model before loading
        fresh.load_state_dict(state)
        np.testing.assert_array_equal(fresh(x).data, expected)
    for key, value in fresh.state_dict().items():
        np.testing.assert_array_equal(value, state[key], err_msg=key)

    # no aliasing: the saved dict is a copy and loading copies it again, so training either model
    # (in-place updates of weights and running statistics) changes neither the dict nor the other
    snapshot = {k: v.copy() for k, v in state.items()}
    _train_steps(model, 1, seed=2)
    fresh_state = fresh.state_dict()
    _train_steps(fresh, 1, seed=3)
    for key in snapshot:
        np.testing.assert_array_equal(state[key], snapshot[key], err_msg=key)
        np.testing.assert_array_equal(fresh_state[key], snapshot[key], err_msg=key)
    assert not np.allclose(fresh.state_dict()["layer1.0.bn1.running_mean"], snapshot["layer1.0.bn1.running_mean"])


def test_load_state_dict_rejects_missing_and_misshapen_keys():
    state = Net(0).state_dict()
    del state["layer1.0.bn1.running_mean"]
    with pytest.raises(gpuconv.errors.CheckpointError, match="layer1.0.bn1.running_mean"):
        Net(1).load_state_dict(state)
    state = Net(0).state_dict()
    state["fc.weight"] = np.zeros((4, 4))
    with pytest.raises(gpuconv.errors.CheckpointError, match="fc.weight"):
        Net(1).load_state_dict(state)


# ----------------------------------------------------------------------------------------------
# BatchNorm2d running statistics, PyTorch's formulas


def _batches(count, seed, shape=(4, 3, 5, 5)):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) * rng.uniform(0.5, 3.0) + rng.uniform(-2, 2) for _ in range(count)]


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_batchnorm_running_stats_follow_pytorch(momentum):
    layer = bn(3, momentum=momentum)
    mean, var = np.zeros(3), np.ones(3)
    batches = _batches(4, seed=12)
    for t, x in enumerate(batches, start=1):
        layer(gpuconv.tensor(x))
        factor = 1.0 / t if momentum is None else momentum
        mean = (1 - factor) * mean + factor * x.mean(axis=(0, 2, 3))
        var = (1 - factor) * var + factor * x.var(axis=(0, 2, 3), ddof=1)  # unbiased
        assert int(layer.num_batches_tracked) == t
        np.testing.assert_allclose(layer.running_mean, mean, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(layer.running_var, var, rtol=1e-10)
    if momentum is None:  # a cumulative average: exactly the mean of the batches' statistics
        np.testing.assert_allclose(layer.running_mean, np.mean([x.mean(axis=(0, 2, 3)) for x in batches], axis=0),
                                   rtol=1e-12)


def test_batchnorm_float32_running_var_of_a_constant_channel_is_zero():
    x = np.random.default_rng(19).standard_normal((8, 3, 4, 4)).astype(np.float32)
    x[:, 0] = 0.0                    # a dead channel (all ReLU outputs zero)
    x[:, 1] *= np.float32(1e-4)      # a nearly constant one
    layer = nn.BatchNorm2d(3, momentum=1.0)  # running stats = this batch's
    layer(gpuconv.tensor(x))
    exact = x.astype(np.float64).var(axis=(0, 2, 3), ddof=1)
    assert layer.running_var[0] >= 0
    np.testing.assert_allclose(layer.running_var, exact, rtol=1e-5, atol=0)


def test_batchnorm_train_uses_batch_stats_and_eval_uses_running_stats():
    rng = np.random.default_rng(13)
    layer = randomize_bn(bn(3, eps=1e-3), rng)
    w, b = layer.weight.data.copy(), layer.bias.data.copy()
    x = _batches(1, seed=14)[0]
    per = (1, 3, 1, 1)

    out = layer(gpuconv.tensor(x)).data
    mu, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))  # biased for normalizing
    np.testing.assert_allclose(out, (x - mu.reshape(per)) / np.sqrt(var.reshape(per) + 1e-3) * w.reshape(per)
                               + b.reshape(per), rtol=1e-10, atol=1e-12)

    layer.eval()
    rm, rv, count = layer.running_mean.copy(), layer.running_var.copy(), int(layer.num_batches_tracked)
    out = layer(gpuconv.tensor(x)).data
    np.testing.assert_allclose(out, (x - rm.reshape(per)) / np.sqrt(rv.reshape(per) + 1e-3) * w.reshape(per)
                               + b.reshape(per), rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(layer.running_mean, rm)  # eval leaves the statistics alone
    np.testing.assert_array_equal(layer.running_var, rv)
    assert int(layer.num_batches_tracked) == count


def test_batchnorm_without_running_stats_normalizes_by_the_batch_in_eval_too():
    layer = bn(3, track_running_stats=False).eval()
    x = _batches(1, seed=15)[0]
    out = layer(gpuconv.tensor(x)).data
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    np.testing.assert_allclose(out.var(axis=(0, 2, 3)), x.var(axis=(0, 2, 3)) / (x.var(axis=(0, 2, 3)) + 1e-5),
                               rtol=1e-10)
    assert layer.running_mean is None and "running_mean" not in layer.state_dict()


def test_batchnorm_running_stats_update_under_no_grad_in_train_mode():
    """As in PyTorch, no_grad() does not stop a training-mode BatchNorm from updating its statistics."""
    layer = bn(3)
    with gpuconv.no_grad():
        layer(gpuconv.tensor(_batches(1, seed=16)[0]))
    assert int(layer.num_batches_tracked) == 1 and not np.allclose(layer.running_mean, 0)


# ----------------------------------------------------------------------------------------------
# cross_entropy


def _ce_numpy(logits, labels, reduction, smoothing):
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n, c = logits.shape
    q = np.full((n, c), smoothing / c)
    q[np.arange(n), labels] += 1 - smoothing
    per_sample = -(q * logp).sum(axis=1)
    return {"none": per_sample, "sum": per_sample.sum(), "mean": per_sample.mean()}[reduction]


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.7])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_numpy_and_gradcheck(reduction, smoothing):
    rng = np.random.default_rng(17)
    logits = rng.standard_normal((5, 4)) * 3 + 50.0  # large offset: the shift must be there
    labels = np.array([0, 3, 3, 1, 2])
    out = F.cross_entropy(gpuconv.tensor(logits), labels, reduction=reduction, label_smoothing=smoothing)
    expected = _ce_numpy(logits, labels, reduction, smoothing)
    assert out.shape == np.shape(expected)
    np.testing.assert_allclose(out.data, expected, rtol=1e-12)
    tensor_gradcheck(lambda t: F.cross_entropy(t, labels, reduction=reduction, label_smoothing=smoothing),
                     [logits])
    # the module form and a Tensor target agree
    module = nn.CrossEntropyLoss(reduction=reduction, label_smoothing=smoothing)
    np.testing.assert_array_equal(module(gpuconv.tensor(logits), gpuconv.tensor(labels)).data, out.data)


def test_cross_entropy_mean_gradient_is_softmax_minus_onehot_over_n():
    logits = np.array([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]])
    labels = np.array([1, 2])
    t = gpuconv.tensor(logits, requires_grad=True)
    F.cross_entropy(t, labels).backward()
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    p[[0, 1], labels] -= 1
    np.testing.assert_allclose(t.grad, p / 2, rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# a Module defining only forward trains


def test_module_with_only_forward_trains_on_a_tiny_task():
    rng = np.random.default_rng(18)
    n = 32
    labels = rng.integers(0, 2, n)
    images = rng.standard_normal((n, 1, 8, 8)) * 0.3
    for i, label in enumerate(labels):  # class 0: a bright blob on the left, class 1: on the right
        images[i, 0, 2:6, (1 if label == 0 else 5):(3 if label == 0 else 7)] += 2.0

    class Tiny(nn.Module):
        def __init__(self):
            self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False, rng=rng)
            self.norm = nn.BatchNorm2d(4)
            self.act = nn.ReLU()
            self.pool = nn.MaxPool2d(2)
            self.fc = nn.Linear(4 * 4 * 4, 2, rng=rng)

        def forward(self, x):
            return self.fc(self.pool(self.act(self.norm(self.conv(x)))).flatten(1))

    model = Tiny()
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = images.astype(np.float32)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(gpuconv.tensor(x)), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.3 * losses[0], losses
    model.eval()
    with gpuconv.no_grad():
        accuracy = (model(gpuconv.tensor(x)).data.argmax(axis=1) == labels).mean()
    assert accuracy == 1.0


def test_sequential_slice_keeps_layers_and_names():
    seq = nn.Sequential().add("conv", nn.Conv2d(1, 2, 3)).add("act", nn.ReLU()).add("pool", nn.MaxPool2d(2))
    part = seq[:2]
    assert isinstance(part, nn.Sequential) and [n for n, _ in part.named_children()] == ["conv", "act"]
    assert part.conv is seq.conv and list(part.state_dict()) == ["conv.weight", "conv.bias"]


def test_functional_batch_norm_updates_tensor_running_stats():
    x = np.random.default_rng(5).standard_normal((4, 2, 3, 3))
    rm, rv = gpuconv.tensor(np.zeros(2)), gpuconv.tensor(np.ones(2))
    F.batch_norm(x, rm, rv, training=True, momentum=0.5)
    np.testing.assert_allclose(rm.data, 0.5 * x.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(rv.data, 0.5 + 0.5 * x.var(axis=(0, 2, 3), ddof=1), rtol=1e-12)


# (8, 4, 8, 8) float64: 16 KiB, norm.py's whole-array expressions; (8, 4, 64, 64): 1 MiB, norm_cpu's parts
BN_SHAPES = [(8, 4, 8, 8), (8, 4, 64, 64)]


@pytest.mark.parametrize("shape", BN_SHAPES, ids=["small", "1MiB"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
def test_functional_batch_norm_applies_bias_without_weight(shape, training):
    """torch.nn.functional.batch_norm with weight=None and a bias: y = xhat + bias (weight None
    means 1), and the bias's gradient is dy summed over N, H, W. The bias was dropped when weight
    was None."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal(shape) * 2 + 0.5
    bias = gpuconv.tensor(rng.standard_normal(shape[1]), requires_grad=True)
    rm, rv = rng.standard_normal(shape[1]) * 0.3, rng.uniform(0.5, 2.0, shape[1])
    y = F.batch_norm(x, rm.copy(), rv.copy(), None, bias, training=training, eps=1e-5)
    mean, var = (x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))) if training else (rm, rv)
    xhat = (x - mean.reshape(1, -1, 1, 1)) / np.sqrt(var.reshape(1, -1, 1, 1) + 1e-5)
    np.testing.assert_allclose(y.data, xhat + bias.data.reshape(1, -1, 1, 1), rtol=1e-10, atol=1e-12)
    dy = rng.standard_normal(shape)
    y.backward(dy)
    np.testing.assert_allclose(bias.grad, dy.sum(axis=(0, 2, 3)), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
def test_functional_batch_norm_gradcheck_with_bias_and_no_weight(training):
    rng = np.random.default_rng(12)
    x, bias = rng.standard_normal((3, 2, 3, 3)) + 0.2, rng.standard_normal(2)
    rm, rv = rng.standard_normal(2) * 0.3, rng.uniform(0.5, 2.0, 2)
    tensor_gradcheck(lambda x, b: F.batch_norm(x, rm.copy(), rv.copy(), None, b, training=training), [x, bias])


@pytest.mark.parametrize("has_weight", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
def test_functional_batch_norm_gradients_for_every_weight_and_bias(has_weight, has_bias, training):
    """Every combination of weight/bias None: backward gives one gradient per input (autograd
    checks the count), and the given weight and bias get theirs."""
    rng = np.random.default_rng(13)
    x = gpuconv.tensor(rng.standard_normal((3, 2, 3, 3)), requires_grad=True)
    weight = gpuconv.tensor(rng.uniform(0.5, 1.5, 2), requires_grad=True) if has_weight else None
    bias = gpuconv.tensor(rng.standard_normal(2), requires_grad=True) if has_bias else None
    y = F.batch_norm(x, np.zeros(2), np.ones(2), weight, bias, training=training)
    dy = rng.standard_normal(y.shape)
    y.backward(dy)
    xhat = y.data - (0 if bias is None else bias.data.reshape(1, -1, 1, 1))
    if weight is not None:
        xhat = xhat / weight.data.reshape(1, -1, 1, 1)
        np.testing.assert_allclose(weight.grad, (dy * xhat).sum(axis=(0, 2, 3)), rtol=1e-10, atol=1e-12)
    if bias is not None:
        np.testing.assert_allclose(bias.grad, dy.sum(axis=(0, 2, 3)), rtol=1e-10, atol=1e-12)
    assert x.grad is not None and x.grad.shape == x.shape


def test_a_float64_factor_sends_a_float32_gradient_back_into_a_float32_conv():
    conv = nn.Conv2d(1, 2, 3)
    x = np.random.default_rng(6).standard_normal((2, 1, 5, 5)).astype(np.float32)
    (conv(x) * np.ones((1, 2, 1, 1))).sum().backward()   # the product is float64
    assert conv.weight.grad.dtype == np.float32
    expected = np.array([[x[:, 0, i:i + 3, j:j + 3].sum() for j in range(3)] for i in range(3)])
    for o in range(2):
        np.testing.assert_allclose(conv.weight.grad[o, 0], expected, rtol=1e-5)
