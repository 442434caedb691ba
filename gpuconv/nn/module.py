"""Module and Parameter: the containers that layers, models and optimizers share.

A Module defines `forward` only; autograd (gpuconv.autograd) records the ops it calls, so any
forward (residual adds, a layer used twice, branches in Python) gets its backward for free.
Parameters, buffers and child modules are found by looking at the attributes, so a subclass's
`__init__` need not call `super().__init__()`; state_dict() keys follow PyTorch's
(`layer1.0.bn1.running_var`), so a PyTorch state_dict converted to NumPy loads into the same tree.
"""
from collections import OrderedDict

import numpy as np

from ..autograd import Tensor
from ..backend import device_of, device_scope, get_array_module, is_device_array, parse_device, to_device
from ..cuda.runtime import device_errors
from ..errors import CheckpointError, DeviceMismatchError


class Parameter(Tensor):
    """A trainable Tensor: requires grad; `.data` is replaced, never resized, by `Module.to()`."""

    def __init__(self, data, name=None, requires_grad=True):
        super().__init__(data.data if isinstance(data, Tensor) else data, requires_grad=requires_grad)
        self.name = name

    def __repr__(self):
        return f"Parameter(name={self.name!r}, shape={self.shape}, dtype={self.dtype})"


class Module:
    training = True

    def __getattr__(self, name):  # only reached when normal lookup fails: the buffers
        buffers = self.__dict__.get("_buffers")
        if buffers is not None and name in buffers:
            return buffers[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name, value):
        buffers = self.__dict__.get("_buffers")
        if buffers is not None and name in buffers:
            buffers[name] = value
        else:
            object.__setattr__(self, name, value)

    def register_buffer(self, name, array):
        """State that is saved and moved with the module but not trained (BatchNorm's running
        statistics): an array, or None."""
        self.__dict__.setdefault("_buffers", OrderedDict())[name] = array

    # ----- structure -----
    def named_children(self):
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def children(self):
        return [child for _, child in self.named_children()]

    def named_modules(self, prefix=""):
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(prefix + name if not prefix else f"{prefix}.{name}")

    def modules(self):
        return [module for _, module in self.named_modules()]

    def _own_parameters(self):
        for name, value in vars(self).items():
            if isinstance(value, Parameter):
                yield name, value

    def named_parameters(self, prefix=""):
        """(name, Parameter) over the tree; a Parameter shared by two layers appears once."""
        seen = set()
        for module_name, module in self.named_modules():
            for name, p in module._own_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield prefix + (f"{module_name}.{name}" if module_name else name), p

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def named_buffers(self):
        for module_name, module in self.named_modules():
            for name, array in module.__dict__.get("_buffers", {}).items():
                if array is not None:
                    yield (f"{module_name}.{name}" if module_name else name), module, name

    def num_parameters(self):
        return sum(p.size for p in self.parameters())

    # ----- running -----
    def __call__(self, *args, **kwargs):
        x = args[0].data if args and isinstance(args[0], Tensor) else (args[0] if args else None)
        if is_device_array(x):
            # The input's GPU is made current for the whole forward, so every array CuPy allocates
            # lands there (cuda:N for any N), and out-of-memory errors name this layer.
            with device_scope(x), device_errors(type(self).__name__, {"x": x.shape}):
                return self.forward(*args, **kwargs)
        return self.forward(*args, **kwargs)

    def forward(self, *args):
        raise NotImplementedError(f"{type(self).__name__}.forward: a Module subclass defines forward()")

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
        """Move every parameter, gradient and buffer to `device` in place; returns self, like PyTorch."""
        device = parse_device(device)
        for p in self.parameters():
            p.data = to_device(p.data, device)
            if p.grad is not None:
                p.grad = to_device(p.grad, device)
        for _, module, name in list(self.named_buffers()):
            module._buffers[name] = to_device(module._buffers[name], device)
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
        model_device, input_device = self.device, device_of(x.data if isinstance(x, Tensor) else x)
        if model_device != input_device:
            raise DeviceMismatchError(
                f"input is on {input_device} but {type(self).__name__} is on {model_device}; "
                f"move the input with gpuconv.to_device(x, '{model_device}') "
                f"or the model with model.to('{input_device}')")

    # ----- weights -----
    def _state_items(self):
        """(key, getter, setter-target) in PyTorch's order: per module its parameters, then its
        buffers, then its children."""
        items = []
        for module_name, module in self.named_modules():
            prefix = module_name + "." if module_name else ""
            for name, p in module._own_parameters():
                items.append((prefix + name, p, None))
            for name, array in module.__dict__.get("_buffers", {}).items():
                if array is not None:
                    items.append((prefix + name, module, name))
        return items

    def state_dict(self):
        """name -> NumPy array copy (host memory) of every parameter and buffer, in a stable order."""
        out = OrderedDict()
        for key, owner, buffer_name in self._state_items():
            array = owner.data if buffer_name is None else owner._buffers[buffer_name]
            out[key] = np.array(to_device(array, "cpu"), copy=True)
        return out

    def load_state_dict(self, state, strict=True):
        items = self._state_items()
        keys = [key for key, _, _ in items]
        missing = [k for k in keys if k not in state]
        unexpected = [k for k in state if k not in set(keys)]
        if strict and (missing or unexpected):
            raise CheckpointError(
                f"state_dict does not fit {type(self).__name__}: missing keys {missing}, "
                f"unexpected keys {unexpected}; was it saved from another model?")
        for key, owner, buffer_name in items:  # every entry checked before any is loaded
            if key not in state:
                continue
            value = state[key]
            current = owner.data if buffer_name is None else owner._buffers[buffer_name]
            if not hasattr(value, "shape") or tuple(value.shape) != tuple(current.shape):
                raise CheckpointError(f"{key!r}: the model expects shape {tuple(current.shape)}, the "
                                      f"state_dict has {tuple(getattr(value, 'shape', ()))}")
            kind = getattr(value, "dtype", np.dtype("O")).kind
            # floats into floats (float64 -> float32 is a rounding), ints into ints (a counter);
            # an int array where weights belong would be cast silently: refused
            if (current.dtype.kind == "f" and kind != "f") or (current.dtype.kind in "iu" and kind not in "iu"):
                raise CheckpointError(f"{key!r}: expected {'floating-point' if current.dtype.kind == 'f' else 'integer'}"
                                      f" values ({current.dtype}), the state_dict has "
                                      f"{getattr(value, 'dtype', type(value).__name__)}")
        for key, owner, buffer_name in items:
            if key not in state:
                continue
            value = state[key]
            current = owner.data if buffer_name is None else owner._buffers[buffer_name]
            with device_scope(current):  # the copy is made on the current device: make it current's
                array = get_array_module(current).asarray(to_device(value, device_of(current)),
                                                          dtype=current.dtype).copy()
            if buffer_name is None:
                owner.data = array
            else:
                owner._buffers[buffer_name] = array
        return self

    def extra_repr(self):
        return ""

    def __repr__(self):
        children = list(self.named_children())
        if not children:
            return f"{type(self).__name__}({self.extra_repr()})"
        lines = [f"  ({name}): {child!r}".replace("\n", "\n  ") for name, child in children]
        if self.extra_repr():  # a container's own settings first, as PyTorch prints them
            lines.insert(0, "  " + self.extra_repr())
        return f"{type(self).__name__}(\n" + "\n".join(lines) + "\n)"
