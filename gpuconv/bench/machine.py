"""What the numbers were measured on: CPU, threads, BLAS, GPU, library versions, date, load.

Everything here is read without extra dependencies (no threadpoolctl): the CPU model from
/proc/cpuinfo, the BLAS from numpy.show_config, its thread count by asking the loaded OpenBLAS.
"""
import ctypes
import datetime
import os
import platform
import subprocess
import re

import numpy as np

from .. import blas
from ..backend import cuda_status


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_threads():
    """CPUs this process may run on (the affinity mask, which containers narrow), else cpu_count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def blas_name():
    try:
        config = np.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:  # old NumPy without mode="dicts", or a build that lists no BLAS
        return "unknown"


# scipy-openblas renames OpenBLAS's symbols (prefix scipy_, suffix 64_ for its 64-bit-integer
# build); a plain OpenBLAS keeps the original names. Tried in this order, as gpuconv.blas does.
_CORE_SYMBOLS = ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename",
                 "openblas_get_corename64_", "openblas_get_corename")
_CONFIG_SYMBOLS = ("scipy_openblas_get_config64_", "scipy_openblas_get_config",
                   "openblas_get_config64_", "openblas_get_config")
# Variables that change which BLAS kernel runs or how (OPENBLAS_CORETYPE forces a core's kernels
# in a DYNAMIC_ARCH build; OPENBLAS_L2_SIZE changes its blocking), recorded with every run.
BLAS_ENVIRONMENT = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                    "MKL_NUM_THREADS", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "GPUCONV_CPU_WORKERS")


def _openblas_string(symbols, paths=None):
    """The string the first of `symbols` returns from a loaded OpenBLAS; "unknown" if there is
    none (another BLAS, no /proc/self/maps, a build without the function)."""
    for path in (blas._loaded_openblas_paths() if paths is None else paths):
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for name in symbols:
            if hasattr(library, name):
                function = getattr(library, name)
                function.restype, function.argtypes = ctypes.c_char_p, []
                value = function()
                if value:
                    return value.decode(errors="replace").strip()
    return "unknown"


def blas_core(paths=None):
    """The CPU core whose kernels NumPy's OpenBLAS runs (Haswell, SkylakeX, Zen, ...): in a
    DYNAMIC_ARCH build it is chosen at load time, from the CPU or from $OPENBLAS_CORETYPE."""
    return _openblas_string(_CORE_SYMBOLS, paths)


def blas_config(paths=None):
    """OpenBLAS's own description of its build (version, DYNAMIC_ARCH, core, MAX_THREADS)."""
    return _openblas_string(_CONFIG_SYMBOLS, paths)


def blas_environment():
    """{variable: value or None} for BLAS_ENVIRONMENT, as this process sees them."""
    return {name: os.environ.get(name) for name in BLAS_ENVIRONMENT}


def torch_blas_info(torch):
    """What PyTorch's CPU kernels run on, from torch.__config__.show() and torch.backends:
    its BLAS (BLAS_INFO: mkl, open, ...), the MKL and oneDNN (MKL-DNN) versions, and the CPU
    capability its ATen kernels were dispatched for (AVX2, AVX512, ...). "unknown" where not said."""
    try:
        config = torch.__config__.show()
    except Exception:  # a build without __config__
        config = ""

    def find(pattern):
        match = re.search(pattern, config)
        return match.group(1).strip() if match else "unknown"
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:
        capability = find(r"CPU capability usage: (\S+)")
    try:
        mkldnn = bool(torch.backends.mkldnn.is_available())
    except Exception:
        mkldnn = None
    return dict(blas_info=find(r"BLAS_INFO=([^,\s]+)"), mkl_version=find(r"Math Kernel Library Version (\S+)"),
                onednn_version=find(r"MKL-DNN v(\S+)"), onednn_available=mkldnn, cpu_capability=capability)


def set_blas_threads(threads):
    """Tell the loaded OpenBLAS to use `threads` threads; False if there is none to tell."""
    return blas.set_num_threads(threads)


def blas_threads():
    """Threads NumPy's BLAS uses: asked of the loaded OpenBLAS (gpuconv.blas), else the usual
    environment variables, else the CPUs available. Returns (threads, how it was found)."""
    if blas.available():
        return blas.get_num_threads(), "OpenBLAS get_num_threads()"
    for variable in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(variable, "")
        if value.isdigit() and int(value) > 0:
            return int(value), f"${variable}"
    return cpu_threads(), "CPUs available"


def torch_info():
    """(torch module or None, reason it is unavailable or '')."""
    try:
        import torch
    except ImportError:
        return None, "PyTorch is not installed (pip install torch to compare against it)"
    except Exception as exc:  # a broken install raises other things (missing shared libraries)
        return None, f"PyTorch failed to import: {exc}"
    return torch, ""


def gpu_info():
    cupy, reason = cuda_status()
    info = dict(cuda_available=not reason, cuda_reason=reason,
                cupy_version=getattr(cupy, "__version__", None), gpu_name=None,
                cuda_runtime_version=None, cuda_driver_version=None)
    if reason:
        return info
    runtime = cupy.cuda.runtime
    props = runtime.getDeviceProperties(0)
    name = props["name"]
    info.update(gpu_name=name.decode() if isinstance(name, bytes) else str(name),
                gpu_count=runtime.getDeviceCount(),
                cuda_runtime_version=runtime.runtimeGetVersion(),
                cuda_driver_version=runtime.driverGetVersion())
    return info


def git_commit(root=None):
    """(commit id, uncommitted changes?) of the checkout gpuconv is imported from (or `root`), or
    (None, None) for an installed copy: a figure is only worth quoting with the code it measured."""
    if root is None:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.exists(os.path.join(root, ".git")):
        return None, None  # not a checkout; never ask git about some enclosing repository
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        status = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    if commit.returncode or status.returncode:
        return None, None
    return commit.stdout.strip(), bool(status.stdout.strip())


def load_average():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def machine_info():
    threads, threads_source = blas_threads()
    info = dict(cpu_model=cpu_model(), cpu_threads=cpu_threads(), blas=blas_name(),
                blas_core=blas_core(), blas_config=blas_config(), blas_environment=blas_environment(),
                blas_threads=threads, blas_threads_source=threads_source,
                numpy_version=np.__version__, python_version=platform.python_version(),
                platform=platform.platform(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    info["git_commit"], info["git_dirty"] = git_commit()
    info.update(gpu_info())
    torch, _ = torch_info()
    info["torch_version"] = torch.__version__ if torch is not None else None
    return info
