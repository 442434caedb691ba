"""The CUDA runtime's promises, shown without a GPU through the emulator: the im2col path keeps its
column budget (2-D GEMMs with transpose flags, no hidden copies), kernels are looked up once,
GPUCONV_SYNC=1 reports a fault at the op that caused it, and a missing CUDA library or an
out-of-memory error outside conv/pool becomes a gpuconv error that says what to do."""
import numpy as np
import pytest

from gpuconv import nn, ops
from gpuconv.backend import to_device
from gpuconv.cuda import emulated_devices, emulation, runtime
from gpuconv.errors import GpuOutOfMemoryError, KernelError, MissingExtraError
from gpuconv.ops import conv_cuda


def _conv2_case(n=12):
    """LeNet's conv2 (im2col under auto) at a small batch."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 6, 14, 14)).astype(np.float32)
    w = rng.standard_normal((16, 6, 5, 5)).astype(np.float32)
    dy = rng.standard_normal((n, 16, 10, 10)).astype(np.float32)
    return x, w, dy


@pytest.mark.parametrize("need_dx, need_dw", [(True, True), (True, False), (False, True)])
def test_im2col_backward_keeps_its_column_budget(monkeypatch, need_dx, need_dw):
    x, w, dy = _conv2_case()
    per_sample = (6 * 25 + 16) * 100 * 4  # columns and channel-major dy of one sample, float32
    budget = 3 * per_sample + 100  # three samples a chunk: four chunks for a batch of 12
    monkeypatch.setattr(conv_cuda, "COLUMN_BUDGET_BYTES", budget)
    expected = ops.conv2d_backward(dy, x, w, need_dx=need_dx, need_dw=need_dw, need_bias=False)
    with emulation(), emulated_devices.metering() as meter:
        got = ops.conv2d_backward(dy, x, w, algo="im2col", need_dx=need_dx, need_dw=need_dw, need_bias=False)
        outputs = sum(a.nbytes for a in got if a is not None)
    assert len(conv_cuda._batch_chunks(conv_cuda._Geometry(x.shape, w.shape, (1, 1), (0, 0), (1, 1), 1), 4)) == 4
    assert 0 < meter.peak - outputs <= budget, (meter.peak, outputs, budget)
    for a, b in zip(got, expected):
        if b is not None:
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_im2col_forward_keeps_its_column_budget(monkeypatch):
    x, w, _ = _conv2_case()
    budget = 2 * (6 * 25 + 16) * 100 * 4
    monkeypatch.setattr(conv_cuda, "COLUMN_BUDGET_BYTES", budget)
    with emulation(), emulated_devices.metering() as meter:
        y = ops.conv2d(x, w, algo="im2col")
    assert 0 < meter.peak - y.nbytes <= budget
    np.testing.assert_allclose(y, ops.conv2d(x, w), rtol=1e-4, atol=1e-4)


def test_gemm_refuses_an_operand_cublas_could_not_read_in_place():
    a = np.ones((4, 6, 5), np.float32)[:, :, 1]  # strided both ways: a copy would be needed
    with pytest.raises(KernelError, match="neither C- nor F-contiguous"):
        runtime.gemm(np, a, np.ones((6, 3), np.float32), np.empty((4, 3), np.float32))
    with pytest.raises(KernelError, match="must be 2-D"):
        runtime.gemm(np, np.ones((2, 4, 6), np.float32), np.ones((6, 3), np.float32), np.empty((4, 3), np.float32))
    b = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = np.empty((4, 4), np.float32)
    runtime.gemm(np, b, b, out, transa=True)  # b.T @ b from b's own memory
    np.testing.assert_array_equal(out, b.T @ b)
    runtime.gemm(np, b, b, out, transa=True, beta=1.0)
    np.testing.assert_array_equal(out, 2 * (b.T @ b))


def test_kernels_are_looked_up_once_per_source_name_and_dtype(monkeypatch):
    from gpuconv.cuda.emulate import EmulatedModule
    lookups = []
    real = EmulatedModule.get_function
    monkeypatch.setattr(EmulatedModule, "get_function", lambda self, name: lookups.append(name) or real(self, name))
    monkeypatch.setattr(runtime, "_kernels", {})
    x, w = np.ones((2, 1, 8, 8), np.float32), np.ones((4, 1, 3, 3), np.float32)
    with emulation():
        for _ in range(3):
            ops.conv2d(x, w, algo="direct")
            ops.conv2d(x.astype(np.float64), w.astype(np.float64), algo="direct")
    assert sorted(lookups) == ["conv2d_forward_direct<double>", "conv2d_forward_direct<float>"]


def _failing_sync(calls):
    from cupy_backends.cuda.api.runtime import CUDARuntimeError

    def synchronize():
        calls.append(1)
        raise CUDARuntimeError(700)  # cudaErrorIllegalAddress, as a faulting kernel reports it
    return synchronize


def test_gpuconv_sync_reports_a_fault_at_the_op_that_caused_it(monkeypatch):
    pytest.importorskip("cupy", reason="the kernel-check extra (CuPy) is part of the test install")
    calls = []
    monkeypatch.setattr(runtime, "synchronize", _failing_sync(calls))
    x, w = np.ones((1, 2, 6, 6), np.float32), np.ones((3, 2, 3, 3), np.float32)
    with emulation():
        monkeypatch.delenv("GPUCONV_SYNC", raising=False)
        ops.conv2d(x, w, algo="direct")  # no sync asked for: never waits
        assert calls == []
        monkeypatch.setenv("GPUCONV_SYNC", "1")
        with pytest.raises(KernelError, match=r"conv2d \(direct\) failed on the GPU with x=\(1, 2, 6, 6\), "
                                              r"weight=\(3, 2, 3, 3\)") as error:
            ops.conv2d(x, w, algo="direct")
    assert calls == [1] and "GPUCONV_SYNC" not in str(error.value)  # the hint is for unsynchronised runs


def test_an_unsynchronised_fault_suggests_gpuconv_sync(monkeypatch):
    pytest.importorskip("cupy")
    from cupy_backends.cuda.api.runtime import CUDARuntimeError
    monkeypatch.delenv("GPUCONV_SYNC", raising=False)
    error = runtime.translate_error(CUDARuntimeError(700), "training step", {"x": (4, 1, 28, 28)})
    assert isinstance(error, KernelError) and "rerun with GPUCONV_SYNC=1" in str(error)


class _NotFound(Exception):
    pass


def test_a_missing_cuda_library_names_the_wheel_to_install():
    def loader(name):
        if name == "cublasLt":
            raise _NotFound('Failure finding "libcublasLt.so.13": No such file')
    with pytest.raises(MissingExtraError, match=r"cublasLt.*nvidia-cublas.*gpuconv\[cuda1[23]\]"):
        runtime.check_libraries(loader)
    runtime.check_libraries(lambda name: None)  # all present: silent


def test_cupys_import_error_for_a_library_becomes_the_same_error():
    exc = ImportError('Failure finding "libcublasLt.so.13": Not found in site-packages')
    error = runtime.translate_error(exc, "Linear", {"x": (8, 400)})
    assert isinstance(error, MissingExtraError) and "nvidia-cublas" in str(error)
    other = ImportError("No module named 'foo'")
    assert runtime.translate_error(other, "Linear", {}) is other


def test_this_machine_without_cublas_is_told_which_wheel_to_install():
    pathfinder = pytest.importorskip("cuda.pathfinder")
    try:
        for library in runtime.REQUIRED_LIBRARIES:
            pathfinder.load_nvidia_dynamic_lib(library)
    except Exception:
        with pytest.raises(MissingExtraError, match="pip install"):
            runtime.check_libraries()
    else:
        pytest.skip("every CUDA library is installed here")


def test_out_of_memory_outside_conv_and_pool_names_the_layer(monkeypatch):
    cupy = pytest.importorskip("cupy")
    from gpuconv import functional

    def no_memory(*args, **kwargs):
        raise cupy.cuda.memory.OutOfMemoryError(1 << 40, 0)
    monkeypatch.setattr(functional.ops, "linear", no_memory)
    with emulation(devices=1):
        layer = nn.Linear(400, 120).to("cuda:0")
        with pytest.raises(GpuOutOfMemoryError, match=r"Linear.*x=\(8, 400\).*smaller batch"):
            layer(to_device(np.ones((8, 400), np.float32), "cuda:0"))
