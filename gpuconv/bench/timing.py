"""Timing one callable: a first call, warm-up calls, then `repeat` measured calls.

The first call is reported on its own because on a GPU it includes compiling and loading the
kernels (and on any device, allocating buffers); it never enters the medians. CPU work is timed
with time.perf_counter around each call. GPU work is asynchronous, so a host timer would only see
the launch: GPU calls are timed with CUDA events through cupyx.profiler.benchmark (gpuconv) or
torch.cuda.Event (PyTorch, whose work may sit on its own stream).
"""
import statistics
import time


def summarize(times, first_s):
    """Figures for a list of per-call seconds: median, min, max (and the first call apart). The
    calls themselves stay under "times" so that rounds can be pooled (see merge)."""
    times = [float(t) for t in times]
    return dict(first_s=float(first_s), median_s=statistics.median(times), min_s=min(times),
                max_s=max(times), repeat=len(times), times=times)


def merge(timings):
    """One summary of several rounds of the same row: all their calls pooled; the first call is
    the first round's (later rounds reuse what it compiled and allocated)."""
    return summarize([t for timing in timings for t in timing["times"]], timings[0]["first_s"])


def time_cpu(fn, repeat, warmup):
    started = time.perf_counter()
    fn()
    first = time.perf_counter() - started
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return summarize(times, first)


def time_cupy(fn, repeat, warmup):
    import cupy
    from cupyx.profiler import benchmark

    cupy.cuda.Device().synchronize()
    started = time.perf_counter()
    fn()
    cupy.cuda.Device().synchronize()
    first = time.perf_counter() - started
    result = benchmark(fn, n_repeat=repeat, n_warmup=warmup)
    return summarize(result.gpu_times[0], first)


def time_torch_cuda(fn, repeat, warmup):
    import torch

    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - started
    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(repeat)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return summarize([start.elapsed_time(end) / 1000.0 for start, end in events], first)


def measure(fn, device, repeat, warmup, framework="gpuconv"):
    """Figures for fn on `device` ('cpu' or 'cuda[:N]') with the right clock for it."""
    if str(device) == "cpu":
        return time_cpu(fn, repeat, warmup)
    if framework == "torch":
        return time_torch_cuda(fn, repeat, warmup)
    return time_cupy(fn, repeat, warmup)
