"""The caller's np.errstate holds for the parts of its work that run elsewhere (gpuconv/fpenv.py):
a compiled model's parts in worker threads or processes, an eager conv's parts in worker threads.

Every batch here overflows in its second half only, which the worker runs (equal parts, the
caller's first: cpu_plan._split), so whatever NumPy reports can only come from the worker's part.
Before: the worker warned from its own thread under NumPy's default policy (a worker process on
stderr, past the caller's warning filters), whatever the caller had asked for: no
FloatingPointError under errstate(all='raise'), warnings under errstate(all='ignore')."""
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

import gpuconv
from gpuconv import functional as F
from gpuconv.models import LeNet5

BATCH = 128  # two parts of 64 with one worker


def overflowing_batch():
    """LeNet-5 images whose second half makes its first conv overflow to inf (and inf - inf NaN)."""
    x = np.full((BATCH, 1, 28, 28), 0.5, np.float32)
    x[BATCH // 2:] = 3.3e38
    return x


def run_under_dev_mode(tmp_path, source):
    """`source` as a script run by a fresh `python -X dev` (ResourceWarnings shown), with this
    checkout importable; hard timeout -> CompletedProcess."""
    script = tmp_path / "child.py"
    script.write_text(source)
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-X", "dev", str(script)], capture_output=True, text=True,
                          timeout=120, env=env)


def compiled_lenet():
    net = gpuconv.compile(LeNet5())
    assert net.uses_executor(overflowing_batch())
    return net


class Reported:
    """What NumPy's policy did in a block: warnings (with their thread and file), callback calls."""

    def __init__(self):
        self.warnings, self.calls = [], []

    def show(self, message, category, filename, lineno, file=None, line=None):
        self.warnings.append((category, str(message), threading.current_thread(), filename))

    def call(self, name, flag):
        self.calls.append((name, flag, threading.current_thread()))


@pytest.fixture
def reported(monkeypatch):
    seen = Reported()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        monkeypatch.setattr(warnings, "showwarning", seen.show)
        yield seen


def run_compiled_forward():
    return compiled_lenet()(gpuconv.tensor(overflowing_batch()))


def run_eager_conv():
    x = overflowing_batch()
    w = np.full((6, 1, 5, 5), 0.5, np.float32)
    return F.conv2d(gpuconv.tensor(x), gpuconv.tensor(w))


# An eager op's parts always run in threads (the arrays are the caller's); a compiled model's in
# worker processes or threads (worker_kind)
RUNS = {"compiled forward, processes": ("processes", run_compiled_forward),
        "compiled forward, threads": ("threads", run_compiled_forward),
        "eager conv2d, threads": ("threads", run_eager_conv)}


@pytest.fixture(params=RUNS)
def run(request, monkeypatch):
    from gpuconv.nn import cpu_plan
    kind, function = RUNS[request.param]
    monkeypatch.setattr(cpu_plan, "processes", kind == "processes")
    gpuconv.set_cpu_workers(1)
    yield function
    gpuconv.set_cpu_workers(None)


def test_raise_gives_the_callers_floating_point_error(run):
    with np.errstate(all="raise"), pytest.raises(FloatingPointError, match="^overflow encountered in .*run in parts on CPU workers$"):
        run()


def test_ignore_reports_nothing_from_any_part(fresh_worker_processes, run, reported, capfd):
    with np.errstate(all="ignore"):
        out = run()
    assert not np.isfinite(out.data).all()  # the errors did happen
    assert reported.warnings == []
    assert "RuntimeWarning" not in capfd.readouterr().err  # nor from a worker process's stderr


def test_warn_warns_once_per_kind_from_the_callers_thread_and_line(fresh_worker_processes, run, reported,
                                                                  capfd):
    with np.errstate(all="warn"):
        run()
    assert reported.warnings, "no warning for the worker's overflow"
    for category, message, thread, filename in reported.warnings:
        assert category is RuntimeWarning
        assert message.endswith("run in parts on CPU workers")
        assert thread is threading.current_thread()
        assert filename == __file__  # the user's line that called into gpuconv, as NumPy names it
    messages = [message for _, message, _, _ in reported.warnings]
    assert any(message.startswith("overflow encountered") for message in messages)
    # once per kind and region: a compiled forward whose output is not finite runs again eagerly
    # (gpuconv/compiler.py), which is a second region
    assert len(messages) == len(set(messages))
    assert "RuntimeWarning" not in capfd.readouterr().err


def test_call_runs_the_callback_in_the_callers_thread(worker_kind, reported):
    with np.errstate(all="call", call=reported.call):
        run_compiled_forward()
    assert reported.calls
    names = [name for name, _, _ in reported.calls]
    assert "overflow" in names
    assert all(thread is threading.current_thread() for _, _, thread in reported.calls)
    assert all(flag & 2 for name, flag, _ in reported.calls if name == "overflow")  # NumPy's overflow bit


def test_the_kinds_the_caller_ignores_stay_ignored(worker_kind, reported):
    with np.errstate(over="ignore", invalid="raise", divide="ignore", under="ignore"), \
            pytest.raises(FloatingPointError, match="^invalid value encountered"):
        run_compiled_forward()
    assert reported.warnings == []


