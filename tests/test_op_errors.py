"""Bad input to the array-level ops (gpuconv.ops) raises gpuconv's error types with messages that name the
argument; property tests: random valid arguments never raise and give the documented shape,
random invalid ones always raise the documented type."""
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import gpuconv
from gpuconv import backend
from gpuconv import ops
from gpuconv.errors import ArgumentError, DeviceMismatchError, DTypeError, GpuconvError, ShapeError
from gpuconv.ops._args import conv_output_size


@pytest.fixture(autouse=True)
def numpy_path():
    backend._emulation_override.append(False)
    yield
    backend._emulation_override.pop()


def arr(*shape, dtype=np.float32):
    return np.ones(shape, dtype)


X, W = arr(2, 4, 8, 8), arr(6, 4, 3, 3)

CONV_ERRORS = [
    # (kwargs for conv2d, error type, message fragment)
    (dict(x=arr(4, 8, 8)), ShapeError, "x: expected a 4-D"),
    (dict(w=arr(6, 4, 3)), ShapeError, "weight: expected a 4-D"),
    (dict(b=arr(6, 1)), ShapeError, "bias: expected a 1-D"),
    (dict(b=arr(5)), ShapeError, "bias: expected shape"),
    (dict(w=arr(6, 3, 3, 3)), ShapeError, "in_channels == weight.shape"),
    (dict(w=arr(6, 2, 3, 3), groups=3), ShapeError, "in_channels=4 must be divisible by groups=3"),
    (dict(w=arr(5, 2, 3, 3), groups=2), ShapeError, "out_channels=5 must be divisible"),
    (dict(groups=0), ArgumentError, "groups"),
    (dict(groups=1.0), ArgumentError, "groups"),
    (dict(w=arr(6, 4, 9, 3)), ShapeError, "smaller than the dilated kernel"),
    (dict(w=arr(6, 4, 3, 3), dilation=5), ShapeError, "smaller than the dilated kernel"),
    (dict(stride=0), ArgumentError, "stride"),
    (dict(stride=(1, -1)), ArgumentError, "stride"),
    (dict(dilation=0), ArgumentError, "dilation"),
    (dict(padding=-1), ArgumentError, "padding"),
    (dict(padding=(0, -2)), ArgumentError, "padding"),
    (dict(padding=1.5), ArgumentError, "padding"),
    (dict(padding="full"), ArgumentError, "padding"),
    (dict(padding="same", stride=2), ArgumentError, "stride=1"),
    (dict(algo="fft"), ArgumentError, "algo"),
    (dict(x=arr(2, 4, 8, 8, dtype=np.int32)), DTypeError, r"astype\(numpy.float32\)"),
    (dict(x=arr(2, 4, 8, 8, dtype=np.float16)), DTypeError, r"x: expected dtype float32 or float64.*astype\(numpy.float32\)"),
    (dict(w=arr(6, 4, 3, 3, dtype=np.float64)), DTypeError, "one dtype"),
    (dict(b=arr(6, dtype=np.float64)), DTypeError, "one dtype"),
    (dict(x=[[1.0]]), DTypeError, "NumPy or CuPy array"),
]


@pytest.mark.parametrize("kwargs, error, message", CONV_ERRORS)
def test_conv2d_errors(kwargs, error, message):
    args = dict(x=X, w=W, b=arr(6))
    args.update(kwargs)
    with pytest.raises(error, match=message):
        ops.conv2d(**args)


@pytest.mark.parametrize("kwargs, error, message", [k for k in CONV_ERRORS if "b" not in k[0]])
def test_conv2d_backward_errors_match_forward(kwargs, error, message):
    args = dict(x=X, w=W)
    args.update(kwargs)
    dy = arr(2, 6, 6, 6)
    with pytest.raises(error, match=message):
        ops.conv2d_backward(dy, **args)


@pytest.mark.parametrize("dy, error", [
    (arr(2, 6, 5, 6), ShapeError), (arr(2, 5, 6, 6), ShapeError), (arr(6, 6, 6), ShapeError),
    (arr(2, 6, 6, 6, dtype=np.float64), DTypeError), (arr(2, 6, 6, 6, dtype=np.int64), DTypeError),
])
def test_conv2d_backward_checks_dy(dy, error):
    with pytest.raises(error, match="dy"):
        ops.conv2d_backward(dy, X, W)


POOLS = {
    "max": lambda x, **kw: ops.max_pool2d(x, **kw),
    "avg": lambda x, **kw: ops.avg_pool2d(x, **kw),
    "lp": lambda x, **kw: ops.lp_pool2d(x, 2, **kw),
}

