"""conv2d's direct filter gradient without a bias gradient, under emulation: the branches of
conv2d_backward_filter_partial that need_bias=False reaches. Found by `python -m gpuconv mutants`
(2026-12-02): every emulated conv test asked for db too, so the partial-sum workspace's layout
without the bias row (its stride, and which block may write a bias) was never checked. The shape
gives 4 slices (1024 items of 256 threads each, one (k, c) pair), so a wrong stride or a stray
bias write lands on another slice's sums; in reverse block order a stray write comes after the
slice it lands on has written, so the result shows it whatever order a correct kernel uses."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from gpuconv import ops
from gpuconv.ops import conv_cuda

CASES_FILE = Path(__file__).parent / "emulator_kernels" / "emulation_cases.py"
_spec = importlib.util.spec_from_file_location("emulation_cases", CASES_FILE)
cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cases)

CASE = ((4, 1, 16, 16), (1, 1, 3, 3), 1, 1, 1, 1)  # N*OH*OW = 1024 items, K*C = 1 pair


def gradients(need_bias):
    x, w, _, dy = cases.conv_inputs(CASE, np.float64)
    return dict(zip(("dx", "dw", "db"), ops.conv2d_backward(dy, x, w, 1, 1, 1, 1, algo="direct",
                                                            need_bias=need_bias)))


def test_the_case_splits_each_sum_into_several_slices():
    geometry = conv_cuda._Geometry(CASE[0], CASE[1], (1, 1), (1, 1), (1, 1), 1)
    assert conv_cuda._slices(geometry.N * geometry.P, geometry.K * geometry.Cg) == 4


@pytest.mark.parametrize("order", ["forward", "reverse"])
@pytest.mark.parametrize("need_bias", [False, True])
def test_direct_filter_gradient_with_and_without_the_bias(order, need_bias):
    expected = gradients(need_bias)
    got = cases.emulated(gradients, need_bias, order=order)
    assert (got["db"] is None) == (not need_bias)
    bad = cases.mismatches(got, expected, np.float64)
    assert not bad, f"{bad} differ from the NumPy path (need_bias={need_bias}, {order} order)"
