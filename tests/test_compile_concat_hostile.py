"""HOSTILE TESTS (session 9's hostile tester, branch hostile11) for nn.Concat and its lowering into the CPU executor
(commit 568217f: nn.Concat(*branches, dim=1), cpu_ops.ConcatOp / BranchingOp, cpu_plan._lower_concat,
branches_of, _layer_signature, cpu_workers describe/build).

The rule attacked: a compiled model gives the eager model's results (logits, input gradient, every
p.grad) to float32 rounding, in worker processes and in worker threads, with one worker so that a
batch of >= 48 is split; what it cannot lower runs eagerly with the same results or the same error;
it never hangs, never writes into the caller's arrays (x, the output gradient), never carries state
from one model or one configuration to the next; and nn.Concat itself checks its arguments, names
them in its errors and reports its shapes as its forward computes them.

Tests named test_hostile_* failed on 568217f: each is a finding (its docstring says what went wrong
and where the cause was), all fixed in the commit that merged this file (autograd.concat_axis,
Concat._concat_axis and extra_repr, sequential._flops_and_shape's TypeError, ConcatOp.setup's dim
check). Every other test is a GUARD of a hard case that held on 568217f. Tests
that take the `kind` fixture run once with worker processes and once with worker threads.
"""
import numpy as np
import pytest

import gpuconv
import hostile_child
from gpuconv import nn
from gpuconv.errors import ShapeError
from gpuconv.nn import cpu_plan, cpu_workers
from gpuconv.nn.cpu_ops import ConcatOp
from test_compile_residual_hostile import (assert_close, backward_after_changed_statistics, images, infer_in_threads,
                                          randomize_statistics, rng_of, sgd_through_train_and_eval)
from test_compile_segments import plans_on_tape


# ----------------------------------------------------------------------------------------------
# helpers (rng_of, images and randomize_statistics are the residual blocks' hostile tests')


@pytest.fixture
def kind(worker_kind):
    """conftest.worker_kind: worker processes or worker threads, one worker."""
    return worker_kind


def step(network, model, x, input_grad=True, dy=None):
    """One forward and backward -> (out, dx copy or None, {name: p.grad copy}). The loss is
    (out * out).sum(), or out.backward(dy) with the caller's dy."""
    model.zero_grad()
    xt = gpuconv.tensor(x, requires_grad=input_grad)
    out = network(xt)
    if dy is None:
        (out * out).sum().backward()
    else:
        out.backward(gpuconv.tensor(dy))
    grads = {name: None if p.grad is None else p.grad.copy() for name, p in model.named_parameters()}
    return out, (xt.grad.copy() if input_grad else None), grads


def assert_same_step(eager, compiled, plans=1, grad_floor=0.0):
    """`grad_floor`: the least magnitude a parameter gradient is compared at (a conv bias before a
    BatchNorm that trains has a gradient of 0 plus rounding, which no relative tolerance fits)."""
    (e_out, e_dx, e_grads), (c_out, c_dx, c_grads) = eager, compiled
    if plans is not None:
        assert len(plans_on_tape(c_out)) == plans
    assert_close(c_out.data, e_out.data, what="logits")
    if e_dx is not None:
        assert_close(c_dx, e_dx, what="input gradient")
    assert list(c_grads) == list(e_grads)
    for name, want in e_grads.items():
        assert (c_grads[name] is None) == (want is None), name
        if want is not None:
            assert_close(c_grads[name], want, what=name, floor=grad_floor)


def check(make, x, plans=1, input_grad=True):
    """make() twice (same seeds): one copy run eagerly, the other compiled; the same step."""
    eager_model, fast_model = make(), make()
    fast = gpuconv.compile(fast_model)
    assert_same_step(step(eager_model, eager_model, x, input_grad), step(fast, fast_model, x, input_grad), plans)
    return fast


