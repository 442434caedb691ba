"""Batch normalization on the CPU (NumPy arrays): norm.py's math, the batch in parts over the cores
and each part in chunks of images that stay in the cache.

Why (docs/performance.md, "Any CNN on the CPU, session 6"): NumPy runs each whole-array expression
on one core and through main memory, a temporary array per step. Here every pass over the batch is a
parallel region (cpu_parts.py) whose parts walk their images a chunk at a time:
per-channel sums of a chunk are one matrix-vector product (rows of H*W values times ones) and
dot products of rows, and a chunk's temporaries fit in the cache.

The statistics are the same as norm.py's: the mean first, then the biased variance from the
centred values (no E[x^2] - mean^2, which loses digits when the mean is large). The parts' sums are
added in part order, and the split depends on the batch size and the worker count alone, so a
result never depends on timing.
"""
import numpy as np

from . import cpu_parts

CHUNK_BYTES = 1 << 20  # a chunk of x and a temporary: measured best of 0.25-2 MiB (docs/performance.md)
# Smaller arrays take norm.py's whole-array expressions: the regions' hand-overs cost more than
# they save there (docs/performance.md).
MIN_BYTES = 1 << 20


def _channel_sum(a):
    """Per-channel sum of an (n, C, H, W) chunk: a matrix-vector product over its rows."""
    n, c = a.shape[:2]
    rows = a.reshape(n * c, -1)
    return (rows @ np.ones(rows.shape[1], dtype=a.dtype)).reshape(n, c).sum(axis=0)


def _channel_dot(a, b):
    """Per-channel sum of a * b over an (n, C, H, W) chunk: one (1, H*W) @ (H*W, 1) product per
    row, batched (half the time of einsum's row-wise sum of products here)."""
    n, c = a.shape[:2]
    rows_a, rows_b = a.reshape(n * c, 1, -1), b.reshape(n * c, -1, 1)
    return np.matmul(rows_a, rows_b).reshape(n, c).sum(axis=0)


def _plane(v, x):
    """A per-channel vector spread over one image, (1, C, H, W), contiguous: an operand that
    matches a chunk of x element for element but for the batch axis, which NumPy runs with its
    vectorized loops (a (1, C, 1, 1) operand, broadcast within each row, ran at half the speed)."""
    return np.ascontiguousarray(np.broadcast_to(v.reshape(1, -1, 1, 1), (1,) + x.shape[1:]))


def _summed(function, x):
    return cpu_parts.summed(function, x, CHUNK_BYTES)


def _each_chunk(function, x):
    cpu_parts.each_chunk(function, x, CHUNK_BYTES)


def batch_stats(x):
    """-> (mean, biased variance) per channel of a contiguous NCHW array."""
    count = x.shape[0] * x.shape[2] * x.shape[3]

    def squares(images):
        d = x[images] - centred
        return _channel_dot(d, d)

    # two regions, one worker count: else a set_cpu_workers from another thread between them
    # gave the mean of one split and the variance of another
    with cpu_parts.one_worker_count():
        mean = _summed(lambda i: _channel_sum(x[i]), x) / count
        centred = _plane(mean, x)
        return mean, _summed(squares, x) / count


def normalize(x, mean, scale, bias):
    """y = (x - mean) * scale + bias per channel (bias may be None)."""
    y = np.empty_like(x)
    mean, scale = _plane(mean, x), _plane(scale, x)
    bias = None if bias is None else _plane(bias, x)

    def chunk(images):
        out = y[images]
        np.subtract(x[images], mean, out=out)
        out *= scale
        if bias is not None:
            out += bias

    _each_chunk(chunk, x)
    return y


def backward(dy, x, mean, invstd, scale, training, need_dx):
    """-> (dx or None, dweight, dbias) as norm.batch_norm2d_backward, for contiguous dy and x."""
    centred = _plane(mean, x)

    def sums(images):
        d = dy[images]
        return np.stack([_channel_sum(d), _channel_dot(d, x[images] - centred)])

    dbias, dweight = _summed(sums, dy)
    dweight = dweight * invstd  # sum of dy * xhat
    if not need_dx:
        return None, dweight, dbias
    dx = np.empty_like(dy)
    # dx = scale * (dy - mean(dy) - xhat * mean(dy * xhat)) = a*dy + b*(x - mean) + c per channel
    a = _plane(scale, x)
    if training:
        count = x.dtype.type(x.shape[0] * x.shape[2] * x.shape[3])
        b = _plane(-scale * invstd * dweight / count, x)
        c = _plane(-scale * dbias / count, x)

    def chunk(images):
        out = dx[images]
        np.multiply(dy[images], a, out=out)
        if training:
            d = x[images] - centred
            d *= b
            out += d
            out += c

    _each_chunk(chunk, dy)
    return dx, dweight, dbias
