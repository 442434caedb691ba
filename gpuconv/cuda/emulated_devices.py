"""Emulated CUDA devices for kernel emulation: which GPU is current, and where every array lives.

CuPy allocates every new array, and launches every kernel, on the *current* device
(`cupy.cuda.Device(i)` as a context manager makes device i current); an operand that lives on another
device is an illegal-address fault or an error. A machine without two GPUs cannot show that gpuconv
makes the right device current, so emulation mode can pretend to have several:

    with gpuconv.cuda.emulation(devices=2):
        model.to("cuda:1")                     # parse_device accepts cuda:0 and cuda:1
        with emulated_devices.recording() as events:
            ... a training step ...
        assert {e.device for e in events} == {1}

`EmulatedDevice` stands in for `cupy.cuda.Device`. Arrays on an emulated device are `DeviceArray`s
(NumPy arrays that remember their device id, as a CuPy array does). Every NumPy function or ufunc
applied to them checks, as CuPy would, that each operand lives on the current device, computes on
the CPU, and returns its result on the current device, recording an allocation; gpuconv's launch
code records each kernel launch and each buffer it allocates (`allocate`), with its size, so a test
can also measure a launcher's peak memory.
"""
import collections
import contextlib
import functools
import threading
import weakref

import numpy as np

from ..errors import CaptureError, DeviceMismatchError

# kind: "alloc" (a new buffer), "launch" (one of gpuconv's kernels or a cuBLAS GEMM from the launch
# code), "op" (what CuPy would run as its own kernel: an elementwise ufunc, a reduction, a copy, a
# matmul on a device array; nbytes = bytes read and written, flops = arithmetic, both estimates),
# "read" (a blocking copy to the host).
Event = collections.namedtuple("Event", "kind device nbytes what flops", defaults=(0,))

_state = threading.local()
_count = 0          # emulated devices; 0 = emulated devices are off
_recorders = []     # lists that receive every Event while recording() is active
_step = None        # gpuconv.cuda.graph's step pool while a step records, captures or replays (stepping())


def count():
    """How many emulated CUDA devices exist (0 when the feature is off)."""
    return _count


@contextlib.contextmanager
def enabled(devices):
    """Pretend to have `devices` CUDA devices inside the block (device 0 current)."""
    global _count
    saved = _count
    _count = int(devices)
    try:
        yield
    finally:
        _count = saved


def _stack():
    if not hasattr(_state, "stack"):
        _state.stack = [0]
    return _state.stack


def current_id():
    return _stack()[-1]


class EmulatedDevice:
    """A stand-in for cupy.cuda.Device: `with EmulatedDevice(1):` makes device 1 current."""

    def __init__(self, device=None):
        self.id = current_id() if device is None else int(device)
        if not 0 <= self.id < max(_count, 1):
            raise DeviceMismatchError(f"emulated CUDA device {self.id} does not exist; "
                                      f"emulation was started with devices={_count}")

    def __enter__(self):
        _stack().append(self.id)
        return self

    def __exit__(self, *exc):
        _stack().pop()

    def use(self):
        _stack()[-1] = self.id

    def synchronize(self):
        """Kernels run synchronously under emulation: nothing to wait for."""

    def __repr__(self):
        return f"<EmulatedDevice {self.id}>"


def record(kind, nbytes=0, what="", device=None, flops=0):
    if kind in ("read", "write") and capturing():
        # CUDA refuses a blocking read during stream capture, and a captured host-to-device copy
        # would replay whatever the host buffer holds at launch: neither belongs in a graph
        raise CaptureError(f"a captured step cannot {'read a value back to' if kind == 'read' else 'copy from'} "
                           f"the host ({what}, {nbytes} bytes on cuda:{current_id() if device is None else device})")
    if _recorders:
        event = Event(kind, current_id() if device is None else device, int(nbytes), what, int(flops))
        for events in _recorders:
            events.append(event)


@contextlib.contextmanager
def recording():
    """Collect every allocation and launch made inside the block as a list of Events."""
    events = []
    _recorders.append(events)
    try:
        yield events
    finally:
        _recorders.remove(events)


@contextlib.contextmanager
def stepping(pool):
    """Inside the block every new buffer comes from `pool` (gpuconv.cuda.graph's step pool), and while
    pool.capturing, device work is recorded as pool.nodes instead of run, as stream capture does."""
    global _step
    saved, _step = _step, pool
    try:
        yield pool
    finally:
        _step = saved


def capturing():
    return _step is not None and _step.capturing


