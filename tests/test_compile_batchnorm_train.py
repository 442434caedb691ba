"""BatchNorm2d on the batch's statistics (training, or no running statistics) lowered into the CPU
executor (cpu_ops.BatchNormTrainOp): the plan's parts meet at each one to add their sums
(cpu_plan._Plan._in_rounds). Every model is built twice from one seed and run compiled and eagerly
(the reference); outputs, input gradients, every p.grad and the buffers (running statistics,
num_batches_tracked) are compared, step after step, over one to three parts and batch sizes that
split unevenly."""
import numpy as np
import pytest

import gpuconv
from gpuconv import functional as F
from gpuconv import nn, optim
from gpuconv.errors import ShapeError
from gpuconv.nn import cpu_ops, cpu_plan
from test_compile_segments import plans_on_tape


@pytest.fixture(params=[0, 1, 2], ids=lambda n: f"workers{n}")
def workers(request, monkeypatch):
    monkeypatch.setattr(cpu_plan, "MIN_CHUNK", 8)  # small batches split too: parts of 8 images or more
    gpuconv.set_cpu_workers(request.param)
    yield request.param
    gpuconv.set_cpu_workers(None)


def conv(rng, c_in, c_out, stride=1):
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False, rng=rng)


def residual_net(seed, momentum=0.1, affine=True, track=True):
    """conv-BN-ReLU, a residual block with BatchNorms in its body and shortcut, a max pool, a
    Concat whose branches end in BatchNorms, the global average pool and a Linear."""
    rng = np.random.default_rng(seed)

    def bn(c):
        return nn.BatchNorm2d(c, momentum=momentum, affine=affine, track_running_stats=track)

    body = nn.Sequential(conv(rng, 4, 6, 2), bn(6), nn.ReLU(), conv(rng, 6, 6), bn(6))
    shortcut = nn.Sequential(nn.Conv2d(4, 6, 1, stride=2, bias=False, rng=rng), bn(6))
    branches = nn.Concat(nn.Sequential(conv(rng, 6, 3), bn(3)),
                         nn.Sequential(nn.Conv2d(6, 2, 1, bias=False, rng=rng), bn(2), nn.ReLU()))
    return nn.Sequential(conv(rng, 2, 4), bn(4), nn.ReLU(), nn.Residual(body, shortcut, nn.ReLU()),
                         nn.MaxPool2d(2), branches, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(5, 3, rng=rng))


def first_and_last(seed):
    """A BatchNorm as the plan's first op (its input the caller's) and as its last (its output
    gradient the caller's, an eps of its own)."""
    rng = np.random.default_rng(seed)
    return nn.Sequential(nn.BatchNorm2d(2), conv(rng, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.BatchNorm2d(3, eps=0.5))


def shared_norm(seed):
    """One BatchNorm2d used twice: its running statistics take two updates per forward, as eagerly."""
    rng = np.random.default_rng(seed)
    norm = nn.BatchNorm2d(3, momentum=None)
    return nn.Sequential(conv(rng, 2, 3), norm, nn.ReLU(), conv(rng, 3, 3), norm, nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 3, rng=rng))


def convs_then_norm(seed):
    """Four convs in a row, then a BatchNorm: in a plan that meets each conv rebuilds its row copy
    from its input in the backward, so no conv's output may pass through the thread's two shared
    buffers (mark_passing_outputs), where the conv after next would overwrite it."""
    rng = np.random.default_rng(seed)
    return nn.Sequential(conv(rng, 2, 3), nn.ReLU(), conv(rng, 3, 3), nn.ReLU(), conv(rng, 3, 3), nn.ReLU(),
                         conv(rng, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 3, rng=rng))


def images(rng, batch):
    return (rng.standard_normal((batch, 2, 8, 8)) * 2 + 0.5).astype(np.float32)


def assert_close(actual, expected, rtol=2e-5):
    """rtol of the largest magnitude: entries near zero cancel in sums, elementwise rtol is noise."""
    scale = float(np.abs(expected).max()) or 1.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def weighted_sum(y):
    weights = np.random.default_rng(7).standard_normal(y.shape).astype(np.float32)
    return (y * gpuconv.tensor(weights)).sum()


