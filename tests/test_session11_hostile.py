"""Hostile tests of BatchNorm2d in training lowered into the CPU executor (cpu_ops.BatchNormTrainOp,
cpu_plan._Plan._in_rounds, per-mode plans in the compiler). Each model is built twice from one seed
and run compiled and eagerly; outputs, input gradients, p.grad and state_dict are compared
(test_compile_batchnorm_train.Pair). Covered: non-finite inputs (the eager fallback after a plan's
forward), backward twice, gradient accumulation, recomputed forwards with other batch sizes,
switching modes and worker counts between forward and backward, BatchNorms at odd places,
momentum 0 / 1 / None, constant inputs, float64, shape changes, load_state_dict between steps, a
BatchNorm shared by two compiled models, and (in child processes under a hard timeout) two threads
stepping their own models at once and an error raised in a worker's part only.

Tests whose docstring starts with FOUND: failed on the code they were written against (2e3d9f0);
both bugs are fixed where this file was merged: the running statistics are updated by
compiler.PlanFunction after its finite check (cpu_plan._Plan.update_running_stats), and the compiler
keys a segment's plan by its BatchNorms' training flags (cpu_plan.batch_norm_modes)."""
import numpy as np
import pytest

import gpuconv
from gpuconv import nn
from gpuconv.nn import cpu_plan

import test_compile_batchnorm_train as base

Pair, residual_net, images, assert_close = base.Pair, base.residual_net, base.images, base.assert_close
plans_on_tape, weighted_sum = base.plans_on_tape, base.weighted_sum


@pytest.fixture(params=[0, 1, 2], ids=lambda n: f"workers{n}")
def workers(request, monkeypatch):
    monkeypatch.setattr(cpu_plan, "MIN_CHUNK", 5)
    gpuconv.set_cpu_workers(request.param)
    yield request.param
    gpuconv.set_cpu_workers(None)


def conv(rng, c_in, c_out, stride=1, padding=1, k=3):
    return nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, bias=False, rng=rng)


def simple_net(seed, **bn):
    rng = np.random.default_rng(seed)
    return nn.Sequential(conv(rng, 2, 4), nn.BatchNorm2d(4, **bn), nn.ReLU(), nn.MaxPool2d(2),
                         conv(rng, 4, 4), nn.BatchNorm2d(4, **bn), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3, rng=rng))


