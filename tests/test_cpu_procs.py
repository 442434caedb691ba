"""Worker processes for the CPU plan (gpuconv.nn.cpu_procs): the same bits as worker threads,
errors and deaths reach the caller, and no worker outlives its plan or layout."""
import gc
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gpuconv import blas, optim
from gpuconv import functional as F
from gpuconv.errors import WorkerError
from gpuconv.models import LeNet5
from gpuconv.nn import cpu_ops, cpu_plan, cpu_procs

pytestmark = pytest.mark.skipif(not cpu_procs.supported(), reason="worker processes run on Linux x86-64 only")


@pytest.fixture(params=[2, 3], ids=["2parts", "3parts"])
def parts(request, monkeypatch):
    monkeypatch.setattr(blas, "get_num_threads", lambda: request.param)
    monkeypatch.setattr(blas, "available", lambda: True)
    monkeypatch.setattr(cpu_plan, "MIN_CHUNK", 2)
    return request.param


@pytest.fixture
def two_parts(monkeypatch):
    """Two parts (one worker) whatever this machine has."""
    monkeypatch.setattr(blas, "get_num_threads", lambda: 2)
    monkeypatch.setattr(cpu_plan, "MIN_CHUNK", 2)


def step(model, x, labels, optimizer=None):
    logits = model(x)
    _, dlogits = F.softmax_cross_entropy(logits, labels)
    dx = model.backward(dlogits, need_dx=True)
    grads = [p.grad.copy() for p in model.parameters()]
    if optimizer is not None:
        optimizer.step()
    return logits, dx, grads


def worker_pids(model):
    workers = cpu_plan._plans[model].workers
    return [pid for pid in workers.pids if pid is not None] if workers is not None else []


def gone(pid):
    """Reaped (not our child any more) and not running."""
    try:
        os.waitpid(pid, os.WNOHANG)
        return False
    except ChildProcessError:
        return not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def assert_same_steps(first, second):
    for (logits, dx, grads), (logits2, dx2, grads2) in zip(first, second):
        np.testing.assert_array_equal(logits, logits2)
        np.testing.assert_array_equal(dx, dx2)
        for grad, grad2 in zip(grads, grads2):
            np.testing.assert_array_equal(grad, grad2)


@pytest.mark.parametrize("batch", [37, 128])
def test_processes_give_the_thread_plans_bits(batch, parts, rng, monkeypatch):
    """Two SGD steps each way: parameters change between regions, and the workers must see it."""
    x = rng.random((batch, 1, 28, 28), dtype=np.float32)
    labels = rng.integers(0, 10, batch)
    runs = {}
    for processes in (False, True):
        monkeypatch.setattr(cpu_plan, "processes", processes)
        model = LeNet5(seed=4)
        optimizer = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        runs[processes] = [step(model, x, labels, optimizer) for _ in range(3)]
        assert len(worker_pids(model)) == (parts - 1 if processes else 0)
    assert_same_steps(runs[False], runs[True])


