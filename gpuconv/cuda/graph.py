"""A training step captured once and replayed as a CUDA graph (`train --cuda-graph`, issue 17).

A step of a small model is a few dozen short launches; from Python each costs microseconds of host
work, which a GPU finishes faster than the host issues them. A CUDA graph replays the whole step with
one launch. PyTorch's recipe (torch.cuda.graphs), with a graph-private memory pool:

1. record: the first call runs the step eagerly, the allocations served by a StepPool that keeps every
   buffer the step asks for, in order (the optimizer's flat buffers are made before, so the pool
   holds the step's own buffers alone);
2. capture: the second call runs the step's Python again on a side stream being captured, the pool
   serving the same buffers in the same order (anything else: CaptureError). Capture runs nothing;
   the graph is then launched once to do the step;
3. replay: every later call copies the batch into the static input buffers (device to device),
   writes the optimizer's hyperparameters (the step count and the lr of the schedule) into their
   small device array, and launches the graph: no Python model code, no allocation, no host sync.

The loss and logits a call returns are the graph's own buffers: the next call overwrites them, so
read (or sum) them before it, as the Trainer does.

Under kernel emulation the three stages run the same way: emulated_devices serves the step's buffers
from the pool, and capturing keeps each device operation as a node instead of running it, so
replaying runs the nodes alone. A test therefore shows, without a GPU, that after the first call the
step allocates nothing, reads nothing back to the host, and gives the eager step's numbers bit for
bit (state the Python code would have changed at each step, and a graph would not, shows up there).

What a graph cannot hold runs eagerly, never as an error: a batch of another shape or dtype (the
last partial batch), dropout (a graph replays one mask), parameters the optimizer cannot fuse into
one flat buffer, parameters, buffers, a layer's settings (train/eval mode, BatchNorm's momentum, ...)
changed or the optimizer's weight decay, momentum or Nesterov switched on or off since the capture,
and on a GPU any error during the capture (logged once; the run's steps stay eager).
"""
import contextlib

import numpy as np

from ..backend import device_scope, is_cupy_array, is_device_array
from ..errors import CaptureError
from . import emulated_devices


class StepPool:
    """The step's buffers: recorded in order by the first call, served in the same order after.
    Buffers freed during the step stay the step's (a replay writes them again); nothing is returned
    to CuPy's pool until the pool itself goes."""

    def __init__(self):
        self.buffers, self.keys = [], []  # CuPy MemoryPointers or emulated arrays; (bytes) or (shape, dtype)
        self.serving = self.capturing = False
        self.index = 0
        self.nodes = []  # emulation: the captured graph, as (run, outputs, event)

    def _next(self, key, what):
        index = self.index
        if index >= len(self.keys) or self.keys[index] != key:
            recorded = self.keys[index] if index < len(self.keys) else "nothing more"
            raise CaptureError(f"allocation {index} of the step ({what}) asked for {key}, the recorded step for "
                               f"{recorded}: the step's allocations depend on more than the batch's shape")
        self.index += 1
        return self.buffers[index]

    def serve(self):
        """From now on, serve the recorded buffers, starting again from the first."""
        self.serving, self.index = True, 0

    def check_all_served(self):
        if self.index != len(self.keys):
            raise CaptureError(f"the step made {self.index} of the recorded step's {len(self.keys)} allocations")

    # ----- CuPy: the allocator of cupy.cuda.using_allocator -----
    def malloc(self, nbytes):
        if self.serving:
            return self._next(("bytes", nbytes), "a CuPy allocation")
        import cupy
        memory = cupy.get_default_memory_pool().malloc(nbytes)
        self.buffers.append(memory)
        self.keys.append(("bytes", nbytes))
        return memory

    # ----- emulation: emulated_devices asks for every new array's buffer here -----
    def take(self, array, what, copy=True):
        """The buffer for a new array `array` (shape, dtype; its values are copied when `copy`)."""
        key = (tuple(array.shape), str(array.dtype))
        if not self.serving:
            emulated_devices.record("alloc", array.nbytes, what)
            self.buffers.append(array)
            self.keys.append(key)
            return array
        buffer = self._next(key, what)
        if copy:
            np.copyto(buffer, array)
        return buffer


