"""`python -m gpuconv mutants` itself: the generator is deterministic and covers every operator, each
mutant really changes the source, the runner reports a known-killed and a known-surviving mutant of
a tiny kernel exactly, the reviewed equivalents list is checked, and the GPUCONV_KERNEL_DIR hook."""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gpuconv.cuda import runtime
from gpuconv.cuda.tools import mutants as tool
from gpuconv.errors import ArgumentError, KernelError

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "kernels"


@pytest.fixture(scope="module")
def real_mutants():
    return tool.generate_all(KERNELS)


def test_generation_is_deterministic_and_covers_every_kernel_and_operator(real_mutants):
    again = tool.generate_all(KERNELS)
    assert [m.summary() for m in again] == [m.summary() for m in real_mutants]
    assert len(real_mutants) >= 150
    assert len({m.id for m in real_mutants}) == len(real_mutants)
    assert {m.operator for m in real_mutants} == set(tool.OPERATORS)
    assert {m.source for m in real_mutants} == {p.name for p in KERNELS.glob("*.cu")}
    for path in KERNELS.glob("*.cu"):  # mutants spread over the functions, not one spot: every kernel gets some
        kernels = set(re.findall(r"__global__\s+void\s+(\w+)", path.read_text()))
        assert kernels, path.name
        assert kernels <= {m.function for m in real_mutants if m.source == path.name}, path.name


def test_every_mutant_changes_its_source_and_its_diff_shows_the_change(real_mutants):
    texts = {p.name: p.read_text() for p in KERNELS.glob("*.cu")}
    for mutant in real_mutants:
        mutated = mutant.apply(texts[mutant.source])
        assert mutated != texts[mutant.source], mutant.id
        assert mutant.before != mutant.after, mutant.id
        assert mutant.after in " ".join(mutated.split()), mutant.id
        assert mutant.line == texts[mutant.source].count("\n", 0, mutant.start) + 1


def test_operators_leave_templates_signatures_and_comments_alone():
    source = textwrap.dedent("""\
        // a comment with i < n and __syncthreads(); in it
        template<typename T> __device__ __forceinline__ T twice(const T* __restrict__ v, int i) { return v[i] + v[i]; }
        template<typename T>
        __global__ void k(const T* x, T* y, int n)
        {
            const int i = threadIdx.x;
            if (i < n) {
                y[i] = twice<T>(x, i);
            }
            __syncthreads();
        }
        """)
    mutants = tool.generate("k.cu", source)
    assert all(m.line >= 5 or m.line == 2 for m in mutants)  # never the comment line
    changed = {(m.operator, m.after) for m in mutants}
    assert ("bound", "if (i <= n) {") in changed
    assert ("comparison", "if (i >= n) {") in changed
    assert ("bound-shift", "if (i < n - 1) {") in changed
    assert ("guard-drop", "if (true) {") in changed
    assert ("index-swap", "const int i = threadIdx.y;") in changed
    assert ("race", "y[i] += twice<T>(x, i);") in changed
    assert ("sync-drop", "; /* __syncthreads() dropped */") in changed
    assert not any("twice<float>" in m.after or "template<" in m.after for m in mutants)
    assert not any(m.operator == "float-in-double" and "const float* x" in m.after for m in mutants)


TOY_KERNEL = """\
extern "C" __global__ void add_two(const float* x, float* y, int n)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        y[i] = x[i] + 2;
    }
}
"""

TOY_TEST = """\
import os
from pathlib import Path
import numpy as np
from gpuconv.cuda.emulate import EmulatedModule

def test_add_two():
    module = EmulatedModule(path=Path(os.environ["GPUCONV_KERNEL_DIR"]) / "toy.cu")
    x = np.arange(64, dtype=np.float32)
    y = np.full(64, np.nan, np.float32)
    module.get_function("add_two")((2,), (32,), (x, y, np.int32(64)))  # the grid covers n exactly
    assert np.array_equal(y, x + 2)
"""


def test_a_run_on_a_tiny_kernel_reports_the_killed_and_the_surviving_mutant_exactly(tmp_path):
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    (kernels / "toy.cu").write_text(TOY_KERNEL)
    check = tmp_path / "test_toy.py"
    check.write_text(TOY_TEST)
    mutants = tool.generate_all(kernels)
    by_after = {m.after: m for m in mutants}
    killable = by_after["y[i] = x[i] + 3;"]   # a wrong result
    survivor = by_after["if (i <= n) {"]       # i never reaches n: the grid covers n exactly
    # pytest in the persistent workers, as the real run does (two mutants, one job: both in one worker)
    runner = tool.Runner(kernels, tool.default_test_command([str(check)]), jobs=1, nvrtc=False, timeout=300)
    results, elapsed, _ = runner.run([killable, survivor])
    assert [r.status for r in results] == ["killed", "survived"]
    assert "test_add_two" in results[0].detail
    summary = tool.score(results, {})
    assert summary["counts"]["killed"] == 1 and summary["counts"]["survived"] == 1 and summary["score"] == 0.5
    report = tool.format_report(results, summary, elapsed)
    assert "survivors (1):" in report and survivor.id in report and "+ if (i <= n) {" in report
    assert killable.id not in report
    # Reviewed as equivalent, the survivor leaves the score's denominator and is listed apart.
    results[1].status = "survived"
    summary = tool.score(results, {survivor.id: {"id": survivor.id, "after": survivor.after, "reason": "grid = n"}})
    assert summary["counts"]["equivalent"] == 1 and summary["counts"]["survived"] == 0 and summary["score"] == 1.0
    # Listed as equivalent but killed: the review was wrong, and the report says so.
    results[0].status = "killed"
    summary = tool.score(results, {killable.id: {"id": killable.id, "after": killable.after, "reason": "wrong"}})
    assert summary["killed_equivalents"] == [killable.id]
    assert "but killed" in tool.format_report(results, summary, elapsed)


