"""A training step on "cuda" keeps activations on the GPU.

Without a GPU this is shown on the source: no function a step runs may copy an array to the host
(`.get()`, `cupy.asnumpy`, `to_device(..., "cpu")`, `numpy.asarray` of an activation), nor read a
device value back with `int(`, `float(`, `bool(` or `.item()`, each a blocking sync that stalls the
GPU's queue. A step is the Trainer's step and its accumulation of loss and correct count, the
model's forward (the compiled model, which runs a CuPy batch eagerly), the autograd tape
(gpuconv.autograd, the Functions of gpuconv.functional), the array ops of gpuconv.ops they call and
the optimizer. (tests/test_gpu_training_emulated.py shows the same at run time: an emulated GPU
records every read back, and a step makes none.) With a GPU, the gpu-marked test runs the step and checks that every
array the tape saved for the backward, every gradient and every parameter is a CuPy array.
"""
import inspect
import re

import numpy as np
import pytest

import gpuconv
from gpuconv import autograd, compiler, functional, nn, optim, train
from gpuconv.models import LeNet5
from gpuconv.ops import activation, conv, conv_cuda, linear, loss, norm, pool, pool_cuda

HOST_COPY = re.compile(r"\.get\(\)|asnumpy|to_device\(|np\.asarray\(|np\.array\(|\.tolist\(\)")

# What a step calls on a Tensor (not numpy() / to() / item(), which copy or read on purpose).
TENSOR_METHODS = ("backward", "_backward", "reshape", "flatten", "sum", "mean", "__add__", "__radd__", "__sub__",
                  "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__", "__neg__", "__matmul__",
                  "__pow__", "__getitem__")


def _functions_of(module):
    return [f for name, f in inspect.getmembers(module, inspect.isfunction)
            if f.__module__ == module.__name__ and not name.endswith("_numpy")]


def _function_methods(module, skip=()):
    """forward and backward of every autograd Function a module defines."""
    return [getattr(cls, name) for _, cls in inspect.getmembers(module, inspect.isclass)
            if cls.__module__ == module.__name__ and issubclass(cls, autograd.Function)
            and cls is not autograd.Function and cls not in skip
            for name in ("forward", "backward") if name in vars(cls)]


def step_functions():
    functions = [train.Trainer.train_step, train.Trainer.accumulate,
                 nn.Module.__call__, nn.Sequential.forward, compiler.CompiledModel.__call__,
                 compiler.CompiledModel._plan_for, compiler.CompiledModel._segments_for, compiler._plannable,
                 optim.Optimizer.zero_grad, optim.Optimizer.step,
                 optim.SGD.update, optim.Adam.update]
    for layer in (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.LPPool2d, nn.AdaptiveAvgPool2d, nn.Linear, nn.ReLU,
                  nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Flatten, nn.Dropout, nn.BatchNorm2d,
                  nn.CrossEntropyLoss):
        functions.append(layer.forward)
    functions += [autograd.Function.__call__, autograd.Function.release, autograd._run_backward,
                  autograd._accumulate, autograd.sum_to, autograd.as_tensor]
    functions += [getattr(autograd.Tensor, name) for name in TENSOR_METHODS]
    functions += _function_methods(autograd, skip=(autograd._Copy,))  # _Copy is Tensor.to(): a copy by design
    functions += _functions_of(functional) + _function_methods(functional)
    for module in (conv, pool, activation, linear, loss, norm):
        functions += _functions_of(module)
    functions += [f for f in vars(conv_cuda).values() if inspect.isfunction(f) and f.__module__ == conv_cuda.__name__]
    functions += [f for f in vars(pool_cuda).values() if inspect.isfunction(f) and f.__module__ == pool_cuda.__name__]
    return functions


def test_the_scan_covers_the_step():
    """The list above is what a step runs: every Function a LeNet-5 step records is in it."""
    model = LeNet5()
    logits = model(np.zeros((2, 1, 28, 28), np.float32))
    result = functional.cross_entropy(logits, np.arange(2))
    scanned = set(step_functions())
    nodes, stack = [], [result.creator]
    while stack:
        node = stack.pop()
        if node is not None and node not in nodes:
            nodes.append(node)
            stack += [creator for _, creator in node.inputs]
    assert len(nodes) == 13  # 2 conv, 4 relu, 2 pool, 1 flatten, 3 linear, the loss
    for node in nodes:
        assert type(node).forward in scanned and type(node).backward in scanned, type(node).__name__