def state_copy(model):
    return {name: np.array(value, copy=True) for name, value in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# non-finite inputs: the plan's output holds NaN, the compiler runs the segment eagerly again


@pytest.mark.parametrize("make", [residual_net, simple_net], ids=["residual", "simple"])
def test_nan_input_updates_running_statistics_once(make, workers, rng):
    """FOUND: a forward whose output is not finite (a NaN in the input) is run a second time
    eagerly by CompiledModel (PlanFunction.forward raises _NonFinite), but _Plan.forward already
    updated the running statistics (_update_running_stats) before the finite check: every
    BatchNorm counts the batch twice (num_batches_tracked 2 where the eager model has 1) and
    blends its statistics in twice."""
    fast_model, slow_model = make(0), make(0)
    fast = gpuconv.compile(fast_model)
    x = images(rng, 20)
    x[3, 1, 2, 2] = np.nan
    fast(gpuconv.tensor(x))
    slow_model(gpuconv.tensor(x))
    fast_state, slow_state = fast_model.state_dict(), slow_model.state_dict()
    for name in fast_state:
        if name.endswith("num_batches_tracked"):
            assert int(fast_state[name]) == int(slow_state[name]), name


def test_overflowing_input_updates_running_statistics_once(workers, rng):
    """FOUND: as the NaN case, with finite but huge inputs (3e38: the squares overflow, the output
    is not finite): the plan's forward updates the statistics, then the eager rerun again."""
    fast_model, slow_model = simple_net(0), simple_net(0)
    fast = gpuconv.compile(fast_model)
    x = images(rng, 12) * np.float32(1e38)
    fast(gpuconv.tensor(x))
    slow_model(gpuconv.tensor(x))
    assert int(fast_model[1].num_batches_tracked) == int(slow_model[1].num_batches_tracked)


def test_constant_input_variance_zero(workers, rng):
    """A constant batch: every BatchNorm's variance is 0 (normalized by sqrt(eps))."""
    pair = Pair(simple_net)
    x = np.full((11, 2, 8, 8), 0.75, np.float32)
    pair.step(x)
    pair.step(images(rng, 11))


# ----------------------------------------------------------------------------------------------
# backward twice, accumulation, recomputation


def test_backward_twice_with_retain_graph(workers, rng):
    """loss.backward(retain_graph=True) twice: the gradients double, as eagerly."""
    pair = Pair(residual_net)
    x = images(rng, 17)
    grads = []
    for network, model in ((pair.fast, pair.fast_model), (pair.slow_model, pair.slow_model)):
        model.zero_grad()
        inputs = gpuconv.tensor(x, requires_grad=True)
        loss = weighted_sum(network(inputs))
        loss.backward(retain_graph=True)
        loss.backward()
        grads.append(inputs.grad)
    assert_close(grads[0], grads[1])
    pair.assert_same_state()


def test_gradients_accumulate_over_steps_of_different_sizes(workers, rng):
    pair = Pair(residual_net)
    for batch in (17, 9, 23):
        x = images(rng, batch)
        for network, model in ((pair.fast, pair.fast_model), (pair.slow_model, pair.slow_model)):
            weighted_sum(network(gpuconv.tensor(x))).backward()
        pair.assert_same_state()


def test_backwards_in_reverse_order_after_forwards_of_other_sizes(workers, rng):
    """Three forwards of batch sizes 20, 7, 13, then their backwards last to first: the first two
    recompute their forward on a layout made for another batch size."""
    pair = Pair(residual_net)
    xs = [images(rng, b) for b in (20, 7, 13)]
    results = []
    for network, model in ((pair.fast, pair.fast_model), (pair.slow_model, pair.slow_model)):
        model.zero_grad()
        inputs = [gpuconv.tensor(x, requires_grad=True) for x in xs]
        ys = [network(t) for t in inputs]
        for y in reversed(ys):
            weighted_sum(y).backward()
        results.append([(y.data, t.grad) for y, t in zip(ys, inputs)])
    for (fy, fdx), (sy, sdx) in zip(*results):
        assert_close(fy, sy)
        assert_close(fdx, sdx)
    pair.assert_same_state()


def test_eval_forward_between_a_train_forward_and_its_backward(workers, rng):
    pair = Pair(residual_net)
    x, other = images(rng, 15), images(rng, 15)

    def evaluate_other(network, model):
        model.eval()
        evaluated = network(gpuconv.tensor(other))
        model.train()
        return evaluated.data
    assert_close(*pair.backward_after(x, evaluate_other))


def test_switch_to_eval_between_forward_and_backward(workers, rng):
    """The backward of a training forward after model.eval() (no forward between)."""
    pair = Pair(residual_net)

    def to_eval(network, model):
        model.eval()
    pair.backward_after(images(rng, 15), to_eval, before=lambda model: model.train())


def test_set_cpu_workers_between_forward_and_backward(monkeypatch, rng):
    monkeypatch.setattr(cpu_plan, "MIN_CHUNK", 4)
    try:
        pair = Pair(residual_net)
        x = images(rng, 21)
        results = []
        for network, model in ((pair.fast, pair.fast_model), (pair.slow_model, pair.slow_model)):
            model.zero_grad()
            gpuconv.set_cpu_workers(2)
            inputs = gpuconv.tensor(x, requires_grad=True)
            y = network(inputs)
            gpuconv.set_cpu_workers(0)
            network(gpuconv.tensor(images(np.random.default_rng(3), 21)))  # another forward: recompute
            weighted_sum(y).backward()
            results.append((y.data, inputs.grad))
        for a, b in zip(*results):
            assert_close(a, b)
        pair.assert_same_state()
    finally:
        gpuconv.set_cpu_workers(None)


# ----------------------------------------------------------------------------------------------
# BatchNorms at odd places, options


def bn_first_no_affine(seed):
    rng = np.random.default_rng(seed)
    return nn.Sequential(nn.BatchNorm2d(2, affine=False), conv(rng, 2, 3, padding=0), nn.MaxPool2d(2),
                         nn.BatchNorm2d(3, eps=3.0), nn.ReLU(), conv(rng, 3, 3, k=1, padding=0),
                         nn.BatchNorm2d(3, momentum=0.0), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(3, 2, rng=rng))


def momentum_one(seed):
    rng = np.random.default_rng(seed)
    return nn.Sequential(conv(rng, 2, 3, stride=2), nn.BatchNorm2d(3, momentum=1.0), nn.ReLU(),
                         conv(rng, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.BatchNorm2d(3, momentum=None),
                         nn.Flatten(), nn.Linear(3 * 2 * 2, 2, rng=rng))


def residual_bn_only(seed):
    """A residual block whose body is a lone BatchNorm (add in place into its output) and whose
    shortcut is a BatchNorm; a Concat whose first branch is a BatchNorm, second a conv."""
    rng = np.random.default_rng(seed)
    return nn.Sequential(conv(rng, 2, 4), nn.Residual(nn.Sequential(nn.BatchNorm2d(4)),
                                                      nn.Sequential(nn.BatchNorm2d(4, affine=False)), nn.ReLU()),
                         nn.Concat(nn.Sequential(nn.BatchNorm2d(4)), nn.Sequential(conv(rng, 4, 2), nn.ReLU())),
                         conv(rng, 6, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 4 * 4, 2, rng=rng))


def concat_relu_branch(seed):
    """A Concat whose second branch starts with a ReLU on the Concat's input, which the first
    branch's conv read (and, in a plan that meets, rebuilds its row copy from in the backward)."""
    rng = np.random.default_rng(seed)
    return nn.Sequential(conv(rng, 2, 4), nn.BatchNorm2d(4),
                         nn.Concat(nn.Sequential(conv(rng, 4, 3)), nn.Sequential(nn.ReLU(), conv(rng, 4, 2))),
                         nn.BatchNorm2d(5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(5 * 4 * 4, 2, rng=rng))


def alternating_convs(seed):
    """Convs of different R shapes (kernel 3 and 5, strides 1 and 2, channels) sharing the thread's
    'shared rows' buffer, each rebuilt in the backward."""
    rng = np.random.default_rng(seed)
    return nn.Sequential(nn.Conv2d(2, 5, 5, padding=2, bias=True, rng=rng), nn.ReLU(),
                         conv(rng, 5, 3, stride=2), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Conv2d(3, 6, 5, padding=2, bias=False, rng=rng), nn.ReLU(),
                         conv(rng, 6, 4), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 2 * 2, 2, rng=rng))


@pytest.mark.parametrize("make", [bn_first_no_affine, momentum_one, residual_bn_only, concat_relu_branch,
                                  alternating_convs])
@pytest.mark.parametrize("batch", [2, 11, 16])
def test_odd_places_train_as_the_eager_model(make, batch, workers, rng):
    pair = Pair(make)
    for _ in range(3):
        pair.step(images(rng, batch))


@pytest.mark.parametrize("make", [residual_bn_only, concat_relu_branch])
def test_odd_places_with_sgd_and_labels(make, workers, rng):
    Pair(make).sgd_steps(rng, (16, 7, 16), lr=0.1, classes=2)


def test_input_without_gradient_and_bn_first(workers, rng):
    """x without requires_grad: the first BatchNorm's backward needs no dx (returns before its
    meeting) while its weight gradient still adds up."""
    pair = Pair(bn_first_no_affine)
    x = images(rng, 13)
    for network, model in ((pair.fast, pair.fast_model), (pair.slow_model, pair.slow_model)):
        model.zero_grad()
        weighted_sum(network(gpuconv.tensor(x))).backward()
    pair.assert_same_state()


def test_untracked_in_eval_then_train(workers, rng):
    pair = Pair(residual_net, track=False)
    for mode in (False, True, False):
        for m in (pair.fast_model, pair.slow_model):
            m.train(mode)
        pair.step(images(rng, 14))


def test_shape_changes_between_steps(workers, rng):
    pair = Pair(alternating_convs)
    for side in (8, 12, 8, 16):
        x = (rng.standard_normal((10, 2, side, side))).astype(np.float32)
        # the Linear needs 4*2*2 inputs: only side 8 reaches it; other sides fail the same way in both
        if side == 8:
            pair.step(x)
        else:
            for network in (pair.fast, pair.slow_model):
                with pytest.raises(Exception):
                    network(gpuconv.tensor(x))
            pair.assert_same_state()


def test_load_state_dict_between_steps(workers, rng):
    pair = Pair(residual_net)
    pair.step(images(rng, 12))
    other = residual_net(5)
    other(gpuconv.tensor(images(rng, 12)))  # statistics of its own
    for m in (pair.fast_model, pair.slow_model):
        m.load_state_dict(other.state_dict())
    pair.assert_same_state()
    pair.step(images(rng, 12))
    for m in (pair.fast_model, pair.slow_model):
        m.eval()
    pair.step(images(rng, 12))


def test_one_batchnorm_in_two_compiled_models(workers, rng):
    """A BatchNorm2d shared by two models, each compiled; steps alternate between them."""
    def make(seed):
        rng_ = np.random.default_rng(seed)
        norm = nn.BatchNorm2d(3, momentum=None)
        a = nn.Sequential(conv(rng_, 2, 3), norm, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(48, 2, rng=rng_))
        b = nn.Sequential(conv(rng_, 2, 3, stride=2), norm, nn.ReLU(), nn.Flatten(), nn.Linear(48, 2, rng=rng_))
        return a, b
    (fa, fb), (sa, sb) = make(0), make(0)
    ca, cb = gpuconv.compile(fa), gpuconv.compile(fb)
    for step in range(4):
        x = images(rng, 9 + step)
        for fm, sm in ((ca, sa), (cb, sb)):
            yf, ys = fm(gpuconv.tensor(x)), sm(gpuconv.tensor(x))
            assert_close(yf.data, ys.data)
            weighted_sum(yf).backward()
            weighted_sum(ys).backward()
    for (name, p), q in zip(fa.named_parameters(), sa.parameters()):
        assert_close(p.grad, q.grad)
    for (name, p), q in zip(fb.named_parameters(), sb.parameters()):
        assert_close(p.grad, q.grad)
    assert int(fa[1].num_batches_tracked) == int(sa[1].num_batches_tracked) == 8
    assert_close(fa[1].running_mean, sa[1].running_mean)
    assert_close(fa[1].running_var, sa[1].running_var)


def test_float64_model_runs_eagerly(workers, rng):
    fast_model = simple_net(0)
    slow_model = simple_net(0)
    for m in (fast_model, slow_model):
        for p in m.parameters():
            p.data = p.data.astype(np.float64)
        for layer in (m[1], m[5]):
            layer.running_mean = layer.running_mean.astype(np.float64)
            layer.running_var = layer.running_var.astype(np.float64)
    fast = gpuconv.compile(fast_model)
    x = images(rng, 10).astype(np.float64)
    assert not fast.uses_executor(x)
    assert_close(fast(gpuconv.tensor(x)).data, slow_model(gpuconv.tensor(x)).data)
    assert int(fast_model[1].num_batches_tracked) == 1


# ----------------------------------------------------------------------------------------------
# modes: a BatchNorm without running statistics normalizes by the batch in both modes


@pytest.mark.parametrize("order", ["eval-forward-between", "eval-then-train"])
def test_untracked_model_backward_after_a_forward_in_the_other_mode(order, workers, rng):
    """FOUND: with track_running_stats=False the BatchNorm uses batch statistics in train and in
    eval, so both modes take the same plan (key (start, stop, "batch statistics")), but the plan's
    signature holds layer.training: a forward in the other mode recompiles that plan, and the
    backward of the first forward raises RuntimeError ("layers changed since its forward"). The
    eager model (and, before this change, the compiled one, which ran such BatchNorms eagerly)
    runs the backward."""
    pair = Pair(residual_net, track=False)
    x, other = images(rng, 15), images(rng, 15)

    def other_mode_forward(network, model):
        model.train(order != "eval-forward-between")
        network(gpuconv.tensor(other))
    pair.backward_after(x, other_mode_forward, before=lambda model: model.train(order == "eval-forward-between"))


def test_mixed_tracked_and_untracked_backward_after_eval_forward(workers, rng):
    """FOUND: as above with one untracked BatchNorm in a model of tracked ones: the model keeps the
    "batch statistics" plan in eval too, an eval forward recompiles it, and the pending training
    backward raises RuntimeError."""
    def make(seed):
        rng_ = np.random.default_rng(seed)
        return nn.Sequential(conv(rng_, 2, 4), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                             conv(rng_, 4, 4), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                             nn.Flatten(), nn.Linear(64, 2, rng=rng_))
    other = images(np.random.default_rng(9), 12)

    def eval_forward(network, model):
        model.eval()
        network(gpuconv.tensor(other))
        model.train()
    Pair(make).backward_after(images(rng, 12), eval_forward)


class Doubler(nn.Module):
    """A module with a forward of its own: a step the executor cannot lower (splits segments)."""

    def forward(self, x):
        return x * 2.0


def segmented(seed):
    rng = np.random.default_rng(seed)
    return nn.Sequential(conv(rng, 2, 4), nn.ReLU(), nn.MaxPool2d(2), nn.BatchNorm2d(4), Doubler(),
                         conv(rng, 4, 4), nn.ReLU(), nn.MaxPool2d(2), nn.BatchNorm2d(4, momentum=None),
                         nn.Flatten(), nn.Linear(16, 2, rng=rng))


def test_segments_with_training_batchnorm(workers, rng):
    pair = Pair(segmented)
    assert pair.fast.unsupported is not None
    for batch in (12, 5, 12):
        pair.step(images(rng, batch))
    for m in (pair.fast_model, pair.slow_model):
        m.eval()
    pair.step(images(rng, 12))
    for m in (pair.fast_model, pair.slow_model):
        m.train()
    pair.step(images(rng, 12))


def test_retained_graph_backward_after_another_forward(workers, rng):
    """backward(retain_graph=True), another forward, backward again: the second recomputes."""
    pair = Pair(residual_net)
    x, other = images(rng, 17), images(rng, 17)
    grads = []
    for network, model in ((pair.fast, pair.fast_model), (pair.slow_model, pair.slow_model)):
        model.zero_grad()
        inputs = gpuconv.tensor(x, requires_grad=True)
        loss = weighted_sum(network(inputs))
        loss.backward(retain_graph=True)
        network(gpuconv.tensor(other))
        loss.backward()
        grads.append(inputs.grad)
    assert_close(grads[0], grads[1])
    pair.assert_same_state()


# ----------------------------------------------------------------------------------------------
# hostile, in child processes under a hard timeout (tests/hostile_child.py)

CHILD_PRELUDE = r'''
import faulthandler, json, os, sys, threading, time
faulthandler.dump_traceback_later(float(os.environ["HOSTILE_HANG_S"]), exit=True)
import numpy as np
import gpuconv
from gpuconv import blas, nn
from gpuconv.models import ResNet
from gpuconv.nn import cpu_ops, cpu_plan
cpu_plan.processes = False
cpu_plan.MIN_CHUNK = 8


def emit(**results):
    print("RESULT " + json.dumps(results), flush=True)


def step(network, model, x):
    model.zero_grad()
    y = network(gpuconv.tensor(x))
    w = gpuconv.tensor(np.random.default_rng(7).standard_normal(y.shape).astype(np.float32))
    (y * w).sum().backward()
    return y.data


def compare(compiled_model, eager_model, y, y_eager):
    scale = max(float(np.abs(p.grad).max()) for p in eager_model.parameters())
    grad = max(float(np.abs(a.grad - b.grad).max()) for a, b in zip(compiled_model.parameters(),
                                                                     eager_model.parameters())) / scale
    state = all(np.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(compiled_model.state_dict().values(),
                                                                        eager_model.state_dict().values()))
    return bool(np.allclose(y, y_eager, rtol=1e-4, atol=1e-4)), grad, state
'''


@pytest.mark.parametrize("kind", ["forward", "backward"])
@pytest.mark.parametrize("workers_count", [1, 2])
def test_an_error_in_a_workers_part_only(tmp_path, kind, workers_count):
    """An exception raised by a BatchNorm's steps in a worker thread only (after its first
    meeting): the step raises it, no hang, the lock is free, BLAS threads and the switch interval
    restored, the statistics untouched by a failed forward, and the next step matches eager."""
    import hostile_child
    r = hostile_child.run_child(tmp_path, CHILD_PRELUDE, r'''
        kind, count = ''' + repr(kind) + ", " + repr(workers_count) + r'''
        gpuconv.set_cpu_workers(count)
        eager, model = ResNet(8, in_channels=1, num_classes=5, seed=3), ResNet(8, in_channels=1, num_classes=5, seed=3)
        compiled = gpuconv.compile(model)
        x = np.random.default_rng(0).standard_normal((40, 1, 8, 8)).astype(np.float32)
        step(compiled, model, x)
        step(eager, eager, x)
        before = {name: np.array(value, copy=True) for name, value in model.state_dict().items()}
        blas_before, interval = blas.get_num_threads(), sys.getswitchinterval()
        real = getattr(cpu_ops.BatchNormTrainOp, kind + "_steps")
        armed = {"left": 1}

        def failing(self, *args):
            result = yield from real(self, *args) if False else _wrapped(real(self, *args))
            return result

        def _wrapped(steps):
            reply = None
            while True:
                try:
                    request = steps.send(reply)
                except StopIteration as done:
                    return done.value
                reply = yield request
                if threading.current_thread() is not threading.main_thread() and armed["left"]:
                    armed["left"] -= 1
                    steps.close()
                    raise MemoryError("injected in a worker")

        setattr(cpu_ops.BatchNormTrainOp, kind + "_steps", failing)
        raised = None
        try:
            step(compiled, model, x)
        except MemoryError as e:
            raised = str(e)
        setattr(cpu_ops.BatchNormTrainOp, kind + "_steps", real)
        if kind == "forward":
            unchanged = all(np.array_equal(v, before[k]) for k, v in model.state_dict().items())
        else:
            eager(gpuconv.tensor(x))  # the forward ran whole: one update
            unchanged = all(np.allclose(v, eager.state_dict()[k], rtol=1e-4, atol=1e-5)
                            for k, v in model.state_dict().items())
        settings = [not cpu_plan._region_lock.locked(), blas.get_num_threads() == blas_before,
                    sys.getswitchinterval() == interval]
        y = step(compiled, model, x)
        y_eager = step(eager, eager, x)
        same, grad, state = compare(model, eager, y, y_eager)
        emit(raised=raised, fired=armed["left"] == 0, unchanged=unchanged, settings=settings, same=same,
             grad=grad, state=state)
    ''', hang_s=90, name="worker_error")
    assert r["fired"] and r["raised"] == "injected in a worker", r
    assert r["unchanged"] and all(r["settings"]), r
    assert r["same"] and r["grad"] < 1e-3 and r["state"], r


def test_two_threads_train_their_own_models_at_once(tmp_path):
    """Two Python threads, each stepping its own compiled ResNet with training BatchNorms, while a
    third flips set_cpu_workers between 0, 1 and 2: every step matches a sequential eager run."""
    import hostile_child
    r = hostile_child.run_child(tmp_path, CHILD_PRELUDE, r'''
        pairs = [(ResNet(8, in_channels=1, num_classes=5, seed=s), ResNet(8, in_channels=1, num_classes=5, seed=s))
                 for s in (1, 2)]
        xs = [[np.random.default_rng(10 * s + i).standard_normal((24 + 5 * i, 1, 8, 8)).astype(np.float32)
               for i in range(4)] for s in (1, 2)]
        outputs, errors, stop = {}, [], threading.Event()

        def run(which):
            try:
                model = pairs[which][0]
                compiled = gpuconv.compile(model)
                outputs[which] = [step(compiled, model, x) for x in xs[which]]
            except BaseException as e:
                errors.append(repr(e))

        def flip():
            n = 0
            while not stop.is_set():
                gpuconv.set_cpu_workers(n % 3)
                n += 1
                time.sleep(0.001)

        flipper = threading.Thread(target=flip)
        flipper.start()
        threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        flipper.join()
        results = []
        for which in (0, 1):
            eager = pairs[which][1]
            ys = [step(eager, eager, x) for x in xs[which]]
            if which in outputs:
                results.append(compare(pairs[which][0], eager, outputs[which][-1], ys[-1]))
                results.append(all(np.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(outputs[which], ys)))
        emit(errors=errors, results=results, lock_free=not cpu_plan._region_lock.locked())
    ''', hang_s=120, name="two_threads")
    assert not r["errors"], r
    assert r["lock_free"], r
    (same0, grad0, state0), all0, (same1, grad1, state1), all1 = r["results"]
    assert same0 and same1 and all0 and all1 and state0 and state1 and grad0 < 1e-3 and grad1 < 1e-3, r


# ----------------------------------------------------------------------------------------------
# tiny parts, zoo models


def loose_step(pair, x, grad_rtol=5e-3):
    """Pair.step with p.grad compared at grad_rtol: a BatchNorm over a handful of values makes the
    gradients before it ill-conditioned (the float32 eager model is as far from a float64 one)."""
    outs = []
    for network, model in ((pair.fast, pair.fast_model), (pair.slow_model, pair.slow_model)):
        model.zero_grad()
        inputs = gpuconv.tensor(x, requires_grad=True)
        y = network(inputs)
        weighted_sum(y).backward()
        outs.append((y.data, inputs.grad, [p.grad for p in model.parameters()]))
    (fy, fdx, fg), (sy, sdx, sg) = outs
    assert_close(fy, sy)
    assert_close(fdx, sdx, rtol=grad_rtol)
    for a, b in zip(fg, sg):
        assert_close(a, b, rtol=grad_rtol)
    fast_state, slow_state = pair.fast_model.state_dict(), pair.slow_model.state_dict()
    for name in fast_state:
        assert_close(np.asarray(fast_state[name], np.float64), np.asarray(slow_state[name], np.float64))


def norm_after_global_pool(seed):
    """A BatchNorm after the global average pool: one value per image and channel."""
    rng = np.random.default_rng(seed)
    return nn.Sequential(conv(rng, 2, 4), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.BatchNorm2d(4, momentum=None), nn.Flatten(), nn.Linear(4, 2, rng=rng))


@pytest.mark.parametrize("batch", [2, 3, 5])
@pytest.mark.parametrize("count", [1, 2, 3])
def test_parts_of_one_image(batch, count, monkeypatch, rng):
    """MIN_CHUNK 1: parts of one image each; a BatchNorm where each part holds one value per channel."""
    monkeypatch.setattr(cpu_plan, "MIN_CHUNK", 1)
    gpuconv.set_cpu_workers(count)
    try:
        pair = Pair(norm_after_global_pool)
        for _ in range(2):
            loose_step(pair, images(rng, batch))
        plan = pair.fast._current_segments()[0].plan
        assert plan.threads == min(count + 1, batch)
    finally:
        gpuconv.set_cpu_workers(None)


def test_batch_of_one_image(workers, rng):
    pair = Pair(simple_net)
    for _ in range(2):
        pair.step(images(rng, 1))


@pytest.mark.parametrize("name", ["simplecnn", "resnet8"])
def test_zoo_models_with_sgd(name, workers, rng):
    from gpuconv.models import ResNet, SimpleCNN

    def make(seed):
        if name == "simplecnn":
            return SimpleCNN(2, 3, image_size=8, widths=(4, 6), hidden=5, seed=seed)
        return ResNet(8, in_channels=2, num_classes=3, seed=seed)
    Pair(make).sgd_steps(rng, (13, 16, 7))


# ----------------------------------------------------------------------------------------------
# no_grad, frozen parameters, a BatchNorm shared by a plan and an eager step, train/eval toggles


def test_training_forward_under_no_grad_updates_statistics_once(workers, rng):
    pair = Pair(residual_net)
    x = images(rng, 14)
    with gpuconv.no_grad():
        yf = pair.fast(gpuconv.tensor(x))
        ys = pair.slow_model(gpuconv.tensor(x))
    assert_close(yf.data, ys.data)
    pair.assert_same_state()
    pair.step(images(rng, 14))


def test_frozen_batchnorm_parameters(workers, rng):
    pair = Pair(residual_net)
    for m in (pair.fast_model, pair.slow_model):
        for name, p in m.named_parameters():
            if p.data.ndim == 1:  # BatchNorm weights and biases (and the Linear's bias)
                p.requires_grad = False
    for batch in (12, 7):
        pair.step(images(rng, batch))


def shared_across_segments(seed):
    rng = np.random.default_rng(seed)
    norm = nn.BatchNorm2d(4, momentum=None)
    return nn.Sequential(conv(rng, 2, 4), nn.ReLU(), nn.MaxPool2d(2), norm, Doubler(), norm,
                         conv(rng, 4, 4), nn.ReLU(), nn.MaxPool2d(2), norm, nn.Flatten(), nn.Linear(16, 2, rng=rng))


def test_one_batchnorm_in_a_plan_and_in_an_eager_step(workers, rng):
    pair = Pair(shared_across_segments)
    for batch in (10, 6, 10):
        pair.step(images(rng, batch))
    assert int(pair.fast_model[3].num_batches_tracked) == 9


def test_train_eval_toggles_follow_the_running_statistics(workers, rng):
    pair = Pair(residual_net)
    for i in range(6):
        for m in (pair.fast_model, pair.slow_model):
            m.train(i % 2 == 0)
        pair.step(images(rng, 10 + i))


def mixed_convs(seed):
    """Convs off the row path (dilation 2: columns), pointwise ones (read in place), a 1x3 kernel
    with padding (0, 1), a 1x1 conv fused with its pool, around training BatchNorms."""
    rng = np.random.default_rng(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=2, dilation=2, bias=False, rng=rng), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 1, bias=False, rng=rng), nn.ReLU(),
                         nn.Conv2d(4, 3, (1, 3), padding=(0, 1), bias=False, rng=rng), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Conv2d(3, 5, 3, padding=2, dilation=2, bias=False, rng=rng), nn.ReLU(),
                         nn.Conv2d(5, 4, 1, bias=False, rng=rng), nn.ReLU(), nn.MaxPool2d(2),
                         nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 2, rng=rng))


