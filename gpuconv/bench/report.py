"""Reading the results: a terminal table, the JSON file and an optional PNG bar chart."""
import json
import math

from ..checkpoint import atomic_write
from ..show import require_matplotlib
from .zoo import table_notes


def _ms(seconds):
    if seconds is None:
        return "-"
    value = seconds * 1e3
    for limit, digits in ((100, 0), (10, 1), (1, 2)):
        if value >= limit:
            return f"{value:.{digits}f}"
    return f"{value:.3f}"


def _num(value, fmt):
    return "-" if value is None else format(value, fmt)


def _threads(n):
    return f"{n} thread" + ("" if n == 1 else "s")


def machine_line(results):
    m, t = results["machine"], results["torch"]
    parts = [m["date"], f"{m['cpu_model']} ({m['cpu_threads']} CPUs)",
             f"BLAS {m['blas']} ({_blas_core(m)}{_threads(m['blas_threads'])})", f"numpy {m['numpy_version']}"]
    if m.get("gpu_name"):
        parts.append(f"GPU {m['gpu_name']} (CUDA runtime {m['cuda_runtime_version']}, driver "
                     f"{m['cuda_driver_version']}, CuPy {m['cupy_version']})")
    if t.get("available"):
        parts.append(f"torch {t['version']} ({_torch_kernels(t)}{_threads(t['threads'])})")
    load = [m.get("load_average_start"), m.get("load_average_end")]
    if all(load):
        parts.append(f"load avg {load[0][0]:.2f} -> {load[1][0]:.2f}")
    return ", ".join(parts)


def _blas_core(m):
    """'core Haswell, set by OPENBLAS_CORETYPE=Haswell, ' ('' for a JSON from before the core was recorded)."""
    if "blas_core" not in m:
        return ""
    env = m.get("blas_environment") or {}
    forced = [f"{k}={env[k]}" for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if env.get(k)]
    return f"core {m['blas_core']}" + (f", set by {' '.join(forced)}" if forced else "") + ", "


def _torch_kernels(t):
    if "blas_info" not in t:
        return ""
    return f"BLAS {t['blas_info']}, oneDNN {t['onednn_version']}, ATen {t['cpu_capability']}, "


COLUMNS = [("batch", 6, ">"), ("row", 30, "<"), ("algo", 7, "<"), ("median ms", 10, ">"),
           ("min-max ms", 16, ">"), ("first ms", 9, ">"), ("GFLOP/s", 8, ">"), ("%peak", 6, ">"),
           ("images/s", 9, ">"), ("vs cpu", 7, ">")]
TORCH_COLUMNS = [("torch ms", 9, ">"), ("torch/ours", 10, ">")]


def _line(cells, columns):
    return "  ".join(f"{str(cell):{align}{width}}" for cell, (_, width, align) in zip(cells, columns))


