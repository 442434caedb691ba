"""The Tensor-level ops, PyTorch's `torch.nn.functional` names: F.conv2d, F.relu, F.cross_entropy, ...

Each is one autograd Function around one forward/backward pair of gpuconv.ops: the forward keeps
what the pair's backward needs (a pool keeps its input, ReLU its output), the backward calls the
pair and returns one gradient per input. Inputs may be Tensors or plain arrays (constants).
"""
import numpy as np

from . import ops
from .backend import get_array_module, uses_cuda_kernels
from .autograd import Function, Tensor, as_tensor, cat  # noqa: F401  (cat is re-exported)
from .errors import ArgumentError


# ----------------------------------------------------------------------------------------------
# convolution, pooling, dense


class Conv2dFunction(Function):
    """conv2d, or relu(conv2d) with activation="relu" (one op: on a GPU the ReLU is the kernel's
    epilogue); the backward then masks dy with the output first."""

    def __init__(self, stride, padding, dilation, groups, algo, activation=None):
        self.args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, algo=algo)
        self.activation = activation

    def forward(self, x, w, b=None):
        self.x, self.w, self.has_bias = x, w, b is not None
        y = ops.conv2d(x, w, b, activation=self.activation, **self.args)
        self.y = y if self.activation else None
        return y

    def backward(self, dy):
        if self.activation == "relu":
            dy = ops.relu_backward(dy, self.y)
        need_dx, need_dw = self.needs_input_grad[:2]
        need_bias = self.has_bias and self.needs_input_grad[2]
        dx, dw, db = ops.conv2d_backward(dy, self.x, self.w, need_dx=need_dx, need_dw=need_dw,
                                         need_bias=need_bias, **self.args)
        return (dx, dw, db) if self.has_bias else (dx, dw)


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, algo="auto", activation=None):
    """2-D cross-correlation of NCHW x with weight (O, C/groups, KH, KW); see gpuconv.ops.conv2d.
    activation="relu" gives relu(conv2d(...)) as one op (fused on a GPU)."""
    inputs = (x, weight) if bias is None else (x, weight, bias)
    return Conv2dFunction(stride, padding, dilation, groups, algo, activation)(*inputs)


class _PoolFunction(Function):
    def __init__(self, forward, backward, *args):
        self.forward_op, self.backward_op, self.args = forward, backward, args

    def forward(self, x):
        self.x = x
        return self.forward_op(x, *self.args)

    def backward(self, dy):
        return self.backward_op(dy, self.x, *self.args)


class _SavingPoolFunction(_PoolFunction):
    """Max and Lp pooling on a GPU keep what their backward would otherwise recompute: the max
    forward's argmax indices, the Lp forward's output. The CPU path keeps only x, as before."""

    def __init__(self, forward, backward, saved_name, *args):
        super().__init__(forward, backward, *args)
        self.saved_name = saved_name

    def forward(self, x):
        self.x, self.saved = x, None
        if not uses_cuda_kernels(x):
            return self.forward_op(x, *self.args)
        if self.saved_name == "indices":
            y, self.saved = self.forward_op(x, *self.args, return_indices=True)
        else:
            y = self.saved = self.forward_op(x, *self.args)
        return y

    def backward(self, dy):
        if self.saved is None:
            return self.backward_op(dy, self.x, *self.args)
        return self.backward_op(dy, self.x, *self.args, **{self.saved_name: self.saved})


def max_pool2d(x, kernel_size, stride=None, padding=0):
    return _SavingPoolFunction(ops.max_pool2d, ops.max_pool2d_backward, "indices", kernel_size, stride, padding)(x)


def avg_pool2d(x, kernel_size, stride=None, padding=0, count_include_pad=True):
    return _PoolFunction(ops.avg_pool2d, ops.avg_pool2d_backward, kernel_size, stride, padding,
                         count_include_pad)(x)


