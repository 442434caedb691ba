"""Optimizers (SGD with momentum/Nesterov, Adam) and learning-rate schedules, PyTorch's semantics.

Updates are in place on each Parameter's `.data`, on whatever device it lives; state arrays are
created beside it. `state_dict()` returns NumPy copies so checkpoints are device-independent.

On a GPU (CuPy, or kernel emulation) the parameters of one device and dtype are packed, at the
first step, into one flat buffer: each Parameter's `.data` becomes a view into it, its gradient is
written into a view of a flat gradient buffer (autograd reads `Parameter.grad_buffer`), and the
state (velocity, or m and v) is flat too. A step is then one launch of kernels/optim.cu over all of
them, with the hyperparameters in a small device array (so a captured CUDA graph replays with the
current lr). A parameter whose .data was replaced (Module.to, load_state_dict) is packed again; a
step where some parameter has no gradient updates parameter by parameter, as on the CPU.
"""
import math

import numpy as np

from .backend import device_of, device_scope, get_array_module, to_device, uses_cuda_kernels
from .errors import ArgumentError, CaptureError, CheckpointError

FUSED_THREADS = 256
FUSED_MAX_BLOCKS = 1024  # grid-stride beyond: about 8 blocks per SM of an H100 is plenty


def _check_positive(name, value, allow_zero=False):
    ok = value >= 0 if allow_zero else value > 0
    if not isinstance(value, (int, float)) or not ok or not math.isfinite(value):
        bound = ">= 0" if allow_zero else "> 0"
        raise ArgumentError(f"{name}: expected a finite number {bound}, got {value!r}")