@pytest.mark.parametrize("batch", [3, 16])
def test_mixed_conv_kinds(batch, workers, rng):
    pair = Pair(mixed_convs)
    assert pair.fast.unsupported is None
    for _ in range(3):
        pair.step(images(rng, batch))


def test_image_size_changes_between_steps(workers, rng):
    """Another image size each step: the plan recompiles, its shared rows / centred buffers grow
    and shrink, the row copies of each size are rebuilt from the right input."""
    pair = Pair(lambda seed: nn.Sequential(*list(alternating_convs(seed))[:10], nn.AdaptiveAvgPool2d(1),
                                           nn.Flatten(), nn.Linear(4, 2, rng=np.random.default_rng(seed))))
    for side in (8, 12, 6, 16, 8):
        x = (rng.standard_normal((9, 2, side, side)) + 0.5).astype(np.float32)
        pair.step(x)


def test_first_op_affine_batchnorm_without_input_gradient(workers, rng):
    pair = Pair(base.first_and_last)
    for batch in (5, 12):
        x = images(rng, batch)
        for network, model in ((pair.fast, pair.fast_model), (pair.slow_model, pair.slow_model)):
            model.zero_grad()
            weighted_sum(network(gpuconv.tensor(x))).backward()
        pair.assert_same_state()


