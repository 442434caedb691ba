"""The CPU executor (gpuconv.compile -> gpuconv.nn.cpu_plan) against the eager reference.

Every test runs the same model twice, once compiled (the plan, recorded on the tape as one
PlanFunction) and once eagerly (the uncompiled model, op by op), and compares logits, every p.grad
and the input gradient, with the batch's parts after the first in 0, 1 or 2 worker threads.
"""
import os
import sys
import time

import numpy as np
import pytest

import gpuconv
from gpuconv import blas, nn, ops, optim
from gpuconv import functional as F
from gpuconv.compiler import CompiledModel, PlanFunction
from gpuconv.errors import ArgumentError, DTypeError, ShapeError
from gpuconv.models import LeNet5
from gpuconv.nn import cpu_ops, cpu_plan, cpu_workers

LENETS = [("relu", "max"), ("tanh", "avg")]

_nets = {}  # id(model) -> (model, its CompiledModel), for one test


@pytest.fixture(autouse=True, params=["processes", "threads"])
def fresh_state(request, monkeypatch):
    """Each test runs with worker processes and with worker threads (the parts after the
    first), compiles its models afresh and leaves the worker count as it found it."""
    monkeypatch.setattr(cpu_plan, "processes", request.param == "processes")
    _nets.clear()
    yield
    _nets.clear()
    gpuconv.set_cpu_workers(None)


def net(model):
    """The model's CompiledModel, one per model for the whole test: its plan is reused (and
    recompiled or laid out again) from step to step as in a training loop."""
    if id(model) not in _nets:
        _nets[id(model)] = (model, gpuconv.compile(model))
    return _nets[id(model)][1]


def mnist_like(rng, batch):
    """Images with an all-zero border, as MNIST's: conv outputs tie there (pooling ties)."""
    x = np.zeros((batch, 1, 28, 28), np.float32)
    x[:, :, 6:22, 5:23] = rng.random((batch, 1, 16, 18), dtype=np.float32)
    return x, rng.integers(0, 10, batch)


class Run:
    """One forward and backward: logits, {name: p.grad}, the input gradient (or None), and the
    node that made the logits (a PlanFunction when the plan ran)."""

    def __init__(self, logits, grads, dx, node):
        self.logits, self.grads, self.dx, self.node = logits, grads, dx, node

    @property
    def planned(self):
        return isinstance(self.node, PlanFunction)

    def __iter__(self):
        return iter((self.logits, self.grads, self.dx))


def run(model, x, labels, fast, need_dx=False):
    """A training step's forward and backward: compiled (fast) or eager. The input is a Tensor that
    requires grad only when need_dx, so without it no input gradient is asked of anything."""
    model.zero_grad()
    inputs = gpuconv.tensor(x, requires_grad=True) if need_dx else x
    logits = (net(model) if fast else model)(inputs)
    F.cross_entropy(logits, labels).backward()
    grads = {name: p.grad.copy() for name, p in model.named_parameters()}
    return Run(logits.data, grads, inputs.grad if need_dx else None, logits.creator)


def assert_close(actual, expected, rtol=1e-5):
    """rtol of the largest magnitude: entries near zero cancel in sums, elementwise rtol is noise."""
    scale = float(np.abs(expected).max()) or 1.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def assert_same_run(model, x, labels, need_dx=False):
    fast = run(model, x, labels, True, need_dx)
    slow = run(model, x, labels, False, need_dx)
    assert not slow.planned  # an uncompiled model never enters the executor
    assert_close(fast.logits, slow.logits)
    assert fast.grads.keys() == slow.grads.keys()
    for name in slow.grads:
        assert fast.grads[name].shape == slow.grads[name].shape and fast.grads[name].dtype == np.float32, name
        assert_close(fast.grads[name], slow.grads[name])
    if need_dx:
        assert fast.dx.shape == x.shape and fast.dx.dtype == np.float32
        assert_close(fast.dx, slow.dx)
    else:
        assert fast.dx is None and slow.dx is None
    if fast.planned:  # the plan was asked for an input gradient exactly when one was needed
        assert fast.node.needs_input_grad[0] == need_dx
    return fast


