"""The calling thread's C floating-point environment, carried into the threads that run its parts.

Why: the rounding mode (fesetround) and, on x86, flush-to-zero and denormals-are-zero (MXCSR; a
library built with -ffast-math sets them when it loads) belong to each thread. A worker thread
running part of an op keeps its own, so with a caller that changed them, the worker's elements
came out as the default environment gives them, the caller's as the caller's does: bits that
depend on the worker count. gpuconv.nn.cpu_plan._run_parallel takes the caller's environment and
runs every worker part in it, restoring the worker's own afterwards; gpuconv.nn.cpu_workers sends
it (encode/decode) with each part it hands to a worker process, which does the same.

Through C's fegetenv/fesetenv (ctypes, the C library's libm): where they cannot be found, `current()`
is None and the parts run as they are.
"""
import ctypes
import ctypes.util

ENV_BYTES = 256  # more than any C library's fenv_t (x86-64 glibc: 32 bytes, aarch64: 8)

_functions = None  # (fegetenv, fesetenv), or () where they cannot be found


def _lookup():
    global _functions
    if _functions is None:
        try:
            library = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
            _functions = (library.fegetenv, library.fesetenv)
        except (OSError, AttributeError):
            _functions = ()
    return _functions


def current():
    """The calling thread's floating-point environment (an opaque buffer), or None."""
    functions = _lookup()
    if not functions:
        return None
    env = ctypes.create_string_buffer(ENV_BYTES)
    return env if functions[0](env) == 0 else None


def run_in(env, function, *args):
    """function(*args) in this thread with the environment `env` (from current()), then this
    thread's own environment again."""
    own = current()
    if env is None or own is None:
        return function(*args)
    _functions[1](env)
    try:
        return function(*args)
    finally:
        _functions[1](own)


def encode(env):
    """`env` (from current(), or None) as one word of text, for a worker process's command: the hex
    of the buffer without its trailing zeros (fegetenv wrote only the start of it), "-" for None."""
    if env is None:
        return "-"
    return env.raw.rstrip(b"\0").hex() or "00"


def decode(text):
    """The environment encode() gave, as a buffer for run_in (None for "-")."""
    if text == "-":
        return None
    return ctypes.create_string_buffer(bytes.fromhex(text).ljust(ENV_BYTES, b"\0"), ENV_BYTES)