def test_non_contiguous_input(workers, rng):
    pair = Pair(base.first_and_last)
    big = images(rng, 30)
    for x in (big[::3], np.asfortranarray(big[:11]), big[:, :, ::-1, :][:13]):
        pair.step(x)


def test_toggles_with_worker_processes(monkeypatch, rng):
    """cpu_plan.processes: eval steps run their parts in worker processes, training steps (which
    meet) in threads; toggling between them every step, with an eval forward between a training
    forward and its backward."""
    monkeypatch.setattr(cpu_plan, "processes", True)
    monkeypatch.setattr(cpu_plan, "MIN_CHUNK", 6)
    gpuconv.set_cpu_workers(1)
    try:
        pair = Pair(residual_net)
        for i in range(4):
            for m in (pair.fast_model, pair.slow_model):
                m.train(i % 2 == 0)
            pair.step(images(rng, 14 + i))
        x, other = images(rng, 14), images(rng, 14)
        results = []
        for network, model in ((pair.fast, pair.fast_model), (pair.slow_model, pair.slow_model)):
            model.zero_grad()
            model.train()
            inputs = gpuconv.tensor(x, requires_grad=True)
            y = network(inputs)
            model.eval()
            weighted_sum(network(gpuconv.tensor(other))).backward()
            model.train()
            network(gpuconv.tensor(other))
            weighted_sum(y).backward()
            results.append((y.data, inputs.grad))
        for a, b in zip(*results):
            assert_close(a, b)
        pair.assert_same_state()
    finally:
        gpuconv.set_cpu_workers(None)