def planned(model, x):
    """Does the compiled model run x by the plan? If it does, check how it splits the batch: one
    part per thread, the caller's and set_cpu_workers()'s, while each gets MIN_CHUNK images."""
    compiled = net(model)
    if not compiled.uses_executor(x):
        return False
    with gpuconv.no_grad():
        compiled(x)
    plan = compiled._plan
    expected = max(1, min(gpuconv.get_cpu_workers() + 1, len(x) // cpu_plan.MIN_CHUNK))
    assert plan.threads == len(plan.parts) == expected
    assert sum(chunk.n for part in plan.parts for chunk in part) == len(x)
    return True


@pytest.fixture(params=[1, 2, 3], ids=["1thread", "2threads", "3threads"])
def threads(request, monkeypatch):
    """The plan splits the batch over the caller's thread and set_cpu_workers() worker threads;
    test 1, 2 and 3 parts whatever this machine has."""
    monkeypatch.setattr(cpu_plan, "MIN_CHUNK", 2)
    gpuconv.set_cpu_workers(request.param - 1)
    return request.param


@pytest.mark.parametrize("activation,pool", LENETS)
@pytest.mark.parametrize("batch", [1, 7, 128])
def test_lenet_matches_the_layers(activation, pool, batch, threads, rng):
    model = LeNet5(activation, pool, seed=batch)
    x, labels = mnist_like(rng, batch)
    fast = assert_same_run(model, x, labels, need_dx=batch == 7)
    assert fast.planned and planned(model, x)


@pytest.mark.parametrize("activation,pool", LENETS)
def test_lenet_against_float64_reference(activation, pool, rng):
    """The plan's float32 gradients are as close to float64 as the float32 layers' are."""
    model = LeNet5(activation, pool, seed=1)
    reference = LeNet5(activation, pool, dtype=np.float64).load_state_dict(model.state_dict())
    x, labels = mnist_like(rng, 64)
    exact = run(reference, x.astype(np.float64), labels, True, need_dx=True)
    assert not exact.planned and not planned(reference, x.astype(np.float64))  # float64 runs eagerly
    fast = run(model, x, labels, True, need_dx=True)
    slow = run(model, x, labels, False)
    assert fast.planned and not slow.planned
    for name in exact.grads:
        scale = np.abs(exact.grads[name]).max()
        fast_error = np.abs(fast.grads[name] - exact.grads[name]).max() / scale
        slow_error = np.abs(slow.grads[name] - exact.grads[name]).max() / scale
        assert fast_error < 1e-5, name
        assert fast_error < 4 * slow_error + 1e-6, name
    assert np.abs(fast.dx - exact.dx).max() / np.abs(exact.dx).max() < 1e-5


def test_other_layer_settings_match(rng, threads):
    """Stride, padding, dilation, no bias, unfused conv, sigmoid, standalone pools, dropout in eval."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1, rng=rng), nn.Tanh(), nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3, padding="same", dilation=2, bias=False, rng=rng), nn.Sigmoid(),
        nn.AvgPool2d(2), nn.Conv2d(5, 6, 1, rng=rng), nn.ReLU(),
        nn.Conv2d(6, 4, 2, padding=1, rng=rng), nn.MaxPool2d(3), nn.Flatten(),
        nn.Dropout(0.5), nn.Linear(4, 7, rng=rng), nn.ReLU(), nn.Linear(7, 3, bias=False, rng=rng))
    model.eval()
    x = rng.standard_normal((9, 3, 23, 21)).astype(np.float32)
    x[:, :, :4] = 0  # ties in every pool
    fast = assert_same_run(model, x, rng.integers(0, 3, 9), need_dx=True)
    assert fast.planned and planned(model, x)


@pytest.mark.parametrize("before", ["padded conv, ReLU in place", "conv fused with its pool", "input"])
def test_pointwise_convs_read_their_input_in_place(before, rng, threads):
    """A 1x1 conv (stride 1, no padding, no pool) reads its input as its row matrices instead of
    copying it into R: the same results, forward and backward, with the input an in-place ReLU's
    buffer, a fused conv-pool's output or the plan's own copy of the batch; a 1x1 conv with
    padding or a stride still copies."""
    head = {"padded conv, ReLU in place": [nn.Conv2d(3, 5, 3, padding=1, rng=rng), nn.ReLU()],
            "conv fused with its pool": [nn.Conv2d(3, 5, 3, padding=1, rng=rng), nn.ReLU(), nn.MaxPool2d(2)],
            "input": [nn.Conv2d(3, 5, 1, rng=rng)]}[before]
    side = (4 if before == "conv fused with its pool" else 8) + 2  # the padded 1x1 conv grows the map
    model = nn.Sequential(*head, nn.Conv2d(5, 4, 1, rng=rng), nn.Tanh(), nn.Conv2d(4, 4, 1, padding=1, rng=rng),
                          nn.Conv2d(4, 6, 1, stride=2, rng=rng), nn.Flatten(),
                          nn.Linear(6 * (side // 2) ** 2, 3, rng=rng))
    x = rng.standard_normal((9, 3, 8, 8)).astype(np.float32)
    fast = assert_same_run(model, x, rng.integers(0, 3, 9), need_dx=True)
    assert fast.planned
    convs = [op for op in net(model)._plan.ops if type(op).__name__ == "ConvOp"]
    assert [conv.pointwise for conv in convs] == [before == "input", True, False, False]
    chunk = net(model)._plan.parts[0][0]
    for conv in convs:
        assert ((conv.index, "rows") in chunk.store) == (not conv.pointwise)


def test_padded_convs_share_one_padded_buffer_with_its_borders_zeroed(rng, threads):
    """Convs that keep their row copy pad into one buffer of the thread's, not a copy each: two of
    them whose padded inputs have one shape but other paddings (8x8 padded by 1, 6x6 by 2) must
    each see zero borders, forward and backward, as the layers do."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, rng=rng), nn.Tanh(),
                          nn.Conv2d(4, 4, 3, padding=1, rng=rng), nn.Tanh(),
                          nn.Conv2d(4, 4, 3, rng=rng), nn.Tanh(),
                          nn.Conv2d(4, 4, 5, padding=2, rng=rng), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(4 * 3 * 3, 3, rng=rng))
    x = rng.standard_normal((9, 3, 8, 8)).astype(np.float32) + 3  # far from zero: a stale border shows
    for _ in range(2):
        assert assert_same_run(model, x, rng.integers(0, 3, 9), need_dx=True).planned
    plan = net(model)._plan
    assert not any(key[-1] == "x" for part in plan.parts for chunk in part for key in chunk.store
                   if isinstance(key, tuple))


@pytest.mark.parametrize("head", [
    lambda rng: [nn.Conv2d(1, 3, (3, 5), padding=(1, 2), rng=rng), nn.ReLU()],
    lambda rng: [nn.Conv2d(1, 3, (3, 5), padding=(2, 1), rng=rng), nn.MaxPool2d(3)],
    lambda rng: [nn.Conv2d(1, 3, 4, rng=rng), nn.ReLU(), nn.MaxPool2d((2, 3))],
    lambda rng: [nn.Conv2d(1, 3, 3, stride=2, rng=rng), nn.ReLU(), nn.MaxPool2d(2)],
], ids=["no-pool", "pool3", "pool2x3", "stride2"])
def test_single_channel_convs_match(head, rng, threads):
    """A one-channel conv with stride 1 runs without im2col (batched GEMMs over output rows)."""
    layers = head(rng)
    model = nn.Sequential(*layers, nn.Conv2d(3, 2, 2, rng=rng), nn.Flatten())
    x = rng.standard_normal((6, 1, 13, 14)).astype(np.float32)
    x[:, :, :3] = 0
    width = model.layer_table(x.shape)[-1][2][1]
    model.add("fc", nn.Linear(width, 3, rng=rng))
    fast = assert_same_run(model, x, rng.integers(0, 3, 6), need_dx=True)
    assert fast.planned and planned(model, x)


@pytest.mark.parametrize("tail", [[], [nn.ReLU(), nn.MaxPool2d(2)], [nn.AvgPool2d(2)]],
                         ids=["conv", "conv-relu-pool", "conv-avgpool"])
def test_spatial_output_is_nchw(tail, rng, threads):
    """A model that ends in a spatial layer returns NCHW and takes an NCHW output gradient."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, rng=rng), *tail)
    x = rng.standard_normal((5, 2, 8, 8)).astype(np.float32)
    dy = None
    results, nodes = [], []
    for fast in (True, False):
        model.zero_grad()
        inputs = gpuconv.tensor(x, requires_grad=True)
        y = (net(model) if fast else model)(inputs)
        dy = rng.standard_normal(y.shape).astype(np.float32) if dy is None else dy
        y.backward(dy)
        results.append((y.data, inputs.grad, model[0].weight.grad.copy(), model[0].bias.grad.copy()))
        nodes.append(y.creator)
    for fast_value, slow_value in zip(*results):
        assert fast_value.shape == slow_value.shape
        assert_close(fast_value, slow_value)
    assert isinstance(nodes[0], PlanFunction) and not isinstance(nodes[1], PlanFunction)
    assert planned(model, x)


@pytest.mark.parametrize("tail", [[], [nn.Flatten()], [nn.Flatten(), nn.Dropout(0.0)]],
                         ids=["pool", "flatten", "flatten-identity"])
@pytest.mark.parametrize("batch", [1, 50])
def test_output_gradient_is_never_written(tail, batch, rng):
    """Ops may reuse an output gradient the plan made in place; the caller's is only read (with
    one image, its batch-innermost view is contiguous like the plan's own)."""
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, rng=rng), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(3, 4, 3, padding=1, rng=rng), nn.ReLU(), nn.MaxPool2d(2), *tail)
    x = rng.standard_normal((batch, 1, 12, 12)).astype(np.float32)
    y = net(model)(gpuconv.tensor(x, requires_grad=True))
    assert isinstance(y.creator, PlanFunction)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    kept = dy.copy()
    y.backward(dy)
    np.testing.assert_array_equal(dy, kept)
    assert planned(model, x)


