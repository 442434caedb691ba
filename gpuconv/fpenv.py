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

NumPy's error policy (np.errstate: warn, raise, ignore, call, print or log for each of divide,
over, under and invalid) is the calling thread's too (a context variable): a worker started with
NumPy's default, so an overflow in a worker's part warned from that thread (or, in a worker
process, on stderr, past the user's warning filters) where the caller had asked for an exception
or for silence. So inside a region (gpuconv/nn/cpu_plan.py: a split op, a compiled model's
forward or backward, an op run alone under the region lock) every part, the caller's own too,
only notes the kinds the caller does not ignore (`noting_errors`: errstate's call mode, no user
code runs there), and the caller reports them once the region has ended (`report_errors`), in
its own thread, as its np.errstate says: once per kind, in NumPy's order, as one whole-array call
would have. Which part met an error then changes nothing, and a callback or warning hook may run
gpuconv ops, a compiled model included: the region is over. A compiled forward whose output is
not finite runs again eagerly (gpuconv/compiler.py); its plan's reports are dropped, the eager
ops report theirs.
"""
import contextlib
import ctypes
import ctypes.util
import os
import sys
import warnings

import numpy as np

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


# ----------------------------------------------------------------------------------------------
# NumPy's error policy

KINDS = ("divide", "over", "under", "invalid")  # np.geterr()'s keys, in the order NumPy reports them
_NAMES = {"divide": "divide by zero", "over": "overflow", "under": "underflow", "invalid": "invalid value"}
_KIND_OF = {name: kind for kind, name in _NAMES.items()}
_FLAGS = {"divide": 1, "over": 2, "under": 4, "invalid": 8}  # the status bits NumPy passes a callback


def watched_errors():
    """The calling thread's np.errstate as a part elsewhere runs it: the kinds it ignores ignored,
    every other one noted (np.errstate's call mode), never warned, raised or called back there."""
    return {kind: "ignore" if mode == "ignore" else "call" for kind, mode in np.geterr().items()}


def noting_errors(watched, met):
    """np.errstate for a part run under `watched` (from watched_errors()): each kind of error it
    meets is added to the set `met`."""
    return np.errstate(call=lambda name, flag: met.add(_KIND_OF.get(name, name)), **watched)


def report_errors(met, where):
    """In the caller's thread, once its parts have ended: each kind in `met` as the caller's
    np.errstate says, in NumPy's order (raise: FloatingPointError at the first one)."""
    modes = np.geterr()
    flags = sum(_FLAGS[kind] for kind in KINDS if kind in met)
    for kind in KINDS:
        if kind not in met or modes[kind] == "ignore":
            continue
        message = f"{_NAMES[kind]} encountered in {where}"
        mode = modes[kind]
        if mode == "raise":
            raise FloatingPointError(message)
        if mode == "warn":  # from the user's line that called into gpuconv, as NumPy's name theirs
            warnings.warn(message, RuntimeWarning, stacklevel=_callers_level())
        elif mode == "call":
            if not callable(np.geterrcall()):  # NumPy's error for a call mode without a callback
                raise NameError(f"python callback specified for {_NAMES[kind]} (in {where}) but no function found.")
            np.geterrcall()(_NAMES[kind], flags)
        elif mode == "print":  # NumPy prints to stderr
            print(f"Warning: {message}", file=sys.stderr)
        elif mode == "log":
            if not callable(getattr(np.geterrcall(), "write", None)):
                raise NameError(f"log specified for {_NAMES[kind]} (in {where}) but no object with write method found.")
            np.geterrcall().write(f"Warning: {message}\n")


def _callers_level():
    """warnings.warn's stacklevel for the first frame outside gpuconv (and contextlib, whose exits
    report regions' errors), counted from report_errors'."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(2), 2
    while frame is not None and (frame.f_code.co_filename.startswith(package)
                                 or frame.f_code.co_filename == contextlib.__file__):
        frame, level = frame.f_back, level + 1
    return level


def encode_watched(watched):
    """`watched` (watched_errors()) as one word for a worker process's command: a 1 per kind noted."""
    return "".join("1" if watched[kind] == "call" else "0" for kind in KINDS)


def decode_watched(text):
    return {kind: "call" if flag == "1" else "ignore" for kind, flag in zip(KINDS, text)}


def encode_kinds(met):
    """The kinds a worker process's part met, as one word of its reply ("-" for none)."""
    return ",".join(kind for kind in KINDS if kind in met) or "-"


def decode_kinds(text):
    return set(text.split(",")) & set(KINDS)
