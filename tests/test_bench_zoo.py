"""The bench's rows beyond LeNet-5: zoo models, conv ops at users' shapes, the BLAS core, the peak
memory of a step. Most run without PyTorch (as in CI); the PyTorch equivalence tests skip only where
torch cannot be imported. No timing thresholds: the shape of the results and what the rows compute."""
import ctypes.util
import json
import math
import types

import numpy as np
import pytest

import gpuconv
from gpuconv import bench
from gpuconv.__main__ import main as gpuconv_main
from gpuconv.autograd import no_grad
from gpuconv.bench import machine, memory, zoo
from gpuconv.bench.runner import _plan
from gpuconv.errors import ArgumentError
from gpuconv.models import RESNET_DEPTHS

QUICK = dict(devices=["cpu"], repeat=1, warmup=0, peak_size=0, rounds=1, progress=False)


def positive_finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


# ---------------------------------------------------------------------------------------------
# row specs


def test_check_models_defaults_and_errors():
    assert zoo.check_models(["lenet5"]) == [("lenet5", "mnist")]
    assert zoo.check_models("resnet20,simplecnn") == [("resnet20", "cifar10"), ("simplecnn", "fashion-mnist")]
    assert zoo.check_models(["lenet5", "resnet8"], "cifar10") == [("lenet5", "cifar10"), ("resnet8", "cifar10")]
    assert zoo.check_models(["none"]) == [] and zoo.check_models([]) == []
    with pytest.raises(ArgumentError, match=r"models: expected names from .*resnet20.* got \['vgg16'\]"):
        zoo.check_models(["lenet5", "vgg16"])
    with pytest.raises(ArgumentError, match="each model at most once"):
        zoo.check_models(["resnet8", "resnet8"])
    with pytest.raises(ArgumentError, match="dataset: expected one of mnist, fashion-mnist, cifar10"):
        zoo.check_models(["resnet8"], "imagenet")


def test_model_specs_names_and_flops():
    assert zoo.row_prefix("lenet5", "mnist") == "" and zoo.row_prefix("lenet5", "cifar10") == "lenet5."
    step, infer = zoo.model_specs("resnet20", "cifar10", 4)
    assert (step["name"], infer["name"]) == ("resnet20.train_step", "resnet20.inference")
    assert (step["kind"], infer["kind"]) == ("step", "inference") and step["source"] == ("zoo", "resnet20", "cifar10")
    per_image = gpuconv.models.build_model("resnet20", 3, 10, 32).summary((1, 3, 32, 32), print_fn=None)["total_flops"]
    assert infer["flops"] == 4 * per_image and step["flops"] == 3 * infer["flops"]
    assert "ResNet-20 on 3x32x32 (cifar10)" in step["text"]


def test_conv_specs_cover_lenet_and_resnet20_shapes():
    specs = zoo.conv_specs(128)
    shapes = zoo.conv_shapes()
    assert len(specs) == 3 * len(shapes) == 24
    assert {"c1-6k5s1@28", "c6-16k5s1@14", "c16-16k3s1@32", "c16-32k3s2@32", "c32-32k3s1@16", "c32-64k3s2@16",
            "c64-64k3s1@8"} <= set(shapes)
    assert shapes["c16-32k3s2@32"]["hw_out"] == 16 and shapes["c32-64k3s2@16"]["hw_out"] == 8
    assert shapes["c6-16k5s1@14"]["hw_out"] == 10 and shapes["c1-6k5s1@28"]["hw_out"] == 28
    by_name = {s["name"]: s for s in specs}
    assert by_name["c16-32k3s2@32.forward"]["flops"] == 2 * 128 * 32 * 16 * 16 * 16 * 9
    not_in_training = {s["name"] for s in specs if not s["in_training"]}
    assert not_in_training == {"c1-6k5s1@28.backward_data", "c3-16k3s1@32.backward_data"}
    # every ResNet-20 conv shape is in the list (the stem and each stage's two kinds of conv)
    model = gpuconv.models.build_model("resnet20", 3, 10, 32)
    side, seen = 32, set()
    for stage in (model.layer1, model.layer2, model.layer3):
        for _, block in stage.named_children():
            for conv in (block.conv1, block.conv2):
                o, c, k, _ = conv.weight.data.shape
                seen.add(zoo.conv_label(c, o, k, conv.stride[0], side))
                side //= conv.stride[0]
    assert seen <= set(shapes), seen - set(shapes)