def test_dense_only_model(rng, threads):
    model = nn.Sequential(nn.Linear(10, 8, rng=rng), nn.ReLU(), nn.Linear(8, 4, rng=rng))
    x = rng.standard_normal((12, 10)).astype(np.float32)
    fast = assert_same_run(model, x, rng.integers(0, 4, 12), need_dx=True)
    assert fast.planned and planned(model, x)


def test_a_layer_used_twice_gets_both_gradients(rng, threads):
    """A Linear applied twice in one chain: one parameter, two contributions, summed once."""
    shared = nn.Linear(8, 8, rng=rng)
    model = nn.Sequential(nn.Linear(6, 8, rng=rng), nn.Tanh(), shared, nn.Tanh(), shared, nn.ReLU(),
                          nn.Linear(8, 4, rng=rng))
    x = rng.standard_normal((12, 6)).astype(np.float32)
    fast = assert_same_run(model, x, rng.integers(0, 4, 12), need_dx=True)
    assert fast.planned and planned(model, x)
    assert len(net(model)._plan.params()) == len(model.parameters()) == 6


@pytest.mark.parametrize("make", [
    lambda rng: nn.Sequential(nn.Conv2d(1, 2, 3, rng=rng), nn.LPPool2d(2, 2), nn.Flatten(),
                              nn.Linear(2 * 13 * 13, 3, rng=rng)),
    lambda rng: nn.Sequential(nn.Conv2d(1, 2, 3, groups=1, rng=rng), nn.MaxPool2d(3, stride=2),
                              nn.Flatten(), nn.Linear(2 * 12 * 12, 3, rng=rng)),
    lambda rng: nn.Sequential(nn.Conv2d(1, 2, 3, rng=rng), nn.Flatten(), nn.Dropout(0.5),
                              nn.Linear(2 * 26 * 26, 3, rng=rng)),
    lambda rng: nn.Sequential(nn.Conv2d(1, 2, 2, padding="same", rng=rng), nn.Flatten(),
                              nn.Linear(2 * 28 * 28, 3, rng=rng)),
], ids=["lppool", "overlapping-pool", "dropout-training", "asymmetric-same"])
def test_unsupported_layers_fall_back_to_the_layers(make, rng):
    """The compiled model runs these eagerly: the same ops, so the same bits as the uncompiled one."""
    model = make(rng)
    x, labels = mnist_like(rng, 4)
    labels %= 3
    runs = []
    for fast in (True, False):
        for layer in model:  # the same dropout masks in both runs
            if isinstance(layer, nn.Dropout):
                layer.rng = np.random.default_rng(7)
        runs.append(run(model, x, labels, fast))
    compiled, eager = runs
    assert not compiled.planned and not planned(model, x)
    assert isinstance(compiled.node, F.LinearFunction)  # the layers ran, forward and backward
    np.testing.assert_array_equal(compiled.logits, eager.logits)
    for name, p in model.named_parameters():
        assert compiled.grads[name].shape == p.shape
        np.testing.assert_array_equal(compiled.grads[name], eager.grads[name])