def test_a_workers_exception_reaches_the_caller(rng, monkeypatch, two_parts):
    parent = os.getpid()
    backward = cpu_ops.LinearOp.backward

    def failing_in_workers(self, *args):
        if os.getpid() != parent:
            raise ValueError("broken in the worker")
        return backward(self, *args)

    monkeypatch.setattr(cpu_ops.LinearOp, "backward", failing_in_workers)  # inherited by the fork
    model = LeNet5(seed=1)
    x, labels = rng.random((8, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 8)
    with pytest.raises(WorkerError, match=r"part 1 .*ValueError: broken in the worker"):
        step(model, x, labels)
    with pytest.raises(RuntimeError, match="broken in the worker"):  # forked again, fails again
        step(model, x, labels)
    monkeypatch.setattr(cpu_ops.LinearOp, "backward", backward)
    fixed = step(model, x, labels)  # a fresh worker without the patch
    monkeypatch.setattr(cpu_plan, "processes", False)
    assert_same_steps([fixed], [step(LeNet5(seed=1), x, labels)])


def test_a_worker_that_dies_is_reported_and_replaced(rng, monkeypatch, two_parts):
    parent = os.getpid()
    forward = cpu_ops.LinearOp.forward

    def dying_in_workers(self, *args):
        if os.getpid() != parent:
            os._exit(3)
        return forward(self, *args)

    monkeypatch.setattr(cpu_ops.LinearOp, "forward", dying_in_workers)
    model = LeNet5(seed=1)
    x, labels = rng.random((8, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 8)
    with pytest.raises(WorkerError, match="part 1 .* exited with status 3"):
        model(x)
    monkeypatch.setattr(cpu_ops.LinearOp, "forward", forward)
    first = step(model, x, labels)
    os.kill(worker_pids(model)[0], signal.SIGKILL)  # killed while idle: forked again unnoticed
    time.sleep(0.05)
    assert_same_steps([first], [step(model, x, labels)])


def test_no_worker_outlives_its_model_or_layout(rng, parts):
    model = LeNet5(seed=2)
    x, labels = rng.random((16, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 16)
    step(model, x, labels)
    first = worker_pids(model)
    assert len(first) == parts - 1 and not any(gone(pid) for pid in first)
    step(model, x[:12], labels[:12])  # relayout
    second = worker_pids(model)
    assert len(second) == parts - 1 and all(gone(pid) for pid in first)
    model.eval()  # a training flag the workers were not forked with
    step(model, x[:12], labels[:12])
    third = worker_pids(model)
    assert set(third).isdisjoint(second) and all(gone(pid) for pid in second)
    del model
    gc.collect()
    assert all(gone(pid) for pid in third)


def test_workers_sleep_when_idle_and_wake_up(rng, two_parts):
    model = LeNet5(seed=3)
    x, labels = rng.random((8, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 8)
    first = step(model, x, labels)
    control = cpu_plan._plans[model].workers.control[0]
    deadline = time.monotonic() + 5
    while control[cpu_procs.SLEEPING] != 1 and time.monotonic() < deadline:
        time.sleep(cpu_procs.SPIN_SECONDS)
    assert control[cpu_procs.SLEEPING] == 1
    start = time.perf_counter()
    again = step(model, x, labels)
    assert time.perf_counter() - start < 5  # woken by the pipe (or at worst its 10 ms poll)
    assert_same_steps([first], [again])


def test_a_forked_process_forks_its_own_workers(rng, two_parts):
    model = LeNet5(seed=3)
    x, labels = rng.random((8, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 8)
    expected = step(model, x, labels)
    inherited = worker_pids(model)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            again = step(model, x, labels)
            own = worker_pids(model)
            assert_same_steps([expected], [again])
            code = 0 if own and set(own).isdisjoint(inherited) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert worker_pids(model) == inherited and not any(gone(p) for p in inherited)
    assert_same_steps([expected], [step(model, x, labels)])


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="checks /proc")
def test_workers_end_with_the_interpreter():
    script = (
        "import numpy as np\n"
        "from gpuconv import blas\n"
        "from gpuconv.models import LeNet5\n"
        "from gpuconv.nn import cpu_plan\n"
        "blas.get_num_threads = lambda: 2\n"
        "cpu_plan.MIN_CHUNK = 2\n"
        "model = LeNet5()\n"
        "model(np.zeros((4, 1, 28, 28), np.float32))\n"
        "print(*cpu_plan._plans[model].workers.pids)\n")
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(cpu_plan.__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [checkout, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    pids = [int(pid) for pid in done.stdout.split()]
    assert pids
    deadline = time.monotonic() + 5
    while any(os.path.exists(f"/proc/{pid}") for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)


def test_workers_forked_by_a_thread_that_ended_are_replaced(rng, two_parts):
    """On Linux a worker dies with the thread that forked it (PR_SET_PDEATHSIG); the next region
    forks a new one instead of failing."""
    import threading
    model = LeNet5(seed=5)
    x, labels = rng.random((8, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 8)
    results = []
    thread = threading.Thread(target=lambda: results.append(step(model, x, labels)))
    thread.start()
    thread.join()
    assert_same_steps(results, [step(model, x, labels)])


def test_the_blas_thread_count_survives_process_regions(rng):
    if not blas.available():
        pytest.skip("NumPy's BLAS is not an OpenBLAS whose threads can be set")
    model = LeNet5(seed=6)
    x, labels = rng.random((64, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 64)
    a = rng.random((300, 300), dtype=np.float32)
    with blas.num_threads(2):
        step(model, x, labels)
        step(model, x, labels)
        assert len(worker_pids(model)) == 1 and blas.get_num_threads() == 2
        np.testing.assert_allclose(a @ a, a.astype(np.float64) @ a, rtol=1e-4)  # a threaded GEMM after the fork
