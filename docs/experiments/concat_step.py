"""The zoo's InceptionNet (a small GoogLeNet: three nn.Concat blocks, no batch norm) on random
CIFAR-shaped batches: the training step and the inference run eagerly (op by op) and compiled
(gpuconv.compile, where the Concat blocks lower into the CPU executor), alternating step by step
in one process, and with --torch the same network in PyTorch (2 threads, torch.cat in its blocks'
forward: the bench's twin) in the same rounds. Run from the repository root on a quiet machine,
with PyTorch from its own venv (never a dependency):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE PYTHONPATH=. ../torchvenv/bin/python docs/experiments/concat_step.py --torch
"""
import sys
import time

import numpy as np

import gpuconv
from gpuconv import functional as F
from gpuconv import optim
from gpuconv.models import InceptionNet


def torch_step_and_inference(model):
    """PyTorch's twin of `model` (the bench's, gpuconv.bench.torch_rows) -> (step(images, labels),
    inference(images))."""
    import torch
    from gpuconv.bench.torch_rows import torch_model_like
    torch.set_num_threads(2)
    net = torch_model_like(torch, model)
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
    model = InceptionNet(3, 10, 32)
    compiled = gpuconv.compile(model)
    assert compiled.unsupported is None, compiled.unsupported
    rng = np.random.default_rng(1)
    opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times = {"eager step": [], "compiled step": [], "eager inference": [], "compiled inference": []}
    if with_torch:
        torch_step, torch_inference = torch_step_and_inference(model)
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
