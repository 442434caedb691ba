"""Softmax, log-softmax and the softmax cross-entropy loss, fused so the gradient is one subtraction."""
import numpy as np

from ..backend import get_array_module
from ..errors import ArgumentError, DTypeError, ShapeError
from ._args import check_float_array, same_device


def log_softmax(x, axis=1):
    """x - logsumexp(x), shifted by the max so exp never overflows."""
    check_float_array(x, "x")
    xp = get_array_module(x)
    shifted = x - x.max(axis=axis, keepdims=True)
    shifted -= xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
    return shifted


def softmax(x, axis=1):
    check_float_array(x, "x")
    xp = get_array_module(x)
    e = xp.exp(x - x.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


def check_labels(labels, n, num_classes):
    """labels: integer array of shape (n,) with every value in [0, num_classes)."""
    if not hasattr(labels, "dtype") or not hasattr(labels, "shape"):
        raise DTypeError(f"labels: expected an integer array of class indices, got {type(labels).__name__}")
    if labels.dtype.kind not in "iu":
        raise DTypeError(f"labels: expected an integer dtype (class indices), got {labels.dtype}; "
                         "convert with labels.astype(numpy.int64)")
    if labels.shape != (n,):
        raise ShapeError(f"labels: expected shape ({n},), one class index per sample, got "
                         f"{tuple(labels.shape)}; pass class indices, not one-hot rows")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise ShapeError(f"labels: expected class indices in [0, {num_classes - 1}] for "
                         f"{num_classes} logits per sample, got {bad}")


def softmax_cross_entropy(logits, labels):
    """Mean over the batch of -log softmax(logits)[label] -> (loss as a Python float, dlogits).

    logits: (N, C) float32/float64, N >= 1; labels: (N,) integer class indices.
    dlogits = (softmax(logits) - onehot(labels)) / N, the gradient of the mean loss.
    """
    check_float_array(logits, "logits", 2)
    n, num_classes = logits.shape
    if n == 0 or num_classes == 0:
        raise ShapeError(f"logits: expected at least one sample and one class, got shape {tuple(logits.shape)}")
    check_labels(labels, n, num_classes)
    xp = same_device(logits, labels)
    rows = xp.arange(n)
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = xp.exp(shifted)
    total = probs.sum(axis=1)
    # -log p[label] = log(sum exp) - shifted[label]; summed in float64 so a large batch loses nothing
    loss = float((xp.log(total) - shifted[rows, labels]).sum(dtype=np.float64)) / n
    probs /= total[:, None]
    probs[rows, labels] -= 1
    probs *= 1.0 / n
    return loss, probs


REDUCTIONS = ("mean", "sum", "none")


def cross_entropy(logits, labels, reduction="mean", label_smoothing=0.0):
    """-> (loss, probs): per-sample -sum_k q_k log softmax(logits)_k with q the one-hot label
    mixed with the uniform distribution by label_smoothing, reduced by `reduction` ("mean",
    "sum" or "none"); `probs` (the softmax) is what cross_entropy_backward needs."""
    check_float_array(logits, "logits", 2)
    n, num_classes = logits.shape
    if reduction not in REDUCTIONS:
        raise ArgumentError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ArgumentError(f"label_smoothing: expected a number in [0, 1], got {label_smoothing!r}")
    if num_classes == 0:
        raise ShapeError(f"logits: expected at least one class, got shape {tuple(logits.shape)}")
    check_labels(labels, n, num_classes) if n else None
    xp = same_device(logits, labels)
    logp = log_softmax(logits)
    picked = logp[xp.arange(n), labels]
    per_sample = -picked if label_smoothing == 0 else \
        -(1 - label_smoothing) * picked - label_smoothing * logp.mean(axis=1)
    if reduction == "none":
        loss = per_sample
    else:
        loss = per_sample.sum(dtype=np.float64).astype(logits.dtype)  # float64 sum: a large batch loses nothing
        if reduction == "mean":
            loss = loss / logits.dtype.type(max(n, 1)) if n else loss * logits.dtype.type(float("nan"))
    return loss, xp.exp(logp)


def cross_entropy_backward(dloss, probs, labels, reduction="mean", label_smoothing=0.0):
    """dlogits = (probs - q) * dloss, with the reduction's 1/N for "mean"."""
    xp = get_array_module(probs)
    n, num_classes = probs.shape
    dlogits = probs.copy()
    if label_smoothing:
        dlogits -= probs.dtype.type(label_smoothing / num_classes)
    dlogits[xp.arange(n), labels] -= probs.dtype.type(1 - label_smoothing)
    if reduction == "none":
        return dlogits * dloss[:, None]
    scale = dloss / probs.dtype.type(n) if reduction == "mean" else dloss
    return dlogits * scale
