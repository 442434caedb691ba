"""gpuconv: a small, fast, readable CNN framework. NumPy on the CPU, CuPy + raw CUDA kernels on the GPU.

The data flow, top to bottom: a model (gpuconv.nn.Module, forward only) -> autograd
(gpuconv.autograd: Tensor, Function, the tape) -> Tensor ops (gpuconv.functional, one Function per
op) -> array-level forward/backward pairs (gpuconv.ops) -> NumPy code, or CUDA kernels in
kernels/*.cu through CuPy. gpuconv.compile(model) runs a chain of layers on the CPU as one fused
plan (gpuconv.nn.cpu_plan) instead of op by op.
"""
from . import errors, functional, nn, ops, optim
from .autograd import Tensor, cat, enable_grad, is_grad_enabled, no_grad, tensor
from .backend import cuda_available, get_array_module, parse_device, to_device
from .compiler import compile
from .models import LeNet5
from .nn.cpu_plan import get_cpu_workers, set_cpu_workers
from .nn.init import manual_seed

# The version of this source tree; pyproject.toml carries the same string (tests/test_cli.py
# checks that they agree). An installed wheel's metadata wins where it describes this very copy.
_SOURCE_VERSION = "0.2.0"


def _installed_version():
    """The version in the installed distribution's metadata, if that distribution is the copy of
    gpuconv being imported; else None. An editable install or a checkout on PYTHONPATH next to
    another installed gpuconv would otherwise report the other copy's (possibly stale) version."""
    import os
    from importlib import metadata
    try:
        dist = metadata.distribution("gpuconv")
    except metadata.PackageNotFoundError:
        return None
    here = os.path.realpath(__file__)
    for entry in dist.files or ():
        if entry.name == "__init__.py" and entry.parent.name == "gpuconv" and not entry.parent.parent.name:
            if os.path.realpath(dist.locate_file(entry)) == here:
                return dist.version
    return None


__version__ = _installed_version() or _SOURCE_VERSION


def version_source():
    """Where __version__ came from, for `python -m gpuconv --version`."""
    where = __file__.rsplit("__init__.py", 1)[0]
    return ("installed package at " if _installed_version() else "source tree at ") + where
