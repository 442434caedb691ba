"""gpuconv.compile(model): the one entry to the CPU executor (gpuconv/nn/cpu_plan.py).

    model = LeNet5()
    fast = gpuconv.compile(model)        # same parameters, same state_dict, same results
    loss = F.cross_entropy(fast(x), y)   # a float32 NumPy batch runs as one fused plan
    loss.backward()                      # gradients land in model's p.grad as always

Where the executor can lower the whole model (a chain of the layers in cpu_plan.LOWERINGS) and the
batch is a float32 NumPy array, the forward runs as one plan and is recorded on the tape as one
Function (PlanFunction) whose inputs are x and the model's parameters; residual blocks (nn.Residual,
the zoo's BasicBlock) are steps it lowers too, as one op with two branches, and so are branches
concatenated along the channels (nn.Concat), one op with a branch per block of channels. A chain it can lower in
part (an LPPool2d, a Dropout in training or a module with its own
forward between lowerable layers) is split into segments: each run of lowerable layers that holds a conv fused
with its pool runs as a plan of its own (its own PlanFunction, whose input may need a gradient),
everything else eagerly, layer by layer (_worth_a_plan says why not every run). Anything the
executor cannot take (a CuPy batch, kernel emulation, float64, a model with its own forward,
non-finite output of a plan) runs eagerly, op by op: the whole model, or the segment.
Like torch.compile, it wraps and never changes the model.
"""
import numpy as np

from . import fpenv
from .autograd import Function, Tensor
from .backend import emulation_enabled
from .nn import cpu_plan, cpu_workers


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
        reports = []  # the floating-point errors the plan met (np.errstate's): see the end
        y = self.plan.forward(x, reports=reports)
        if not np.isfinite(y).all():
            # the segment runs again eagerly, and its BatchNorms update their statistics; its ops
            # report the floating-point errors they meet, so the plan's are dropped (not twice)
            raise _NonFinite
        self.plan.update_running_stats(x.shape[0])
        self.x, self.signature, self.token = x, self.plan.signature, self.plan.forwards
        # the running statistics this forward read (copies: a few numbers per channel), for a
        # recomputed forward: the layers' may be replaced or updated in place before the backward
        self.buffers = [np.array(array, copy=True) for array in self.plan.buffers()]
        # last, as the eager model's ops report theirs as they run: a FloatingPointError leaves the
        # statistics counted (an eager BatchNorm counts its batch first), and a callback may run
        # this model again (a forward of its own, after this one's statistics and token)
        for kinds, where in reports:
            fpenv.report_errors(kinds, where)
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
                _recompute(plan, self.x, self.buffers)
                self.token = plan.forwards
            try:
                dx, grads = plan.backward(dy, need_dx=self.needs_input_grad[0])
            except cpu_workers.ArenaDropped:  # more than cpu_workers.MAX_PLANS plans ran since this forward
                _recompute(plan, self.x, self.buffers)
                self.token = plan.forwards
                dx, grads = plan.backward(dy, need_dx=self.needs_input_grad[0])
        return (dx,) + tuple(g if needs else None for g, needs in zip(grads, self.needs_input_grad[1:]))


def _recompute(plan, x, buffers):
    """A forward run again for its activations: the floating-point errors it meets were reported
    when it first ran, so they are not again."""
    plan.forward(x, buffers, reports=[])


def _worth_a_plan(layers, whole):
    """Is a run of lowerable layers worth a plan of its own? The whole model always is (as the
    executor ran before partial lowering: an MLP too). A run between layers that run eagerly is
    only when the plan fuses one of its convs with a following [ReLU ->] MaxPool2d, where the
    executor's layout and fusion pay for a plan's layout change at each edge and its hand-overs.

    Measured (docs/experiments/partial_lowering.py, training steps at batch 128, medians of 60
    rounds interleaved per model, 17:11-17:13 UTC on a 2-core VM shared with other sessions, so a
    ~7% noise floor: the two identical eager SimpleCNN paths differed by that): SimpleCNN, whose
    BatchNorms split every conv from its pool, eager 275 ms, a plan for each run holding a Conv2d
    366 ms (a lone unfused conv1, 1 -> 32 channels, ran ~3x slower as a plan than eagerly), a plan
    for every run 275 ms; LeNet-5 with Dropout in training: eager 107 ms, this rule 54 ms, every run
    48 ms. Every run planned measured as good or slightly better, but it multiplies plans: a worker
    process keeps the arenas of cpu_workers.MAX_PLANS (8) plans and sets up again, every step,
    those beyond (a VGG-like net with BatchNorm would have one plan per conv), and each plan keeps
    its own activation buffers; this rule plans only where the fusion pays."""
    return whole or cpu_plan.fused_conv_pools(layers) > 0


