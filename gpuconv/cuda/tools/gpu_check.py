"""`python -m gpuconv gpu-check`: the first run on a real GPU, validated in one command.

Nothing in gpuconv's test suite runs a GPU unless one is there, so the first GPU it meets should
answer, in a few minutes, whether the whole path works. The checks run in this order, the three
likeliest to fail first, each timed, and one table sums them up:

  1. kernels load       compile and load every kernel instance for this GPU's architecture
  2. training step      one full LeNet-5 step on cuda in a fresh process with CUDA_LAUNCH_BLOCKING=1
                        and GPUCONV_SYNC=1, so a fault names the op that caused it
  3. conv vs NumPy      both conv algorithms (direct, im2col), forward and backward, against NumPy
  4. gpu tests          the gpu-marked tests of the checkout (pytest -m gpu)
  5. bench              the bench's cuda rows against the cpu rows (and PyTorch CUDA if installed)
  6. LeNet-5 epoch      one epoch of MNIST training on cuda

Later checks are skipped once the run passes its time budget (5 minutes by default). On a machine
without a GPU it says so in one line and exits 1: nothing there can be checked.
"""
import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BUDGET_S = 300.0


class Skip(Exception):
    """A check that cannot run here (no tests folder, no MNIST, ...): reported, not failed."""


@dataclasses.dataclass
class Check:
    name: str
    what: str
    run: object  # callable(remaining_seconds) -> detail text; raises on failure, Skip to skip


def _kernels_load(remaining):
    import cupy
    from ..runtime import KERNELS, get_kernel
    count = 0
    for source, names in KERNELS.items():
        for name in names:
            for dtype in ("float32", "float64"):
                kernel = get_kernel(source, name, dtype)
                kernel.kernel  # RawKernel compiles and loads its module on the current device here
                count += 1
    return f"{count} kernel instances loaded for sm_{cupy.cuda.Device().compute_capability}"


ONE_STEP = """
import json, numpy as np, gpuconv
from gpuconv import functional as F, optim
from gpuconv.models import LeNet5
model = LeNet5(seed=0).to("cuda")
opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
rng = np.random.default_rng(0)
x = gpuconv.to_device(rng.random((64, 1, 28, 28), dtype=np.float32), "cuda")
y = gpuconv.to_device(rng.integers(0, 10, 64), "cuda")
before = model.state_dict()
loss = F.cross_entropy(model(x), y)
opt.zero_grad(); loss.backward(); opt.step()
after = model.state_dict()
changed = sum(not np.array_equal(before[k], after[k]) for k in before)
print(json.dumps({"loss": loss.item(), "changed": changed, "tensors": len(before)}))
"""


def _training_step(remaining):
    # A fresh process: CUDA_LAUNCH_BLOCKING only takes effect before CUDA is initialised.
    package_parent = str(Path(__file__).resolve().parents[3])  # this gpuconv, installed or a checkout
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1", GPUCONV_SYNC="1",
               PYTHONPATH=os.pathsep.join(filter(None, (package_parent, os.environ.get("PYTHONPATH")))))
    result = subprocess.run([sys.executable, "-c", ONE_STEP], env=env, capture_output=True, text=True,
                            timeout=max(30.0, min(remaining, 180.0)))
    if result.returncode:
        raise RuntimeError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else
                           f"exit status {result.returncode}")
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    if not np.isfinite(outcome["loss"]) or outcome["changed"] != outcome["tensors"]:
        raise RuntimeError(f"loss {outcome['loss']}, {outcome['changed']} of {outcome['tensors']} tensors updated")
    return f"loss {outcome['loss']:.4f}, every parameter updated, no fault with launches blocking"


# LeNet-5's two convolutions plus one with groups, stride and dilation.
CONV_CASES = [((16, 1, 28, 28), (6, 1, 5, 5), 1, 2, 1, 1),
              ((16, 6, 14, 14), (16, 6, 5, 5), 1, 0, 1, 1),
              ((4, 6, 11, 9), (12, 3, 3, 3), 2, 1, 2, 2)]


def _conv_against_numpy(remaining):
    from ... import ops, to_device
    rng = np.random.default_rng(0)
    worst = 0.0
    for x_shape, w_shape, stride, padding, dilation, groups in CONV_CASES:
        x = rng.standard_normal(x_shape).astype(np.float32)
        w = rng.standard_normal(w_shape).astype(np.float32)
        b = rng.standard_normal(w_shape[0]).astype(np.float32)
        args = (stride, padding, dilation, groups)
        y = ops.conv2d(x, w, b, *args)
        dy = rng.standard_normal(y.shape).astype(np.float32)
        expected = (y,) + ops.conv2d_backward(dy, x, w, *args)
        gx, gw, gb, gdy = (to_device(a, "cuda") for a in (x, w, b, dy))
        for algo in ("direct", "im2col"):
            got = (ops.conv2d(gx, gw, gb, *args, algo=algo),) + ops.conv2d_backward(gdy, gx, gw, *args, algo=algo)
            for name, a, e in zip(("y", "dx", "dw", "db"), got, expected):
                a = to_device(a, "cpu")
                scale = max(1.0, float(np.abs(e).max()))
                error = float(np.abs(a - e).max()) / scale
                worst = max(worst, error)
                if error > 1e-4:
                    raise RuntimeError(f"{algo} {name} for x {x_shape}, w {w_shape}: max error {error:.2e} "
                                       "relative to the largest value (limit 1e-4)")
    return f"direct and im2col, {len(CONV_CASES)} shapes, forward and backward: max error {worst:.1e}"


def _checkout_tests():
    tests = Path(__file__).resolve().parents[3] / "tests"
    if not (tests / "conftest.py").is_file():
        raise Skip("no tests folder here (an installed package); run gpu-check from a checkout")
    return tests


