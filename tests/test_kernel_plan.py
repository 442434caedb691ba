"""The on-paper GPU plan records the real launchers' kernels and counts FLOPs like summary()."""
from gpuconv.cuda.tools import plan
from gpuconv.ops import conv_cuda
from gpuconv.models import LeNet5


def test_plan_records_real_launches_and_restores_the_launchers():
    rows = {row["call"].split(" ")[0] + " " + row["call"].split(" ")[1]: row for row in plan.lenet_plan(batch=8)}
    assert conv_cuda.launch.__name__ == "launch" and conv_cuda.get_kernel.__name__ == "get_kernel"
    conv1 = rows["conv1 forward"]
    assert conv1["algo"] == "direct" and [l["kernel"] for l in conv1["launches"]] == ["conv2d_forward_direct"]
    assert rows["conv2 forward"]["algo"] == "im2col"
    assert "col2im" in [l["kernel"] for l in rows["conv2 backward"]["launches"]]
    assert "conv2d_backward_data_direct" not in [l["kernel"] for l in rows["conv1 backward"]["launches"]]
    for row in rows.values():
        for launch in row["launches"]:
            assert 32 <= launch["block"][0] * launch["block"][1] * launch["block"][2] <= 1024


def test_plan_forward_flops_match_the_model_summary():
    summary = {r["name"]: r["flops"] for r in LeNet5().summary((1, 1, 28, 28), print_fn=None)["layers"]}
    rows = {row["call"]: row for row in plan.lenet_plan(batch=4)}
    assert rows["conv1 forward"]["flops"] == 4 * summary["conv1"]
    assert rows["conv2 forward"]["flops"] == 4 * summary["conv2"]
    assert all(row["bound_us"] > 0 and row["bytes"] > 0 for row in rows.values())


def test_format_plan_names_every_kernel_with_its_resources():
    rows = plan.lenet_plan(batch=2)
    resources = {("conv2d_forward_direct", "sm_90"): {"registers": 40, "shared_bytes": 5184}}
    text = plan.format_plan(rows, resources, markdown=True)
    assert "conv2d_forward_direct" in text and "5184" in text and text.startswith("| call")


def test_check_kernels_without_cupy_says_so_once(monkeypatch, capsys):
    import sys
    from gpuconv.cuda.tools import check
    monkeypatch.setitem(sys.modules, "cupy.cuda.compiler", None)  # as if CuPy were not installed
    assert check.main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert "needs CuPy" in err and "gpuconv[kernel-check]" in err


def test_kernel_plan_without_cupy_explains_the_missing_resources(monkeypatch, capsys):
    import sys
    monkeypatch.setitem(sys.modules, "cupy.cuda.compiler", None)
    assert plan.main(["--batch-size", "8"]) == 0
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and "registers and shared memory are left out" in err
    assert "None" not in out and "conv2d_forward_direct" in out


def test_tile_sizes_have_one_source_the_kernel_file():
    from gpuconv.cuda import runtime
    constants = runtime.source_constants("conv2d.cu")
    names = ("TILE_R", "PIXELS_PER_THREAD", "CHANNELS_PER_THREAD", "MAX_TILE_P", "MAX_TILE_K", "REDUCE_THREADS")
    assert tuple(getattr(conv_cuda, name) for name in names) == tuple(constants[name] for name in names)
    import inspect
    source = inspect.getsource(conv_cuda)
    assert "MAX_TILE_P = 128" not in source and "must match" not in source.lower()


def test_step_plan_lists_every_launch_of_a_training_step():
    rows = plan.step_launches(batch=4)
    kinds = {row["kind"] for row in rows}
    assert kinds <= {"own", "cublas", "cupy"} and {"own", "cublas", "cupy"} <= kinds
    own = [row["what"].split(" ")[0] for row in rows if row["kind"] == "own"]
    assert own[0] == "conv2d_forward_direct" and "max_pool2d_backward" in own
    # the conv layers' own kernels are FLOP-counted from their arguments, the GEMMs from their shapes
    summary = {r["name"]: r["flops"] for r in LeNet5().summary((1, 1, 28, 28), print_fn=None)["layers"]}
    first = next(row for row in rows if row["what"].startswith("conv2d_forward_direct"))
    assert abs(first["flops"] - 4 * summary["conv1"]) <= 4 * 6 * 28 * 28  # the bias adds, or not
    assert all(row["bytes"] > 0 for row in rows)
    memory = plan.step_launches.last_memory
    assert memory["reads"] == 0 and memory["allocations"] > 0  # a step reads nothing back
    text = plan.format_step(rows, memory)
    assert f"total: {len(rows)} launches per step" in text and "0 blocking reads" in text
    # the optimizer is one launch, and no ReLU runs as a separate CuPy maximum
    assert [row["what"].split(" ")[0] for row in rows].count("sgd_update") == 1
    assert not any(row["what"] == "CuPy maximum" for row in rows)
    assert conv_cuda.launch.__name__ == "launch"  # the recorder is taken off again