def test_only_compiled_models_enter_the_executor(rng, monkeypatch):
    """The uncompiled model always runs eagerly, even after its compiled wrapper ran the plan; the
    wrapper runs eagerly what the plan cannot take (float64, integer input, kernel emulation)."""
    model = LeNet5()
    x, labels = mnist_like(rng, 4)
    assert not run(model, x, labels, False).planned
    compiled = net(model)
    assert isinstance(compiled, CompiledModel) and gpuconv.compile(compiled) is compiled
    assert compiled.parameters() == model.parameters() and compiled.module is model
    assert run(model, x, labels, True).planned
    forwards = compiled._plan.forwards
    assert not run(model, x, labels, False).planned
    assert compiled._plan.forwards == forwards  # the eager run did not touch the plan
    assert not compiled.uses_executor(x.astype(np.float64))
    assert not compiled.uses_executor(x.astype(np.int64))
    assert compiled.uses_executor(gpuconv.tensor(x))
    monkeypatch.setenv("GPUCONV_EMULATE", "1")
    assert not compiled.uses_executor(x)


def test_changing_batch_sizes_reuses_and_reallocates(rng, threads):
    model = LeNet5(seed=2)
    for batch in (32, 7, 32, 33, 1, 32):
        x, labels = mnist_like(rng, batch)
        assert assert_same_run(model, x, labels).planned


@pytest.mark.parametrize("max_chunk", [3, 5])
def test_small_chunks_within_a_thread(max_chunk, rng, monkeypatch):
    """Each thread runs its share in chunks; the gradients of all chunks add up."""
    monkeypatch.setattr(cpu_plan, "MAX_CHUNK", max_chunk)
    model = LeNet5(seed=3)
    for batch in (17, 4):
        x, labels = mnist_like(rng, batch)
        assert assert_same_run(model, x, labels, need_dx=True).planned
        assert all(chunk.n <= max_chunk for part in net(model)._plan.parts for chunk in part)


def test_backward_order_changes_no_number(rng):
    """Every other thread computes the conv weight gradients after all the input gradients (the
    dense layers' wait in every thread). Either order must give the same bits: run one thread
    both ways."""
    gpuconv.set_cpu_workers(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, rng=rng), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(4, 5, 3, dilation=2, rng=rng), nn.Tanh(),  # im2col path
                          nn.Conv2d(5, 6, 3, stride=2, rng=rng),  # rows path, stride 2
                          nn.Flatten(), nn.Linear(6 * 4 * 4, 12, rng=rng), nn.ReLU(), nn.Linear(12, 10, rng=rng))
    x, labels = mnist_like(rng, 9)
    runs = []
    for deferring in (False, True):
        run(model, x, labels, True)
        assert net(model)._plan.threads == 1
        net(model)._plan.deferring = [deferring]
        runs.append(run(model, x, labels, True, need_dx=True))
        assert runs[-1].planned
    (logits, grads, dx), (logits2, grads2, dx2) = runs
    np.testing.assert_array_equal(logits, logits2)
    np.testing.assert_array_equal(dx, dx2)
    assert grads.keys() == grads2.keys()
    for name in grads:
        np.testing.assert_array_equal(grads[name], grads2[name])
    assert_same_run(model, x, labels, need_dx=True)


@pytest.mark.parametrize("batch", [16, 64])  # one part; two parts when a worker is there
def test_gradients_are_new_arrays_every_step(rng, batch):
    """p.grad takes the plan's gradient without a copy (PlanFunction.fresh_grads): each must be
    an array of its own, which no later step writes into."""
    model = LeNet5()
    x1, y1 = mnist_like(rng, batch)
    x2, y2 = mnist_like(rng, batch)
    first = run(model, x1, y1, True)
    assert first.planned
    kept = {name: p.grad for name, p in model.named_parameters()}
    run(model, x2, y2, True)  # zero_grad() first
    for name, p in model.named_parameters():
        assert p.grad is not kept[name]
        assert p.grad.flags.c_contiguous and p.grad.shape == p.data.shape, name
        np.testing.assert_array_equal(kept[name], first.grads[name])  # step 2 did not write into step 1's
    grads = [p.grad for p in model.parameters()]
    assert not any(np.shares_memory(a, b) for i, a in enumerate(grads) for b in grads[i + 1:])


