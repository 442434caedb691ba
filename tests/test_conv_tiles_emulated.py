"""The direct conv kernels' shape-chosen, register-blocked tiles (conv_cuda.tile_config), emulated.

The references below sum every output's products in the kernels' own order (reduction row
r = c*KH*KW + kh*KW + kw forward, k*KH*KW + kh*KW + kw for backward-data, one row at a time), in
NumPy elementwise arithmetic. The emulator compiles with -ffp-contract=off, so a correct kernel
matches them bit for bit, whatever its tile: a dropped, repeated or reordered row, a padding row
that adds anything but zero, or a product from the wrong channel or pixel changes the bits.
Each case names the tile it reaches and the partial tiles it makes."""
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

from gpuconv import ops
from gpuconv.errors import ArgumentError
from gpuconv.ops import conv_cuda

CASES_FILE = Path(__file__).parent / "emulator_kernels" / "emulation_cases.py"
_spec = importlib.util.spec_from_file_location("emulation_cases", CASES_FILE)
cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cases)

F32, F64 = np.float32, np.float64


def _pairs(v):
    return tuple(v) if isinstance(v, tuple) else (v, v)


def _out_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def forward_reference(x, w, b, stride, padding, dilation, groups, relu=False):
    """act(sum_r w[k, r] * x_col[r, p] + b[k]), rows added one at a time in order r = 0, 1, ..."""
    (sh, sw), (ph, pw), (dh, dw) = _pairs(stride), _pairs(padding), _pairs(dilation)
    n, c, h, wd = x.shape
    k, cg, kh_size, kw_size = w.shape
    kg = k // groups
    oh, ow = _out_size(h, kh_size, sh, ph, dh), _out_size(wd, kw_size, sw, pw, dw)
    padded = np.zeros((n, c, h + 2 * ph, wd + 2 * pw), x.dtype)
    padded[:, :, ph:ph + h, pw:pw + wd] = x
    y = np.empty((n, k, oh, ow), x.dtype)
    for g in range(groups):
        acc = np.zeros((n, kg, oh, ow), x.dtype)
        for ci in range(cg):
            for kh in range(kh_size):
                for kw in range(kw_size):
                    patch = padded[:, g * cg + ci, kh * dh:kh * dh + sh * (oh - 1) + 1:sh,
                                   kw * dw:kw * dw + sw * (ow - 1) + 1:sw]
                    acc = acc + w[g * kg:(g + 1) * kg, ci, kh, kw][None, :, None, None] * patch[:, None]
        bias = np.zeros(kg, x.dtype) if b is None else b[g * kg:(g + 1) * kg]
        v = acc + bias[None, :, None, None]
        y[:, g * kg:(g + 1) * kg] = np.where(v <= 0, x.dtype.type(0), v) if relu else v
    return y


def backward_data_reference(dy, w, x_shape, stride, padding, dilation, groups):
    """dx[c, q] = sum over rows r = (k, kh, kw) in order of w[k, c, kh, kw] * dy[k, oh, ow], the output
    pixel whose window puts tap (kh, kw) on q (a row with no such pixel adds +0, as the kernel does)."""
    (sh, sw), (ph, pw), (dh, dw) = _pairs(stride), _pairs(padding), _pairs(dilation)
    n, c, h, wd = x_shape
    k, cg, kh_size, kw_size = w.shape
    kg = k // groups
    oh, ow = dy.shape[2:]
    dx = np.empty(x_shape, dy.dtype)
    size_h, size_w = max(h + 2 * ph, dh * (kh_size - 1) + sh * (oh - 1) + 1), \
        max(wd + 2 * pw, dw * (kw_size - 1) + sw * (ow - 1) + 1)
    for g in range(groups):
        acc = np.zeros((n, cg, size_h, size_w), dy.dtype)
        for ki in range(kg):
            for kh in range(kh_size):
                for kw in range(kw_size):
                    row = np.zeros_like(acc)
                    row[:, :, kh * dh:kh * dh + sh * (oh - 1) + 1:sh, kw * dw:kw * dw + sw * (ow - 1) + 1:sw] = (
                        w[g * kg + ki, :, kh, kw][None, :, None, None] * dy[:, g * kg + ki][:, None])
                    acc = acc + row
        dx[:, g * cg:(g + 1) * cg] = acc[:, :, ph:ph + h, pw:pw + wd]
    return dx


