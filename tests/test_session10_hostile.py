"""Hostile tests of the CPU executor after 82d6efa: a training step's gradient buffers from a
per-thread pool (cpu_ops.GradientPool, deferred weight gradients holding what they read, computed at
once in worker processes), the convs' shared natural-order dy and input-gradient products
(shared_view, uncovered strips and product tails zeroed each time), conv outputs only the forward
reads in two alternating passing buffers (mark_passing_outputs), and PoolOp's dx from the pool.

Every model runs compiled and eagerly on the same batch; logits, the input gradient and every p.grad
must agree to float32 rounding (rtol of the largest magnitude). Inputs and output gradients sit far
from zero (+2, +1): a stale, shared or recycled buffer shows in every number. Chunks are made small
(MAX_CHUNK, MIN_CHUNK patched) so that a thread runs several chunks, the last one shorter, and batch
sizes change between steps.
"""
import random

import numpy as np
import pytest

import gpuconv
from gpuconv import nn, ops, optim
from gpuconv.compiler import PlanFunction
from gpuconv.errors import DTypeError
from gpuconv.nn import cpu_ops, cpu_plan, cpu_workers
from gpuconv.ops import conv_cpu
from test_compile_segments import plans_on_tape

RTOL = 5e-5

SETUPS = {  # (worker count, worker processes?, MAX_CHUNK)
    "caller alone, chunks of 2": (0, False, 2),
    "2 worker threads, chunks of 3": (2, False, 3),
    "1 worker thread, chunks of 5": (1, False, 5),
    "1 worker process": (1, True, 128),  # a worker process keeps its own MAX_CHUNK (128)
}


@pytest.fixture(params=list(SETUPS))
def setup(request, monkeypatch):
    workers, processes, max_chunk = SETUPS[request.param]
    if processes and not cpu_workers.supported():
        pytest.skip("no worker processes on this platform")
    monkeypatch.setattr(cpu_plan, "processes", processes)
    monkeypatch.setattr(cpu_plan, "MIN_CHUNK", 2)
    monkeypatch.setattr(cpu_plan, "MAX_CHUNK", max_chunk)
    gpuconv.set_cpu_workers(workers)
    yield request.param
    gpuconv.set_cpu_workers(None)


@pytest.fixture
def alone(monkeypatch):
    """The caller's thread alone (worker threads, never processes, where a test sets a worker count)."""
    monkeypatch.setattr(cpu_plan, "processes", False)
    monkeypatch.setattr(cpu_plan, "MIN_CHUNK", 2)
    gpuconv.set_cpu_workers(0)
    yield
    gpuconv.set_cpu_workers(None)


# ----------------------------------------------------------------------------------------------
# helpers


def conv(rng, c_in, c_out, k, **kwargs):
    return nn.Conv2d(c_in, c_out, k, rng=rng, **kwargs)


def step(model, x, dy, need_dx=True):
    """One forward and backward with output gradient dy -> (logits, dx or None, {name: grad}, node)."""
    for p in model.parameters():
        p.grad = None
    inputs = gpuconv.tensor(x, requires_grad=True) if need_dx else x
    out = model(inputs)
    out.backward(dy)
    grads = {name: None if p.grad is None else p.grad.copy() for name, p in model.named_parameters()}
    return out.data.copy(), inputs.grad.copy() if need_dx else None, grads, out.creator


def assert_close(actual, expected, what, rtol=RTOL):
    scale = float(np.abs(expected).max()) or 1.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=what)


def output_like(model, x, rng):
    with gpuconv.no_grad():
        shape = model(x).shape
    return rng.standard_normal(shape).astype(np.float32) + 1


def check(model, x, dy, compiled=None, need_dx=True, planned=True):
    """Compiled and eager agree on logits, dx and every p.grad; the compiled model ran one plan."""
    compiled = compiled or gpuconv.compile(model)
    fast = step(compiled, x, dy, need_dx)
    slow = step(model, x, dy, need_dx)
    if planned:
        assert isinstance(fast[3], PlanFunction), "the compiled model did not run its plan"
    assert_close(fast[0], slow[0], "logits")
    if need_dx:
        assert_close(fast[1], slow[1], "input gradient")
    assert fast[2].keys() == slow[2].keys()
    for name in slow[2]:
        assert (fast[2][name] is None) == (slow[2][name] is None), name
        if slow[2][name] is not None:
            assert_close(fast[2][name], slow[2][name], name)
    return fast


def check_steps(model, rng, in_shape, batches=(11, 7, 11)):
    """Several steps of one compiled model at changing batch sizes, each against the eager model."""
    compiled = gpuconv.compile(model)
    for batch in batches:
        x = rng.standard_normal((batch,) + tuple(in_shape)).astype(np.float32) + 2
        check(model, x, output_like(model, x, rng), compiled)
    return compiled


def assert_same_bits(a, b):
    np.testing.assert_array_equal(a[0], b[0], err_msg="logits")
    np.testing.assert_array_equal(a[1], b[1], err_msg="input gradient")
    for name in a[2]:
        np.testing.assert_array_equal(a[2][name], b[2][name], err_msg=name)


def convs_of(ops_):
    found = []
    for op in ops_:
        if isinstance(op, cpu_ops.BranchingOp):
            found += convs_of(op.ops())
        elif isinstance(op, cpu_ops.ConvOp):
            found.append(op)
    return found


# ----------------------------------------------------------------------------------------------
# one layer object used several times (shared weights)


