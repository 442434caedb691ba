"""A training step on "cuda" keeps activations on the GPU.

Without a GPU this is shown on the source: no function a step runs may copy an array to the host
(`.get()`, `cupy.asnumpy`, `to_device(..., "cpu")`, `numpy.asarray` of an activation). With a GPU,
the gpu-marked test runs the step and checks every cached activation and gradient is a CuPy array.
"""
import inspect
import re

import numpy as np
import pytest

from gpuconv import ops as F
from gpuconv import nn, optim
from gpuconv.ops import activation, conv, conv_cuda, linear, loss, pool, pool_cuda
from gpuconv.models import LeNet5

HOST_COPY = re.compile(r"\.get\(\)|asnumpy|to_device\(|np\.asarray\(|np\.array\(|\.tolist\(\)")


def step_functions():
    functions = [nn.Sequential.forward, nn.Sequential.backward, optim.Optimizer.step, optim.SGD.update,
                 optim.Adam.update]
    for layer in (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.LPPool2d, nn.Linear, nn.ReLU, nn.Tanh,
                  nn.Sigmoid, nn.Flatten, nn.Dropout):
        functions += [layer.forward, layer.backward]
    for module in (conv, pool, activation, linear):
        functions += [f for name, f in inspect.getmembers(module, inspect.isfunction)
                      if f.__module__ == module.__name__ and not name.endswith("_numpy")]
    functions += [f for f in vars(conv_cuda).values() if inspect.isfunction(f) and f.__module__ == conv_cuda.__name__]
    functions += [f for f in vars(pool_cuda).values() if inspect.isfunction(f) and f.__module__ == pool_cuda.__name__]
    functions += [loss.softmax_cross_entropy, loss.log_softmax, loss.softmax]
    return functions


@pytest.mark.parametrize("function", step_functions(), ids=lambda f: f.__qualname__)
def test_no_host_copy_in_the_training_step(function):
    source = inspect.getsource(function)
    # The NumPy-only helpers (names ending in _numpy) run on the CPU path alone and are excluded.
    copies = [line.strip() for line in source.splitlines() if HOST_COPY.search(line)]
    assert not copies, f"{function.__qualname__} copies to the host: {copies}"


def test_the_scan_would_see_a_host_copy():
    def leaky(x):
        return x.get()
    assert HOST_COPY.search(inspect.getsource(leaky))


@pytest.mark.gpu
def test_training_step_on_cuda_leaves_every_activation_and_gradient_on_the_gpu():
    import cupy
    model = LeNet5().to("cuda")
    x = cupy.asarray(np.random.default_rng(0).random((16, 1, 28, 28), dtype=np.float32))
    y = cupy.asarray(np.arange(16) % 10)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    logits = model(x)
    _, dlogits = F.softmax_cross_entropy(logits, y)
    model.backward(dlogits, need_dx=False)
    opt.step()
    cached = [v for layer in model for k, v in vars(layer).items() if k in ("_x", "_y") and v is not None]
    assert cached and all(isinstance(v, cupy.ndarray) for v in cached)
    assert all(isinstance(p.grad, cupy.ndarray) and isinstance(p.data, cupy.ndarray) for p in model.parameters())
