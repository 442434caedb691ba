"""Run gpuconv's CUDA kernels on the CPU: an emulator of the CUDA execution model.

`EmulatedModule` mirrors `cupy.RawModule`: the same .cu source and name expressions, and
`get_function(name)` returns a kernel called like `cupy.RawKernel`:
`kernel(grid, block, args, shared_mem=0)` with NumPy arrays (passed as device pointers) and NumPy
scalars. The source is compiled with g++ against cuda_emulation.h (in emulator/), which runs each
CUDA thread as a fiber, blocks one after another, with real __syncthreads barriers and per-block,
NaN-filled shared memory. See that header for the execution model.

Modes (each a separate build, cached on disk):
  "fibers"   default; the fast one.
  "asan"     fibers under AddressSanitizer; every array argument is copied into a malloc'd buffer of
             exactly its size for the launch, so an out-of-bounds access of an argument is caught.
  "threads"  one OS thread per CUDA thread under ThreadSanitizer, which reports data races such as a
             missing __syncthreads. Slow: tiny shapes only.
The sanitizer modes need their runtime loaded before Python starts: run them in a subprocess with
`sanitizer_env(mode)` (see run_sanitized()).

Thread order (per launch): "forward", "reverse" or "random" (a seeded shuffle per barrier phase and
of the blocks). A correct kernel gives bit-identical results in every order.
"""
import contextlib
import ctypes
import hashlib
import itertools
import os
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from .. import backend
from ..errors import GpuconvError, KernelError

HEADER_DIR = Path(__file__).resolve().parent / "emulator"
HEADER = HEADER_DIR / "cuda_emulation.h"
MODES = ("fibers", "asan", "threads")
ORDERS = ("forward", "reverse", "random")
CONTEXTS = ("asm", "ucontext")
_ORDER_CODES = {"forward": 0, "reverse": 1, "random": 2}

_MODE_FLAGS = {
    "fibers": ["-O2"],
    "asan": ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"],
    "threads": ["-O1", "-g", "-fsanitize=thread", "-pthread", "-DEMU_THREADS=1"],
}
_BASE_FLAGS = ["-std=c++17", "-fPIC", "-shared", "-ffp-contract=off", "-fvisibility=hidden"]
_SANITIZER_RUNTIME = {"asan": ("libasan.so", "__asan_init"), "threads": ("libtsan.so", "__tsan_init")}


class KernelArgumentError(GpuconvError, TypeError):
    """Arguments of an emulated launch do not match the kernel's parameters."""


# ----------------------------------------------------------------------------------------------
# settings: mode, thread order, seed


_settings_stack = []
_launch_counter = itertools.count()


def _env_choice(name, choices, default):
    value = os.environ.get(name, "").strip().lower() or default
    if value not in choices:
        raise KernelError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def current_settings():
    """The emulator settings in force: innermost emulation(...) context, else the environment
    (GPUCONV_EMULATE_MODE, GPUCONV_EMULATE_ORDER, GPUCONV_EMULATE_SEED), else defaults."""
    settings = {
        "mode": _env_choice("GPUCONV_EMULATE_MODE", MODES, "fibers"),
        "order": _env_choice("GPUCONV_EMULATE_ORDER", ORDERS, "forward"),
        "seed": int(os.environ.get("GPUCONV_EMULATE_SEED", "0") or 0),
    }
    for entry in _settings_stack:
        settings.update({k: v for k, v in entry.items() if v is not None})
    return settings


