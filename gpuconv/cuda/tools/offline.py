"""Development tooling: compile kernels/*.cu offline, exactly as the runtime's RawModule would, on a
machine without a GPU.

compile_offline() reproduces RawModule's NVRTC compile, adding warning options and ptxas statistics,
so CI can prove every kernel builds for every target architecture without spilling. It goes through
CuPy's private compile path (pinned: see PINNED_VERSIONS). Nothing here runs in a training step.
"""
import contextlib
import dataclasses
import functools
import io
import re
import threading
import types
from pathlib import Path

from ...errors import KernelError
from ..runtime import OPTIONS, read_source

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

PINNED_VERSIONS = ("cupy-cuda13x==14.2.0 and nvidia-cuda-nvrtc==13.5.37 (the 'kernel-check' extra: "
                   "pip install 'gpuconv[kernel-check]')")



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