class _Segment:
    """Steps [start, stop) of a compiled model: run by `plan` (a cpu_plan._Plan), or eagerly,
    layer by layer, when plan is None."""

    def __init__(self, start, stop, plan):
        self.start, self.stop, self.plan = start, stop, plan


class CompiledModel:
    """`model` run by the CPU executor where it can be; everything else (parameters(), state_dict(),
    to(), ...) is the model's own.

    The model is taken as its steps (cpu_plan.steps: nested plain Sequentials opened, a module
    with a forward of its own one step). Maximal runs of consecutive steps the executor can lower
    as they are configured now (cpu_plan.unlowerable) become segments, each with a plan of its
    own, recorded on the tape as its own PlanFunction; every other step runs eagerly, layer(h).
    The segments follow the layers' modes (Dropout lowers in eval only), so switching train() and
    eval() between steps picks other segments. A segment whose plan cannot take its input
    (shape, dtype, non-finite output) runs its layers eagerly."""

    def __init__(self, model):
        self.module = model
        self._steps = cpu_plan.steps(model)
        self._plan = cpu_plan._Plan()  # the plan of the whole model, when every step lowers
        # (start, stop) -> the plan of that run; (start, stop, its BatchNorms' training flags) -> its
        # plan while one of them trains: a forward in one mode keeps its plan, and its backward
        # stays valid, when the other mode runs in between
        self._plans = {(0, len(self._steps)): self._plan}
        self._segments_key, self._segments = None, None
        self._probes = {}  # (start, stop) -> a plan uses_executor compiles, never one a forward runs

    def __call__(self, x):
        segments = self._segments_for(x)
        if segments is None:  # nothing for the executor: the model's own forward
            return self.module(x)
        h = x
        for segment in segments:
            if segment.plan is not None:
                # prepare and run under one hold of the lock: another thread's prepare for another
                # shape must not come between
                with segment.plan.lock:
                    plan = self._plan_for(segment, h)
                    if plan is not None:
                        try:
                            h = PlanFunction(plan)(h, *plan.params())
                            continue
                        except _NonFinite:
                            pass
            for layer in self._steps[segment.start:segment.stop]:
                h = layer(h)
        return h

    forward = __call__

    def _current_segments(self):
        """The segments for the layers' configuration now; recomputed when a layer's lowerability
        changed (a Dropout switched between train and eval, a hyper-parameter set), and the steps
        taken again when the model's modules changed (a layer appended to or replaced in a
        Sequential after compile): the plans run what the model's own forward would."""
        current = cpu_plan.steps(self.module)
        if len(current) != len(self._steps) or any(a is not b for a, b in zip(current, self._steps)):
            self._steps = current
            self._plan = cpu_plan._Plan()
            self._plans = {(0, len(current)): self._plan}
            self._probes = {}
            self._segments_key, self._segments = None, None
        reasons = tuple(cpu_plan.unlowerable(layer) for layer in self._steps)
        modes = tuple(cpu_plan.batch_norm_modes(layer) for layer in self._steps)
        if (reasons, modes) != self._segments_key:
            segments, start, count = [], 0, len(self._steps)
            while start < count:
                stop = start + 1
                while stop < count and (reasons[start] is None) == (reasons[stop] is None):
                    stop += 1
                plan = None
                if reasons[start] is None and _worth_a_plan(self._steps[start:stop], (start, stop) == (0, count)):
                    flags = sum(modes[start:stop], ())
                    key = (start, stop) + ((flags,) if any(flags) else ())
                    plan = self._plans.setdefault(key, cpu_plan._Plan())
                segments.append(_Segment(start, stop, plan))
                start = stop
            self._segments_key, self._segments = (reasons, modes), segments
        return self._segments

    def _segments_for(self, x):
        """The segments to run `x` through, or None when no segment would run a plan: the batch is
        not a float32 NumPy array (a CuPy batch, float64), kernel emulation is on, or nothing lowers."""
        if emulation_enabled() or not _plannable(x):
            return None
        segments = self._current_segments()
        if all(segment.plan is None for segment in segments):
            return None
        return segments

    def _plan_for(self, segment, h):
        """The segment's plan, compiled for h, or None when the segment runs eagerly."""
        plan = segment.plan
        if plan is None or not _plannable(h):
            return None
        array = h.data if isinstance(h, Tensor) else h
        with plan.lock:
            return plan if plan.prepare(self._steps[segment.start:segment.stop], array) else None

    def uses_executor(self, x):
        """Would a forward on `x` run at least one segment by a plan? (For tests and the bench; runs
        no layer.) The shape reaching a later segment comes from each layer's output_shape, its
        dtype is taken to stay float32; after a layer without one, a segment is taken to run its
        plan (only its input shape could stop it)."""
        segments = self._segments_for(x)
        if segments is None:
            return False
        shape = tuple((x.data if isinstance(x, Tensor) else x).shape)
        for segment in segments:
            layers = self._steps[segment.start:segment.stop]
            if segment.plan is not None:
                if shape is None:
                    return True
                if len(shape) in (2, 4):  # as _plannable; prepare reads the shape only: a view of
                    # one value stands for x (the batch size counts: a BatchNorm that trains needs
                    # two values per channel). A plan of its own: preparing the segment's would
                    # recompile it for this shape, and the backward of a forward it ran would then
                    # refuse to run
                    probe = self._probes.setdefault((segment.start, segment.stop), cpu_plan._Plan())
                    with probe.lock:
                        if probe.prepare(layers, np.broadcast_to(np.float32(0), shape)):
                            return True
            shape = _output_shape(layers, shape)
        return False

    @property
    def unsupported(self):
        """None when the whole model runs as one plan; else which steps run eagerly, and why."""
        segments = self._current_segments()
        reasons = self._segments_key[0]  # per step: why it does not lower now, or None
        if all(reason is None for reason in reasons):
            return None
        if len(reasons) == 1:
            return reasons[0]
        lines = [f"step {index} {reason}" for index, reason in enumerate(reasons) if reason is not None]
        for segment in segments:
            if segment.plan is None and reasons[segment.start] is None:
                names = ", ".join(type(layer).__name__ for layer in self._steps[segment.start:segment.stop])
                where = (f"step {segment.start}" if segment.stop - segment.start == 1
                         else f"steps {segment.start}-{segment.stop - 1}")
                lines.append(f"{where} ({names}) eagerly: no conv fused with a pool, not worth a plan of their own")
        return "; ".join(lines)

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


def _plannable(x):
    """Can a plan take this batch? A float32 NumPy array (or a Tensor of one), NCHW or flat, not empty."""
    array = x.data if isinstance(x, Tensor) else x
    return (type(array) is np.ndarray and array.dtype == np.float32 and array.ndim in (2, 4)
            and array.shape[0] != 0)


def _output_shape(layers, shape):
    """The shape after `layers` by their output_shape rules; None where one has none or fails."""
    for layer in layers:
        if shape is None or not hasattr(layer, "output_shape"):
            return None
        try:
            shape = tuple(layer.output_shape(shape))
        except (ValueError, TypeError, IndexError):  # a rule that cannot take this shape: the layer will say why
            return None
    return shape


def compile(model):
    """Wrap `model` so that float32 NumPy batches run through the CPU executor where it can lower
    the model (see gpuconv.nn.cpu_plan.LOWERINGS); the wrapper has the model's parameters,
    state_dict and modes. A compiled model is returned as it is."""
    if isinstance(model, CompiledModel):
        return model
    return CompiledModel(model)