def test_conv_rows_compute_the_reference_conv():
    """Each row computes what it says: forward against an einsum over the padded windows; the
    backward rows are gpuconv's gradients (checked elsewhere) with only the asked parts."""
    rows = zoo.ConvRows(gpuconv.parse_device("cpu"), 2)
    label = "c16-32k3s2@32"
    x, w, b, dy = rows._arrays(label)
    y = rows.op(f"{label}.forward", "auto")()
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))[:, :, ::2, ::2]
    np.testing.assert_allclose(y, np.einsum("nchwij,ocij->nohw", windows, w), rtol=1e-4, atol=1e-4)
    dx, dw, db = rows.op(f"{label}.backward_data", "auto")()
    assert dx.shape == x.shape and dw is None and db is None
    dx, dw, db = rows.op(f"{label}.backward_filter", "auto")()
    assert dx is None and dw.shape == w.shape and db is None  # ResNet convs have no bias
    _, _, db = rows.op("c6-16k5s1@14.backward_filter", "auto")()
    assert db.shape == (16,)  # LeNet's have one


def test_geometric_mean_and_per_op_groups():
    assert zoo.geometric_mean([2.0, 8.0]) == pytest.approx(4.0)
    assert zoo.geometric_mean([0.5, 2.0, 1.0]) == pytest.approx(1.0)
    assert zoo.geometric_mean([]) is None and zoo.geometric_mean([1.0, -1.0]) is None
    assert zoo.geometric_mean([1.0, float("nan")]) is None

    def row(op, ratio, in_training=True, batch=8, kind="conv_op"):
        return dict(kind=kind, op=op, device="cpu", batch_size=batch, in_training=in_training,
                    speed_ratio_vs_torch=ratio)
    rows = [row("forward", 2.0), row("forward", 0.5), row("backward_data", 4.0), row("backward_data", 100.0, False),
            row("backward_filter", 1.0), row("forward", None), row("forward", 9.0, kind="op"),
            row("forward", 3.0, batch=16)]
    got = {(g["batch_size"], g["op"]): (g["geomean"], g["rows"]) for g in zoo.conv_geomeans(rows)}
    assert got[(8, "forward")] == (pytest.approx(1.0), 2)
    assert got[(8, "backward_data")] == (pytest.approx(4.0), 1)  # the row never run in training is left out
    assert got[(8, "all")] == (pytest.approx((2.0 * 0.5 * 4.0 * 1.0) ** 0.25), 4)
    assert got[(16, "all")] == (pytest.approx(3.0), 1)


def test_plan_orders_conv_rows_and_models():
    cpu = gpuconv.parse_device("cpu")
    plan = _plan([cpu], [8], [8], ["direct"], False, 0, True, models=[("lenet5", "mnist"), ("resnet8", "cifar10")],
                 conv_ops=True)
    ours = [step[3]["name"] for step in plan if step[0] == "gpuconv"]
    assert ours[:24] == [s["name"] for s in zoo.conv_specs(8)]
    assert ours[24:] == ["train_step", "resnet8.train_step", "inference", "resnet8.inference"]
    assert [step[3]["name"] for step in plan if step[0] == "torch"] == ours  # PyTorch times the same rows


# ---------------------------------------------------------------------------------------------
# the BLAS kernel