def conv(cin, cout, k, rng, **kw):
    return nn.Conv2d(cin, cout, k, padding=k // 2, rng=rng, **kw)


def conv_relu_pool(cin, cout, rng):
    """Fused into one ConvOp by the lowering (it may mask its output gradient in place)."""
    return nn.Sequential(conv(cin, cout, 3, rng), nn.ReLU(), nn.MaxPool2d(2))


# ----------------------------------------------------------------------------------------------
# FINDINGS (fail on 568217f)


@pytest.mark.parametrize("dim", [4, -5, 7])
def test_hostile_a_dim_beyond_the_input_rank_is_refused_naming_dim(dim):
    """FOUND: nn.Concat(a, b, dim=4) on an NCHW batch silently concatenates along the BATCH (dim 4 %
    4 = 0: two identity branches on 2 images give 4 images), dim=-5 along the width, dim=7 along
    the width, where PyTorch's cat raises IndexError "Dimension out of range". Nothing checks dim
    against the rank: nn.Concat.__init__ checks only its type, gpuconv.cat wraps it
    (`Cat(dim % ndim)`, gpuconv/autograd.py:555) and Concat._branch_shapes wraps it the same way
    (`self.dim % len(shapes[0])`, gpuconv/nn/sequential.py), so output_shape() agrees with the
    wrong forward. The error should name dim and the rank."""
    x = images(0, (2, 3, 4, 4))
    block = nn.Concat(nn.Identity(), nn.Identity(), dim=dim)
    with pytest.raises((IndexError, ValueError)) as forward_error:
        block(x)
    assert "dim" in str(forward_error.value)
    with pytest.raises((IndexError, ValueError)) as shape_error:
        block.output_shape(x.shape)
    assert "dim" in str(shape_error.value)


def test_hostile_branches_that_disagree_raise_a_shape_error_naming_the_concat():
    """FOUND (the message): branches whose outputs differ beyond `dim` make the forward raise NumPy's
    bare ValueError "all the input array dimensions except for the concatenation axis must match
    exactly, but along dimension 2, the array at index 0 has size 6 and the array at index 1 has
    size 8", naming neither the Concat nor the branch (nor gpuconv's ShapeError, which every
    shape problem raises: gpuconv/errors.py). Concat.output_shape has the right message ("Concat:
    branch 1 gives shape ..., branch 0 ...: expected them equal but for dim 1",
    Concat._branch_shapes) but Concat.forward goes straight to gpuconv.cat -> np.concatenate
    (gpuconv/autograd.py Cat.forward) without it; the compiled model, which runs it eagerly, raises
    the same."""
    rng = rng_of(0)
    block = nn.Concat(nn.Conv2d(2, 3, 3, rng=rng), nn.Identity())
    x = images(1, (64, 2, 8, 8))
    for network in (block, gpuconv.compile(nn.Sequential(block))):
        with pytest.raises(ShapeError) as error:
            network(x)
        assert "Concat" in str(error.value) and "branch 1" in str(error.value), str(error.value)


def test_hostile_uses_executor_answers_for_a_concat_holding_a_python_module():
    """FOUND: compiled.uses_executor(x) raises AttributeError ("'Double' object has no attribute
    'output_shape'") for a model whose first step is an nn.Concat holding a module with a forward
    of its own (it runs eagerly) before a conv -> ReLU -> pool that runs as a plan; the same module
    alone as the first step gives True. compiler._output_shape asks hasattr(layer, "output_shape")
    of the Concat only and catches ValueError/TypeError/IndexError, while Concat.output_shape ->
    _branch_shapes -> sequential._flops_and_shape calls branch.output_shape unguarded. (nn.Residual
    holding such a module has the same problem since bf3a9b0.) The forward itself runs the plan."""
    class Double(nn.Module):
        def forward(self, x):
            return x * 2

    rng = rng_of(0)
    x = images(1, (64, 2, 8, 8))
    for first, channels in ((Double(), 2), (nn.Concat(Double(), nn.Identity()), 4)):
        model = nn.Sequential(first, nn.Conv2d(channels, 3, 3, padding=1, rng=rng), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Flatten(), nn.Linear(3 * 4 * 4, 3, rng=rng))
        compiled = gpuconv.compile(model)
        assert len(plans_on_tape(compiled(x))) == 1
        assert compiled.uses_executor(x) is True


@pytest.mark.parametrize("layout", ["NCHW dim=-3", "flat dim=-1"])
def test_hostile_a_negative_dim_naming_the_channels_lowers(layout):
    """FOUND (performance, and a reason that contradicts itself): nn.Concat(..., dim=-3) on an NCHW
    batch IS the channel concatenation (eager: cat's dim % 4 == 1), and dim=-1 after a Flatten is
    the feature concatenation, but the whole block runs eagerly and `unsupported` says "Concat:
    Concat along dim -3 (the executor concatenates channels: dim=1)". cpu_plan._lower_concat
    compares `layer.dim != 1` before any shape is known; ConcatOp.setup, which knows the input's
    rank, could take any dim with dim % (rank + 1) == 1. (Results are right: guarded below.)"""
    rng = rng_of(0)
    if layout == "NCHW dim=-3":
        block = nn.Concat(conv_relu_pool(4, 3, rng), nn.MaxPool2d(2), dim=-3)
        model = nn.Sequential(conv(2, 4, 3, rng), block, nn.Flatten(), nn.Linear(7 * 4 * 4, 3, rng=rng))
    else:
        block = nn.Concat(nn.Identity(), nn.Linear(3 * 4 * 4, 4, rng=rng), dim=-1)
        model = nn.Sequential(conv(2, 3, 3, rng), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), block,
                              nn.Linear(3 * 4 * 4 + 4, 3, rng=rng))
    compiled = gpuconv.compile(model)
    assert compiled.unsupported is None, compiled.unsupported


