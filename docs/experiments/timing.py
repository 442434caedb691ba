"""What the experiments here share: a median time, and an SGD training step to time."""
import time

import numpy as np

from gpuconv import functional as F
from gpuconv import optim


def median_ms(function, repeat=30):
    """function() once, then the median of `repeat` timed calls, in ms (the CPU clock: CPU work)."""
    function()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1e3 * np.median(times)


def sgd_step(network, model, x, labels, lr=0.01, momentum=0.9, training=None):
    """A training step of `network` (a model or its compiled form) on one batch: cross-entropy,
    backward, SGD on `model`'s parameters (training=True/False sets the mode first)."""
    optimizer = optim.SGD(model.parameters(), lr=lr, momentum=momentum)

    def step():
        if training is not None:
            network.train(training)
        loss = F.cross_entropy(network(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert np.isfinite(loss.item())
    return step
