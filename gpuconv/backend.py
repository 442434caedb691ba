"""Device dispatch: which array module an array lives in, and moving arrays between devices.

CuPy is optional. It imports fine on a machine with no GPU (CI, laptops), so "installed" is not
"usable": `cuda_status()` asks `cupy.is_available()` and remembers why CUDA is out of reach.
"""
import contextlib
import functools
import os

import numpy as np

from .errors import ArgumentError, CudaUnavailableError, DeviceMismatchError


@functools.lru_cache(maxsize=None)
def cuda_status():
    """(cupy module or None, reason string). The reason is '' when CUDA is usable."""
    try:
        import cupy
    except ImportError:
        return None, ("CuPy is not installed; install the extra that matches your CUDA driver: "
                      "pip install 'gpuconv[cuda13]' (or 'gpuconv[cuda12]')")
    except Exception as exc:  # a broken CuPy install raises other things (e.g. missing libcuda)
        return None, f"CuPy failed to import: {exc}"
    try:
        if cupy.is_available():
            return cupy, ""
    except Exception as exc:
        return cupy, f"CuPy is installed but no CUDA device is usable: {exc}"
    return cupy, "CuPy is installed but no CUDA device is usable (cupy.is_available() is False)"


def cuda_available():
    return cuda_status()[1] == ""


def _cupy_or_none():
    """The cupy module if it has been imported (an array of it can exist), without importing it."""
    import sys
    return sys.modules.get("cupy")


def is_cupy_array(x):
    if type(x) is np.ndarray:  # the CPU's arrays: the common case, answered without a lookup
        return False
    cupy = _cupy_or_none()
    return cupy is not None and isinstance(x, cupy.ndarray)


def is_device_array(x):
    """True for an array on a GPU: a CuPy array, or an emulated device's array under emulation."""
    if type(x) is np.ndarray:
        return False
    return is_cupy_array(x) or hasattr(x, "device_id")


def _emulated_devices():
    """gpuconv.cuda.emulated_devices when emulated CUDA devices are switched on, else None."""
    import sys
    module = sys.modules.get("gpuconv.cuda.emulated_devices")
    return module if module is not None and module.count() else None


def get_array_module(*arrays):
    """numpy or cupy, DeZero-style. Raises DeviceMismatchError if the arrays live on different
    devices: the CPU and a GPU, or two GPUs (cuda:0 and cuda:1 are compared by device id)."""
    present = [a for a in arrays if a is not None]
    on_gpu = [is_cupy_array(a) for a in present]
    if len(present) > 1 and (any(on_gpu) or _emulated_devices() is not None):
        devices = [device_of(a) for a in present]
        if len(set(devices)) > 1:
            raise DeviceMismatchError(
                "arrays on different devices were passed to one op: " + ", ".join(devices)
                + "; move them to one device first, e.g. model.to('cpu') and gpuconv.to_device(x, 'cpu')")
    if any(on_gpu):
        return _cupy_or_none()
    if present and hasattr(present[0], "device_id"):  # an emulated device's array
        return _emulated_devices().array_module
    return np


class Device:
    """A parsed device string: 'cpu', 'cuda' (= 'cuda:0') or 'cuda:N'."""

    def __init__(self, kind, index=0):
        self.kind, self.index = kind, index

    def __str__(self):
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"

    __repr__ = __str__

    def __eq__(self, other):
        return str(self) == str(other)

    def __hash__(self):
        return hash(str(self))

    @property
    def xp(self):
        if self.kind == "cpu" or _emulated_devices() is not None:
            return np
        return cuda_status()[0]