def test_a_conv_used_four_times_in_a_chain(setup):
    rng = np.random.default_rng(1)
    shared = conv(rng, 4, 4, 3, padding=1)
    model = nn.Sequential(conv(rng, 3, 4, 3, padding=1), nn.ReLU(), shared, nn.ReLU(), shared, shared, nn.ReLU(),
                          shared, nn.ReLU(), conv(rng, 4, 2, 3, padding=1))
    compiled = check_steps(model, rng, (3, 7, 7))
    # four ConvOps of one layer, passing outputs between them
    assert [op.passing for op in convs_of(compiled._plan.ops)] == [0, 1, 0, 1, 0, 1]


def test_a_conv_shared_by_a_chain_a_concat_branch_and_a_residual_body(setup):
    rng = np.random.default_rng(2)
    shared = conv(rng, 3, 3, 3, padding=1)
    model = nn.Sequential(
        conv(rng, 3, 3, 3, padding=1), nn.ReLU(), shared, nn.ReLU(),
        nn.Concat(nn.Sequential(shared, nn.ReLU(), shared), nn.Sequential(shared), nn.Identity(), nn.ReLU()),
        conv(rng, 12, 3, 3, padding=1), nn.ReLU(),
        nn.Residual(nn.Sequential(shared, nn.ReLU(), shared), shared, nn.ReLU()), shared)
    check_steps(model, rng, (3, 6, 6))


def test_the_same_module_as_two_branches_and_a_block_used_thrice(setup):
    rng = np.random.default_rng(3)
    branch = nn.Sequential(conv(rng, 3, 3, 3, padding=1), nn.ReLU(), conv(rng, 3, 3, 3, padding=1))
    block = nn.Residual(nn.Sequential(conv(rng, 3, 3, 3, padding=1), nn.ReLU(), conv(rng, 3, 3, 3, padding=1)),
                        None, nn.ReLU())
    model = nn.Sequential(nn.Concat(branch, branch), conv(rng, 6, 3, 3, padding=1), nn.ReLU(),
                          nn.Residual(branch, branch, branch), block, block, nn.Concat(block, nn.Identity()),
                          conv(rng, 6, 3, 3, padding=1), block)
    check_steps(model, rng, (3, 6, 6))


def test_linear_layers_shared_and_in_flat_branches(setup):
    """Dense layers' weight gradients wait in every thread (always=True) and hold the gradient they
    read: inside flat Concat branches and Residual bodies, one Linear used four times."""
    rng = np.random.default_rng(4)
    shared = nn.Linear(6, 6, rng=rng)
    model = nn.Sequential(
        conv(rng, 3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 6, rng=rng),
        nn.ReLU(), nn.Concat(nn.Sequential(nn.Linear(6, 4, rng=rng), nn.ReLU()), nn.Identity(), nn.ReLU(),
                             nn.Sequential(shared, nn.Tanh()), dim=-1),
        nn.Linear(22, 6, rng=rng), nn.Residual(nn.Sequential(shared, nn.ReLU(), shared), None, nn.ReLU()),
        nn.Residual(nn.Sequential(shared), nn.Linear(6, 6, rng=rng)), nn.Sigmoid(), nn.Linear(6, 3, rng=rng))
    check_steps(model, rng, (3, 6, 6))


# ----------------------------------------------------------------------------------------------
# branches: empty, ReLU only, nested, Concat in Residual and Residual in Concat


def test_concat_branches_empty_relu_only_and_ending_in_passing_convs(setup):
    rng = np.random.default_rng(5)
    model = nn.Sequential(
        conv(rng, 3, 4, 3, padding=1),
        nn.Concat(nn.Identity(), nn.ReLU(), nn.Sequential(conv(rng, 4, 2, 3, padding=1), nn.ReLU()),
                  nn.Sequential(conv(rng, 4, 3, 1), nn.ReLU(), conv(rng, 3, 2, 3, padding=1))),
        conv(rng, 12, 3, 3, padding=1), nn.ReLU(),
        nn.Concat(nn.ReLU(), nn.Sequential(conv(rng, 3, 2, 3, padding=1), nn.ReLU(), nn.ReLU())))
    compiled = check_steps(model, rng, (3, 6, 6))
    first = compiled._plan.ops[1]
    assert [[op.passing for op in chain if isinstance(op, cpu_ops.ConvOp)] for chain in first.branches] == \
        [[], [], [0], [0, 1]]
    # a branch ending in two ReLUs: the second keeps its own output, the conv's does not pass
    last = compiled._plan.ops[-1]
    assert [op.passing for op in last.branches[1] if isinstance(op, cpu_ops.ConvOp)] == [None]


def test_nested_concats_and_concats_in_residuals_and_back(setup):
    rng = np.random.default_rng(6)
    inner = nn.Concat(conv(rng, 4, 2, 3, padding=1),
                      nn.Sequential(conv(rng, 4, 2, 3, padding=1), nn.ReLU(), conv(rng, 2, 2, 3, padding=1)))
    model = nn.Sequential(
        conv(rng, 3, 4, 3, padding=1), nn.ReLU(),
        nn.Concat(inner, nn.Sequential(conv(rng, 4, 3, 3, padding=1), nn.ReLU(),
                                       nn.Concat(conv(rng, 3, 1, 3, padding=1), nn.Identity()))),
        conv(rng, 8, 4, 3, padding=1), nn.ReLU(),
        nn.Residual(nn.Sequential(nn.Concat(conv(rng, 4, 2, 3, padding=1),
                                            nn.Sequential(conv(rng, 4, 2, 1), nn.ReLU(), conv(rng, 2, 2, 3, padding=1))),
                                  nn.ReLU(), conv(rng, 4, 4, 3, padding=1)), None, nn.ReLU()),
        nn.Concat(nn.Residual(nn.Sequential(conv(rng, 4, 4, 3, padding=1), nn.ReLU(), conv(rng, 4, 4, 3, padding=1)),
                              conv(rng, 4, 4, 1), nn.Sequential(nn.ReLU(), conv(rng, 4, 4, 3, padding=1))),
                  nn.Sequential(conv(rng, 4, 3, 3, padding=1), nn.ReLU())),
        conv(rng, 7, 2, 3, padding=1))
    check_steps(model, rng, (3, 7, 7))


