"""2-D convolution (cross-correlation, like PyTorch) on NCHW arrays: forward and backward.

The public functions validate and normalise their arguments once, then dispatch: CuPy arrays (or
kernel emulation) go to the CUDA launchers in conv_cuda.py, NumPy arrays to the im2col + BLAS path
below. Both paths therefore raise the same errors for the same bad input.

The NumPy path turns convolution into one batched matrix product: the sliding windows of the
(padded) input are copied once into columns (N, groups, C/groups*KH*KW, P), and `weight @ cols`
yields (N, groups, O/groups, P), already in NCHW order, so the output needs no transpose. The
backward is two more products (dw from dy and the columns; the column gradient from w.T and dy)
and a col2im that adds the column gradient back with one slice-add per kernel tap.
"""
import numpy as np

from ..backend import get_array_module, uses_cuda_kernels
from ..errors import ArgumentError, ShapeError
from . import conv_cpu, cpu_parts
from ._args import (check_float_array, check_input_weight_bias, check_same_dtype, conv_output_size, pair,
                    same_device)

ALGOS = ("auto", "direct", "im2col")


# ----------------------------------------------------------------------------------------------
# argument handling shared by both paths


def _resolve_padding(padding, kernel, stride, dilation):
    """-> (symmetric (ph, pw) for the op, explicit ((top, bottom), (left, right)) pad or None).

    "same" with an even effective kernel needs one more row/column at the bottom/right (PyTorch's
    choice); the launchers only take symmetric pairs, so that case becomes an explicit zero pad of x
    and padding (0, 0).
    """
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), None
        if padding != "same":
            raise ArgumentError(f"padding: expected an int, a pair of ints, 'same' or 'valid', "
                                f"got {padding!r}")
        if stride != (1, 1):
            raise ArgumentError(f"padding='same' needs stride=1 (as in PyTorch), got stride={stride}; "
                                "pass an explicit padding instead")
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        before = [t // 2 for t in totals]
        after = [t - b for t, b in zip(totals, before)]
        if before == after:
            return tuple(before), None
        return (0, 0), tuple(zip(before, after))
    return pair(padding, "padding", minimum=0), None


def _check_conv_args(x, w, b, stride, padding, dilation, groups, algo):
    """Validate everything; returns (stride, padding, dilation, groups, explicit_pad, out_hw)."""
    check_input_weight_bias(x, w, b, 4)
    if algo not in ALGOS:
        raise ArgumentError(f"algo: expected one of {ALGOS}, got {algo!r}")
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ArgumentError(f"groups: expected an int >= 1, got {groups!r}")
    groups = int(groups)
    stride = pair(stride, "stride", minimum=1)
    dilation = pair(dilation, "dilation", minimum=1)
    n, c, h, wd = x.shape
    out_c, c_per_group, kh, kw = w.shape
    if out_c % groups:
        raise ShapeError(f"weight: out_channels={out_c} must be divisible by groups={groups}; "
                         "change the number of filters or groups")
    if c % groups:
        raise ShapeError(f"x: in_channels={c} must be divisible by groups={groups}; "
                         "change the number of input channels or groups")
    if c_per_group * groups != c:
        raise ShapeError(f"weight: expected shape (out, {c // groups}, kh, kw) for x with {c} channels "
                         f"and groups={groups} (in_channels == weight.shape[1] * groups), got weight "
                         f"shape {tuple(w.shape)} and x shape {tuple(x.shape)}")
    if kh < 1 or kw < 1:
        raise ShapeError(f"weight: expected a kernel of at least 1x1, got shape {tuple(w.shape)}")
    if c < 1 or out_c < 1:
        # Only the batch may be empty (N = 0 gives an empty result); a conv without input or output
        # channels is a mistake in the model, as for nn.Conv2d, which refuses 0 channels.
        raise ShapeError(f"{'x' if c < 1 else 'weight'}: expected at least one "
                         f"{'input' if c < 1 else 'output'} channel, got x shape {tuple(x.shape)} and weight "
                         f"shape {tuple(w.shape)}")
    if b is not None and b.shape[0] != out_c:
        raise ShapeError(f"bias: expected shape ({out_c},) to match weight.shape[0], got {tuple(b.shape)}")
    padding, explicit = _resolve_padding(padding, (kh, kw), stride, dilation)
    padded = (h, wd) if explicit is None else (h + sum(explicit[0]), wd + sum(explicit[1]))
    out_hw = tuple(conv_output_size(s, k, st, p, d)
                   for s, k, st, p, d in zip(padded, (kh, kw), stride, padding, dilation))
    if min(out_hw) < 1:
        raise ShapeError(
            f"x: input {h}x{wd} with padding {padding} is smaller than the dilated kernel "
            f"{dilation[0] * (kh - 1) + 1}x{dilation[1] * (kw - 1) + 1} (output would be "
            f"{out_hw[0]}x{out_hw[1]}); use a larger input, more padding or a smaller kernel")
    return stride, padding, dilation, groups, explicit, out_hw


def _pad_explicit(x, explicit):
    if explicit is None:
        return x
    xp = get_array_module(x)
    return xp.pad(x, ((0, 0), (0, 0)) + explicit)


# ----------------------------------------------------------------------------------------------
# public API


def conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1, algo="auto", activation=None):
    """y[n, o] = b[o] + sum_c,kh,kw w[o, c, kh, kw] * x_padded[n, g*C/g + c, oh*S + kh*D, ow*S + kw*D].

    x: (N, C, H, W); w: (O, C/groups, KH, KW); b: (O,) or None. stride/dilation: int or pair
    (>= 1); padding: int, pair, "valid" or "same" (stride 1 only). `algo` picks the CUDA kernel
    ("direct" or "im2col"; "auto" chooses by shape); on the CPU every algo is the same GEMM over
    sliding windows. An empty batch (N == 0) gives an empty (0, O, OH, OW) output, as in PyTorch.
    activation="relu" applies ReLU to the result (on a GPU in the kernel's epilogue, with the bias).
    """
    if activation not in (None, "relu"):
        raise ArgumentError(f"activation: expected None or 'relu', got {activation!r}")
    stride, padding, dilation, groups, explicit, out_hw = _check_conv_args(
        x, w, b, stride, padding, dilation, groups, algo)
    x = _pad_explicit(x, explicit)
    if uses_cuda_kernels(x):
        from . import conv_cuda
        return conv_cuda.conv2d_forward(x, w, b, stride, padding, dilation, groups, algo,
                                        relu=activation == "relu")
    if conv_cpu.takes(x.shape, w.shape, groups, out_hw, x.itemsize):
        y = conv_cpu.conv2d_forward(x, w, b, stride, padding, dilation)
    else:
        y = cpu_parts.alone(conv2d_forward_numpy, x, w, b, stride, padding, dilation, groups, algo)
    return np.maximum(y, 0, out=y) if activation == "relu" else y


