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
