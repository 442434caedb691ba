"""CuPy's out-of-memory and CUDA errors inside an op reach the user as gpuconv errors naming the op
and the shapes. Shown without a GPU: the launch code runs under emulation and the kernel it gets
raises CuPy's own exception types, exactly as a GPU launch would."""
import numpy as np
import pytest

from gpuconv import ops
from gpuconv.cuda import emulation
from gpuconv.errors import GpuOutOfMemoryError, KernelError
from gpuconv.ops import conv_cuda, pool_cuda

cupy = pytest.importorskip("cupy", reason="the cuda13 extra (CuPy) is part of the test install")


def failing_kernel(error):
    def get_kernel(source, kernel_name, dtype):
        def kernel(grid, block, args, shared_mem=0):
            raise error
        return kernel
    return get_kernel


@pytest.mark.parametrize("module, call, op", [
    (conv_cuda, lambda: ops.conv2d(np.ones((2, 1, 8, 8), np.float32), np.ones((4, 1, 3, 3), np.float32), algo="direct"),
     r"conv2d.*x=\(2, 1, 8, 8\), weight=\(4, 1, 3, 3\)"),
    (pool_cuda, lambda: ops.max_pool2d(np.ones((2, 3, 8, 8), np.float32), 2), r"max_pool2d.*\(2, 3, 8, 8\)"),
])
def test_out_of_memory_names_the_op_and_the_shapes_and_suggests_a_smaller_batch(monkeypatch, module, call, op):
    monkeypatch.setattr(module, "get_kernel", failing_kernel(cupy.cuda.memory.OutOfMemoryError(1 << 40, 0)))
    with emulation(), pytest.raises(GpuOutOfMemoryError, match=op + r".*smaller batch"):
        call()


def test_cuda_runtime_error_becomes_a_kernel_error_naming_the_op(monkeypatch):
    from cupy_backends.cuda.api.runtime import CUDARuntimeError
    monkeypatch.setattr(conv_cuda, "get_kernel", failing_kernel(CUDARuntimeError(700)))
    x, w = np.ones((1, 2, 6, 6), np.float32), np.ones((3, 2, 3, 3), np.float32)
    with emulation(), pytest.raises(KernelError, match=r"conv2d.*failed on the GPU.*x=\(1, 2, 6, 6\)"):
        ops.conv2d(x, w, algo="direct")