def parse_device(device):
    """'auto' -> cuda when CuPy sees a GPU, else cpu. Raises CudaUnavailableError if cuda is asked
    for and cannot be had, naming why."""
    if isinstance(device, Device):
        return device
    if not isinstance(device, str):
        raise ArgumentError(f"device: expected 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")
    name = device.strip().lower()
    if name == "auto":
        if not cuda_available():
            return Device("cpu")
        _check_cuda_libraries()  # a GPU without cuBLAS fails here, naming the wheel, not at the first GEMM
        return Device("cuda", 0)
    if name == "cpu":
        return Device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        index_text = name[5:] if name.startswith("cuda:") else "0"
        if not index_text.isdigit():
            raise ArgumentError(f"device: expected 'cuda:N' with N a GPU index, got {device!r}")
        index = int(index_text)
        emulated = _emulated_devices()
        if emulated is not None:  # kernel emulation with pretend GPUs (gpuconv.cuda.emulation(devices=N))
            if index >= emulated.count():
                raise CudaUnavailableError(f"device {device!r}: emulation has {emulated.count()} CUDA "
                                           f"device(s), indices 0..{emulated.count() - 1}")
            return Device("cuda", index)
        cupy, reason = cuda_status()
        if reason:
            raise CudaUnavailableError(f"device {device!r} was asked for but CUDA is unavailable: {reason}. "
                                       "Use device='cpu' to train on the CPU.")
        count = cupy.cuda.runtime.getDeviceCount()
        if index >= count:
            raise CudaUnavailableError(f"device {device!r}: this machine has {count} CUDA device(s), "
                                       f"indices 0..{count - 1}")
        _check_cuda_libraries()
        return Device("cuda", index)
    raise ArgumentError(f"device: expected 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")


@functools.lru_cache(maxsize=None)
def _check_cuda_libraries():
    """Fail, naming the wheel, when a CUDA library the GPU path loads is missing (once a process)."""
    from .cuda.runtime import check_libraries
    check_libraries()


def device_of(array):
    """'cpu' or 'cuda:N' with N the id of the GPU the array lives on."""
    if is_cupy_array(array):
        return f"cuda:{array.device.id}"
    device_id = getattr(array, "device_id", None)  # an emulated device's array
    return "cpu" if device_id is None else f"cuda:{device_id}"


def to_device(array, device):
    """Copy `array` to `device` (no copy when it is already there; a copy from another GPU)."""
    device = parse_device(device)
    if array is None:
        return None
    if device.kind == "cpu":
        if is_cupy_array(array) or hasattr(array, "device_id"):
            return array.get()
        return np.asarray(array)
    emulated = _emulated_devices()
    if emulated is not None:
        return emulated.to_device(array, device.index)
    cupy = device.xp
    with cupy.cuda.Device(device.index):
        if is_cupy_array(array) and array.device.id != device.index:
            return array.copy()  # cupy.asarray would return the array on its old device unchanged
        return cupy.asarray(array)


_NO_DEVICE = contextlib.nullcontext()


def device_scope(where):
    """A context manager that makes the GPU of `where` (an array, a Tensor, a Device or a device
    string) current, so that CuPy allocates and launches there: `cupy.cuda.Device(N)` on a GPU, its
    emulated stand-in under emulation, nothing for the CPU."""
    if type(where) is np.ndarray:  # the CPU: nothing to make current (the common case, kept cheap)
        return _NO_DEVICE
    data = where.data if hasattr(where, "requires_grad") else where  # a Tensor's array
    if is_cupy_array(data):
        return _cupy_or_none().cuda.Device(data.device.id)
    if hasattr(data, "device_id"):
        from .cuda.emulated_devices import EmulatedDevice
        return EmulatedDevice(data.device_id)
    if isinstance(where, (Device, str)):
        device = parse_device(where)
        if device.kind == "cuda":
            if _emulated_devices() is not None:
                from .cuda.emulated_devices import EmulatedDevice
                return EmulatedDevice(device.index)
            return device.xp.cuda.Device(device.index)
    return _NO_DEVICE


def uses_cuda_kernels(x):
    """True when an op on `x` should run gpuconv's CUDA kernels: x lives on a GPU, or kernel
    emulation is switched on (GPUCONV_EMULATE=1, or gpuconv.cuda.emulation()), which runs the same
    launch code and .cu kernels on NumPy arrays on the CPU."""
    return is_cupy_array(x) or emulation_enabled()


_emulation_override = []


def emulation_enabled():
    if _emulation_override:
        return _emulation_override[-1]
    return os.environ.get("GPUCONV_EMULATE", "") not in ("", "0")