def test_blas_core_falls_back_to_unknown():
    assert machine.blas_core(paths=[]) == "unknown"
    assert machine.blas_core(paths=["/nonexistent/libopenblas.so"]) == "unknown"
    libc = ctypes.util.find_library("c")
    if libc:
        assert machine.blas_core(paths=[libc]) == "unknown"  # a library without the function
        assert machine.blas_config(paths=[libc]) == "unknown"


def test_blas_core_of_numpys_openblas_is_in_its_config():
    if not gpuconv.blas.available():
        pytest.skip("NumPy's BLAS here is not an OpenBLAS")
    core, config = machine.blas_core(), machine.blas_config()
    assert core != "unknown" and core and config.startswith("OpenBLAS")
    if "DYNAMIC_ARCH" in config:
        assert core.lower() in config.lower()


def test_machine_records_the_blas_environment(monkeypatch):
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    monkeypatch.delenv("OPENBLAS_L2_SIZE", raising=False)
    info = machine.machine_info()
    assert info["blas_environment"]["OPENBLAS_CORETYPE"] == "Haswell"
    assert info["blas_environment"]["OPENBLAS_L2_SIZE"] is None
    results = dict(machine=dict(info, load_average_start=None, load_average_end=None), torch=dict(available=False))
    line = bench.machine_line(results)
    assert f"core {info['blas_core']}, set by OPENBLAS_CORETYPE=Haswell" in line
    del results["machine"]["blas_core"]  # a JSON from before the core was recorded still prints
    assert "core" not in bench.machine_line(results)


def test_torch_blas_info_parses_the_config_and_fails_soft():
    shown = ("PyTorch built with:\n  - Intel(R) oneAPI Math Kernel Library Version 2024.2-Product Build 2024\n"
             "  - Intel(R) MKL-DNN v3.12.0 (Git Hash 80af)\n  - CPU capability usage: AVX2\n"
             "  - Build settings: BLAS_INFO=mkl, BUILD_TYPE=Release, LAPACK_INFO=mkl\n")
    fake = types.SimpleNamespace(__config__=types.SimpleNamespace(show=lambda: shown), backends=None)
    assert machine.torch_blas_info(fake) == dict(blas_info="mkl", mkl_version="2024.2-Product",
                                                 onednn_version="3.12.0", onednn_available=None, cpu_capability="AVX2")

    def broken():
        raise RuntimeError("no config")
    bare = types.SimpleNamespace(__config__=types.SimpleNamespace(show=broken), backends=None)
    assert set(machine.torch_blas_info(bare).values()) == {"unknown", None}


# ---------------------------------------------------------------------------------------------
# runs without PyTorch


def test_run_zoo_and_conv_rows_without_torch():
    results = bench.run(batch_sizes=[2], models=["lenet5", "resnet8"], dataset="fashion-mnist", conv_ops=True, **QUICK)
    names = [r["name"] for r in results["rows"]]
    assert names == [s["name"] for s in zoo.conv_specs(2)] + ["lenet5.train_step", "resnet8.train_step",
                                                              "lenet5.inference", "resnet8.inference"]
    for row in results["rows"]:
        assert positive_finite(row["gpuconv"]["median_s"]) and row["torch"] is None, row["name"]
    by_name = {r["name"]: r for r in results["rows"]}
    assert by_name["resnet8.train_step"]["executor"] is True  # BatchNorm in training mode lowers too
    assert by_name["resnet8.inference"]["executor"] is True  # eval mode: residual blocks and BatchNorm lower
    assert by_name["lenet5.train_step"]["executor"] is True
    resnet_step = by_name["resnet8.train_step"]
    assert resnet_step["dataset"] == "fashion-mnist" and "1x28x28" in resnet_step["text"]
    assert results["settings"]["models"] == [dict(model="lenet5", dataset="fashion-mnist", title="LeNet-5"),
                                             dict(model="resnet8", dataset="fashion-mnist", title="ResNet-8")]
    assert results["conv_geomeans"] == []  # no PyTorch: no ratios
    table = bench.format_table(results)
    assert "cannot lower" not in table and "c16-32k3s2@32.backward_filter" in table  # every row lowered
    assert "c1-6k5s1@28.backward_data *" in table
    json.dumps(results)


