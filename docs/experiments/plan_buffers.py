"""What the CPU executor's plan keeps for a zoo model (InceptionNet, or the one named on the
command line: resnet20) at batch 128 after one training step on the caller's thread alone (0
workers): every array in the chunks' stores (kept for the backward) and the thread's scratch
(reused chunk after chunk), summed by its key's last word, and the ops' own gradient buffers
("dx") by op type. Run from the repository root:

    python docs/experiments/plan_buffers.py [resnet20]
"""
import collections
import sys

import numpy as np

import gpuconv
from gpuconv import functional as F
from gpuconv.bench import zoo
from gpuconv.nn import cpu_ops


def main(model="inception", batch=128):
    gpuconv.set_cpu_workers(0)
    net = gpuconv.compile(zoo.build(model, zoo.default_dataset(model)))
    x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    F.cross_entropy(net(gpuconv.tensor(x)), np.zeros(batch, int)).backward()
    plan = net._current_segments()[0].plan  # the whole model's, in training mode
    by_kind = collections.defaultdict(int)
    places = [("store", chunk.store) for part in plan.parts for chunk in part]
    places += [("scratch", scratch) for scratch in plan.scratch]
    for place, arrays in places:
        for key, array in arrays.items():
            if isinstance(array, np.ndarray):
                by_kind[f"{place}:{key[-1] if isinstance(key, tuple) else key}"] += array.nbytes
            elif isinstance(array, cpu_ops.GradientPool):  # the ops' gradient buffers, lent and given back
                by_kind[f"{place}:{key}"] += sum(flat.nbytes for flat in array.flats)
    print(f"total {sum(by_kind.values()) / 2**20:.1f} MiB")
    for kind, size in sorted(by_kind.items(), key=lambda item: -item[1]):
        print(f"  {kind}: {size / 2**20:.1f} MiB")

    ops = {}

    def walk(chain):
        for op in chain:
            ops[op.index] = op
            if isinstance(op, cpu_ops.BranchingOp):
                walk(op.ops())

    walk(plan.ops)
    gradients = collections.defaultdict(int)
    for scratch in plan.scratch:
        for key, array in scratch.items():
            if isinstance(key, tuple) and key[-1] == "dx":
                gradients[type(ops[key[0]]).__name__] += array.nbytes
    print("gradient buffers by op:", {kind: f"{size / 2**20:.1f} MiB" for kind, size in gradients.items()})


if __name__ == "__main__":
    main(*sys.argv[1:])