def test_hostile_concat_repr_shows_its_dim():
    """FOUND (cosmetic): repr(nn.Concat(a, b, dim=2)) is the same text as repr(nn.Concat(a, b)):
    Concat has no extra_repr, so printing a model hides which axis a block concatenates along (the
    one setting that changes its output, and whether the executor can lower it); Conv2d, pools and
    Flatten show theirs."""
    a, b = nn.Identity(), nn.Identity()
    assert repr(nn.Concat(a, b, dim=2)) != repr(nn.Concat(a, b, dim=1))
    assert "dim=2" in repr(nn.Concat(a, b, dim=2))


# ----------------------------------------------------------------------------------------------
# GUARDS (hold on 568217f): structures compiled vs eager


def shared_conv_model(seed=0):
    """One Conv2d object as three branches (alone, in a Sequential with a ReLU, alone again)."""
    rng = rng_of(seed)
    shared = conv(4, 4, 3, rng)
    return nn.Sequential(conv(2, 4, 3, rng), nn.Concat(shared, nn.Sequential(shared, nn.ReLU()), shared), nn.Tanh(),
                         nn.Flatten(), nn.Linear(12 * 8 * 8, 3, rng=rng))


def branch_twice_model(seed=0):
    """One Sequential (a fused conv -> ReLU -> pool) as both branches."""
    rng = rng_of(seed)
    branch = conv_relu_pool(4, 4, rng)
    return nn.Sequential(conv(2, 4, 3, rng), nn.Concat(branch, branch), nn.Flatten(), nn.Linear(8 * 4 * 4, 3, rng=rng))


def concat_twice_model(seed=0):
    """One nn.Concat instance as two steps, an in-place ReLU on its buffer between."""
    rng = rng_of(seed)
    block = nn.Concat(conv(4, 2, 3, rng), conv(4, 2, 1, rng))
    return nn.Sequential(conv(2, 4, 3, rng), block, nn.ReLU(), block, nn.Flatten(), nn.Linear(4 * 8 * 8, 3, rng=rng))


def one_branch_model(seed=0):
    rng = rng_of(seed)
    return nn.Sequential(conv(2, 4, 3, rng), nn.Concat(conv_relu_pool(4, 4, rng)), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3, rng=rng))


def identity_branches_model(seed=0):
    """Branches without ops: nn.Identity, an empty Sequential, a Dropout in eval; then ReLU in place."""
    rng = rng_of(seed)
    return nn.Sequential(conv(2, 4, 3, rng), nn.Concat(nn.Identity(), nn.Sequential(), nn.Dropout(0.5).eval()),
                         nn.ReLU(), nn.Flatten(), nn.Linear(12 * 8 * 8, 3, rng=rng))


def concat_first_model(seed=0):
    """The Concat reads the caller's x (a transposed view of it) with an identity branch."""
    rng = rng_of(seed)
    return nn.Sequential(nn.Concat(nn.Identity(), conv(2, 3, 3, rng), nn.Sequential(conv(2, 2, 3, rng), nn.ReLU())),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(7 * 4 * 4, 3, rng=rng))


def nested_model(seed=0):
    """A Concat as a branch of a Concat twice (the same instance, once inside a Sequential), and a
    one-branch Concat."""
    rng = rng_of(seed)
    inner = nn.Concat(nn.Identity(), nn.Sequential(conv(4, 2, 3, rng), nn.ReLU()))
    outer = nn.Concat(inner, nn.Sequential(inner, conv(6, 3, 1, rng)),
                      nn.Sequential(nn.Concat(conv(4, 1, 1, rng)), nn.Tanh()))
    return nn.Sequential(conv(2, 4, 3, rng), outer, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(10 * 4 * 4, 3, rng=rng))


def batchnorm_model(seed=0):
    """BatchNorms in eval: at a branch's end, alone, before a ReLU, and one object in three branches."""
    rng = rng_of(seed)
    shared = nn.BatchNorm2d(4)
    block = nn.Concat(nn.Sequential(conv(4, 4, 3, rng), shared), shared, nn.Sequential(nn.BatchNorm2d(4), nn.ReLU()),
                      nn.Sequential(shared, nn.Sigmoid()))
    model = nn.Sequential(conv(2, 4, 3, rng), block, nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 3, rng=rng))
    return randomize_statistics(model, seed + 1).eval()


def residual_concat_model(seed=0):
    """Residual in a Concat in a Residual (the outer's body ends in a 1x1 conv), a Residual whose
    activation is a Concat, and a Residual whose shortcut is a Concat with a fused conv-pool."""
    rng = rng_of(seed)
    inner = nn.Residual(nn.Sequential(conv(4, 4, 3, rng), nn.ReLU()), activation=nn.ReLU())
    outer = nn.Residual(nn.Sequential(nn.Concat(inner, conv(4, 4, 1, rng)), conv(8, 4, 1, rng)), nn.Sequential(),
                        nn.Sequential(nn.Tanh()))
    widen = nn.Residual(conv(4, 4, 3, rng), activation=nn.Concat(nn.ReLU(), nn.Tanh()))
    short = nn.Residual(nn.Sequential(conv(8, 10, 3, rng), nn.MaxPool2d(2)),
                        nn.Concat(nn.MaxPool2d(2), nn.Sequential(conv(8, 2, 3, rng), nn.ReLU(), nn.MaxPool2d(2))),
                        nn.ReLU())
    return nn.Sequential(conv(2, 4, 3, rng), outer, widen, short, nn.Flatten(), nn.Linear(10 * 4 * 4, 3, rng=rng))