@contextlib.contextmanager
def emulation(enabled=True, *, order=None, mode=None, seed=None, devices=None):
    """Run gpuconv's CUDA kernels through the CPU emulator inside the block (enabled=False switches
    it off); optionally choose the thread order, the mode and the random-order seed. devices=N also
    pretends to have N CUDA devices, so 'cuda:0'..'cuda:N-1' can be used and every allocation and
    launch records which one was current (see gpuconv.cuda.emulated_devices)."""
    if order is not None and order not in ORDERS:
        raise KernelError(f"emulation order: expected one of {ORDERS}, got {order!r}")
    if mode is not None and mode not in MODES:
        raise KernelError(f"emulation mode: expected one of {MODES}, got {mode!r}")
    backend._emulation_override.append(bool(enabled))
    _settings_stack.append({"order": order, "mode": mode, "seed": seed})
    try:
        if devices:
            from . import emulated_devices
            with emulated_devices.enabled(devices):
                yield
        else:
            yield
    finally:
        _settings_stack.pop()
        backend._emulation_override.pop()


# ----------------------------------------------------------------------------------------------
# source preparation


def _blank_comments(source):
    """Comments replaced by spaces (newlines kept, so line numbers hold); strings untouched."""
    pattern = re.compile(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', re.S)

    def blank(match):
        text = match.group(0)
        if text[0] in "\"'":
            return text
        return re.sub(r"[^\n]", " ", text)

    return pattern.sub(blank, source)


_SHARED_DECLARATION = re.compile(r"\b(extern\s+)?__shared__\b([^;{}]*);")


def _brace_depth(text, end):
    return text.count("{", 0, end) - text.count("}", 0, end)


def rewrite_shared(source, filename="kernel.cu"):
    """Rewrite `__shared__` declarations into per-block storage of the emulator (see the header)."""
    text = _blank_comments(source)
    counter = itertools.count()

    def replace(match):
        extern, declaration = match.group(1), match.group(2)
        line = text.count("\n", 0, match.start()) + 1
        where = f"{filename}:{line}"
        if _brace_depth(text, match.start()) <= 0:
            raise KernelError(f"{where}: a file-scope __shared__ variable is not supported by the "
                              "emulator; declare it inside the kernel")
        declaration = re.sub(r"__align__\s*\(\s*\d+\s*\)", " ", declaration)
        declaration = " ".join(declaration.split())
        if "=" in declaration or _top_level_comma(declaration):
            raise KernelError(f"{where}: the emulator supports one __shared__ array per declaration "
                              f"and no initialiser, got `__shared__ {declaration};`")
        bracket = declaration.find("[")
        head, dims = (declaration, "") if bracket < 0 else (declaration[:bracket], declaration[bracket:])
        name_match = re.search(r"(\w+)\s*$", head)
        if not name_match or not head[:name_match.start()].strip():
            raise KernelError(f"{where}: cannot parse the __shared__ declaration `{declaration}`")
        name, element = name_match.group(1), head[:name_match.start()].strip()
        newlines = "\n" * match.group(0).count("\n")
        if extern:
            if dims.replace(" ", "") != "[]":
                raise KernelError(f"{where}: expected `extern __shared__ T name[];`, got `{declaration}`")
            return f"{element}* {name} = ::emu::dynamic_shared<{element}>();{newlines}"
        return f"auto& {name} = ::emu::shared_var<{element} {dims}, {next(counter)}>();{newlines}"

    return _SHARED_DECLARATION.sub(replace, text)


def _top_level_comma(text):
    depth = 0
    for ch in text:
        depth += ch in "[(<"
        depth -= ch in "])>"
        if ch == "," and depth == 0:
            return True
    return False


def plain_kernel_names(source):
    """Names of the non-template __global__ functions in `source`."""
    text = re.sub(r"__launch_bounds__\s*\([^)]*\)", " ", _blank_comments(source))
    names = []
    for match in re.finditer(r"\b__global__\b([^;{}()]*)\(", text):
        before = text[:match.start()]
        statement_start = max(before.rfind(";"), before.rfind("}"), before.rfind("{"))
        if re.search(r"\btemplate\b", before[statement_start + 1:]):
            continue
        name = re.findall(r"\w+", match.group(1))
        if name:
            names.append(name[-1])
    return names


def _cache_dir():
    override = os.environ.get("GPUCONV_EMULATOR_CACHE")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gpuconv" / "emulator"


def _writable_cache_dir():
    """The cache folder, or a per-user temporary one when it cannot be written (read-only HOME)."""
    directory = _cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if os.access(directory, os.W_OK):
            return directory
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"gpuconv-emulator-{os.getuid()}"
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def _compiler():
    return os.environ.get("CXX", "g++")


def _compiler_identity():
    global _COMPILER_VERSION
    if _COMPILER_VERSION is None:
        try:
            result = subprocess.run([_compiler(), "--version"], capture_output=True, text=True, check=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise KernelError(f"the CUDA emulator needs a C++17 compiler ({_compiler()!r}, set CXX to "
                              f"choose another) and could not run it: {exc}") from None
        _COMPILER_VERSION = result.stdout.splitlines()[0] if result.stdout else _compiler()
    return _COMPILER_VERSION


_COMPILER_VERSION = None


class ParamInfo(ctypes.Structure):
    _fields_ = [("size", ctypes.c_int), ("kind", ctypes.c_int), ("pointee_size", ctypes.c_int),
                ("pointee_kind", ctypes.c_int)]


class Dim3(ctypes.Structure):
    _fields_ = [("x", ctypes.c_uint), ("y", ctypes.c_uint), ("z", ctypes.c_uint)]


_KIND_NAMES = {0: "pointer", 1: "signed integer", 2: "unsigned integer", 3: "floating point",
               4: "bool", 5: "struct", 6: "void"}
_DTYPE_KINDS = {"i": 1, "u": 2, "f": 3, "b": 4}
_C_NAMES = {(1, 1): "signed char", (1, 2): "short", (1, 4): "int", (1, 8): "long long",
            (2, 1): "unsigned char", (2, 2): "unsigned short", (2, 4): "unsigned int",
            (2, 8): "unsigned long long", (3, 4): "float", (3, 8): "double", (4, 1): "bool"}
_NUMPY_NAMES = {(1, 1): "int8", (1, 2): "int16", (1, 4): "int32", (1, 8): "int64", (2, 1): "uint8",
                (2, 2): "uint16", (2, 4): "uint32", (2, 8): "uint64", (3, 4): "float32",
                (3, 8): "float64", (4, 1): "bool_"}


def _c_type_name(kind, size):
    return _C_NAMES.get((kind, size), f"{_KIND_NAMES.get(kind, '?')} of {size} bytes")


class _Library:
    """One compiled and loaded build: a kernel table of launch functions and parameter lists."""

    def __init__(self, path, kernels):
        self.path = path
        self.dll = ctypes.CDLL(str(path))
        self.launchers, self.params = {}, {}
        for index, name in enumerate(kernels):
            launch = getattr(self.dll, f"emu_launch_{index}")
            launch.restype = ctypes.c_int
            launch.argtypes = [ctypes.POINTER(Dim3), ctypes.POINTER(Dim3), ctypes.c_size_t,
                               ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int,
                               ctypes.c_ulonglong, ctypes.c_char_p, ctypes.c_size_t]
            self.launchers[name] = launch
            info = getattr(self.dll, f"emu_params_{index}")
            info.restype = ctypes.c_int
            table = (ParamInfo * 64)()
            count = info(table, 64)
            self.params[name] = [(p.size, p.kind, p.pointee_size, p.pointee_kind) for p in table[:count]]
        self.dll.emu_alloc.restype = ctypes.c_void_p
        self.dll.emu_alloc.argtypes = [ctypes.c_size_t]
        self.dll.emu_free.argtypes = [ctypes.c_void_p]


_libraries = {}
_key_locks = {}
_build_lock = threading.Lock()


def build_all(modules_and_modes, workers=None):
    """Compile several (module, mode) pairs in parallel (g++ runs outside the GIL), without loading
    them: warms the on-disk cache, e.g. before sanitizer subprocesses. Returns the library paths."""
    from concurrent.futures import ThreadPoolExecutor
    pairs = list(modules_and_modes)
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2) as pool:
        return list(pool.map(lambda pair: pair[0].compile(mode=pair[1], load=False), pairs))


def _check_sanitizer_runtime(mode):
    if mode not in _SANITIZER_RUNTIME:
        return
    library, symbol = _SANITIZER_RUNTIME[mode]
    if not hasattr(ctypes.CDLL(None), symbol):
        raise KernelError(
            f"emulator mode {mode!r} needs the sanitizer runtime ({library}) loaded before Python "
            f"starts; run it in a subprocess with env=gpuconv.cuda.emulate.sanitizer_env({mode!r}) "
            f"(LD_PRELOAD=$(g++ -print-file-name={library})), e.g. via emulate.run_sanitized()")


class EmulatedModule:
    """A stand-in for cupy.RawModule that compiles `code` for the CPU emulator.

    mode / thread_order / seed, when given, fix those settings for this module's launches;
    otherwise each launch uses current_settings(). context="ucontext" selects the portable (slower)
    fiber switch instead of the x86-64 assembly one.
    """

    def __init__(self, code=None, path=None, options=(), backend="nvrtc", translate_cucomplex=False,
                 enable_cooperative_groups=False, name_expressions=None, jitify=False, *,
                 mode=None, thread_order=None, seed=None, context="asm", filename=None):
        if code is None:
            if path is None:
                raise KernelError("EmulatedModule: pass the CUDA source as code= or a file as path=")
            code = Path(path).read_text()
        if mode is not None and mode not in MODES:
            raise KernelError(f"EmulatedModule mode: expected one of {MODES}, got {mode!r}")
        if thread_order is not None and thread_order not in ORDERS:
            raise KernelError(f"EmulatedModule thread_order: expected one of {ORDERS}, got {thread_order!r}")
        if context not in CONTEXTS:
            raise KernelError(f"EmulatedModule context: expected one of {CONTEXTS}, got {context!r}")
        self.code = code
        self.filename = filename or (Path(path).name if path else "kernel.cu")
        self.options = tuple(options)
        self.name_expressions = tuple(name_expressions or ())
        self.mode, self.thread_order, self.seed, self.context = mode, thread_order, seed, context
        self._plain_names = plain_kernel_names(code)
        self._kernels = list(dict.fromkeys(self._plain_names + list(self.name_expressions)))
        self._rewritten = None
        self._loaded = {}  # mode -> _Library: a launch skips hashing the source

    # -- building

    def _compile_flags(self, mode):
        flags = list(_BASE_FLAGS) + _MODE_FLAGS[mode]
        if self.context == "ucontext":
            flags.append("-DEMU_USE_UCONTEXT=1")
        for option in self.options:  # NVRTC options: keep the preprocessor ones, drop the rest
            if option.startswith(("-D", "-U", "--define-macro=", "--undefine-macro=")):
                flags.append(option.replace("--define-macro=", "-D").replace("--undefine-macro=", "-U"))
        return flags

    def _translation_unit(self):
        if self._rewritten is None:
            self._rewritten = rewrite_shared(self.code, self.filename)
        lines = ['#include "cuda_emulation.h"', f'#line 1 "{self.filename}"', self._rewritten,
                 "#line 100000 \"emulator-launchers\""]
        for index, name in enumerate(self._kernels):
            lines.append(
                f"EMU_EXPORT int emu_launch_{index}(const emu::Dim3* grid, const emu::Dim3* block, "
                f"size_t shared_bytes, void** args, int nargs, int order, unsigned long long seed, "
                f"char* err, size_t errlen) {{ return emu::launch(&{name}, grid, block, shared_bytes, "
                f"args, nargs, order, seed, err, errlen); }}")
            lines.append(f"EMU_EXPORT int emu_params_{index}(emu::ParamInfo* out, int capacity) "
                         f"{{ return emu::param_info(&{name}, out, capacity); }}")
        return "\n".join(lines) + "\n"

    def _build_key(self, mode):
        digest = hashlib.sha256()
        for part in (self._translation_unit(), HEADER.read_text(), mode, " ".join(self._compile_flags(mode)),
                     _compiler_identity(), repr(self._kernels)):
            digest.update(part.encode())
            digest.update(b"\0")
        return digest.hexdigest()[:32]

    def compile(self, mode=None, load=True):
        """Build (or find in the on-disk cache) and load the library for `mode`. load=False only
        builds and returns the .so's path, so a parent process can warm the cache for a sanitizer
        subprocess (which loads it)."""
        mode = mode or self.mode or current_settings()["mode"]
        if load and mode in self._loaded:
            return self._loaded[mode]
        key = self._build_key(mode)
        with _build_lock:
            key_lock = _key_locks.setdefault(key, threading.Lock())
        with key_lock:  # one build per key at a time; different keys build in parallel
            library = _libraries.get(key)
            if library is not None:
                if not load:
                    return library.path
                self._loaded[mode] = library
                return library
            directory = _writable_cache_dir()
            target = directory / f"{Path(self.filename).stem}-{mode}-{key}.so"
            if not target.exists():
                self._run_compiler(mode, target, directory)
            if not load:
                return target
            _check_sanitizer_runtime(mode)
            library = _Library(target, self._kernels)
            _libraries[key] = library
        self._loaded[mode] = library
        return library

    def _run_compiler(self, mode, target, directory):
        source_path = target.with_suffix(".cpp")
        fd, temporary = tempfile.mkstemp(suffix=".so", dir=directory)
        os.close(fd)
        try:
            source_path.write_text(self._translation_unit())
            command = [_compiler(), *self._compile_flags(mode), f"-I{HEADER_DIR}", str(source_path),
                       "-o", temporary]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode:
                raise KernelError(f"the CUDA emulator could not compile {self.filename} (mode {mode!r}); "
                                  f"a kernel may use CUDA outside the emulated subset:\n"
                                  + result.stderr[-6000:])
            os.replace(temporary, target)  # atomic: concurrent builders never see a partial file
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)

    # -- cupy.RawModule interface

    def get_function(self, name):
        if name not in self._kernels:
            raise KernelError(f"EmulatedModule: no kernel {name!r}; kernels are the non-template "
                              f"__global__ functions {self._plain_names} and the name_expressions "
                              f"{list(self.name_expressions)}")
        return EmulatedKernel(self, name)


