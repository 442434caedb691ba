"""gpuconv.compile(model): the one entry to the CPU executor (gpuconv/nn/cpu_plan.py).

    model = LeNet5()
    fast = gpuconv.compile(model)        # same parameters, same state_dict, same results
    loss = F.cross_entropy(fast(x), y)   # a float32 NumPy batch runs as one fused plan
    loss.backward()                      # gradients land in model's p.grad as always

Where the executor can lower the whole model (a chain of the layers in cpu_plan.LOWERINGS) and the
batch is a float32 NumPy array, the forward runs as one plan and is recorded on the tape as one
Function (PlanFunction) whose inputs are x and the model's parameters; anything else (a CuPy
batch, kernel emulation, float64, a model with its own forward, non-finite logits) runs the
model eagerly, op by op. Like torch.compile, it wraps and never changes the model.
"""
import numpy as np

from .autograd import Function, Tensor
from .backend import emulation_enabled
from .nn import cpu_plan
from .nn.cpu_ops import Unsupported


class _NonFinite(Exception):
    """The plan's output holds NaN or Inf: the eager path's NaN rules must decide."""


class PlanFunction(Function):
    """A whole chain on the tape: inputs (x, *params), output the logits.

    The plan keeps one forward's activations (in reused buffers), so a backward is valid only
    while no later forward of the same plan replaced them. If one did, this node recomputes its
    own forward from the input it kept (the parameters are the same arrays), then runs the
    backward: the gradients are those of this forward, never of another."""

    fresh_grads = True  # the plan returns every gradient as a new array (cpu_plan._Plan.backward)

    def __init__(self, plan):
        self.plan = plan

    def forward(self, x, *params):
        y = self.plan.forward(x)
        if not np.isfinite(y).all():
            raise _NonFinite
        self.x, self.signature, self.token = x, self.plan.signature, self.plan.forwards
        return y

    def backward(self, dy):
        plan = self.plan
        with plan.lock:
            if plan.signature != self.signature:
                raise RuntimeError(
                    "backward() through a compiled model whose layers changed since its forward "
                    "(a layer's hyper-parameters, training mode with active Dropout, or the input "
                    "shape); call backward() before changing them")
            if plan.forwards != self.token:  # another forward replaced the saved activations
                plan.forward(self.x)
                self.token = plan.forwards
            dx, grads = plan.backward(dy, need_dx=self.needs_input_grad[0])
        return (dx,) + tuple(g if needs else None for g, needs in zip(grads, self.needs_input_grad[1:]))


class CompiledModel:
    """`model` run by the CPU executor where it can be; everything else (parameters(), state_dict(),
    to(), ...) is the model's own."""

    def __init__(self, model):
        self.module = model
        self._plan = cpu_plan._Plan()
        try:
            self._layers = cpu_plan.chain(model)
        except Unsupported as why:
            self._layers, self.unsupported = None, str(why)
        else:
            self.unsupported = None

    def __call__(self, x):
        plan = self._plan_for(x)
        if plan is not None:
            with plan.lock:
                try:
                    return PlanFunction(plan)(x, *plan.params())
                except _NonFinite:
                    pass
        return self.module(x)

    forward = __call__

    def _plan_for(self, x):
        array = x.data if isinstance(x, Tensor) else x
        if self._layers is None or emulation_enabled():
            return None
        if type(array) is not np.ndarray or array.dtype != np.float32 or array.ndim not in (2, 4) \
                or array.shape[0] == 0:
            return None
        with self._plan.lock:
            return self._plan if self._plan.prepare(self._layers, array) else None

    def uses_executor(self, x):
        """Would a forward on `x` run the executor? (For tests and the bench; runs nothing.)"""
        return self._plan_for(x) is not None

    def train(self, mode=True):
        self.module.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def to(self, device):
        self.module.to(device)
        return self

    def __getattr__(self, name):  # reached only for names the wrapper lacks: the model's
        if name == "module":
            raise AttributeError(name)
        return getattr(self.module, name)

    def __repr__(self):
        return f"compile({self.module!r})"


def compile(model):
    """Wrap `model` so that float32 NumPy batches run through the CPU executor where it can lower
    the model (see gpuconv.nn.cpu_plan.LOWERINGS); the wrapper has the model's parameters,
    state_dict and modes. A compiled model is returned as it is."""
    if isinstance(model, CompiledModel):
        return model
    return CompiledModel(model)