class Pair:
    def __init__(self, make, **kwargs):
        self.fast_model, self.slow_model = make(0, **kwargs), make(0, **kwargs)
        self.fast = gpuconv.compile(self.fast_model)

    def step(self, x, loss=None):
        """One forward and backward of each; compares everything -> the compiled output. The
        default loss weighs y by fixed random numbers (sum(y * y) of a normalized y is a constant:
        its gradient would be rounding noise)."""
        if loss is None:
            loss = weighted_sum
        outs = []
        for network, model in ((self.fast, self.fast_model), (self.slow_model, self.slow_model)):
            model.zero_grad()
            inputs = gpuconv.tensor(x, requires_grad=True)
            y = network(inputs)
            loss(y).backward()
            outs.append((y, inputs.grad))
        (fast, fast_dx), (slow, slow_dx) = outs
        assert plans_on_tape(fast) and not plans_on_tape(slow)
        assert_close(fast.data, slow.data)
        assert_close(fast_dx, slow_dx)
        self.assert_same_state()
        return fast

    def sgd_steps(self, rng, batches, lr=0.05, classes=3, modes=None):
        """SGD with momentum on both copies, one step per batch size in `batches` (cross-entropy
        against random labels, compared at each step); `modes`: each step's train() flag."""
        optimizers = [optim.SGD(m.parameters(), lr=lr, momentum=0.9) for m in (self.fast_model, self.slow_model)]
        for index, batch in enumerate(batches):
            for model in (self.fast_model, self.slow_model):
                model.train(True if modes is None else modes[index])
            labels = rng.integers(0, classes, batch)
            self.step(images(rng, batch), loss=lambda y: F.cross_entropy(y, labels))
            for optimizer in optimizers:
                optimizer.step()
        self.assert_same_state()

    def backward_after(self, x, between, before=None):
        """In each copy: before(model) if given, forward x, between(network, model), x's backward;
        compares the outputs, the input gradients and the state -> what between returned in the
        compiled copy and in the eager one."""
        results, returned = [], []
        for network, model in ((self.fast, self.fast_model), (self.slow_model, self.slow_model)):
            model.zero_grad()
            if before is not None:
                before(model)
            inputs = gpuconv.tensor(x, requires_grad=True)
            y = network(inputs)
            returned.append(between(network, model))
            weighted_sum(y).backward()
            results.append((y.data, inputs.grad))
        for fast, slow in zip(*results):
            assert_close(fast, slow)
        self.assert_same_state()
        return returned

    def assert_same_state(self):
        slow = dict(self.slow_model.named_parameters())
        for name, p in self.fast_model.named_parameters():
            assert (p.grad is None) == (slow[name].grad is None), name
            if p.grad is not None:
                assert p.grad.dtype == np.float32, name
                assert_close(p.grad, slow[name].grad)
        fast_state, slow_state = self.fast_model.state_dict(), self.slow_model.state_dict()
        assert fast_state.keys() == slow_state.keys()
        for name in fast_state:
            if name.endswith("num_batches_tracked"):
                assert int(fast_state[name]) == int(slow_state[name]), name
            else:
                assert_close(np.asarray(fast_state[name], np.float64), np.asarray(slow_state[name], np.float64))


@pytest.mark.parametrize("batch", [2, 9, 30])
@pytest.mark.parametrize("options", [{}, dict(momentum=None), dict(affine=False), dict(track=False)],
                         ids=["default", "cumulative", "no-affine", "untracked"])
def test_residual_and_concat_model_trains_as_the_eager_one(batch, options, workers, rng):
    pair = Pair(residual_net, **options)
    assert pair.fast.unsupported is None  # the whole model is one plan
    for _ in range(3):
        x = images(rng, batch)
        assert pair.fast.uses_executor(x)
        assert len(plans_on_tape(pair.step(x))) == 1


@pytest.mark.parametrize("batch", [3, 17])
def test_first_and_last_op_convs_in_a_row_and_a_norm_used_twice(batch, workers, rng):
    for make in (first_and_last, convs_then_norm, shared_norm):
        pair = Pair(make)
        for _ in range(2):
            pair.step(images(rng, batch))
    assert int(pair.fast_model[1].num_batches_tracked) == 4  # shared_norm: twice per forward


def test_without_running_statistics_eval_normalizes_by_the_batch_too(workers, rng):
    pair = Pair(residual_net, track=False)
    for model in (pair.fast_model, pair.slow_model):
        model.eval()
    assert len(plans_on_tape(pair.step(images(rng, 20)))) == 1


def test_sgd_training_follows_the_eager_model(workers, rng):
    Pair(residual_net).sgd_steps(rng, (24, 19, 24, 24))


def test_parts_run_in_threads_even_where_processes_are_asked_for(monkeypatch, rng):
    monkeypatch.setattr(cpu_plan, "processes", True)
    monkeypatch.setattr(cpu_plan, "MIN_CHUNK", 8)
    gpuconv.set_cpu_workers(1)
    try:
        pair = Pair(residual_net)
        pair.step(images(rng, 20))
        plan = pair.fast._current_segments()[0].plan
        assert plan.meets and plan.threads == 2 and not plan.in_processes
        assert all(len(part) == 1 for part in plan.parts)  # a part is one chunk
    finally:
        gpuconv.set_cpu_workers(None)


