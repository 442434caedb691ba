"""run(): measure every planned row on every usable device, gpuconv and (optionally) PyTorch.

Devices that cannot run are kept in the results with the reason; if none of the requested
devices can run, CudaUnavailableError says why. Figures per row: median, min, max over `repeat`
calls after `warmup` calls, the first call apart; GFLOP/s and its share of the device's measured
GEMM peak; images/s for the step and inference; speed-up against the CPU; and with PyTorch,
speed_ratio_vs_torch = torch median / gpuconv median (> 1 means gpuconv is faster).
"""
import contextlib
import sys

import numpy as np
from tqdm import tqdm

from ..backend import cuda_status, parse_device, to_device
from ..errors import ArgumentError, CudaUnavailableError
from ..nn import cpu_plan
from ..ops.conv import ALGOS
from . import memory as memory_module
from . import rows as rows_module
from . import zoo
from .machine import blas_threads, load_average, machine_info, set_blas_threads, torch_blas_info, torch_info
from .rows import GpuconvRows, inference_spec, specs, step_spec
from .timing import measure, merge
from .torch_rows import TorchConvRows, TorchRows, TorchZooRows, torch_device

SCHEMA = "gpuconv-bench/1"
DEFINITIONS = {
    "median_s, min_s, max_s": "over `repeat` calls after `warmup` calls; the first call is not among them",
    "first_s": "the very first call, which on a GPU includes compiling and loading the kernels",
    "gflops": "row FLOPs (a multiply-add counts 2) / median time / 1e9",
    "peak_share": "gflops / the device's peak, a float32 GEMM of side peak_size measured in the same run "
                  "(numpy or cupy matmul)",
    "images_per_s": "batch_size / median time (train_step and inference rows)",
    "speedup_vs_cpu": "the CPU's median for the same row and batch / this row's median",
    "speed_ratio_vs_torch": "PyTorch median / gpuconv median, same device, same run: > 1 means gpuconv is faster",
    "cpu threads": "`settings.threads` for NumPy's BLAS, for PyTorch and for the CPU executor that runs "
                   "gpuconv's train_step and inference rows (the caller's thread + `settings.cpu_workers` "
                   "worker threads), so both frameworks use the same cores",
    "cpu timing": "time.perf_counter around each call",
    "gpu timing": "CUDA events (cupyx.profiler.benchmark for gpuconv, torch.cuda.Event for PyTorch)",
    "git_commit, git_dirty": "the commit of the checkout gpuconv ran from, and whether tracked files differed "
                             "from it (null for an installed copy)",
    "model rows": "<model>.train_step / <model>.inference: a zoo model (gpuconv.models.build_model) on the "
                  "dataset's input shape, random data, SGD momentum 0.9; PyTorch runs the same architecture "
                  "with gpuconv's weights copied in; inference in eval mode. LeNet-5 on MNIST keeps the names "
                  "train_step / inference. FLOPs of a step: 3 forwards (an estimate)",
    "executor": "True where gpuconv.compile ran the model in the CPU executor, False where it ran eagerly "
                "op by op because the executor cannot lower the model as that row runs it (gpuconv.compile(model).unsupported "
                "says why)",
    "conv op rows": "c<in>-<out>k<kernel>s<stride>@<input side>.<op>: gpuconv.ops.conv2d / conv2d_backward "
                    "against F.conv2d / aten.convolution_backward on the same arrays; backward_data is dx alone, "
                    "backward_filter dw (and db where the layer has a bias)",
    "conv_geomeans": "per device and batch: the geometric mean of speed_ratio_vs_torch over the conv op rows "
                     "that training runs (a first layer's backward_data is left out), per op and over all",
    "memory": "train_step rows with --memory: each framework's step measured in a fresh process "
              "(gpuconv.bench.memory): peak_rss_bytes = the process's peak resident set plus each CPU "
              "executor worker's peak less its shared arena pages; step_bytes = peak_rss_bytes - the "
              "resident set after the imports",
}


def _positive_ints(values, name):
    values = [values] if isinstance(values, int) else list(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in values):
        raise ArgumentError(f"{name}: expected one or more ints >= 1, got {values!r}")
    return [int(v) for v in values]


