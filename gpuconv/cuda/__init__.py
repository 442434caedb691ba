"""CUDA infrastructure: compiling and launching gpuconv's raw kernels (compiler), the offline
NVRTC compile check (check), and the CPU emulation of the CUDA execution model (emulate).

Importing this package does not import CuPy."""
import contextlib

from .. import backend


@contextlib.contextmanager
def emulation(enabled=True):
    """Run gpuconv's CUDA kernels on NumPy arrays on the CPU inside this block (or switch emulation
    off with enabled=False). The same launch code and .cu sources run as on a GPU, so kernels can be
    tested on a machine without one."""
    backend._emulation_override.append(bool(enabled))
    try:
        yield
    finally:
        backend._emulation_override.pop()