def nested(seed):
    """BatchNorms in a Residual's activation (post: ReLU then BatchNorm after the add), a Residual inside a Concat
    branch inside a Residual, an identity shortcut whose body is conv-BN, and a BatchNorm alone as
    a Concat branch (its output copied into the Concat's buffer)."""
    rng = np.random.default_rng(seed)
    inner = nn.Residual(nn.Sequential(conv(rng, 4, 4), nn.BatchNorm2d(4)), None,
                        nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4, momentum=None)))
    branches = nn.Concat(nn.Sequential(inner, conv(rng, 4, 2)), nn.Sequential(nn.BatchNorm2d(4, affine=False)))
    outer = nn.Residual(nn.Sequential(branches, nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1, bias=False, rng=rng)),
                        nn.Sequential(nn.BatchNorm2d(4)), nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4)))
    return nn.Sequential(conv(rng, 2, 4), outer, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64, 3, rng=rng))


@pytest.mark.parametrize("batch", [4, 15])
def test_nested_branches_with_batchnorms(batch, workers, rng):
    pair = Pair(nested)
    assert pair.fast.unsupported is None
    for _ in range(3):  # (no SGD steps: float32 differences of the weights grow chaotically here)
        pair.step(images(rng, batch))


def shared_in_branches(seed):
    """One BatchNorm in a Residual's body, its shortcut and its activation, and in two Concat
    branches: its running statistics take the batches in forward order (momentum 0.3: the order
    changes the numbers)."""
    rng = np.random.default_rng(seed)
    norm = nn.BatchNorm2d(4, momentum=0.3)
    block = nn.Residual(nn.Sequential(conv(rng, 4, 4), norm, nn.ReLU()), nn.Sequential(norm), nn.Sequential(nn.ReLU(), norm))
    branches = nn.Concat(nn.Sequential(conv(rng, 4, 4), norm), nn.Sequential(nn.ReLU(), norm, nn.ReLU()))
    return nn.Sequential(conv(rng, 2, 4), block, branches, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(128, 2, rng=rng))