def residual_of_concat_model(seed=0):
    """A Residual whose body is only a Concat (the sum goes into the Concat's own buffer)."""
    rng = rng_of(seed)
    block = nn.Residual(nn.Concat(nn.Identity(), nn.Sequential(conv(4, 2, 3, rng), nn.Tanh())),
                        conv(4, 6, 1, rng), nn.ReLU())
    return nn.Sequential(conv(2, 4, 3, rng), block, nn.Flatten(), nn.Linear(6 * 8 * 8, 3, rng=rng))


def pools_model(seed=0):
    """Pools as branches (max, avg, after a ReLU, a strided conv), then a global average pool;
    and global average pools as branches."""
    rng = rng_of(seed)
    pools = nn.Concat(nn.MaxPool2d(2), nn.AvgPool2d(2), nn.Sequential(nn.ReLU(), nn.MaxPool2d(2)),
                      nn.Conv2d(4, 2, 2, stride=2, rng=rng))
    gap = nn.Concat(nn.AdaptiveAvgPool2d(1), nn.Sequential(nn.Conv2d(14, 2, 3, rng=rng), nn.AdaptiveAvgPool2d(1)))
    return nn.Sequential(conv(2, 4, 3, rng), pools, gap, nn.Flatten(), nn.Linear(16, 3, rng=rng))


def odd_sizes_model(seed=0):
    """A 9x9 input: pools drop the last row and column, a strided conv without padding agrees."""
    rng = rng_of(seed)
    block = nn.Concat(conv_relu_pool(4, 3, rng), nn.MaxPool2d(2),
                      nn.Sequential(nn.Conv2d(4, 2, 3, stride=2, rng=rng), nn.Sigmoid()))
    return nn.Sequential(conv(1, 4, 3, rng), block, nn.Flatten(), nn.Linear(9 * 4 * 4, 3, rng=rng))


def dense_model(seed=0):
    """Concat right after Flatten (identity, Linear, Linear -> Sigmoid), and Flatten inside branches."""
    rng = rng_of(seed)
    flat = nn.Concat(nn.Flatten(), nn.Sequential(conv(3, 2, 3, rng), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()))
    heads = nn.Concat(nn.Identity(), nn.Linear(224, 5, rng=rng), nn.Sequential(nn.Linear(224, 4, rng=rng),
                                                                               nn.Sigmoid()))
    return nn.Sequential(conv(2, 3, 3, rng), flat, nn.Flatten(), heads, nn.ReLU(), nn.Linear(233, 3, rng=rng))


def concat_last_model(seed=0):
    """The Concat is the plan's last op, every branch ending in a fused conv -> ReLU -> pool or a pool:
    the gradient the branches get is the caller's."""
    rng = rng_of(seed)
    return nn.Sequential(conv(2, 4, 3, rng), nn.Concat(conv_relu_pool(4, 3, rng), conv_relu_pool(4, 2, rng),
                                                       nn.MaxPool2d(2), nn.AvgPool2d(2)))


def top_level_concat_model(seed=0):
    """The model is the Concat (no Sequential around it)."""
    rng = rng_of(seed)
    return nn.Concat(conv_relu_pool(2, 3, rng), nn.Sequential(conv(2, 3, 3, rng), nn.Tanh(), nn.MaxPool2d(2)),
                     nn.MaxPool2d(2))


def strided_dilated_model(seed=0):
    """Dilated, 'same'-padded, strided and bias-free convs in branches (the shared column buffer of
    a thread, the input gradient by columns), nested Sequentials, and a dense Concat with a
    bias-free Linear beside the identity."""
    rng = rng_of(seed)
    first = nn.Concat(nn.Conv2d(4, 3, 3, padding=2, dilation=2, rng=rng), nn.Conv2d(4, 2, 3, padding="same", rng=rng),
                      nn.Sequential(nn.Sequential(nn.Conv2d(4, 2, 5, padding=2, rng=rng)), nn.Sequential(nn.Tanh())))
    second = nn.Concat(nn.Conv2d(7, 3, 3, stride=2, padding=1, rng=rng),
                       nn.Sequential(nn.Conv2d(7, 2, 3, stride=2, padding=1, bias=False, rng=rng), nn.ReLU()),
                       nn.Sequential(nn.Conv2d(7, 2, 3, padding=2, dilation=2, rng=rng), nn.ReLU(), nn.MaxPool2d(2)))
    return nn.Sequential(conv(2, 4, 3, rng), first, nn.ReLU(), second, nn.Flatten(),
                         nn.Concat(nn.Linear(7 * 4 * 4, 3, bias=False, rng=rng), nn.Identity()),
                         nn.Linear(3 + 7 * 4 * 4, 3, rng=rng))