def _defer(run, kind, what, nbytes=0, flops=0):
    """Device work that writes into existing buffers: run now, or, while capturing, kept as a node of
    the graph (with its event, recorded again on every replay) and not run, as CUDA capture does."""
    if capturing():
        _step.nodes.append((run, None, Event(kind, current_id(), int(nbytes), what, int(flops))))
        return True
    run()
    return False


class MemoryMeter:
    """Live and peak bytes of the buffers gpuconv's launch code allocates (allocate()), like a
    device's memory pool would see them."""

    def __init__(self):
        self.live = self.peak = 0

    def _free(self, nbytes):
        self.live -= nbytes


_meters = []


@contextlib.contextmanager
def metering():
    """Measure the launch code's buffers inside the block: yields a MemoryMeter (live, peak)."""
    meter = MemoryMeter()
    _meters.append(meter)
    try:
        yield meter
    finally:
        _meters.remove(meter)


class DeviceArray(np.ndarray):
    """A NumPy array that lives on emulated CUDA device `device_id`."""

    def __array_finalize__(self, obj):
        # Views, copies and method results keep the device of the array they came from.
        self.device_id = getattr(obj, "device_id", current_id())

    @property
    def device(self):
        return EmulatedDevice(self.device_id)

    def get(self):
        """A host (plain NumPy) copy, like cupy.ndarray.get(): recorded as a read back to the host."""
        record("read", self.nbytes, "get", self.device_id)
        return np.array(self.view(np.ndarray), copy=True)

    def set(self, host):
        """Copy a host array into this one, like cupy.ndarray.set(): recorded as a write from the
        host (it allocates nothing)."""
        host = np.asarray(host)
        if host.shape != self.shape:
            raise ValueError(f"set: shape mismatch, {host.shape} into {self.shape}")
        record("write", host.nbytes, "set", self.device_id)
        self.view(np.ndarray)[...] = host

    # Each of these waits for the GPU and copies a value to the host: recorded, so a test can count
    # the blocking reads a training step makes.
    def item(self, *args):
        record("read", self.itemsize, "item", self.device_id)
        return self.view(np.ndarray).item(*args)

    def tolist(self):
        record("read", self.nbytes, "tolist", self.device_id)
        return self.view(np.ndarray).tolist()

    def __float__(self):
        record("read", self.itemsize, "float", self.device_id)
        return float(self.view(np.ndarray))

    def __int__(self):
        record("read", self.itemsize, "int", self.device_id)
        return int(self.view(np.ndarray))

    def __bool__(self):
        record("read", self.itemsize, "bool", self.device_id)
        return bool(self.view(np.ndarray))

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        _check_current(inputs + (out or ()), f"numpy.{ufunc.__name__}")
        plain = [_plain(value) for value in inputs]
        name = ufunc.__name__ if method == "__call__" else f"{ufunc.__name__}.{method}"
        if out is not None:
            kwargs["out"] = tuple(_plain(value) for value in out)
            _in_place(functools.partial(getattr(ufunc, method), *plain, **kwargs), name, plain, kwargs["out"])
            return out[0] if len(out) == 1 else out
        return _result(functools.partial(getattr(ufunc, method), *plain, **kwargs), ufunc.__name__, name, plain)

    def __array_function__(self, func, types, args, kwargs):
        operands = [_plain(value) for value in _flatten(args) + _flatten(list(kwargs.values()))
                    if isinstance(value, np.ndarray)]
        _check_current(operands, f"numpy.{func.__name__}")
        run = functools.partial(func, *_unwrap(args), **_unwrap(kwargs))
        name = None if func.__name__ in _NO_KERNEL else func.__name__
        if kwargs.get("out") is not None:
            _in_place(run, name, operands, _unwrap(kwargs["out"]))
            return kwargs["out"]
        return _result(run, func.__name__, name, operands)

    # CuPy runs each of these as a kernel of its own (a cast, a copy, a gather, a reduction), but
    # NumPy's methods do not dispatch through __array_function__: recorded here.
    def astype(self, dtype, *args, **kwargs):
        plain = self.view(np.ndarray)
        return _result(functools.partial(plain.astype, dtype, *args, **kwargs), "astype", "astype", [plain])

    def copy(self, order="C"):
        plain = self.view(np.ndarray)
        return _result(functools.partial(plain.copy, order), "copy", "copy", [plain])

    def argmax(self, *args, **kwargs):
        plain = self.view(np.ndarray)
        return _result(functools.partial(plain.argmax, *args, **kwargs), "argmax", "argmax", [plain])

    def __getitem__(self, index):
        if not _advanced(index):  # a view: no kernel, no new memory
            return super().__getitem__(index)
        plain, index = self.view(np.ndarray), _unwrap(index)
        # a gather reads as many elements as it writes: the op counts the result twice
        return _result(lambda: plain[index], "take", "take", None, [plain])

    def __setitem__(self, index, value):
        plain, index, value = self.view(np.ndarray), _unwrap(index), _unwrap(value)

        def run():
            plain[index] = value
        if _recorders or capturing():
            _in_place(run, "copy", [np.asarray(value)], plain[index])
        else:
            run()


