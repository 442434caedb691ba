"""Peak memory of a training step, gpuconv and PyTorch alike, each measured in a fresh process.

Why a fresh process per framework: the bench process holds both libraries, every row's arrays
and whatever the allocators kept, so its resident set says little about one model's step. The
child imports its framework, builds the input batch, model and optimizer, runs a few training
steps as the timing rows do, and reports from /proc (Linux):

* base_rss_bytes: its resident set after the imports, before the batch and model exist;
* peak_rss_bytes: the high-water mark of its resident set (VmHWM, reset with
  /proc/self/clear_refs after the imports where the kernel allows it) plus, for gpuconv, each CPU
  executor worker process's own high-water mark less its shared pages (RssShmem: the memfd arena it
  shares with the caller, whose pages the caller's figure already counts). A worker starts after the
  reset, so its whole life counts: its interpreter and imports too, memory the worker really costs;
* step_bytes = peak_rss_bytes - base_rss_bytes: what the batch, the model, its gradients, the
  optimizer's state, the activations and the workers cost.

Summing each process's own peak is an upper bound where the peaks fall at different moments.
PyTorch's child also builds the gpuconv model whose weights it copies (a model's parameters, about
1 MB for ResNet-20), which its figure includes.
"""
import json
import os
import subprocess
import sys
import time

from ..errors import ArgumentError

FRAMEWORKS = ("gpuconv", "torch")


def proc_status(pid="self"):
    """The kB fields of /proc/<pid>/status (VmRSS, VmHWM, RssShmem, ...) in bytes; {} off Linux."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                parts = value.split()
                if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
                    fields[name] = int(parts[0]) * 1024
    except OSError:
        pass
    return fields


def reset_peak():
    """Reset this process's VmHWM to its current resident set (Linux >= 4.0); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _worker_pids():
    from ..nn import cpu_workers
    return [p.process.pid for p in cpu_workers._pool.processes if p.process.poll() is None]


def measure_in_this_process(framework, model, dataset, batch, threads, steps=3, seed=0, compiled=True):
    """The child's side: run `steps` training steps and return the figures (see the module)."""
    if framework == "torch":
        import torch
        torch.set_num_threads(threads)
    from . import zoo
    base = proc_status().get("VmRSS")
    reset = reset_peak()
    images, labels = zoo.random_batch(dataset, batch, seed)
    if framework == "torch":
        from .torch_rows import TorchZooRows
        rows = TorchZooRows(torch, "cpu", model, dataset, batch, seed)
    else:
        rows = zoo.ZooRows("cpu", model, dataset, batch, seed, compiled)
    step = rows.step("auto")
    for _ in range(steps):
        step()
    own = proc_status()
    workers = []
    if framework == "gpuconv":
        for pid in _worker_pids():
            status = proc_status(pid)
            if "VmHWM" in status:
                workers.append(dict(pid=pid, hwm_bytes=status["VmHWM"], shmem_bytes=status.get("RssShmem", 0),
                                    counted_bytes=status["VmHWM"] - status.get("RssShmem", 0)))
    if base is None or "VmHWM" not in own:
        raise RuntimeError("no /proc/self/status memory fields on this system")
    peak = own["VmHWM"] + sum(w["counted_bytes"] for w in workers)
    return dict(framework=framework, model=model, dataset=dataset, batch_size=batch, threads=threads, steps=steps,
                base_rss_bytes=base, process_peak_bytes=own["VmHWM"], workers=workers,
                peak_rss_bytes=peak, step_bytes=peak - base, peak_reset=reset,
                executor=(rows.uses_executor() if framework == "gpuconv" else None))


def step_memory(framework, model, dataset, batch, threads, steps=3, seed=0, compiled=True, timeout=600):
    """Run measure_in_this_process in a fresh interpreter on `threads` threads (NumPy's BLAS,
    the executor's workers, or PyTorch's intra-op pool) and return its figures."""
    if framework not in FRAMEWORKS:
        raise ArgumentError(f"framework: expected one of {FRAMEWORKS}, got {framework!r}")
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = [package_root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), GPUCONV_CPU_WORKERS=str(threads - 1), PYTHONPATH=os.pathsep.join(path))
    request = json.dumps(dict(framework=framework, model=model, dataset=dataset, batch=batch, threads=threads,
                              steps=steps, seed=seed, compiled=compiled))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "gpuconv.bench.memory", request], env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"memory child for {framework} {model} batch {batch} exited {done.returncode}: "
                           + " | ".join(tail))
    figures = json.loads(lines[-1])
    figures["seconds"] = time.perf_counter() - started
    return figures


def _main(argv):
    request = json.loads(argv[0])
    figures = measure_in_this_process(request["framework"], request["model"], request["dataset"], request["batch"],
                                      request["threads"], request["steps"], request["seed"], request["compiled"])
    print(json.dumps(figures))


if __name__ == "__main__":
    _main(sys.argv[1:])
