"""`python -m gpuconv bench-report`: the tables quoted in the docs are its output, and it is right."""
import contextlib
import glob
import io
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from gpuconv.__main__ import main as gpuconv_main
from gpuconv.bench import SCHEMA
from gpuconv.bench.machine import git_commit
from gpuconv.bench.series import format_series, load, run_command
from gpuconv.bench.series import main as series_main
from gpuconv.errors import DataError, DataNotFoundError

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^<!-- generated: (?P<command>[^\n]*?) -->\n(?P<text>.*?)^<!-- end generated -->", re.S | re.M)


def run_cli(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = gpuconv_main(argv)
    return code, out.getvalue()


def expand(command):
    """The argv a shell would run for a block's command, with globs expanded under the repository."""
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "gpuconv"], f"a generated block must run python -m gpuconv: {command}"
    argv = []
    for word in words[3:]:
        if any(c in word for c in "*?["):
            matches = sorted(glob.glob(str(ROOT / word)))
            assert matches, f"{word!r} in {command!r} matches no file"
            argv += matches
        else:
            argv.append(word)
    return argv


@pytest.mark.parametrize("doc", ["README.md", "docs/performance.md"])
def test_every_generated_block_is_its_commands_output(doc):
    text = (ROOT / doc).read_text()
    blocks = list(BLOCK.finditer(text))
    assert blocks, f"{doc} has no <!-- generated: ... --> block"
    assert text.count("\n<!-- generated:") == len(blocks), f"{doc}: a generated block lacks its end marker"
    for block in blocks:
        code, out = run_cli(expand(block["command"]))
        assert code == 0
        assert block["text"] == out, (
            f"{doc}: the block after <!-- generated: {block['command']} --> is not that command's output; "
            f"run it from the repository root and paste the output between the markers")


def bench_file(tmp_path, name, date, rows, settings=None, machine=None, command=None):
    """A bench JSON file with `rows` = [(row name, batch, gpuconv ms or None, torch ms or None)]."""
    results = {
        "schema": SCHEMA,
        "command": command or f"python -m gpuconv bench --repeat 5 --no-progress --json /tmp/{name}",
        "machine": dict(cpu_model="Test CPU", cpu_threads=2, blas="openblas 1.0", blas_threads=2,
                        numpy_version="2.0", date=date, load_average_start=[0.5, 0, 0],
                        load_average_end=[1.5, 0, 0], **(machine or {})),
        "settings": settings or {"repeat": 5},
        "torch": {"requested": True, "available": True, "version": "9.9", "threads": 2},
        "rows": [],
    }
    for row, batch, ours, theirs in rows:
        results["rows"].append({
            "device": "cpu", "algo": "numpy", "name": row, "batch_size": batch,
            "gpuconv": None if ours is None else {"median_s": ours / 1e3},
            "torch": None if theirs is None else {"median_s": theirs / 1e3},
            "speed_ratio_vs_torch": None if ours is None or theirs is None else theirs / ours})
    path = tmp_path / name
    path.write_text(json.dumps(results))
    return str(path)


def table_rows(text):
    return [line for line in text.splitlines() if line.startswith("| cpu")]


def test_median_min_max_over_the_runs(tmp_path):
    files = [bench_file(tmp_path, "a.json", "2026-01-01T10:00:00+00:00", [("train_step", 64, 1.0, 4.0)]),
             bench_file(tmp_path, "b.json", "2026-01-01T10:05:00+00:00", [("train_step", 64, 3.0, 3.0)]),
             bench_file(tmp_path, "c.json", "2026-01-01T10:02:00+00:00", [("train_step", 64, 2.0, 10.0)])]
    code, out = run_cli(["bench-report"] + files)
    assert code == 0
    # gpuconv 1, 3, 2 ms; PyTorch 4, 3, 10 ms; ratios 4, 1, 5
    assert table_rows(out) == ["| cpu | training step | 64 | 2.00 (1.00-3.00) | 4.00 (3.00-10.0) "
                               "| 4.00x (1.00x-5.00x) | 3/3 |"]
    assert "3 runs of `python -m gpuconv bench --repeat 5`" in out  # --json and --no-progress left out
    assert "2026-01-01 10:00-10:05 UTC (start times), commit not recorded in the JSON, " \
           "load average (1 min) 0.50-1.50," in out
    assert "on Test CPU (2 CPUs), BLAS openblas 1.0 (2 threads), NumPy 2.0, PyTorch 9.9 (2 threads)." in out


