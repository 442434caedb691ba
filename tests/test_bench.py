"""`python -m gpuconv bench` end to end on the CPU with tiny repeat counts: the JSON's structure and
that every figure is positive and finite. No timing thresholds: only the shape of the results."""
import builtins
import json
import math
import sys

import numpy as np
import pytest

import gpuconv
from gpuconv import bench, optim
from gpuconv import functional as F
from gpuconv.__main__ import main as gpuconv_main
from gpuconv.bench import rows as bench_rows
from gpuconv.bench.runner import _plan
from gpuconv.bench.timing import merge, summarize, time_cpu
from gpuconv.errors import ArgumentError, CudaUnavailableError
from gpuconv.models import LeNet5
from gpuconv.nn import cpu_plan

TINY = ["--batch-sizes", "8", "--repeat", "2", "--warmup", "1", "--peak-size", "64", "--no-progress"]
TIMING_KEYS = ("first_s", "median_s", "min_s", "max_s")


def positive_finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One end-to-end run of the command (default devices cpu,cuda) with every op row."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    code = gpuconv_main(["bench", "--ops", "--json", str(path)] + TINY)
    return code, json.loads(path.read_text())


def test_cli_exit_code_and_schema(cli_run):
    code, results = cli_run
    assert code == 0
    assert results["schema"] == bench.SCHEMA
    assert results["command"].startswith("python -m gpuconv bench")
    for key in ("cpu_model", "cpu_threads", "blas", "blas_threads", "numpy_version", "date",
                "cuda_available", "cupy_version", "gpu_name", "torch_version",
                "load_average_start", "load_average_end", "git_commit", "git_dirty"):
        assert key in results["machine"], key
    assert results["machine"]["cpu_threads"] >= 1 and results["machine"]["blas_threads"] >= 1
    settings = results["settings"]
    assert settings["batch_sizes"] == [8] and settings["repeat"] == 2 and settings["warmup"] == 1
    assert set(results["definitions"]) >= {"speed_ratio_vs_torch", "first_s", "peak_share"}
    assert results["failures"] == []


def test_cli_every_row_and_figure(cli_run):
    _, results = cli_run
    cpu_rows = [r for r in results["rows"] if r["device"] == "cpu"]
    expected = {s["name"] for s in bench_rows.specs(8)} | {"train_step", "inference"}
    assert {r["name"] for r in cpu_rows} == expected
    peak = results["devices"]["cpu"]["peak"]
    assert positive_finite(peak["gflops"]) and peak["size"] == 64
    for row in cpu_rows:
        assert row["batch_size"] == 8 and positive_finite(row["flops"])
        figures = row["gpuconv"]
        assert figures["repeat"] == 2 * 2  # --repeat 2 in each of the default 2 rounds, pooled
        for key in TIMING_KEYS + ("gflops", "peak_share"):
            assert positive_finite(figures[key]), (row["name"], key, figures[key])
        assert figures["min_s"] <= figures["median_s"] <= figures["max_s"]
        assert row["speedup_vs_cpu"] == pytest.approx(1.0)
        if row["kind"] in ("step", "inference"):
            assert positive_finite(figures["images_per_s"])
            assert figures["images_per_s"] == pytest.approx(8 / figures["median_s"])
    conv1_data = next(r for r in cpu_rows if r["name"] == "conv1.backward_data")
    assert conv1_data["in_training"] is False


def test_cli_without_gpu_skips_cuda_with_the_reason(cli_run):
    if gpuconv.cuda_available():
        pytest.skip("this machine has a GPU")
    _, results = cli_run
    reason = gpuconv.backend.cuda_status()[1]
    assert results["devices"]["cuda"] == {"available": False, "reason": reason}
    assert not any(r["device"].startswith("cuda") for r in results["rows"])


def test_devices_cuda_alone_without_gpu_exits_1_with_the_reason(capsys):
    if gpuconv.cuda_available():
        pytest.skip("this machine has a GPU")
    assert gpuconv_main(["bench", "--devices", "cuda"] + TINY) == 1
    err = capsys.readouterr().err
    assert "CudaUnavailableError" in err and gpuconv.backend.cuda_status()[1] in err
    assert "--devices cpu" in err
    with pytest.raises(CudaUnavailableError):
        bench.run(devices=["cuda"], batch_sizes=[8], repeat=1, warmup=0, peak_size=0, progress=False)