def test_a_block_ending_in_a_block_and_a_concat_starting_with_one(setup):
    """The gradient a Residual gets is its caller's: an inner block ending the outer one's body
    (whose shortcut reads the same gradient after it), a block as the first of three Concat
    branches (the later ones read their blocks of the same gradient after it) must leave it lent."""
    rng = np.random.default_rng(30)

    def block(c, shortcut=None):
        return nn.Residual(nn.Sequential(conv(rng, c, c, 3, padding=1), nn.ReLU(), conv(rng, c, c, 3, padding=1)),
                           shortcut)

    model = nn.Sequential(
        conv(rng, 3, 4, 3, padding=1), nn.ReLU(),
        nn.Residual(nn.Sequential(conv(rng, 4, 4, 3, padding=1), nn.ReLU(), block(4)), conv(rng, 4, 4, 3, padding=1),
                    nn.ReLU()),
        nn.Residual(nn.Sequential(conv(rng, 4, 4, 3, padding=1), block(4, conv(rng, 4, 4, 1))), block(4)),
        nn.Concat(block(4), nn.Sequential(conv(rng, 4, 4, 3, padding=1), nn.ReLU()), conv(rng, 4, 4, 3, padding=1),
                  block(4)),
        conv(rng, 16, 4, 3, padding=1), nn.ReLU(),
        nn.Concat(block(4), conv(rng, 4, 4, 3, padding=1)), conv(rng, 8, 2, 3, padding=1))
    check_steps(model, rng, (3, 6, 6))


def test_residual_blocks_with_identity_and_relu_bodies(setup):
    rng = np.random.default_rng(7)
    model = nn.Sequential(conv(rng, 3, 3, 3, padding=1), nn.Residual(nn.Identity()),
                          nn.Residual(nn.ReLU(), None, nn.ReLU()), nn.Residual(nn.ReLU(), nn.ReLU()),
                          conv(rng, 3, 3, 3, padding=1), nn.Residual(nn.Identity(), nn.Identity(), nn.ReLU()),
                          nn.Concat(nn.Concat(nn.Identity())), conv(rng, 3, 2, 3, padding=1))
    check_steps(model, rng, (3, 6, 6))


def test_a_first_layer_that_branches_without_an_input_gradient(setup):
    """need_dx=False: the first op's backward returns None (a Concat with an empty branch, a
    Residual with an identity shortcut), the pool gets back what the chain lent."""
    rng = np.random.default_rng(8)
    model = nn.Sequential(
        nn.Concat(nn.Identity(), nn.Sequential(conv(rng, 3, 2, 3, padding=1), nn.ReLU())),
        nn.Residual(nn.Sequential(conv(rng, 5, 5, 3, padding=1), nn.ReLU(), conv(rng, 5, 5, 3, padding=1))),
        conv(rng, 5, 2, 3, padding=1))
    compiled = gpuconv.compile(model)
    for batch in (9, 4):
        x = rng.standard_normal((batch, 3, 6, 6)).astype(np.float32) + 2
        dy = output_like(model, x, rng)
        check(model, x, dy, compiled, need_dx=False)
        check(model, x, dy, compiled, need_dx=True)


# ----------------------------------------------------------------------------------------------
# conv geometries, pools, activations that keep their output


def test_conv_geometries_between_passing_convs(setup):
    rng = np.random.default_rng(9)
    model = nn.Sequential(
        conv(rng, 3, 4, 3, padding=1), nn.ReLU(),
        conv(rng, 4, 4, 3, stride=2, padding=1), nn.ReLU(),
        conv(rng, 4, 4, 3, stride=(1, 2), padding=1), nn.ReLU(),
        conv(rng, 4, 4, 3, stride=(2, 1), padding=1), nn.ReLU(),
        conv(rng, 4, 4, 3, dilation=2, padding=2), nn.ReLU(),
        conv(rng, 4, 4, 3, padding="same"), nn.ReLU(),
        conv(rng, 4, 3, 1, padding=1), nn.ReLU(),
        conv(rng, 3, 3, 9, padding=4), nn.ReLU(),  # a kernel larger than its input
        conv(rng, 3, 3, (1, 5), padding=(0, 2)),
        conv(rng, 3, 2, 5, padding=2, bias=False))
    compiled = check_steps(model, rng, (3, 13, 11))
    slots = [op.passing for op in convs_of(compiled._plan.ops)]
    # the conv before the dilated one keeps its output (the dilated conv rebuilds its columns from it);
    # the plan's last conv passes (the plan copies it out)
    assert slots[3] is None and slots[-1] is not None


def test_kernels_larger_than_the_input_with_padding(setup):
    rng = np.random.default_rng(10)
    model = nn.Sequential(conv(rng, 2, 4, 3, padding=1), nn.ReLU(), conv(rng, 4, 4, 11, padding=5), nn.ReLU(),
                          conv(rng, 4, 3, 9, padding=3), nn.ReLU(), conv(rng, 3, 2, 7, padding=6))
    check_steps(model, rng, (2, 5, 4))