def test_gradients_accumulate_until_zero_grad(rng):
    """Two backwards without zero_grad() add into p.grad, as the eager model's do."""
    model = LeNet5()
    x1, y1 = mnist_like(rng, 16)
    x2, y2 = mnist_like(rng, 16)
    first, second = run(model, x1, y1, True), run(model, x2, y2, True)
    for fast in (True, False):
        model.zero_grad()
        for x, y in ((x1, y1), (x2, y2)):
            F.cross_entropy((net(model) if fast else model)(x), y).backward()
        for name, p in model.named_parameters():
            if fast:  # the same two plan gradients, added once
                np.testing.assert_array_equal(p.grad, first.grads[name] + second.grads[name])
            else:
                assert_close(p.grad, first.grads[name] + second.grads[name])


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_backward_twice_after_one_forward(rng, mode):
    """The pooling backward overwrites the conv output it routes from, so which taps hold the
    maximum is kept first: by the forward in training mode, by the first backward in eval mode.
    Biases are not zero, so an output written over the maxima would give other flags."""
    model = LeNet5()
    for conv in (model.conv1, model.conv2):
        conv.bias.data[:] = rng.uniform(-0.5, 0.5, conv.bias.data.shape)
    getattr(model, mode)()
    x, labels = mnist_like(rng, 8)
    inputs = gpuconv.tensor(x, requires_grad=True)
    model.zero_grad()
    logits = net(model)(inputs)
    assert isinstance(logits.creator, PlanFunction)
    loss = F.cross_entropy(logits, labels)
    loss.backward(retain_graph=True)
    first = inputs.grad.copy()
    grads = {name: p.grad.copy() for name, p in model.named_parameters()}
    model.zero_grad()
    inputs.grad = None
    loss.backward()
    np.testing.assert_array_equal(first, inputs.grad)
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(p.grad, grads[name])
    reference = run(model, x, labels, False, need_dx=True)
    assert_close(first, reference.dx)
    for name in grads:
        assert_close(grads[name], reference.grads[name])


@pytest.mark.parametrize("other_batch", [8, 5])
def test_backward_after_another_forward_is_that_forwards(rng, other_batch):
    """A second forward replaces the plan's saved activations; the first forward's backward then
    recomputes them and still gives the first batch's gradients (same batch size or another)."""
    model = LeNet5(seed=4)
    x, labels = mnist_like(rng, 8)
    other, _ = mnist_like(rng, other_batch)
    expected = run(model, x, labels, True, need_dx=True)
    inputs = gpuconv.tensor(x, requires_grad=True)
    model.zero_grad()
    loss = F.cross_entropy(net(model)(inputs), labels)
    net(model)(other)  # no backward for this one
    loss.backward()
    np.testing.assert_array_equal(inputs.grad, expected.dx)
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(p.grad, expected.grads[name])


def test_sgd_training_follows_the_layers(rng):
    model, slow = LeNet5(seed=5), LeNet5(seed=5)
    fast = gpuconv.compile(model)
    optimizers = [optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (fast, slow)]
    for _ in range(5):
        x, labels = mnist_like(rng, 32)
        for network, optimizer in zip((fast, slow), optimizers):
            logits = network(x)
            assert isinstance(logits.creator, PlanFunction) == (network is fast)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for (name, a), b in zip(fast.state_dict().items(), slow.state_dict().values()):
        assert_close(a, b, rtol=1e-4)


def test_non_finite_input_runs_the_layers(rng):
    model = LeNet5()
    x, labels = mnist_like(rng, 4)
    x[1, 0, 10, 10] = np.nan
    assert net(model).uses_executor(x)  # the plan would take it, and hands NaN logits back
    logits = net(model)(x)
    assert not isinstance(logits.creator, PlanFunction) and np.isnan(logits.data[1]).all()
    _, dlogits = ops.softmax_cross_entropy(np.nan_to_num(logits.data), labels)
    logits.backward(dlogits)  # the layers' backward, which holds their NaN rules
    assert model.conv1.weight.grad.shape == (6, 1, 5, 5)


def test_bad_output_gradient_is_rejected(rng):
    model = LeNet5()
    x, _ = mnist_like(rng, 4)
    logits = net(model)(x)
    assert isinstance(logits.creator, PlanFunction)
    with pytest.raises(ShapeError, match="grad"):
        logits.backward(np.ones((3, 10), np.float32))
    with pytest.raises(DTypeError, match="dy"):
        logits.backward(np.ones((4, 10), np.float64))
    plan = net(model)._plan  # the plan's own check, below the tape's
    with pytest.raises(ShapeError, match="dy"):
        plan.backward(np.ones((3, 10), np.float32), need_dx=False)


def test_blas_thread_control_restores_the_count():
    if not blas.available():
        pytest.skip("NumPy's BLAS is not an OpenBLAS whose threads can be set")
    before = blas.get_num_threads()
    with blas.num_threads(1):
        assert blas.get_num_threads() == 1
    assert blas.get_num_threads() == before


def test_worker_count_comes_from_set_cpu_workers_not_the_blas(rng, monkeypatch):
    """The parts are the caller's thread and get_cpu_workers() workers (set_cpu_workers(n), else
    GPUCONV_CPU_WORKERS, else one fewer than the CPUs, at most MAX_WORKERS), never the BLAS's
    thread count, which another thread may change."""
    monkeypatch.setattr(blas, "get_num_threads", lambda: 1)
    monkeypatch.setattr(cpu_plan, "MIN_CHUNK", 2)
    monkeypatch.delenv("GPUCONV_CPU_WORKERS", raising=False)
    model = LeNet5()
    x, labels = mnist_like(rng, 12)
    for workers, threads in ((0, 1), (2, 3), (9, 6)):  # 12 images: at most 6 parts of MIN_CHUNK
        gpuconv.set_cpu_workers(workers)
        assert gpuconv.get_cpu_workers() == workers
        assert run(model, x, labels, True).planned
        assert net(model)._plan.threads == threads and planned(model, x)
    gpuconv.set_cpu_workers(None)
    monkeypatch.setenv("GPUCONV_CPU_WORKERS", "1")
    assert gpuconv.get_cpu_workers() == 1
    assert run(model, x, labels, True).planned and net(model)._plan.threads == 2
    gpuconv.set_cpu_workers(0)  # the setting wins over the environment
    assert gpuconv.get_cpu_workers() == 0
    gpuconv.set_cpu_workers(None)
    monkeypatch.delenv("GPUCONV_CPU_WORKERS")
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    assert gpuconv.get_cpu_workers() == max(0, min(cpus - 1, cpu_plan.MAX_WORKERS))


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_bad_worker_counts_are_rejected(bad):
    with pytest.raises(ArgumentError, match="set_cpu_workers"):
        gpuconv.set_cpu_workers(bad)


