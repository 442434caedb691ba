"""LeNet-5's compiled training step at batch 128 on two cores: with the caller alone (0 workers),
with its default worker, the fixed cost of a step (batch 2, caller alone), and, with the worker,
how long the caller's own part of each region takes against the region. Medians of 60 steps
after 10 (100 for the parts). Run from the repository root:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE PYTHONPATH=. python docs/experiments/lenet_two_cores.py
"""
import collections
import time

import numpy as np

import gpuconv
from gpuconv import functional as F
from gpuconv import optim
from gpuconv.models import LeNet5
from gpuconv.nn import cpu_plan, cpu_workers


def step_function(batch):
    model = LeNet5()
    net = gpuconv.compile(model)
    optimizer = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    x = gpuconv.tensor(rng.standard_normal((batch, 1, 28, 28)).astype(np.float32))
    labels = rng.integers(0, 10, batch)

    def step():
        optimizer.zero_grad()
        loss = F.cross_entropy(net(x), labels)
        loss.backward()
        optimizer.step()
        loss.item()
    return step


def median_step_ms(batch, workers, steps=60, warmup=10):
    gpuconv.set_cpu_workers(workers)
    step = step_function(batch)
    times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    gpuconv.set_cpu_workers(None)
    return 1e3 * np.median(times[warmup:])


def parts_ms(steps=100):
    """Medians of the caller's own part and of the whole region, forward and backward."""
    times = collections.defaultdict(list)

    def timed(owner, name, label):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                times[label(*args)].append(time.perf_counter() - start)
        setattr(owner, name, wrapper)
        return original

    saved = [(cpu_plan._Plan, "run_forward", timed(cpu_plan._Plan, "run_forward", lambda *a: "own forward")),
             (cpu_plan._Plan, "run_backward", timed(cpu_plan._Plan, "run_backward", lambda *a: "own backward")),
             (cpu_workers, "run_parallel", timed(cpu_workers, "run_parallel", lambda plan, kind, *a: "region " + kind))]
    try:
        step = step_function(128)
        for _ in range(20):
            step()
        times.clear()
        for _ in range(steps):
            step()
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
    return {label: 1e3 * np.median(values) for label, values in times.items()}


def main():
    print(f"batch 128, the caller alone: {median_step_ms(128, 0):.2f} ms")
    print(f"batch 128, the default workers: {median_step_ms(128, None):.2f} ms")
    print(f"batch 2, the caller alone (a step's fixed cost): {median_step_ms(2, 0):.2f} ms")
    if cpu_plan.processes and cpu_workers.supported():
        for label, ms in sorted(parts_ms().items()):
            print(f"  {label}: {ms:.2f} ms")


if __name__ == "__main__":
    main()