def test_conv_op_geometric_means_median_over_the_runs(tmp_path):
    files = []
    for i, (all_, forward) in enumerate([(0.5, 0.4), (0.7, 0.6), (0.6, 0.9)]):
        path = bench_file(tmp_path, f"{i}.json", f"2026-01-01T10:0{i}:00+00:00",
                          [("c1-6k5s1@28.backward_data", 128, 2.0, 1.0), ("c1-6k5s1@28.forward", 128, 1.0, 1.0)])
        results = json.loads(Path(path).read_text())
        results["rows"][0].update(kind="conv_op", in_training=False)
        results["rows"][1].update(kind="conv_op", in_training=True)
        results["conv_geomeans"] = [dict(device="cpu", batch_size=128, op="all", geomean=all_, rows=1),
                                    dict(device="cpu", batch_size=128, op="forward", geomean=forward, rows=1)]
        Path(path).write_text(json.dumps(results))
        files.append(path)
    _, out = run_cli(["bench-report"] + files)
    assert ("Conv ops, cpu batch 128: geometric mean of PyTorch / gpuconv over the rows training runs (all but "
            "c1-6k5s1@28.backward_data): 0.60x (0.50x-0.70x) (forward 0.60x (0.40x-0.90x)); median over the runs "
            "(min-max).") in out
    _, one = run_cli(["bench-report", files[0]])
    assert "training runs (all but c1-6k5s1@28.backward_data): 0.50x (forward 0.40x)." in one


def test_an_even_number_of_runs_takes_the_mean_of_the_middle_two(tmp_path):
    files = [bench_file(tmp_path, f"{i}.json", f"2026-01-01T10:0{i}:00+00:00", [("inference", 100, ms, 2 * ms)])
             for i, ms in enumerate([1.0, 2.0, 4.0, 8.0])]
    _, out = run_cli(["bench-report"] + files)
    assert table_rows(out) == ["| cpu | inference | 100 | 3.00 (1.00-8.00) | 6.00 (2.00-16.0) "
                               "| 2.00x (2.00x-2.00x) | 4/4 |"]


def test_a_run_that_failed_a_row_is_left_out_of_that_row_and_counted(tmp_path):
    files = [bench_file(tmp_path, "a.json", "2026-01-01T10:00:00+00:00",
                        [("train_step", 64, 1.0, 2.0), ("train_step", 128, 2.0, 2.0)]),
             bench_file(tmp_path, "b.json", "2026-01-01T10:01:00+00:00",
                        [("train_step", 64, None, 2.0), ("train_step", 128, 4.0, None)])]
    _, out = run_cli(["bench-report"] + files)
    assert table_rows(out) == ["| cpu | training step | 64 | 1.00 | 2.00 (2.00-2.00) | 2.00x | 1/2 |",
                               "| cpu | training step | 128 | 3.00 (2.00-4.00) | 2.00 | 1.00x | 2/2 |"]


def test_per_run_lists_each_ratio_in_start_order_and_the_commit_is_shown(tmp_path):
    commit = {"git_commit": "0123456789abcdef0123456789abcdef01234567", "git_dirty": True}
    files = [bench_file(tmp_path, "late.json", "2026-01-01T11:00:00+00:00", [("train_step", 64, 1.0, 3.0)],
                        machine=commit),
             bench_file(tmp_path, "early.json", "2026-01-01T09:00:00+00:00", [("train_step", 64, 1.0, 2.0)],
                        machine=commit)]
    _, out = run_cli(["bench-report", "--per-run"] + files)
    assert "commit 0123456 with uncommitted changes," in out
    assert "| cpu | training step | 64 | 2.00 | 3.00 |" in out  # the 09:00 run first