def test_one_batchnorm_in_every_branch(workers, rng):
    pair = Pair(shared_in_branches)
    for batch in (6, 13):
        pair.step(images(rng, batch))
    assert int(pair.fast_model[1].shortcut[0].num_batches_tracked) == 10


def test_sgd_steps_then_eval_in_worker_processes(monkeypatch, rng):
    """Training steps (threads, they meet) with SGD updates in place, then eval steps whose parts
    run in worker processes: the processes must see the updated weights and running statistics."""
    monkeypatch.setattr(cpu_plan, "processes", True)
    monkeypatch.setattr(cpu_plan, "MIN_CHUNK", 6)
    gpuconv.set_cpu_workers(1)
    try:
        pair = Pair(residual_net)
        pair.sgd_steps(rng, (14,) * 6, lr=0.02, modes=[i % 3 != 2 for i in range(6)])
        plan = pair.fast._plans[(0, len(pair.fast._steps))]
        assert plan.forwards == 2  # the eval steps ran the plan without batch statistics
    finally:
        gpuconv.set_cpu_workers(None)


def test_mixed_modes_in_one_plan(workers, rng):
    """model.eval() with one BatchNorm set back to train (and one untracked): one plan holds
    BatchNormEvalOp and BatchNormTrainOp; only the training one's statistics move."""
    pair = Pair(residual_net)
    for m in (pair.fast_model, pair.slow_model):
        m.eval()
        m[1].train()
        m[3].body[4].train()
    for batch in (9, 14):
        pair.step(images(rng, batch))
    for m in (pair.fast_model, pair.slow_model):
        m[3].body[4].eval()
    pair.step(images(rng, 9))


