"""Every CUDA kernel instance compiles with NVRTC for every target architecture, without warnings,
register spills or local memory. Needs CuPy (its NVRTC wrapper and compile path), not a GPU."""
import pytest

pytest.importorskip("cupy")

from gpuconv.cuda import runtime  # noqa: E402
from gpuconv.cuda.tools import check, offline  # noqa: E402
from gpuconv.errors import KernelError  # noqa: E402

BUILDS = [(source, arch) for source in runtime.KERNELS for arch in offline.ARCHS]


@pytest.fixture(scope="module")
def builds():
    """(source, arch) -> OfflineResult, each compiled once (compile_offline caches per process, so
    the check-kernels test below reuses these)."""
    return {(source, arch): offline.compile_offline(source, arch,
                                                     runtime.template_instances(runtime.KERNELS[source]))
            for source, arch in BUILDS}


@pytest.mark.parametrize("source, arch", BUILDS, ids=[f"{s}-sm_{a}" for s, a in BUILDS])
def test_every_instance_builds_without_spills_or_local_memory(builds, source, arch):
    result = builds[(source, arch)]
    assert result.cubin.startswith(b"\x7fELF"), "NVRTC should emit a cubin (SASS) for a real sm_ arch"
    assert f"-arch=sm_{arch}" in result.log or result.kernels, result.log
    expected = runtime.template_instances(runtime.KERNELS[source])
    assert [k.name_expression for k in result.kernels] == list(expected)
    for kernel in result.kernels:
        assert kernel.spills == 0, f"{kernel.name_expression} spills on sm_{arch}"
        assert not kernel.uses_local_memory, f"{kernel.name_expression} uses local memory on sm_{arch}"
        assert 0 < kernel.registers <= 255
        assert kernel.shared_bytes <= 48 * 1024, "static shared memory above the portable 48 KiB"


def test_tile_kernels_use_shared_memory_and_pool_kernels_none(builds):
    shared = {k.name_expression: k.shared_bytes for k in builds[("conv2d.cu", "80")].kernels}
    assert shared["conv2d_forward_direct<float>"] > 0
    assert shared["conv2d_forward_direct<double>"] == 2 * shared["conv2d_forward_direct<float>"]
    # the filter-gradient block: FILTER_TAPS accumulator rows and one bias row of REDUCE_THREADS each
    assert shared["conv2d_backward_filter_partial<float>"] == (16 + 1) * 256 * 4
    assert shared["conv2d_backward_bias_partial<float>"] == 256 * 4
    assert all(k.shared_bytes == 0 for k in builds[("pool2d.cu", "80")].kernels)


def test_check_kernels_main_passes_and_prints_the_table(builds, capsys):
    assert check.main([]) == 0
    out = capsys.readouterr().out
    from gpuconv.cuda.tools.offline import ARCHS
    builds_count = 2 * len(ARCHS) * sum(len(names) for names in runtime.KERNELS.values())
    assert "conv2d_forward_direct" in out and "sm_120" in out and f"all {builds_count} kernel builds ok" in out


def test_kernel_rows_are_data_for_the_readme(builds):
    rows = check.kernel_rows(archs=("86",), sources=["pool2d.cu"])
    assert len(rows) == 2 * len(runtime.KERNELS["pool2d.cu"])
    assert {row["dtype"] for row in rows} == {"float32", "float64"}
    assert all(row["status"] == "ok" and row["arch"] == "sm_86" for row in rows)
    table = check.format_table(rows, markdown=True)
    assert table.splitlines()[0].startswith("| kernel | dtype | arch |")


def test_warnings_are_errors(monkeypatch):
    sources = {"warns.cu": "template<typename T> __global__ void k(T* y) { int unused = 3; y[0] = T(1); }\n"}
    monkeypatch.setattr(offline, "read_source", sources.__getitem__)
    with pytest.raises(KernelError, match="unused"):
        offline.compile_offline("warns.cu", "80", ("k<float>",))
    assert offline.compile_offline("warns.cu", "80", ("k<float>",), strict=False).kernels


def test_local_memory_is_an_error(monkeypatch):
    # A runtime-indexed local array lives in local memory: the check must refuse it.
    code = ("template<typename T> __global__ void k(T* y, int i) {\n"
            "  T a[512]; for (int j = 0; j < 512; ++j) a[j] = y[j];\n"
            "  a[i] += T(1); T s = T(0); for (int j = 0; j < 512; ++j) s += a[j] * a[511 - j];\n"
            "  y[0] = s; }\n")
    monkeypatch.setattr(offline, "read_source", {"local.cu": code}.__getitem__)
    with pytest.raises(KernelError, match="[Ll]ocal memory|stack frame"):
        offline.compile_offline("local.cu", "80", ("k<float>",))
    lenient = offline.compile_offline("local.cu", "80", ("k<float>",), strict=False)
    assert lenient.kernels[0].uses_local_memory


def test_offline_compile_restores_cupys_internals():
    import cupy.cuda.compiler as cupy_compiler
    before = (cupy_compiler._get_arch_for_options_for_nvrtc, cupy_compiler.function,
              cupy_compiler._kernel_cache_backend)
    offline.compile_offline.__wrapped__("pool2d.cu", "75", ("max_pool2d_forward<float>",))
    after = (cupy_compiler._get_arch_for_options_for_nvrtc, cupy_compiler.function,
             cupy_compiler._kernel_cache_backend)
    assert all(a is b for a, b in zip(before, after))


def test_moved_private_api_is_a_loud_error(monkeypatch):
    import cupy.cuda.compiler as cupy_compiler
    monkeypatch.delattr(cupy_compiler, "_compile_module_with_cache")
    with pytest.raises(KernelError, match="_compile_module_with_cache.*cupy-cuda13x==14.2.0"):
        offline.compile_offline.__wrapped__("pool2d.cu", "75", ("max_pool2d_forward<float>",))


def test_loader_finds_the_checkouts_kernels():
    directory = runtime.kernel_dir()
    assert directory.joinpath("conv2d.cu").is_file() and directory.joinpath("pool2d.cu").is_file()
    for source, kernels in runtime.KERNELS.items():
        text = runtime.read_source(source)
        assert text.startswith("// CUDA features used")
        for name in kernels:
            assert f" {name}(" in text, f"{name} is listed in KERNELS but not defined in {source}"


def test_instance_names():
    assert runtime.instance_name("im2col", "float32") == "im2col<float>"
    assert runtime.instance_name("im2col", "float64") == "im2col<double>"
    with pytest.raises(KernelError, match="float16"):
        runtime.instance_name("im2col", "float16")
