"""CUDA support. What runs in a training step on a GPU: runtime (kernel sources, compile once,
launch, GEMMs, error mapping, GPUCONV_SYNC) and, in emulation mode, emulate (the CPU emulator of the
CUDA execution model) with emulated_devices (pretend GPUs that record allocations and launches).
Development tooling that never runs in a step lives in gpuconv.cuda.tools: the offline NVRTC compile
check, the kernel plan and gpu-check.

Importing this package imports neither CuPy nor the emulator."""


def emulation(enabled=True, **settings):
    """Context manager: run gpuconv's CUDA kernels on NumPy arrays on the CPU inside the block
    (enabled=False switches emulation off). The same launch code and .cu sources run as on a GPU.
    Keyword settings (order, mode, seed, devices) are the emulator's: see
    gpuconv.cuda.emulate.emulation."""
    from .emulate import emulation as emulation_context
    return emulation_context(enabled, **settings)