def test_a_second_forward_before_the_backward_updates_the_statistics_once(workers, rng):
    """The backward of the first forward recomputes it (the plan's activations are the second's):
    the gradients are the first forward's, and the recomputed forward leaves the running
    statistics alone; each of the two forwards updated them once, as eagerly."""
    pair = Pair(residual_net)
    second = images(rng, 20)
    pair.backward_after(images(rng, 20), lambda network, model: network(second))  # replaces the activations
    assert int(pair.fast_model[1].num_batches_tracked) == 2


def test_a_failed_forward_changes_no_statistics_and_the_next_one_runs(workers, rng, monkeypatch):
    """An error at a meeting (injected once, in the op that adds the parts' sums) ends the forward:
    the parts waiting there are closed, the running statistics and num_batches_tracked are as
    before, and the next forward and backward match the eager model."""
    pair = Pair(residual_net)
    pair.step(images(rng, 20))
    before = {name: np.array(value, copy=True) for name, value in pair.fast_model.state_dict().items()}
    real, calls = cpu_ops.BatchNormTrainOp.meet, []

    def failing(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("injected")
        return real(self, *args)

    monkeypatch.setattr(cpu_ops.BatchNormTrainOp, "meet", failing)
    with pytest.raises(MemoryError, match="injected"):
        pair.fast(images(rng, 20))
    for name, value in pair.fast_model.state_dict().items():
        assert np.array_equal(value, before[name]), name
    assert not cpu_plan._region_lock.locked()
    pair.step(images(rng, 20))


def test_a_single_value_per_channel_runs_eagerly_and_says_why():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    compiled = gpuconv.compile(model)
    x = np.ones((1, 1, 3, 3), np.float32)  # a 1x1 map of one image
    assert not compiled.uses_executor(x)
    with pytest.raises(ShapeError, match="more than one value per channel"):
        compiled(x)
    assert compiled.uses_executor(np.ones((2, 1, 3, 3), np.float32))


def test_a_plan_without_meetings_refuses_a_generator_that_yields():
    """finish() runs steps where no meeting can come; a yield there is a bug, raised, not hidden."""
    def steps():
        yield (cpu_ops.BatchNormTrainOp(nn.BatchNorm2d(1), 0), "sum", None, 1)

    with pytest.raises(RuntimeError, match="sums over the whole batch"):
        cpu_ops.finish(steps())


# ----------------------------------------------------------------------------------------------
# hostile: Ctrl-C between the rounds of a forward, in a child process under a hard timeout

CHILD_PRELUDE = r'''
import faulthandler, json, os, signal, sys, time
faulthandler.dump_traceback_later(float(os.environ["HOSTILE_HANG_S"]), exit=True)
import numpy as np
import gpuconv
from gpuconv import blas, nn
from gpuconv.models import ResNet
from gpuconv.nn import cpu_plan
cpu_plan.processes = False


def emit(**results):
    print("RESULT " + json.dumps(results), flush=True)
'''


@pytest.mark.parametrize("where", [("_in_rounds", "reply = op.meet("), ("forward_steps", "invstd = 1 / np.sqrt(var"),
                                   ("backward_steps", "dx = gradients(scratch)")],
                         ids=["at a meeting", "in the caller's part", "in the backward's part"])
def test_ctrl_c_between_the_rounds_leaves_the_model_as_it_was(tmp_path, where):
    """SIGINT's KeyboardInterrupt in the middle of a training step that meets: at the caller's
    meeting, or inside the caller's part of a round (the worker's part of that round finishes
    first). The step raises it; the lock is free, the BLAS count and the switch interval are
    restored, the running statistics are as before a forward that failed, and the next step
    gives the eager model's results."""
    import hostile_child
    function, line = where
    r = hostile_child.run_child(tmp_path, CHILD_PRELUDE, r'''
        signal.signal(signal.SIGINT, signal.default_int_handler)
        function, line = ''' + repr(function) + ", " + repr(line) + r'''
        eager, model = ResNet(8, in_channels=1, num_classes=5, seed=3), ResNet(8, in_channels=1, num_classes=5, seed=3)
        compiled = gpuconv.compile(model)
        x = np.random.default_rng(0).standard_normal((64, 1, 8, 8)).astype(np.float32)
        before = {name: np.array(value, copy=True) for name, value in model.state_dict().items()}
        blas_before, interval = blas.get_num_threads(), sys.getswitchinterval()

        def step():
            model.zero_grad()
            y = compiled(gpuconv.tensor(x))
            (y * y).sum().backward()

        fired, interrupted = interrupted_at(function, line, step)
        if function != "backward_steps":  # a forward that failed updated nothing
            unchanged = all(np.array_equal(value, before[name]) for name, value in model.state_dict().items())
        else:  # the forward ran whole: one update, as eagerly
            eager(x)
            unchanged = all(np.allclose(value, eager.state_dict()[name], rtol=1e-5, atol=1e-6)
                            for name, value in model.state_dict().items())
        settings = (not cpu_plan._region_lock.locked(), blas.get_num_threads() == blas_before,
                    sys.getswitchinterval() == interval)
        eager.zero_grad()
        model.zero_grad()
        y_eager = eager(gpuconv.tensor(x))
        (y_eager * y_eager).sum().backward()
        y = compiled(gpuconv.tensor(x))
        (y * y).sum().backward()
        scale = max(float(np.abs(p.grad).max()) for p in eager.parameters())
        worst = max(float(np.abs(a.grad - b.grad).max()) for a, b in zip(model.parameters(), eager.parameters()))
        emit(fired=fired, interrupted=interrupted, unchanged=unchanged, settings=settings,
             same_out=bool(np.allclose(y.data, y_eager.data, rtol=1e-4, atol=1e-5)), grad_error=worst / scale,
             planned=compiled.uses_executor(x))
    ''', hang_s=60, name="ctrl_c_rounds")
    assert r["fired"] and r["interrupted"], r
    assert r["unchanged"] and all(r["settings"]), r
    assert r["planned"] and r["same_out"] and r["grad_error"] < 1e-4, r


def test_a_pending_backward_survives_a_forward_with_one_norm_switched(workers, rng):
    """A forward in training, one BatchNorm switched to eval, a forward, the first forward's
    backward: each combination of the BatchNorms' modes has a plan of its own
    (cpu_plan.batch_norm_modes), so the second forward does not recompile the first's plan."""
    other = images(rng, 20)

    def one_norm_in_eval(network, model):
        model[1].eval()
        network(other)
        model[1].train()
    Pair(residual_net).backward_after(images(rng, 20), one_norm_in_eval)


def test_training_beside_a_blas_thread_and_a_piped_subprocess(tmp_path):
    """Another thread multiplies matrices (OpenBLAS) the whole time a compiled ResNet with
    BatchNorms that train takes SGD steps, and a subprocess with a pipe runs between steps: two
    such runs end on the same bits, close to the eager model's weights, with the lock free, the
    BLAS count and the switch interval as before, and the subprocess's output read whole."""
    import hostile_child
    r = hostile_child.run_child(tmp_path, CHILD_PRELUDE, r'''
        import hashlib, subprocess, threading
        blas_before, interval = blas.get_num_threads(), sys.getswitchinterval()
        stop = threading.Event()

        def blas_work():
            a = np.ones((256, 256), np.float32)
            while not stop.is_set():
                a @ a

        def train(compiled_run):
            model = ResNet(8, in_channels=1, num_classes=5, seed=3)
            network = gpuconv.compile(model) if compiled_run else model
            optimizer = gpuconv.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            data, echoed = np.random.default_rng(1), []
            for _ in range(3):
                x = data.standard_normal((48, 1, 8, 8)).astype(np.float32)
                labels = data.integers(0, 5, 48)
                optimizer.zero_grad()
                gpuconv.functional.cross_entropy(network(x), labels).backward()
                optimizer.step()
                echoed.append(subprocess.run([sys.executable, "-c", "print('x' * 100000)"], capture_output=True,
                                             text=True, timeout=30).stdout.strip() == "x" * 100000)
            weights = [p.data.copy() for p in model.parameters()]
            return weights, hashlib.sha256(b"".join(w.tobytes() for w in weights)).hexdigest(), all(echoed)

        other = threading.Thread(target=blas_work)
        other.start()
        try:
            first, second, eager = train(True), train(True), train(False)
        finally:
            stop.set()
            other.join()
        worst = max(float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12)) for a, b in zip(first[0], eager[0]))
        emit(same_bits=first[1] == second[1], worst=worst, piped=first[2] and second[2],
             settings=[not cpu_plan._region_lock.locked(), blas.get_num_threads() == blas_before,
                       sys.getswitchinterval() == interval])
    ''', hang_s=120, name="blas_thread_pipe")
    assert r["same_bits"] and r["piped"] and all(r["settings"]), r
    assert r["worst"] < 1e-3, r