@pytest.mark.parametrize("bad", ["-1", "1.5", "two"])
def test_bad_worker_counts_in_the_environment_are_rejected(bad, monkeypatch):
    monkeypatch.setenv("GPUCONV_CPU_WORKERS", bad)
    with pytest.raises(ArgumentError, match="GPUCONV_CPU_WORKERS"):
        gpuconv.get_cpu_workers()


@pytest.mark.parametrize("failing", [0, 1, 2])
def test_parallel_region_raises_a_part_error_after_every_part_ran(failing):
    """The caller's part or a worker's part may raise: the error reaches the caller once every
    part has finished, and the workers run the next region normally."""
    ran = []

    def work(part):
        ran.append(part)
        if part == failing:
            raise ValueError(f"part {part}")
        return part * 10

    with cpu_plan._region_lock:  # the caller holds the region lock, as _Plan._in_parts does
        with pytest.raises(ValueError, match=f"part {failing}"):
            cpu_plan._run_parallel(work, [0, 1, 2])
    assert sorted(ran) == [0, 1, 2]
    with cpu_plan._region_lock:
        assert cpu_plan._run_parallel(lambda part: part * 10, [0, 1, 2]) == [0, 10, 20]


def test_switch_interval_and_blas_threads_are_restored(rng):
    before, blas_before = sys.getswitchinterval(), blas.get_num_threads()
    gpuconv.set_cpu_workers(1)
    model = LeNet5()
    x, labels = mnist_like(rng, 64)
    assert run(model, x, labels, True).planned
    assert net(model)._plan.threads == 2  # a parallel region ran, forward and backward
    assert sys.getswitchinterval() == before
    assert blas.get_num_threads() == blas_before


def test_worker_never_returns_a_result_left_by_an_abandoned_wait():
    worker = cpu_plan._Worker(cpu_plan.PLAN_THREADS)
    worker.submit(lambda part: part, 1)  # its result is never collected (an interrupted wait)
    time.sleep(0.05)
    worker.submit(lambda part: part, 2)
    assert worker.result() == 2


def test_worker_runs_each_counted_call_once_and_no_other():
    """A spare wake-up (result() wakes a worker that has not started, in case submit was stopped
    before its wake-up) must neither run a call again nor run one the caller did not count."""
    worker = cpu_plan._Worker(cpu_plan.PLAN_THREADS)
    ran = []
    worker.submit(ran.append, "counted")
    time.sleep(0.1)   # run, its result not yet taken: the call is still set
    worker._wake()    # a spare wake-up
    time.sleep(0.1)
    worker.result()
    assert ran == ["counted"]
    # Ctrl-C between submit's first two lines: the call is set but not counted
    worker.call = (worker.ticket + 1, ran.append, "not counted")
    worker._wake()
    time.sleep(0.1)
    assert ran == ["counted"]
    worker.submit(ran.append, "next")
    worker.result()
    assert ran == ["counted", "next"]


def test_processes_and_threads_give_the_same_bits(monkeypatch):
    """The parts a worker process runs are the same chunks and ops as a thread's, summed in the
    same order: several SGD steps at varying batch sizes end on the same weights."""
    gpuconv.set_cpu_workers(1)
    weights = {}
    for kind in (True, False):
        monkeypatch.setattr(cpu_plan, "processes", kind)
        model = LeNet5(seed=4)
        compiled = gpuconv.compile(model)
        opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        rng = np.random.default_rng(7)
        for batch in (128, 96, 61, 128):
            x = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
            loss = F.cross_entropy(compiled(x), rng.integers(0, 10, batch))
            opt.zero_grad()
            loss.backward()
            opt.step()
        weights[kind] = model.state_dict()
    for name in weights[True]:
        assert np.array_equal(weights[True][name], weights[False][name]), name


@pytest.mark.skipif(not cpu_workers.supported(), reason="no worker processes on this platform")
def test_a_worker_error_of_any_text_reaches_the_caller_whole(monkeypatch):
    """A worker's error message with characters JSON escapes at length (outside the BMP) still
    fits one reply: the caller raises WorkerError with it, and the channel keeps working."""
    import json
    import socket
    from gpuconv.errors import WorkerError
    process = cpu_workers._Process()
    try:
        description = json.dumps({"layers": [{"kind": "\U0001F600" * 2000}], "in_shape": [4], "capacity": 1,
                                  "part": 1, "param_shapes": [], "size": 4096}).encode()
        arena, spec = os.memfd_create("arena"), os.memfd_create("spec")
        os.ftruncate(arena, 4096)
        os.write(spec, description)
        socket.send_fds(process.socket, [f"S 9.0 {len(description)}".encode()], [arena, spec])
        os.close(arena), os.close(spec)
        with pytest.raises(WorkerError, match="raised KeyError: '\U0001F600"):
            process.receive(1)
        process.socket.send(b"F no-such-key 1 0 - 0000")  # "-": no floating-point environment; no errors watched
        with pytest.raises(WorkerError, match="raised KeyError: 'no-such-key'"):
            process.receive(1)
    finally:
        process.close(kill=True)


