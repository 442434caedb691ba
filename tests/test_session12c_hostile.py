"""Hostile tests, third round, of b0469e3 (errstate reports deferred by a compiled forward,
run_alone noting its op's errors, deferral bound to the report-scope depth, feature_maps' lock).

test_BUG_* fail on 2e8368e (one bug each, see the docstrings; all fixed in the commit that brought
this file to main: the plan's reports go to a list its PlanFunction.forward reports last, after the
statistics and the node's token, instead of a thread's deferral; feature_maps' lock re-entrant);
the others are regression tests that hold. tests/test_session12_hostile.py, tests/test_session12b_hostile.py and
tests/test_fp_errors_in_parts.py are not repeated."""
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

import gpuconv
from gpuconv import functional as F
from gpuconv import nn
from gpuconv.autograd import Tensor
from gpuconv.nn import cpu_plan

ROOT = str(Path(__file__).resolve().parents[1])


@pytest.fixture
def threads_only(monkeypatch):
    monkeypatch.setattr(cpu_plan, "processes", False)
    yield
    gpuconv.set_cpu_workers(None)


def run_script(code, timeout=60):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def bn_conv_model():
    """BatchNorm2d (training) -> Conv2d -> ReLU -> MaxPool2d -> Flatten -> Linear: one plan, whose
    Linear underflows (conv outputs ~1e-15 times weights 1e-30), output finite (the bias)."""
    m = nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                      nn.Linear(4 * 13 * 13, 3))
    m.train()
    m[1].weight.data[...] = 1e-15
    m[5].weight.data[...] = 1e-30
    return m


def batch(seed=0, n=8):
    return np.random.default_rng(seed).random((n, 1, 28, 28), dtype=np.float32)


def conv_model():
    """Conv2d -> ReLU -> MaxPool2d -> Flatten -> Linear with fixed weights (|w| < 0.1: 1e-37 times
    one underflows)."""
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 13 * 13, 3))
    rng = np.random.default_rng(7)
    for p in m.parameters():
        p.data[...] = rng.uniform(-0.1, 0.1, p.data.shape).astype(np.float32)
    return m


# ------------------------------------------------------------------------------------------------
# (b) PlanFunction.forward reports its plan's errors before the running statistics move


def test_BUG_raise_after_a_batchnorm_leaves_the_compiled_models_statistics_behind_the_eager_ones(threads_only):
    """BatchNorm2d (training) then a Linear that underflows, output finite, under
    np.errstate(under='raise'). The eager model's BatchNorm counts the batch (num_batches_tracked 1,
    running_mean moved), then the Linear raises, as in PyTorch; b0469e3 says a compiled model that
    raised is where the eager one is after the same failure. The compiled one raises in
    report_deferred *before* update_running_stats: num_batches_tracked stays 0 and the running
    statistics are the initial ones, so the two models diverge from then on."""
    x = batch()
    eager = bn_conv_model()
    compiled_model = bn_conv_model()
    compiled_model.load_state_dict(eager.state_dict())
    fast = gpuconv.compile(compiled_model)
    assert fast.uses_executor(x)
    for f in (eager, fast):
        with np.errstate(under="raise"), pytest.raises(FloatingPointError, match="underflow"):
            f(x)
    assert int(eager[0].num_batches_tracked) == 1
    assert int(compiled_model[0].num_batches_tracked) == int(eager[0].num_batches_tracked)
    np.testing.assert_allclose(compiled_model[0].running_mean, eager[0].running_mean, rtol=1e-5)
    np.testing.assert_allclose(compiled_model[0].running_var, eager[0].running_var, rtol=1e-5)


