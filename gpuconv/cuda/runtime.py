"""The CUDA runtime of gpuconv: what a training step on a GPU runs besides CuPy itself.

- Sources: kernels/*.cu, compiled by cupy.RawModule (NVRTC) once per process (CuPy's on-disk cache
  makes later processes skip the compile); each kernel instance is looked up once per
  (source, name, dtype) and kept (get_kernel). CuPy's RawKernel loads it per device by itself.
- Launches (launch) and 2-D GEMMs (gemm, cuBLAS with transpose flags, never a hidden copy), both
  inside device_errors, which turns CuPy's out-of-memory, CUDA, cuBLAS and missing-library errors
  into gpuconv errors naming the op and the shapes. GPUCONV_SYNC=1 synchronises after each one, so
  an asynchronous fault is reported by the op that caused it.
- Buffers of the launch code (empty/zeros), on the current device.
- The CUDA libraries the GPU path needs (REQUIRED_LIBRARIES) and check_libraries(), which names
  the wheel to install when one is missing.

With kernel emulation on (GPUCONV_EMULATE=1 or gpuconv.cuda.emulation()), the same sources run in
gpuconv.cuda.emulate.EmulatedModule on the CPU, buffers come from gpuconv.cuda.emulated_devices
(recorded, metered, on an emulated device) and gemm checks cuBLAS's layout rules on NumPy arrays.
Development tooling (offline compile check, kernel plan, gpu-check, mutants) lives in gpuconv.cuda.tools.
Development hook: GPUCONV_KERNEL_DIR=<folder> reads the .cu sources found there instead of kernels/
(the mutation tool runs its subprocesses on mutated copies this way); unset, it changes nothing.
"""
import contextlib
import functools
import importlib.resources
import os
import re
import threading
from pathlib import Path

from ..backend import emulation_enabled
from ..errors import GpuOutOfMemoryError, KernelError, MissingExtraError

# What RawModule compiles with at run time. Warnings are not errors here: an architecture the offline
# check never saw must still run, just maybe slower.
OPTIONS = ("-std=c++17",)

DTYPE_NAMES = {"float32": "float", "float64": "double"}

# Every kernel template in each source; each is instantiated for float and double.
KERNELS = {
    "conv2d.cu": ("conv2d_forward_direct", "conv2d_backward_data_direct", "conv2d_backward_filter_partial",
                  "conv2d_backward_bias_partial", "reduce_slices", "im2col", "im2col_output", "col2im"),
    "pool2d.cu": ("max_pool2d_forward", "max_pool2d_backward", "avg_pool2d_forward", "avg_pool2d_backward",
                  "lp_pool2d_forward", "lp_pool2d_backward"),
    "optim.cu": ("sgd_update", "adam_update"),
    "elementwise.cu": ("bias_act", "relu_backward"),
}


# Development hook: a folder whose .cu files replace kernels/*.cu (any source it lacks still comes
# from the package). `python -m gpuconv mutants` runs the tests on a mutated copy this way, in a
# subprocess, without touching the real files. Unset (the normal case), nothing changes.
KERNEL_DIR_OVERRIDE = "GPUCONV_KERNEL_DIR"


def kernel_dir():
    """The folder holding the .cu sources: inside the installed package (gpuconv/kernels), else the
    checkout's top-level kernels/."""
    try:
        installed = importlib.resources.files("gpuconv.kernels")
        if installed.joinpath("conv2d.cu").is_file():
            return installed
    except (ModuleNotFoundError, TypeError):
        pass
    import gpuconv
    checkout = Path(gpuconv.__file__).resolve().parent.parent / "kernels"
    if (checkout / "conv2d.cu").is_file():
        return checkout
    raise KernelError("cannot find gpuconv's CUDA sources: neither the installed package "
                      f"gpuconv/kernels nor the checkout folder {checkout} holds conv2d.cu; "
                      "reinstall gpuconv (pip install --force-reinstall gpuconv)")


@functools.lru_cache(maxsize=None)
def read_source(source_name):
    """The text of kernels/<source_name> (of $GPUCONV_KERNEL_DIR/<source_name> when that development
    override is set and holds the file)."""
    override = os.environ.get(KERNEL_DIR_OVERRIDE)
    if override:
        candidate = Path(override) / source_name
        if not Path(override).is_dir():
            raise KernelError(f"{KERNEL_DIR_OVERRIDE}: expected a folder of .cu files, got {override!r} "
                              "(unset it to use gpuconv's own kernels)")
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8")
    path = kernel_dir().joinpath(source_name)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KernelError(f"kernel source {source_name!r} not found in {kernel_dir()}") from None