def test_a_missing_file_is_an_error_naming_it(tmp_path, capsys):
    good = bench_file(tmp_path, "a.json", "2026-01-01T10:00:00+00:00", [("train_step", 64, 1.0, 2.0)])
    missing = str(tmp_path / "nope" / "bench-3.json")
    with pytest.raises(DataNotFoundError, match=re.escape(f"no such file: {missing}")):
        load(missing)
    assert gpuconv_main(["bench-report", good, missing]) == 1
    err = capsys.readouterr().err
    assert missing in err and "Traceback" not in err


@pytest.mark.parametrize("text, what", [
    ("{\"schema\": ", "invalid JSON at line 1"),
    ("[1, 2]", "expected a JSON object, got list"),
    (json.dumps({"schema": "other/1"}), "schema should be 'gpuconv-bench/1', got 'other/1'"),
    (json.dumps({"schema": SCHEMA, "machine": {"date": "yesterday"}, "settings": {}, "rows": []}),
     "machine['date'] should be an ISO date and time, got 'yesterday'"),
    (json.dumps({"schema": SCHEMA, "machine": {"date": "2026-01-01T00:00:00+00:00"}, "settings": {}}),
     "the file has no 'rows'"),
    (json.dumps({"schema": SCHEMA, "machine": {"date": "2026-01-01T00:00:00+00:00"}, "settings": {},
                 "rows": [{"device": "cpu", "name": "x", "batch_size": 8, "gpuconv": {"min_s": 1}}]}),
     "rows[0]['gpuconv'] has no 'median_s'"),
    (json.dumps({"schema": SCHEMA, "machine": {"date": "2026-01-01T00:00:00+00:00"}, "settings": {},
                 "rows": [{"device": "cpu", "name": "x", "batch_size": 8, "gpuconv": {"median_s": "1"}}]}),
     "rows[0]['gpuconv']['median_s'] should be int or float, got str"),
])
def test_a_malformed_file_is_an_error_naming_it_and_the_fault(tmp_path, text, what):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        load(str(path))
    assert str(path) in str(info.value) and what in str(info.value)


def test_runs_of_other_settings_are_refused_naming_both_files(tmp_path):
    a = bench_file(tmp_path, "a.json", "2026-01-01T10:00:00+00:00", [("train_step", 64, 1.0, 2.0)])
    b = bench_file(tmp_path, "b.json", "2026-01-01T10:01:00+00:00", [("train_step", 64, 1.0, 2.0)],
                   settings={"repeat": 50})
    with pytest.raises(DataError, match=f"{re.escape(b)} ran other settings than {re.escape(a)} \\(repeat"):
        series_main([a, b])


def test_run_command_drops_only_where_the_output_went():
    results = {"command": "python -m gpuconv bench --json=/x.json --repeat 5 --plot /p.png --no-progress --ops"}
    assert run_command(results) == "python -m gpuconv bench --repeat 5 --ops"
    assert run_command({}) is None


def test_one_run_prints_its_own_figures():
    results = {"machine": {"date": "2026-01-01T10:00:00+00:00"}, "settings": {}, "rows": [
        {"device": "cpu", "name": "inference", "batch_size": 10, "gpuconv": {"median_s": 0.5}, "torch": None}]}
    out = format_series([("x.json", results)])
    assert "1 run of a command not recorded" in out and "| cpu | inference | 10 | 500 | - | - | 1/1 |" in out


def test_git_commit_is_recorded_for_a_checkout_and_not_for_a_copy(tmp_path):
    assert git_commit(str(tmp_path)) == (None, None)
    if not (ROOT / ".git").exists():
        pytest.skip("the tests run from a copy without .git")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    commit, dirty = git_commit(str(ROOT))
    assert commit == head.stdout.strip() and isinstance(dirty, bool)


