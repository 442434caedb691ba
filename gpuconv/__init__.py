"""gpuconv: a small, fast, readable CNN framework. NumPy on the CPU, CuPy + raw CUDA kernels on the GPU."""
from . import errors
from .backend import cuda_available, get_array_module, parse_device, to_device

__version__ = "0.1.0"