def template_instances(kernel_names, dtypes=("float32", "float64")):
    """['conv2d_forward_direct<float>', ...]: every kernel for every dtype, in a stable order."""
    return tuple(f"{name}<{DTYPE_NAMES[str(dtype)]}>" for name in kernel_names for dtype in dtypes)


def instance_name(kernel_name, dtype):
    """The name expression of `kernel_name` instantiated for a NumPy dtype."""
    try:
        return f"{kernel_name}<{DTYPE_NAMES[str(dtype)]}>"
    except KeyError:
        raise KernelError(f"{kernel_name}: no CUDA instance for dtype {dtype}; "
                          "gpuconv's kernels are built for float32 and float64") from None


_INT_DEFINE = re.compile(r"^\s*#define\s+(\w+)\s+(\d+)\s*(?://.*)?$", re.M)


@functools.lru_cache(maxsize=None)
def source_constants(source_name):
    """{name: int} of the integer #defines in kernels/<source_name>: the tile sizes and thread counts
    the launch code must agree with have their one source in the .cu file."""
    return {name: int(value) for name, value in _INT_DEFINE.findall(read_source(source_name))}


def source_constant(source_name, name):
    try:
        return source_constants(source_name)[name]
    except KeyError:
        raise KernelError(f"kernels/{source_name} has no `#define {name} <int>`; the launch code needs "
                          "it to size its grids") from None


# ---------------------------------------------------------------------------------------------------
# Modules and kernels, each looked up once

_modules = {}
_kernels = {}
_modules_lock = threading.Lock()


def load_module(source_name, name_expressions):
    """A compiled module for kernels/<source_name> with `.get_function(name_expression)`.

    Cached per (source, instances, emulation) for the life of the process, so each source is compiled
    once; RawModule compiles lazily on the first get_function and CuPy keeps the cubin on disk."""
    emulated = emulation_enabled()
    key = (source_name, tuple(name_expressions), emulated)
    with _modules_lock:
        module = _modules.get(key)
        if module is None:
            code = read_source(source_name)
            if emulated:
                from .emulate import EmulatedModule
                module = EmulatedModule(code=code, options=OPTIONS, name_expressions=list(name_expressions),
                                        filename=source_name)  # sanitizer reports name conv2d.cu:LINE
            else:
                import cupy
                module = cupy.RawModule(code=code, options=OPTIONS, name_expressions=list(name_expressions))
            _modules[key] = module
    return module


def get_kernel(source_name, kernel_name, dtype):
    """The `kernel_name` instance for `dtype`, from the module holding every kernel of the source.

    Kept per (source, name, dtype, emulation) after the first lookup: RawModule.get_function builds
    a new RawKernel each time, whose per-device cache starts empty, so calling it per launch would
    look the module up again on every launch."""
    key = (source_name, kernel_name, str(dtype), emulation_enabled())
    kernel = _kernels.get(key)
    if kernel is not None:
        return kernel
    module = load_module(source_name, template_instances(KERNELS[source_name]))
    name = instance_name(kernel_name, dtype)
    try:
        kernel = module.get_function(name)
    except Exception as exc:
        if _is_compile_error(exc):
            raise KernelError(f"compiling kernels/{source_name} failed ({name}): {exc}") from exc
        raise
    _kernels[key] = kernel
    return kernel


def clear_kernel_cache():
    """Forget every module and kernel (tests that swap sources use it)."""
    with _modules_lock:
        _modules.clear()
        _kernels.clear()


def _is_compile_error(exc):
    return type(exc).__name__ in ("CompileException", "JitifyException", "NVRTCError")


# ---------------------------------------------------------------------------------------------------
# The CUDA libraries the GPU path loads, and the wheels that carry them

# pathfinder library name -> (wheel for CUDA 13, wheel for CUDA 12). cuBLAS (with cuBLASLt) runs
# every GEMM (im2col, linear); NVRTC compiles gpuconv's kernels and CuPy's elementwise ones.
REQUIRED_LIBRARIES = {
    "cublasLt": ("nvidia-cublas", "nvidia-cublas-cu12"),
    "cublas": ("nvidia-cublas", "nvidia-cublas-cu12"),
    "nvrtc": ("nvidia-cuda-nvrtc", "nvidia-cuda-nvrtc-cu12"),
}

_MISSING_LIBRARY = re.compile(r'Failure finding "lib(\w+?)\.so|lib(\w+?)\.so[.\d]*: cannot open shared object')