def test_lenet_on_mnist_keeps_its_row_names():
    results = bench.run(batch_sizes=[2], **QUICK)
    assert [r["name"] for r in results["rows"]] == ["train_step", "inference"]
    assert all(r["model"] == "lenet5" and r["dataset"] == "mnist" for r in results["rows"])


def test_model_step_row_trains_the_model():
    rows = zoo.ZooRows(gpuconv.parse_device("cpu"), "resnet8", "cifar10", 4)
    before = rows.model.state_dict()
    loss = rows.step("auto")()
    assert isinstance(loss, float) and math.isfinite(loss)
    after = rows.model.state_dict()
    assert not np.array_equal(before["conv1.weight"], after["conv1.weight"])
    assert after["bn1.num_batches_tracked"] == before["bn1.num_batches_tracked"] + 1
    logits = rows.inference("auto")()
    assert logits.shape == (4, 10) and not rows.model.training  # inference runs in eval mode
    rows.step("auto")()
    assert rows.model.training


@pytest.mark.parametrize("kwargs, match", [
    (dict(models=["vgg"]), "models: expected names"),
    (dict(models=[]), "nothing to measure"),
    (dict(models="none", conv_ops=True, memory=True), "memory: measures the models"),
    (dict(memory_steps=0), "memory_steps: expected an int >= 1"),
    (dict(dataset="svhn"), "dataset: expected one of"),
])
def test_run_rejects_bad_zoo_settings(kwargs, match):
    with pytest.raises(ArgumentError, match=match):
        bench.run(**dict(QUICK, batch_sizes=[2], **kwargs))


def test_cli_names_a_bad_model_and_dataset(capsys):
    assert gpuconv_main(["bench", "--devices", "cpu", "--model", "resnet21", "--no-progress"]) == 1
    assert "models: expected names from" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        gpuconv_main(["bench", "--dataset", "svhn"])
    assert exc.value.code == 2 and "--dataset" in capsys.readouterr().err


def test_memory_counts_the_executor_workers():
    """LeNet-5 at batch 48 on 2 threads runs its second half in a worker process: the figure holds it."""
    figures = memory.step_memory("gpuconv", "lenet5", "mnist", 48, threads=2, steps=2)
    assert figures["executor"] is True and len(figures["workers"]) == 1
    worker = figures["workers"][0]
    assert 0 < worker["counted_bytes"] == worker["hwm_bytes"] - worker["shmem_bytes"]
    assert figures["peak_rss_bytes"] == figures["process_peak_bytes"] + worker["counted_bytes"]
    assert figures["step_bytes"] == figures["peak_rss_bytes"] - figures["base_rss_bytes"] > 0
    with pytest.raises(ArgumentError, match="framework: expected one of"):
        memory.step_memory("jax", "lenet5", "mnist", 2, threads=1)


def test_memory_rows_in_the_run_and_table():
    results = bench.run(batch_sizes=[2], models=["resnet8"], memory=True, memory_steps=1, threads=1, **QUICK)
    row = results["rows"][0]
    assert row["name"] == "resnet8.train_step" and set(row["memory"]) == {"gpuconv"}
    figures = row["memory"]["gpuconv"]
    assert figures["workers"] == [] and figures["executor"] is True and positive_finite(figures["step_bytes"])
    assert "inference" not in [r["name"] for r in results["rows"] if r.get("memory")]
    assert "batch 2 resnet8.train_step: gpuconv" in bench.format_table(results)
    assert results["settings"]["memory"] is True and results["failures"] == []


