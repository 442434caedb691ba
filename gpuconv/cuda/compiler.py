"""Finding, compiling and launching the raw CUDA kernels in kernels/*.cu.

At run time a source is compiled by cupy.RawModule (NVRTC) once per process; CuPy's on-disk kernel
cache makes later processes skip the compile. With kernel emulation on (GPUCONV_EMULATE=1 or
gpuconv.cuda.emulation()), the same source is handed to gpuconv.cuda.emulate.EmulatedModule, which
runs it on NumPy arrays on the CPU.

compile_offline() reproduces RawModule's NVRTC compile on a machine without a GPU, adding warning
options and ptxas statistics, so CI can prove every kernel builds for every target architecture
without spilling. It goes through CuPy's private compile path (pinned: see PINNED_VERSIONS).
"""
import contextlib
import dataclasses
import functools
import importlib.resources
import io
import re
import threading
import types
from pathlib import Path

from ..backend import emulation_enabled
from ..errors import GpuOutOfMemoryError, KernelError

# What RawModule compiles with at run time. Warnings are not errors here: an architecture the offline
# check never saw must still run, just maybe slower.
OPTIONS = ("-std=c++17",)

# The offline check adds these: every NVRTC warning is an error, and ptxas refuses spills and local
# memory (each -Xptxas option on its own: NVRTC takes one ptxas flag per option) and prints its
# per-kernel resource usage (-v) into the program log.
CHECK_OPTIONS = OPTIONS + (
    "-Werror=all-warnings",
    "-Xptxas=--warn-on-spills",
    "-Xptxas=--warn-on-local-memory-usage",
    "-Xptxas=--warning-as-error",
    "-Xptxas=-v",
)

# Turing through Blackwell (consumer); NVRTC 13.5 supports all of them.
ARCHS = ("75", "80", "86", "89", "90", "100", "120")

PINNED_VERSIONS = "cupy-cuda13x==14.2.0 and nvidia-cuda-nvrtc==13.5.37 (the 'cuda13' extra)"

DTYPE_NAMES = {"float32": "float", "float64": "double"}

# Every kernel template in each source; each is instantiated for float and double.
KERNELS = {
    "conv2d.cu": ("conv2d_forward_direct", "conv2d_backward_data_direct", "conv2d_backward_filter_direct",
                  "conv2d_backward_bias", "im2col", "col2im"),
    "pool2d.cu": ("max_pool2d_forward", "max_pool2d_backward", "avg_pool2d_forward", "avg_pool2d_backward",
                  "lp_pool2d_forward", "lp_pool2d_backward"),
}


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
    """The text of kernels/<source_name>."""
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


_modules = {}
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
    """The `kernel_name` instance for `dtype` from the module holding every kernel of the source."""
    module = load_module(source_name, template_instances(KERNELS[source_name]))
    name = instance_name(kernel_name, dtype)
    try:
        return module.get_function(name)
    except Exception as exc:
        if _is_compile_error(exc):
            raise KernelError(f"compiling kernels/{source_name} failed ({name}): {exc}") from exc
        raise


def _is_compile_error(exc):
    return type(exc).__name__ in ("CompileException", "JitifyException", "NVRTCError")


def _describe(shapes):
    return ", ".join(f"{name}={tuple(shape)}" for name, shape in shapes.items())


@contextlib.contextmanager
def device_errors(op_name, shapes):
    """Turn CuPy's out-of-memory and CUDA errors raised inside an op into gpuconv's, naming the op and
    the shapes. Wraps allocations and cuBLAS calls as well as kernel launches. Matched by name so
    that this module never imports CuPy."""
    try:
        yield
    except Exception as exc:
        kind = type(exc).__name__
        from_cupy = type(exc).__module__.startswith(("cupy", "cupy_backends"))
        if from_cupy and kind == "OutOfMemoryError":
            raise GpuOutOfMemoryError(
                f"{op_name}: the GPU ran out of memory with {_describe(shapes)} ({exc}); "
                "use a smaller batch size") from exc
        if from_cupy and kind in ("CUDADriverError", "CUDARuntimeError", "CUBLASError"):
            raise KernelError(f"{op_name} failed on the GPU with {_describe(shapes)}: {exc}") from exc
        if from_cupy and _is_compile_error(exc):
            raise KernelError(f"{op_name}: compiling its CUDA kernel failed: {exc}") from exc
        raise


def launch(kernel, grid, block, args, shared_mem=0, op_name="kernel", shapes=None):
    """kernel(grid, block, args) with errors translated (see device_errors)."""
    with device_errors(op_name, shapes or {}):
        kernel(tuple(grid), tuple(block), tuple(args), shared_mem=shared_mem)


# ---------------------------------------------------------------------------------------------------
# Offline compile (no GPU needed)

@dataclasses.dataclass
class KernelResources:
    """ptxas's resource usage of one kernel instance for one architecture."""
    name_expression: str
    mangled_name: str
    registers: int
    shared_bytes: int      # static __shared__
    stack_bytes: int       # stack frame: local memory
    spill_stores: int
    spill_loads: int
    local_bytes: int       # 'lmem' when ptxas reports it separately

    @property
    def uses_local_memory(self):
        return self.stack_bytes > 0 or self.local_bytes > 0

    @property
    def spills(self):
        return self.spill_stores + self.spill_loads


@dataclasses.dataclass
class OfflineResult:
    source_name: str
    arch: str
    options: tuple
    cubin: bytes
    log: str
    kernels: list  # of KernelResources, in name_expressions order