def test_ctrl_c_in_the_recomputed_forward_of_a_backward(tmp_path):
    """Two forwards, then the first's backward, interrupted (KeyboardInterrupt) in the forward it
    recomputes: the lock is free, the switch interval and BLAS threads restored, the running
    statistics those of the two forwards, and a step after it matches the eager model."""
    import hostile_child
    r = hostile_child.run_child(tmp_path, CHILD_PRELUDE, r'''
        import signal
        signal.signal(signal.SIGINT, signal.default_int_handler)
        eager, model = ResNet(8, in_channels=1, num_classes=5, seed=3), ResNet(8, in_channels=1, num_classes=5, seed=3)
        compiled = gpuconv.compile(model)
        rng = np.random.default_rng(0)
        x, other = (rng.standard_normal((40, 1, 8, 8)).astype(np.float32) for _ in range(2))
        blas_before, interval = blas.get_num_threads(), sys.getswitchinterval()
        y = compiled(gpuconv.tensor(x))
        compiled(gpuconv.tensor(other))
        eager(gpuconv.tensor(x))
        eager(gpuconv.tensor(other))
        fired, interrupted = interrupted_at("forward_steps", "invstd = 1 / np.sqrt(var", lambda: (y * y).sum().backward())
        state = all(np.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(model.state_dict().values(),
                                                                            eager.state_dict().values()))
        settings = [not cpu_plan._region_lock.locked(), blas.get_num_threads() == blas_before,
                    sys.getswitchinterval() == interval]
        y1 = step(compiled, model, x)
        y2 = step(eager, eager, x)
        same, grad, state_after = compare(model, eager, y1, y2)
        emit(fired=fired, interrupted=interrupted, state=state, settings=settings, same=same, grad=grad,
             state_after=state_after)
    ''', hang_s=60, name="ctrl_c_recompute")
    assert r["fired"] and r["interrupted"], r
    assert r["state"] and all(r["settings"]), r
    assert r["same"] and r["grad"] < 1e-3 and r["state_after"], r