def _cuda_major():
    """12 when CuPy was installed for CUDA 12 (the cuda12 extra), else 13."""
    return 12 if _cupy_distribution() == "cupy-cuda12x" else 13


@functools.lru_cache(maxsize=None)
def _cupy_distribution():
    import importlib.metadata
    for name in ("cupy-cuda13x", "cupy-cuda12x"):
        try:
            importlib.metadata.version(name)
            return name
        except importlib.metadata.PackageNotFoundError:
            continue
    return "cupy"


def missing_library_error(library, detail=""):
    """MissingExtraError naming the wheel that carries the CUDA library `library` (e.g. 'cublasLt')."""
    major = _cuda_major()
    wheels = REQUIRED_LIBRARIES.get(library, (f"nvidia-{library.lower()}", f"nvidia-{library.lower()}-cu12"))
    wheel = wheels[0] if major >= 13 else wheels[1]
    extra = "cuda13" if major >= 13 else "cuda12"
    return MissingExtraError(
        f"the CUDA library {library} is not installed ({detail.strip().splitlines()[0] if detail else 'not found'}); "
        f"it comes with the {wheel} wheel: pip install 'gpuconv[{extra}]' (or pip install {wheel})")


def check_libraries(loader=None):
    """Load every library in REQUIRED_LIBRARIES the way CuPy does (cuda.pathfinder), so a missing one
    fails here, named, instead of at the first GEMM. `loader` replaces pathfinder's (tests)."""
    if loader is None:
        try:
            from cuda.pathfinder import load_nvidia_dynamic_lib as loader
        except ImportError:  # no pathfinder: CuPy finds libraries by its own fallback; let it
            return
    for library in REQUIRED_LIBRARIES:
        try:
            loader(library)
        except Exception as exc:  # pathfinder's DynamicLibNotFoundError, or an OSError from dlopen
            raise missing_library_error(library, str(exc)) from exc


# ---------------------------------------------------------------------------------------------------
# Errors, synchronisation, launches

def _describe(shapes):
    return ", ".join(f"{name}={tuple(shape)}" for name, shape in shapes.items())


_sync_override = []


def sync_enabled():
    """GPUCONV_SYNC=1 (or gpuconv.cuda.runtime.synchronizing()): wait for the GPU after every launch
    and GEMM, so a fault is reported, with its op and shapes, by the op that caused it."""
    if _sync_override:
        return _sync_override[-1]
    return os.environ.get("GPUCONV_SYNC", "") not in ("", "0")


@contextlib.contextmanager
def synchronizing(enabled=True):
    _sync_override.append(bool(enabled))
    try:
        yield
    finally:
        _sync_override.pop()


def synchronize():
    """Wait for the current device's stream (no-op under emulation: emulated kernels are synchronous)."""
    if emulation_enabled():
        return
    import cupy
    cupy.cuda.get_current_stream().synchronize()


@contextlib.contextmanager
def device_errors(op_name, shapes):
    """Turn CuPy's out-of-memory, CUDA and cuBLAS errors, and a CUDA library that cannot be loaded,
    raised inside an op into gpuconv's, naming the op and the shapes. Wraps allocations and cuBLAS
    calls as well as kernel launches. Matched by name so that this module never imports CuPy."""
    try:
        yield
    except Exception as exc:
        translated = translate_error(exc, op_name, shapes)
        if translated is exc:
            raise
        raise translated from exc


def translate_error(exc, op_name, shapes):
    """The gpuconv error for an exception raised by CuPy inside `op_name` (or `exc` itself)."""
    kind = type(exc).__name__
    from_cupy = type(exc).__module__.startswith(("cupy", "cupy_backends", "cuda"))
    if from_cupy and kind == "OutOfMemoryError":
        return GpuOutOfMemoryError(
            f"{op_name}: the GPU ran out of memory with {_describe(shapes)} ({exc}); "
            "use a smaller batch size")
    if from_cupy and kind in ("CUDADriverError", "CUDARuntimeError", "CUBLASError"):
        hint = "" if sync_enabled() else (
            "; CUDA reports a fault at the next synchronisation, so the op that caused it may be an "
            "earlier one: rerun with GPUCONV_SYNC=1 to stop at the failing op")
        return KernelError(f"{op_name} failed on the GPU with {_describe(shapes)}: {exc}{hint}")
    if from_cupy and _is_compile_error(exc):
        return KernelError(f"{op_name}: compiling its CUDA kernel failed: {exc}")
    if isinstance(exc, ImportError) and not isinstance(exc, MissingExtraError):
        match = _MISSING_LIBRARY.search(str(exc))
        if match:
            return missing_library_error(match.group(1) or match.group(2), str(exc))
    return exc


