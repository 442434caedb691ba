"""Softmax, log-softmax and the softmax cross-entropy loss, fused so the gradient is one subtraction."""
import numpy as np

from ..backend import get_array_module
from ..errors import DTypeError, ShapeError
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
