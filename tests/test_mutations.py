"""Mutation tests: plant typical CUDA bugs in copies of the real kernels and show that the emulated
checks catch each one (results differ from NumPy, NaN, results that depend on the thread order, an
ASan report or a TSan report). Every mutation asserts that its substitution really changed the
source, so a rewrite of the kernels fails here loudly instead of letting a mutant pass unplanted."""
import importlib.util
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gpuconv.cuda import emulate
from gpuconv.cuda import runtime as compiler

CASES_FILE = Path(__file__).parent / "emulator_kernels" / "emulation_cases.py"
_spec = importlib.util.spec_from_file_location("emulation_cases", CASES_FILE)
cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cases)

# Partial tiles, padding on every side, and R = C/groups*KH*KW = 27 > TILE_R, so the direct kernels
# walk several reduction tiles; LeNet's conv2 (R = 150) as a second shape.
CONV_CASES = [cases.CONV_CASES[0], cases.CONV_CASES[3]]
POOL_CASES = [("max", (1, 2, 7, 7), 3, 2, 1, None), ("avg", (2, 2, 7, 7), 3, 2, 1, True)]
# Small enough for one OS thread per CUDA thread under TSan; R = 18 still spans two tiles.
TSAN_CONV_CASES = [((1, 2, 4, 3), (2, 2, 3, 3), 1, 1, 1, 1)]


def function_span(source, name):
    """(start, end) of the definition of kernel or device function `name`: from its signature to
    the next top-level `template` or `__global__`/`__device__` definition."""
    match = re.search(rf"\b{re.escape(name)}\s*\(", source)
    assert match, f"{name} is not in the kernel source any more: update this mutation"
    following = re.compile(r"^(template\s*<|__global__|__device__)", re.M)
    after = following.search(source, source.index("{", match.end()))
    return match.start(), after.start() if after else len(source)


def mutate(source, function, old, new, occurrence=0, regex=False):
    """`source` with the `occurrence`-th match of `old` inside `function` replaced by `new`."""
    start, end = function_span(source, function)
    body = source[start:end]
    pattern = re.compile(old if regex else re.escape(old))
    matches = list(pattern.finditer(body))
    assert len(matches) > occurrence, (f"mutation target {old!r} (#{occurrence}) not found in {function}: "
                                       "the kernel changed, update this mutation")
    hit = matches[occurrence]
    mutated_body = body[:hit.start()] + new + body[hit.end():]
    assert mutated_body != body
    return source[:start] + mutated_body + source[end:]


CONV = compiler.read_source("conv2d.cu")
POOL = compiler.read_source("pool2d.cu")

MUTANTS = {
    # Drop the barrier between loading the shared tiles and using them.
    "forward_load_barrier": ("conv2d.cu", lambda: mutate(
        CONV, "conv2d_forward_direct", "__syncthreads();", "/* mutant: barrier dropped */", 0)),
    # Drop the barrier that keeps the next tile load from overwriting a tile still being read.
    "forward_reuse_barrier": ("conv2d.cu", lambda: mutate(
        CONV, "conv2d_forward_direct", "__syncthreads();", "/* mutant: barrier dropped */", 1)),
    # Drop the barrier inside the reduction tree of the filter/bias gradients.
    "reduction_tree_barrier": ("conv2d.cu", lambda: mutate(
        CONV, "block_sum", "__syncthreads();", "/* mutant: barrier dropped */", 1)),
    # Off-by-one in the halo bound of the input tile load: row H (past the image) is read.
    "halo_bound_off_by_one": ("conv2d.cu", lambda: mutate(
        CONV, "conv2d_forward_direct", "ih < H", "ih <= H", 0)),
    # Every thread adds into one shared slot instead of the fixed tree: a data race, and on a
    # GPU a lost update; sequential fibers add without losses, but in a thread-dependent order.
    "racy_shared_accumulation": ("conv2d.cu", lambda: mutate(
        CONV, "block_sum", r"buffer\[tid\] = value;",
        "if (tid == 0) { buffer[0] = T(0); }\n    __syncthreads();\n"
        "    buffer[0] += value;  /* mutant: racy += instead of the tree */\n"
        "    __syncthreads();\n    return buffer[0];\n", 0, regex=True)),
    # The filter gradient's partial sums scattered with a racy += into global memory instead of the
    # fixed-order tree.
    "racy_global_accumulation": ("conv2d.cu", lambda: mutate(
        CONV, "conv2d_backward_filter_partial",
        r"(?s)for \(int t = 0; t < FILTER_TAPS; \+\+t\) \{\s*sums\[t\]\[tid\] = acc\[t\];.*?= sums\[tid\]\[0\];\s*\}",
        "const long long base = ((long long)k * Cg + c) * taps + tap0;\n"
        "    if (tid == 0) { for (int t = 0; t < FILTER_TAPS && tap0 + t < taps; ++t) { out[base + t] = T(0); } }\n"
        "    __syncthreads();\n"
        "    for (int t = 0; t < FILTER_TAPS && tap0 + t < taps; ++t) {\n"
        "        out[base + t] += acc[t];  /* mutant: racy scatter instead of the tree */\n    }\n"
        "    __syncthreads();", 0, regex=True)),
    # Drop the barrier between the levels of the filter gradient's side-by-side trees.
    "filter_tree_barrier": ("conv2d.cu", lambda: mutate(
        CONV, "conv2d_backward_filter_partial", "__syncthreads();", "/* mutant: barrier dropped */", 1)),
    # The pooling window is no longer clipped at the bottom edge: an out-of-bounds pool index.
    "avg_pool_window_unclipped": ("pool2d.cu", lambda: mutate(
        POOL, "avg_pool2d_forward", "min(h_start + KH, H)", "(h_start + KH)", 0)),
    # Off-by-one in the max-pool window's height: one row too many (still inside the image).
    "max_pool_window_off_by_one": ("pool2d.cu", lambda: mutate(
        POOL, "window_argmax", "min(h_start + KH, H)", "min(h_start + KH + 1, H)", 0)),
}

