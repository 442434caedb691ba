"""CUDA infrastructure: compiling and launching gpuconv's raw kernels (compiler), the offline
NVRTC compile check (check), and the CPU emulation of the CUDA execution model (emulate).

Importing this package imports neither CuPy nor the emulator."""


def emulation(enabled=True, **settings):
    """Context manager: run gpuconv's CUDA kernels on NumPy arrays on the CPU inside the block
    (enabled=False switches emulation off). The same launch code and .cu sources run as on a GPU.
    Keyword settings (order, mode, seed) are the emulator's: see gpuconv.cuda.emulate.emulation."""
    from .emulate import emulation as emulation_context
    return emulation_context(enabled, **settings)
