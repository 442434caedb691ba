"""Peak memory of one LeNet-5 training step: gpuconv's CPU plan, gpuconv's layers, PyTorch.

Each framework runs in a fresh subprocess (so one's allocator cannot hide the other's peak):
import, build the model, optimizer and a random batch, then read the process's peak resident
set (ru_maxrss) as the baseline; run the training steps; report the peak's growth. For gpuconv,
tracemalloc also gives the peak of the NumPy arrays alone (NumPy reports its allocations to it;
PyTorch does not, so it has only the RSS figure). Where the CPU plan runs part of the batch in
worker processes (gpuconv/nn/cpu_procs.py), their private memory after the steps (Private_Clean +
Private_Dirty of /proc/PID/smaps_rollup: the pages they allocated or copied on write) is added;
the mapping they share with the caller is in the caller's RSS already. tracemalloc sees the caller only.

    python examples/peak_memory.py --batch 256
    python examples/peak_memory.py --torch-python /path/to/venv-with-torch/bin/python
"""
import argparse
import json
import os
import resource
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def private_mib(pid):
    """Memory only process `pid` holds (Linux), MiB."""
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])  # kB
    return total / 1024


def child_gpuconv(batch, steps, fast):
    import tracemalloc

    import numpy as np

    sys.path.insert(0, ROOT)
    from gpuconv import ops as F
    from gpuconv import optim
    from gpuconv.models import LeNet5
    from gpuconv.nn import cpu_plan

    model = LeNet5().use_fast_cpu(fast)
    optimizer = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    x = rng.random((batch, 1, 28, 28), dtype=np.float32)
    labels = rng.integers(0, 10, batch)
    baseline = peak_rss_mib()
    tracemalloc.start()
    for _ in range(steps):
        logits = model(x)
        _, dlogits = F.softmax_cross_entropy(logits, labels)
        model.backward(dlogits, need_dx=False)
        optimizer.step()
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    caller = peak_rss_mib() - baseline
    plan = cpu_plan._plans.get(model)
    workers = plan.workers if plan is not None else None
    pids = [pid for pid in (workers.pids if workers is not None else []) if pid is not None]
    in_workers = sum(private_mib(pid) for pid in pids)
    return dict(rss_growth_mib=caller + in_workers, workers_mib=in_workers, worker_processes=len(pids),
                numpy_peak_mib=traced_peak / 2 ** 20)


def child_torch(batch, steps):
    import torch
    from torch import nn

    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    model = nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 120), nn.ReLU(),
                          nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, labels = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    loss_fn = nn.CrossEntropyLoss()
    baseline = peak_rss_mib()
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model(x), labels).backward()
        optimizer.step()
    return dict(rss_growth_mib=peak_rss_mib() - baseline, workers_mib=0.0, worker_processes=0, numpy_peak_mib=None)


def run_child(python, name, batch, steps):
    command = [python, os.path.abspath(__file__), "--child", name, "--batch", str(batch),
               "--steps", str(steps)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return None, done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
    return json.loads(done.stdout.strip().splitlines()[-1]), ""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--torch-python", default=sys.executable,
                        help="a Python that can import torch (default: this one)")
    parser.add_argument("--child", choices=["plan", "layers", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        if args.child == "torch":
            result = child_torch(args.batch, args.steps)
        else:
            result = child_gpuconv(args.batch, args.steps, fast=args.child == "plan")
        print(json.dumps(result))
        return 0
    print(f"peak memory of a LeNet-5 training step, batch {args.batch}, {args.steps} steps, "
          f"each framework in a fresh process")
    print(f"{'framework':<22}{'peak RSS growth':>18}{'in worker processes':>22}{'NumPy peak (tracemalloc)':>28}")
    for name, label, python in (("plan", "gpuconv (CPU plan)", sys.executable),
                                ("layers", "gpuconv (layers)", sys.executable),
                                ("torch", "PyTorch", args.torch_python)):
        result, error = run_child(python, name, args.batch, args.steps)
        if result is None:
            print(f"{label:<22}  not measured: {error}")
            continue
        traced = "" if result["numpy_peak_mib"] is None else f"{result['numpy_peak_mib']:.1f} MiB"
        workers = (f"{result['workers_mib']:.1f} MiB ({result['worker_processes']})"
                   if result["worker_processes"] else "-")
        print(f"{label:<22}{result['rss_growth_mib']:>14.1f} MiB{workers:>22}{traced:>28}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
