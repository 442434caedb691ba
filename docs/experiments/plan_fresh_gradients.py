"""A variant not kept: the plan's gradient buffers ("dx") allocated fresh at every backward (freed
as the backward moves on) instead of kept in the thread's scratch, against the code as it is, on
the zoo's InceptionNet training step at batch 128 with one worker thread, alternating step by step
in one process (24 rounds, the first 4 dropped). Run from the repository root, on a quiet machine:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python docs/experiments/plan_fresh_gradients.py

Its figures are of the code up to 4af6242: since 82d6efa the ops take their gradient buffers from
the thread's pool (cpu_ops.GradientPool), not from cpu_ops.buffer, and both arms run the same code.
"""
import time

import numpy as np

import gpuconv
from gpuconv import functional as F
from gpuconv import models, optim
from gpuconv.nn import cpu_ops, cpu_plan


def main(rounds=24):
    kept = cpu_ops.buffer
    fresh = {"on": False}

    def buffer(store, key, shape, zero=False, dtype=np.float32):
        if fresh["on"] and isinstance(key, tuple) and key[-1] == "dx":
            return np.zeros(shape, dtype) if zero else np.empty(shape, dtype)
        return kept(store, key, shape, zero, dtype)

    cpu_ops.buffer = models.cpu_ops.buffer = buffer
    cpu_plan.processes = False  # the variant lives in this process only
    gpuconv.set_cpu_workers(1)
    model = models.InceptionNet(3, 10, 32)
    net = gpuconv.compile(model)
    rng = np.random.default_rng(0)
    opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, labels = rng.standard_normal((128, 3, 32, 32)).astype(np.float32), rng.integers(0, 10, 128)
    times = {False: [], True: []}
    for _ in range(rounds):
        for on in (False, True):
            fresh["on"] = on
            start = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(net(gpuconv.tensor(images)), labels).backward()
            opt.step()
            times[on].append(time.perf_counter() - start)
    for on, values in times.items():
        values = np.array(values[4:]) * 1e3
        print(f"gradient buffers {'fresh' if on else 'kept'}: median {np.median(values):.1f} ms "
              f"({values.min():.1f}-{values.max():.1f})")


if __name__ == "__main__":
    main()