class _ModuleStub:
    """Stands in for cupy.cuda.function.Module: keeps the cubin instead of loading it on a device."""

    def __init__(self):
        self.mapping = None
        self.cubin = None

    def load(self, cubin):
        self.cubin = cubin

    def load_file(self, path):
        self.cubin = Path(path).read_bytes()

    def _set_mapping(self, mapping):
        self.mapping = mapping


class _NoKernelCache:
    """A kernel cache that never hits and stores nothing, so every offline compile really runs."""

    def load(self, name):
        return None

    def save(self, name, cubin, source):
        pass


_REQUIRED = {
    "cupy.cuda.compiler": ("_compile_module_with_cache", "_get_arch_for_options_for_nvrtc",
                           "_kernel_cache_backend", "function",
                           "CompileException"),
    "cupy._core.core": ("assemble_cupy_compiler_options", "_get_header_source"),
}


def _private_cupy():
    """CuPy's compile internals, or a KernelError naming what moved."""
    import importlib
    try:
        modules = {name: importlib.import_module(name) for name in _REQUIRED}
    except ImportError as exc:
        raise KernelError(f"the offline kernel check needs CuPy: {exc}; install {PINNED_VERSIONS}") from exc
    for module_name, attributes in _REQUIRED.items():
        for attribute in attributes:
            if not hasattr(modules[module_name], attribute):
                import cupy
                raise KernelError(
                    f"the offline kernel check uses CuPy's private {module_name}.{attribute}, which this "
                    f"CuPy ({cupy.__version__}) does not have; install the pinned {PINNED_VERSIONS}")
    return modules["cupy.cuda.compiler"], modules["cupy._core.core"]


_offline_lock = threading.Lock()


@contextlib.contextmanager
def _device_free_compiler(compiler, arch):
    """Patch the two steps of CuPy's compile path that touch a GPU (the arch query and the module
    load) and its on-disk cache, restoring them afterwards."""
    saved = (compiler._get_arch_for_options_for_nvrtc, compiler.function, compiler._kernel_cache_backend)
    real_function = compiler.function
    compiler._get_arch_for_options_for_nvrtc = lambda _arch=None: (f"-arch=sm_{arch}", "cubin")
    compiler.function = types.SimpleNamespace(Module=_ModuleStub, LinkState=real_function.LinkState)
    compiler._kernel_cache_backend = _NoKernelCache()
    try:
        yield
    finally:
        (compiler._get_arch_for_options_for_nvrtc, compiler.function,
         compiler._kernel_cache_backend) = saved


@functools.lru_cache(maxsize=None)
def compile_offline(source_name, arch, name_expressions, extra_options=(), strict=True):
    """Compile kernels/<source_name> for sm_<arch> exactly as RawModule(code, options=OPTIONS,
    name_expressions) would (CuPy's option assembly, header key, -ftz, --device-as-default-execution-
    space), plus CHECK_OPTIONS and `extra_options`. No GPU is needed.

    Returns an OfflineResult; raises KernelError with NVRTC's log when the compile fails, which
    (strict, the default) includes any warning, spill or local-memory use. strict=False only adds
    -Xptxas=-v, to read the resource usage of a source the strict compile rejects.
    Cached per arguments for the process."""
    compiler, core = _private_cupy()
    arch = str(arch).removeprefix("sm_")
    name_expressions = tuple(name_expressions)
    options = (CHECK_OPTIONS if strict else OPTIONS + ("-Xptxas=-v",)) + tuple(extra_options)
    source = read_source(source_name)
    log = io.StringIO()
    with _offline_lock, _device_free_compiler(compiler, arch):
        try:
            module = compiler._compile_module_with_cache(
                source, core.assemble_cupy_compiler_options(options), arch=arch,
                extra_source=core._get_header_source(), backend="nvrtc",
                name_expressions=list(name_expressions), log_stream=log)
        except compiler.CompileException as exc:
            log_text = str(exc).replace("\x00", "")
            raise KernelError(f"kernels/{source_name} does not compile for sm_{arch}:\n{log_text}") from exc
    text = log.getvalue().replace("\x00", "")  # NVRTC logs end in NUL
    mapping = module.mapping or {}
    resources = parse_ptxas_log(text, arch)
    kernels = []
    for expression in name_expressions:
        mangled = mapping.get(expression, "")
        if mangled not in resources:
            raise KernelError(f"ptxas printed no resource usage for {expression} ({mangled}) on sm_{arch}; "
                              f"does -Xptxas=-v still reach ptxas with NVRTC from {PINNED_VERSIONS}?")
        kernels.append(dataclasses.replace(resources[mangled], name_expression=expression))
    return OfflineResult(source_name, arch, options, module.cubin, text, kernels)


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_LMEM = re.compile(r"(\d+) bytes lmem")


def parse_ptxas_log(text, arch=None):
    """{mangled name: KernelResources} from ptxas -v output."""
    found = {}
    current = None
    for line in text.splitlines():
        entry = _ENTRY.search(line)
        if entry:
            current = KernelResources("", entry.group(1), 0, 0, 0, 0, 0, 0)
            found[current.mangled_name] = current
            continue
        if current is None:
            continue
        frame = _FRAME.search(line)
        if frame:
            current.stack_bytes, current.spill_stores, current.spill_loads = map(int, frame.groups())
        used = _USED.search(line)
        if used:
            current.registers = int(used.group(1))
            smem = _SMEM.search(line)
            lmem = _LMEM.search(line)
            current.shared_bytes = int(smem.group(1)) if smem else 0
            current.local_bytes = int(lmem.group(1)) if lmem else 0
    return found
