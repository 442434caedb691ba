"""Two bounds on issue 20's ResNet-20 goal (a training step at batch 128 >= 1.5x PyTorch CPU),
measured in one process:

1. Where PyTorch's step goes: torch.profiler's total CPU time in aten::convolution (forward) and
   aten::convolution_backward, against the whole step. A framework whose convolutions are no
   faster than PyTorch's (oneDNN's direct kernels) cannot take less than that conv time.
2. What im2col + GEMM costs at best here: every one of the model's convs as the three GEMMs that
   NumPy's BLAS (OpenBLAS) would do (forward R @ W.T, input gradient dY @ W, weight gradient
   dY.T @ R), timed alone with the operands already laid out, so no copy, no im2col, no BatchNorm
   and no ReLU is counted. Any NumPy conv built on those GEMMs takes at least that long.

Medians of 5 after 1, three rounds. Run from the repository root, with PyTorch installed:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE PYTHONPATH=. python docs/experiments/resnet20_bounds.py
"""
import numpy as np
import torch
from timing import median_ms

from gpuconv.bench import zoo
from gpuconv.bench.machine import blas_config
from gpuconv.bench.torch_rows import TorchZooRows


def conv_shapes(rows):
    """(input shape, weight shape, stride, padding) of every Conv2d in the PyTorch twin, from one
    forward with hooks."""
    shapes = []
    hooks = [layer.register_forward_hook(
        lambda layer, inputs, output: shapes.append((tuple(inputs[0].shape), tuple(layer.weight.shape),
                                                      layer.stride[0], layer.padding[0])))
        for layer in rows.model.modules() if isinstance(layer, torch.nn.Conv2d)]
    with torch.no_grad():
        rows.model(rows.x)
    for hook in hooks:
        hook.remove()
    return shapes


def gemm_step(shapes, rng):
    """A function doing each conv's three GEMMs once, operands laid out beforehand."""
    operands = []
    for (n, c, h, w), (o, _, kh, kw), stride, pad in shapes:
        ho, wo = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
        m, k = n * ho * wo, c * kh * kw
        rows_ = rng.standard_normal((m, k), dtype=np.float32)
        weight = rng.standard_normal((o, k), dtype=np.float32)
        dy = rng.standard_normal((m, o), dtype=np.float32)
        operands.append((rows_, weight, dy, np.empty((m, o), np.float32), np.empty((m, k), np.float32),
                         np.empty((o, k), np.float32)))

    def run():
        for rows_, weight, dy, y, dx, dw in operands:
            np.matmul(rows_, weight.T, out=y)
            np.matmul(dy, weight, out=dx)
            np.matmul(dy.T, rows_, out=dw)
    return run


def torch_conv_share(step, steps=5):
    step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(steps):
            step()
    totals = {event.key: event.cpu_time_total for event in profile.key_averages()}
    conv = totals.get("aten::convolution", 0) + totals.get("aten::convolution_backward", 0)
    return conv / 1e3 / steps


def main(batch=128, rounds=3):
    torch.set_num_threads(2)
    print("BLAS:", blas_config())
    dataset = zoo.default_dataset("resnet20")
    rows = TorchZooRows(torch, "cpu", "resnet20", dataset, batch, 0)
    shapes = conv_shapes(rows)
    flops = sum(2 * n * (h // s) * (w // s) * o * c * kh * kw * 3
                for (n, c, h, w), (o, _, kh, kw), s, _ in shapes)
    torch_step, gemms = rows.step(None), gemm_step(shapes, np.random.default_rng(0))
    results = {"PyTorch step": [], "PyTorch's convs in that step (profiled)": [],
               "the convs' GEMMs alone (NumPy, OpenBLAS)": []}
    for _ in range(rounds):
        results["PyTorch step"].append(median_ms(torch_step, repeat=5))
        results["PyTorch's convs in that step (profiled)"].append(torch_conv_share(torch_step))
        results["the convs' GEMMs alone (NumPy, OpenBLAS)"].append(median_ms(gemms, repeat=5))
    print(f"{len(shapes)} convs, {flops / 1e9:.1f} GFLOP a step in their forward and two backward products")
    for name, times in results.items():
        print(f"{name:45s} {np.median(times):6.0f} ms (rounds: {', '.join(f'{t:.0f}' for t in times)})")
    target = np.median(results["PyTorch step"]) / 1.5
    print(f"{'1.5x PyTorch means a step of':45s} {target:6.0f} ms")


if __name__ == "__main__":
    main()
