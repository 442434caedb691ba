"""Peak memory of one LeNet-5 training step: gpuconv compiled (the CPU executor), gpuconv eager, PyTorch.

Each framework runs in a fresh subprocess (so one's allocator cannot hide the other's peak):
import, build the model, optimizer and a random batch, then read the process's peak resident
set (ru_maxrss) as the baseline; run the training steps; report the peak's growth. For gpuconv,
tracemalloc also gives the peak of the NumPy arrays alone (NumPy reports its allocations to it,
from every thread; PyTorch does not, so it has only the RSS figure). The executor's worker threads
live in the same process, so their memory is in its RSS. Every framework gets the same number of
threads (--threads; default: the executor's, GPUCONV_CPU_WORKERS + 1 or gpuconv's default).

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


def child_gpuconv(batch, steps, compiled, threads):
    import tracemalloc

    import numpy as np

    sys.path.insert(0, ROOT)
    import gpuconv
    from gpuconv import functional as F
    from gpuconv import optim
    from gpuconv.models import LeNet5

    gpuconv.set_cpu_workers(threads - 1)
    model = LeNet5()
    net = gpuconv.compile(model) if compiled else model  # compiled: as `python -m gpuconv train` runs it
    optimizer = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    x = rng.random((batch, 1, 28, 28), dtype=np.float32)
    labels = rng.integers(0, 10, batch)
    baseline = peak_rss_mib()
    tracemalloc.start()
    for _ in range(steps):
        loss = F.cross_entropy(net(x), labels)
        loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return dict(rss_growth_mib=peak_rss_mib() - baseline, numpy_peak_mib=traced_peak / 2 ** 20,
                executor=bool(compiled and net.uses_executor(x)))


def child_torch(batch, steps, threads):
    import torch
    from torch import nn

    torch.set_num_threads(threads)
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
    return dict(rss_growth_mib=peak_rss_mib() - baseline, numpy_peak_mib=None)


def run_child(python, name, batch, steps, threads):
    command = [python, os.path.abspath(__file__), "--child", name, "--batch", str(batch),
               "--steps", str(steps), "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return None, done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
    return json.loads(done.stdout.strip().splitlines()[-1]), ""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for each framework (default: the CPU executor's, workers + 1)")
    parser.add_argument("--torch-python", default=sys.executable,
                        help="a Python that can import torch (default: this one)")
    parser.add_argument("--child", choices=["compiled", "eager", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is None:
        sys.path.insert(0, ROOT)
        from gpuconv import get_cpu_workers
        args.threads = get_cpu_workers() + 1
    if args.threads < 1:
        parser.error(f"--threads: expected an int >= 1, got {args.threads}")
    if args.child:
        if args.child == "torch":
            result = child_torch(args.batch, args.steps, args.threads)
        else:
            result = child_gpuconv(args.batch, args.steps, args.child == "compiled", args.threads)
        print(json.dumps(result))
        return 0
    print(f"peak memory of a LeNet-5 training step, batch {args.batch}, {args.steps} steps, "
          f"{args.threads} thread{'' if args.threads == 1 else 's'}, each framework in a fresh process")
    print(f"{'framework':<34}{'peak RSS growth':>18}{'NumPy peak (tracemalloc)':>28}")
    for name, label, python in (("compiled", "gpuconv (compiled: CPU executor)", sys.executable),
                                ("eager", "gpuconv (eager autograd)", sys.executable),
                                ("torch", "PyTorch", args.torch_python)):
        result, error = run_child(python, name, args.batch, args.steps, args.threads)
        if result is None:
            print(f"{label:<34}  not measured: {error}")
            continue
        if name == "compiled" and not result["executor"]:
            label += " [ran eagerly!]"
        traced = "" if result["numpy_peak_mib"] is None else f"{result['numpy_peak_mib']:.1f} MiB"
        print(f"{label:<34}{result['rss_growth_mib']:>14.1f} MiB{traced:>28}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
