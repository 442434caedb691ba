"""gpuconv: a small, fast, readable CNN framework. NumPy on the CPU, CuPy + raw CUDA kernels on the GPU.

The data flow, top to bottom: a model (gpuconv.nn.Module, forward only) -> autograd
(gpuconv.autograd: Tensor, Function, the tape) -> Tensor ops (gpuconv.functional, one Function per
op) -> array-level forward/backward pairs (gpuconv.ops) -> NumPy code, or CUDA kernels in
kernels/*.cu through CuPy. gpuconv.compile(model) runs a chain of layers on the CPU as one fused
plan (gpuconv.nn.cpu_plan) instead of op by op.
"""
from . import errors, functional, nn, ops, optim
from .autograd import Tensor, cat, enable_grad, is_grad_enabled, no_grad, tensor
from .backend import cuda_available, get_array_module, parse_device, to_device
from .compiler import compile
from .models import LeNet5
from .nn.cpu_plan import get_cpu_workers, set_cpu_workers
from .nn.init import manual_seed

__version__ = "0.2.0"
