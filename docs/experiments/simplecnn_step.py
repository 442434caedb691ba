"""SimpleCNN as the README's Fashion-MNIST recipe builds it (widths 32, 64, 128, 256; 28x28 grey
images), one training step at batch 128, eagerly and compiled, alternating in one process: three
rounds, medians of 3 steps after 1 (SGD at lr 1e-9: every step the same work). Its BatchNorms
split every conv from its pool, so before BatchNorm lowered in training the compiled model ran
eagerly too (no run was worth a plan); it now runs as one plan. Run from the repository root:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python docs/experiments/simplecnn_step.py
"""
import copy

import numpy as np
from timing import median_ms, sgd_step

import gpuconv
from gpuconv.models import SimpleCNN


def main(batch=128, rounds=3):
    eager = SimpleCNN(1, 10, image_size=28, widths=(32, 64, 128, 256), seed=0)
    lowered = copy.deepcopy(eager)
    compiled = gpuconv.compile(lowered)
    rng = np.random.default_rng(0)
    x, labels = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, batch)
    print("one plan:", compiled.unsupported is None and compiled.uses_executor(x))

    steps = {"eager": sgd_step(eager, eager, x, labels, lr=1e-9),
             "compiled": sgd_step(compiled, lowered, x, labels, lr=1e-9)}
    results = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            results[name].append(median_ms(step, repeat=3))
    for name, times in results.items():
        print(f"{name:9s} {np.median(times):5.0f} ms (rounds: {', '.join(f'{t:.0f}' for t in times)})")


if __name__ == "__main__":
    main()