def test_table_names_rows_devices_and_definitions():
    results = bench.run(devices=["cpu", "cuda"], batch_sizes=[4], inference_batch_sizes=[6], repeat=1,
                        warmup=0, peak_size=0, progress=False)
    table = bench.format_table(results)
    assert "train_step" in table and "inference" in table and "median ms" in table
    assert "torch ms" not in table  # not requested
    by_device = {}
    for row in results["rows"]:
        by_device.setdefault(row["device"].split(":")[0], []).append((row["kind"], row["batch_size"]))
    # the same rows on every device that ran: cuda's too where a GPU exists
    assert by_device.pop("cpu") == [("step", 4), ("inference", 6)]
    assert by_device == ({"cuda": [("step", 4), ("inference", 6)]} if gpuconv.cuda_available() else {})
    assert results["devices"]["cpu"]["peak"] is None
    assert all(r["gpuconv"]["peak_share"] is None for r in results["rows"])
    if not gpuconv.cuda_available():
        assert "cuda: unavailable, skipped: " + gpuconv.backend.cuda_status()[1] in table


def test_without_torch_says_so_and_goes_on(monkeypatch):
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setattr(builtins, "__import__", no_torch)
    results = bench.run(devices=["cpu"], batch_sizes=[4], repeat=1, warmup=0, peak_size=0,
                        compare_torch=True, progress=False)
    assert results["torch"]["requested"] and not results["torch"]["available"]
    assert "not installed" in results["torch"]["reason"]
    assert all(r["torch"] is None and r["speed_ratio_vs_torch"] is None for r in results["rows"])
    assert all(positive_finite(r["gpuconv"]["median_s"]) for r in results["rows"])
    assert "PyTorch comparison skipped: PyTorch is not installed" in bench.format_table(results)


def test_with_torch_every_row_has_a_ratio(tmp_path):
    torch = pytest.importorskip("torch")
    results = bench.run(devices=["cpu"], batch_sizes=[4], ops=True, repeat=1, warmup=0, peak_size=32,
                        compare_torch=True, progress=False)
    assert results["torch"]["available"] and results["torch"]["threads"] == torch.get_num_threads()
    assert positive_finite(results["devices"]["cpu"]["torch_peak"]["gflops"])
    for row in results["rows"]:
        assert positive_finite(row["torch"]["median_s"]), row["name"]
        assert row["speed_ratio_vs_torch"] == pytest.approx(row["torch"]["median_s"] / row["gpuconv"]["median_s"])
    assert "torch/ours" in bench.format_table(results)
    bench.write_json(results, tmp_path / "t.json")  # JSON-serialisable with torch figures too


