"""A ResNet-20 training loop as `python -m gpuconv train --model resnet20` runs it (gpuconv.compile,
cross-entropy, backward, SGD with momentum), on random CIFAR-shaped batches, a new batch each
step: the step time a user sees, in a process without PyTorch. For an A/B of two commits, run it
with PYTHONPATH pointing at each commit's checkout in turn:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE PYTHONPATH=../old python docs/experiments/resnet20_step_loop.py old
"""
import sys
import time

import numpy as np

import gpuconv
from gpuconv import functional as F
from gpuconv import optim
from gpuconv.bench import zoo

model = zoo.build("resnet20", "cifar10")
net = gpuconv.compile(model)
rng = np.random.default_rng(0)
opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
times = []
for _ in range(16):
    images = rng.standard_normal((128, 3, 32, 32)).astype(np.float32)
    labels = rng.integers(0, 10, 128)
    start = time.perf_counter()
    opt.zero_grad()
    F.cross_entropy(net(gpuconv.tensor(images)), labels).backward()
    opt.step()
    times.append(time.perf_counter() - start)
label = sys.argv[1] if len(sys.argv) > 1 else ""
print(label, f"median of steps 7-16: {np.median(times[6:]) * 1e3:.0f} ms; first {times[0] * 1e3:.0f} ms, "
      f"fastest {min(times) * 1e3:.0f} ms")