class Optimizer:
    state_names = ()

    def __init__(self, params, lr):
        self.params = list(params)
        if not self.params:
            raise ArgumentError("params: expected at least one Parameter, got an empty list")
        _check_positive("lr", lr)
        self.lr = float(lr)
        self.initial_lr = self.lr
        self.state = {name: [None] * len(self.params) for name in self.state_names}
        self.steps = 0
        self.flat = None  # the packed buffers on a GPU (_FlatBuffers), made at the first step there

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def step(self):
        if self._fused_ready():  # one launch: the two halves a captured step runs (gpuconv.cuda.graph)
            self.count_step()
            self._fused_launch()
            return
        self.steps += 1
        for index, p in enumerate(self.params):
            if p.grad is not None:
                with device_scope(p.data):  # state and temporaries on the parameter's GPU
                    self.update(index, p)

    # ----- the fused GPU step -----
    def _fusable(self):
        first = self.params[0].data
        return (uses_cuda_kernels(first) and first.dtype.kind == "f"
                and all(p.data.dtype == first.dtype and device_of(p.data) == device_of(first) for p in self.params))

    def _fused_ready(self):
        """True when this step can be one fused launch: packs (or repacks) the flat buffers when
        needed, moves a gradient assigned from outside into its view."""
        if any(p.grad is None for p in self.params) or not self.pack():
            return False
        self.flat.adopt_grads(self)
        return True

    def pack(self):
        """Make (or remake) the flat buffers if the fused step applies; False where it does not. A
        captured step (gpuconv.cuda.graph) packs before it records, so that its pool holds the
        step's own buffers, not the parameters'."""
        if self.flat is None or not self.flat.holds(self):
            if not self._fusable():
                return False
            self.flat = _FlatBuffers(self)
        return True

    # ----- the fused step in two halves; a step captured as a CUDA graph (gpuconv.cuda.graph) runs
    # the host half before each capture or replay and captures the device half -----
    def count_step(self):
        """The host half: count the step and copy its hyperparameters into the device array the
        fused launch reads (a graph cannot hold a copy from the host; this one is ordered before
        the launch on the same stream)."""
        self.steps += 1
        with device_scope(self.flat.data):
            self.flat.write_hyper(self.hyper())

    def graph_update(self):
        """The device half, as a captured step calls it: the fused launch over the flat buffers."""
        if not self._fused_ready():
            raise CaptureError("the optimizer cannot run its fused step (a parameter has no gradient, or "
                               "the parameters are not one flat buffer); a captured step needs it")
        self._fused_launch()

    def _fused_launch(self):
        with device_scope(self.flat.data):
            self.fused_update(self.flat)

    def hyper(self):
        """The values kernels/optim.cu reads from the device for this step."""
        raise NotImplementedError

    def used_state_names(self):
        """The state this optimizer's settings use (and the flat buffers hold): the CPU path creates
        no state it does not use, so neither does the GPU one, and state_dict() has the same keys."""
        return self.state_names

    def fused_update(self, flat):
        raise NotImplementedError

    def fused_flags(self):
        """The branches of the fused launch (kernels/optim.cu): launch arguments, so a captured step
        (gpuconv.cuda.graph) holds them as they were at its capture, unlike hyper()'s values."""
        raise NotImplementedError

    def _state(self, name, index, like):
        if self.state[name][index] is None or self.state[name][index].shape != like.shape:
            self.state[name][index] = get_array_module(like).zeros_like(like)
        return self.state[name][index]

    def state_dict(self):
        out = {"lr": np.float64(self.lr), "initial_lr": np.float64(self.initial_lr), "steps": np.int64(self.steps)}
        for name, arrays in self.state.items():
            for index, array in enumerate(arrays):
                if array is not None:
                    out[f"{name}.{index}"] = np.array(to_device(array, "cpu"))
        return out

    def load_state_dict(self, state):
        """Restore what state_dict() gave. Every entry is checked before any is used, so a state
        from another optimizer, another model or a hand-made file raises CheckpointError naming
        the entry, what was expected and what was given, and leaves this optimizer unchanged."""
        name = type(self).__name__

        def scalar(key, integer):
            if key not in state:
                raise CheckpointError(f"optimizer state: missing key {key!r}; was it saved by {name}?")
            value = state[key]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = np.asarray(value)  # a Python number, as a hand-written state dict holds
            kind = getattr(getattr(value, "dtype", None), "kind", None)
            if getattr(value, "shape", None) != () or kind not in ("iu" if integer else "iuf"):
                given = (f"dtype {value.dtype}, shape {tuple(value.shape)}" if hasattr(value, "dtype")
                         else repr(value))
                raise CheckpointError(f"optimizer state {key!r}: expected a single "
                                      f"{'int' if integer else 'number'}, got {given}")
            return value.item()

        lr, initial_lr, steps = scalar("lr", False), scalar("initial_lr", False), scalar("steps", True)
        # lr may have reached 0: a cosine schedule ends there; the initial one never does
        for key, value, bound in (("lr", lr, 0), ("initial_lr", initial_lr, None)):
            if not (math.isfinite(value) and (value >= 0 if bound == 0 else value > 0)):
                raise CheckpointError(f"optimizer state {key!r}: expected a finite number "
                                      f"{'>= 0' if bound == 0 else '> 0'}, got {value!r}")
        if steps < 0:
            raise CheckpointError(f"optimizer state 'steps': expected an int >= 0, got {steps}")
        expected = {f"{s}.{i}": p for s in self.state_names for i, p in enumerate(self.params)}
        unexpected = sorted(set(state) - set(expected) - {"lr", "initial_lr", "steps"})
        if unexpected:
            raise CheckpointError(f"optimizer state: unexpected keys {unexpected[:6]}; {name} with "
                                  f"{len(self.params)} parameters keeps {', '.join(self.state_names) or 'no state'}"
                                  " per parameter; was it saved by another optimizer or model?")
        for key, p in expected.items():
            if key not in state:
                continue
            value = state[key]
            if tuple(value.shape) != tuple(p.data.shape):
                raise CheckpointError(f"optimizer state {key!r}: expected shape {tuple(p.data.shape)}, "
                                      f"got {tuple(value.shape)}")
            if value.dtype.kind != "f":  # an int array would be cast silently: a hand-made file
                raise CheckpointError(f"optimizer state {key!r}: expected floating-point values, got dtype "
                                      f"{value.dtype}")
        self.lr, self.initial_lr, self.steps = float(lr), float(initial_lr), int(steps)
        for key, p in expected.items():
            if key in state:
                state_name, index = key.rsplit(".", 1)
                with device_scope(p.data):  # beside the parameter, whichever GPU is current
                    self.state[state_name][int(index)] = get_array_module(p.data).asarray(
                        to_device(state[key], device_of(p.data)), dtype=p.data.dtype)
        return self