def test_plot_writes_a_png_that_decodes(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    path = tmp_path / "bench.png"
    results = bench.run(devices=["cpu"], batch_sizes=[4], ops=True, repeat=1, warmup=0, peak_size=0,
                        progress=False)
    bench.plot_results(results, path)
    image = plt.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_plot_without_matplotlib_names_the_extra_before_measuring(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    monkeypatch.setattr(bench, "run", lambda **kwargs: pytest.fail("measured although --plot cannot work"))
    path = tmp_path / "bench.png"
    assert gpuconv_main(["bench", "--devices", "cpu", "--plot", str(path)] + TINY) == 1
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install 'gpuconv[plot]'" in err
    assert not path.exists()
    with pytest.raises(ImportError, match=r"gpuconv\[plot\]"):
        bench.plot_results({}, path)


@pytest.mark.parametrize("kwargs", [dict(repeat=0), dict(warmup=-1), dict(batch_sizes=[0]),
                                    dict(algos=["winograd"]), dict(peak_size=-1), dict(devices=[])])
def test_run_rejects_bad_settings(kwargs):
    settings = dict(devices=["cpu"], batch_sizes=[4], repeat=1, warmup=0, peak_size=0, progress=False)
    with pytest.raises(ArgumentError):
        bench.run(**dict(settings, **kwargs))


def test_cli_rejects_a_bad_batch_list(capsys):
    with pytest.raises(SystemExit) as exc:
        gpuconv_main(["bench", "--batch-sizes", "64,abc"])
    assert exc.value.code == 2 and "comma-separated ints" in capsys.readouterr().err


def test_flop_counts_match_the_model_summary():
    per_image = sum(layer["flops"] for layer in LeNet5().summary(print_fn=None)["layers"])
    # the summary counts a bias add per output; the bench leaves biases out: within 2%
    assert bench_rows.forward_flops(1) == pytest.approx(per_image, rel=0.02)
    conv1 = next(s for s in bench_rows.specs(3) if s["name"] == "conv1.forward")
    assert conv1["flops"] == 2 * 3 * 6 * 28 * 28 * 25
    assert bench_rows.step_flops(1) > 2.5 * bench_rows.forward_flops(1)


def test_step_inference_and_loss_rows_run_what_training_runs():
    """The train_step row is the trainer's step (gpuconv.compile's CPU executor, loss.backward(),
    SGD) with an eager autograd step's result; the loss row is the pair F.cross_entropy calls."""
    rows = bench_rows.GpuconvRows(gpuconv.parse_device("cpu"), 8)
    assert rows.net.uses_executor(rows.x)
    reference = LeNet5(seed=0)
    reference_optimizer = optim.SGD(reference.parameters(), lr=0.01, momentum=0.9)
    loss = F.cross_entropy(reference(rows.x), rows.labels)
    reference_optimizer.zero_grad()
    loss.backward()
    reference_optimizer.step()
    assert rows.step("auto")() == pytest.approx(loss.item(), rel=1e-5)
    for (name, p), q in zip(rows.model.named_parameters(), reference.parameters()):
        np.testing.assert_allclose(p.data, q.data, rtol=1e-5, atol=1e-7, err_msg=name)
    logits = rows.inference("auto")()
    assert not logits.requires_grad and logits.shape == (8, 10)
    value, dlogits = rows.op("loss.forward_backward", "auto")()
    leaf = gpuconv.tensor(rows.logits, requires_grad=True)
    loss = F.cross_entropy(leaf, rows.labels)
    loss.backward()
    assert isinstance(value, float) and value == pytest.approx(loss.item(), rel=1e-6)
    np.testing.assert_allclose(dlogits, leaf.grad, rtol=1e-6)


def test_eager_rows_run_the_uncompiled_model(monkeypatch):
    rows = bench_rows.GpuconvRows(gpuconv.parse_device("cpu"), 8, compiled=False)
    assert rows.net is rows.model
    compiled = []
    monkeypatch.setattr(bench_rows, "compile_model", lambda model: compiled.append(model) or model)
    results = bench.run(devices=["cpu"], batch_sizes=[4], repeat=1, warmup=0, peak_size=0, rounds=1,
                        progress=False, compiled=False)
    assert not compiled and results["settings"]["compiled"] is False
    assert all(positive_finite(r["gpuconv"]["median_s"]) for r in results["rows"])
    assert "eagerly op by op (--eager)" in bench.format_table(results)
    bench.run(devices=["cpu"], batch_sizes=[4], repeat=1, warmup=0, peak_size=0, rounds=1, progress=False)
    assert len(compiled) == 1  # the default compiles, as the trainer does


def test_time_cpu_reports_first_call_apart():
    calls = []
    figures = time_cpu(lambda: calls.append(1), repeat=3, warmup=2)
    assert len(calls) == 1 + 2 + 3 and figures["repeat"] == 3
    assert summarize([3.0, 1.0, 2.0], first_s=9.0) == dict(first_s=9.0, median_s=2.0, min_s=1.0,
                                                           max_s=3.0, repeat=3, times=[3.0, 1.0, 2.0])
    assert np.isfinite(figures["median_s"])


@pytest.mark.gpu
def test_cuda_rows_end_to_end(tmp_path):
    path = tmp_path / "bench.json"
    assert gpuconv_main(["bench", "--devices", "cpu,cuda", "--ops", "--json", str(path)] + TINY) == 0
    results = json.loads(path.read_text())
    cuda_rows = [r for r in results["rows"] if r["device"].startswith("cuda")]
    assert results["machine"]["gpu_name"] and cuda_rows
    assert {r["algo"] for r in cuda_rows if r["kind"] != "op" or r["layer"].startswith("conv")} == {"direct", "im2col"}
    for row in cuda_rows:
        for key in TIMING_KEYS + ("gflops", "peak_share"):
            assert positive_finite(row["gpuconv"][key]), (row["name"], key)
        assert positive_finite(row["speedup_vs_cpu"])


def test_threads_sets_numpy_blas_for_the_run_and_restores_it():
    from gpuconv.bench.machine import blas_threads, set_blas_threads
    if not set_blas_threads(blas_threads()[0]):
        pytest.skip("NumPy's BLAS here is not an OpenBLAS whose threads can be set from Python")
    before = blas_threads()[0]
    results = bench.run(devices=["cpu"], batch_sizes=[4], repeat=1, warmup=0, peak_size=0, threads=1,
                        progress=False)
    assert results["settings"]["threads"] == 1 and results["machine"]["blas_threads"] == 1
    assert results["settings"]["cpu_workers"] == 0  # the CPU executor on the same one thread
    assert blas_threads()[0] == before
    with pytest.raises(ArgumentError):
        bench.run(devices=["cpu"], batch_sizes=[4], repeat=1, warmup=0, peak_size=0, threads=0)


def test_the_executor_runs_on_the_runs_threads_and_is_restored(monkeypatch):
    monkeypatch.setattr(cpu_plan, "_worker_count", None)
    monkeypatch.setenv("GPUCONV_CPU_WORKERS", "5")
    seen = []
    for row in ("step", "inference"):
        monkeypatch.setattr(bench_rows.GpuconvRows, row,
                            lambda self, algo: lambda: seen.append(cpu_plan.get_cpu_workers()))
    results = bench.run(devices=["cpu"], batch_sizes=[4], repeat=1, warmup=0, peak_size=0, rounds=1,
                        progress=False)
    threads = results["settings"]["threads"]
    assert seen and set(seen) == {threads - 1} and results["settings"]["cpu_workers"] == threads - 1
    assert "executor on " + ("1 thread" if threads == 1 else f"{threads} threads") in bench.format_table(results)
    assert cpu_plan._worker_count is None and cpu_plan.get_cpu_workers() == 5  # as it was
    cpu_plan.set_cpu_workers(3)
    bench.run(devices=["cpu"], batch_sizes=[4], repeat=1, warmup=0, peak_size=0, rounds=1, progress=False)
    assert cpu_plan._worker_count == 3


def test_rounds_alternate_which_library_goes_first_and_pool_every_call():
    cpu = gpuconv.parse_device("cpu")
    first = _plan([cpu], [8], [8], ["direct"], False, 0, True)
    second = _plan([cpu], [8], [8], ["direct"], False, 0, True, torch_first=True)
    assert [step[0] for step in first] == ["gpuconv", "gpuconv", "torch", "torch"]
    assert [step[0] for step in second] == ["torch", "torch", "gpuconv", "gpuconv"]
    pooled = merge([summarize([1.0, 5.0], 9.0), summarize([2.0, 3.0], 7.0)])
    assert pooled["repeat"] == 4 and pooled["median_s"] == 2.5 and pooled["first_s"] == 9.0
    with pytest.raises(ArgumentError, match="rounds"):
        bench.run(devices=["cpu"], rounds=0)


@pytest.mark.parametrize("compiled", [True, False])
def test_table_says_op_rows_run_layer_by_layer_and_the_step_is_compiled(compiled):
    results = bench.run(devices=["cpu"], batch_sizes=[2], ops=True, repeat=1, warmup=0, peak_size=0, rounds=1,
                        progress=False, compiled=compiled)
    table = bench.format_table(results)
    assert "op rows run layer by layer (eager" in table
    assert ("train_step is the compiled step" in table) == compiled
    without_ops = bench.format_table(bench.run(devices=["cpu"], batch_sizes=[2], repeat=1, warmup=0, peak_size=0,
                                               rounds=1, progress=False, compiled=compiled))
    assert "op rows" not in without_ops
