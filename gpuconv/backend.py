"""Device dispatch: which array module an array lives in, and moving arrays between devices.

CuPy is optional. It imports fine on a machine with no GPU (CI, laptops), so "installed" is not
"usable": `cuda_status()` asks `cupy.is_available()` and remembers why CUDA is out of reach.
"""
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
    cupy = _cupy_or_none()
    return cupy is not None and isinstance(x, cupy.ndarray)


def get_array_module(*arrays):
    """numpy or cupy, DeZero-style. Raises DeviceMismatchError if the arrays live on both."""
    on_gpu = [is_cupy_array(a) for a in arrays if a is not None]
    if any(on_gpu) and not all(on_gpu):
        raise DeviceMismatchError(
            "arrays on different devices were passed to one op: "
            + ", ".join(device_of(a) for a in arrays if a is not None)
            + "; move them to one device first, e.g. model.to('cpu') and gpuconv.to_device(x, 'cpu')")
    return _cupy_or_none() if any(on_gpu) else np


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
        return np if self.kind == "cpu" else cuda_status()[0]


def parse_device(device):
    """'auto' -> cuda when CuPy sees a GPU, else cpu. Raises CudaUnavailableError if cuda is asked
    for and cannot be had, naming why."""
    if isinstance(device, Device):
        return device
    if not isinstance(device, str):
        raise ArgumentError(f"device: expected 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")
    name = device.strip().lower()
    if name == "auto":
        return Device("cuda", 0) if cuda_available() else Device("cpu")
    if name == "cpu":
        return Device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        index_text = name[5:] if name.startswith("cuda:") else "0"
        if not index_text.isdigit():
            raise ArgumentError(f"device: expected 'cuda:N' with N a GPU index, got {device!r}")
        cupy, reason = cuda_status()
        if reason:
            raise CudaUnavailableError(f"device {device!r} was asked for but CUDA is unavailable: {reason}. "
                                       "Use device='cpu' to train on the CPU.")
        index = int(index_text)
        count = cupy.cuda.runtime.getDeviceCount()
        if index >= count:
            raise CudaUnavailableError(f"device {device!r}: this machine has {count} CUDA device(s), "
                                       f"indices 0..{count - 1}")
        return Device("cuda", index)
    raise ArgumentError(f"device: expected 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")


def device_of(array):
    if is_cupy_array(array):
        return f"cuda:{array.device.id}"
    return "cpu"


def to_device(array, device):
    """Copy `array` to `device` (no copy when it is already there)."""
    device = parse_device(device)
    if array is None:
        return None
    if device.kind == "cpu":
        return array.get() if is_cupy_array(array) else np.asarray(array)
    cupy = device.xp
    with cupy.cuda.Device(device.index):
        return cupy.asarray(array)


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
