"""Shared fixtures: seeded generators, dtypes, and the `gpu` marker (Chainer-style)."""
import numpy as np
import pytest

import gpuconv


def pytest_collection_modifyitems(config, items):
    if gpuconv.cuda_available():
        return
    reason = "needs a CUDA GPU: " + gpuconv.backend.cuda_status()[1]
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(params=[np.float32, np.float64], ids=["float32", "float64"])
def dtype(request):
    return request.param


@pytest.fixture(params=["processes", "threads"])
def worker_kind(request, monkeypatch):
    """The CPU executor's parts after the first in worker processes or in worker threads, with one
    worker whatever the machine has, so that a batch of 48 or more is split in two (MIN_CHUNK 24).
    Yields "processes" or "threads"."""
    from gpuconv.nn import cpu_plan
    monkeypatch.setattr(cpu_plan, "processes", request.param == "processes")
    gpuconv.set_cpu_workers(1)
    yield request.param
    gpuconv.set_cpu_workers(None)


@pytest.fixture
def one_worker():
    """One worker (threads or processes, as cpu_plan.processes says) for the test, the count from
    before restored after it."""
    from gpuconv.nn import cpu_plan
    before = cpu_plan._worker_count
    cpu_plan.set_cpu_workers(1)
    yield
    cpu_plan._worker_count = before


@pytest.fixture
def fresh_worker_processes():
    """Worker processes started inside the test (they inherit stderr as capfd has it then)."""
    from gpuconv.nn import cpu_workers
    cpu_workers.close()
    yield
    cpu_workers.close()