def test_the_blas_core_and_a_forced_core_type_are_in_the_header(tmp_path):
    forced = dict(blas_core="Haswell", blas_environment={"OPENBLAS_CORETYPE": "Haswell"})
    _, out = run_cli(["bench-report", bench_file(tmp_path, "a.json", "2026-01-01T09:00:00+00:00",
                                                 [("train_step", 64, 1.0, 2.0)], machine=forced)])
    assert "BLAS openblas 1.0 (2 threads, core Haswell, OPENBLAS_CORETYPE=Haswell)" in out
    _, out = run_cli(["bench-report", bench_file(tmp_path, "b.json", "2026-01-01T09:00:00+00:00",
                                                 [("train_step", 64, 1.0, 2.0)])])
    assert "BLAS openblas 1.0 (2 threads)," in out  # a file from before the core was recorded


def _with(tmp_path, change):
    """A valid one-row bench file, changed by change(results) -> the path."""
    path = bench_file(tmp_path, "odd.json", "2026-01-01T10:00:00+00:00", [("train_step", 64, 1.0, 2.0)])
    results = json.loads(Path(path).read_text())
    change(results)
    Path(path).write_text(json.dumps(results))  # NaN and Infinity written as JSON's extensions
    return path


@pytest.mark.parametrize("change, what", [
    (lambda r: r["rows"][0].update(speed_ratio_vs_torch=float("nan")),
     "rows[0]['speed_ratio_vs_torch'] should be a finite number > 0 or null, got nan"),
    (lambda r: r["rows"][0]["gpuconv"].update(median_s=float("inf")),
     "rows[0]['gpuconv']['median_s'] should be a finite time > 0, got inf"),
    (lambda r: r["rows"][0]["torch"].update(median_s=10 ** 400), "rows[0]['torch']['median_s'] should be a finite"),
    (lambda r: r["machine"].update(load_average_start="high"), "machine['load_average_start'] should be a list"),
    (lambda r: r["machine"].update(load_average_end=1.5), "machine['load_average_end'] should be a list"),
    (lambda r: r["machine"].update(git_commit=12345), "machine['git_commit'] should be a string"),
    (lambda r: r["machine"].update(date="2026-01-01T10:00:00"), "should give its UTC offset"),
    (lambda r: r.update(command=5), "the file['command'] should be the command line"),
    (lambda r: r.update(command="python -m gpuconv bench 'unclosed"), "the file['command'] should be"),
    (lambda r: r.update(torch=[1]), "the file['torch'] should be an object"),
    (lambda r: r["rows"][0].update(device="cuda", algo=["im2col"]), "rows[0]['algo'] should be a string"),
])
def test_odd_values_are_errors_naming_the_field_not_tracebacks_or_nan_cells(tmp_path, capsys, change, what):
    # Each of these used to print a table with 'nanx' or 'inf' in it, or to end in a TypeError,
    # AttributeError, OverflowError or ValueError traceback.
    path = _with(tmp_path, change)
    with pytest.raises(DataError) as info:
        load(path)
    assert path in str(info.value) and what in str(info.value)
    assert gpuconv_main(["bench-report", path]) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_a_file_that_is_not_utf8_is_an_error_naming_it(tmp_path, capsys):
    path = tmp_path / "latin1.json"
    text = json.dumps({"schema": SCHEMA, "machine": {"cpu_model": "\u00c9PYC"}}, ensure_ascii=False)
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*not UTF-8"):
        load(str(path))
    assert gpuconv_main(["bench-report", str(path)]) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_a_pipe_or_newline_in_a_row_name_stays_in_its_cell(tmp_path):
    path = _with(tmp_path, lambda r: r["rows"][0].update(name="a | b\nc"))
    _, out = run_cli(["bench-report", path])
    assert table_rows(out) == ["| cpu | a \\| b c | 64 | 1.00 | 2.00 | 2.00x | 1/1 |"]


def test_per_run_orders_by_the_instant_not_the_text_of_the_date(tmp_path):
    # 10:00+05:00 is 05:00 UTC, before 06:00+00:00, though it sorts after it as text
    files = [bench_file(tmp_path, "utc.json", "2026-01-01T06:00:00+00:00", [("train_step", 64, 1.0, 3.0)]),
             bench_file(tmp_path, "east.json", "2026-01-01T10:00:00+05:00", [("train_step", 64, 1.0, 2.0)])]
    _, out = run_cli(["bench-report", "--per-run"] + files)
    assert "| cpu | training step | 64 | 2.00 | 3.00 |" in out