class SGD(Optimizer):
    """v = momentum * v + g (+ weight_decay * w); w -= lr * (g + momentum * v if nesterov else v)."""
    state_names = ("velocity",)

    def __init__(self, params, lr=0.01, momentum=0.0, nesterov=False, weight_decay=0.0):
        super().__init__(params, lr)
        _check_positive("momentum", momentum, allow_zero=True)
        _check_positive("weight_decay", weight_decay, allow_zero=True)
        if nesterov and momentum == 0:
            raise ArgumentError("nesterov: Nesterov momentum needs momentum > 0, got momentum=0")
        self.momentum, self.nesterov, self.weight_decay = momentum, nesterov, weight_decay

    def hyper(self):
        return (self.lr, self.momentum, self.weight_decay)

    def used_state_names(self):
        return self.state_names if self.momentum else ()

    def fused_flags(self):
        return (1 if self.momentum else 0) | (2 if self.nesterov else 0) | (4 if self.weight_decay else 0)

    def fused_update(self, flat):
        velocity = flat.state.get("velocity", flat.grad)  # without momentum (flag 1) it is never read
        flat.launch("sgd_update", (flat.data, flat.grad, velocity, flat.hyper_array), self.fused_flags())

    def update(self, index, p):
        grad = p.grad if self.weight_decay == 0 else p.grad + self.weight_decay * p.data
        if self.momentum:
            velocity = self._state("velocity", index, p.data)
            velocity *= self.momentum
            velocity += grad
            grad = grad + self.momentum * velocity if self.nesterov else velocity
        p.data -= p.data.dtype.type(self.lr) * grad


class Adam(Optimizer):
    """Kingma & Ba 2015 with bias correction; weight_decay is L2 added to the gradient (as torch.optim.Adam)."""
    state_names = ("m", "v")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr)
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ArgumentError(f"betas: expected two numbers in [0, 1), got {betas!r}")
        _check_positive("eps", eps)
        _check_positive("weight_decay", weight_decay, allow_zero=True)
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay

    def hyper(self):
        beta1, beta2 = self.betas
        step_size = self.lr * math.sqrt(1 - beta2 ** self.steps) / (1 - beta1 ** self.steps)
        return (step_size, beta1, 1 - beta1, beta2, 1 - beta2, self.eps, self.weight_decay)

    def fused_flags(self):
        return 4 if self.weight_decay else 0

    def fused_update(self, flat):
        flat.launch("adam_update", (flat.data, flat.grad, flat.state["m"], flat.state["v"], flat.hyper_array),
                    self.fused_flags())

    def update(self, index, p):
        xp = get_array_module(p.data)
        beta1, beta2 = self.betas
        grad = p.grad if self.weight_decay == 0 else p.grad + self.weight_decay * p.data
        m, v = self._state("m", index, p.data), self._state("v", index, p.data)
        m *= beta1
        m += (1 - beta1) * grad
        v *= beta2
        v += (1 - beta2) * grad * grad
        step_size = self.lr * math.sqrt(1 - beta2 ** self.steps) / (1 - beta1 ** self.steps)
        p.data -= p.data.dtype.type(step_size) * m / (xp.sqrt(v) + p.data.dtype.type(self.eps))


