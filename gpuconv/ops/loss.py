"""Softmax, log-softmax and the softmax cross-entropy loss, fused so the gradient is one subtraction."""
import numpy as np

from ..backend import get_array_module, is_device_array
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
    """labels: integer array of shape (n,) with every value in [0, num_classes).

    The value range is checked for host (NumPy) labels only: reading a GPU array's minimum back
    would block every training step. Check labels before they are copied to the GPU (the Trainer
    checks the whole training set once); on the GPU an out-of-range label gives a NaN loss
    (see _indexable_labels), which the Trainer reports."""
    if not hasattr(labels, "dtype") or not hasattr(labels, "shape"):
        raise DTypeError(f"labels: expected an integer array of class indices, got {type(labels).__name__}")
    if labels.dtype.kind not in "iu":
        raise DTypeError(f"labels: expected an integer dtype (class indices), got {labels.dtype}; "
                         "convert with labels.astype(numpy.int64)")
    if labels.shape != (n,):
        raise ShapeError(f"labels: expected shape ({n},), one class index per sample, got "
                         f"{tuple(labels.shape)}; pass class indices, not one-hot rows")
    if is_device_array(labels):
        return
    low, high = int(labels.min()), int(labels.max())  # host: NumPy labels only (returned above otherwise)
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise ShapeError(f"labels: expected class indices in [0, {num_classes - 1}] for "
                         f"{num_classes} logits per sample, got {bad}")


def _indexable_labels(xp, labels, num_classes):
    """(labels safe to index with, mask of out-of-range labels or None). Device labels are not
    range-checked on the host (a blocking read); an out-of-range one indexes class 0 instead of
    memory past the row, and its sample's loss and gradient become NaN, so it cannot train silently."""
    if not is_device_array(labels):
        return labels, None
    invalid = (labels < 0) | (labels >= num_classes)
    return xp.where(invalid, 0, labels), invalid


def softmax_cross_entropy(logits, labels):
    """Mean over the batch of -log softmax(logits)[label] -> (loss, dlogits); the loss is a Python
    float for NumPy input and a 0-d array on the GPU (no blocking read) for device input.

    logits: (N, C) float32/float64, N >= 1; labels: (N,) integer class indices.
    dlogits = (softmax(logits) - onehot(labels)) / N, the gradient of the mean loss.
    """
    check_float_array(logits, "logits", 2)
    n, num_classes = logits.shape
    if n == 0 or num_classes == 0:
        raise ShapeError(f"logits: expected at least one sample and one class, got shape {tuple(logits.shape)}")
    check_labels(labels, n, num_classes)
    xp = same_device(logits, labels)
    labels, invalid = _indexable_labels(xp, labels, num_classes)
    rows = xp.arange(n)
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = xp.exp(shifted)
    total = probs.sum(axis=1)
    # -log p[label] = log(sum exp) - shifted[label]; summed in float64 so a large batch loses nothing
    per_sample = xp.log(total) - shifted[rows, labels]
    if invalid is not None:
        per_sample = xp.where(invalid, logits.dtype.type(np.nan), per_sample)
    loss = per_sample.sum(dtype=np.float64) / n
    if not is_device_array(loss):
        loss = float(loss)  # host: a NumPy scalar (device values returned above as 0-d arrays)
    probs /= total[:, None]
    probs[rows, labels] -= 1
    probs *= 1.0 / n
    if invalid is not None:
        probs[invalid] = np.nan
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
    labels, invalid = _indexable_labels(xp, labels, num_classes)
    logp = log_softmax(logits)
    picked = logp[xp.arange(n), labels]
    per_sample = -picked if label_smoothing == 0 else \
        -(1 - label_smoothing) * picked - label_smoothing * logp.mean(axis=1)
    if invalid is not None:
        per_sample = xp.where(invalid, logits.dtype.type(np.nan), per_sample)
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
    labels, invalid = _indexable_labels(xp, labels, num_classes)
    dlogits = probs.copy()
    if label_smoothing:
        dlogits -= probs.dtype.type(label_smoothing / num_classes)
    dlogits[xp.arange(n), labels] -= probs.dtype.type(1 - label_smoothing)
    if invalid is not None:
        dlogits[invalid] = np.nan
    if reduction == "none":
        return dlogits * dloss[:, None]
    scale = dloss / probs.dtype.type(n) if reduction == "mean" else dloss
    return dlogits * scale
