"""An Inception-like CNN (branches concatenated with nn.Concat, no batch norm: GoogLeNet's first
form) on random CIFAR-shaped batches: the training step and the inference of the model run eagerly
(op by op) and compiled (gpuconv.compile, where the Concat blocks lower into the CPU executor),
alternating step by step in one process, and with --torch the same network in PyTorch (2
threads, torch.cat in its forward) in the same rounds. Run from the repository root on a quiet
machine, with PyTorch from its own venv (never a dependency):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE PYTHONPATH=. ../torchvenv/bin/python docs/experiments/concat_step.py --torch
"""
import sys
import time

import numpy as np

import gpuconv
from gpuconv import functional as F
from gpuconv import nn, optim


def inception(c_in, c1, c3_reduce, c3, c5_reduce, c5, rng):
    """GoogLeNet's block without its pooling branch (a 3x3 max pool of stride 1 does not lower):
    1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 -> 3x3 (the 5x5 as two 3x3, as in Inception v2)."""
    return nn.Concat(
        nn.Sequential(nn.Conv2d(c_in, c1, 1, rng=rng), nn.ReLU()),
        nn.Sequential(nn.Conv2d(c_in, c3_reduce, 1, rng=rng), nn.ReLU(),
                      nn.Conv2d(c3_reduce, c3, 3, padding=1, rng=rng), nn.ReLU()),
        nn.Sequential(nn.Conv2d(c_in, c5_reduce, 1, rng=rng), nn.ReLU(),
                      nn.Conv2d(c5_reduce, c5, 3, padding=1, rng=rng), nn.ReLU(),
                      nn.Conv2d(c5, c5, 3, padding=1, rng=rng), nn.ReLU()))


def build(seed=0):
    rng = np.random.default_rng(seed)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, rng=rng), nn.ReLU(), nn.MaxPool2d(2),   # 32 x 16 x 16
        inception(32, 16, 16, 24, 8, 8, rng),                                  # 48 x 16 x 16
        inception(48, 24, 24, 32, 8, 16, rng), nn.MaxPool2d(2),                # 72 x 8 x 8
        inception(72, 32, 32, 48, 16, 16, rng),                                # 96 x 8 x 8
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, 10, rng=rng))


def torch_step_and_inference():
    """The same network in PyTorch -> (step(images, labels), inference(images))."""
    import torch
    torch.set_num_threads(2)

    class Inception(torch.nn.Module):
        def __init__(self, c_in, c1, c3_reduce, c3, c5_reduce, c5):
            super().__init__()
            relu = torch.nn.ReLU
            self.branches = torch.nn.ModuleList([
                torch.nn.Sequential(torch.nn.Conv2d(c_in, c1, 1), relu()),
                torch.nn.Sequential(torch.nn.Conv2d(c_in, c3_reduce, 1), relu(),
                                    torch.nn.Conv2d(c3_reduce, c3, 3, padding=1), relu()),
                torch.nn.Sequential(torch.nn.Conv2d(c_in, c5_reduce, 1), relu(),
                                    torch.nn.Conv2d(c5_reduce, c5, 3, padding=1), relu(),
                                    torch.nn.Conv2d(c5, c5, 3, padding=1), relu())])

        def forward(self, x):
            return torch.cat([branch(x) for branch in self.branches], dim=1)

    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        Inception(32, 16, 16, 24, 8, 8), Inception(48, 24, 24, 32, 8, 16), torch.nn.MaxPool2d(2),
        Inception(72, 32, 32, 48, 16, 16), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(96, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    def step(images, labels):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(torch.from_numpy(images)), torch.from_numpy(labels)).backward()
        opt.step()

    def inference(images):
        with torch.no_grad():
            net(torch.from_numpy(images))

    return step, inference


def main(rounds=12, batch=128, with_torch=False):
    model = build()
    compiled = gpuconv.compile(model)
    assert compiled.unsupported is None, compiled.unsupported
    rng = np.random.default_rng(1)
    opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times = {"eager step": [], "compiled step": [], "eager inference": [], "compiled inference": []}
    if with_torch:
        torch_step, torch_inference = torch_step_and_inference()
        times.update({"PyTorch step": [], "PyTorch inference": []})
    for round_ in range(rounds):
        images = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
        labels = rng.integers(0, 10, batch)
        for name, net in (("eager", model), ("compiled", compiled)):
            start = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(net(gpuconv.tensor(images)), labels).backward()
            opt.step()
            times[f"{name} step"].append(time.perf_counter() - start)
            with gpuconv.no_grad():
                start = time.perf_counter()
                net(gpuconv.tensor(images))
                times[f"{name} inference"].append(time.perf_counter() - start)
        if with_torch:
            start = time.perf_counter()
            torch_step(images, labels)
            times["PyTorch step"].append(time.perf_counter() - start)
            start = time.perf_counter()
            torch_inference(images)
            times["PyTorch inference"].append(time.perf_counter() - start)
    medians = {}
    for name, values in times.items():
        kept = np.array(values[2:]) * 1e3  # the first rounds set buffers and workers up
        medians[name] = np.median(kept)
        print(f"{name}: median {medians[name]:.1f} ms ({kept.min():.1f}-{kept.max():.1f}) over {len(kept)} rounds")
    for kind in ("step", "inference"):
        line = f"{kind}: compiled {medians[f'eager {kind}'] / medians[f'compiled {kind}']:.2f}x eager"
        if with_torch:
            line += f", PyTorch / compiled {medians[f'PyTorch {kind}'] / medians[f'compiled {kind}']:.2f}x"
        print(line)


if __name__ == "__main__":
    main(with_torch="--torch" in sys.argv[1:])