@pytest.mark.parametrize("pool", [2, 3, (2, 3), (3, 1)])
def test_pools_leaving_rows_and_columns_uncovered(setup, pool):
    """Fused conv-pools and standalone pools whose windows leave the last rows and columns
    uncovered: their gradients there must be zero, whatever another conv left in the shared
    natural-order buffer or the pool's buffer held before."""
    rng = np.random.default_rng(11)
    model = nn.Sequential(
        conv(rng, 3, 9, 3, padding=2), nn.ReLU(),  # a wide dy_rows first (its backward runs last)
        conv(rng, 9, 4, 2), nn.ReLU(), nn.MaxPool2d(pool),
        conv(rng, 4, 5, 2, padding=1), nn.MaxPool2d(pool),  # no ReLU between, few filters: banded
        conv(rng, 5, 4, 1, padding=1), nn.Tanh(), nn.AvgPool2d(2),
        conv(rng, 4, 3, 1, padding=1), nn.ReLU(), nn.ReLU(), nn.MaxPool2d(2),
        conv(rng, 3, 2, 1, padding=1))
    check_steps(model, rng, (3, 23, 22))


def test_stride_one_two_convs_fused_with_pools(setup):
    rng = np.random.default_rng(12)
    model = nn.Sequential(conv(rng, 3, 9, 3, padding=2), nn.ReLU(),
                          conv(rng, 9, 3, 3, stride=(1, 2), bias=False), nn.MaxPool2d(2),
                          conv(rng, 3, 7, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3),
                          conv(rng, 7, 4, 3, stride=(2, 1), padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          conv(rng, 4, 2, 1, padding=1))
    check_steps(model, rng, (3, 25, 27))


def test_activations_that_keep_their_output_stop_passing(setup):
    rng = np.random.default_rng(13)
    model = nn.Sequential(conv(rng, 3, 4, 3, padding=1), nn.Tanh(), conv(rng, 4, 4, 3, padding=1), nn.Sigmoid(),
                          conv(rng, 4, 4, 3, padding=1), nn.ReLU(), nn.ReLU(), conv(rng, 4, 4, 3, padding=1),
                          nn.ReLU(), nn.Tanh(), conv(rng, 4, 4, 3, padding=1), nn.Identity(),
                          conv(rng, 4, 3, 3, padding=1), nn.ReLU(), nn.Sigmoid())
    compiled = check_steps(model, rng, (3, 7, 7))
    assert [op.passing for op in convs_of(compiled._plan.ops)] == [None] * 6


def test_batch_norm_and_global_pool_after_passing_convs(setup):
    rng = np.random.default_rng(14)
    norm = nn.BatchNorm2d(4)
    norm.eval()
    norm.running_mean[...] = rng.standard_normal(4) * 0.3
    norm.running_var[...] = rng.uniform(0.5, 2, 4)
    model = nn.Sequential(conv(rng, 3, 4, 3, padding=1), nn.ReLU(), conv(rng, 4, 4, 3, padding=1), norm, nn.ReLU(),
                          nn.Concat(nn.Sequential(conv(rng, 4, 4, 3, padding=1), norm), nn.Sequential(norm, nn.ReLU())),
                          nn.AvgPool2d(2), conv(rng, 8, 4, 3, padding=1), nn.ReLU(), conv(rng, 4, 6, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3, rng=rng))
    check_steps(model, rng, (3, 8, 8))


@pytest.mark.parametrize("head", ["conv", "conv relu", "conv flatten linear", "concat", "residual"])
def test_models_ending_in_a_passing_conv_or_a_branch(setup, head):
    """The plan's output is copied out chunk by chunk: a last conv writes into a passing buffer."""
    rng = np.random.default_rng(15)
    layers = [conv(rng, 3, 4, 3, padding=1), nn.ReLU(), conv(rng, 4, 4, 3, padding=1), nn.ReLU()]
    layers += {"conv": [conv(rng, 4, 3, 3, padding=1)],
               "conv relu": [conv(rng, 4, 3, 3, padding=1), nn.ReLU()],
               "conv flatten linear": [conv(rng, 4, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 36, 4, rng=rng)],
               "concat": [nn.Concat(conv(rng, 4, 2, 3, padding=1), nn.ReLU(),
                                    nn.Sequential(conv(rng, 4, 2, 1), nn.ReLU(), conv(rng, 2, 2, 3, padding=1)))],
               "residual": [nn.Residual(nn.Sequential(conv(rng, 4, 4, 3, padding=1), nn.ReLU(),
                                                      conv(rng, 4, 4, 3, padding=1)), None, nn.ReLU())]}[head]
    check_steps(nn.Sequential(*layers), rng, (3, 6, 6), batches=(11, 5, 1, 11))


# ----------------------------------------------------------------------------------------------
# the tape: backward twice, other forwards in between, the caller's arrays


def check_backward_twice(model, compiled, x, dy):
    """Two backwards of one compiled forward (retain_graph) add up to twice the eager gradients."""
    _, eager_dx, eager_grads, _ = step(model, x, dy)
    for p in model.parameters():
        p.grad = None
    inputs = gpuconv.tensor(x, requires_grad=True)
    out = compiled(inputs)
    out.backward(dy, retain_graph=True)
    out.backward(dy)
    assert_close(inputs.grad, 2 * eager_dx, "input gradient")
    for name, p in model.named_parameters():
        assert_close(p.grad, 2 * eager_grads[name], name)


def mixed_model(rng):
    shared = conv(rng, 4, 4, 3, padding=1)
    return nn.Sequential(
        conv(rng, 3, 4, 3, padding=1), nn.ReLU(), shared, nn.ReLU(), nn.MaxPool2d(2), shared, nn.ReLU(),
        nn.Concat(nn.Sequential(conv(rng, 4, 3, 3, padding=1), nn.ReLU()), nn.Identity(),
                  nn.Residual(nn.Sequential(shared, nn.ReLU(), shared), None, nn.ReLU())),
        conv(rng, 11, 3, 3, padding=1), nn.ReLU(), conv(rng, 3, 3, 3, padding=1))


def test_backward_twice_after_one_forward(setup):
    rng = np.random.default_rng(16)
    model = mixed_model(rng)
    compiled = gpuconv.compile(model)
    x = rng.standard_normal((10, 3, 8, 8)).astype(np.float32) + 2
    dy = output_like(model, x, rng)
    check_backward_twice(model, compiled, x, dy)


@pytest.mark.parametrize("between", ["inference", "training forward"])
def test_other_forwards_between_a_forward_and_its_backward(setup, between):
    rng = np.random.default_rng(17)
    model = mixed_model(rng)
    compiled = gpuconv.compile(model)
    x = rng.standard_normal((10, 3, 8, 8)).astype(np.float32) + 2
    dy = output_like(model, x, rng)
    eager = step(model, x, dy)
    for p in model.parameters():
        p.grad = None
    inputs = gpuconv.tensor(x, requires_grad=True)
    out = compiled(inputs)
    other = rng.standard_normal((7, 3, 8, 8)).astype(np.float32) - 3
    if between == "inference":
        with gpuconv.no_grad():
            assert_close(compiled(other).data, model(other).data, "other logits")
    else:
        compiled(gpuconv.tensor(other, requires_grad=True))
    out.backward(dy)
    assert_close(out.data, eager[0], "logits")
    assert_close(inputs.grad, eager[1], "input gradient")
    for name, p in model.named_parameters():
        assert_close(p.grad, eager[2][name], name)


@pytest.mark.parametrize("tail", ["relu", "concat of relus", "residual", "pooled", "linear relu", "conv"])
def test_the_callers_arrays_are_never_written(setup, tail):
    """x, dy, the logits and the gradients handed out stay as they were through later steps."""
    rng = np.random.default_rng(18)
    layers = [conv(rng, 3, 4, 3, padding=1), nn.ReLU(), conv(rng, 4, 4, 3, padding=1)]
    layers += {"relu": [nn.ReLU()],
               "concat of relus": [nn.Concat(nn.ReLU(), nn.Sequential(conv(rng, 4, 2, 3, padding=1), nn.ReLU()),
                                             nn.Identity())],
               "residual": [nn.Residual(nn.Sequential(conv(rng, 4, 4, 3, padding=1), nn.ReLU(),
                                                      conv(rng, 4, 4, 3, padding=1)), None, nn.ReLU())],
               "pooled": [nn.ReLU(), nn.MaxPool2d(2)],
               "linear relu": [nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 5, rng=rng), nn.ReLU()],
               "conv": [nn.ReLU(), conv(rng, 4, 2, 3, padding=1)]}[tail]
    model = nn.Sequential(*layers)
    compiled = gpuconv.compile(model)
    kept = []
    for batch in (10, 1, 10):
        x = rng.standard_normal((batch, 3, 8, 8)).astype(np.float32) + 2
        dy = output_like(model, x, rng)
        run = step(compiled, x, dy)
        for p in model.parameters():
            p.grad = None
        inputs = gpuconv.tensor(x, requires_grad=True)
        out = compiled(inputs)
        out.backward(dy)
        kept.append((x, x.copy(), dy, dy.copy(), out.data, out.data.copy(), inputs.grad, inputs.grad.copy(),
                     {name: (p.grad, p.grad.copy()) for name, p in model.named_parameters()}))
        assert_same_bits(run, (out.data, inputs.grad, {name: p.grad for name, p in model.named_parameters()}))
    for x, x0, dy, dy0, logits, logits0, dx, dx0, grads in kept:
        np.testing.assert_array_equal(x, x0, err_msg="x")
        np.testing.assert_array_equal(dy, dy0, err_msg="dy")
        np.testing.assert_array_equal(logits, logits0, err_msg="logits")
        np.testing.assert_array_equal(dx, dx0, err_msg="dx")
        for name, (grad, grad0) in grads.items():
            np.testing.assert_array_equal(grad, grad0, err_msg=name)


