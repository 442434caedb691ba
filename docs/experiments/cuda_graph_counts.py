"""What a training step allocates, reads back and launches per call, eager and as a captured CUDA
graph (gpuconv.cuda.graph), counted under kernel emulation with an emulated device (issue 17). A
record of how the figures were made, not part of gpuconv.

    PYTHONPATH=. python docs/experiments/cuda_graph_counts.py [MODEL [BATCH]]

MODEL: lenet5 (28x28x1, default) or another of the zoo (32x32x3); BATCH default 64.
"""
import collections
import sys

import numpy as np

from gpuconv import functional as F, optim
from gpuconv.backend import to_device
from gpuconv.cuda import emulated_devices, emulation
from gpuconv.cuda.graph import StaticStep
from gpuconv.models import build_model

name = sys.argv[1] if len(sys.argv) > 1 else "lenet5"
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 64
channels, size = (1, 28) if name == "lenet5" else (3, 32)
with emulation(devices=1), np.errstate(all="ignore"):
    for mode in ("eager", "graph"):
        model = build_model(name, channels, 10, size, seed=0).to("cuda:0")
        optimizer = optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
        step = StaticStep(lambda x, y: (lambda lg: (F.cross_entropy(lg, y), lg))(model(x)), optimizer, model)
        rng = np.random.default_rng(0)
        for call in range(4):
            x = to_device(rng.random((batch, channels, size, size), dtype=np.float32), "cuda:0")
            y = to_device(rng.integers(0, 10, batch), "cuda:0")
            with emulated_devices.recording() as events:
                step(x, y) if mode == "graph" else step.eager(x, y)
            kinds = collections.Counter(e.kind for e in events)
            print(f"{name} batch {batch} {mode} call {call + 1}: {kinds['alloc']} allocations "
                  f"({sum(e.nbytes for e in events if e.kind == 'alloc') / 1e6:.2f} MB), {kinds['read']} reads, "
                  f"{kinds['write']} host-to-device writes, {kinds['launch']} own/cuBLAS launches, {kinds['op']} CuPy ops")
