"""gpuconv/ops/norm_cpu.py (batch norm on NumPy arrays, the batch in parts and chunks) against the
array-module expressions of norm.py run whole-array (the path CuPy takes), and ReLU's backward
against np.where, signs of zeros and NaN included."""
import numpy as np
import pytest

import gpuconv
from gpuconv.ops import activation, norm, norm_cpu


@pytest.fixture(params=[0, 1, 2], ids=lambda n: f"workers{n}")
def workers(request):
    gpuconv.set_cpu_workers(request.param)
    yield request.param
    gpuconv.set_cpu_workers(None)


@pytest.fixture(autouse=True)
def every_size_in_parts(monkeypatch):
    """The small arrays here run in norm_cpu too (by default they take the whole-array path)."""
    monkeypatch.setattr(norm_cpu, "MIN_BYTES", 1)


def test_small_arrays_take_the_whole_array_path(monkeypatch):
    monkeypatch.setattr(norm_cpu, "MIN_BYTES", 4096)
    assert not norm._on_cpu(np.ones((2, 3, 4, 4)))          # 768 bytes
    assert norm._on_cpu(np.ones((8, 4, 4, 4)))               # 4096
    assert not norm._on_cpu(np.ones((0, 4, 4, 4)))


@pytest.fixture(params=["one-image-chunks", "default-chunks"])
def chunk_bytes(request, monkeypatch):
    if request.param == "one-image-chunks":
        monkeypatch.setattr(norm_cpu, "CHUNK_BYTES", 1)
    return request.param


def _whole_array(monkeypatch):
    """norm.py's expressions on NumPy arrays: the reference (CuPy runs them on a GPU)."""
    monkeypatch.setattr(norm, "_on_cpu", lambda x: False)


@pytest.mark.parametrize("shape", [(7, 3, 5, 4), (2, 5, 1, 1), (1, 2, 3, 3), (33, 4, 6, 6)])
@pytest.mark.parametrize("affine", [True, False])
def test_training_forward_and_backward_match_the_whole_array_math(shape, affine, workers, chunk_bytes,
                                                                    monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape) * 3 + 5  # a large mean: the centred variance keeps its digits
    dy = rng.standard_normal(shape)
    weight = rng.random(shape[1]) + 0.5 if affine else None
    bias = rng.standard_normal(shape[1]) if affine else None
    got = norm.batch_norm2d(x, weight, bias)
    grads = norm.batch_norm2d_backward(dy, x, weight, got[1], got[3])
    eval_out = norm.batch_norm2d(x, weight, bias, mean=got[1], var=got[2])
    eval_grads = norm.batch_norm2d_backward(dy, x, weight, got[1], got[3], training=False)
    with monkeypatch.context() as m:
        _whole_array(m)
        want = norm.batch_norm2d(x, weight, bias)
        want_grads = norm.batch_norm2d_backward(dy, x, weight, want[1], want[3])
        want_eval = norm.batch_norm2d(x, weight, bias, mean=want[1], var=want[2])
        want_eval_grads = norm.batch_norm2d_backward(dy, x, weight, want[1], want[3], training=False)
    for g, w in zip(got + grads + eval_out + eval_grads, want + want_grads + want_eval + want_eval_grads):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10)


def test_float32_in_float32_out_and_need_dx_false(workers):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((9, 4, 5, 5)).astype(np.float32)
    y, mean, var, invstd = norm.batch_norm2d(x, None, None)
    assert y.dtype == np.float32 and mean.dtype == np.float32
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(y.var(axis=(0, 2, 3)), 1, rtol=1e-3)
    dx, dweight, dbias = norm.batch_norm2d_backward(np.ones_like(x), x, None, mean, invstd, need_dx=False)
    assert dx is None and dbias.dtype == np.float32
    np.testing.assert_allclose(dbias, 9 * 25)


def test_non_contiguous_input(workers):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 6, 5, 5))[:, ::2]
    y, mean, var, _ = norm.batch_norm2d(x, None, None)
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(var, x.var(axis=(0, 2, 3)), rtol=1e-12)


def test_same_bits_every_call(workers):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 8, 7, 7)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    first = norm.batch_norm2d(x, None, None)
    grads = norm.batch_norm2d_backward(dy, x, None, first[1], first[3])
    for _ in range(4):
        again = norm.batch_norm2d(x, None, None)
        for a, b in zip(again + norm.batch_norm2d_backward(dy, x, None, again[1], again[3]), first + grads):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_backward_is_np_where_bit_for_bit(dtype):
    x = np.array([-1.0, -0.0, 0.0, 2.0, np.nan, 3.0, -4.0, np.inf, -np.inf], dtype)
    dy = np.array([-5.0, -1.0, np.nan, -2.0, 7.0, np.nan, np.nan, -0.0, -3.0], dtype)
    got = activation.relu_backward(dy, x)
    want = np.where(x > 0, dy, 0).astype(dtype)
    assert got.dtype == dtype
    assert np.array_equal(got, want, equal_nan=True)
    assert np.array_equal(np.signbit(got), np.signbit(want))  # +0 where masked, -0 kept where passed
    rng = np.random.default_rng(4)
    x, dy = rng.standard_normal((3, 4, 5)).astype(dtype), rng.standard_normal((3, 4, 5)).astype(dtype)
    assert np.array_equal(activation.relu_backward(dy, x.transpose(0, 2, 1).copy().transpose(0, 2, 1)),
                          np.where(x > 0, dy, 0))
