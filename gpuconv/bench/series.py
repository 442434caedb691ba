"""`python -m gpuconv bench-report FILE...`: one Markdown table from a series of `bench --json` runs.

A single bench run on a shared machine can fall in a slow phase, so the figures worth quoting come
from a series of runs of one command. This reads the JSON files of such a series and prints, per
row, the median over the runs of each run's median with the lowest and highest of them, for
gpuconv, for PyTorch and for their ratio, under a header that says what was run, when, on what
and at which commit. docs/performance.md and the README paste its output between marker comments,
and tests/test_bench_series.py regenerates every marked block, so a quoted table cannot drift
from the JSON it came from.
"""
import argparse
import datetime
import json
import math
import shlex
import statistics
import sys

from ..cli import HelpFormatter
from ..errors import DataError, DataNotFoundError
from .report import _ms
from .runner import SCHEMA

ROW_LABELS = {"train_step": "training step", "inference": "inference"}
# Options that change where a run's output goes, not what it measures: left out of the command a
# series is said to have run, since each run of a series writes its own --json file.
OUTPUT_OPTIONS = {"--json": 1, "--plot": 1, "--no-progress": 0}


def _malformed(path, what):
    return DataError(f"bench-report: {path} is not a `python -m gpuconv bench --json` file: {what}")