def conv2d_backward(dy, x, w, stride=1, padding=0, dilation=1, groups=1, algo="auto",
                    need_dx=True, need_bias=True, need_dw=True):
    """Gradients of conv2d -> (dx or None, dw or None, db or None), each with its input's shape.

    need_dx=False skips the data gradient (a first layer never needs it); need_bias=False skips db;
    need_dw=False skips the filter gradient (frozen weights, or timing the data gradient alone).
    """
    stride, padding, dilation, groups, explicit, out_hw = _check_conv_args(
        x, w, None, stride, padding, dilation, groups, algo)
    check_float_array(dy, "dy", 4)
    same_device(dy, x)
    check_same_dtype(dy=dy, x=x)
    expected = (x.shape[0], w.shape[0]) + out_hw
    if tuple(dy.shape) != expected:
        raise ShapeError(f"dy: expected shape {expected} (the shape of conv2d's output), "
                         f"got {tuple(dy.shape)}")
    x_padded = _pad_explicit(x, explicit)
    if uses_cuda_kernels(x):
        from . import conv_cuda
        dx, dw, db = conv_cuda.conv2d_backward(dy, x_padded, w, stride, padding, dilation, groups,
                                               algo, need_dx, need_bias, need_dw)
    elif conv_cpu.takes(x.shape, w.shape, groups, out_hw, x.itemsize):
        dx, dw, db = conv_cpu.conv2d_backward(dy, x_padded, w, stride, padding, dilation,
                                              need_dx, need_bias, need_dw)
    else:
        dx, dw, db = cpu_parts.alone(conv2d_backward_numpy, dy, x_padded, w, stride, padding, dilation,
                                     groups, algo, need_dx, need_bias, need_dw)
    if dx is not None and explicit is not None:
        (top, _), (left, _) = explicit
        dx = dx[:, :, top:top + x.shape[2], left:left + x.shape[3]].copy()
    return dx, dw, db


