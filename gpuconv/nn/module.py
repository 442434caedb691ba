"""Module and Parameter: the containers that layers, models and optimizers share.

A Module is explicit about both directions: `forward(x)` keeps what its backward needs, and
`backward(dy)` fills each Parameter's `.grad` and returns the gradient of its input. There is no
tape: a CNN is a chain, and a chain reads best as forward in order, backward in reverse.
"""
from collections import OrderedDict

import numpy as np

from ..backend import device_of, get_array_module, parse_device, to_device
from ..errors import CheckpointError, DeviceMismatchError


class Parameter:
    """A trainable array and its gradient. `.data` is replaced, never resized, by `.to()`."""

    def __init__(self, data, name=None):
        self.data = data
        self.grad = None
        self.name = name

    @property
    def shape(self):
        return self.data.shape

    @property
    def size(self):
        return int(self.data.size)

    def __repr__(self):
        return f"Parameter(name={self.name!r}, shape={tuple(self.data.shape)}, dtype={self.data.dtype})"


class Module:
    training = True

    # ----- structure -----
    def named_children(self):
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def named_parameters(self, prefix=""):
        for name, value in vars(self).items():
            if isinstance(value, Parameter):
                yield prefix + name, value
        for name, child in self.named_children():
            yield from child.named_parameters(prefix + name + ".")

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def modules(self):
        yield self
        for _, child in self.named_children():
            yield from child.modules()

    def num_parameters(self):
        return sum(p.size for p in self.parameters())

    # ----- running -----
    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, x):
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def backward(self, dy):
        raise NotImplementedError(f"{type(self).__name__}.backward")

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def train(self, mode=True):
        for m in self.modules():
            m.training = mode
        return self

    def eval(self):
        return self.train(False)

    # ----- devices -----
    def to(self, device):
        """Move every parameter (and gradient) to `device` in place; returns self, like PyTorch."""
        device = parse_device(device)
        for p in self.parameters():
            p.data = to_device(p.data, device)
            if p.grad is not None:
                p.grad = to_device(p.grad, device)
        return self

    @property
    def device(self):
        """The device of the parameters; DeviceMismatchError if they are split across devices."""
        devices = {device_of(p.data) for p in self.parameters()}
        if len(devices) > 1:
            raise DeviceMismatchError(f"{type(self).__name__} has parameters on several devices "
                                      f"({', '.join(sorted(devices))}); call model.to(device) first")
        return devices.pop() if devices else "cpu"

    def check_input_device(self, x):
        """Fail early, naming both devices, when the input is not where the model is."""
        model_device, input_device = self.device, device_of(x)
        if model_device != input_device:
            raise DeviceMismatchError(
                f"input is on {input_device} but {type(self).__name__} is on {model_device}; "
                f"move the input with gpuconv.to_device(x, '{model_device}') "
                f"or the model with model.to('{input_device}')")

    # ----- weights -----
    def state_dict(self):
        """name -> NumPy array copy (host memory), in a stable order."""
        return OrderedDict((name, np.array(to_device(p.data, "cpu"), copy=True))
                           for name, p in self.named_parameters())

    def load_state_dict(self, state, strict=True):
        params = dict(self.named_parameters())
        missing = [n for n in params if n not in state]
        unexpected = [n for n in state if n not in params]
        if strict and (missing or unexpected):
            raise CheckpointError(
                f"state_dict does not fit {type(self).__name__}: missing keys {missing}, "
                f"unexpected keys {unexpected}; was it saved from another model?")
        for name, p in params.items():
            if name not in state:
                continue
            value = state[name]
            if tuple(value.shape) != tuple(p.data.shape):
                raise CheckpointError(f"parameter {name!r}: the model expects shape "
                                      f"{tuple(p.data.shape)}, the state_dict has {tuple(value.shape)}")
            xp = get_array_module(p.data)
            p.data = xp.asarray(value, dtype=p.data.dtype).copy()
        return self

    def extra_repr(self):
        return ""

    def __repr__(self):
        children = list(self.named_children())
        if not children:
            return f"{type(self).__name__}({self.extra_repr()})"
        lines = [f"  ({name}): {child!r}".replace("\n", "\n  ") for name, child in children]
        return f"{type(self).__name__}(\n" + "\n".join(lines) + "\n)"