class _EmulatedGraph:
    """The nodes emulation captured: each either writes into existing buffers (a launch, an in-place
    op) or computes a new array and copies it into the buffer the pool gave it at capture."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def launch(self):
        for run, outputs, event in self.nodes:
            if event is not None:
                emulated_devices._emit(event)
            value = run()
            if outputs is not None:
                _copy_into(outputs, value)


def _copy_into(outputs, value):
    if isinstance(outputs, (tuple, list)):
        for out, v in zip(outputs, value):
            _copy_into(out, v)
    elif isinstance(outputs, np.ndarray):
        np.copyto(outputs.view(np.ndarray), value)


def _capture_cuda(pool, body):
    """Run body() under CUDA stream capture (on a side stream: the legacy default stream cannot be
    captured), CuPy's allocations served by `pool` (thread-local: other threads keep CuPy's pool)
    -> (cupy.cuda.Graph, what body returned)."""
    import cupy
    stream = cupy.cuda.Stream(non_blocking=True)
    with cupy.cuda.using_allocator(pool.malloc), stream:
        stream.begin_capture()
        try:
            outputs = body()
        except BaseException:
            try:
                stream.end_capture()
            except Exception:  # the capture is invalid anyway; body's error says why
                pass
            raise
        graph = stream.end_capture()
    return graph, outputs


class StaticStep:
    """One training step, forward(x, y) -> (loss Tensor, logits Tensor), then backward and the
    optimizer's step, captured as a CUDA graph on its second call and replayed after (see the module
    docstring). `step(x, y)` -> (loss array, logits array), as an eager step returns them.

    `model` (optional) lets the step refuse dropout and notice a change of train/eval mode or of its
    buffers; `log` gets the one line that says why the steps stay eager, when they do."""

    def __init__(self, forward, optimizer, model=None, log=print):
        self.forward, self.optimizer, self.model, self.log = forward, optimizer, model, log
        self.pool = self.graph = self.inputs = self.outputs = self.state = None
        self.eager_reason = None  # why every step now runs eagerly
        self.replays = 0

    # ----- the eager step, and the fallback -----
    def eager(self, x, y):
        return self._step(x, y, self.optimizer.step)

    def _body(self, x, y):
        """The captured part: the step with the optimizer's device half."""
        return self._step(x, y, self.optimizer.graph_update)

    def _step(self, x, y, update):
        loss, logits = self.forward(x, y)
        self.optimizer.zero_grad()
        loss.backward()
        update()
        return loss.data, logits.data

    def stay_eager(self, reason):
        if self.eager_reason is None:
            self.eager_reason = reason
            self.log(f"cuda graph: {reason}; this run's steps stay eager")
        self.pool = self.graph = self.inputs = self.outputs = None  # the pool's memory goes back

    def __call__(self, x, y):
        if (self.eager_reason is None and self.graph is None and self.inputs is not None
                and not self._same_batch(x, y) and x.shape[:1] > self.inputs[0].shape[:1]):
            # recorded on a smaller batch (a run resumed at its last, partial batch): the full
            # batches that follow are the ones to capture, so the recording starts again with them
            self.pool = self.inputs = self.outputs = self.state = None
        if self.eager_reason is None and self.inputs is None:
            reason = self._unsupported(x, y)
            if reason:
                self.stay_eager(reason)
        if self.eager_reason is not None or not self._same_batch(x, y):
            return self.eager(x, y)
        if self.state is not None and self.state != self._state():
            self.stay_eager("the parameters, BatchNorm buffers, a layer's settings (train/eval mode, momentum, ...) "
                            "or the optimizer's momentum, "
                            "Nesterov or weight decay (on or off) changed since the capture")
            return self.eager(x, y)
        with device_scope(x):
            if self.pool is None:
                return self._record(x, y)
            self.inputs[0][...] = x  # device-to-device copies into the graph's inputs, on the stream
            self.inputs[1][...] = y
            if self.graph is None:
                return self._capture(x, y)
            self.optimizer.count_step()
            self.graph.launch()  # CuPy: on the current stream, after the input copies
            self.replays += 1
            return self.outputs

    def _unsupported(self, x, y):
        if not (is_device_array(x) and is_device_array(y)):
            return "the batch is not on a GPU"
        if self.model is not None and self.model.training and any(
                type(m).__name__ == "Dropout" and m.p > 0 for m in self.model.modules()):
            return "the model has dropout, and a graph would replay one mask every step"
        if not self.optimizer.pack():
            return "the optimizer's parameters cannot be one flat buffer (several devices or dtypes)"
        return None

    def _same_batch(self, x, y):
        return self.inputs is None or all(
            a.shape == b.shape and a.dtype == b.dtype for a, b in zip(self.inputs, (x, y)))

    def _state(self):
        """What the graph's pointers and branches were captured against."""
        flat = self.optimizer.flat
        # the fused launch's flags (weight decay, momentum, Nesterov on or off) are captured with it
        ids = [id(flat), self.optimizer.fused_flags()] + [id(p.data) for p in self.optimizer.params]
        if self.model is not None:
            ids += [id(m._buffers[n]) for _, m, n in self.model.named_buffers()]
            # every layer's settings (train/eval, BatchNorm's momentum and eps, a conv's stride, ...):
            # the capture baked their values into its launches as kernel arguments
            ids += [_settings(m) for m in self.model.modules()]
        return ids

    # ----- the three stages -----
    def _record(self, x, y):
        self.inputs = (x.copy(), y.copy())  # the static inputs: the graph reads the batch here
        pool = StepPool()
        try:
            with _serving(pool, x):
                self.outputs = self.eager(*self.inputs)
        except BaseException:
            self.inputs = self.outputs = None
            raise
        self.pool, self.state = pool, self._state()
        return self.outputs

    def _capture(self, x, y):
        self.pool.serve()
        self.optimizer.count_step()
        try:
            if is_cupy_array(x):
                self.graph, outputs = _capture_cuda(self.pool, lambda: self._body(*self.inputs))
            else:
                with _serving(self.pool, x, capture=True):
                    outputs = self._body(*self.inputs)
                self.graph, self.pool.nodes = _EmulatedGraph(self.pool.nodes), []
            self.pool.check_all_served()
        except Exception as exc:  # capture ran nothing: this step runs eagerly, as will the others
            self.optimizer.steps -= 1
            self.stay_eager(f"capturing the step failed ({type(exc).__name__}: {exc})")
            return self.eager(x, y)
        self.outputs = outputs
        self.graph.launch()  # the step itself
        return self.outputs


def _settings(module):
    """A module's plain settings (numbers, flags, strings, tuples of them), the values a launch takes."""
    def plain(value):
        return value is None or isinstance(value, (bool, int, float, str)) or (
            isinstance(value, tuple) and all(map(plain, value)))
    settings = {name: value for name, value in vars(module).items() if plain(value)}
    settings["training"] = module.training  # a class attribute until train()/eval() sets it on the module
    return tuple(sorted(settings.items()))


@contextlib.contextmanager
def _serving(pool, x, capture=False):
    """The step's allocations served by `pool`: CuPy's through its thread-local allocator (never
    set_allocator, which is process-wide), an emulated device's through emulated_devices.stepping."""
    if is_cupy_array(x):
        import cupy
        with cupy.cuda.using_allocator(pool.malloc):
            yield pool
        return
    pool.capturing = capture
    try:
        # capturing computes new arrays from buffers whose kernels have not run (CUDA computes nothing
        # at all): NumPy's warnings about those values mean nothing
        with emulated_devices.stepping(pool), np.errstate(all="ignore" if capture else None):
            yield pool
    finally:
        pool.capturing = False
