"""gpuconv: a small, fast, readable CNN framework. NumPy on the CPU, CuPy + raw CUDA kernels on the GPU.

The data flow, top to bottom: gpuconv.models (LeNet5) -> gpuconv.nn (layers) -> gpuconv.functional
(forward/backward ops on arrays) -> NumPy code, or CUDA kernels in kernels/*.cu through CuPy.
"""
from . import errors, functional, nn, optim
from .backend import cuda_available, get_array_module, parse_device, to_device
from .models import LeNet5
from .nn.init import manual_seed

__version__ = "0.1.0"