class EmulatedKernel:
    """A stand-in for cupy.RawKernel: kernel(grid, block, args, shared_mem=0)."""

    max_threads_per_block = 1024

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __repr__(self):
        return f"<EmulatedKernel {self.name} of {self.module.filename}>"

    def __call__(self, grid, block, args, *, shared_mem=0, mode=None, thread_order=None, seed=None):
        settings = current_settings()
        mode = mode or self.module.mode or settings["mode"]
        order = thread_order or self.module.thread_order or settings["order"]
        if order not in ORDERS:
            raise KernelError(f"thread_order: expected one of {ORDERS}, got {order!r}")
        base_seed = seed if seed is not None else (
            self.module.seed if self.module.seed is not None else settings["seed"])
        launch_seed = (int(base_seed) * 1000003 + next(_launch_counter)) & 0xFFFFFFFFFFFFFFFF
        library = self.module.compile(mode)
        params = library.params[self.name]
        grid3, block3 = _dim3(grid, "grid", self.name), _dim3(block, "block", self.name)
        if isinstance(shared_mem, bool) or not isinstance(shared_mem, (int, np.integer)) or shared_mem < 0:
            raise KernelArgumentError(f"{self.name}: shared_mem: expected an int >= 0, got {shared_mem!r}")
        if not isinstance(args, tuple):
            raise KernelArgumentError(f"{self.name}: args: expected a tuple, got {type(args).__name__}")
        if len(args) != len(params):
            raise KernelArgumentError(f"{self.name}: the kernel takes {len(params)} arguments, "
                                      f"{len(args)} were given")
        cells, keep_alive, copies = (ctypes.c_void_p * max(len(args), 1))(), [], []
        for index, (value, param) in enumerate(zip(args, params)):
            cells[index] = self._argument(index, value, param, keep_alive)
        if mode == "asan":
            copies = self._copy_arrays_out(library, args, cells, keep_alive)
        error = ctypes.create_string_buffer(2048)
        try:
            status = library.launchers[self.name](
                ctypes.byref(grid3), ctypes.byref(block3), int(shared_mem), cells, len(args),
                _ORDER_CODES[order], launch_seed, error, len(error))
        finally:
            for array, buffer in copies:
                if array.flags.writeable:
                    ctypes.memmove(array.ctypes.data, buffer, array.nbytes)
            for buffer in {b for _, b in copies}:
                library.dll.emu_free(buffer)
        if status:
            raise KernelError(f"emulated kernel {self.name} (grid {_tuple(grid3)}, block {_tuple(block3)}, "
                              f"order {order}, seed {launch_seed}, mode {mode}): "
                              f"{error.value.decode(errors='replace')}")

    def _argument(self, index, value, param, keep_alive):
        """The address of a cell holding argument `index` as the kernel parameter expects it."""
        size, kind, pointee_size, pointee_kind = param
        where = f"{self.name}: argument {index}"
        expected = (f"a pointer to {_c_type_name(pointee_kind, pointee_size)}" if kind == 0
                    else _c_type_name(kind, size))
        if isinstance(value, (bool, int, float)) and not isinstance(value, np.generic):
            raise KernelArgumentError(
                f"{where} is a Python {type(value).__name__} ({value!r}), the kernel expects {expected}. "
                "CuPy would silently pass a Python int as int64 and a float as double; pass an explicit "
                "NumPy scalar of the kernel's parameter type instead, e.g. numpy.int32(...) or "
                "numpy.float32(...)")
        if isinstance(value, np.ndarray):
            if kind != 0:
                raise KernelArgumentError(f"{where} is an array, the kernel expects {expected} by value")
            if not value.flags.c_contiguous:
                raise KernelArgumentError(f"{where}: the array (shape {value.shape}, strides "
                                          f"{value.strides}) is not C-contiguous; a kernel indexes it "
                                          "as flat memory, pass numpy.ascontiguousarray(...)")
            if pointee_kind in (1, 2, 3, 4) and (
                    _DTYPE_KINDS.get(value.dtype.kind) != pointee_kind or value.dtype.itemsize != pointee_size):
                raise KernelArgumentError(
                    f"{where} is a {value.dtype} array, the kernel expects {expected} "
                    f"(a {_NUMPY_NAMES.get((pointee_kind, pointee_size), '?')} array)")
            cell = ctypes.c_void_p(value.ctypes.data)
            keep_alive.append(cell)
            return ctypes.addressof(cell)
        if isinstance(value, np.generic):
            if kind == 0:
                raise KernelArgumentError(f"{where} is a {value.dtype} scalar, the kernel expects {expected} "
                                          "(pass an array)")
            if _DTYPE_KINDS.get(value.dtype.kind) != kind or value.dtype.itemsize != size:
                raise KernelArgumentError(
                    f"{where} is a numpy.{value.dtype} scalar, the kernel expects {expected}: pass "
                    f"numpy.{_NUMPY_NAMES.get((kind, size), '?')}(...)")
            cell = np.array(value)  # an aligned copy that outlives the call
            keep_alive.append(cell)
            return cell.ctypes.data
        raise KernelArgumentError(f"{where}: expected a NumPy array or a NumPy scalar, got "
                                  f"{type(value).__name__}; the emulator runs on NumPy arrays")

    @staticmethod
    def _copy_arrays_out(library, args, cells, keep_alive):
        """ASan mode: each array gets a malloc'd copy of exactly its size (NumPy buffers are not
        instrumented, so only this way does ASan see the end of an argument)."""
        copies, buffers = [], {}
        for index, value in enumerate(args):
            if not isinstance(value, np.ndarray):
                continue
            key = (value.ctypes.data, value.nbytes)
            if key not in buffers:  # the same array passed twice stays one buffer (in-place kernels)
                buffer = library.dll.emu_alloc(value.nbytes)
                ctypes.memmove(buffer, value.ctypes.data, value.nbytes)
                buffers[key] = buffer
            copies.append((value, buffers[key]))
            cell = ctypes.c_void_p(buffers[key])
            keep_alive.append(cell)
            cells[index] = ctypes.addressof(cell)
        return copies


