"""Memory a compiled ResNet-20 in eval mode (BatchNorm a per-channel map) holds after three
training steps at batch 128, parts in threads: tracemalloc's current and peak from before the
first step (NumPy reports its allocations to tracemalloc). Run from the root of each checkout to
compare:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE PYTHONPATH=. python docs/experiments/eval_bn_step_memory.py
"""
import tracemalloc

import gpuconv
from gpuconv import functional as F
from gpuconv import optim
from gpuconv.bench import zoo
from gpuconv.nn import cpu_plan


def main(batch=128, steps=3):
    cpu_plan.processes = False
    dataset = zoo.default_dataset("resnet20")
    model = zoo.build("resnet20", dataset, seed=0)
    x, labels = zoo.random_batch(dataset, batch, 0)
    net = gpuconv.compile(model)
    net.eval()
    optimizer = optim.SGD(model.parameters(), lr=1e-3)
    tracemalloc.start()
    for _ in range(steps):
        loss = F.cross_entropy(net(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    current, peak = tracemalloc.get_traced_memory()
    print(f"held {current / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