def test_worker_count_changing_between_steps(monkeypatch):
    """The plan is laid out again for 3, 1, 2, 3 threads: scratch (with its pool and passing
    buffers) kept for the threads that stay, chunk stores handed to other threads by size."""
    monkeypatch.setattr(cpu_plan, "processes", False)
    monkeypatch.setattr(cpu_plan, "MIN_CHUNK", 2)
    monkeypatch.setattr(cpu_plan, "MAX_CHUNK", 3)
    try:
        rng = np.random.default_rng(25)
        model = mixed_model(rng)
        compiled = gpuconv.compile(model)
        for workers, batch in ((2, 12), (0, 12), (1, 9), (2, 12), (0, 5)):
            gpuconv.set_cpu_workers(workers)
            x = rng.standard_normal((batch, 3, 8, 8)).astype(np.float32) + 2
            check(model, x, output_like(model, x, rng), compiled)
            assert compiled._plan.threads == min(workers + 1, batch // 2)
    finally:
        gpuconv.set_cpu_workers(None)


def test_sgd_steps_follow_the_eager_model(setup):
    """Weights change between steps (banded weights, dx weights copied anew), batch sizes too:
    five SGD steps with momentum compiled and eagerly end on the same weights."""
    weights = {}
    for compiled_run in (True, False):
        rng = np.random.default_rng(26)
        model = mixed_model(rng)
        net = gpuconv.compile(model) if compiled_run else model
        opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        start = {name: p.data.copy() for name, p in model.named_parameters()}
        data = np.random.default_rng(27)
        for batch in (11, 7, 11, 3, 11):
            x = data.standard_normal((batch, 3, 8, 8)).astype(np.float32) + 2
            opt.zero_grad()
            out = net(x)
            out.backward(np.full(out.shape, 1 / out.data.size, np.float32))
            opt.step()
        weights[compiled_run] = {name: p.data.copy() for name, p in model.named_parameters()}
        assert all(np.isfinite(w).all() and not np.array_equal(w, start[name]) for name, w in weights[compiled_run].items())
    for name in weights[False]:
        assert_close(weights[True][name], weights[False][name], name, rtol=1e-4)


def test_plans_of_segments_around_an_eager_layer(setup):
    """A layer the executor does not lower (LeakyReLU) splits the model: two plans, the second's
    input gradient handed to the eager layer, the first's output gradient from it. (A BatchNorm2d
    in training split it until it lowered too.)"""
    rng = np.random.default_rng(28)
    model = nn.Sequential(conv(rng, 3, 4, 3, padding=1), nn.ReLU(), conv(rng, 4, 4, 3, padding=1), nn.ReLU(),
                          nn.MaxPool2d(2), conv(rng, 4, 4, 3, padding=1), nn.ReLU(),
                          conv(rng, 4, 4, 3, padding=1, bias=False),
                          nn.LeakyReLU(),
                          conv(rng, 4, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), conv(rng, 4, 4, 3, padding=1),
                          nn.ReLU(), conv(rng, 4, 2, 3, padding=1))
    compiled = gpuconv.compile(model)
    for batch in (11, 6):
        x = rng.standard_normal((batch, 3, 12, 12)).astype(np.float32) + 2
        check(model, x, output_like(model, x, rng), compiled, planned=False)
        out = compiled(x)
        assert len(plans_on_tape(out)) == 2


def test_an_eval_mode_model_computes_its_pooling_flags_in_the_backward(setup):
    """In eval mode a fused pool's tie flags are computed by the first backward (before the routed
    gradient overwrites y); twice through one forward too."""
    rng = np.random.default_rng(29)
    model = mixed_model(rng)
    model.eval()
    compiled = gpuconv.compile(model)
    x = rng.standard_normal((10, 3, 8, 8)).astype(np.float32) + 2
    x[:, :, :3] = 0  # ties
    dy = output_like(model, x, rng)
    check(model, x, dy, compiled)
    check_backward_twice(model, compiled, x, dy)


# ----------------------------------------------------------------------------------------------
# the same bits: deferring threads, threads and processes


def branchy_model(rng, shared_weights):
    """Concat, Residual, fused pools, dense layers; with shared_weights one conv runs four times."""
    repeated = conv(rng, 4, 4, 3, padding=1)
    other = (lambda: repeated) if shared_weights else (lambda: conv(rng, 4, 4, 3, padding=1))
    return nn.Sequential(
        conv(rng, 3, 4, 3, padding=1), nn.ReLU(), other(), nn.ReLU(),
        nn.Concat(nn.Sequential(other(), nn.ReLU(), conv(rng, 4, 3, 3, padding=1)), nn.Identity(), nn.ReLU(),
                  nn.Residual(nn.Sequential(other(), nn.ReLU(), other()), None, nn.ReLU())),
        conv(rng, 15, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), conv(rng, 4, 4, 3, stride=(1, 2), padding=1),
        nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 2, 6, rng=rng), nn.ReLU(), nn.Linear(6, 3, rng=rng))


