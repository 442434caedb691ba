"""The CUDA launchers honour need_dx / need_dw / need_bias like the NumPy path (emulated kernels)."""
import itertools

import numpy as np
import pytest

from gpuconv import ops
from gpuconv.cuda import emulation


@pytest.mark.parametrize("algo", ["direct", "im2col"])
def test_each_gradient_can_be_skipped_and_the_rest_is_unchanged(algo):
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 3, 6, 5)), rng.standard_normal((4, 3, 3, 3))
    dy = rng.standard_normal((2, 4, 4, 3))
    reference = ops.conv2d_backward(dy, x, w)
    for need_dx, need_dw, need_bias in itertools.product([True, False], repeat=3):
        with emulation():
            got = ops.conv2d_backward(dy, x, w, algo=algo, need_dx=need_dx, need_dw=need_dw, need_bias=need_bias)
        for wanted, value, expected in zip((need_dx, need_dw, need_bias), got, reference):
            if wanted:
                np.testing.assert_allclose(value, expected, rtol=1e-12, atol=1e-12)
            else:
                assert value is None