def format_table(results):
    """The results as text: one block per device, one line per row, then what the columns mean."""
    with_torch = results["torch"].get("available", False)
    several = sum(s["available"] for s in results["devices"].values()) > 1
    keep = COLUMNS if several else [c for c in COLUMNS if c[0] != "vs cpu"]
    columns = keep + (TORCH_COLUMNS if with_torch else [])
    header = _line([c[0] for c in columns], columns)
    out = [f"gpuconv bench: {machine_line(results)}"]
    if results.get("command"):
        out.append(f"command: {results['command']}")
    if results["torch"]["requested"] and not with_torch:
        out.append(f"PyTorch comparison skipped: {results['torch']['reason']}")
    for name, status in results["devices"].items():
        if not status["available"]:
            out.append(f"{name}: unavailable, skipped: {status['reason']}")
    for name, status in results["devices"].items():
        if not status["available"]:
            continue
        out.append("")
        title = f"== {name}: {status.get('name') or ''}"
        peak = status.get("peak")
        if peak:
            title += f"; peak {peak['gflops']:.1f} GFLOP/s ({peak['what']}, median {_ms(peak['median_s'])} ms)"
        if status.get("torch_peak"):
            title += f"; torch {status['torch_peak']['gflops']:.1f} GFLOP/s"
        out += [title, header, "-" * len(header)]
        previous_batch = None
        for row in (r for r in results["rows"] if r["device"] == name):
            if previous_batch is not None and row["batch_size"] != previous_batch:
                out.append("")
            previous_batch = row["batch_size"]
            label = row["name"] + ("" if row["in_training"] or row["kind"] not in ("op", "conv_op") else " *")
            g = row["gpuconv"]
            if g is None:
                out.append(_line([row["batch_size"], label, row["algo"] or "-"], columns[:3])
                           + f"  failed: {row['error']}")
                continue
            cells = [row["batch_size"], label, row["algo"] or "-", _ms(g["median_s"]),
                     f"{_ms(g['min_s'])}-{_ms(g['max_s'])}", _ms(g["first_s"]), _num(g["gflops"], ".2f"),
                     _num(g["peak_share"] and 100 * g["peak_share"], ".1f"), _num(g.get("images_per_s"), ",.0f")]
            if several:
                cells.append(_num(row["speedup_vs_cpu"], ".2f"))
            if with_torch:
                cells += [_ms(row["torch"]["median_s"]) if row["torch"] else "-",
                          _num(row["speed_ratio_vs_torch"], ".2f")]
            out.append(_line(cells, columns))
    s = results["settings"]
    rounds = s.get("rounds", 1)
    pooled = (f" in each of {rounds} rounds (gpuconv first, then PyTorch first, in turn), pooled"
              if rounds > 1 else "")
    out += ["", f"median, min-max over {s['repeat']} calls after {s['warmup']} warm-up calls{pooled}; first = "
                "the first call (kernel compilation on a GPU), never in the median.",
            "GFLOP/s counts a multiply-add as 2; %peak = share of the float32 GEMM peak above"
            + ("; vs cpu = CPU median / this median." if several else ".")]
    has_ops, has_steps = (any(r["kind"] == k for r in results["rows"]) for k in ("op", "step"))
    if has_ops and has_steps:
        # A reader adds up the op rows and compares them with train_step: say why they differ.
        if s.get("compiled", True):
            out.append("op rows run layer by layer (eager: one array-level op alone per call); train_step is "
                       "the compiled step (gpuconv.compile), so the op rows do not add up to it.")
        else:
            out.append("op rows run layer by layer (eager: one array-level op alone per call); train_step "
                       "runs the same ops eagerly plus autograd, the loss and the SGD update.")
    if any(r["kind"] != "op" for r in results["rows"]) and "compiled" in s:
        if not s["compiled"]:
            out.append("train_step and inference run the uncompiled model, eagerly op by op (--eager).")
        elif any(r["device"] == "cpu" and r["kind"] != "op" for r in results["rows"]):
            workers = s["cpu_workers"]
            out.append("train_step and inference run the model as `python -m gpuconv train` does, through "
                       f"gpuconv.compile: on the CPU its executor on {_threads(workers + 1)} "
                       f"(the caller's and {workers} worker{'' if workers == 1 else 's'}).")
        else:
            out.append("train_step and inference run the model as `python -m gpuconv train` does, through "
                       "gpuconv.compile (which runs a GPU batch eagerly).")
    if any(r["op"] == "backward_data" for r in results["rows"]):
        detail = ("dx alone" if s["backward_data_is_separate"] else
                  "dx with dw and db (conv2d_backward has no way to skip dw)")
        out.append(f"backward_data rows time {detail}; * = op never run in training "
                   "(a first layer's input, the image, needs no gradient).")
    out += table_notes(results)
    if with_torch:
        out.append("torch/ours = PyTorch median / gpuconv median, same device, same run: > 1 means gpuconv "
                   f"is faster. PyTorch {results['torch']['version']} on {_threads(results['torch']['threads'])}.")
    if results.get("failures"):
        out.append(f"{len(results['failures'])} row(s) failed; see 'failures' in the JSON.")
    return "\n".join(out)