# Array functions that CuPy answers without a kernel (views, metadata, no-op conversions).
_NO_KERNEL = {"reshape", "transpose", "ravel", "squeeze", "expand_dims", "swapaxes", "moveaxis",
              "broadcast_to", "shape", "ndim", "size", "result_type", "may_share_memory",
              "shares_memory", "atleast_1d", "atleast_2d", "ascontiguousarray", "asarray", "can_cast"}


def _advanced(index):
    """True for an index that gathers (an integer or boolean array), which CuPy runs as a kernel."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, (np.ndarray, list)) for p in parts)


def _emit(event):
    for events in _recorders:
        events.append(event)


def _record_op(name, inputs, outputs):
    """The "op" event for what CuPy would launch for `name`, with the bytes it reads and writes and
    one flop per output element (a matmul counts 2*M*N*K): recorded, or, while capturing, returned
    for the graph's node to record at each replay. None when nobody records."""
    if name is None or not (_recorders or capturing()):
        return None
    outputs = [o for o in (outputs if isinstance(outputs, tuple) else (outputs,)) if isinstance(o, np.ndarray)]
    arrays = [a for a in inputs if isinstance(a, np.ndarray)] + outputs
    nbytes = sum(a.nbytes for a in arrays)
    if name == "matmul" and len(inputs) >= 2 and all(getattr(a, "ndim", 0) >= 2 for a in inputs[:2]):
        flops = 2 * outputs[0].size * inputs[0].shape[-1] if outputs else 0
    else:
        flops = max((o.size for o in outputs), default=0)
        if name.endswith(".reduce") or name in ("sum", "mean", "argmax", "max", "min"):
            flops = max((a.size for a in inputs if isinstance(a, np.ndarray)), default=flops)
    event = Event("op", current_id(), int(nbytes), name, int(flops))
    if not capturing():
        _emit(event)
    return event


def run_on_device(run, kind, what, nbytes=0, flops=0):
    """Device work that writes into existing buffers (a kernel launch, a GEMM): recorded and run, or,
    while capturing, kept as a node of the graph (its event recorded at every replay) and not run,
    as CUDA's stream capture does."""
    event = Event(kind, current_id(), int(nbytes), what, int(flops))
    if capturing():
        _step.nodes.append((run, None, event))
        return
    _emit(event)
    run()


def _in_place(run, name, inputs, outputs):
    """An op writing into existing arrays (out=, a[...] = b): as run_on_device."""
    event = _record_op(name, inputs, outputs)
    if capturing():
        _step.nodes.append((run, None, event))
        return
    run()


def _result(run, what, op=None, inputs=(), operands=None):
    """The device array(s) run() gives: an "op" event named `op` (None: no kernel; inputs None: the
    result counts as read too), and, as CuPy would, new memory on the current device (from the step's
    pool while a step runs). A result that shares memory with an operand is a view: no kernel, no
    allocation. While capturing, run is kept as a node that refills the same buffer at each replay."""
    operands = inputs if operands is None else operands
    result = run()
    arrays = [r for r in (result if isinstance(result, (tuple, list)) else (result,)) if isinstance(r, np.ndarray)]
    if arrays and all(_is_view(a, operands) for a in arrays):
        return _wrap(result, what, operands)
    event = _record_op(op, [result] if inputs is None else inputs, result) if getattr(result, "size", 1) else None
    wrapped = _wrap(result, what, operands)
    if capturing():
        _step.nodes.append((run, wrapped, event))
    return wrapped


def _is_view(result, operands):
    return isinstance(result, np.ndarray) and any(
        isinstance(o, np.ndarray) and np.may_share_memory(result, _plain(o)) for o in operands)


def _flatten(values):
    flat = []
    for value in values:
        if isinstance(value, (list, tuple)):
            flat += _flatten(value)
        else:
            flat.append(value)
    return flat


def _plain(value):
    return value.view(np.ndarray) if isinstance(value, DeviceArray) else value