POOL_ERRORS = [
    (dict(x=arr(4, 8, 8)), ShapeError, "x: expected a 4-D"),
    (dict(kernel_size=0), ArgumentError, "kernel_size"),
    (dict(kernel_size=(2, 2, 2)), ArgumentError, "kernel_size"),
    (dict(stride=0), ArgumentError, "stride"),
    (dict(stride=(-1, 2)), ArgumentError, "stride"),
    (dict(padding=-1), ArgumentError, "padding"),
    (dict(padding=2), ArgumentError, "at most half the kernel"),
    (dict(kernel_size=3, padding=(1, 2)), ArgumentError, "at most half the kernel"),
    (dict(kernel_size=9), ShapeError, "smaller than the pooling window"),
    (dict(x=arr(2, 4, 8, 8, dtype=np.uint8)), DTypeError, r"astype\(numpy.float32\)"),
    (dict(x=arr(2, 4, 8, 8, dtype=np.float16)), DTypeError, r"astype\(numpy.float32\)"),
]


@pytest.mark.parametrize("mode, kwargs, error, message", [
    (mode,) + case for mode in sorted(POOLS) for case in POOL_ERRORS
    if not (mode == "lp" and "padding" in case[0])])  # lp_pool2d has no padding argument
def test_pool_errors(mode, kwargs, error, message):
    args = dict(x=X, kernel_size=2)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        POOLS[mode](**args)


@pytest.mark.parametrize("backward, error", [
    (lambda: ops.max_pool2d_backward(arr(2, 4, 3, 4), X, 2), ShapeError),
    (lambda: ops.avg_pool2d_backward(arr(2, 4, 4, 4, dtype=np.float64), X, 2), DTypeError),
    (lambda: ops.lp_pool2d_backward(arr(2, 4, 4), X, 2, 2), ShapeError),
    (lambda: ops.max_pool2d_backward(arr(2, 4, 4, 4), X, 2, padding=3), ArgumentError),
])
def test_pool_backward_errors(backward, error):
    with pytest.raises(error):
        backward()


@pytest.mark.parametrize("norm_type", [0, -1, float("inf"), float("nan"), "2", True, None])
def test_lp_pool_norm_type(norm_type):
    with pytest.raises(ArgumentError, match="norm_type"):
        ops.lp_pool2d(X, norm_type, 2)


@pytest.mark.parametrize("value", [1, "yes", None])
def test_avg_pool_count_include_pad_must_be_bool(value):
    with pytest.raises(ArgumentError, match="count_include_pad"):
        ops.avg_pool2d(X, 2, count_include_pad=value)


@pytest.mark.parametrize("call, error, message", [
    (lambda: ops.linear(arr(3, 5), arr(4, 6)), ShapeError, "6 features per sample"),
    (lambda: ops.linear(arr(3), arr(4, 3)), ShapeError, "x: expected a 2-D"),
    (lambda: ops.linear(arr(3, 6), arr(4, 6), arr(3)), ShapeError, "bias"),
    (lambda: ops.linear(arr(3, 6, dtype=np.int8), arr(4, 6)), DTypeError, "astype"),
    (lambda: ops.linear(arr(3, 6), arr(4, 6, dtype=np.float64)), DTypeError, "one dtype"),
    (lambda: ops.linear_backward(arr(3, 5), arr(3, 6), arr(4, 6)), ShapeError, "dy"),
    (lambda: ops.relu(arr(3, dtype=np.int64)), DTypeError, "astype"),
    (lambda: ops.relu_backward(arr(3), arr(4)), ShapeError, "dy"),
    (lambda: ops.tanh_backward(arr(3), arr(3, dtype=np.float64)), DTypeError, "one dtype"),
    (lambda: ops.sigmoid(np.ones(3, np.float16)), DTypeError, "astype"),
    (lambda: ops.dropout(arr(3), 1.0), ArgumentError, r"p: expected a drop probability in \[0, 1\)"),
    (lambda: ops.dropout(arr(3), -0.1), ArgumentError, "p: expected"),
    (lambda: ops.dropout(arr(3), "0.5"), ArgumentError, "p: expected"),
    (lambda: ops.dropout(arr(3), 0.5, rng=42), ArgumentError, "default_rng"),
    (lambda: ops.dropout(arr(3), 0.5, mask=np.ones(3)), DTypeError, "mask"),
    (lambda: ops.dropout(arr(3), 0.5, mask=np.ones(4, bool)), ShapeError, "mask"),
    (lambda: ops.dropout_backward(arr(3), np.ones(3, bool), 1.5), ArgumentError, "p: expected"),
])
def test_misc_op_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("labels, error, message", [
    (np.array([0.0, 1.0, 2.0]), DTypeError, "labels: expected an integer dtype"),
    (np.array([True, False, True]), DTypeError, "integer dtype"),
    ([0, 1, 2], DTypeError, "integer array"),
    (np.array([0, 1]), ShapeError, r"labels: expected shape \(3,\)"),
    (np.eye(3, dtype=np.int64), ShapeError, "one-hot"),
    (np.array([0, 1, 4]), ShapeError, r"\[0, 3\].*got 4"),
    (np.array([0, -1, 2]), ShapeError, "got -1"),
])
def test_label_errors(labels, error, message):
    with pytest.raises(error, match=message):
        ops.softmax_cross_entropy(arr(3, 4), labels)


