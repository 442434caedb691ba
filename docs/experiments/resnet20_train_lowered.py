"""The zoo's ResNet-20 training step at batch 128 four ways, alternating in one process: eagerly
(op by op), compiled (its training BatchNorms lowered: the plan's parts meet at each one), compiled
in eval mode (BatchNorm a per-channel affine map: strictly less work than training, an upper bound
on what the executor gives this model), and PyTorch's. The weights stay put (SGD at lr 1e-12) and
the eval-mode BatchNorms hold one training batch's statistics, so every step does the same work on
finite values. Medians of 5 steps after 1, three rounds. Run from the repository root, with
PyTorch installed:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE PYTHONPATH=. python docs/experiments/resnet20_train_lowered.py
"""
import copy

import numpy as np
import torch
from timing import median_ms, sgd_step

from gpuconv import nn
from gpuconv.autograd import no_grad
from gpuconv.bench import zoo
from gpuconv.bench.torch_rows import TorchZooRows
from gpuconv.compiler import compile as compile_model


def main(batch=128, rounds=3):
    torch.set_num_threads(2)
    dataset = zoo.default_dataset("resnet20")
    model = zoo.build("resnet20", dataset, seed=0)
    x, labels = zoo.random_batch(dataset, batch, 0)
    for layer in model.modules():  # running statistics := one training batch's
        if isinstance(layer, nn.BatchNorm2d):
            layer.momentum = 1.0
    with no_grad():
        model(x)
    for layer in model.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.momentum = 0.0
    eager, lowered, in_eval = model, copy.deepcopy(model), copy.deepcopy(model)
    compiled_train, compiled_eval = compile_model(lowered), compile_model(in_eval)

    steps = {"eager training step": sgd_step(eager, eager, x, labels, lr=1e-12, training=True),
             "compiled training step (BatchNorm lowered)": sgd_step(compiled_train, lowered, x, labels, lr=1e-12,
                                                                    training=True),
             "compiled eval-mode step": sgd_step(compiled_eval, in_eval, x, labels, lr=1e-12, training=False),
             "PyTorch training step": TorchZooRows(torch, "cpu", "resnet20", dataset, batch, 0).step(None)}
    compiled_train.train()
    assert compiled_train.uses_executor(x)
    results = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            results[name].append(median_ms(step, repeat=5))
    for name, times in results.items():
        print(f"{name:45s} {np.median(times):6.0f} ms (rounds: {', '.join(f'{t:.0f}' for t in times)})")


if __name__ == "__main__":
    main()