def test_underflow_under_ignore_the_compiled_model_matches_the_eager_one(threads_only):
    """The same model under the default errstate (underflow ignored): no report, the compiled
    output and running statistics equal the eager model's."""
    x = batch()
    eager = bn_conv_model()
    compiled_model = bn_conv_model()
    compiled_model.load_state_dict(eager.state_dict())
    fast = gpuconv.compile(compiled_model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y_eager, y_fast = eager(x), fast(x)
    np.testing.assert_allclose(y_fast.data, y_eager.data, rtol=1e-5, atol=1e-6)
    assert int(compiled_model[0].num_batches_tracked) == int(eager[0].num_batches_tracked) == 1
    np.testing.assert_allclose(compiled_model[0].running_mean, eager[0].running_mean, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# a callback (or warning hook) running the same compiled model during report_deferred


def _grads_after_a_callback_that_runs_the_model(run_in_callback):
    x = batch(1)
    x[0, 0, 0, 0] = 1e-37  # underflows in the conv (times weights ~0.1): a finite output
    x2 = batch(2) + 1
    t = np.arange(8) % 3
    ref = conv_model()
    with np.errstate(under="ignore"):
        F.cross_entropy(ref(Tensor(x)), t).backward()
    model = conv_model()
    model.load_state_dict(ref.state_dict())
    fast = gpuconv.compile(model)
    calls = []

    def callback(kind, flag):
        calls.append(kind)
        if run_in_callback and len(calls) == 1:
            with np.errstate(under="ignore"):
                fast(x2)  # the region is over: fpenv.py says a callback may run a compiled model

    with np.errstate(under="call", call=callback):
        out = fast(x)
    assert calls == ["underflow"]
    with np.errstate(under="ignore"):
        F.cross_entropy(out, t).backward()
    return [(p.grad, q.grad) for p, q in zip(ref.parameters(), model.parameters())]


def test_BUG_callback_running_the_same_compiled_model_gives_the_outer_forward_its_gradients(threads_only):
    """fast(x) under np.errstate(under='call') whose plan meets an underflow (output finite);
    the callback, run by report_deferred, runs fast(x2) (allowed: 'the region is over'). The outer
    PlanFunction then takes its token (plan.forwards) *after* report_deferred, i.e. the callback's
    forward's, so its backward does not recompute and uses x2's activations: the gradients of
    cross_entropy(fast(x)) differ from the eager model's by ~0.2 (they match to 1e-7 when the
    callback runs nothing, see the next test). update_running_stats reads the callback's batch
    statistics the same way."""
    for eager_grad, compiled_grad in _grads_after_a_callback_that_runs_the_model(True):
        np.testing.assert_allclose(compiled_grad, eager_grad, rtol=1e-4, atol=1e-5)


def test_callback_that_runs_nothing_leaves_the_gradients_the_eager_ones(threads_only):
    """Control for the previous test: the same callback without running the model."""
    for eager_grad, compiled_grad in _grads_after_a_callback_that_runs_the_model(False):
        np.testing.assert_allclose(compiled_grad, eager_grad, rtol=1e-4, atol=1e-5)


def test_BUG_callback_running_the_same_compiled_model_counts_its_batch_twice_in_the_statistics(threads_only):
    """The BatchNorm model whose Linear underflows (output finite) under np.errstate(under='call'),
    the callback running the same model once on another batch x2. Eager: BatchNorm blends x, the
    Linear's report calls back, BatchNorm blends x2. Compiled: the callback's forward blends x2;
    then the outer PlanFunction.forward's update_running_stats reads the plan's last batch
    statistics, x2's again: x is never counted, x2 twice (running_mean 0.477 for 0.296)."""
    x, x2 = batch(3), batch(4) * 3 + 1
    eager = bn_conv_model()
    compiled_model = bn_conv_model()
    compiled_model.load_state_dict(eager.state_dict())
    fast = gpuconv.compile(compiled_model)
    for f in (eager, fast):
        calls = []

        def callback(kind, flag, f=f, calls=calls):
            calls.append(kind)
            if len(calls) == 1:
                f(x2)

        with np.errstate(under="call", call=callback):
            f(x)
        assert calls[:1] == ["underflow"]
    assert int(compiled_model[0].num_batches_tracked) == int(eager[0].num_batches_tracked) == 2
    np.testing.assert_allclose(compiled_model[0].running_mean, eager[0].running_mean, rtol=1e-4)
    np.testing.assert_allclose(compiled_model[0].running_var, eager[0].running_var, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# (c) deferral bound to the report-scope depth: a signal handler outside any region


def test_BUG_signal_handler_op_during_a_compiled_forward_outside_a_region_loses_its_policy(threads_only,
                                                                                            monkeypatch):
    """A signal handler runs an eager Linear that overflows under its own np.errstate(over='raise')
    and expects FloatingPointError (it gets one when run alone). The signal arrives while the main
    thread is inside PlanFunction.forward's errors_deferred block but not in a region (here while
    the plan lays out its batch, plain Python code: a signal lands at any bytecode). The handler's
    run_alone region is at the deferring block's depth (0), so its report is deferred into the
    compiled forward's list: the handler's op does not raise, and the main thread later reports
    the overflow under *its* errstate (a RuntimeWarning here; nothing under 'ignore', and dropped
    altogether when the plan's output is not finite). b0469e3's depth rule only covers a handler
    that runs while the thread waits for the region lock."""
    fast = gpuconv.compile(conv_model())
    lin = nn.Linear(4, 4)
    lin.weight.data[...] = 3e38
    seen = []

    def handler(signum, frame):
        try:
            with np.errstate(over="raise"):
                lin(Tensor(np.full((2, 4), 3e38, np.float32)))
            seen.append("no raise")
        except FloatingPointError:
            seen.append("raised")

    handler(0, None)
    assert seen.pop() == "raised"
    layout = cpu_plan._Plan.layout

    def layout_with_a_signal(self, n):
        signal.raise_signal(signal.SIGUSR1)
        return layout(self, n)

    old = signal.signal(signal.SIGUSR1, handler)
    try:
        monkeypatch.setattr(cpu_plan._Plan, "layout", layout_with_a_signal)
        with warnings.catch_warnings(record=True) as caught, np.errstate(all="warn"):
            warnings.simplefilter("always")
            fast(batch())
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert seen == ["raised"]
    assert [str(w.message) for w in caught] == []


# ------------------------------------------------------------------------------------------------
# (a) run_alone: eager ops note and report after the lock


def test_eager_linear_overflow_under_raise_then_the_next_step_works():
    """An eager Linear whose matmul overflows under 'raise': FloatingPointError naming the
    overflow, no gradient touched, and the next (finite) step's gradients are those of a fresh
    model's."""
    rng = np.random.default_rng(3)
    model = nn.Sequential(nn.Linear(4, 3))
    model[0].weight.data[...] = 1.0
    fresh = nn.Sequential(nn.Linear(4, 3))
    fresh.load_state_dict(model.state_dict())
    with np.errstate(over="raise"), pytest.raises(FloatingPointError, match="overflow"):
        F.cross_entropy(model(Tensor(np.full((2, 4), 3e38, np.float32))), np.array([0, 1])).backward()
    assert all(p.grad is None or not np.any(p.grad) for p in model.parameters())
    x = rng.random((5, 4), dtype=np.float32)
    t = np.array([0, 1, 2, 0, 1])
    for m in (model, fresh):
        F.cross_entropy(m(Tensor(x)), t).backward()
    for p, q in zip(model.parameters(), fresh.parameters()):
        np.testing.assert_array_equal(p.grad, q.grad)


def test_eager_backward_overflow_under_raise_in_a_run_alone_op():
    """An eager Linear whose forward is finite but whose backward's matmul overflows (dy * 3e38):
    loss.backward() under 'raise' raises FloatingPointError; under 'ignore' it gives inf, as NumPy."""
    model = nn.Sequential(nn.Linear(4, 3))
    model[0].weight.data[...] = 3e38
    x = Tensor(np.full((2, 4), 1e-38, np.float32), requires_grad=True)
    y = model(x)
    assert np.isfinite(y.data).all()
    with np.errstate(over="raise"), pytest.raises(FloatingPointError, match="overflow"):
        (y * Tensor(np.full((2, 3), 10.0, np.float32))).sum().backward()
    x2 = Tensor(np.full((2, 4), 1e-38, np.float32), requires_grad=True)
    with np.errstate(all="ignore"):
        (model(x2) * Tensor(np.full((2, 3), 10.0, np.float32))).sum().backward()
    assert np.isinf(x2.grad).all()


def _warnings_of_a_forward_and_its_backward(recompute):
    x = batch(1)
    x[0, 0, 0, 0] = 1e-37
    fast = gpuconv.compile(conv_model())
    with warnings.catch_warnings(record=True) as caught, np.errstate(under="warn"):
        warnings.simplefilter("always")
        a = fast(x)
        if recompute:
            fast(batch(2))  # replaces the activations: a's backward recomputes its forward
        forward = [str(w.message) for w in caught]
        F.cross_entropy(a, np.arange(8) % 3).backward()
    return forward, [str(w.message) for w in caught][len(forward):]


def test_compiled_finite_output_with_an_underflow_reports_once_per_forward_under_warn(threads_only):
    """A plan whose output is finite but met an underflow, under 'warn': one RuntimeWarning for the
    forward (the deferred report); a backward whose forward is recomputed warns exactly as one
    that is not (its own underflow: the weight gradient of the 1e-37 input), nothing more."""
    forward, backward = _warnings_of_a_forward_and_its_backward(True)
    assert len(forward) == 1 and "underflow" in forward[0] and "forward" in forward[0]
    assert backward == _warnings_of_a_forward_and_its_backward(False)[1]


class Same(nn.Module):
    """A module with a forward of its own: a step the compiled model runs eagerly."""

    def forward(self, x):
        return x * 1.0


def segmented_model():
    """conv-relu-pool (a plan) | Same (eager) | conv-relu-pool-flatten-linear (a plan whose conv
    overflows: output not finite, so it runs again eagerly)."""
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), Same(),
                      nn.Conv2d(4, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    rng = np.random.default_rng(7)
    for p in m.parameters():
        p.data[...] = rng.uniform(-0.1, 0.1, p.data.shape).astype(np.float32)
    m[4].weight.data[...] = 3e38
    return m


@pytest.mark.parametrize("mode", ["call", "raise"])
def test_segments_finite_then_not_finite_report_as_the_eager_model(threads_only, mode):
    """First segment finite with an underflow (its deferred report), the second's plan not finite
    (dropped, its eager rerun reports): under 'call' the same kinds in the same order as the eager
    model, each once; under 'raise' the underflow first, as the eager model."""
    x = batch(1)
    x[0, 0, 0, 0] = 1e-37
    eager, fast = segmented_model(), gpuconv.compile(segmented_model())
    assert [(s.start, s.stop, s.plan is not None) for s in fast._current_segments()] == \
        [(0, 3, True), (3, 4, False), (4, 9, True)]
    results = []
    for f in (eager, fast):
        calls = []
        if mode == "call":
            with np.errstate(all="call", call=lambda kind, flag: calls.append(kind)):
                f(x)
        else:
            with np.errstate(all="raise"), pytest.raises(FloatingPointError) as raised:
                f(x)
            calls.append(str(raised.value).split(" encountered")[0])
        results.append(calls)
    assert results[0] == results[1]
    assert results[0] == (["underflow", "overflow", "invalid value"] if mode == "call" else ["underflow"])


def _backward_outcome_under_raise(recompute):
    x = batch(1)
    x[0, 0, 0, 0] = 1e-37
    fast = gpuconv.compile(conv_model())
    with np.errstate(all="ignore"):
        a = fast(x)
        if recompute:
            fast(batch(2))
    try:
        with np.errstate(all="raise"):
            F.cross_entropy(a, np.arange(8) % 3).backward()
    except FloatingPointError as error:
        return str(error).split(" encountered")[0]
    return None


def test_errstate_changed_before_a_recomputing_backward_raises_as_one_that_does_not_recompute(threads_only):
    """Forward under 'ignore' (its plan underflowed), another forward, then the first one's
    backward under 'raise': the recomputed forward's underflow is not raised again, the backward's
    own is, exactly as without the recompute."""
    assert _backward_outcome_under_raise(True) == _backward_outcome_under_raise(False) == "underflow"


# ------------------------------------------------------------------------------------------------
# (e) feature_maps' lock


def test_BUG_feature_maps_called_from_a_models_forward_deadlocks():
    """A model whose forward calls show.feature_maps on a sub-model (say, to log its maps) worked
    before b0469e3; now the outer feature_maps holds the module-level threading.Lock (not
    reentrant) and the inner call waits on it for ever. Run in a child with a 10 s limit."""
    code = """
        import numpy as np
        from gpuconv import nn, show
        from gpuconv.models import LeNet5

        class Logging(nn.Module):
            feature_layers = {"conv": "inner.conv1"}
            def __init__(self):
                self.inner = LeNet5().eval()
            def forward(self, x):
                show.feature_maps(self.inner, np.zeros((28, 28), np.uint8))
                return self.inner(x)

        show.feature_maps(Logging().eval(), np.zeros((28, 28), np.uint8))
        print("done")
    """
    try:
        result = run_script(code, timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail("feature_maps nested in a model's forward hung (module lock not reentrant)")
    assert "done" in result.stdout, result.stderr


def test_a_pending_backward_after_a_later_forward_raised_its_deferred_report(threads_only):
    """a = fast(x); then fast(x_bad) raises its plan's deferred underflow under 'raise' (its
    activations replaced a's); a's backward still gives the eager model's gradients for x."""
    x, x_bad = batch(5), batch(6)
    x_bad[0, 0, 0, 0] = 1e-37
    t = np.arange(8) % 3
    ref = conv_model()
    F.cross_entropy(ref(Tensor(x)), t).backward()
    model = conv_model()
    fast = gpuconv.compile(model)
    a = fast(x)
    with np.errstate(under="raise"), pytest.raises(FloatingPointError, match="underflow"):
        fast(x_bad)
    F.cross_entropy(a, t).backward()
    for p, q in zip(ref.parameters(), model.parameters()):
        np.testing.assert_allclose(q.grad, p.grad, rtol=1e-4, atol=1e-6)