def test_proc_status_and_reset_peak():
    status = memory.proc_status()
    if not status:
        pytest.skip("no /proc/self/status here")
    assert status["VmHWM"] >= status["VmRSS"] > 0
    assert memory.proc_status(2 ** 30) == {}  # no such process: no figures, no exception


# ---------------------------------------------------------------------------------------------
# PyTorch's side (skipped only where torch cannot be imported)


@pytest.mark.parametrize("model, dataset", [("lenet5", "mnist"), ("lenet5", "cifar10"),
                                            ("simplecnn", "fashion-mnist"), ("resnet8", "cifar10"),
                                            (f"resnet{RESNET_DEPTHS[2]}", "cifar10"), ("inception", "cifar10"),
                                            ("inception", "mnist")])
def test_torch_model_matches_gpuconv_on_the_same_weights(model, dataset):
    torch = pytest.importorskip("torch")
    from gpuconv.bench.torch_rows import torch_model_like
    ours = zoo.build(model, dataset, seed=3)
    theirs = torch_model_like(torch, ours)
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.data.size for p in ours.parameters())
    x, _ = zoo.random_batch(dataset, 3, 1)
    for training in (True, False):  # batch statistics, then the running ones the first pass updated
        ours.train(training)
        theirs.train(training)
        with no_grad():
            a = ours(x).data
        with torch.no_grad():
            b = theirs(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(a).max())


def test_torch_conv_rows_compute_what_gpuconvs_do():
    torch = pytest.importorskip("torch")
    from gpuconv.bench.torch_rows import TorchConvRows
    cpu = gpuconv.parse_device("cpu")
    ours, theirs = zoo.ConvRows(cpu, 2), TorchConvRows(torch, cpu, 2)
    for spec in zoo.conv_specs(2):
        a = ours.op(spec["name"], "auto")()
        b = theirs.op(spec["name"])()
        a, b = ([a] if spec["op"] == "forward" else list(a)), ([b] if spec["op"] == "forward" else list(b))
        assert [x is None for x in a] == [x is None for x in b], spec["name"]
        for x, y in zip(a, b):
            if x is not None:
                np.testing.assert_allclose(x, y.numpy(), rtol=1e-4, atol=1e-4 * float(np.abs(x).max()),
                                           err_msg=spec["name"])


def test_with_torch_conv_geomeans_and_memory():
    pytest.importorskip("torch")
    results = bench.run(batch_sizes=[2], models=["resnet8"], conv_ops=True, compare_torch=True, memory=True,
                        memory_steps=1, threads=1, **QUICK)
    means = {g["op"]: g for g in results["conv_geomeans"]}
    assert set(means) == {"forward", "backward_data", "backward_filter", "all"} and means["all"]["rows"] == 22
    ratios = [r["speed_ratio_vs_torch"] for r in results["rows"] if r["kind"] == "conv_op" and r["in_training"]]
    assert means["all"]["geomean"] == pytest.approx(zoo.geometric_mean(ratios))
    row = next(r for r in results["rows"] if r["name"] == "resnet8.train_step")
    assert positive_finite(row["memory"]["torch"]["step_bytes"]) and row["memory"]["torch"]["workers"] == []
    table = bench.format_table(results)
    assert "geometric mean of torch/ours" in table and "PyTorch" in table.split("resnet8.train_step: ")[-1]
    assert results["torch"]["blas_info"] != "" and "cpu_capability" in results["torch"]


def test_table_notes_name_the_rows_that_ran_eagerly():
    rows = [dict(name="net.train_step", model="net", executor=False, device="cpu"),
            dict(name="net.inference", model="net", executor=True, device="cpu")]
    notes = zoo.table_notes(dict(rows=rows, settings=dict(compiled=True)))
    assert any(note.startswith("net.train_step: gpuconv.compile cannot lower the model") and
               "unsupported says why" in note for note in notes), notes
    assert not any("net.inference" in note for note in notes)