def _tuple(dim):
    return (dim.x, dim.y, dim.z)


def _dim3(value, what, name):
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (value,)
    if (not isinstance(value, tuple) or not 1 <= len(value) <= 3
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)):
        raise KernelArgumentError(f"{name}: {what}: expected an int or a tuple of 1 to 3 ints, got {value!r}")
    if any(v < 0 or v >= 2 ** 32 for v in value):
        raise KernelArgumentError(f"{name}: {what}: entries must be in [0, 2^32), got {value!r}")
    padded = tuple(int(v) for v in value) + (1,) * (3 - len(value))
    return Dim3(*padded)


# ----------------------------------------------------------------------------------------------
# sanitizer subprocesses


def sanitizer_env(mode, base=None):
    """Environment for a subprocess that runs emulator mode `mode` ("asan" or "threads")."""
    env = dict(os.environ if base is None else base)
    if mode not in _SANITIZER_RUNTIME:
        raise KernelError(f"sanitizer_env: expected 'asan' or 'threads', got {mode!r}")
    library = _SANITIZER_RUNTIME[mode][0]
    runtime = subprocess.run([_compiler(), f"-print-file-name={library}"], capture_output=True,
                             text=True).stdout.strip()
    if not runtime or not os.path.isabs(runtime):
        raise KernelError(f"{_compiler()} has no {library}: install the sanitizer runtime "
                          "(libasan8 / libtsan2 on Debian)")
    env["LD_PRELOAD"] = runtime
    env["GPUCONV_EMULATE_MODE"] = mode
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:exitcode=23:allocator_may_return_null=1"
    env["TSAN_OPTIONS"] = "exitcode=66:halt_on_error=0:report_signal_unsafe=0"
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_sanitized(mode, code, timeout=600):
    """Run Python `code` in a subprocess under `mode`'s sanitizer; returns CompletedProcess
    (returncode, stdout, stderr). Sanitizer reports land in stderr."""
    return subprocess.run([sys.executable, "-c", code], env=sanitizer_env(mode), capture_output=True,
                          text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------------
# microbenchmark of the fiber switch


_BENCH_SOURCE = r"""
extern "C" __global__ void barrier_loop(int rounds, float* out)
{
    float acc = 0.0f;
    for (int i = 0; i < rounds; ++i) {
        acc += (float)threadIdx.x;
        __syncthreads();
    }
    out[threadIdx.x + blockIdx.x * blockDim.x] = acc;
}
"""


def benchmark_context_switch(context="asm", threads=256, rounds=2000, blocks=4):
    """Context switches per second of the fiber scheduler (two per thread per barrier)."""
    import time
    module = EmulatedModule(_BENCH_SOURCE, mode="fibers", context=context, filename="bench.cu")
    kernel = module.get_function("barrier_loop")
    out = np.zeros(threads * blocks, np.float32)
    kernel((1,), (threads,), (np.int32(1), out))  # build + warm up
    start = time.perf_counter()
    kernel((blocks,), (threads,), (np.int32(rounds), out))
    elapsed = time.perf_counter() - start
    return 2 * threads * blocks * (rounds + 1) / elapsed


if __name__ == "__main__":
    for ctx in CONTEXTS:
        print(f"{ctx:9s} {benchmark_context_switch(ctx) / 1e6:7.1f} M switches/s")