def _check_emulated_arguments(args, op_name):
    from . import emulated_devices
    emulated_devices._check_current([a for a in args if hasattr(a, "device_id")], op_name)


def launch(kernel, grid, block, args, shared_mem=0, op_name="kernel", shapes=None):
    """kernel(grid, block, args) on the current device, errors translated (see device_errors);
    with GPUCONV_SYNC=1 it waits for the kernel, so a fault names this op."""
    with device_errors(op_name, shapes or {}):
        run = functools.partial(kernel, tuple(grid), tuple(block), tuple(args), shared_mem=shared_mem)
        if emulation_enabled():
            from . import emulated_devices
            _check_emulated_arguments(args, op_name)
            emulated_devices.run_on_device(run, "launch", getattr(kernel, "name", op_name))  # or captured
        else:
            run()
        if sync_enabled():
            synchronize()


def empty(xp, shape, dtype, what="buffer"):
    """A buffer for the launch code on the current device (recorded and metered under emulation)."""
    if emulation_enabled() and xp.__name__ == "numpy":
        from . import emulated_devices
        return emulated_devices.allocate(shape, dtype, what=what)
    return xp.empty(shape, dtype=dtype)


def write_to_device(array, host):
    """Copy the host array `host` into the existing device array `array` (same shape), allocating
    nothing: cupy's ndarray.set, the emulated device's stand-in, or a plain copy for NumPy."""
    if hasattr(array, "set"):
        array.set(host)
    else:
        array[...] = host


def zeros(xp, shape, dtype, what="buffer"):
    if emulation_enabled() and xp.__name__ == "numpy":
        from . import emulated_devices
        return emulated_devices.allocate(shape, dtype, zero=True, what=what)
    return xp.zeros(shape, dtype=dtype)


def _gemm_layout(array, name, op_name):
    """cuBLAS reads a 2-D operand in place when it is C- or F-contiguous; anything else would need a
    copy, which is what this path exists to avoid."""
    if array.ndim != 2:
        raise KernelError(f"{op_name}: gemm operand {name} must be 2-D, got shape {tuple(array.shape)}")
    if not (array.flags.c_contiguous or array.flags.f_contiguous):
        raise KernelError(f"{op_name}: gemm operand {name} (shape {tuple(array.shape)}, strides "
                          f"{array.strides}) is neither C- nor F-contiguous; cuBLAS would need a copy")


def gemm(xp, a, b, out, transa=False, transb=False, beta=0.0, op_name="gemm", shapes=None):
    """out = op(a) @ op(b) + beta * out with op = transpose where the flag is set: one cuBLAS call on
    2-D operands read in place (transposes are flags, never copies). `out` is C-contiguous."""
    _gemm_layout(a, "a", op_name)
    _gemm_layout(b, "b", op_name)
    if not out.flags.c_contiguous:
        raise KernelError(f"{op_name}: gemm output must be C-contiguous, got strides {out.strides}")
    with device_errors(op_name, shapes or {}):
        if xp.__name__ == "numpy":  # emulation (or a NumPy caller): the same contract on the CPU
            def run():
                op_a, op_b = (a_plain.T if transa else a_plain), (b_plain.T if transb else b_plain)
                if beta:
                    xp.multiply(out_plain, out.dtype.type(beta), out=out_plain)
                    xp.add(out_plain, xp.matmul(op_a, op_b), out=out_plain)
                else:
                    xp.matmul(op_a, op_b, out=out_plain)
            # plain views: the GEMM is the one launch recorded, not NumPy's ops that emulate it
            a_plain, b_plain, out_plain = (x.view(xp.ndarray) for x in (a, b, out))
            if emulation_enabled():
                from . import emulated_devices
                _check_emulated_arguments((a, b, out), op_name)
                emulated_devices.run_on_device(run, "launch", "gemm",  # or captured
                                               a.nbytes + b.nbytes + out.nbytes * (2 if beta else 1),
                                               flops=2 * out.size * (a.shape[0] if transa else a.shape[1]))
            else:
                run()
            return out
        from cupy import cublas
        cublas.gemm("T" if transa else "N", "T" if transb else "N", a, b, out=out, beta=beta)
        if sync_enabled():
            synchronize()
        return out