STRUCTURES = {
    "shared-conv": (shared_conv_model, (2, 8, 8)),
    "branch-twice": (branch_twice_model, (2, 8, 8)),
    "concat-twice": (concat_twice_model, (2, 8, 8)),
    "one-branch": (one_branch_model, (2, 8, 8)),
    "identity-branches": (identity_branches_model, (2, 8, 8)),
    "concat-first": (concat_first_model, (2, 8, 8)),
    "nested": (nested_model, (2, 8, 8)),
    "batchnorm": (batchnorm_model, (2, 8, 8)),
    "residual-concat": (residual_concat_model, (2, 8, 8)),
    "residual-of-concat": (residual_of_concat_model, (2, 8, 8)),
    "pools": (pools_model, (2, 8, 8)),
    "odd-sizes": (odd_sizes_model, (1, 9, 9)),
    "dense": (dense_model, (2, 8, 8)),
    "concat-last": (concat_last_model, (2, 8, 8)),
    "top-level": (top_level_concat_model, (2, 8, 8)),
    "strided-dilated": (strided_dilated_model, (2, 8, 8)),
}


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_concat_structures_match_eager(kind, name):
    """GUARD: each structure, whole model one plan, batch 64 split in two parts: logits, input
    gradient and every p.grad as eager's."""
    make, shape = STRUCTURES[name]
    compiled = check(make, images(1, (64,) + shape))
    assert compiled.unsupported is None


@pytest.mark.parametrize("name", ["concat-first", "concat-last", "dense"])
def test_caller_arrays_are_left_alone_with_and_without_an_input_gradient(kind, name):
    """GUARD: the caller's x and output gradient keep their values (a branch's fused conv-pool
    masks its gradient in place only in the plan's own buffers); the results match eager's with
    and without x.requires_grad."""
    make, shape = STRUCTURES[name]
    x = images(2, (64,) + shape)
    kept_x = x.copy()
    eager_model, fast_model = make(), make()
    fast = gpuconv.compile(fast_model)
    for input_grad in (True, False):
        dy = images(3, eager_model(x).shape)
        kept_dy = dy.copy()
        eager = step(eager_model, eager_model, x, input_grad, dy)
        compiled = step(fast, fast_model, x, input_grad, dy)
        np.testing.assert_array_equal(dy, kept_dy)
        np.testing.assert_array_equal(x, kept_x)
        assert_same_step(eager, compiled, plans=1)


def inception(seed=0):
    rng = rng_of(seed)
    block = nn.Concat(conv(6, 4, 1, rng), nn.Sequential(conv(6, 3, 1, rng), nn.ReLU(), conv(3, 5, 3, rng)),
                      nn.Sequential(conv(6, 2, 5, rng, bias=False), nn.BatchNorm2d(2)), nn.Identity())
    model = nn.Sequential(conv(2, 6, 3, rng), nn.ReLU(), nn.MaxPool2d(2), block, nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(17 * 2 * 2, 5, rng=rng))
    return randomize_statistics(model, seed + 1).eval()


@pytest.mark.parametrize("batch", [1, 49, 50, 97, 300])
def test_batch_sizes_that_split_unevenly_and_chunk(kind, batch):
    """GUARD: 49/50/97 split unevenly over the two parts, 300 makes two chunks per part (MAX_CHUNK)."""
    check(inception, images(batch, (batch, 2, 8, 8)))


def test_float64_model_runs_eagerly_with_its_results(kind):
    """GUARD: a float64 model and batch run eagerly (no plan), with the eager model's results."""
    def make():
        rng, f64 = rng_of(0), np.float64
        block = nn.Concat(nn.Sequential(conv(4, 3, 3, rng, dtype=f64), nn.ReLU(), nn.MaxPool2d(2)), nn.MaxPool2d(2),
                          nn.AvgPool2d(2))
        return nn.Sequential(conv(2, 4, 3, rng, dtype=f64), block, nn.Flatten(), nn.Linear(11 * 4 * 4, 3, rng=rng,
                                                                                               dtype=f64))
    check(make, images(0, (64, 2, 8, 8)).astype(np.float64), plans=0)


# ----------------------------------------------------------------------------------------------
# GUARDS: changes after compile, between forward and backward, between steps


def changing_model(seed=0):
    """A Concat (step 3) with BatchNorms in eval, a Residual holding a Concat, a seeded Dropout."""
    rng = rng_of(seed)
    inner = nn.Concat(nn.Sequential(conv(4, 2, 3, rng), nn.BatchNorm2d(2)), nn.BatchNorm2d(4))
    block = nn.Concat(nn.Sequential(conv(4, 3, 3, rng), nn.BatchNorm2d(3), nn.ReLU()),
                      nn.Residual(nn.Sequential(inner, conv(6, 4, 1, rng), nn.BatchNorm2d(4)), activation=nn.ReLU()),
                      nn.Dropout(0.5, seed=3))
    model = nn.Sequential(conv(1, 4, 3, rng), nn.ReLU(), nn.MaxPool2d(2), block, nn.ReLU(), nn.Flatten(),
                          nn.Linear(11 * 8 * 8, 5, rng=rng))
    return randomize_statistics(model, seed + 1).eval()


