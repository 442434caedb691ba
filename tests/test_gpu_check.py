"""`python -m gpuconv gpu-check` without a GPU: one line and a nonzero exit; its plan puts the three
likeliest failures first; the runner times each check, reports failures and skips as rows, and
stops at its budget."""
import pytest

import gpuconv
from gpuconv.__main__ import main as gpuconv_main
from gpuconv.cuda.tools import gpu_check


def test_without_a_gpu_it_says_so_in_one_line_and_exits_nonzero(capsys):
    if gpuconv.cuda_available():
        pytest.skip("this machine has a GPU")
    assert gpuconv_main(["gpu-check"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("gpu-check: no CUDA GPU here") and gpuconv.backend.cuda_status()[1] in err


def test_the_likeliest_failures_run_first(capsys):
    names = [check.name for check in gpu_check.plan()]
    assert names[:3] == ["kernels load", "training step", "conv vs NumPy"]
    assert set(names[3:]) == {"gpu tests", "bench", "LeNet-5 epoch"}
    assert gpuconv_main(["gpu-check", "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].startswith("1. kernels load") and len(listed) == len(names)
    assert "CUDA_LAUNCH_BLOCKING=1" in listed[1]


def test_the_runner_reports_each_check_and_keeps_to_its_budget():
    now = [0.0]

    def clock():
        return now[0]

    def slow(seconds, detail="ok"):
        def run(remaining):
            now[0] += seconds
            return detail
        return run

    def failing(remaining):
        now[0] += 1
        raise RuntimeError("illegal address in conv2d (direct)")

    def skipped(remaining):
        raise gpu_check.Skip("MNIST not found")

    checks = [gpu_check.Check("a", "", slow(2)), gpu_check.Check("b", "", failing),
              gpu_check.Check("c", "", skipped), gpu_check.Check("d", "", slow(10)),
              gpu_check.Check("e", "", slow(1))]
    rows = gpu_check.run_checks(checks, budget_s=12, clock=clock)
    assert [(r["check"], r["result"]) for r in rows] == [
        ("a", "passed"), ("b", "FAILED"), ("c", "skipped"), ("d", "passed"), ("e", "skipped")]
    assert rows[0]["seconds"] == 2 and "illegal address" in rows[1]["detail"] and "budget" in rows[4]["detail"]
    table = gpu_check.format_rows(rows)
    assert table.splitlines()[0].split() == ["check", "result", "seconds", "detail"] and "FAILED" in table


def test_the_conv_check_runs_on_an_emulated_gpu():
    """The check's own code (device moves, both algorithms, the comparison) run through the kernel
    emulator on a pretend GPU, so its first real run is not its first run."""
    from gpuconv.cuda import emulation
    with emulation(devices=1):
        detail = gpu_check._conv_against_numpy(60.0)
    assert detail.startswith("direct and im2col, 3 shapes") and "max error" in detail