# What must catch each mutant: fibers-mode findings (a subset of what findings() returns), and the
# sanitizer that must report it.
EXPECTED = {
    "forward_load_barrier": ({"mismatch"}, None),
    "forward_reuse_barrier": ({"mismatch"}, "threads"),
    "reduction_tree_barrier": ({"mismatch"}, "threads"),
    "halo_bound_off_by_one": ({"mismatch"}, "asan"),
    "racy_shared_accumulation": ({"order-dependent"}, "threads"),
    "racy_global_accumulation": ({"order-dependent"}, "threads"),
    "filter_tree_barrier": ({"mismatch"}, None),
    "avg_pool_window_unclipped": ({"mismatch"}, "asan"),
    "max_pool_window_off_by_one": ({"mismatch"}, None),
}
assert EXPECTED.keys() == MUTANTS.keys()


def mutant_modules(source_name, text):
    """The EmulatedModule the launchers would build for `text` as kernels/<source_name>."""
    with cases.kernel_sources({source_name: text}), emulate.emulation():
        return compiler.load_module(source_name, compiler.template_instances(compiler.KERNELS[source_name]))


@pytest.fixture(scope="module")
def mutant_sources():
    """Every mutant's text, with all the builds the tests below need compiled in parallel."""
    texts = {name: (source_name, make()) for name, (source_name, make) in MUTANTS.items()}
    builds = []
    for name, (source_name, text) in texts.items():
        module = mutant_modules(source_name, text)
        builds.append((module, "fibers"))
        if EXPECTED[name][1]:
            builds.append((module, EXPECTED[name][1]))
    emulate.build_all(builds)
    return texts


def fibers_findings(source_name, text):
    run_cases = dict(conv_cases=CONV_CASES) if source_name == "conv2d.cu" else dict(pool_cases=POOL_CASES)
    with cases.kernel_sources({source_name: text}):
        return cases.findings(**run_cases)


def test_the_unmutated_kernels_raise_no_finding():
    assert fibers_findings("conv2d.cu", CONV) == set()
    assert fibers_findings("pool2d.cu", POOL) == set()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MUTANTS))
def test_fibers_mode_catches_the_mutant(mutant_sources, name):
    source_name, text = mutant_sources[name]
    found = fibers_findings(source_name, text)
    expected = EXPECTED[name][0]
    assert expected <= found, f"mutant {name}: expected {expected}, the emulated checks found {found}"