def passing_slots(plan):
    return [op.passing for op in plan.ops if isinstance(op, cpu_ops.ConvOp)]


def test_outputs_only_the_forward_reads_pass_through_two_buffers(rng, threads):
    """A conv whose output only the next conv's forward reads (through in-place ReLUs) writes into
    one of the thread's two passing buffers, alternating: three such convs in a row must each read
    the other buffer than the one they write. A Tanh keeps its output for the backward, a 1x1 conv
    reads its input in place, a conv with pooling keeps its output: those convs' outputs stay their
    own; the 1x1 conv's own output passes to the last conv. Inputs far from zero: a stale or
    shared buffer shows in every number."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, rng=rng), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1, rng=rng), nn.ReLU(),
                          nn.Conv2d(4, 5, 3, padding=1, rng=rng), nn.ReLU(),
                          nn.Conv2d(5, 4, 3, padding=1, rng=rng), nn.Tanh(),
                          nn.Conv2d(4, 4, 3, padding=1, rng=rng), nn.ReLU(),
                          nn.Conv2d(4, 4, 1, rng=rng), nn.ReLU(),
                          nn.Conv2d(4, 3, 3, padding=1, rng=rng), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(3 * 4 * 4, 5, rng=rng))
    for batch in (9, 4, 9):
        x = rng.standard_normal((batch, 3, 8, 8)).astype(np.float32) + 2
        assert assert_same_run(model, x, rng.integers(0, 5, batch), need_dx=True).planned
    assert passing_slots(net(model)._plan) == [0, 1, 0, None, None, 1, None]


def test_a_concat_branch_output_passes_and_its_copy_is_what_stays(rng, threads):
    """A branch's last conv (then ReLU) writes into a passing buffer: the Concat copies it out
    before the next branch runs, whose convs reuse the same two buffers."""
    def branch(*sizes):
        layers = []
        for c_in, c_out, k in sizes:
            layers += [nn.Conv2d(c_in, c_out, k, padding=k // 2, rng=rng), nn.ReLU()]
        return nn.Sequential(*layers)

    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, rng=rng), nn.ReLU(),
                          nn.Concat(branch((4, 3, 1)), branch((4, 2, 1), (2, 3, 3)),
                                    branch((4, 2, 1), (2, 2, 3), (2, 3, 3))),
                          nn.Conv2d(9, 3, 3, padding=1, rng=rng), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(3, 4, rng=rng))
    for batch in (6, 6):
        x = rng.standard_normal((batch, 2, 6, 6)).astype(np.float32) + 2
        assert assert_same_run(model, x, rng.integers(0, 4, batch), need_dx=True).planned
    concat = net(model)._plan.ops[2]
    assert [[op.passing for op in chain if isinstance(op, cpu_ops.ConvOp)] for chain in concat.branches] == \
        [[0], [0, 1], [0, 1, 0]]


def test_gradient_buffers_go_back_to_the_pool(rng):
    """A chain keeps about two gradients at a time, not one per op: after a step through eight
    same-shaped convs the thread's pool holds at most three gradient buffers of that size."""
    gpuconv.set_cpu_workers(0)
    layers = [nn.Conv2d(3, 6, 3, padding=1, rng=rng), nn.ReLU()]
    for _ in range(7):
        layers += [nn.Conv2d(6, 6, 3, padding=1, rng=rng), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(6 * 8 * 8, 4, rng=rng))
    x = rng.standard_normal((5, 3, 8, 8)).astype(np.float32)
    assert assert_same_run(model, x, rng.integers(0, 4, 5), need_dx=True).planned
    pool = net(model)._plan.scratch[0]["gradient pool"]
    one = 6 * 10 * 10 * 5 * 4  # a conv's padded input gradient, float32 bytes
    assert 0 < sum(flat.nbytes for flat in pool.flats) <= 3 * one


def test_eval_batch_norms_share_one_centred_buffer(rng):
    """Batch norms in eval mode centre x in their backward (for the weight's gradient) in the
    thread's one shared buffer, as the training ones do, not one buffer per op the size of its
    input (84 MiB more for an eval-mode ResNet-20 step at batch 128). Same results as eager."""
    gpuconv.set_cpu_workers(0)
    layers = [nn.Conv2d(3, 6, 3, padding=1, rng=rng)]
    for _ in range(4):
        layers += [nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1, rng=rng)]
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(6 * 8 * 8, 4, rng=rng))
    for layer in model.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean[...] = rng.standard_normal(6).astype(np.float32)
            layer.running_var[...] = rng.random(6).astype(np.float32) + 0.5
            layer.weight.data[...] = rng.standard_normal(6).astype(np.float32)
    model.eval()
    x = rng.standard_normal((5, 3, 8, 8)).astype(np.float32)
    assert assert_same_run(model, x, rng.integers(0, 4, 5), need_dx=True).planned
    scratch = net(model)._plan.scratch[0]
    assert not [key for key in scratch if isinstance(key, tuple) and isinstance(key[0], int) and "centred" in key]
    assert scratch["centred"].nbytes == 6 * 8 * 8 * 5 * 4  # one batch norm's input, float32


