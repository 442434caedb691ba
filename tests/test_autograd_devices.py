"""Autograd on the GPU path, shown without a GPU: a residual CNN's training step (convs, pools,
BatchNorm, a reused ReLU, a residual add) run with gpuconv's CUDA kernels under CPU emulation gives
the NumPy path's loss and gradients, and the tape's own code never copies an array to the host.
"""
import inspect
import re

import numpy as np
import pytest

import gpuconv
from gpuconv import autograd, functional as F, nn, optim
from gpuconv.cuda import emulate


class Block(nn.Module):
    def __init__(self, c):
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.act(self.bn1(self.conv1(x)))
        return self.act(x + self.bn2(self.conv2(y)))


class ResidualNet(nn.Module):
    def __init__(self):
        self.stem = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block = Block(4)
        self.pool = nn.MaxPool2d(2)
        self.avg = nn.AvgPool2d(2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x):
        return self.head(self.avg(self.pool(self.block(self.stem(x)))))


def _step(emulated):
    gpuconv.manual_seed(3) if hasattr(gpuconv, "manual_seed") else None
    model = ResidualNet()
    rng = np.random.default_rng(0)
    for p in model.parameters():  # the same weights in both runs, whatever the init
        p.data = rng.standard_normal(p.shape).astype(np.float32) * np.float32(0.3)
    x = rng.standard_normal((3, 2, 8, 8)).astype(np.float32)
    y = np.array([0, 2, 1])
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with emulate.emulation(emulated):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        grads = {name: p.grad.copy() for name, p in model.named_parameters()}
        opt.step()
    return loss.item(), grads, model.state_dict()


def test_residual_step_under_kernel_emulation_matches_the_numpy_path():
    loss_np, grads_np, state_np = _step(False)
    loss_em, grads_em, state_em = _step(True)
    assert loss_em == pytest.approx(loss_np, rel=1e-5)
    assert list(grads_em) == list(grads_np)
    for name in grads_np:
        np.testing.assert_allclose(grads_em[name], grads_np[name], rtol=1e-4, atol=1e-5, err_msg=name)
    for name in state_np:  # the step and BatchNorm's running statistics too
        np.testing.assert_allclose(state_em[name], state_np[name], rtol=1e-5, atol=1e-6, err_msg=name)


HOST_READ = re.compile(r"\.get\(\)|asnumpy|to_device\(|np\.asarray\(|np\.array\(|\.tolist\(\)|\.item\(\)|"
                       r"\bint\(|\bfloat\(|\bbool\(")


def _tape_functions():
    """What a training step runs of the tape: the walk, accumulation, every Function's forward and
    backward, and the layers' forwards."""
    functions = [autograd._run_backward, autograd._accumulate, autograd.Function.__call__, autograd.sum_to]
    for module in (autograd, F):
        for value in vars(module).values():
            if inspect.isclass(value) and issubclass(value, autograd.Function) and value is not autograd.Function:
                functions += [value.forward, value.backward]
    functions += [F.update_running_stats, F.batch_norm, F.cross_entropy, F.conv2d, F.linear]
    for layer in (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.Linear, nn.AdaptiveAvgPool2d, nn.Flatten):
        functions.append(layer.forward)
    return sorted(set(functions), key=lambda f: f.__qualname__)


@pytest.mark.parametrize("function", _tape_functions(), ids=lambda f: f.__qualname__)
def test_the_tape_reads_nothing_back_to_the_host(function):
    lines = [line.strip() for line in inspect.getsource(function).splitlines()
             if HOST_READ.search(line) and not line.strip().startswith(("#", '"""'))]
    allowed = {"_Copy.forward": "to_device(", "_Copy.backward": "to_device("}  # an explicit .to(device)
    lines = [line for line in lines if allowed.get(function.__qualname__, "\0") not in line]
    assert not lines, f"{function.__qualname__} reads a device value back to the host: {lines}"


def test_the_scan_would_see_a_host_read():
    def leaky(loss):
        return float(loss.sum())
    assert HOST_READ.search(inspect.getsource(leaky))