def _gpu_tests(remaining):
    tests = _checkout_tests()
    try:
        import pytest  # noqa: F401
    except ImportError:
        raise Skip("pytest is not installed: pip install 'gpuconv[test]'") from None
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                             str(tests)], cwd=tests.parent, capture_output=True, text=True,
                            timeout=max(30.0, remaining))
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "no output"
    if result.returncode:
        failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")][:3]
        raise RuntimeError(summary + ("; " + "; ".join(failed) if failed else ""))
    return summary.strip("= ")


def _bench(remaining):
    from ... import bench
    try:
        import torch
        compare_torch = bool(torch.cuda.is_available())
    except ImportError:
        compare_torch = False
    results = bench.run(devices=["cpu", "cuda"], batch_sizes=[128], inference_batch_sizes=[1000], repeat=5,
                        warmup=2, peak_size=0, compare_torch=compare_torch, progress=False, rounds=1)
    if results.get("failures"):
        raise RuntimeError(f"bench failures: {results['failures'][:2]}")
    rows = {(r["device"].split(":")[0], r["kind"]): r for r in results["rows"]}
    parts = []
    for kind in ("step", "inference"):
        cuda, cpu = rows.get(("cuda", kind)), rows.get(("cpu", kind))
        if cuda is None:
            raise RuntimeError(f"the bench produced no cuda {kind} row")
        text = f"{kind} {cuda['gpuconv']['median_s'] * 1e3:.2f} ms"
        if cpu is not None:
            text += f" ({cpu['gpuconv']['median_s'] / cuda['gpuconv']['median_s']:.1f}x the cpu)"
        if cuda.get("speed_ratio_vs_torch"):
            text += f", torch/ours {cuda['speed_ratio_vs_torch']:.2f}"
        parts.append(text)
    return "; ".join(parts)


def _lenet_epoch(remaining):
    from ...errors import DataNotFoundError
    from ...train import Trainer
    try:
        trainer = Trainer(dict(device="cuda", epochs=1, batch_size=128), log=lambda *_: None)
    except DataNotFoundError as exc:
        raise Skip(f"MNIST not found: {exc}") from None
    accuracy = trainer.fit()
    record = trainer.history[-1]
    if not accuracy > 0.9:
        raise RuntimeError(f"test accuracy {accuracy:.4f} after one epoch (expected > 0.9)")
    return (f"test accuracy {accuracy:.4f}, {record['seconds']:.1f} s, "
            f"{record['images_per_s']:,.0f} images/s")


def plan():
    """The checks in the order they run: the three likeliest failures first."""
    return [
        Check("kernels load", "compile and load every kernel instance for this GPU", _kernels_load),
        Check("training step", "one LeNet-5 step on cuda, CUDA_LAUNCH_BLOCKING=1 GPUCONV_SYNC=1", _training_step),
        Check("conv vs NumPy", "direct and im2col conv, forward and backward, against NumPy", _conv_against_numpy),
        Check("gpu tests", "pytest -m gpu on the checkout's tests", _gpu_tests),
        Check("bench", "cuda rows against cpu rows (and PyTorch CUDA if installed)", _bench),
        Check("LeNet-5 epoch", "one epoch of MNIST on cuda", _lenet_epoch),
    ]


def run_checks(checks, budget_s=BUDGET_S, clock=time.perf_counter):
    """Run `checks` in order -> rows {check, result, seconds, detail}; result is passed, FAILED or
    skipped. Once the budget is spent the remaining checks are skipped."""
    start = clock()
    rows = []
    for check in checks:
        remaining = budget_s - (clock() - start)
        if remaining <= 0:
            rows.append(dict(check=check.name, result="skipped", seconds=0.0,
                             detail=f"the {budget_s:.0f} s budget is spent"))
            continue
        began = clock()
        try:
            detail, result = check.run(remaining), "passed"
        except Skip as exc:
            detail, result = str(exc), "skipped"
        except Exception as exc:  # a check's failure is a row of the table, not the end of the run
            detail, result = f"{type(exc).__name__}: {exc}", "FAILED"
        rows.append(dict(check=check.name, result=result, seconds=clock() - began, detail=detail))
    return rows


def format_rows(rows):
    header = ("check", "result", "seconds", "detail")
    lines = [header] + [(r["check"], r["result"], f"{r['seconds']:.1f}", r["detail"]) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(3)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line[:3], widths)) + "  " + line[3]
                     for line in lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m gpuconv gpu-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the checks in the order they run and exit")
    parser.add_argument("--budget", type=float, default=BUDGET_S,
                        help=f"seconds after which the remaining checks are skipped (default {BUDGET_S:.0f})")
    args = parser.parse_args(argv)
    checks = plan()
    if args.list:
        for number, check in enumerate(checks, 1):
            print(f"{number}. {check.name}: {check.what}")
        return 0
    from ...backend import cuda_status
    reason = cuda_status()[1]
    if reason:
        print(f"gpu-check: no CUDA GPU here ({reason}); nothing was checked, run it on a machine with an "
              "NVIDIA GPU", file=sys.stderr)
        return 1
    started = time.perf_counter()
    rows = run_checks(checks, args.budget)
    print(format_rows(rows))
    counts = {result: sum(r["result"] == result for r in rows) for result in ("passed", "FAILED", "skipped")}
    print(f"\ngpu-check: {counts['passed']} passed, {counts['FAILED']} failed, {counts['skipped']} skipped "
          f"in {time.perf_counter() - started:.0f} s")
    return 1 if counts["FAILED"] else 0


if __name__ == "__main__":
    sys.exit(main())
