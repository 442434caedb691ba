"""The wheel must carry every subpackage and the CUDA sources, or an installed gpuconv breaks."""
import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "gpuconv").rglob("__init__.py")}
    assert on_disk | {"gpuconv.kernels"} == listed


def test_kernel_sources_ship_as_package_data():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"]["gpuconv.kernels"] == "kernels"
    patterns = config["package-data"]["gpuconv.kernels"]
    sources = sorted(p.name for p in (ROOT / "kernels").iterdir() if p.suffix in (".cu", ".cuh"))
    assert sources and all(any(p.endswith(pattern.lstrip("*")) for pattern in patterns) for p in sources)