def lp_pool2d(x, norm_type, kernel_size, stride=None):
    """(sum of x^p over each window)^(1/p); norm_type=2 is L2 pooling."""
    return _SavingPoolFunction(lambda x, *a: ops.lp_pool2d(x, norm_type, *a),
                               lambda dy, x, *a, **saved: ops.lp_pool2d_backward(dy, x, norm_type, *a, **saved),
                               "y", kernel_size, stride)(x)


class AdaptiveAvgPool2dFunction(Function):
    def __init__(self, output_size):
        self.output_size = output_size

    def forward(self, x):
        self.x_shape = x.shape
        return ops.adaptive_avg_pool2d(x, self.output_size)

    def backward(self, dy):
        return ops.adaptive_avg_pool2d_backward(dy, self.x_shape, self.output_size)


def adaptive_avg_pool2d(x, output_size):
    return AdaptiveAvgPool2dFunction(output_size)(x)


class LinearFunction(Function):
    def __init__(self, activation=None):
        self.activation = activation

    def forward(self, x, w, b=None):
        self.x, self.w, self.has_bias = x, w, b is not None
        y = ops.linear(x, w, b, activation=self.activation)
        self.y = y if self.activation else None
        return y

    def backward(self, dy):
        if self.activation == "relu":
            dy = ops.relu_backward(dy, self.y)
        dx, dw, db = ops.linear_backward(dy, self.x, self.w, need_dx=self.needs_input_grad[0])
        return (dx, dw, db) if self.has_bias else (dx, dw)


def linear(x, weight, bias=None, activation=None):
    """x @ weight.T + bias, weight (out_features, in_features) as in PyTorch; activation="relu"
    gives relu(linear(...)) as one op (on a GPU the bias add and the ReLU are one launch)."""
    return LinearFunction(activation)(*((x, weight) if bias is None else (x, weight, bias)))


# ----------------------------------------------------------------------------------------------
# activations and dropout


class _ByOutput(Function):
    """An activation whose gradient needs only its output (ReLU, tanh, sigmoid)."""

    def __init__(self, forward, backward):
        self.forward_op, self.backward_op = forward, backward

    def forward(self, x):
        self.y = self.forward_op(x)
        return self.y

    def backward(self, dy):
        return self.backward_op(dy, self.y)


def relu(x):
    return _ByOutput(ops.relu, ops.relu_backward)(x)


def tanh(x):
    return _ByOutput(ops.tanh, ops.tanh_backward)(x)


def sigmoid(x):
    return _ByOutput(ops.sigmoid, ops.sigmoid_backward)(x)


class LeakyReLUFunction(Function):
    def __init__(self, negative_slope):
        self.negative_slope = negative_slope

    def forward(self, x):
        self.x = x
        return ops.leaky_relu(x, self.negative_slope)

    def backward(self, dy):
        return ops.leaky_relu_backward(dy, self.x, self.negative_slope)


def leaky_relu(x, negative_slope=0.01):
    return LeakyReLUFunction(negative_slope)(x)


class DropoutFunction(Function):
    def __init__(self, p, rng):
        self.p, self.rng = p, rng

    def forward(self, x):
        y, self.mask = ops.dropout(x, self.p, self.rng)
        return y

    def backward(self, dy):
        return ops.dropout_backward(dy, self.mask, self.p)


def dropout(x, p=0.5, training=True, rng=None):
    """Inverted dropout when training (rng: a numpy/cupy Generator for the mask); the identity
    otherwise."""
    if not training or p == 0:
        return as_tensor(x)
    return DropoutFunction(p, rng)(x)


# ----------------------------------------------------------------------------------------------
# normalization