def run_mutant_under(mode, source_name, text, tmp_path):
    path = tmp_path / source_name
    path.write_text(text)
    run = ("cases.check_against_numpy(conv_cases={conv!r})" if source_name == "conv2d.cu"
           else "cases.check_against_numpy(pool_cases={pool!r})")
    conv = TSAN_CONV_CASES if mode == "threads" else CONV_CASES[:1]
    code = textwrap.dedent(f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("emulation_cases", {str(CASES_FILE)!r})
        cases = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cases)
        from pathlib import Path
        with cases.kernel_sources({{{source_name!r}: Path({str(path)!r}).read_text()}}):
            try:
                {run.format(conv=conv, pool=POOL_CASES)}
            except AssertionError as exc:
                print("results differ:", exc)
    """)
    return emulate.run_sanitized(mode, code, timeout=500)


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name, (_, tool) in EXPECTED.items() if tool == "threads"])
def test_tsan_reports_the_race(mutant_sources, name, tmp_path):
    source_name, text = mutant_sources[name]
    result = run_mutant_under("threads", source_name, text, tmp_path)
    assert "WARNING: ThreadSanitizer: data race" in result.stderr, (
        f"mutant {name}: no race reported\n{result.stdout}\n{result.stderr[-3000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name, (_, tool) in EXPECTED.items() if tool == "asan"])
def test_asan_reports_the_out_of_bounds_access(mutant_sources, name, tmp_path):
    source_name, text = mutant_sources[name]
    result = run_mutant_under("asan", source_name, text, tmp_path)
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in result.stderr, (
        f"mutant {name}: no ASan report\n{result.stdout}\n{result.stderr[-3000:]}")
    kernel = "conv2d_forward_direct" if source_name == "conv2d.cu" else "avg_pool2d_forward"
    assert kernel in result.stderr


def test_mutations_fail_loudly_when_their_target_is_gone():
    with pytest.raises(AssertionError, match="not found in conv2d_forward_direct"):
        mutate(CONV, "conv2d_forward_direct", "no such text", "x")
    with pytest.raises(AssertionError, match="no_such_kernel is not in the kernel source"):
        mutate(CONV, "no_such_kernel", "__syncthreads();", "")


# ---------------------------------------------------------------------------------------------
# Issue 17's planted bugs: each passed the whole suite once; each is now caught by a deterministic
# test in test_kernel_killers.py (called here directly on the mutated source).

KILLERS_FILE = Path(__file__).parent / "test_kernel_killers.py"
_killers_spec = importlib.util.spec_from_file_location("kernel_killers", KILLERS_FILE)
killers = importlib.util.module_from_spec(_killers_spec)
_killers_spec.loader.exec_module(killers)

PLANTED = {
    # The weight tile of backward-data loads channel cc instead of c0 + cc: wrong once C/groups > 32
    # (the widest tile).
    "weight_tile_channel": ("conv2d.cu", lambda: mutate(
        CONV, "conv2d_backward_data_direct", "const int c = c0 + cc;", "const int c = cc;", 0),
        lambda: killers.test_backward_data_reaches_the_second_channel_tile(killers.CONV_WIDE["C36"])),
    # The LP backward's exponent truncated to an integer: wrong for any non-integer norm_type.
    "lp_integer_exponent": ("pool2d.cu", lambda: mutate(
        POOL, "lp_pool2d_backward", "power(value / out, norm_type - T(1))",
        "power(value / out, T(int(norm_type) - 1))", 0),
        killers.test_lp_pool_with_a_non_integer_norm),
    # The LP backward's guard `out != 0` made `out > 1e-30`: drops windows whose sum is negative.
    "lp_positive_guard": ("pool2d.cu", lambda: mutate(
        POOL, "lp_pool2d_backward", "out != T(0)", "out > T(1e-30)", 0),
        killers.test_lp_pool_backward_keeps_windows_with_a_negative_sum),
    # Backward-data drops the dilation on the H axis only.
    "backward_data_dilation_h": ("conv2d.cu", lambda: mutate(
        CONV, "conv2d_backward_data_direct", "kh * dil_h", "kh", 0),
        lambda: killers.test_each_axis_stride_padding_dilation_alone("dilation-h")),
}


@pytest.mark.parametrize("name", list(PLANTED))
def test_issue_17_planted_bug_is_caught_by_its_deterministic_test(name):
    source_name, make, killer = PLANTED[name]
    with cases.kernel_sources({source_name: make()}):
        with pytest.raises(AssertionError, match="differ from the NumPy path"):
            killer()
