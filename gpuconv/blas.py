"""Run-time control of NumPy's BLAS threads, through ctypes and no extra dependency.

Why: OpenBLAS splits even a small GEMM over all its threads, and on a busy machine a threaded
small product waits for the other cores many times longer than one thread needs to compute it
alone (figures in docs/performance.md, "Figures from the code's comments"). The CPU executor (gpuconv.nn.cpu_plan) therefore runs its own threads, one per core, each
over part of the batch with a single-threaded BLAS, and asks for that here for the length of a
parallel region, restoring the previous count exactly afterwards. threadpoolctl would do the same; these few lines avoid a runtime dependency.

Only OpenBLAS (what NumPy's wheels ship, as scipy-openblas) is controlled. Anything else (MKL,
Accelerate) reports `available() == False`, and callers then leave the BLAS alone.
"""
import contextlib
import ctypes
import os
import threading

import numpy as np

# scipy-openblas renames the symbols (prefix scipy_, suffix 64_ for the 64-bit-integer build);
# plain OpenBLAS builds keep the original names. Getter and setter are tried as pairs.
_SYMBOLS = (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
            ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
            ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
            ("openblas_get_num_threads", "openblas_set_num_threads"))

_lock = threading.Lock()
_functions = None  # (get, set) once looked up; (None, None) if there is no OpenBLAS to control
_library = None    # the OpenBLAS they come from (ctypes.CDLL)
_warmed_up = False
_restores = []     # the counts the open num_threads blocks that changed it will restore, outermost first


def _loaded_openblas_paths():
    """Shared objects with 'openblas' in the name that this process has mapped (Linux)."""
    try:
        with open("/proc/self/maps") as f:
            return sorted({line.split()[-1] for line in f
                           if "openblas" in line.lower() and ".so" in line.split()[-1]})
    except OSError:
        return []


def _lookup():
    global _functions, _library
    if _functions is not None:
        return _functions
    found = (None, None)
    for path in _loaded_openblas_paths():
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for get_name, set_name in _SYMBOLS:
            if hasattr(library, get_name) and hasattr(library, set_name):
                getter, setter = getattr(library, get_name), getattr(library, set_name)
                getter.restype, getter.argtypes = ctypes.c_int, []
                setter.restype, setter.argtypes = None, [ctypes.c_int]
                found, _library = (getter, setter), library
                break
        if found[0] is not None:
            break
    _functions = found
    return found


def available():
    """True when NumPy's BLAS is an OpenBLAS whose thread count can be set at run time."""
    return _lookup()[0] is not None


def get_num_threads():
    """Threads NumPy's BLAS uses now; without a controllable OpenBLAS, the CPUs available."""
    getter, _ = _lookup()
    if getter is not None:
        return int(getter())
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def set_num_threads(count):
    """Set NumPy's BLAS threads (process-wide); returns False where that cannot be done."""
    _, setter = _lookup()
    if setter is None:
        return False
    setter(int(count))
    return True


@contextlib.contextmanager
def num_threads(count):
    """Run a block with `count` BLAS threads, then restore the previous count. Process-wide:
    other Python threads calling BLAS meanwhile get `count` too. A no-op without OpenBLAS."""
    getter, setter = _lookup()
    if getter is None:
        yield
        return
    previous = None  # set once the block must restore it: from then on the finally does
    try:
        # inside the try: a KeyboardInterrupt right after the count is set still restores it
        with _lock:
            current = int(getter())
            if current != count:
                _restores.append(current)
                previous = current
                setter(int(count))
        yield
    finally:
        if previous is not None:
            with _lock:
                setter(previous)
                if _restores:
                    _restores.pop()


def restore_after_fork():
    """In a forked child whose num_threads blocks belonged to threads that did not come along:
    the count from before the outermost of them, and no block open."""
    _, setter = _lookup()
    if _restores and setter is not None:
        setter(_restores[0])
    _restores.clear()


def _after_fork_in_child():
    global _lock
    _lock = threading.Lock()  # another thread may have held it (a get or set) at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def warm_up():
    """One 512^3 SGEMM, once per process. A fresh OpenBLAS ran skinny one-thread GEMMs much
    slower until it had done one this large (its buffers and thread state are then set up); the
    cost is paid once, not repeated."""
    global _warmed_up
    if _warmed_up:
        return
    _warmed_up = True
    a = np.ones((512, 512), dtype=np.float32)
    np.matmul(a, a)
