"""max/avg/lp pooling on the NumPy path: forward against an obvious loop reference, float64
gradient checks (overlapping windows, padding, count_include_pad), tie and NaN rules of max pool."""
import numpy as np
import pytest

from gpuconv import backend
from gpuconv.gradcheck import gradcheck
from gpuconv.ops import (avg_pool2d, avg_pool2d_backward, lp_pool2d, lp_pool2d_backward, max_pool2d,
                         max_pool2d_backward)


@pytest.fixture(autouse=True)
def numpy_path():
    backend._emulation_override.append(False)
    yield
    backend._emulation_override.pop()


def reference_pool(mode, x, kernel, stride, padding, p=2.0, count_include_pad=True):
    """One window at a time. Padding cells are NaN-marked so they can be told from data."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x.shape
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    y = np.zeros((n, c, oh, ow))
    inside = np.zeros((h + 2 * ph, w + 2 * pw), bool)
    inside[ph:ph + h, pw:pw + w] = True
    xp = np.zeros((n, c, h + 2 * ph, w + 2 * pw))
    xp[:, :, ph:ph + h, pw:pw + w] = x
    for a in range(n):
        for b in range(c):
            for i in range(oh):
                for j in range(ow):
                    rows, cols = slice(i * sh, i * sh + kh), slice(j * sw, j * sw + kw)
                    values, real = xp[a, b, rows, cols], inside[rows, cols]
                    if mode == "max":
                        y[a, b, i, j] = np.nan if np.isnan(values[real]).any() else values[real].max()
                    elif mode == "avg":
                        y[a, b, i, j] = values.sum() / (kh * kw if count_include_pad else real.sum())
                    else:
                        y[a, b, i, j] = (values ** p).sum() ** (1 / p)
    return y


def distinct_values(shape, dtype=np.float64, seed=0):
    """Well separated values, so max pool is differentiable at every point a gradcheck probes."""
    values = np.random.default_rng(seed).permutation(int(np.prod(shape))) * 0.1 - 1.0
    return values.reshape(shape).astype(dtype)


POOL_CASES = [
    # (x shape, kernel, stride, padding)
    ((2, 3, 8, 8), (2, 2), (2, 2), (0, 0)),     # LeNet
    ((1, 2, 7, 9), (3, 3), (2, 2), (1, 1)),     # overlapping, padded
    ((2, 1, 6, 7), (3, 2), (1, 1), (1, 1)),     # stride 1, non-square kernel
    ((1, 2, 9, 8), (3, 3), (3, 2), (0, 1)),     # non-square stride
    ((1, 1, 10, 10), (5, 4), (2, 3), (2, 2)),
    ((1, 2, 5, 5), (2, 2), (1, 1), (0, 0)),     # overlapping without padding
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", POOL_CASES)
def test_max_pool_forward(case, dtype):
    shape, k, s, p = case
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    y = max_pool2d(x, k, s, p)
    assert y.dtype == dtype and y.flags.c_contiguous
    np.testing.assert_array_equal(y, reference_pool("max", x, k, s, p).astype(dtype))


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", POOL_CASES)
def test_avg_pool_forward(case, dtype, count_include_pad):
    shape, k, s, p = case
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    y = avg_pool2d(x, k, s, p, count_include_pad)
    assert y.dtype == dtype and y.flags.c_contiguous
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(y, reference_pool("avg", x, k, s, p, count_include_pad=count_include_pad),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("norm_type", [1, 2, 3, 1.5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", [c for c in POOL_CASES if c[3] == (0, 0)])
def test_lp_pool_forward(case, dtype, norm_type):
    shape, k, s, _ = case
    x = np.random.default_rng(0).uniform(0.1, 2.0, shape).astype(dtype)
    y = lp_pool2d(x, norm_type, k, s)
    assert y.dtype == dtype and y.flags.c_contiguous
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, reference_pool("lp", x, k, s, (0, 0), p=norm_type), rtol=tol)


def test_lp_pool_with_norm_1_is_window_sum_and_2_is_l2_norm():
    x = np.random.default_rng(3).standard_normal((1, 1, 4, 4))
    windows = x.reshape(1, 1, 2, 2, 2, 2).transpose(0, 1, 2, 4, 3, 5)
    np.testing.assert_allclose(lp_pool2d(x, 1, 2), windows.sum((-1, -2)))
    np.testing.assert_allclose(lp_pool2d(x, 2, 2), np.sqrt((windows ** 2).sum((-1, -2))))


def test_stride_defaults_to_kernel_size():
    x = np.random.default_rng(0).standard_normal((1, 1, 6, 6))
    np.testing.assert_array_equal(max_pool2d(x, 3), max_pool2d(x, 3, 3))
    np.testing.assert_array_equal(avg_pool2d(x, 2), avg_pool2d(x, 2, 2))
    np.testing.assert_array_equal(lp_pool2d(x, 2, 3), lp_pool2d(x, 2, 3, 3))


@pytest.mark.parametrize("case", POOL_CASES)
def test_max_pool_gradient(case):
    shape, k, s, p = case
    x = distinct_values(shape)
    gradcheck(lambda x: max_pool2d(x, k, s, p), [x], lambda dy, x: max_pool2d_backward(dy, x, k, s, p))


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("case", POOL_CASES)
def test_avg_pool_gradient(case, count_include_pad):
    shape, k, s, p = case
    x = np.random.default_rng(0).standard_normal(shape)
    gradcheck(lambda x: avg_pool2d(x, k, s, p, count_include_pad), [x],
              lambda dy, x: avg_pool2d_backward(dy, x, k, s, p, count_include_pad))


@pytest.mark.parametrize("norm_type", [1, 2, 3, 2.5])
@pytest.mark.parametrize("case", [c for c in POOL_CASES if c[3] == (0, 0)])
def test_lp_pool_gradient(case, norm_type):
    shape, k, s, _ = case
    x = np.random.default_rng(0).uniform(0.2, 2.0, shape)
    gradcheck(lambda x: lp_pool2d(x, norm_type, k, s), [x],
              lambda dy, x: lp_pool2d_backward(dy, x, norm_type, k, s))


def test_lp_pool_gradient_is_zero_where_window_sum_is_zero():
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 0, 0] = 1.0  # only the first window has a non-zero sum
    dx = lp_pool2d_backward(np.ones((1, 1, 2, 2)), x, 2, 2)
    assert np.isfinite(dx).all()
    expected = np.zeros_like(x)
    expected[0, 0, 0, 0] = 1.0  # d sqrt(x^2) / dx at x = 1
    np.testing.assert_array_equal(dx, expected)


@pytest.mark.parametrize("mode", ["max", "avg", "lp"])
def test_float32_gradients_match_float64(mode):
    x = np.random.default_rng(0).uniform(0.2, 2.0, (2, 3, 7, 7))
    dy = np.random.default_rng(1).standard_normal((2, 3, 4, 4))
    backward = {"max": lambda dy, x: max_pool2d_backward(dy, x, 3, 2, 1),
                "avg": lambda dy, x: avg_pool2d_backward(dy, x, 3, 2, 1, False),
                "lp": lambda dy, x: lp_pool2d_backward(dy, x, 2, 3, 2)}[mode]
    if mode == "lp":
        dy = dy[:, :, :3, :3]
    g64 = backward(dy, x)
    g32 = backward(dy.astype(np.float32), x.astype(np.float32))
    assert g32.dtype == np.float32 and g32.flags.c_contiguous
    np.testing.assert_allclose(g32, g64, rtol=1e-5, atol=1e-5)


def test_max_pool_ties_go_to_first_in_row_major_order():
    x = np.array([[[[1.0, 3.0], [3.0, 3.0]]]])
    dx = max_pool2d_backward(np.ones((1, 1, 1, 1)), x, 2)
    np.testing.assert_array_equal(dx, [[[[0.0, 1.0], [0.0, 0.0]]]])
    constant = np.full((1, 1, 4, 4), 2.0)  # overlapping windows, every value tied
    dx = max_pool2d_backward(np.ones((1, 1, 3, 3)), constant, 2, 1)
    first_of_each_window = np.zeros((4, 4))
    first_of_each_window[:3, :3] = 1.0
    np.testing.assert_array_equal(dx[0, 0], first_of_each_window)


def test_max_pool_padding_never_wins_even_against_minus_inf():
    x = np.full((1, 1, 2, 2), -np.inf)
    assert (max_pool2d(x, 3, 1, 1) == -np.inf).all()
    dx = max_pool2d_backward(np.ones((1, 1, 2, 2)), x, 3, 1, 1)
    assert dx.sum() == 4.0 and dx[0, 0, 0, 0] == 4.0  # every window's first real element


def test_max_pool_nan_propagates_and_takes_the_gradient():
    x = np.array([[[[1.0, np.nan, 5.0, 0.0],
                    [np.nan, 9.0, 1.0, 2.0]]]])
    y = max_pool2d(x, 2)
    assert np.isnan(y[0, 0, 0, 0]) and y[0, 0, 0, 1] == 5.0
    dx = max_pool2d_backward(np.array([[[[2.0, 3.0]]]]), x, 2)
    np.testing.assert_array_equal(dx, [[[[0.0, 2.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]]]])


@pytest.mark.parametrize("mode", ["max", "avg", "lp"])
def test_non_contiguous_and_negative_stride_inputs(mode):
    x = np.random.default_rng(0).uniform(0.2, 2.0, (2, 3, 8, 9))
    forward = {"max": lambda x: max_pool2d(x, 3, 2, 1), "avg": lambda x: avg_pool2d(x, 3, 2, 1),
               "lp": lambda x: lp_pool2d(x, 2, 3, 2)}[mode]
    backward = {"max": lambda dy, x: max_pool2d_backward(dy, x, 3, 2, 1),
                "avg": lambda dy, x: avg_pool2d_backward(dy, x, 3, 2, 1),
                "lp": lambda dy, x: lp_pool2d_backward(dy, x, 2, 3, 2)}[mode]
    y = forward(x)
    dy = np.random.default_rng(1).standard_normal(y.shape)
    dx = backward(dy, x)
    odd_x = x[:, :, ::-1, ::-1].copy()[:, :, ::-1, ::-1]
    odd_dy = np.asfortranarray(dy)
    np.testing.assert_allclose(forward(odd_x), y, rtol=1e-14)
    got = backward(odd_dy, odd_x)
    assert got.flags.c_contiguous
    np.testing.assert_allclose(got, dx, rtol=1e-14)


@pytest.mark.parametrize("mode", ["max", "avg", "lp"])
def test_empty_batch_gives_empty_output(mode):
    x = np.zeros((0, 3, 6, 6), np.float32)
    y = {"max": max_pool2d(x, 2), "avg": avg_pool2d(x, 2), "lp": lp_pool2d(x, 2, 2)}[mode]
    assert y.shape == (0, 3, 3, 3) and y.dtype == np.float32


def test_dispatch_hands_pool_cuda_normalised_arguments(monkeypatch):
    import sys
    import gpuconv.ops as ops_package
    calls = []

    class FakePoolCuda:
        @staticmethod
        def pool2d_forward(*args):
            calls.append(args)
            return "forward"

        @staticmethod
        def pool2d_backward(*args):
            calls.append(args)
            return "backward"

    monkeypatch.setitem(sys.modules, "gpuconv.ops.pool_cuda", FakePoolCuda)
    monkeypatch.setattr(ops_package, "pool_cuda", FakePoolCuda, raising=False)
    x = np.ones((1, 1, 6, 6), np.float32)
    backend._emulation_override.append(True)
    try:
        assert max_pool2d(x, 3, padding=1) == "forward"
        assert avg_pool2d(x, (3, 2), 1, (1, 0), count_include_pad=False) == "forward"
        assert lp_pool2d(x, 2, 2) == "forward"
        assert lp_pool2d_backward(np.ones((1, 1, 3, 3), np.float32), x, 3, 2) == "backward"
    finally:
        backend._emulation_override.pop()
    assert calls[0] == ("max", x, (3, 3), (3, 3), (1, 1), 0.0, True, False)  # no indices asked for
    assert calls[1] == ("avg", x, (3, 2), (1, 1), (1, 0), 0.0, False, False)
    assert calls[2] == ("lp", x, (2, 2), (2, 2), (0, 0), 2.0, True, False)
    assert calls[3][0] == "lp" and calls[3][2] is x and calls[3][3:] == ((2, 2), (2, 2), (0, 0), 3.0, True, None)