def deferring_runs(model, x, dy):
    compiled = gpuconv.compile(model)
    runs = []
    for deferring in (False, True, False, True):
        step(compiled, x, dy)  # lays the plan out
        compiled._plan.deferring = [deferring]
        runs.append(step(compiled, x, dy))
    return runs


@pytest.mark.parametrize("max_chunk", [3, 128])
def test_deferred_weight_gradients_give_the_same_bits(alone, monkeypatch, max_chunk):
    """A thread that computes the weight gradients after all the input gradients reads each
    conv's and Linear's output gradient at the end: held buffers, the same bits as at once."""
    monkeypatch.setattr(cpu_plan, "MAX_CHUNK", max_chunk)
    rng = np.random.default_rng(19)
    model = branchy_model(rng, shared_weights=False)
    x = rng.standard_normal((11, 3, 8, 8)).astype(np.float32) + 2
    runs = deferring_runs(model, x, output_like(model, x, rng))
    for other in runs[1:]:
        assert_same_bits(other, runs[0])


def test_deferred_weight_gradients_of_a_conv_used_three_times_give_the_same_bits(alone):
    """_Grads' docstring: deferred or not, "every parameter still gets the same contributions in
    the same order, so the numbers are the same bits". A conv layer used three times gets its
    three weight gradients added last use first when computed at once, first use first when
    deferred (flush() runs them reversed): (g3 + g2) + g1 against (g1 + g2) + g3, other bits.
    (So a model's part 1 sums such a weight's gradient in another order than part 0.)"""
    rng = np.random.default_rng(20)
    shared = conv(rng, 3, 3, 3, padding=1)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.ReLU(), shared)
    x = rng.standard_normal((4, 3, 6, 6)).astype(np.float32) + 2
    runs = deferring_runs(model, x, output_like(model, x, rng))
    for other in runs[1:]:
        assert_same_bits(other, runs[0])


