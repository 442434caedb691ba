"""ResNet-20 training steps (eager, as gpuconv.compile runs them in training) alternating ReLU and the
residual add in parts over the cores (cpu_parts.elementwise) on and off, step by step in one
process: the machine's drift hits both alike. Off sets the thresholds out of reach.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python docs/experiments/elementwise_parts_step.py
"""
import time

import numpy as np

import gpuconv
from gpuconv import functional as F
from gpuconv import optim
from gpuconv.bench import zoo
from gpuconv.ops import activation, cpu_parts

model = zoo.build("resnet20", "cifar10"); net = gpuconv.compile(model)
opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
rng = np.random.default_rng(0)
defaults = (cpu_parts.ELEMENTWISE_MIN_BYTES, activation.RELU_MIN_BYTES)
def setting(on):
    cpu_parts.ELEMENTWISE_MIN_BYTES, activation.RELU_MIN_BYTES = defaults if on else (1 << 40, 1 << 40)
times = {True: [], False: []}
for i in range(64):
    on = i % 2 == 0
    setting(on)
    x = rng.standard_normal((128, 3, 32, 32)).astype(np.float32); y = rng.integers(0, 10, 128)
    t = time.perf_counter()
    opt.zero_grad(); F.cross_entropy(net(gpuconv.tensor(x)), y).backward(); opt.step()
    if i >= 8:
        times[on].append(time.perf_counter() - t)
for on in (False, True):
    a = np.array(times[on]) * 1e3
    print("parts" if on else "whole", "median %.0f ms (min %.0f, max %.0f), %d steps" % (np.median(a), a.min(), a.max(), len(a)))