class _FlatBuffers:
    """One device's parameters, gradients and optimizer state as flat buffers, each Parameter's
    .data / .grad_buffer and each state entry a view into them (see the module docstring)."""

    def __init__(self, optimizer):
        from .cuda.runtime import empty, zeros
        params = optimizer.params
        first = params[0].data
        xp = get_array_module(first)
        self.sizes = [int(p.data.size) for p in params]
        total = sum(self.sizes)
        with device_scope(first):
            self.data = empty(xp, (total,), first.dtype, "flat parameters")
            self.grad = zeros(xp, (total,), first.dtype, "flat gradients")
            names = optimizer.used_state_names()
            self.state = {name: zeros(xp, (total,), first.dtype, f"flat {name}") for name in names}
            self.hyper_array = zeros(xp, (8,), first.dtype, "optimizer hyperparameters")
            self.data_views, self.grad_views = [], []
            self.state_views = {name: [] for name in names}
            offset = 0
            for index, (p, size) in enumerate(zip(params, self.sizes)):
                cut = slice(offset, offset + size)
                view = self.data[cut].reshape(p.data.shape)
                view[...] = p.data
                p.data = view
                self.data_views.append(view)
                grad_view = self.grad[cut].reshape(p.data.shape)
                p.grad_buffer = grad_view
                self.grad_views.append(grad_view)
                for name in names:
                    state_view = self.state[name][cut].reshape(p.data.shape)
                    old = optimizer.state[name][index]
                    if old is not None and old.shape == state_view.shape:
                        state_view[...] = old
                    optimizer.state[name][index] = state_view
                    self.state_views[name].append(state_view)
                offset += size
        self.dtype = first.dtype
        self.host_hyper = np.zeros(8, first.dtype)

    def holds(self, optimizer):
        """Are the parameters and the state still the views of these buffers?"""
        return (set(self.state_views) == set(optimizer.used_state_names())
                and all(p.data is view for p, view in zip(optimizer.params, self.data_views))
                and all(state is view for name, views in self.state_views.items()
                        for state, view in zip(optimizer.state[name], views)))

    def adopt_grads(self, optimizer):
        """A gradient that is not the view (set from outside, or accumulated before the packing)
        is copied into it."""
        for p, view in zip(optimizer.params, self.grad_views):
            if p.grad is not view:
                with device_scope(self.data):
                    view[...] = p.grad
                p.grad = view

    def write_hyper(self, values):
        """The step's hyperparameters into the device array, without allocating (a host-to-device
        copy into the existing buffer)."""
        from .cuda.runtime import write_to_device
        self.host_hyper[:len(values)] = values
        write_to_device(self.hyper_array, self.host_hyper)

    def launch(self, kernel_name, arrays, flags):
        from .cuda.runtime import get_kernel, launch
        count = self.data.size
        blocks = max(1, min(FUSED_MAX_BLOCKS, -(-count // FUSED_THREADS)))
        launch(get_kernel("optim.cu", kernel_name, self.dtype), (blocks, 1, 1), (FUSED_THREADS, 1, 1),
               tuple(arrays) + (np.int64(count), np.int32(flags)), op_name=f"optimizer step ({kernel_name})",
               shapes={"parameters": (count,)})


class StepLR:
    """lr = initial_lr * gamma ** (epoch // step_size); call step() once per epoch."""

    def __init__(self, optimizer, step_size, gamma=0.1):
        if not isinstance(step_size, int) or step_size < 1:
            raise ArgumentError(f"step_size: expected an int >= 1, got {step_size!r}")
        self.optimizer, self.step_size, self.gamma, self.epoch = optimizer, step_size, gamma, 0

    def step(self):
        self.epoch += 1
        self.optimizer.lr = self.optimizer.initial_lr * self.gamma ** (self.epoch // self.step_size)


class CosineAnnealingLR:
    """lr = eta_min + (initial_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2."""

    def __init__(self, optimizer, T_max, eta_min=0.0):
        if not isinstance(T_max, int) or T_max < 1:
            raise ArgumentError(f"T_max: expected an int >= 1, got {T_max!r}")
        self.optimizer, self.T_max, self.eta_min, self.epoch = optimizer, T_max, eta_min, 0

    def step(self):
        self.epoch += 1
        progress = min(self.epoch, self.T_max) / self.T_max
        self.optimizer.lr = self.eta_min + (self.optimizer.initial_lr - self.eta_min) * (1 + math.cos(math.pi * progress)) / 2


SCHEDULES = {"none": None, "step": StepLR, "cosine": CosineAnnealingLR}