def test_many_parts(monkeypatch, rng):
    """Seven workers, eight parts of two or three images each, through the residual model."""
    monkeypatch.setattr(cpu_plan, "MIN_CHUNK", 2)
    gpuconv.set_cpu_workers(7)
    try:
        pair = Pair(residual_net)
        for batch in (19, 16, 5):
            pair.step(images(rng, batch))
        assert pair.fast._current_segments()[0].plan.threads == 2  # the last batch, 5 images
    finally:
        gpuconv.set_cpu_workers(None)


def test_zero_eps_constant_channel_falls_back_once(workers, rng):
    """FOUND: eps=0 and a channel constant over the batch: 0 / 0 in the output (NaN), so the
    compiled model reruns the segment eagerly, after the plan's forward already counted the batch
    (see test_nan_input_updates_running_statistics_once): num_batches_tracked 2, eagerly 1."""
    def make(seed):
        r = np.random.default_rng(seed)
        return nn.Sequential(nn.BatchNorm2d(2, eps=0.0), conv(r, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(48, 2, rng=r))
    fast_model, slow_model = make(0), make(0)
    fast = gpuconv.compile(fast_model)
    x = images(rng, 10)
    x[:, 1] = 3.0
    yf, ys = fast(gpuconv.tensor(x)), slow_model(gpuconv.tensor(x))
    assert np.isnan(ys.data).any() and np.isnan(yf.data).any()
    assert int(fast_model[0].num_batches_tracked) == int(slow_model[0].num_batches_tracked) == 1