def same_bits(a, b):
    """Equal bit for bit (so +0 differs from -0), NaN where the other has NaN."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan = np.isnan(a)
    bits = np.uint64 if a.dtype == F64 else np.uint32
    return bool((nan == np.isnan(b)).all() and (a[~nan].view(bits) == b[~nan].view(bits)).all())


def inputs(case, dtype, seed=0):
    x_shape, w_shape, stride, padding, dilation, groups = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)  # signed inputs, weights and biases
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    (sh, sw), (ph, pw), (dh, dw) = _pairs(stride), _pairs(padding), _pairs(dilation)
    oh = _out_size(x_shape[2], w_shape[2], sh, ph, dh)
    ow = _out_size(x_shape[3], w_shape[3], sw, pw, dw)
    dy = rng.standard_normal((x_shape[0], w_shape[0], oh, ow)).astype(dtype)
    return x, w, b, dy


def direct(case, x, w, b, dy, relu=False, order="forward"):
    """(y, dx) of the direct kernels, emulated (outputs NaN-filled before the kernels write them)."""
    _, _, stride, padding, dilation, groups = case
    args = (_pairs(stride), _pairs(padding), _pairs(dilation), groups, "direct")

    def run():
        y = conv_cuda.conv2d_forward(x, w, b, *args, relu=relu)
        dx, _, _ = conv_cuda.conv2d_backward(dy, x, w, *args, need_dx=True, need_bias=False, need_dw=False)
        return y, dx

    return cases.emulated(run, order=order)


def check_case(case, dtype=F64, relu=False, seed=0):
    x, w, b, dy = inputs(case, dtype, seed)
    _, _, stride, padding, dilation, groups = case
    y, dx = direct(case, x, w, b, dy, relu=relu)
    assert same_bits(y, forward_reference(x, w, b, stride, padding, dilation, groups, relu)), (
        f"forward {case} {dtype.__name__} relu={relu}: differs from the in-order sum")
    assert same_bits(dx, backward_data_reference(dy, w, x.shape, stride, padding, dilation, groups)), (
        f"backward-data {case} {dtype.__name__}: differs from the in-order sum")
    return x, w, b, dy, y, dx


# (x shape, w shape, stride, padding, dilation, groups): forward tile from K/groups, backward-data
# tile from C/groups; P = OH*OW, Q = H*W, R = C/groups*KH*KW forward, K/groups*KH*KW backward.
CASES = {
    # fwd narrow (Kg 6 of 8), P = 153: two pixel tiles of 128, the second partial; R = 25 = 16 + 9.
    # bwd narrow (Cg 1), Q = 153, R = 150 = 9*16 + 6. LeNet's conv1 with a wider image.
    "K6-lenet1": ((2, 1, 9, 17), (6, 1, 5, 5), 1, 2, 1, 1),
    # fwd narrow at its limit (Kg 8 = the whole tile), R = 18; bwd narrow (Cg 3), R = 48 = 3*16.
    "K8": ((1, 3, 6, 5), (8, 3, 2, 3), 1, 0, 1, 1),
    # fwd medium from its lower limit (Kg 9 of 16), R = 18; bwd narrow (Cg 2), R = 81.
    "K9": ((2, 2, 7, 6), (9, 2, 3, 3), 1, 1, 1, 1),
    # fwd medium at its limit (Kg 16), P = 64: exactly one pixel tile, R = 1 < 16; bwd narrow, R = 16.
    "K16-P64": ((1, 1, 8, 8), (16, 1, 1, 1), 1, 0, 1, 1),
    # fwd wide from its lower limit (Kg 17 of 32), R = 16 = TILE_R exactly; bwd narrow, R = 272 = 17*16.
    "K17-R16": ((1, 1, 9, 9), (17, 1, 4, 4), 1, 0, 1, 1),
    # fwd wide, Kg 40: two channel tiles, the second 8 of 32; bwd narrow, R = 160.
    "K40": ((1, 1, 6, 7), (40, 1, 2, 2), 1, 0, 1, 1),
    # bwd narrow at its limit (Cg 8), R = 4; fwd narrow (Kg 2), R = 8 < 16.
    "C8": ((2, 8, 5, 6), (2, 8, 1, 1), 1, 0, 1, 1),
    # bwd medium from its lower limit (Cg 9), R = 2; fwd narrow, R = 9.
    "C9": ((1, 9, 5, 7), (2, 9, 1, 1), 1, 0, 1, 1),
    # bwd medium at its limit (Cg 16), Q = 80 = 64 + 16; fwd narrow (Kg 5), R = 16.
    "C16": ((1, 16, 8, 10), (5, 16, 1, 1), 1, 0, 1, 1),
    # bwd wide from its lower limit (Cg 17), R = 6; fwd narrow (Kg 3), R = 34 = 16 + 16 + 2.
    "C17": ((1, 17, 5, 4), (3, 17, 2, 1), 1, 0, 1, 1),
    # bwd wide, Cg 33: two channel tiles, the second holds one channel; fwd narrow, R = 66.
    "C33": ((1, 33, 3, 4), (2, 33, 1, 2), 1, 0, 1, 1),
    # groups 2: per group Kg 18 (fwd wide, partial) and Cg 17 (bwd wide, partial); R = 34 fwd, 36 bwd;
    # the second group's channels sit past the first group's in x, w, y and dx.
    "groups2-K18-C17": ((1, 34, 5, 4), (36, 17, 1, 2), 1, 0, 1, 2),
    # groups 3, Kg 3 and Cg 2 (narrow both ways), R = 18 fwd, 27 bwd; two images.
    "groups3": ((2, 6, 5, 5), (9, 2, 3, 3), 1, 1, 1, 3),
    # depthwise: groups = C = K, one channel a group both ways, R = 9.
    "depthwise": ((2, 4, 6, 5), (4, 1, 3, 3), 1, 1, 1, 4),
}


def test_each_case_reaches_the_tile_it_names():
    # A guard on CASES itself: the comments above say which tile each case reaches.
    names = {key: (conv_cuda.tile_config(w[0] // g).name, conv_cuda.tile_config(w[1]).name)
             for key, (_, w, _, _, _, g) in CASES.items()}
    assert {forward for forward, _ in names.values()} == {"narrow", "medium", "wide"}
    assert {backward for _, backward in names.values()} == {"narrow", "medium", "wide"}
    assert names["K8"][0] == "narrow" and names["K9"][0] == "medium" and names["K17-R16"][0] == "wide"
    assert names["C8"][1] == "narrow" and names["C9"][1] == "medium" and names["C17"][1] == "wide"


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_direct_kernels_match_the_in_order_sum_bit_for_bit(case):
    check_case(case, F64)


@pytest.mark.parametrize("name", ["K6-lenet1", "groups2-K18-C17"])
def test_float32_matches_the_in_order_sum_and_the_numpy_path(name):
    case = CASES[name]
    x, w, b, dy, y, dx = check_case(case, F32, seed=1)
    _, _, stride, padding, dilation, groups = case
    np.testing.assert_allclose(y, ops.conv2d(x, w, b, stride, padding, dilation, groups), rtol=1e-5, atol=1e-5)
    want_dx = ops.conv2d_backward(dy, x, w, stride, padding, dilation, groups)[0]
    np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)


# Each axis's stride, padding and dilation on its own (the other axis plain), for the narrow tile
# (K 5, C 3) and the wide one (K 20, C 18): an index that takes the wrong axis's value shows up.
AXES = {
    "stride-h": ((2, 1), 0, 1), "stride-w": ((1, 3), 0, 1),
    "padding-h": (1, (2, 0), 1), "padding-w": (1, (0, 1), 1),
    "dilation-h": (1, 0, (2, 1)), "dilation-w": (1, 0, (1, 2)),
}
AXIS_SHAPES = {"narrow": ((1, 3, 9, 8), (5, 3, 3, 2)), "wide": ((1, 18, 7, 9), (20, 18, 2, 3))}


@pytest.mark.parametrize("tile", list(AXIS_SHAPES))
@pytest.mark.parametrize("axis", list(AXES))
def test_each_axis_stride_padding_dilation_alone(axis, tile):
    x_shape, w_shape = AXIS_SHAPES[tile]
    stride, padding, dilation = AXES[axis]
    check_case((x_shape, w_shape, stride, padding, dilation, 1), F64)


def test_relu_epilogue_zeros_negative_zero_and_nan():
    # Integer-valued inputs, so the sums are exact: the biases make some outputs exactly 0 (acc + b
    # with b = -acc), one bias is -0, x holds -0 entries and one NaN. The epilogue must give +0 for
    # v <= 0 (-0 included), keep NaN, and pass positive values through.
    case = ((2, 2, 6, 7), (6, 2, 3, 3), 1, 1, 1, 1)
    rng = np.random.default_rng(3)
    for dtype in (F64, F32):
        x = rng.integers(-3, 4, size=case[0]).astype(dtype)
        x[x == 0] = -0.0
        x[1, 0, 2, 3] = np.nan
        w = rng.integers(-2, 3, size=case[1]).astype(dtype)
        plain = forward_reference(x, w, None, 1, 1, 1, 1)
        b = np.array([-plain[0, 0, 0, 0], -plain[0, 1, 3, 3], -0.0, 1.0, -1.0, -plain[0, 5, 5, 6]], dtype)
        dy = np.zeros((2, 6, 6, 7), dtype)
        y, _ = direct(case, x, w, b, dy, relu=True)
        want = forward_reference(x, w, b, 1, 1, 1, 1, relu=True)
        assert same_bits(y, want)
        assert y[0, 0, 0, 0] == 0 and not np.signbit(y).any()  # every zero is +0
        assert np.isnan(y[1]).any() and not np.isnan(y[0]).any()
        assert (y > 0).any() and (y == 0).sum() > (plain + b[None, :, None, None] < 0).sum()
        y_plain, _ = direct(case, x, w, b, dy, relu=False)
        assert same_bits(y_plain, forward_reference(x, w, b, 1, 1, 1, 1))
        assert (y_plain < 0).any()  # without the epilogue the negative sums stay


@pytest.mark.parametrize("forced", ["narrow", "medium", "wide"])
def test_every_tile_gives_the_same_bits_on_every_shape(monkeypatch, forced):
    # The per-output summation order does not depend on the tile: forcing each tile on shapes the
    # chooser gives to another (20 channels a group: 3 narrow tiles, 2 medium ones, 1 wide one)
    # reproduces the in-order sum bit for bit. Thread order reversed: no result depends on it.
    tile = next(t for _, t in conv_cuda._TILES if t.name == forced)
    monkeypatch.setattr(conv_cuda, "tile_config", lambda channels: tile)
    case = ((2, 20, 5, 6), (20, 20, 1, 2), 1, 0, 1, 1)
    x, w, b, dy = inputs(case, F64, seed=2)
    y, dx = direct(case, x, w, b, dy, order="reverse")
    assert same_bits(y, forward_reference(x, w, b, 1, 0, 1, 1))
    assert same_bits(dx, backward_data_reference(dy, w, x.shape, 1, 0, 1, 1))


# ---------------------------------------------------------------------------------------------
# the tile choice (host side)


def test_tile_choice_boundaries():
    chosen = {c: conv_cuda.tile_config(c) for c in (1, 6, 8, 9, 16, 17, 32, 33, 512)}
    assert [chosen[c].name for c in (1, 6, 8)] == ["narrow"] * 3
    assert [chosen[c].name for c in (9, 16)] == ["medium"] * 2
    assert [chosen[c].name for c in (17, 32, 33, 512)] == ["wide"] * 4
    assert (chosen[6].channels, chosen[6].pixels, chosen[6].block) == (8, 128, (32, 2, 1))
    assert (chosen[16].channels, chosen[16].pixels, chosen[16].block) == (16, 64, (16, 4, 1))
    assert (chosen[17].channels, chosen[17].pixels, chosen[17].block) == (32, 64, (16, 8, 1))


def test_every_tile_fits_the_kernels_shared_arrays_and_a_block():
    for _, tile in conv_cuda._TILES:
        assert tile.channels <= conv_cuda.MAX_TILE_K and tile.pixels <= conv_cuda.MAX_TILE_P
        assert tile.block[0] * conv_cuda.PIXELS_PER_THREAD == tile.pixels
        assert tile.block[1] * conv_cuda.CHANNELS_PER_THREAD == tile.channels
        assert 32 <= tile.block[0] * tile.block[1] <= 1024 and (tile.block[0] * tile.block[1]) % 32 == 0


def test_the_docstring_table_is_the_tile_table():
    doc = conv_cuda.tile_config.__doc__
    for name, _, channels, pixels in conv_cuda.TILE_CONFIGS:
        tile = conv_cuda.tile_config(channels)
        assert re.search(rf"{name}\s+{channels} x {pixels}\s+{tile.block[0]} x {tile.block[1]}\n", doc), name


def test_tile_errors_name_the_argument():
    with pytest.raises(ArgumentError, match="at least 1 channel per group, got 0"):
        conv_cuda.tile_config(0)
    with pytest.raises(ArgumentError, match="tile 'huge'.*got 64 x 64"):
        conv_cuda.TileConfig("huge", 64, 64)
    with pytest.raises(ArgumentError, match="got 8 x 130"):
        conv_cuda.TileConfig("odd", 8, 130)


def test_grid_and_useful_fraction():
    narrow = conv_cuda.tile_config(6)
    assert narrow.grid(784, 6, 128) == (7, 1, 128)
    assert narrow.grid(129, 17, 70000) == (2, 3, 65535)
    assert narrow.useful_fraction(784, 6) == pytest.approx(6 / 8 * 784 / 896)
    assert conv_cuda.tile_config(16).useful_fraction(128, 16) == 1.0


def test_kernel_plan_shows_each_direct_launchs_tile():
    from gpuconv.cuda.tools import plan
    rows = {row["call"]: row for row in plan.direct_tile_rows(batch=2)}
    conv1 = rows["conv1 forward"]
    assert conv1["tile"] == "narrow 8ch x 128px" and conv1["auto"]
    assert conv1["useful"] == pytest.approx(6 / 8 * 784 / 896) and conv1["loads_per_fma"] == 0.5
    assert rows["conv2 forward"]["tile"].startswith("medium") and not rows["conv2 forward"]["auto"]
    assert rows["conv2 backward-data"]["useful"] == pytest.approx(6 / 8 * 196 / 256)
    assert not rows["conv1 backward-data"]["auto"]  # LeNet needs no gradient of its input
    text = plan.format_direct_tiles(list(rows.values()))
    assert "65.6%" in text and "narrow 8ch x 128px" in text
    launches = next(row for row in plan.lenet_plan(batch=2) if row["call"] == "conv1 forward")["launches"]
    assert "66% of multiply-adds useful" in plan.format_plan([dict(
        launches=launches, call="conv1 forward", algo="direct", flops=1, bytes=1, bound_us=1, bound="memory")], {})