def _unwrap(value):
    if isinstance(value, DeviceArray):
        return value.view(np.ndarray)
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(v) for v in value)
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in value.items()}
    return value


def _wrap(result, what, operands=()):
    """`result` as an array of the current device. New memory (not a view of an operand) is an
    allocation: recorded, or, while a step runs, a buffer of the step's pool that receives the values."""
    if isinstance(result, tuple):
        return tuple(_wrap(r, what, operands) for r in result)
    if isinstance(result, list):
        return [_wrap(r, what, operands) for r in result]
    if isinstance(result, (np.ndarray, np.generic)) and not isinstance(result, DeviceArray):
        array = np.asarray(result)
        if not _is_view(array, operands):
            if _step is None:
                record("alloc", array.nbytes, what)
            else:
                array = _step.take(array, what)
        wrapped = array.view(DeviceArray)
        wrapped.device_id = current_id()
        return wrapped
    return result


def _check_current(operands, what):
    """CuPy runs an op on the current device; an operand on another device cannot be read there."""
    current = current_id()
    for value in operands:
        if isinstance(value, DeviceArray) and value.device_id != current:
            raise DeviceMismatchError(
                f"{what}: an operand lives on cuda:{value.device_id} but cuda:{current} is the current "
                "device; on a GPU this reads another device's memory (an illegal address). Make the "
                "data's device current: `with gpuconv.backend.device_scope(x):`")


def to_device(array, index):
    """A copy of `array` on emulated device `index` (the array itself if it is already there): an
    allocation and a host-to-device write."""
    if isinstance(array, DeviceArray) and array.device_id == index:
        return array
    with EmulatedDevice(index):
        host = np.array(_plain(np.asarray(array)), copy=True)
        record("write", host.nbytes, "host to device")
        return _wrap(host, "to_device")


def allocate(shape, dtype, zero=False, what="buffer"):
    """A new buffer on the current emulated device, recorded and metered (gpuconv's launch code
    allocates through here under emulation); while a step runs, a buffer of the step's pool."""
    if _step is not None:
        array = _step.take(np.empty(shape, dtype=dtype), what, copy=False)
    else:
        array = (np.zeros if zero else np.empty)(shape, dtype=dtype)
        record("alloc", array.nbytes, what)
        for meter in _meters:
            meter.live += array.nbytes
            meter.peak = max(meter.peak, meter.live)
            weakref.finalize(array, meter._free, array.nbytes)
    if zero and array.size:  # a memset: a device op of its own, captured like any other
        if _step is not None:
            _in_place(functools.partial(array.fill, 0), "fill", [], array)
        else:
            _record_op("fill", [], array)
    if _count:
        array = array.view(DeviceArray)
        array.device_id = current_id()
    return array


# Creation functions: CuPy's allocate on the current device, and asarray-like ones return a device
# array. NumPy's asarray family dispatches only on like=, so an emulated device's array would come
# back as a plain host array; this module-like object puts the result on the current device.
_CREATION = ("asarray", "ascontiguousarray", "asfortranarray", "array", "copy", "empty", "zeros", "ones",
             "full", "arange", "eye", "identity", "linspace", "empty_like", "zeros_like", "ones_like",
             "full_like", "frombuffer", "fromiter")


_FILLS = ("zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "arange", "eye", "identity",
          "linspace")

# These copy their first argument; from host data (a Python number, a list, a NumPy array) that is a
# host-to-device write, which a captured graph cannot hold.
_FROM_DATA = ("asarray", "ascontiguousarray", "asfortranarray", "array", "copy", "frombuffer", "fromiter")


class _ArrayModule:
    """What get_array_module returns for an emulated device's arrays: NumPy, with CuPy's rule that
    new arrays live on the current device."""

    __name__ = "numpy"  # the launch code takes its NumPy (emulation) branches

    def __getattr__(self, name):
        attribute = getattr(np, name)
        if name not in _CREATION:
            return attribute

        def create(*args, **kwargs):
            operands = [_plain(a) for a in _flatten(list(args)) if isinstance(a, DeviceArray)]
            _check_current(operands, f"numpy.{name}")
            if name in _FROM_DATA and args and not operands:
                record("write", np.asarray(args[0]).nbytes, f"{name} of host data")
            run = functools.partial(attribute, *_unwrap(args), **_unwrap(kwargs))
            if name in _FILLS:
                op = "fill"  # a memset or fill kernel
            else:
                op = "copy" if operands else None  # asarray & co. of a device array: a copy unless a view
            return _result(run, name, op, [] if op == "fill" else operands, operands)
        return create


array_module = _ArrayModule()