def _finite(obj):
    """JSON has no NaN/Infinity: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(results, path):
    text = json.dumps(_finite(results), indent=1).encode()
    atomic_write(path, lambda f: f.write(text))


def plot_results(results, path):
    """PNG: training-step images/s per batch size (and inference), each device/algo, gpuconv and
    PyTorch; with op rows, a second panel of op times at the largest batch."""
    _, Figure, FigureCanvasAgg = require_matplotlib()
    rows = [r for r in results["rows"] if r["gpuconv"]]
    op_rows = [r for r in rows if r["kind"] == "op"]
    fig = Figure(figsize=(15 if op_rows else 8, 5.5))
    FigureCanvasAgg(fig)  # a file-only canvas: no pyplot, no process-wide backend switch
    axes = fig.subplots(1, 2 if op_rows else 1, squeeze=False)
    _bars_throughput(axes[0][0], rows)
    if op_rows:
        _bars_ops(axes[0][1], op_rows)
    fig.suptitle(f"gpuconv bench: {results['machine']['cpu_model']}"
                 + (f", {results['machine']['gpu_name']}" if results["machine"].get("gpu_name") else "")
                 + f" ({results['machine']['date'][:10]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _series(rows, kinds):
    """{label: {x: figures}} for gpuconv per device/algo, and torch per device."""
    series = {}
    for r in rows:
        if r["kind"] not in kinds:
            continue
        model = f"{r['model']} " if r.get("model") and "." in r["name"] else ""  # zoo rows beside LeNet-5's
        x = f"{model}{'train' if r['kind'] == 'step' else 'infer'} {r['batch_size']}"
        series.setdefault(f"gpuconv {r['device']}" + (f" {r['algo']}" if r["device"] != "cpu" else ""), {})[x] = r["gpuconv"]
        if r["torch"]:
            series.setdefault(f"torch {r['device']}", {})[x] = r["torch"]
    return series


def _grouped_bars(ax, series, value):
    labels = list(dict.fromkeys(x for points in series.values() for x in points))
    width = 0.8 / max(len(series), 1)
    for index, (name, points) in enumerate(series.items()):
        xs = [i + index * width for i, x in enumerate(labels) if x in points]
        ax.bar(xs, [value(points[x]) for x in labels if x in points], width, label=name)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(labels))])
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.legend(fontsize=8)


def _bars_throughput(ax, rows):
    _grouped_bars(ax, _series(rows, ("step", "inference")), lambda f: f["images_per_s"])
    ax.set_ylabel("images/s (median; higher is better)")
    ax.set_title("training step and inference" if any("." in r["name"] for r in rows)
                 else "LeNet-5 training step and inference", fontsize=10)


def _bars_ops(ax, rows):
    batch = max(r["batch_size"] for r in rows)
    series = {}
    algos = sorted({r["algo"] for r in rows if r["algo"] and r["device"] != "cpu"})
    for r in rows:
        if r["batch_size"] == batch:
            # ops without a conv have no algo: they belong to every algo's series of that device
            names = ([f"gpuconv {r['device']}"] if r["device"] == "cpu" else
                     [f"gpuconv {r['device']} {a}" for a in ([r["algo"]] if r["algo"] else algos)])
            for name in names:
                series.setdefault(name, {})[r["name"]] = r["gpuconv"]
            if r["torch"]:
                series.setdefault(f"torch {r['device']}", {})[r["name"]] = r["torch"]
    _grouped_bars(ax, series, lambda f: f["median_s"] * 1e3)
    ax.set_yscale("log")
    ax.set_ylabel("median ms (log; lower is better)")
    ax.set_title(f"ops at batch {batch}", fontsize=10)