def _field(obj, key, kind, path, where):
    if not isinstance(obj, dict) or key not in obj:
        raise _malformed(path, f"{where} has no {key!r}")
    value = obj[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _malformed(path, f"{where}[{key!r}] should be {names}, got {type(value).__name__}")
    return value


def _figures(value, path, where):
    """A row's gpuconv or torch figures: None (failed, or not run) or a dict with a number median_s."""
    if value is None:
        return None
    median = _field(value, "median_s", (int, float), path, where)
    if not _positive(median):
        raise _malformed(path, f"{where}['median_s'] should be a finite time > 0, got {median!r}")
    return value


def _positive(value):
    """A finite number > 0 (not a bool; JSON's NaN and Infinity, and an int too big for a float, are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value) and value > 0
    except OverflowError:
        return False


def _optional(obj, key, check, expected, path, where):
    """A field the report prints if present: absent or null is fine, anything else must pass check."""
    value = obj.get(key)
    if value is not None and not check(value):
        raise _malformed(path, f"{where}[{key!r}] should be {expected} or null, got {value!r}")


def load(path):
    """One bench JSON file, checked for every field the report reads; errors name the file and field."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise DataNotFoundError(f"bench-report: no such file: {path}") from None
    except OSError as exc:
        raise DataNotFoundError(f"bench-report: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise _malformed(path, f"not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    try:
        results = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _malformed(path, f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(results, dict):
        raise _malformed(path, f"expected a JSON object, got {type(results).__name__}")
    schema = results.get("schema")
    if schema != SCHEMA:
        raise _malformed(path, f"schema should be {SCHEMA!r}, got {schema!r}")
    machine = _field(results, "machine", dict, path, "the file")
    date = _field(machine, "date", str, path, "machine")
    try:
        parsed = datetime.datetime.fromisoformat(date)
    except ValueError:
        raise _malformed(path, f"machine['date'] should be an ISO date and time, got {date!r}") from None
    if parsed.utcoffset() is None:  # bench writes one; without it the time is in no known zone
        raise _malformed(path, f"machine['date'] should give its UTC offset (as bench writes it), got {date!r}")
    _optional(results, "command", _command_ok, "the command line as a string", path, "the file")
    for key in ("load_average_start", "load_average_end"):
        _optional(machine, key, lambda v: isinstance(v, list) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v),
            "a list of numbers", path, "machine")
    _optional(machine, "git_commit", lambda v: isinstance(v, str), "a string", path, "machine")
    _optional(results, "torch", lambda v: isinstance(v, dict), "an object", path, "the file")
    _field(results, "settings", dict, path, "the file")
    for index, row in enumerate(_field(results, "rows", list, path, "the file")):
        where = f"rows[{index}]"
        for key in ("device", "name"):
            _field(row, key, str, path, where)
        _optional(row, "algo", lambda v: isinstance(v, str), "a string", path, where)
        batch = _field(row, "batch_size", int, path, where)
        if isinstance(batch, bool) or batch < 1:
            raise _malformed(path, f"{where}['batch_size'] should be an int >= 1, got {batch!r}")
        for key in ("gpuconv", "torch"):
            _figures(row.get(key), path, f"{where}[{key!r}]")
        ratio = row.get("speed_ratio_vs_torch")
        if ratio is not None and not _positive(ratio):
            raise _malformed(path, f"{where}['speed_ratio_vs_torch'] should be a finite number > 0 or null, "
                                   f"got {ratio!r}")
    return results


def _command_ok(command):
    if not isinstance(command, str):
        return False
    try:
        shlex.split(command)
    except ValueError:  # an unclosed quote
        return False
    return True


def run_command(results):
    """The bench command a file records, without the options that only say where output went."""
    command = results.get("command")
    if not command:
        return None
    words, kept = shlex.split(command), []
    skip = 0
    for word in words:
        if skip:
            skip -= 1
        elif word.split("=", 1)[0] in OUTPUT_OPTIONS:
            skip = OUTPUT_OPTIONS[word.split("=", 1)[0]] if "=" not in word else 0
        else:
            kept.append(word)
    return shlex.join(kept)


def _distinct(values):
    return list(dict.fromkeys(v for v in values if v not in (None, "")))


def _one_or_all(values, missing="not recorded"):
    values = _distinct(values)
    return " / ".join(map(str, values)) if values else missing


def _span(dates):
    first, last = min(dates), max(dates)
    start = first.strftime("%Y-%m-%d %H:%M")
    end = last.strftime("%H:%M" if first.date() == last.date() else "%Y-%m-%d %H:%M")
    return f"{start} UTC" if start.endswith(end) else f"{start}-{end} UTC"


def _threads(n):
    return f"{n} thread" + ("" if n == 1 else "s")


def _commit(machine):
    commit = machine.get("git_commit")
    if not commit:
        return None
    return commit[:7] + (" with uncommitted changes" if machine.get("git_dirty") else "")


def header(series):
    """Markdown lines: the command; the dates, commit and load; the machine, its BLAS and PyTorch."""
    machines = [r["machine"] for _, r in series]
    dates = [datetime.datetime.fromisoformat(m["date"]).astimezone(datetime.timezone.utc) for m in machines]
    commands = _distinct(run_command(r) for _, r in series)
    runs = f"{len(series)} run" + ("" if len(series) == 1 else "s")
    lines = [f"{runs} of " + (" / ".join(f"`{c}`" for c in commands) if commands else "a command not recorded") + ","]
    commits = _distinct(_commit(m) for m in machines)
    loads = [m[key][0] for m in machines for key in ("load_average_start", "load_average_end") if m.get(key)]
    load = f"load average (1 min) {min(loads):.2f}-{max(loads):.2f}" if loads else "load average not recorded"
    lines.append(f"{_span(dates)} (start times), "
                 + (f"commit {' / '.join(commits)}" if commits else "commit not recorded in the JSON")
                 + f", {load},")
    cpu = _one_or_all(f"{m.get('cpu_model', '?')} ({m.get('cpu_threads', '?')} CPUs)" for m in machines)
    blas = _one_or_all(f"{m.get('blas', '?')} ({_threads(m.get('blas_threads', '?'))}"
                       + (f", core {m['blas_core']}" if m.get("blas_core") else "")  # files from before it: none
                       + (f", OPENBLAS_CORETYPE={m['blas_environment']['OPENBLAS_CORETYPE']}"
                          if (m.get("blas_environment") or {}).get("OPENBLAS_CORETYPE") else "") + ")"
                       for m in machines)
    machine = [f"on {cpu}", f"BLAS {blas}", f"NumPy {_one_or_all(m.get('numpy_version') for m in machines)}"]
    gpus = _distinct(m.get("gpu_name") for m in machines)
    if gpus:
        machine.append(f"GPU {' / '.join(gpus)} (CUDA runtime "
                       f"{_one_or_all(m.get('cuda_runtime_version') for m in machines)}, CuPy "
                       f"{_one_or_all(m.get('cupy_version') for m in machines)})")
    torch = [r.get("torch") or {} for _, r in series]
    if any(t.get("available") for t in torch):
        versions = _one_or_all(t.get("version") for t in torch if t.get("available"))
        threads = _one_or_all(_threads(t["threads"]) for t in torch if t.get("available") and t.get("threads"))
        machine.append(f"PyTorch {versions} ({threads})")
    lines.append(", ".join(machine) + ".")
    return lines


def _key(row):
    # The CPU has one implementation ("numpy"); on a GPU the conv algorithm makes a different row.
    return row["device"], row.get("algo") if row["device"] != "cpu" else None, row["name"], row["batch_size"]


def _cell(text):
    # A '|' or a line break in a name from the file would end the cell or the row.
    return str(text).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _label(key):
    device, algo, name, batch = key
    label = ROW_LABELS.get(name, name)
    return _cell(device), _cell(label + (f" ({algo})" if algo else "")), batch


def _start(results):
    return datetime.datetime.fromisoformat(results["machine"]["date"]).astimezone(datetime.timezone.utc)


def collect(series):
    """{row key: {"gpuconv": [median_s per run], "torch": [...], "ratio": [...]}} in first-seen order,
    each list in the order of the series (runs that failed a row or ran no PyTorch are left out)."""
    table = {}
    for _, results in series:
        for row in results["rows"]:
            entry = table.setdefault(_key(row), {"gpuconv": [], "torch": [], "ratio": []})
            if row.get("gpuconv"):
                entry["gpuconv"].append(row["gpuconv"]["median_s"])
            if row.get("torch"):
                entry["torch"].append(row["torch"]["median_s"])
            if row.get("speed_ratio_vs_torch") is not None:
                entry["ratio"].append(row["speed_ratio_vs_torch"])
    return table


def spread(values, fmt):
    """'median (min-max)' of values through fmt, '-' for none, the value alone for one run."""
    if not values:
        return "-"
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(statistics.median(values))} ({fmt(min(values))}-{fmt(max(values))})"


def _ratio(value):
    return f"{value:.2f}x"


def _conv_geomean_lines(series):
    """The conv op rows' geometric mean of PyTorch / gpuconv (the files' conv_geomeans, over the rows
    training runs), per device and batch: the median over the runs and their min-max."""
    groups = {}
    for _, results in series:
        for g in results.get("conv_geomeans") or []:
            if g.get("geomean"):
                groups.setdefault((g["device"], g["batch_size"]), {}).setdefault(g["op"], []).append(g["geomean"])
    lines = []
    for (device, batch), ops in groups.items():
        skipped = sorted({r["name"] for _, results in series for r in results["rows"]
                          if r.get("kind") == "conv_op" and r["device"] == device
                          and r["batch_size"] == batch and not r.get("in_training")})
        parts = ", ".join(f"{op} {spread(ops[op], _ratio)}" for op in ("forward", "backward_data", "backward_filter")
                          if op in ops)
        lines += ["", f"Conv ops, {_cell(device)} batch {batch}: geometric mean of PyTorch / gpuconv over the rows "
                      f"training runs{' (all but ' + ', '.join(map(_cell, skipped)) + ')' if skipped else ''}: "
                      f"{spread(ops['all'], _ratio)} ({parts})"
                      + ("; median over the runs (min-max)." if len(ops["all"]) > 1 else ".")]
    return lines


def format_series(series, per_run=False):
    """The Markdown text for [(path, results), ...]: header, table, and optionally each run's ratio."""
    table = collect(series)
    n = len(series)
    out = header(series) + [
        "",
        "| device | row | batch | gpuconv ms | PyTorch ms | PyTorch / gpuconv | runs |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for key, entry in table.items():
        device, label, batch = _label(key)
        out.append(f"| {device} | {label} | {batch} | {spread(entry['gpuconv'], _ms)} "
                   f"| {spread(entry['torch'], _ms)} | {spread(entry['ratio'], _ratio)} "
                   f"| {len(entry['gpuconv'])}/{n} |")
    out += ["", ("Each cell: the median over the runs of each run's median, and (in brackets) the lowest and "
                 "highest of them." if n > 1 else "One run: each cell is that run's median.")
            + " PyTorch / gpuconv > 1 means gpuconv is faster; runs = runs in which gpuconv ran the row."]
    out += _conv_geomean_lines(series)
    if per_run and n > 1:
        order = sorted(range(n), key=lambda i: _start(series[i][1]))  # instants, not strings: offsets differ
        out += ["", "PyTorch / gpuconv in each run, in the order the runs started:", "",
                "| device | row | batch | " + " | ".join(str(i + 1) for i in range(n)) + " |",
                "|---|---|---|" + "---:|" * n]
        for key in table:
            cells = []
            for i in order:
                ratio = next((r.get("speed_ratio_vs_torch") for r in series[i][1]["rows"] if _key(r) == key), None)
                cells.append("-" if ratio is None else f"{ratio:.2f}")
            out.append("| {} | {} | {} | ".format(*_label(key)) + " | ".join(cells) + " |")
    return "\n".join(out)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m gpuconv bench-report", formatter_class=HelpFormatter,
        description="Print one Markdown table from a series of `python -m gpuconv bench --json` files (runs of "
                    "one command): per row, the median of the runs' medians with their min-max, for gpuconv, "
                    "PyTorch and their ratio, under the command, dates, commit, machine and BLAS the files record.")
    parser.add_argument("files", nargs="+", metavar="FILE", help="bench JSON files of one series")
    parser.add_argument("--per-run", action="store_true",
                        help="also print each run's PyTorch / gpuconv ratio, in the order the runs started")
    return parser


def main(argv=None):
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    series = [(path, load(path)) for path in args.files]
    first_path, first = series[0]
    for path, results in series[1:]:
        # A median over runs of different settings would describe none of them.
        changed = sorted(k for k in set(first["settings"]) | set(results["settings"])
                         if first["settings"].get(k) != results["settings"].get(k))
        if changed:
            raise DataError(f"bench-report: {path} ran other settings than {first_path} ({', '.join(changed)}: "
                            f"{[results['settings'].get(k) for k in changed]} against "
                            f"{[first['settings'].get(k) for k in changed]}); a series is runs of one command")
    print(format_series(series, per_run=args.per_run))
    return 0