# ----------------------------------------------------------------------------------------------
# NumPy path. Same signatures as conv_cuda's launchers: arguments are already validated, stride,
# padding and dilation are int pairs. Public so the CUDA tests can use it as the reference.
#
# Columns are (N, groups, C/groups*KH*KW, P) with rows ordered (c, kh, kw) like w.reshape(O, -1);
# output pixel (oh, ow) is column oh * row_len + ow. In general row_len = OW and P = OH*OW.
# For stride 1 they sit on "wide rows" instead: row_len = the padded input width, so every kernel
# tap is one contiguous run of the flattened input, x_flat[off : off + P], and im2col/col2im move
# long contiguous runs instead of rows of OW elements (several times faster). The wide layout adds
# row_len - OW junk columns per row: they are cropped from y, and dy is zero there, so they add
# nothing to dw or dx.


def _pad(x, padding):
    if padding == (0, 0):
        return np.ascontiguousarray(x)
    (ph, pw), (n, c, h, w) = padding, x.shape
    padded = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=x.dtype)
    padded[:, :, ph:ph + h, pw:pw + w] = x
    return padded


def _row_len(padded_width, out_hw, stride):
    return padded_width if stride == (1, 1) else out_hw[1]


def _num_columns(out_hw, row_len):
    return (out_hw[0] - 1) * row_len + out_hw[1]