def test_a_plain_command_runs_in_a_subprocess_per_mutant(tmp_path):
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    (kernels / "toy.cu").write_text(TOY_KERNEL)
    # the "test" passes exactly when the mutated copy still holds `+ 2`
    check = [sys.executable, "-c", "import os, sys; from pathlib import Path; "
             "sys.exit('+ 2' not in (Path(os.environ['GPUCONV_KERNEL_DIR']) / 'toy.cu').read_text())"]
    by_after = {m.after: m for m in tool.generate_all(kernels)}
    runner = tool.Runner(kernels, check, jobs=2, nvrtc=False, timeout=300)
    results, _, _ = runner.run([by_after["y[i] = x[i] + 1;"], by_after["if (i <= n) {"]])
    assert [r.status for r in results] == ["killed", "survived"]


def test_resume_carries_killed_results_only(tmp_path, real_mutants):
    first, second = real_mutants[:2]
    path = tmp_path / "previous.json"
    path.write_text(tool.json.dumps({"mutants": [
        {**first.summary(), "status": "killed", "seconds": 1.0, "detail": "FAILED x"},
        {**second.summary(), "status": "survived", "seconds": 1.0, "detail": ""}]}))
    carried = tool.carried_results(path, real_mutants)
    assert list(carried) == [first.id] and carried[first.id].carried and carried[first.id].status == "killed"
    changed = {**first.summary(), "after": "something else", "status": "killed"}
    path.write_text(tool.json.dumps({"mutants": [changed]}))
    assert tool.carried_results(path, real_mutants) == {}


def test_the_runner_refuses_tests_that_fail_on_the_unmutated_source(tmp_path):
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    (kernels / "toy.cu").write_text(TOY_KERNEL)
    runner = tool.Runner(kernels, [sys.executable, "-c", "raise SystemExit(1)"], jobs=1, nvrtc=False)
    with pytest.raises(ArgumentError, match="UNMUTATED"):
        runner.run(tool.generate_all(kernels)[:1])


def test_a_hanging_mutant_is_stopped_by_the_timeout(tmp_path):
    code, _, seconds = tool._run_one([sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ),
                                     1.0, tmp_path)
    assert code is None and seconds < 30


def test_equivalents_list_is_reviewed_and_current(real_mutants):
    equivalents = tool.load_equivalents()
    assert tool.stale_equivalents(equivalents, real_mutants) == []
    for entry in equivalents.values():
        assert len(entry["reason"].split()) >= 5, entry["id"]


def test_equivalents_list_rejects_entries_without_a_reason(tmp_path):
    path = tmp_path / "eq.toml"
    path.write_text('[[equivalent]]\nid = "a:b:c:d"\nafter = "x"\nreason = " "\n')
    with pytest.raises(ArgumentError, match="needs a reason"):
        tool.load_equivalents(path)
    path.write_text('[[equivalent]]\nid = "a:b:c:d"\n')
    with pytest.raises(ArgumentError, match="lacks"):
        tool.load_equivalents(path)


def test_stale_equivalents_are_reported(real_mutants):
    mutant = real_mutants[0]
    entries = {mutant.id: {"id": mutant.id, "after": mutant.after, "reason": "r"},
               "conv2d:gone:bound:00000000": {"id": "conv2d:gone:bound:00000000", "after": "x", "reason": "r"}}
    assert tool.stale_equivalents(entries, real_mutants) == ["conv2d:gone:bound:00000000"]
    entries = {mutant.id: {"id": mutant.id, "after": "a different change", "reason": "r"}}
    assert tool.stale_equivalents(entries, real_mutants) == [mutant.id]


def test_the_command_lists_mutants(capsys):
    from gpuconv import __main__ as cli
    assert cli.main(["mutants", "--list", "--source", "pool2d.cu", "--operator", "sync-drop"]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith("0 mutants")  # pool2d.cu has no barrier
    assert cli.main(["mutants", "--list", "--operator", "sync-drop"]) == 0
    assert "conv2d:block_sum:sync-drop:" in capsys.readouterr().out
    assert cli.main(["mutants", "--only", "no:such:id:0"]) == 1
    assert "--only" in capsys.readouterr().err


def test_kernel_dir_override_is_a_development_hook(tmp_path, monkeypatch):
    (tmp_path / "pool2d.cu").write_text("// replaced\n")
    runtime.read_source.cache_clear()
    try:
        monkeypatch.setenv("GPUCONV_KERNEL_DIR", str(tmp_path))
        assert runtime.read_source("pool2d.cu") == "// replaced\n"
        # a source the folder lacks still comes from the package
        assert runtime.read_source("conv2d.cu") == (KERNELS / "conv2d.cu").read_text()
        runtime.read_source.cache_clear()
        monkeypatch.setenv("GPUCONV_KERNEL_DIR", str(tmp_path / "missing"))
        with pytest.raises(KernelError, match="GPUCONV_KERNEL_DIR"):
            runtime.read_source("pool2d.cu")
        runtime.read_source.cache_clear()
        monkeypatch.delenv("GPUCONV_KERNEL_DIR")
        assert runtime.read_source("pool2d.cu") == (KERNELS / "pool2d.cu").read_text()
    finally:
        runtime.read_source.cache_clear()