CHANGES = {
    "branch replaced": lambda m, rng: setattr(m[3], "2", nn.Sequential(conv(4, 4, 1, rng), nn.Tanh())),
    "conv in a branch replaced": lambda m, rng: setattr(m[3][0], "0", conv(4, 3, 1, rng)),
    "activation in a branch replaced": lambda m, rng: setattr(m[3][0], "2", nn.Tanh()),
    "branch appended": lambda m, rng: (m[3].append(nn.Sequential(conv(4, 2, 1, rng), nn.Sigmoid())),
                                       setattr(m, "6", nn.Linear(13 * 8 * 8, 5, rng=rng))),
    "nested Concat appended to": lambda m, rng: (m[3][1].body[0].append(nn.Identity()),
                                                 setattr(m[3][1].body, "1", conv(10, 4, 1, rng))),
    "weight Parameter replaced": lambda m, rng: setattr(m[3][0][0], "weight",
                                                        nn.Parameter(m[3][0][0].weight.data * 2)),
    "dim set to 2": lambda m, rng: (setattr(m[3], "dim", 2), setattr(m[3], "0", conv(4, 4, 1, rng)),
                                    setattr(m, "6", nn.Linear(4 * 24 * 8, 5, rng=rng))),
    "BatchNorm put in training": lambda m, rng: m[3][0][1].train(),
    "Dropout put in training": lambda m, rng: m[3][2].train(),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_concat_changed_after_compile_runs_as_changed(kind, change):
    """GUARD: a step, a change inside the Concat, a step: the compiled model recompiles (or runs the
    Concat eagerly: BatchNorm or Dropout in training, dim 2) and follows eager."""
    eager_model, fast_model = changing_model(), changing_model()
    fast = gpuconv.compile(fast_model)
    x = images(1, (64, 1, 16, 16))
    step(fast, fast_model, x)
    for model in (eager_model, fast_model):
        CHANGES[change](model, rng_of(9))
    # the fused conv-pool before the Concat keeps a plan when the Concat runs eagerly
    eager = step(eager_model, eager_model, x)
    floor = 1e-2 * max(np.abs(g).max() for g in eager[2].values()) if change == "BatchNorm put in training" else 0.0
    assert_same_step(eager, step(fast, fast_model, x), plans=1, grad_floor=floor)
    lowered = change not in ("Dropout put in training", "dim set to 2")  # a BatchNorm that trains lowers too
    assert (fast.unsupported is None) == lowered, fast.unsupported


@pytest.mark.parametrize("change", ["load_state_dict", "in place", "new arrays", "a training step"])
def test_backward_after_another_forward_and_new_statistics(kind, change):
    """GUARD: forward x1, forward x2 (another batch size), the running statistics change, then x1's
    backward: the plan recomputes x1's forward with the statistics it read (BranchingOp.override
    through a Concat, a Residual and a Concat inside it)."""
    eager, compiled = backward_after_changed_statistics(changing_model, change)
    assert_same_step(eager[:3], compiled[:3], plans=1)


def test_switching_train_and_eval_between_sgd_steps(kind):
    """GUARD: training steps (the Concat eagerly: batch statistics, Dropout masks), eval steps (one
    plan), SGD with momentum: parameters and running statistics follow the eager model's."""
    sgd_through_train_and_eval([changing_model(), changing_model()], (64, 1, 16, 16),
                               lambda network, out, mode: (network.unsupported is None) == (mode == "eval"))


def test_two_compiled_models_sharing_one_concat_keep_their_own_state(kind):
    """GUARD: one nn.Concat instance inside two models of different widths around it, compiled
    apart and run alternately (their plans and worker arenas apart): each gives its eager results."""
    def pair(seed):
        rng = rng_of(seed)
        shared = nn.Concat(conv_relu_pool(4, 3, rng), nn.MaxPool2d(2))
        first = nn.Sequential(conv(2, 4, 3, rng), shared, nn.Flatten(), nn.Linear(7 * 4 * 4, 3, rng=rng))
        second = nn.Sequential(conv(1, 4, 5, rng), nn.Tanh(), shared, nn.Flatten(), nn.Linear(7 * 4 * 4, 4, rng=rng))
        return first, second
    eager, fast = pair(0), pair(0)
    compiled = [gpuconv.compile(model) for model in fast]
    inputs = [images(5, (64, 2, 8, 8)), images(6, (50, 1, 8, 8))]
    for _ in range(2):
        for which in (0, 1):
            assert_same_step(step(eager[which], eager[which], inputs[which]),
                             step(compiled[which], fast[which], inputs[which]))


def test_a_concat_between_eager_layers_gets_a_plan_of_its_own(kind):
    """GUARD: a Concat holding a fused conv-pool, after an eager LeakyReLU, is worth a plan
    (fused_conv_pools counts inside BranchingOps); a Concat without one beside it runs eagerly."""
    def make():
        rng = rng_of(0)
        block = nn.Concat(conv_relu_pool(4, 3, rng), nn.MaxPool2d(2), nn.AvgPool2d(2))
        return nn.Sequential(conv(2, 4, 3, rng), nn.LeakyReLU(), block, nn.Flatten(), nn.Linear(11 * 4 * 4, 3, rng=rng),
                             nn.LeakyReLU(), nn.Concat(nn.Identity(), nn.Linear(3, 2, rng=rng)))
    compiled = check(make, images(1, (64, 2, 8, 8)))
    text = compiled.unsupported
    assert "steps 2-4" not in text and "steps 6" not in text, text
    assert "step 6 (Concat) eagerly: no conv fused with a pool" in text, text


def test_negative_dims_give_the_eager_results(kind):
    """GUARD for the finding above: dim=-3 (NCHW) and dim=-1 (flat) run eagerly with eager's results."""
    def make():
        rng = rng_of(0)
        return nn.Sequential(conv(2, 4, 3, rng), nn.Concat(conv_relu_pool(4, 3, rng), nn.MaxPool2d(2), dim=-3),
                             nn.Flatten(), nn.Concat(nn.Identity(), nn.Linear(7 * 16, 4, rng=rng), dim=-1),
                             nn.Linear(7 * 16 + 4, 3, rng=rng))
    check(make, images(1, (64, 2, 8, 8)), plans=None)


# ----------------------------------------------------------------------------------------------
# GUARDS: the module


def test_concat_module_state_dict_summary_slicing_and_append():
    """GUARD: state_dict keys and a round trip into a compiled model; summary() and output_shape /
    flops agree with the forward; a slice is a Concat with the same dim; append adds a branch the
    compiled model then runs."""
    def make(seed):
        rng = rng_of(seed)
        block = nn.Concat(conv(2, 3, 3, rng), nn.Sequential(conv(2, 2, 1, rng), nn.BatchNorm2d(2), nn.ReLU()),
                          nn.Identity())
        return randomize_statistics(nn.Sequential(conv(2, 2, 3, rng), block, nn.Flatten(),
                                                  nn.Linear(7 * 6 * 6, 3, rng=rng)), seed).eval()
    source, target = make(0), make(1)
    assert [k for k in source.state_dict() if k.startswith("1.")] == [
        "1.0.weight", "1.0.bias", "1.1.0.weight", "1.1.0.bias", "1.1.1.weight", "1.1.1.bias",
        "1.1.1.running_mean", "1.1.1.running_var", "1.1.1.num_batches_tracked"]
    compiled = gpuconv.compile(target)
    x = images(0, (64, 2, 6, 6))
    compiled(x)
    target.load_state_dict(source.state_dict())
    assert_close(compiled(x).data, source(x).data, what="after load_state_dict")
    block = source[1]
    table = source.summary((1, 2, 6, 6), print_fn=None)
    assert table["layers"][1]["output_shape"] == (1, 7, 6, 6) == (1,) + block(x[:1]).shape[1:]
    assert table["layers"][1]["params"] == sum(p.size for p in block.parameters())
    assert block.flops((1, 2, 6, 6), (1, 7, 6, 6)) == sum(
        nn.Sequential(branch).layer_table((1, 2, 6, 6))[0][4] if not isinstance(branch, nn.Sequential)
        else sum(row[4] for row in branch.layer_table((1, 2, 6, 6))) for branch in block)
    part = block[1:]
    assert isinstance(part, nn.Concat) and part.dim == block.dim and len(part) == 2
    assert nn.Concat(nn.Identity(), dim=2)[0:].dim == 2
    rng = rng_of(3)
    block.append(conv(2, 1, 3, rng))
    setattr(source, "3", nn.Linear(8 * 6 * 6, 3, rng=rng))
    fast = gpuconv.compile(source)
    assert_same_step(step(source, source, x), step(fast, source, x))


def test_concat_module_argument_errors_name_the_argument():
    """GUARD: bad arguments raise TypeError naming the argument: no branches, a non-module branch (a
    list of branches passed as one), a bool or float dim, appending a non-module."""
    with pytest.raises(TypeError, match="at least one branch"):
        nn.Concat(dim=1)
    with pytest.raises(TypeError, match="branch 0 must be a gpuconv.nn.Module, got list"):
        nn.Concat([nn.Identity(), nn.Identity()])
    for dim in (True, 1.0, None):
        with pytest.raises(TypeError, match="dim must be an int"):
            nn.Concat(nn.Identity(), dim=dim)
    with pytest.raises(TypeError, match="entry 1 must be a gpuconv.nn.Module, got int"):
        nn.Concat(nn.Identity()).append(3)


def test_worker_description_of_nested_concats_round_trips():
    """GUARD: describe/build of a Concat holding a Residual holding a Concat, an empty branch and a
    Dropout in eval: the rebuilt block lowers to the same op kinds and the same parameters."""
    rng = rng_of(4)
    block = nn.Concat(nn.Residual(nn.Sequential(nn.Concat(conv(3, 2, 3, rng), nn.Identity()), conv(5, 3, 1, rng))),
                      nn.Sequential(), nn.Sequential(nn.Dropout(0.2), conv(3, 2, 1, rng)), dim=1)
    block.train()
    block[2][0].eval()
    params = block.parameters()
    spec = cpu_workers.describe(block, {id(p): i for i, p in enumerate(params)})
    rebuilt = cpu_workers.build(spec, params)
    assert rebuilt.training and not rebuilt[2][0].training
    plans = [cpu_plan._Plan(), cpu_plan._Plan()]
    x = np.empty((1, 3, 6, 6), np.float32)
    assert plans[0].prepare([block], x) and plans[1].prepare([rebuilt], x)

    def kinds(op):
        if isinstance(op, ConcatOp) or hasattr(op, "chains"):
            return (type(op).__name__, [[kinds(inner) for inner in chain] for _, chain in op.chains()])
        return type(op).__name__
    assert kinds(plans[0].ops[0]) == kinds(plans[1].ops[0])
    assert [id(p) for p in plans[1].params()] == [id(p) for p in plans[0].params()]


# ----------------------------------------------------------------------------------------------
# GUARDS: a worker process killed, two threads on one compiled model


PRELUDE = r'''
import faulthandler, json, os, signal, sys, time
faulthandler.dump_traceback_later(float(os.environ["HOSTILE_HANG_S"]), exit=True)
import numpy as np
import gpuconv
from gpuconv import nn
from gpuconv.nn import cpu_plan, cpu_workers
cpu_plan.processes = True
def make():
    rng = np.random.default_rng(0)
    c = lambda i, o, k: nn.Conv2d(i, o, k, padding=k // 2, rng=rng)
    block = nn.Concat(nn.Sequential(c(4, 3, 3), nn.ReLU(), nn.MaxPool2d(2)), nn.MaxPool2d(2),
                      nn.Sequential(c(4, 2, 1), nn.Tanh(), nn.AvgPool2d(2)))
    return nn.Sequential(c(1, 4, 3), block, nn.ReLU(), nn.Flatten(), nn.Linear(9 * 8 * 8, 5, rng=rng))
def grads(network, model, x):
    model.zero_grad()
    y = network(gpuconv.tensor(x))
    (y * y).sum().backward()
    return [p.grad.copy() for p in model.parameters()]
'''


@pytest.mark.skipif(not cpu_workers.supported(), reason="no worker processes on this platform")
@pytest.mark.parametrize("when", ["between forward and backward", "before the forward"])
def test_a_worker_killed_around_a_concat_step(tmp_path, when):
    """GUARD: SIGKILL to the idle worker after a compiled Concat model's forward (the backward raises
    WorkerError naming the death, no p.grad left) or before a forward (that forward raises or starts a
    new worker); the next step matches the eager model. In a child process with a hard timeout."""
    r = hostile_child.run_child(tmp_path, PRELUDE, r'''
    eager, model = make(), make()
    net = gpuconv.compile(model)
    x = np.random.default_rng(0).standard_normal((128, 1, 16, 16)).astype(np.float32)
    grads(net, model, x)
    old = cpu_workers._pool.processes[0].process.pid
    model.zero_grad()
    out = {"caught": None}
    try:
        if os.environ["WHEN"] == "before the forward":
            os.kill(old, signal.SIGKILL)
            time.sleep(0.2)
        y = net(gpuconv.tensor(x))
        if os.environ["WHEN"] != "before the forward":
            os.kill(old, signal.SIGKILL)
            time.sleep(0.2)
        (y * y).sum().backward()
    except Exception as error:
        out["caught"] = [type(error).__name__, str(error)]
    out["partial"] = any(p.grad is not None for p in model.parameters())
    got, want = grads(net, model, x), grads(eager, eager, x)
    out["next"] = all(np.allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max()) for a, b in zip(got, want))
    out["new_worker"] = cpu_workers._pool.processes[0].process.pid != old
    print("RESULT " + json.dumps(out))
    ''', 60, "killed_worker_concat", WHEN=when)
    if when == "between forward and backward":
        assert r["caught"] is not None and r["caught"][0] == "WorkerError" and "died" in r["caught"][1], r["caught"]
        assert not r["partial"]
    else:
        assert r["caught"] is None or r["caught"][0] == "WorkerError", r["caught"]
    assert r["next"] and r["new_worker"]


def test_two_threads_running_one_compiled_concat_model(kind):
    """GUARD: two threads running inference through one compiled Inception-like model (one plan,
    its lock): no error, no hang, each its own eager logits."""
    model = inception()
    batches = {i: images(20 + i, (64 + 33 * i, 2, 8, 8)) for i in range(2)}
    infer_in_threads(gpuconv.compile(model), batches, {i: model(x).data for i, x in batches.items()}, rounds=8)