@pytest.mark.parametrize("function", step_functions(), ids=lambda f: f.__qualname__)
def test_no_host_copy_in_the_training_step(function):
    source = inspect.getsource(function)
    # The NumPy-only helpers (names ending in _numpy) run on the CPU path alone and are excluded.
    copies = [line.strip() for line in source.splitlines() if HOST_COPY.search(line)]
    assert not copies, f"{function.__qualname__} copies to the host: {copies}"


HOST_READ = re.compile(r"\bint\(|\bfloat\(|\bbool\(|\.item\(\)")

# int(/float(/bool( of values that are host values by construction (arguments, shapes, Python
# numbers), each reviewed: (function, the expression). Anything else must say on its line why the
# value is on the host (a `# host:` comment), or it is a blocking read of a device value.
HOST_VALUES = {
    ("Tensor.flatten", "int(np.prod(shape"),          # a shape
    ("_check_conv_args", "int(groups)"),              # an argument
    ("_check_count_include_pad", "bool(count_include_pad)"),
    ("_check_norm_type", "float(norm_type)"),
    ("_check_p", "float(p)"),
    ("_device_generator", "int(rng.integers("),       # the host Generator seeds a device one, once
    ("cross_entropy", 'float("nan")'),                # a constant
    ("_backward_im2col", "beta=float(index > 0)"),    # a loop counter
    ("_sizes", "int(s) for s in x_shape"),            # a shape
    ("_mode_scalars", "bool(count_include_pad)"),     # an argument
}


def host_reads(function):
    """Lines of `function` that may read a device value back, neither reviewed nor marked `# host:`."""
    name = function.__qualname__.split(".")[-1] if "." not in function.__qualname__ else function.__qualname__
    lines = []
    for line in inspect.getsource(function).splitlines():
        code = line.split("#")[0]
        if not HOST_READ.search(code) or "# host:" in line:
            continue
        if any(qualname in (function.__qualname__, name) and expression in code for qualname, expression in HOST_VALUES):
            continue
        lines.append(line.strip())
    return lines


@pytest.mark.parametrize("function", step_functions(), ids=lambda f: f.__qualname__)
def test_no_blocking_read_of_a_device_value_in_the_training_step(function):
    reads = host_reads(function)
    assert not reads, f"{function.__qualname__} reads a device value back to the host (a sync): {reads}"


def test_the_scan_would_see_a_blocking_read():
    def sync_per_step(loss, logits, labels):
        low = int(labels.min())
        positive = bool((logits > 0).any())
        return float(loss) + low + positive + loss.item()
    assert len(host_reads(sync_per_step)) == 3


def test_the_scan_would_see_a_host_copy():
    def leaky(x):
        return x.get()
    assert HOST_COPY.search(inspect.getsource(leaky))


def _saved_arrays(tensor):
    """Every array the nodes behind `tensor` keep for the backward."""
    arrays, nodes, stack = [], [], [tensor.creator]
    while stack:
        node = stack.pop()
        if node is None or node in nodes:
            continue
        nodes.append(node)
        arrays += [(type(node).__name__, name, value) for name, value in vars(node).items()
                   if hasattr(value, "dtype") and hasattr(value, "shape") and not isinstance(value, autograd.Tensor)]
        stack += [creator for _, creator in node.inputs]
    return arrays


@pytest.mark.gpu
def test_training_step_on_cuda_leaves_every_activation_and_gradient_on_the_gpu():
    import cupy
    model = LeNet5().to("cuda")
    net = gpuconv.compile(model)  # as the trainer runs it; a CuPy batch runs eagerly
    x = cupy.asarray(np.random.default_rng(0).random((16, 1, 28, 28), dtype=np.float32))
    y = cupy.asarray(np.arange(16) % 10)
    assert not net.uses_executor(x)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    logits = net(x)
    result = functional.cross_entropy(logits, y)
    saved = _saved_arrays(result)
    assert len(saved) >= 13
    assert all(isinstance(value, cupy.ndarray) for _, _, value in saved), \
        [(node, name, type(value).__name__) for node, name, value in saved if not isinstance(value, cupy.ndarray)]
    assert isinstance(logits.data, cupy.ndarray) and isinstance(result.data, cupy.ndarray)
    result.item()
    opt.zero_grad()
    result.backward()
    opt.step()
    assert all(isinstance(p.grad, cupy.ndarray) and isinstance(p.data, cupy.ndarray) for p in model.parameters())
    assert all(isinstance(value, cupy.ndarray) for state in opt.state.values() for value in state if value is not None)