@pytest.mark.skipif(not cpu_workers.supported(), reason="no worker processes on this platform")
@pytest.mark.parametrize("shared_weights", [False, True])
def test_threads_and_processes_give_the_same_bits(monkeypatch, shared_weights):
    """Part 1 in a worker process computes its deferred weight gradients at once (compute_now) and
    adds them in the deferred order; in a worker thread it computes them at flush from held buffers:
    the same bits, step after step at changing batch sizes (the default MAX_CHUNK: a worker process
    does not see a patched one)."""
    monkeypatch.setattr(cpu_plan, "MIN_CHUNK", 2)
    gpuconv.set_cpu_workers(1)
    try:
        rng = np.random.default_rng(21)
        model = branchy_model(rng, shared_weights)
        compiled = gpuconv.compile(model)
        for batch in (11, 6, 11):
            x = rng.standard_normal((batch, 3, 8, 8)).astype(np.float32) + 2
            dy = output_like(model, x, rng)
            runs = {}
            for processes in (True, False, True):
                monkeypatch.setattr(cpu_plan, "processes", processes)
                runs.setdefault(processes, []).append(step(compiled, x, dy))
                assert compiled._plan.threads == 2 and compiled._plan.in_processes == processes
            assert_same_bits(runs[True][0], runs[True][1])
            assert_same_bits(runs[False][0], runs[True][0])
    finally:
        gpuconv.set_cpu_workers(None)


def test_more_threads_than_two_split_deferring_and_not(monkeypatch):
    """Three threads: parts 0 and 2 compute weight gradients at once, part 1 defers. Against a
    fourth step laid out again, and against the eager model."""
    monkeypatch.setattr(cpu_plan, "processes", False)
    monkeypatch.setattr(cpu_plan, "MIN_CHUNK", 2)
    monkeypatch.setattr(cpu_plan, "MAX_CHUNK", 2)
    gpuconv.set_cpu_workers(2)
    try:
        rng = np.random.default_rng(22)
        model = branchy_model(rng, shared_weights=False)
        compiled = gpuconv.compile(model)
        x = rng.standard_normal((13, 3, 8, 8)).astype(np.float32) + 2
        dy = output_like(model, x, rng)
        first = check(model, x, dy, compiled)
        assert compiled._plan.deferring == [False, True, False]
        again = step(compiled, x, dy)
        assert_same_bits(again, first)
    finally:
        gpuconv.set_cpu_workers(None)


# ----------------------------------------------------------------------------------------------
# the array-level conv2d_backward through _BatchInner (few input channels), several chunks


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("chunk_bytes", [4 << 20, 20000, 3000])
@pytest.mark.parametrize("geometry", [(3, 5, 3, 1, 9, 13), (1, 4, 5, 2, 8, 11), (7, 2, 3, 0, 10, 9),
                                      (2, 3, 1, 1, 6, 17), (4, 4, 7, 3, 5, 7)])
def test_conv2d_backward_with_few_input_channels_over_chunks(monkeypatch, workers, chunk_bytes, geometry):
    """float32, stride 1, <= 7 input channels: ConvOp's backward on chunks of a part (the last one
    shorter), its input gradient from the pool of the part's scratch, against float64."""
    c, o, k, p, hw, n = geometry
    monkeypatch.setattr(conv_cpu, "BATCH_INNER_BYTES", chunk_bytes)
    gpuconv.set_cpu_workers(workers)
    try:
        rng = np.random.default_rng(sum(geometry))
        x = rng.standard_normal((n, c, hw, hw)).astype(np.float32) + 2
        w = rng.standard_normal((o, c, k, k)).astype(np.float32)
        oh = hw + 2 * p - k + 1
        dy = rng.standard_normal((n, o, oh, oh)).astype(np.float32) + 1
        geo = conv_cpu._Geometry(x.shape, w.shape, (1, 1), (p, p), (1, 1))
        assert conv_cpu._batch_inner(geo, np.float32)
        x0, dy0, w0 = x.copy(), dy.copy(), w.copy()
        got = ops.conv2d_backward(dy, x, w, 1, p, 1)
        again = ops.conv2d_backward(dy, x, w, 1, p, 1)
        exact = ops.conv2d_backward(dy.astype(np.float64), x.astype(np.float64), w.astype(np.float64), 1, p, 1)
        for name, a, b, e in zip(("dx", "dw", "db"), got, again, exact):
            assert a.dtype == np.float32
            np.testing.assert_array_equal(a, b, err_msg=name)
            assert_close(a, e, name, rtol=2e-6)
        np.testing.assert_array_equal(x, x0)
        np.testing.assert_array_equal(dy, dy0)
        np.testing.assert_array_equal(w, w0)
    finally:
        gpuconv.set_cpu_workers(None)


# ----------------------------------------------------------------------------------------------
# small input-gradient groups, float64 batches, random models


@pytest.mark.parametrize("group_bytes", [1, 3000])
def test_input_gradient_products_in_small_groups(alone, monkeypatch, group_bytes):
    """The products go a group of rows at a time through the shared dx_rows buffer: one row, or a
    few with a shorter last group, each group's tail zeroed."""
    monkeypatch.setattr(cpu_ops, "DX_GROUP_BYTES", group_bytes)
    monkeypatch.setattr(cpu_plan, "MAX_CHUNK", 3)
    rng = np.random.default_rng(23)
    model = nn.Sequential(conv(rng, 3, 6, 5, padding=2), nn.ReLU(), conv(rng, 6, 4, 3, padding=1), nn.ReLU(),
                          nn.MaxPool2d(3), conv(rng, 4, 5, 3, padding=2), nn.ReLU(), conv(rng, 5, 3, 2, padding=1))
    check_steps(model, rng, (3, 14, 13))


