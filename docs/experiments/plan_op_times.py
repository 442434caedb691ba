"""Where a compiled InceptionNet training step spends its time on one thread: each op class's
forward and backward wrapped in a timer (a residual or Concat op's time includes its branches'
ops, which are also counted under their own classes, so the Concat's own copies and sums are the
step's time less the leaf ops'). 64 images, 0 workers, 10 steps after 3. Run from the repository
root, on a quiet machine:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python docs/experiments/plan_op_times.py
"""
import collections
import time

import numpy as np

import gpuconv
from gpuconv import functional as F
from gpuconv import optim
from gpuconv.models import InceptionNet
from gpuconv.nn import cpu_ops

LEAVES = (cpu_ops.ConvOp, cpu_ops.ActivationOp, cpu_ops.PoolOp, cpu_ops.GlobalAvgPoolOp, cpu_ops.LinearOp,
          cpu_ops.FlattenOp)


def main(steps=10):
    totals = collections.defaultdict(float)

    def timed(cls, name):
        method = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            finally:
                label = cls.__name__ + ("/pool" if getattr(self, "pool", None) else "")
                totals[(label, name)] += time.perf_counter() - start
        setattr(cls, name, wrapper)

    for cls in LEAVES:
        timed(cls, "forward")
        timed(cls, "backward")
    gpuconv.set_cpu_workers(0)
    model = InceptionNet(3, 10, 32)
    net = gpuconv.compile(model)
    rng = np.random.default_rng(0)
    opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, labels = rng.standard_normal((64, 3, 32, 32)).astype(np.float32), rng.integers(0, 10, 64)

    def step():
        opt.zero_grad()
        F.cross_entropy(net(gpuconv.tensor(images)), labels).backward()
        opt.step()

    for _ in range(3):
        step()
    totals.clear()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    print(f"step (64 images, 1 thread): {(time.perf_counter() - start) / steps * 1e3:.1f} ms")
    for key, seconds in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"  {key}: {seconds / steps * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
