"""LeNet-5 (LeCun et al. 1998), as PyTorch tutorials write it for 28x28 MNIST.

conv(1->6, 5x5, pad 2) -> act -> pool 2 -> conv(6->16, 5x5) -> act -> pool 2 -> 400 -> 120 -> 84 -> 10.
The 1998 flavour is activation="tanh", pool="avg"; the modern default is ReLU + max pooling.
"""
import numpy as np

from . import nn
from .errors import ArgumentError

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
POOLS = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}


class LeNet5(nn.Sequential):
    def __init__(self, activation="relu", pool="max", num_classes=10, seed=0, dtype=np.float32):
        if activation not in ACTIVATIONS:
            raise ArgumentError(f"LeNet5 activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if pool not in POOLS:
            raise ArgumentError(f"LeNet5 pool: expected one of {sorted(POOLS)}, got {pool!r}")
        act, pool_layer = ACTIVATIONS[activation], POOLS[pool]
        init = "he" if activation == "relu" else "glorot"
        rng = np.random.default_rng(seed)
        kw = dict(init=init, rng=rng, dtype=dtype)
        super().__init__()
        self.activation, self.pool = activation, pool
        for name, layer in [
            ("conv1", nn.Conv2d(1, 6, 5, padding=2, **kw)), ("act1", act()), ("pool1", pool_layer(2)),
            ("conv2", nn.Conv2d(6, 16, 5, **kw)), ("act2", act()), ("pool2", pool_layer(2)),
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(16 * 5 * 5, 120, **kw)), ("act3", act()),
            ("fc2", nn.Linear(120, 84, **kw)), ("act4", act()),
            ("fc3", nn.Linear(84, num_classes, init="glorot", rng=rng, dtype=dtype)),
        ]:
            self.add(name, layer)
