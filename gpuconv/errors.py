"""The exceptions gpuconv raises on purpose.

Every one derives from GpuconvError and from the built-in type a Python user would already catch
(ValueError, TypeError, RuntimeError, ...), so `except ValueError` keeps working. Messages name the
argument, what was expected, what was given, and the fix.
"""


class GpuconvError(Exception):
    """Base class of every error gpuconv raises deliberately."""


class ShapeError(GpuconvError, ValueError):
    """An array has the wrong rank or size for the op (e.g. channels that do not match the weight)."""


class ArgumentError(GpuconvError, ValueError):
    """A hyper-parameter is out of range (stride <= 0, padding >= kernel for a pool, lr <= 0, ...)."""


class DTypeError(GpuconvError, TypeError):
    """An array has a dtype the op does not support (gpuconv computes in float32 or float64)."""


class DeviceMismatchError(GpuconvError, ValueError):
    """Arrays or parameters on different devices (NumPy vs CuPy, or two GPUs) meet in one op."""


class CudaUnavailableError(GpuconvError, RuntimeError):
    """CUDA was asked for but cannot be used: CuPy missing, or no usable GPU."""


class GpuOutOfMemoryError(GpuconvError, MemoryError):
    """The GPU ran out of memory inside an op; the message names the op and the shapes."""


class KernelError(GpuconvError, RuntimeError):
    """A CUDA kernel failed to compile, load or launch."""


class DataError(GpuconvError, ValueError):
    """A data file is malformed: bad magic, truncated, wrong counts, checksum mismatch."""


class DataNotFoundError(GpuconvError, FileNotFoundError):
    """No copy of a data set was found in any of the places gpuconv looks."""


class CheckpointError(GpuconvError, ValueError):
    """A checkpoint file is not a gpuconv checkpoint or does not fit the model."""


class NonFiniteError(GpuconvError, FloatingPointError):
    """Training produced NaN or Inf; the message names the step and the first layer that did."""


class MissingExtraError(GpuconvError, ImportError):
    """An optional dependency group (a pip "extra", e.g. `plot` for matplotlib) is not installed."""




class WorkerError(GpuconvError, RuntimeError):
    """A CPU executor worker process raised (its error's type and message are in the text) or died;
    the next step starts a new one."""


class CaptureError(GpuconvError, RuntimeError):
    """A training step cannot be captured as a CUDA graph (gpuconv.cuda.graph): it reads a value back
    to the host, copies from the host, or asks for other buffers than the step it replays."""