class BatchNorm2dFunction(Function):
    def __init__(self, training, eps):
        self.training, self.eps = training, eps

    def forward(self, x, running_mean, running_var, weight, bias):
        """weight and bias may each be None (1 and 0)."""
        stats = (None, None) if self.training else (running_mean, running_var)
        y, self.mean, self.var, self.invstd = ops.batch_norm2d(x, weight, bias, *stats, eps=self.eps)
        self.x, self.weight, self.has_bias = x, weight, bias is not None
        return y

    def backward(self, dy):
        dx, dweight, dbias = ops.batch_norm2d_backward(dy, self.x, self.weight, self.mean, self.invstd,
                                                       self.training, need_dx=self.needs_input_grad[0])
        return (dx, None, None, None if self.weight is None else dweight, dbias if self.has_bias else None)


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """torch.nn.functional.batch_norm for NCHW input. In training the batch's statistics normalize
    x and, when running_mean/var are arrays, are blended into them in place (momentum; None means
    a cumulative average is the caller's to do); in eval the running statistics normalize."""
    running_mean, running_var = (v.data if isinstance(v, Tensor) else v for v in (running_mean, running_var))
    if not training and (running_mean is None or running_var is None):
        raise ArgumentError("batch_norm: eval mode needs running_mean and running_var")
    function = BatchNorm2dFunction(training, eps)
    y = function(x, running_mean, running_var, weight, bias)  # each of weight, bias may be None, as in torch
    if training and running_mean is not None and momentum is not None:
        update_running_stats(running_mean, running_var, function.mean, function.var, momentum, as_tensor(x).shape)
    return y


def update_running_stats(running_mean, running_var, mean, var, momentum, x_shape):
    """running = (1 - momentum) * running + momentum * batch, in place; the variance blended in is
    the unbiased one, as PyTorch does."""
    xp = get_array_module(running_mean)
    if isinstance(momentum, (int, float, np.number)):  # a kernel argument: no host-to-device copy
        momentum = running_mean.dtype.type(momentum)
    else:  # a device scalar (the cumulative average's 1 / batches)
        momentum = xp.asarray(momentum, dtype=running_mean.dtype)
    count = x_shape[0] * x_shape[2] * x_shape[3]
    unbiased = var * running_var.dtype.type(count / max(count - 1, 1))
    running_mean *= 1 - momentum
    running_mean += momentum * mean.astype(running_mean.dtype)
    running_var *= 1 - momentum
    running_var += momentum * unbiased.astype(running_var.dtype)


# ----------------------------------------------------------------------------------------------
# loss and shapes


class CrossEntropyFunction(Function):
    def __init__(self, labels, reduction, label_smoothing):
        self.labels, self.reduction, self.label_smoothing = labels, reduction, label_smoothing

    def forward(self, logits):
        loss, self.probs = ops.cross_entropy(logits, self.labels, self.reduction, self.label_smoothing)
        return loss

    def backward(self, dloss):
        return ops.cross_entropy_backward(dloss, self.probs, self.labels, self.reduction, self.label_smoothing)


def cross_entropy(logits, target, reduction="mean", label_smoothing=0.0):
    """Softmax cross-entropy of (N, C) logits against (N,) integer class indices -> a Tensor
    (a scalar for "mean"/"sum", (N,) for "none")."""
    labels = target.data if isinstance(target, Tensor) else target
    return CrossEntropyFunction(labels, reduction, label_smoothing)(logits)


def log_softmax(x, dim=1):
    """log softmax along `dim` (no gradient: use cross_entropy to train)."""
    return Tensor(ops.log_softmax(as_tensor(x).data, axis=dim))


def softmax(x, dim=1):
    """softmax along `dim` (no gradient: use cross_entropy to train)."""
    return Tensor(ops.softmax(as_tensor(x).data, axis=dim))


def flatten(x, start_dim=0, end_dim=-1):
    return as_tensor(x).flatten(start_dim, end_dim)


__all__ = ["conv2d", "max_pool2d", "avg_pool2d", "lp_pool2d", "adaptive_avg_pool2d", "linear", "relu",
           "leaky_relu", "tanh", "sigmoid", "dropout", "batch_norm", "cross_entropy", "log_softmax",
           "softmax", "flatten", "cat"]
