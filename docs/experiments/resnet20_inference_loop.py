"""ResNet-20 inference at batch 128 as the bench's inference row runs it (eval mode, gpuconv.compile,
under no_grad), on one random CIFAR-shaped batch: the time a user sees, in a process without
PyTorch. For an A/B of two commits, run it with PYTHONPATH pointing at each commit's checkout in turn:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE PYTHONPATH=../old python docs/experiments/resnet20_inference_loop.py old
"""
import sys
import time

import numpy as np

import gpuconv
from gpuconv.bench import zoo

model = zoo.build("resnet20", "cifar10")
model.eval()
net = gpuconv.compile(model)
x = np.random.default_rng(0).standard_normal((128, 3, 32, 32)).astype(np.float32)
times = []
for _ in range(16):
    start = time.perf_counter()
    with gpuconv.no_grad():
        net(x)
    times.append(time.perf_counter() - start)
label = sys.argv[1] if len(sys.argv) > 1 else ""
runs = times[6:]
print(label, f"median of runs 7-16: {np.median(runs) * 1e3:.1f} ms (min {min(runs) * 1e3:.1f}, max {max(runs) * 1e3:.1f}),",
      "one plan" if net.uses_executor(x) else "eager")