def _columns(x, kernel, stride, padding, dilation, groups, out_hw):
    """im2col of the padded input -> (columns (N, groups, C/groups*KH*KW, P), row_len)."""
    x = _pad(x, padding)
    n, c, h, w = x.shape
    (kh, kw), (dh, dw), (oh, ow) = kernel, dilation, out_hw
    row_len = _row_len(w, out_hw, stride)
    if stride == (1, 1):  # not `row_len == w`: a 1-wide kernel with stride (2, 1) has OW == W too
        flat = x.reshape(n, c, h * w)
        size = _num_columns(out_hw, row_len)
        cols = np.empty((n, c, kh, kw, size), dtype=x.dtype)
        for i in range(kh):
            for j in range(kw):
                offset = i * dh * w + j * dw
                cols[:, :, i, j] = flat[:, :, offset:offset + size]
    else:
        # (N, C, H', W', span_h, span_w): every window without a copy; then the strided and
        # dilated taps, copied once into column order.
        sh, sw = stride
        windows = np.lib.stride_tricks.sliding_window_view(
            x, (dh * (kh - 1) + 1, dw * (kw - 1) + 1), axis=(2, 3))
        windows = windows[:, :, :(oh - 1) * sh + 1:sh, :(ow - 1) * sw + 1:sw, ::dh, ::dw]
        cols = np.empty((n, c, kh, kw, oh, ow), dtype=x.dtype)
        np.copyto(cols, windows.transpose(0, 1, 4, 5, 2, 3))
    return cols.reshape(n, groups, (c // groups) * kh * kw, -1), row_len


def _from_columns(y_cols, out_hw, row_len):
    """(N, O, P) on rows of row_len -> contiguous (N, O, OH, OW)."""
    n, o, _ = y_cols.shape
    if row_len == out_hw[1]:
        return y_cols.reshape((n, o) + out_hw)
    item = y_cols.itemsize
    grid = np.lib.stride_tricks.as_strided(
        y_cols, (n, o) + out_hw, y_cols.strides[:2] + (row_len * item, item), writeable=False)
    return grid.copy()


def _to_columns(dy, row_len):
    """(N, O, OH, OW) -> (N, O, P) on rows of row_len, zero in the junk columns."""
    n, o, oh, ow = dy.shape
    if row_len == ow:
        return np.ascontiguousarray(dy).reshape(n, o, oh * ow)
    wide = np.zeros((n, o, oh, row_len), dtype=dy.dtype)
    wide[..., :ow] = dy
    return wide.reshape(n, o, oh * row_len)[:, :, :_num_columns((oh, ow), row_len)]


def _add_columns(dx, dcols, kernel, stride, padding, dilation, out_hw, row_len):
    """col2im: dx += the (N, C, KH, KW, P) column gradient, one slice-add per kernel tap."""
    (kh, kw), (dh, dw) = kernel, dilation
    if stride == (1, 1):
        # wide rows: each tap is a contiguous run of the flattened padded input
        padded = _pad(dx, padding) if padding != (0, 0) else dx
        h, w = padded.shape[2:]
        flat = padded.reshape(padded.shape[:2] + (h * w,))
        size = dcols.shape[-1]
        for i in range(kh):
            for j in range(kw):
                offset = i * dh * w + j * dw
                flat[:, :, offset:offset + size] += dcols[:, :, i, j]
        if padded is not dx:
            ph, pw = padding
            dx[...] = padded[:, :, ph:ph + dx.shape[2], pw:pw + dx.shape[3]]
        return
    # taps that fall into the padding are clipped away: no padded buffer, no crop
    dcols = dcols.reshape(dcols.shape[:4] + out_hw)
    for i in range(kh):
        rows = _tap_range(i, dx.shape[2], out_hw[0], stride[0], padding[0], dh)
        if rows is None:
            continue
        for j in range(kw):
            cols = _tap_range(j, dx.shape[3], out_hw[1], stride[1], padding[1], dw)
            if cols is not None:
                dx[:, :, rows[0], cols[0]] += dcols[:, :, i, j, rows[1], cols[1]]


def _tap_range(tap, in_size, out_size, stride, padding, dilation):
    """For kernel tap `tap`: (input slice, output slice) of the outputs whose tap lands inside the
    unpadded input (input index = o*stride - padding + tap*dilation), or None if there are none."""
    offset = tap * dilation - padding
    first = max(0, -(offset // stride))  # ceil(-offset / stride), the first o with index >= 0
    last = min(out_size - 1, (in_size - 1 - offset) // stride)
    if last < first:
        return None
    start = first * stride + offset
    return (slice(start, start + (last - first) * stride + 1, stride), slice(first, last + 1))


def _out_hw(x, w, stride, padding, dilation):
    return tuple(conv_output_size(s, k, st, p, d) for s, k, st, p, d
                 in zip(x.shape[2:], w.shape[2:], stride, padding, dilation))


def conv2d_forward_numpy(x, w, b, stride, padding, dilation, groups, algo="auto"):
    """NumPy conv2d on validated arguments (see conv2d); `algo` is ignored on the CPU."""
    n, out_c = x.shape[0], w.shape[0]
    out_hw = _out_hw(x, w, stride, padding, dilation)
    if n == 0:
        y = np.empty((0, out_c) + out_hw, dtype=x.dtype)
    else:
        cols, row_len = _columns(x, w.shape[2:], stride, padding, dilation, groups, out_hw)
        y_cols = np.matmul(w.reshape(groups, out_c // groups, -1), cols)  # (N, g, O/g, P)
        y = _from_columns(y_cols.reshape(n, out_c, -1), out_hw, row_len)
    if b is not None:
        y += b.reshape(-1, 1, 1)
    return y


def conv2d_backward_numpy(dy, x, w, stride, padding, dilation, groups, algo="auto",
                          need_dx=True, need_bias=True, need_dw=True):
    """NumPy conv2d gradients on validated arguments -> (dx or None, dw or None, db or None)."""
    n, c = x.shape[:2]
    out_c, _, kh, kw = w.shape
    out_hw = tuple(dy.shape[2:])
    db = dy.sum(axis=(0, 2, 3)) if need_bias else None
    if n == 0:
        dx = np.zeros(x.shape, dtype=x.dtype) if need_dx else None
        return dx, np.zeros(w.shape, dtype=w.dtype) if need_dw else None, db
    if not (need_dx or need_dw):
        return None, None, db
    cols, row_len = _columns(x, (kh, kw), stride, padding, dilation, groups, out_hw)
    dy_cols = _to_columns(dy, row_len).reshape(n, groups, out_c // groups, -1)
    # dw[g] = sum_n dy[n, g] @ cols[n, g].T; BLAS reads the transposed view in place.
    dw = np.matmul(dy_cols, cols.transpose(0, 1, 3, 2)).sum(axis=0).reshape(w.shape) if need_dw else None
    dx = None
    if need_dx:
        w_t = w.reshape(groups, out_c // groups, -1).transpose(0, 2, 1)
        dcols = np.matmul(w_t, dy_cols, out=cols)  # the column buffer is free again: reuse it
        dx = np.zeros(x.shape, dtype=x.dtype)
        _add_columns(dx, dcols.reshape(n, c, kh, kw, -1), (kh, kw), stride, padding, dilation,
                     out_hw, row_len)
    return dx, dw, db
