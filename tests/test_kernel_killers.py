"""Deterministic emulated-kernel tests aimed at branches the broad tests in test_emulated_kernels.py
do not reach, each found by `python -m gpuconv mutants` (a mutant of kernels/*.cu that the rest of
the fixed-shape suite let through). Each test names the branch it reaches and why its shape does.
float64 with the NumPy path as the reference: 1e-12 leaves no room for a slip to hide in rounding."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from gpuconv import ops
from gpuconv.cuda import emulation

CASES_FILE = Path(__file__).parent / "emulator_kernels" / "emulation_cases.py"
_spec = importlib.util.spec_from_file_location("emulation_cases", CASES_FILE)
cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cases)

F64 = np.float64


def check_conv(case, algos=("direct", "im2col"), dtype=F64, seed=0):
    expected = cases.conv_outputs(case, dtype, seed=seed)
    for algo in algos:
        got = cases.emulated(cases.conv_outputs, case, dtype, algo, seed=seed)
        bad = cases.mismatches(got, expected, dtype)
        assert not bad, f"conv {case} {algo}: {bad} differ from the NumPy path"


def check_pool(case, dtype=F64, x=None):
    expected = cases.pool_outputs(case, dtype, x=x)
    got = cases.emulated(cases.pool_outputs, case, dtype, x=x)
    bad = cases.mismatches(got, expected, dtype)
    assert not bad, f"pool {case}: {bad} differ from the NumPy path"


# ---------------------------------------------------------------------------------------------
# conv: wide channel counts


CONV_WIDE = {
    "C36": ((1, 36, 5, 4), (3, 36, 3, 2), 1, 1, 1, 1),          # C/groups = 36 > the wide tile's 32
    "groups2-Cg34": ((1, 68, 4, 5), (4, 34, 2, 2), 1, 0, 1, 2),  # 34 per group, second group offset
}


@pytest.mark.parametrize("case", list(CONV_WIDE.values()), ids=list(CONV_WIDE))
def test_backward_data_reaches_the_second_channel_tile(case):
    # conv2d_backward_data_direct tiles input channels (grid.y, c0 = blockIdx.y * tile_c; the wide
    # tile of conv_cuda.tile_config holds 32): only more than 32 channels per group reach c0 > 0,
    # where the weight tile must load channel c0 + cc.
    check_conv(case, algos=("direct",))


# ---------------------------------------------------------------------------------------------
# conv: a reduction whose last tile holds one row


CONV_LAST_ROW = {
    "R1": ((2, 1, 5, 6), (3, 1, 1, 1), 1, 0, 1, 1),              # R = 1: the only tile has one row
    "R17": ((2, 17, 5, 6), (5, 17, 1, 1), 1, 0, 1, 1),           # R = 17 = TILE_R + 1
    "R33-groups2": ((1, 22, 6, 5), (4, 11, 3, 1), 1, (1, 0), 1, 2),  # R = 11*3 = 33 per group
}


@pytest.mark.parametrize("case", list(CONV_LAST_ROW.values()), ids=list(CONV_LAST_ROW))
def test_forward_direct_reaches_a_last_tile_of_one_row(case):
    # The forward walks its reduction (C/groups * KH * KW rows) TILE_R = 16 rows at a time: only
    # R = 16k + 1 makes the last tile a single row, the one a loop bound off by one (r0 < R - 1)
    # drops. The other fixed cases have R = 2, 9, 12, 25, 27, 150 in the forward.
    check_conv(case, algos=("direct",))


# ---------------------------------------------------------------------------------------------
# conv: every axis's stride, padding and dilation on its own


AXIS_CASES = {
    "stride-h": ((2, 3, 9, 8), (4, 3, 3, 2), (2, 1), 0, 1, 1),
    "stride-w": ((2, 3, 8, 9), (4, 3, 2, 3), (1, 2), 0, 1, 1),
    "padding-h": ((2, 3, 7, 6), (4, 3, 3, 2), 1, (2, 0), 1, 1),
    "padding-w": ((2, 3, 6, 7), (4, 3, 2, 3), 1, (0, 2), 1, 1),
    "dilation-h": ((2, 3, 9, 7), (4, 3, 3, 2), 1, 0, (2, 1), 1),
    "dilation-w": ((2, 3, 7, 9), (4, 3, 2, 3), 1, 0, (1, 2), 1),
}


@pytest.mark.parametrize("axis", list(AXIS_CASES))
def test_each_axis_stride_padding_dilation_alone(axis):
    # With the same value on both axes a slip that uses one axis's stride/padding/dilation for the
    # other (or drops one, e.g. the H dilation of backward-data) still gives the right answer;
    # the fixed cases had dilation only on W, so dropping dil_h was left to the random test.
    check_conv(AXIS_CASES[axis])


# ---------------------------------------------------------------------------------------------
# LP pooling: non-integer norm, signed input


def test_lp_pool_with_a_non_integer_norm():
    # p = 1.5: an exponent truncated to an integer (p - 1 = 0.5 -> 0) changes every gradient.
    check_pool(("lp", (2, 2, 7, 6), 3, 2, 0, 1.5))
    check_pool(("lp", (1, 2, 5, 7), (2, 3), 1, 0, 2.5))


def test_lp_pool_backward_keeps_windows_with_a_negative_sum():
    # p = 1 on signed input: a window's sum (= y) can be negative, and its gradient (x/y)^0 * dy is
    # still dy; the backward's guard must skip only y == 0, not every y <= 0.
    case = ("lp", (2, 2, 6, 7), 2, 1, 0, 1.0)
    x = np.random.default_rng(4).standard_normal(case[1])
    y = cases.pool_forward(case, x)
    assert (y < 0).any() and (y > 0).any()
    check_pool(case, x=x)


def test_lp_pool_backward_gives_zero_for_a_window_that_sums_to_zero():
    # The backward's `out != 0` guard: only a window whose sum is exactly 0 takes it (every other LP
    # test has positive input), and there the gradient is 0, not 0/0.
    case = ("lp", (1, 2, 6, 6), 2, 2, 0, 2.0)
    x = np.random.default_rng(5).random(case[1]) + 0.1
    x[0, 0, 2:4, 2:4] = 0.0    # one whole window of zeros
    x[0, 1, :2, :] = 0.0       # a row of windows of zeros
    check_pool(case, x=x)


def lp_pool_with_padding(x, dy, p, kernel, stride, padding):
    """{"y", "dx"} of the LP kernels launched with padding, through pool_cuda's launcher (which passes
    padding for every mode) on the emulated device."""
    from gpuconv.ops import pool_cuda
    with cases.nan_filled_empty(), emulation():
        y = pool_cuda.pool2d_forward("lp", x, kernel, stride, padding, p, True)
        dx = pool_cuda.pool2d_backward("lp", dy, x, kernel, stride, padding, p, True)
    return {"y": np.array(y), "dx": np.array(dx)}


LP_PADDED_CASES = {
    # x shape, kernel, stride, padding (int pairs: what the launcher takes), norm_type, signed input
    "pad-h": ((2, 2, 7, 6), (3, 2), (2, 1), (1, 0), 2.0, True),
    "pad-w": ((2, 2, 6, 7), (2, 3), (1, 2), (0, 1), 2.0, True),
    "pad-h-p1.5": ((1, 3, 6, 5), (3, 2), (1, 1), (1, 0), 1.5, False),
    "pad-w-p1.5": ((1, 3, 5, 6), (2, 3), (1, 1), (0, 1), 1.5, False),
}


@pytest.mark.parametrize("name", list(LP_PADDED_CASES))
def test_lp_pool_kernels_with_padding_on_one_axis(name):
    # lp_pool2d has no padding (PyTorch's has none either), but the LP kernels take pad_h and pad_w
    # like the max and average kernels and pool_cuda's launcher passes them for every mode: with
    # padding 0 on both axes a slip that takes one axis's padding for the other, or starts a window
    # at row/column -1, is invisible. Zero padding adds 0^p = 0 to a window's sum, so the reference
    # is the public NumPy op on the zero-padded input (its gradient cropped back to x).
    shape, kernel, stride, padding, p, signed = LP_PADDED_CASES[name]
    rng = np.random.default_rng(7)
    x = rng.standard_normal(shape)
    if not signed:  # a non-integer power of a negative number has no real value
        x = np.abs(x) + 0.1
    ph, pw = padding
    x_padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    y = ops.lp_pool2d(x_padded, p, kernel, stride)
    dy = rng.standard_normal(y.shape)
    dx = ops.lp_pool2d_backward(dy, x_padded, p, kernel, stride)[..., ph:ph + shape[2], pw:pw + shape[3]]
    if signed:
        assert (x < 0).any() and (x > 0).any()
    bad = cases.mismatches(lp_pool_with_padding(x, dy, p, kernel, stride, padding), {"y": y, "dx": dx}, F64)
    assert not bad, f"lp pool {name}: {bad} differ from the NumPy path on the zero-padded input"


# ---------------------------------------------------------------------------------------------
# pooling: every axis's kernel, stride and padding on its own


POOL_AXIS_CASES = [
    (mode, shape, kernel, stride, padding, extra)
    for mode, extra in (("max", None), ("avg", True), ("avg", False))
    for shape, kernel, stride, padding in (
        ((1, 2, 9, 7), (3, 2), 1, (1, 0)),      # H: larger kernel, padding only on H
        ((1, 2, 7, 9), (2, 3), 1, (0, 1)),      # W: larger kernel, padding only on W
        ((1, 2, 9, 8), 3, (2, 1), (1, 0)),      # H: stride and padding only on H
        ((1, 2, 8, 9), 3, (1, 2), (0, 1)),      # W: stride and padding only on W
    )
] + [("lp", (1, 2, 9, 7), (3, 2), (2, 1), 0, 2.0), ("lp", (1, 2, 7, 9), (2, 3), (1, 2), 0, 2.0)]


@pytest.mark.parametrize("case", POOL_AXIS_CASES, ids=lambda c: f"{c[0]}-k{c[2]}-s{c[3]}-p{c[4]}-{c[5]}")
def test_pool_each_axis_kernel_stride_padding_alone(case):
    # Equal values on both axes hide a slip that takes one axis's kernel/stride/padding for the
    # other's; count_include_pad both ways reaches both branches of avg_divisor at a padded edge.
    check_pool(case)


def test_max_pool_float64_tells_apart_values_closer_than_float32_resolution():
    # Values 1 + k * 1e-12: one float32 value, distinct doubles. A max pool that compares in float
    # sees ties and picks the first; the double kernel must pick the true maximum.
    rng = np.random.default_rng(6)
    x = 1.0 + rng.permutation(2 * 3 * 7 * 8).reshape(2, 3, 7, 8) * 1e-12
    check_pool(("max", x.shape, 3, 2, 1, None), x=x)