@pytest.mark.parametrize("logits, error", [
    (arr(3, 4, 1), ShapeError), (arr(0, 4), ShapeError), (arr(3, 4, dtype=np.int32), DTypeError)])
def test_logit_errors(logits, error):
    with pytest.raises(error, match="logits"):
        ops.softmax_cross_entropy(logits, np.zeros(len(logits), np.int64))


def test_errors_are_also_builtin_types():
    with pytest.raises(ValueError):
        ops.conv2d(X, W, stride=0)
    with pytest.raises(TypeError):
        ops.conv2d(X.astype(np.int32), W)


@pytest.mark.gpu
@pytest.mark.skipif(not gpuconv.cuda_available(), reason="needs a CUDA GPU")
def test_mixing_numpy_and_cupy_raises_device_mismatch():
    import cupy
    with pytest.raises(DeviceMismatchError):
        ops.conv2d(X, cupy.asarray(W))
    with pytest.raises(DeviceMismatchError):
        ops.linear(arr(3, 6), cupy.ones((4, 6), np.float32))


# -- property tests ------------------------------------------------------------------------------

PROPERTY = settings(max_examples=50, deadline=None)


@st.composite
def conv_configs(draw):
    groups = draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    same = draw(st.booleans())
    stride = (1, 1) if same else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = "same" if same else (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    pad = (0, 0) if same else padding
    span = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    size = [max(1, s - 2 * p) + draw(st.integers(0, 5)) for s, p in zip(span, pad)]
    if same:
        size = [draw(st.integers(1, 8)) for _ in range(2)]
    return dict(n=draw(st.integers(0, 2)), c=groups * draw(st.integers(1, 2)), o=groups * draw(st.integers(1, 2)),
                size=size, kernel=kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                dtype=draw(st.sampled_from([np.float32, np.float64])), bias=draw(st.booleans()))


def make_conv(cfg):
    x = np.random.default_rng(0).standard_normal((cfg["n"], cfg["c"], *cfg["size"])).astype(cfg["dtype"])
    w = np.ones((cfg["o"], cfg["c"] // cfg["groups"], *cfg["kernel"]), cfg["dtype"])
    b = np.ones(cfg["o"], cfg["dtype"]) if cfg["bias"] else None
    args = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"], groups=cfg["groups"])
    return x, w, b, args


@PROPERTY
@given(conv_configs())
def test_valid_conv_never_raises_and_has_the_formula_shape(cfg):
    x, w, b, args = make_conv(cfg)
    y = ops.conv2d(x, w, b, **args)
    if cfg["padding"] == "same":
        out = tuple(cfg["size"])
    else:
        out = tuple(conv_output_size(s, k, st_, p, d) for s, k, st_, p, d
                    in zip(cfg["size"], cfg["kernel"], cfg["stride"], cfg["padding"], cfg["dilation"]))
    assert y.shape == (cfg["n"], cfg["o"]) + out and y.dtype == cfg["dtype"] and y.flags.c_contiguous
    dx, dw, db = ops.conv2d_backward(y, x, w, **args)
    assert dx.shape == x.shape and dw.shape == w.shape and db.shape == (cfg["o"],)
    assert dx.dtype == dw.dtype == db.dtype == cfg["dtype"]


INVALID_CONV = {
    "stride": (lambda cfg, v: cfg.update(stride=(v, 1), padding=(0, 0)), ArgumentError),
    "dilation": (lambda cfg, v: cfg.update(dilation=(1, v)), ArgumentError),
    "padding": (lambda cfg, v: cfg.update(padding=(v - 1, 0), stride=(1, 1)), ArgumentError),
    "groups": (lambda cfg, v: cfg.update(bad_groups=True), ShapeError),
    "channels": (lambda cfg, v: cfg.update(bad_channels=True), ShapeError),
    "too_small": (lambda cfg, v: cfg.update(kernel=(cfg["size"][0] + 2 * 3 + 1, 1), padding=(0, 0),
                                            dilation=(1, 1), stride=(1, 1)), ShapeError),
    "dtype": (lambda cfg, v: cfg.update(bad_dtype=True), DTypeError),
}


@PROPERTY
@given(conv_configs(), st.sampled_from(sorted(INVALID_CONV)), st.integers(-3, 0))
def test_invalid_conv_always_raises_the_documented_type(cfg, flaw, value):
    mutate, error = INVALID_CONV[flaw]
    mutate(cfg, value)
    x, w, b, args = make_conv(cfg)
    if cfg.get("bad_groups"):
        args["groups"] = cfg["c"] + 1  # can never divide the channel count
    if cfg.get("bad_channels"):
        w = np.ones((w.shape[0], w.shape[1] + 1) + w.shape[2:], w.dtype)
    if cfg.get("bad_dtype"):
        x = x.astype(np.int32)
    with pytest.raises(error):
        ops.conv2d(x, w, b, **args)
    dy = np.ones((1, 1, 1, 1), w.dtype)
    with pytest.raises(GpuconvError):
        ops.conv2d_backward(dy, x, w, **args)


@st.composite
def pool_configs(draw):
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, 4), st.integers(1, 4))))
    padding = (draw(st.integers(0, kernel[0] // 2)), draw(st.integers(0, kernel[1] // 2)))
    size = [max(1, k - 2 * p) + draw(st.integers(0, 6)) for k, p in zip(kernel, padding)]
    return dict(shape=(draw(st.integers(0, 2)), draw(st.integers(1, 3)), *size), kernel=kernel, stride=stride,
                padding=padding, mode=draw(st.sampled_from(["max", "avg", "lp"])),
                count_include_pad=draw(st.booleans()), dtype=draw(st.sampled_from([np.float32, np.float64])))


def run_pool(cfg, x, dy=None):
    k, s, p, mode = cfg["kernel"], cfg["stride"], cfg["padding"], cfg["mode"]
    if mode == "max":
        return ops.max_pool2d(x, k, s, p) if dy is None else ops.max_pool2d_backward(dy, x, k, s, p)
    if mode == "avg":
        c = cfg["count_include_pad"]
        return ops.avg_pool2d(x, k, s, p, c) if dy is None else ops.avg_pool2d_backward(dy, x, k, s, p, c)
    return ops.lp_pool2d(x, 2, k, s) if dy is None else ops.lp_pool2d_backward(dy, x, 2, k, s)


@PROPERTY
@given(pool_configs())
def test_valid_pool_never_raises_and_has_the_formula_shape(cfg):
    if cfg["mode"] == "lp":
        cfg["padding"] = (0, 0)
        assume(min(s - k for s, k in zip(cfg["shape"][2:], cfg["kernel"])) >= 0)
    x = np.random.default_rng(0).uniform(0.5, 1.5, cfg["shape"]).astype(cfg["dtype"])
    y = run_pool(cfg, x)
    stride = cfg["stride"] or cfg["kernel"]
    out = tuple(conv_output_size(s, k, st_, p) for s, k, st_, p
                in zip(cfg["shape"][2:], cfg["kernel"], stride, cfg["padding"]))
    assert y.shape == cfg["shape"][:2] + out and y.dtype == cfg["dtype"] and y.flags.c_contiguous
    assert np.isfinite(y).all()
    dx = run_pool(cfg, x, np.ones_like(y))
    assert dx.shape == x.shape and dx.dtype == cfg["dtype"] and np.isfinite(dx).all()


@PROPERTY
@given(pool_configs(), st.sampled_from(["stride", "padding", "half_kernel", "too_small", "kernel"]),
       st.integers(-2, 0))
def test_invalid_pool_always_raises_the_documented_type(cfg, flaw, value):
    cfg["mode"] = "max" if cfg["mode"] == "lp" else cfg["mode"]
    if flaw == "stride":
        cfg["stride"], error = (1, value), ArgumentError
    elif flaw == "padding":
        cfg["padding"], error = (value - 1, 0), ArgumentError
    elif flaw == "half_kernel":
        cfg["padding"], error = (cfg["kernel"][0] // 2 + 1, 0), ArgumentError
    elif flaw == "kernel":
        cfg["kernel"], error = (value, 2), ArgumentError
    else:
        cfg["kernel"], cfg["padding"], error = (cfg["shape"][2] + 1, 1), (0, 0), ShapeError
    x = np.ones(cfg["shape"], cfg["dtype"])
    with pytest.raises(error):
        run_pool(cfg, x)