def _check_settings(batch_sizes, inference_batch_sizes, algos, repeat, warmup, peak_size):
    batch_sizes = _positive_ints(batch_sizes, "batch_sizes")
    inference_batch_sizes = (batch_sizes if inference_batch_sizes is None
                             else _positive_ints(inference_batch_sizes, "inference_batch_sizes"))
    algos = [algos] if isinstance(algos, str) else list(algos)
    if not algos or any(a not in ALGOS for a in algos):
        raise ArgumentError(f"algos: expected one or more of {ALGOS}, got {algos!r}")
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ArgumentError(f"repeat: expected an int >= 1, got {repeat!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ArgumentError(f"warmup: expected an int >= 0, got {warmup!r}")
    if isinstance(peak_size, bool) or not isinstance(peak_size, int) or peak_size < 0:
        raise ArgumentError(f"peak_size: expected an int >= 0 (0 skips the peak), got {peak_size!r}")
    return batch_sizes, inference_batch_sizes, algos


def _resolve_devices(devices):
    """-> (usable Device list, {name: {available, reason}}) in the order asked."""
    names = [devices] if isinstance(devices, str) else list(devices)
    names = [n for name in names for n in str(name).split(",") if n.strip()]
    if not names:
        raise ArgumentError("devices: expected one or more of 'cpu', 'cuda', 'cuda:N', got none")
    usable, status = [], {}
    for name in names:
        try:
            device = parse_device(name)
        except CudaUnavailableError as exc:
            reason = cuda_status()[1] or str(exc)
            status[name.strip().lower()] = dict(available=False, reason=reason)
            continue
        if device not in usable:
            usable.append(device)
            status[str(device)] = dict(available=True, reason="")
    if not usable:
        reasons = "; ".join(f"{name}: {s['reason']}" for name, s in status.items())
        raise CudaUnavailableError(f"none of the requested devices can run ({reasons}). "
                                   "Pass --devices cpu (devices=['cpu']) to benchmark the CPU")
    return usable, status


@contextlib.contextmanager
def _on(device):
    if device.kind == "cpu":
        yield
    else:
        with cuda_status()[0].cuda.Device(device.index):
            yield


def _figures(timing, spec, batch, peak_gflops):
    figures = dict(timing)
    figures["gflops"] = spec["flops"] / timing["median_s"] / 1e9 if spec["flops"] else None
    figures["peak_share"] = (figures["gflops"] / peak_gflops
                             if figures["gflops"] is not None and peak_gflops else None)
    if spec["kind"] in ("step", "inference"):
        figures["images_per_s"] = batch / timing["median_s"]
        figures["images_per_s_min"] = batch / timing["max_s"]
        figures["images_per_s_max"] = batch / timing["min_s"]
    return figures


def _peak(device, size, repeat, warmup, framework, torch=None):
    """GFLOP/s of a float32 (size x size) @ (size x size) matmul on `device`."""
    rng = np.random.default_rng(0)
    a, b = (rng.random((size, size), dtype=np.float32) for _ in range(2))
    if framework == "torch":
        a, b = (torch.from_numpy(m).to(torch_device(device)) for m in (a, b))
        fn = lambda: torch.matmul(a, b)  # noqa: E731
    else:
        a, b = to_device(a, device), to_device(b, device)
        xp = device.xp
        fn = lambda: xp.matmul(a, b)  # noqa: E731
    timing = measure(fn, device, repeat, warmup, framework)
    timing.pop("times")
    flops = 2 * size ** 3
    return dict(timing, size=size, flops=flops, gflops=flops / timing["median_s"] / 1e9,
                what=f"float32 {size}x{size} @ {size}x{size} matmul ({'torch' if framework == 'torch' else device.xp.__name__})")


def _model_specs(models, batch, training):
    """The step (training=True) or inference specs of every model in the run, in order."""
    out = []
    for model, dataset in models:
        if zoo.is_legacy(model, dataset):
            spec = step_spec(batch) if training else inference_spec(batch)
            out.append(dict(spec, model=model, dataset=dataset))
        else:
            out += zoo.model_specs(model, dataset, batch, training=training, inference=not training)
    return out


def _plan(usable, batch_sizes, inference_batch_sizes, algos, ops, peak_size, with_torch, torch_first=False,
          models=(zoo.LEGACY,), conv_ops=False):
    """Every measurement in order, as (framework, device, batch or None, spec or 'peak', algo).

    Per device and batch, all gpuconv rows come first, then all PyTorch rows (or the reverse with
    torch_first): each library keeps its own worker threads spinning for a while after a call
    (OpenBLAS for up to ~0.1 s), so alternating row by row would make each pay for the other's
    threads. Rounds alternate the order (A B, then B A) so that a machine that speeds up or slows
    down during the run favours neither library."""
    plan = []
    for device in usable:
        device_algos = ["numpy"] if device.kind == "cpu" else algos
        if peak_size:
            plan.append(("gpuconv", device, None, "peak", None))
            if with_torch:
                plan.append(("torch", device, None, "peak", None))
        for batch in sorted(set(batch_sizes) | set(inference_batch_sizes)):
            group = []
            if batch in batch_sizes:
                group += [(spec, algo) for spec in (specs(batch) if ops else [])
                          for algo in (device_algos if spec["uses_algo"] else [None])]
                group += [(spec, algo) for spec in (zoo.conv_specs(batch) if conv_ops else [])
                          for algo in device_algos]
                group += [(spec, algo) for spec in _model_specs(models, batch, True) for algo in device_algos]
            if batch in inference_batch_sizes:
                group += [(spec, algo) for spec in _model_specs(models, batch, False) for algo in device_algos]
            ours = [("gpuconv", device, batch, spec, algo) for spec, algo in group]
            theirs = []
            if with_torch:  # PyTorch has no algo choice: one row serves every algo's row
                unique = {spec["name"]: spec for spec, _ in group}
                theirs = [("torch", device, batch, spec, None) for spec in unique.values()]
            plan += theirs + ours if torch_first else ours + theirs
    return plan


def _env(envs, framework, spec, device, batch, seed, compiled, torch):
    """The rows object `spec` is timed with, built on first use for this device and batch."""
    source = spec.get("source", ("lenet",))
    key = (framework,) + tuple(source)
    if key not in envs:
        if source[0] == "lenet":
            envs[key] = (TorchRows(torch, device, batch, seed) if framework == "torch"
                         else GpuconvRows(device, batch, seed, compiled))
        elif source[0] == "conv":
            envs[key] = (TorchConvRows(torch, device, batch, seed) if framework == "torch"
                         else zoo.ConvRows(device, batch, seed))
        else:
            _, model, dataset = source
            envs[key] = (TorchZooRows(torch, device, model, dataset, batch, seed) if framework == "torch"
                         else zoo.ZooRows(device, model, dataset, batch, seed, compiled))
    return envs[key]


def _uses_executor(env, kind):
    if isinstance(env, GpuconvRows):
        return bool(env.net.uses_executor(env.x)) if env.net is not env.model else False
    return env.uses_executor(training=kind == "step")


def _callable(env, spec, algo):
    op_algo = "auto" if algo in (None, "numpy") else algo
    if spec["kind"] == "step":
        return env.step(op_algo)
    if spec["kind"] == "inference":
        return env.inference(op_algo)
    return env.op(spec["name"], op_algo)


@contextlib.contextmanager
def _executor_threads(threads):
    """The CPU executor (gpuconv.compile) on `threads` threads, the caller's and threads - 1
    workers, for the run; the setting as it was (an explicit count or None) comes back after."""
    previous = cpu_plan._worker_count
    cpu_plan.set_cpu_workers(threads - 1)
    try:
        yield
    finally:
        cpu_plan.set_cpu_workers(previous)


def _set_threads(threads, machine):
    """Pin NumPy's BLAS to `threads` (None leaves it); returns the count both frameworks use."""
    if threads is None:
        return max(1, machine["blas_threads"])
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ArgumentError(f"threads: expected an int >= 1, got {threads!r}")
    if not set_blas_threads(threads):
        raise ArgumentError(f"threads: cannot set the thread count of NumPy's BLAS ({machine['blas']}) from "
                            "Python; start Python with OMP_NUM_THREADS (or OPENBLAS_NUM_THREADS / "
                            f"MKL_NUM_THREADS)={threads} instead")
    machine["blas_threads"], machine["blas_threads_source"] = blas_threads()
    return threads


def run(devices=("cpu", "cuda"), batch_sizes=(64, 128, 256), inference_batch_sizes=None, ops=False,
        algos=("direct", "im2col"), repeat=10, warmup=2, compare_torch=False, peak_size=2048,
        threads=None, progress=None, seed=0, command=None, rounds=2, compiled=True, models=("lenet5",),
        dataset=None, conv_ops=False, memory=False, memory_steps=3):
    """Measure and return the results as a JSON-ready dict (see DEFINITIONS and report.py).

    threads: CPU threads for NumPy's BLAS, PyTorch and the CPU executor alike (None: NumPy's BLAS
    as it is, and PyTorch and the executor set to match; the executor's setting is restored after). progress: True/False for the tqdm bar on stderr, None to show it only
    on a terminal. On the CPU every conv algo is the same im2col + BLAS code, so CPU rows have
    algo 'numpy'; `algos` picks the CUDA kernels. rounds: the whole plan runs this many times,
    gpuconv first then PyTorch first in turn, and each row's calls are pooled over the rounds.
    compiled: gpuconv's train_step and inference rows run gpuconv.compile(model), as
    `python -m gpuconv train` does (True), or the model itself, eagerly op by op (False).
    models: zoo names (gpuconv.models.MODELS) whose training step and inference are timed, each
    on `dataset`'s input shape or its own default (zoo.DEFAULT_DATASET); [] for none. conv_ops:
    also time the conv ops at zoo.CONV_SHAPES. memory: also measure each model's training step's
    peak memory, both frameworks, each in a fresh process (gpuconv.bench.memory; CPU only).
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ArgumentError(f"rounds: expected an int >= 1, got {rounds!r}")
    batch_sizes, inference_batch_sizes, algos = _check_settings(
        batch_sizes, inference_batch_sizes, algos, repeat, warmup, peak_size)
    models = zoo.check_models(models, dataset)
    if isinstance(memory_steps, bool) or not isinstance(memory_steps, int) or memory_steps < 1:
        raise ArgumentError(f"memory_steps: expected an int >= 1, got {memory_steps!r}")
    if memory and not models:
        raise ArgumentError("memory: measures the models' training steps, but models is empty")
    if not (models or ops or conv_ops):
        raise ArgumentError("models: empty, and neither ops nor conv_ops asked for: nothing to measure")
    usable, device_status = _resolve_devices(devices)
    machine = machine_info()
    machine["load_average_start"] = load_average()
    original_threads = machine["blas_threads"]
    threads = _set_threads(threads, machine)
    try:
        with _executor_threads(threads):
            results = _measure_all(usable, device_status, machine, threads, batch_sizes, inference_batch_sizes,
                                   algos, ops, repeat, warmup, compare_torch, peak_size, progress, seed, command,
                                   rounds, bool(compiled), models, bool(conv_ops))
            if memory:
                _measure_memory(results, models, batch_sizes, threads, memory_steps, seed, bool(compiled))
            results["settings"].update(memory=bool(memory), memory_steps=memory_steps if memory else None)
            return results
    finally:
        if threads != original_threads:
            set_blas_threads(original_threads)  # the caller's process gets its BLAS back as it was


def _measure_all(usable, device_status, machine, threads, batch_sizes, inference_batch_sizes, algos, ops,
                 repeat, warmup, compare_torch, peak_size, progress, seed, command, rounds, compiled, models,
                 conv_ops):
    torch, torch_reason = torch_info() if compare_torch else (None, "not requested (--compare-torch)")
    torch_section = dict(requested=bool(compare_torch), available=torch is not None, reason=torch_reason)
    if torch is not None:
        torch.set_num_threads(threads)  # core for core with NumPy's BLAS
        torch_section.update(version=torch.__version__, threads=torch.get_num_threads(),
                             numpy_blas_threads=machine["blas_threads"], **torch_blas_info(torch))
    for device in usable:
        info = device_status[str(device)]
        info["name"] = machine["cpu_model"] if device.kind == "cpu" else machine.get("gpu_name")
        info["peak"] = info["torch_peak"] = None
    plan = [step + (round_index,) for round_index in range(rounds)
            for step in _plan(usable, batch_sizes, inference_batch_sizes, algos, ops, peak_size,
                              torch is not None, torch_first=round_index % 2 == 1, models=models,
                              conv_ops=conv_ops)]
    timings, failures, envs, executor = {}, [], {}, {}
    bar = tqdm(plan, desc="gpuconv bench", unit="row", file=sys.stderr, leave=False,
               disable=(None if progress is None else not progress))
    for framework, device, batch, spec, algo, round_index in bar:
        status = device_status[str(device)]
        with _on(device):
            if spec == "peak":
                if round_index == 0:
                    bar.set_postfix_str(f"{device} {framework} peak GEMM")
                    status["torch_peak" if framework == "torch" else "peak"] = _peak(
                        device, peak_size, repeat, warmup, framework, torch)
                continue
            bar.set_postfix_str(f"{device} batch {batch} {framework} {spec['name']}"
                                + (f" [{algo}]" if algo else ""))
            key = (str(device), batch, round_index)
            if key not in envs:
                envs.clear()  # one device and batch at a time: frees the previous activations
                envs[key] = {}
            what = f"{device} batch {batch} {spec['name']} [{algo or framework}]"
            row_key = (framework, str(device), batch, spec["name"], algo)
            entry = timings.setdefault(row_key, dict(spec=spec, device=device, timings=[], error=None))
            try:
                env = _env(envs[key], framework, spec, device, batch, seed, compiled, torch)
                if framework == "gpuconv" and spec["kind"] in ("step", "inference") and compiled:
                    executor[row_key] = _uses_executor(env, spec["kind"])
                entry["timings"].append(measure(_callable(env, spec, algo), device, repeat, warmup, framework))
            except Exception as exc:  # one failing kernel must not lose every other row's numbers
                if entry["error"] is None:
                    entry["error"] = f"{type(exc).__name__}: {exc}"
                    failures.append(f"{what}: {entry['error']}")
    bar.close()
    envs.clear()
    results_rows, torch_figures = [], {}
    for (framework, device, batch, name, algo), entry in timings.items():
        peak = (device_status[device]["peak"] or {}).get("gflops")
        figures = None if entry["error"] else _figures(merge(entry["timings"]), entry["spec"], batch, peak)
        if figures:
            figures.pop("times", None)
        if framework == "torch":
            torch_figures[(device, batch, name)] = figures
            continue
        row = dict(device=device, algo=algo, batch_size=batch,
                   **{k: entry["spec"][k] for k in ("name", "layer", "op", "kind", "text", "flops", "in_training")},
                   gpuconv=figures)
        if "model" in entry["spec"]:
            row.update(model=entry["spec"]["model"], dataset=entry["spec"]["dataset"])
            row["executor"] = executor.get((framework, device, batch, name, algo)) if compiled else False
        if entry["error"]:
            row["error"] = entry["error"]
        results_rows.append(row)
    for row in results_rows:
        row["torch"] = torch_figures.get((row["device"], row["batch_size"], row["name"]))
    _add_ratios(results_rows)
    machine["load_average_end"] = load_average()
    models_section = [dict(model=m, dataset=d, title=zoo.MODEL_TITLES.get(m, m)) for m, d in models]
    return dict(schema=SCHEMA, command=command, machine=machine,
                settings=dict(devices=[str(d) for d in usable] + [n for n, s in device_status.items()
                                                                    if not s["available"]],
                              batch_sizes=batch_sizes, inference_batch_sizes=inference_batch_sizes,
                              algos=algos, ops=bool(ops), repeat=repeat, warmup=warmup,
                              compare_torch=bool(compare_torch), peak_size=peak_size, threads=threads,
                              cpu_workers=cpu_plan.get_cpu_workers(), compiled=compiled, rounds=rounds,
                              seed=seed, backward_data_is_separate=rows_module.backward_data_is_separate(),
                              models=models_section, conv_ops=conv_ops),
                devices=device_status, torch=torch_section, definitions=DEFINITIONS,
                rows=results_rows, failures=failures, conv_geomeans=zoo.conv_geomeans(results_rows))


def _measure_memory(results, models, batch_sizes, threads, steps, seed, compiled):
    """Each model's training step's peak memory at each batch size, gpuconv and (when the run
    compares against it) PyTorch, each in a fresh process; on the train_step rows of the CPU."""
    frameworks = ["gpuconv"] + (["torch"] if results["torch"].get("available") else [])
    for row in results["rows"]:
        if row["device"] != "cpu" or row["kind"] != "step" or "model" not in row:
            continue
        row["memory"] = {}
        for framework in frameworks:
            try:
                row["memory"][framework] = memory_module.step_memory(
                    framework, row["model"], row["dataset"], row["batch_size"], threads, steps, seed, compiled)
            except Exception as exc:  # a failed child loses its own figure, not the run's
                error = f"{type(exc).__name__}: {exc}"
                row["memory"][framework] = dict(error=error)
                results["failures"].append(f"cpu batch {row['batch_size']} {row['name']} memory [{framework}]: "
                                           f"{error}")
    results["machine"]["load_average_end"] = load_average()


def _add_ratios(rows):
    cpu = {(r["name"], r["batch_size"]): r["gpuconv"]["median_s"] for r in rows
           if r["device"] == "cpu" and r["gpuconv"]}
    for r in rows:
        median = r["gpuconv"]["median_s"] if r["gpuconv"] else None
        base = cpu.get((r["name"], r["batch_size"]))
        r["speedup_vs_cpu"] = base / median if median and base else None
        r["speed_ratio_vs_torch"] = (r["torch"]["median_s"] / median if median and r["torch"] else None)
