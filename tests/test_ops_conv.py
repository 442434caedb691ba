"""conv2d / conv2d_backward on the NumPy path: forward against an obvious loop reference,
float64 gradient checks over stride/padding/dilation/groups, dtype and layout handling."""
import numpy as np
import pytest

from gpuconv import backend
from gpuconv.ops import conv2d, conv2d_backward
from gpuconv.ops._args import conv_output_size
from gpuconv.gradcheck import gradcheck


@pytest.fixture(autouse=True)
def numpy_path():
    """These tests are about the NumPy path even when GPUCONV_EMULATE is set."""
    backend._emulation_override.append(False)
    yield
    backend._emulation_override.pop()


def reference_conv2d(x, w, b, stride, padding, dilation, groups):
    """Slow and obvious: zero-pad, then one dot product per output pixel and group."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    (sh, sw), (dh, dw) = stride, dilation
    if padding == "same":
        pads = [d * (k - 1) for k, d in zip(w.shape[2:], dilation)]
        pad_hw = [(p // 2, p - p // 2) for p in pads]
    else:
        pad_hw = [(padding[0], padding[0]), (padding[1], padding[1])]
    xp = np.pad(x, [(0, 0), (0, 0)] + pad_hw)
    n, c, h, wd = xp.shape
    o, cg, kh, kw = w.shape
    og = o // groups
    oh = (h - dh * (kh - 1) - 1) // sh + 1
    ow = (wd - dw * (kw - 1) - 1) // sw + 1
    y = np.zeros((n, o, oh, ow))
    for g in range(groups):
        for i in range(oh):
            for j in range(ow):
                window = xp[:, g * cg:(g + 1) * cg,
                            i * sh:i * sh + dh * (kh - 1) + 1:dh,
                            j * sw:j * sw + dw * (kw - 1) + 1:dw]
                y[:, g * og:(g + 1) * og, i, j] = np.einsum("nckl,ockl->no", window, w[g * og:(g + 1) * og])
    if b is not None:
        y += b.reshape(1, -1, 1, 1)
    return y


CASES = [
    # (x shape, w shape, stride, padding, dilation, groups)
    ((2, 3, 7, 7), (4, 3, 3, 3), (1, 1), (0, 0), (1, 1), 1),
    ((2, 3, 7, 6), (4, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((1, 2, 9, 8), (3, 2, 3, 2), (2, 2), (1, 1), (1, 1), 1),
    ((2, 2, 10, 9), (2, 2, 3, 3), (3, 3), (2, 2), (1, 1), 1),
    ((1, 2, 9, 9), (3, 2, 3, 3), (1, 1), (2, 2), (2, 2), 1),
    ((2, 4, 8, 7), (6, 2, 3, 3), (1, 2), (1, 0), (1, 1), 2),
    ((1, 4, 9, 10), (4, 2, 2, 3), (2, 3), (0, 1), (2, 1), 2),
    ((1, 2, 6, 7), (2, 2, 4, 2), (1, 1), "same", (1, 1), 1),  # even kernel: asymmetric pad
    ((1, 2, 7, 6), (2, 2, 3, 3), (1, 1), "same", (2, 2), 1),
    ((1, 4, 6, 5), (4, 2, 2, 3), (1, 1), "same", (1, 2), 2),
    ((2, 1, 5, 5), (3, 1, 5, 5), (1, 1), (0, 0), (1, 1), 1),  # kernel as large as the input
    ((1, 3, 4, 4), (3, 1, 3, 3), (1, 1), (1, 1), (1, 1), 3),  # depthwise
    # stride (S, 1) with a 1-wide kernel: OW equals the input width, yet rows are strided
    ((1, 2, 3, 1), (2, 2, 1, 1), (2, 1), (0, 0), (1, 1), 1),
    ((2, 2, 6, 4), (3, 2, 3, 1), (3, 1), (1, 0), (1, 1), 1),
]


@pytest.mark.parametrize("stride", [(1, 1), (1, 2), (2, 1), (2, 3), (3, 1)])
@pytest.mark.parametrize("kernel", [(1, 1), (1, 3), (2, 1), (3, 2)])
@pytest.mark.parametrize("padding", [(0, 0), (1, 0), (0, 1)])
def test_small_sweep_forward_and_gradients_match_reference(stride, kernel, padding):
    """Every stride/kernel/padding mix on a tiny input: the fast paths choose their layout from
    these, so each combination gets its own check against the loop reference."""
    x, w, b = _data((2, 2, 5, 4), (3, 2) + kernel, np.float64, seed=sum(stride + kernel + padding))
    y = conv2d(x, w, b, stride, padding)
    np.testing.assert_allclose(y, reference_conv2d(x, w, b, stride, padding, (1, 1), 1), rtol=1e-12, atol=1e-12)
    gradcheck(lambda x, w, b: conv2d(x, w, b, stride, padding), [x, w, b],
              lambda dy, x, w, b: conv2d_backward(dy, x, w, stride, padding))


def _data(x_shape, w_shape, dtype, seed=0, bias=True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES)
def test_forward_matches_reference(case, dtype):
    x_shape, w_shape, stride, padding, dilation, groups = case
    x, w, b = _data(x_shape, w_shape, dtype)
    y = conv2d(x, w, b, stride, padding, dilation, groups)
    expected = reference_conv2d(x, w, b, stride, padding, dilation, groups)
    assert y.dtype == dtype and y.flags.c_contiguous
    assert y.shape == expected.shape
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("case", CASES)
def test_gradients_float64(case):
    x_shape, w_shape, stride, padding, dilation, groups = case
    x, w, b = _data(x_shape, w_shape, np.float64)
    gradcheck(lambda x, w, b: conv2d(x, w, b, stride, padding, dilation, groups), [x, w, b],
              lambda dy, x, w, b: conv2d_backward(dy, x, w, stride, padding, dilation, groups))


@pytest.mark.parametrize("case", CASES[:8])
def test_float32_gradients_match_float64(case):
    x_shape, w_shape, stride, padding, dilation, groups = case
    x, w, _ = _data(x_shape, w_shape, np.float64)
    dy = np.random.default_rng(1).standard_normal(conv2d(x, w, None, stride, padding, dilation, groups).shape)
    grads64 = conv2d_backward(dy, x, w, stride, padding, dilation, groups)
    grads32 = conv2d_backward(dy.astype(np.float32), x.astype(np.float32), w.astype(np.float32),
                              stride, padding, dilation, groups)
    for g32, g64 in zip(grads32, grads64):
        assert g32.dtype == np.float32 and g32.flags.c_contiguous
        np.testing.assert_allclose(g32, g64, rtol=1e-5, atol=1e-5)


def test_need_dx_and_need_bias_flags():
    x, w, _ = _data((2, 1, 6, 6), (3, 1, 3, 3), np.float32)
    dy = np.ones((2, 3, 4, 4), np.float32)
    dx, dw, db = conv2d_backward(dy, x, w, need_dx=False, need_bias=False)
    assert dx is None and db is None
    np.testing.assert_allclose(dw, conv2d_backward(dy, x, w)[1])
    dx, dw, db = conv2d_backward(dy, x, w, need_dw=False)
    assert dw is None
    np.testing.assert_allclose(dx, conv2d_backward(dy, x, w)[0])
    np.testing.assert_allclose(db, conv2d_backward(dy, x, w)[2])
    assert conv2d_backward(dy, x, w, need_dx=False, need_dw=False, need_bias=False) == (None, None, None)


@pytest.mark.parametrize("algo", ["auto", "direct", "im2col"])
def test_algo_does_not_change_cpu_result(algo):
    x, w, b = _data((1, 2, 5, 5), (2, 2, 3, 3), np.float64)
    np.testing.assert_array_equal(conv2d(x, w, b, algo=algo), conv2d(x, w, b))


def test_valid_padding_string_is_zero_padding():
    x, w, b = _data((1, 2, 5, 5), (2, 2, 3, 3), np.float64)
    np.testing.assert_array_equal(conv2d(x, w, b, padding="valid"), conv2d(x, w, b, padding=0))


def test_same_padding_keeps_spatial_size_and_pads_bottom_right():
    # a 2x2 all-ones kernel on a one-hot input: with the extra pad at the bottom/right, the
    # output at (i, j) sums x[i:i+2, j:j+2], exactly as PyTorch's padding="same"
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 0, 0] = 1.0
    y = conv2d(x, np.ones((1, 1, 2, 2)), padding="same")
    assert y.shape == (1, 1, 4, 4)
    assert y[0, 0, 0, 0] == 1.0 and y.sum() == 1.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_contiguous_and_negative_stride_inputs(dtype):
    x, w, b = _data((2, 3, 8, 9), (4, 3, 3, 3), dtype)
    dy = np.random.default_rng(2).standard_normal((2, 4, 8, 9)).astype(dtype)
    expected_y = conv2d(x, w, b, padding=1)
    expected_grads = conv2d_backward(dy, x, w, padding=1)
    # same values, odd layouts: reversed twice (negative strides), Fortran order, sliced
    x_rev = x[:, :, ::-1, ::-1].copy()[:, :, ::-1, ::-1]
    w_f = np.asfortranarray(w)
    dy_big = np.zeros((2, 4, 16, 9), dtype)
    dy_big[:, :, ::2] = dy
    for xx, ww, dd in [(x_rev, w_f, dy_big[:, :, ::2]), (np.asfortranarray(x), w[::-1][::-1], dy.T.copy().T)]:
        assert not xx.flags.c_contiguous
        np.testing.assert_allclose(conv2d(xx, ww, b, padding=1), expected_y, rtol=1e-6)
        for got, want in zip(conv2d_backward(dd, xx, ww, padding=1), expected_grads):
            assert got.flags.c_contiguous
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("padding", [0, 1, "same"])
def test_empty_batch_gives_empty_output(padding):
    x, w, b = _data((0, 2, 6, 6), (3, 2, 3, 3), np.float32)
    y = conv2d(x, w, b, padding=padding)
    assert y.shape == (0, 3) + ((4, 4) if padding == 0 else (6, 6)) and y.dtype == np.float32
    dx, dw, db = conv2d_backward(y, x, w, padding=padding)
    assert dx.shape == x.shape and dw.shape == w.shape and db.shape == (3,)
    assert not dw.any() and not db.any()


def test_no_bias_means_zero_bias():
    x, w, b = _data((1, 2, 5, 5), (2, 2, 3, 3), np.float64)
    np.testing.assert_allclose(conv2d(x, w), conv2d(x, w, np.zeros(2)))


@pytest.mark.parametrize("size, k, s, p, d, expected", [
    (28, 5, 1, 0, 1, 24),    # LeNet conv1 on MNIST
    (32, 5, 1, 0, 1, 28),    # LeNet-5 as published
    (224, 11, 4, 2, 1, 55),  # AlexNet conv1
    (7, 3, 2, 1, 1, 4),
    (9, 3, 1, 2, 2, 9),      # dilation 2 with padding 2 keeps the size
    (5, 5, 1, 0, 1, 1),
])
def test_conv_output_size_textbook(size, k, s, p, d, expected):
    assert conv_output_size(size, k, s, p, d) == expected
    assert conv_output_size(size, k, s, p, d) == (size + 2 * p - d * (k - 1) - 1) // s + 1


class _FakeLaunchers:
    """Stands in for conv_cuda: records what the public functions hand the CUDA launchers."""

    def __init__(self):
        self.calls = []

    def conv2d_forward(self, *args, **kwargs):
        self.calls.append(("forward", args))
        self.forward_kwargs = kwargs
        return "from-cuda"

    def conv2d_backward(self, *args):
        self.calls.append(("backward", args))
        x = args[1]
        return np.zeros(x.shape), None, None


@pytest.fixture
def fake_conv_cuda(monkeypatch):
    import sys
    import gpuconv.ops as ops_package
    fake = _FakeLaunchers()
    monkeypatch.setitem(sys.modules, "gpuconv.ops.conv_cuda", fake)
    monkeypatch.setattr(ops_package, "conv_cuda", fake, raising=False)
    backend._emulation_override.append(True)  # uses_cuda_kernels(x) is now True for NumPy x
    yield fake
    backend._emulation_override.pop()


def test_dispatch_hands_the_launchers_normalised_pairs(fake_conv_cuda):
    x, w, b = _data((1, 4, 6, 6), (2, 2, 3, 3), np.float32)
    assert conv2d(x, w, b, stride=2, padding=1, dilation=1, groups=2, algo="direct") == "from-cuda"
    _, args = fake_conv_cuda.calls[-1]
    assert args[0] is x and args[1] is w and args[2] is b
    assert args[3:] == ((2, 2), (1, 1), (1, 1), 2, "direct") and fake_conv_cuda.forward_kwargs == {"relu": False}
    conv2d(x, w, b, stride=2, padding=1, groups=2, activation="relu")
    assert fake_conv_cuda.forward_kwargs == {"relu": True}  # the epilogue is the launcher's
    dy = np.ones((1, 2, 3, 3), np.float32)
    conv2d_backward(dy, x, w, 2, 1, 1, 2, "im2col", need_dx=False, need_bias=True)
    _, args = fake_conv_cuda.calls[-1]
    assert args[0] is dy and args[1] is x
    assert args[3:] == ((2, 2), (1, 1), (1, 1), 2, "im2col", False, True, True)


def test_dispatch_resolves_asymmetric_same_padding_before_the_launchers(fake_conv_cuda):
    x, w, _ = _data((1, 1, 5, 6), (1, 1, 2, 3), np.float32)
    conv2d(x, w, padding="same")
    _, args = fake_conv_cuda.calls[-1]
    # height needs 1 extra row at the bottom; width pads 1 each side: all explicit, padding (0, 0)
    assert args[0].shape == (1, 1, 6, 8) and args[4] == (0, 0)
    np.testing.assert_array_equal(args[0][0, 0, :5, 1:7], x[0, 0])
    assert not args[0][0, 0, 5].any() and not args[0][0, 0, :, [0, 7]].any()
    dx, _, _ = conv2d_backward(np.ones((1, 1, 5, 6), np.float32), x, w, padding="same")
    assert dx.shape == x.shape and dx.flags.c_contiguous  # cropped back


def test_validation_runs_before_dispatch(fake_conv_cuda):
    x, w, _ = _data((1, 4, 6, 6), (2, 2, 3, 3), np.float32)
    from gpuconv.errors import ShapeError
    with pytest.raises(ShapeError):
        conv2d(x, w)  # groups=1 but w expects 2 channels
    assert fake_conv_cuda.calls == []
