"""The extras install what the GPU path loads: read from the package metadata a pip install of this
checkout would see (built here from a copy of the checkout with setuptools, so no stale installed
copy answers)."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpuconv.cuda.runtime import REQUIRED_LIBRARIES

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def extras(tmp_path_factory):
    """{extra: {distribution name: requirement text}} from the built METADATA's Requires-Dist."""
    pytest.importorskip("setuptools")
    source = tmp_path_factory.mktemp("checkout")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("gpuconv", "kernels"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("metadata")
    # egg_info writes the requirements per extra (requires.txt) with any setuptools, no wheel needed
    result = subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q", "egg_info",
                             "--egg-base", str(out)], cwd=source, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    found, section = {}, None
    for line in next(out.glob("*.egg-info")).joinpath("requires.txt").read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]").split(":")[0]
        elif line and section:
            name = re.match(r"[A-Za-z0-9_.\-]+", line).group(0).lower()
            found.setdefault(section, {})[name] = line
    return found


@pytest.mark.parametrize("extra, column, cupy", [("cuda13", 0, "cupy-cuda13x"), ("cuda12", 1, "cupy-cuda12x")])
def test_cuda_extras_carry_every_library_the_gpu_path_loads(extras, extra, column, cupy):
    wheels = {pair[column] for pair in REQUIRED_LIBRARIES.values()}
    assert {"nvidia-cublas" if column == 0 else "nvidia-cublas-cu12"} <= wheels
    requirements = extras[extra]
    for wheel in sorted(wheels | {cupy}):
        assert wheel in requirements, f"the {extra} extra lacks {wheel}: {sorted(requirements)}"
        assert "==" in requirements[wheel], f"{requirements[wheel]} is not pinned"


def test_the_kernel_check_extra_is_the_compile_check_alone(extras):
    """What the test command installs on a machine without a GPU: CuPy and NVRTC, pinned as in
    cuda13 (the compile check must see what a GPU user runs), without cuBLAS's ~450 MB."""
    check, cuda13 = extras["kernel-check"], extras["cuda13"]
    assert set(check) == {"cupy-cuda13x", "nvidia-cuda-nvrtc"}
    assert all(check[name] == cuda13[name] for name in check)