def test_a_deferred_weight_gradient_keeps_the_buffer_it_reads(rng):
    """A thread that computes the weight gradients after the input gradients (every other thread
    when the parts are threads) reads each conv's output gradient at the end: the pool must not
    lend those buffers again before then. Same bits as computing them at once."""
    gpuconv.set_cpu_workers(0)
    layers = [nn.Conv2d(2, 4, 3, padding=1, rng=rng), nn.ReLU()]
    for _ in range(4):
        layers += [nn.Conv2d(4, 4, 3, padding=1, rng=rng), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(4 * 6 * 6, 8, rng=rng), nn.ReLU(),
                          nn.Linear(8, 3, rng=rng))
    x = rng.standard_normal((7, 2, 6, 6)).astype(np.float32)
    labels = rng.integers(0, 3, 7)
    runs = []
    for deferring in (False, True, True):
        run(model, x, labels, True)
        net(model)._plan.deferring = [deferring]
        runs.append(run(model, x, labels, True, need_dx=True))
    for other in runs[1:]:
        np.testing.assert_array_equal(other.dx, runs[0].dx)
        for name in runs[0].grads:
            np.testing.assert_array_equal(other.grads[name], runs[0].grads[name])
    assert_same_run(model, x, labels, need_dx=True)


def test_gradient_pool_lends_holds_and_restarts_the_same_way():
    pool = cpu_ops.GradientPool()
    pool.start()
    a = pool.take((2, 3))
    b = pool.take((4,))
    assert not np.shares_memory(a, b)
    pool.give_back(a[:, 1:])  # a view gives its owner back
    c = pool.take((3, 2))  # the free buffer fits
    assert np.shares_memory(c, a)
    pool.hold(b)
    pool.give_back(b)
    d = pool.take((2, 2))  # b is held until flush: a new buffer
    assert not np.shares_memory(d, b)
    pool.flush()
    pool.give_back(d, d.T)  # the caller goes on with d: it stays lent
    assert not np.shares_memory(pool.take((2, 2)), d)
    pool.give_back(np.zeros(3, np.float32))  # not the pool's: ignored
    sizes = sorted(flat.size for flat in pool.flats)
    pool.start()  # the same takes after a restart get the same views
    again = [pool.take((2, 3)), pool.take((4,))]
    pool.start()
    assert all(x is y for x, y in zip(again, [pool.take((2, 3)), pool.take((4,))]))
    assert sorted(flat.size for flat in pool.flats) == sizes


def test_shared_gradient_rows_are_zero_where_no_window_reads(rng, threads):
    """The convs' natural-order output gradients share one buffer per thread: a conv whose pooling
    leaves rows and columns uncovered (7x7 pooled by 2, 3x3 by 2) must see zeros there, not what
    the conv after it (whose backward runs first) left in the buffer."""
    model = nn.Sequential(nn.Conv2d(2, 5, 2, rng=rng), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(5, 6, 1, rng=rng), nn.ReLU(),
                          nn.Conv2d(6, 7, 1, rng=rng), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(7, 3, rng=rng))
    for batch in (8, 8):
        x = rng.standard_normal((batch, 2, 8, 8)).astype(np.float32) + 1
        assert assert_same_run(model, x, rng.integers(0, 3, batch), need_dx=True).planned


def test_a_pools_gradient_is_zero_where_no_window_reads(rng, threads):
    """A max pool after a Tanh (a PoolOp of its own) over 7x7 leaves row and column 6 to no
    window: its input gradient there is zero, though the buffer it gets from the pool held the
    Tanh's gradient of the conv after it a moment before."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, rng=rng), nn.Tanh(), nn.MaxPool2d(2),
                          nn.Conv2d(3, 32, 3, padding=1, rng=rng), nn.Tanh(),
                          nn.Flatten(), nn.Linear(32 * 3 * 3, 3, rng=rng))
    for batch in (6, 6):
        x = rng.standard_normal((batch, 2, 7, 7)).astype(np.float32) + 1
        assert assert_same_run(model, x, rng.integers(0, 3, batch), need_dx=True).planned


@pytest.mark.parametrize("first", ["identity", "relu"])
def test_a_concat_keeps_its_output_gradient_while_branches_pass_it_on(first, rng, threads):
    """A branch without ops of its own (Identity, or a ReLU writing into its block) returns a
    block of the Concat's output gradient: that buffer is the Concat's to keep until every branch
    has read its block, not the pool's to lend to the next branch's conv."""
    head = nn.Identity() if first == "identity" else nn.ReLU()
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, rng=rng), nn.ReLU(),
                          nn.Concat(head, nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, rng=rng), nn.ReLU())),
                          nn.Conv2d(8, 3, 1, rng=rng), nn.Tanh(),
                          nn.Flatten(), nn.Linear(3 * 6 * 6, 3, rng=rng))
    for batch in (6, 6):
        x = rng.standard_normal((batch, 3, 6, 6)).astype(np.float32) + 1
        assert assert_same_run(model, x, rng.integers(0, 3, batch), need_dx=True).planned


def test_a_deferred_gradient_that_does_not_say_what_it_reads_holds_every_lent_buffer():
    """An op registered elsewhere (cpu_plan.lowers) may call add_later without `reads`: then every
    buffer lent at that moment stays out of the pool until flush."""
    pool = cpu_ops.GradientPool()
    pool.start()
    a, b = pool.take((3,)), pool.take((3,))
    grads = cpu_plan._Grads(deferring=True, pool=pool)
    grads.add_later(object(), lambda: np.zeros(1))
    c = pool.take((3,))  # lent after: not held
    for array in (a, b, c):
        pool.give_back(array)
    assert np.shares_memory(pool.take((3,)), c)
    assert not any(np.shares_memory(pool.take((3,)), held) for held in (a, b))
    grads.flush()
    assert any(np.shares_memory(pool.take((3,)), held) for held in (a, b))