def test_float64_batches_between_float32_steps(alone, monkeypatch):
    """A float64 batch does not run the plan: the compiled model fails as the eager one does (its
    float32 weights), and the float32 steps around it still match."""
    monkeypatch.setattr(cpu_plan, "MAX_CHUNK", 3)
    rng = np.random.default_rng(24)
    model = mixed_model(rng)
    compiled = gpuconv.compile(model)
    for dtype in (np.float32, np.float64, np.float32):
        x = (rng.standard_normal((7, 3, 8, 8)) + 2).astype(dtype)
        if dtype == np.float64:
            with pytest.raises(DTypeError) as eager:
                model(x)
            with pytest.raises(DTypeError) as fast:
                compiled(x)
            assert str(fast.value) == str(eager.value)
            continue
        check(model, x, output_like(model, x, rng), compiled)


def random_chain(r, rng, c, hw, depth, branches=True):
    """A random chain of lowerable layers on [c, hw, hw] -> (layers, channels, size)."""
    layers = []
    for _ in range(r.randint(1, depth)):
        kind = r.choice(["conv"] * 4 + ["relu"] * 2 + ["tanh", "pool", "concat", "residual", "identity"])
        if kind == "conv":
            k = r.choice([1, 2, 3, 3, 5])
            style = r.choice(["pad", "none", "stride", "dilation", "same"])
            kwargs = {"pad": dict(padding=r.randint(0, k)), "none": {}, "stride": dict(stride=2, padding=k // 2),
                      "dilation": dict(dilation=2, padding=k - 1), "same": dict(padding=k // 2)}[style]
            layer = conv(rng, c, r.randint(1, 6), k, bias=r.random() < 0.8, **kwargs)
            try:
                with gpuconv.no_grad():
                    shape = layer(np.zeros((1, c, hw, hw), np.float32)).shape
            except Exception:
                continue
            layers.append(layer)
            c, hw = shape[1], shape[2]
        elif kind == "relu":
            layers.append(nn.ReLU())
        elif kind == "tanh":
            layers.append(nn.Tanh())
        elif kind == "identity":
            layers.append(nn.Identity())
        elif kind == "pool" and hw >= 3:
            k = r.choice([2, 3])
            layers.append(r.choice([nn.MaxPool2d, nn.MaxPool2d, nn.AvgPool2d])(k))
            hw //= k
        elif kind == "concat" and branches:
            chains, out = [], 0
            for _ in range(r.randint(1, 3)):
                which = r.choice(["identity", "relu", "convs"])
                if which == "identity":
                    chains.append(nn.Identity())
                    out += c
                elif which == "relu":
                    chains.append(nn.ReLU())
                    out += c
                else:
                    chain, channels = [], c
                    for _ in range(r.randint(1, 3)):
                        k = r.choice([1, 3])
                        chain.append(conv(rng, channels, r.randint(1, 4), k, padding=k // 2))
                        channels = chain[-1].out_channels
                        if r.random() < 0.6:
                            chain.append(nn.ReLU())
                    chains.append(nn.Sequential(*chain))
                    out += channels
            layers.append(nn.Concat(*chains))
            c = out
        elif kind == "residual" and branches:
            body, channels = [], c
            for _ in range(r.randint(1, 2)):
                body += [conv(rng, channels, r.randint(1, 4), 3, padding=1)] + ([nn.ReLU()] if r.random() < 0.6 else [])
                channels = body[-1].out_channels if isinstance(body[-1], nn.Conv2d) else body[-2].out_channels
            if r.random() < 0.3:
                body.append(nn.Concat(nn.Identity(), nn.Sequential(conv(rng, channels, 2, 3, padding=1), nn.ReLU())))
                channels += 2
            body.append(conv(rng, channels, c, 3, padding=1))
            shortcut = None if r.random() < 0.5 else conv(rng, c, c, 1)
            post = r.choice([None, nn.ReLU(), nn.Sequential(nn.ReLU(), conv(rng, c, c, 3, padding=1))])
            layers.append(nn.Residual(nn.Sequential(*body), shortcut, post))
    return layers, c, hw


@pytest.mark.parametrize("seed", range(24))
def test_random_models(monkeypatch, seed):
    r = random.Random(seed)
    rng = np.random.default_rng(seed)
    monkeypatch.setattr(cpu_plan, "processes", False)
    monkeypatch.setattr(cpu_plan, "MIN_CHUNK", 2)
    monkeypatch.setattr(cpu_plan, "MAX_CHUNK", r.choice([2, 3, 5, 128]))
    gpuconv.set_cpu_workers(r.choice([0, 1, 2]))
    try:
        c, hw = r.randint(1, 4), r.randint(6, 10)
        layers, channels, size = random_chain(r, rng, c, hw, 9)
        if not layers:
            layers, channels, size = [conv(rng, c, 2, 3)], 2, hw - 2
        if r.random() < 0.4:
            layers += [nn.Flatten(), nn.Linear(channels * size * size, 4, rng=rng)]
        model = nn.Sequential(*layers)
        compiled = gpuconv.compile(model)
        for batch in (r.randint(1, 13), r.randint(1, 13)):
            x = rng.standard_normal((batch, c, hw, hw)).astype(np.float32) + 2
            check(model, x, output_like(model, x, rng), compiled)
    finally:
        gpuconv.set_cpu_workers(None)