def test_a_backward_part_reports_too(worker_kind, reported):
    """A finite forward whose output gradient overflows in the worker's rows of the backward."""
    model = LeNet5()
    net = gpuconv.compile(model)
    x = np.full((BATCH, 1, 28, 28), 0.5, np.float32)
    out = net(gpuconv.tensor(x))
    dy = np.ones(out.shape, np.float32)
    dy[BATCH // 2:] = 3.3e38
    with np.errstate(all="raise"), pytest.raises(FloatingPointError, match="compiled model's backward"):
        out.backward(gpuconv.tensor(dy))


def test_no_error_no_report_and_the_same_bits(worker_kind, reported):
    """Nothing overflows: no warning, and the parts' outputs are those without any errstate."""
    x = np.full((BATCH, 1, 28, 28), 0.5, np.float32)
    net = compiled_lenet()
    plain = net(gpuconv.tensor(x)).data.copy()
    with np.errstate(all="raise"):
        strict = net(gpuconv.tensor(x)).data
    assert reported.warnings == []
    np.testing.assert_array_equal(strict, plain)


def test_worker_processes_are_closed_at_exit(tmp_path):
    """A program that used worker processes exits without ResourceWarnings: the pool closes its
    sockets and reaps its workers at exit (before: 'subprocess ... is still running' and 'unclosed
    socket' under python -X dev). Child process, hard timeout."""
    done = run_under_dev_mode(tmp_path, (
        "import numpy as np, gpuconv\n"
        "from gpuconv.models import LeNet5\n"
        "from gpuconv.nn import cpu_plan, cpu_workers\n"
        "cpu_plan.processes = True\n"
        "gpuconv.set_cpu_workers(1)\n"
        "gpuconv.compile(LeNet5())(gpuconv.tensor(np.zeros((128, 1, 28, 28), np.float32)))\n"
        "assert cpu_workers._pool.processes, 'no worker process started'\n"
        "print('ran')\n"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ran"
    assert "ResourceWarning" not in done.stderr, done.stderr


@pytest.mark.parametrize("mode", ["raise", "warn"])
def test_a_region_that_raised_reports_nothing_more(worker_kind, reported, monkeypatch, mode):
    """The caller's part raises (a ValueError here, after its rows ran) while the worker's part
    met an overflow: the caller gets its ValueError alone, neither replaced by a FloatingPointError
    nor followed by a warning; the next region reports nothing left over."""
    from gpuconv.nn import cpu_plan
    run_forward = cpu_plan._Plan.run_forward

    def failing_in_part_0(self, thread, *arrays):
        result = run_forward(self, thread, *arrays)
        if thread == 0:
            raise ValueError("the caller's part failed")
        return result

    net = compiled_lenet()
    monkeypatch.setattr(cpu_plan._Plan, "run_forward", failing_in_part_0)
    with np.errstate(all=mode), pytest.raises(ValueError, match="the caller's part failed") as caught:
        net(gpuconv.tensor(overflowing_batch()))
    assert caught.value.__context__ is None
    assert reported.warnings == []
    monkeypatch.setattr(cpu_plan._Plan, "run_forward", run_forward)
    with np.errstate(all="raise"):
        net(gpuconv.tensor(np.full((BATCH, 1, 28, 28), 0.5, np.float32)))


def test_an_exit_handler_runs_a_compiled_model_after_the_workers_closed(tmp_path):
    """An atexit handler of the user's, registered before gpuconv started its workers (so it runs
    after gpuconv's exit close), runs the compiled model: in threads, the same bits as before,
    no worker process started at exit (no ResourceWarning under python -X dev). Child process,
    hard timeout."""
    done = run_under_dev_mode(tmp_path, (
        "import atexit, numpy as np, gpuconv\n"
        "from gpuconv.models import LeNet5\n"
        "from gpuconv.nn import cpu_plan, cpu_workers\n"
        "cpu_plan.processes = True\n"
        "gpuconv.set_cpu_workers(1)\n"
        "net = gpuconv.compile(LeNet5())\n"
        "x = gpuconv.tensor(np.random.default_rng(0).random((128, 1, 28, 28), dtype=np.float32))\n"
        "def at_exit():\n"
        "    again = net(x).data\n"
        "    assert not cpu_workers._pool.processes, 'a worker process started at exit'\n"
        "    print('same bits' if np.array_equal(again, first) else 'different bits', flush=True)\n"
        "atexit.register(at_exit)\n"
        "first = net(x).data.copy()\n"
        "assert cpu_workers._pool.processes, 'no worker process ran'\n"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "same bits"
    assert "ResourceWarning" not in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_forward_recomputed_for_its_backward_reports_nothing_again(worker_kind):
    """Two forwards, then the first one's backward: the plan runs that forward again for its
    activations (compiler.PlanFunction.backward). Its underflow was reported when it first ran;
    the recomputation reports nothing more (the backward's own products do not underflow here)."""
    from gpuconv import nn
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
    model[0].weight.data[...] = 1e-20
    x = gpuconv.tensor(np.full((BATCH, 1, 6, 6), 1e-20, np.float32))  # products of 1e-40: underflow
    net = gpuconv.compile(model)
    assert net.uses_executor(x.data)
    calls = []
    with np.errstate(under="call", call=lambda name, flag: calls.append(name)):
        first = net(x)
        assert calls == ["underflow"]
        net(x)
        assert calls == ["underflow"] * 2
        first.backward(gpuconv.tensor(np.ones(first.shape, np.float32)))
    assert calls == ["underflow"] * 2
    assert np.isfinite(model[0].weight.grad).all()
