"""Array-level ops on raw NumPy/CuPy arrays (NCHW, float32/float64, PyTorch semantics).

Each op is a forward/backward pair of plain functions: `conv2d(x, w, b)` and
`conv2d_backward(dy, x, w)`, the seeds of the framework written out. gpuconv.functional wraps
each pair as one autograd Function; call the pairs directly to see (or test) one op in isolation.
conv and pool run gpuconv's CUDA kernels on CuPy arrays and im2col/BLAS NumPy code on the CPU;
the elementwise ops, linear, batch norm and the loss are array-module calls that work on both.
"""
from .activation import (dropout, dropout_backward, leaky_relu, leaky_relu_backward, relu, relu_backward,
                         sigmoid, sigmoid_backward, tanh, tanh_backward)
from .conv import conv2d, conv2d_backward
from .linear import linear, linear_backward
from .loss import cross_entropy, cross_entropy_backward, log_softmax, softmax, softmax_cross_entropy
from .norm import batch_norm2d, batch_norm2d_backward
from .pool import (adaptive_avg_pool2d, adaptive_avg_pool2d_backward, avg_pool2d, avg_pool2d_backward,
                   lp_pool2d, lp_pool2d_backward, max_pool2d, max_pool2d_backward)

__all__ = [
    "conv2d", "conv2d_backward",
    "max_pool2d", "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward",
    "lp_pool2d", "lp_pool2d_backward", "adaptive_avg_pool2d", "adaptive_avg_pool2d_backward",
    "relu", "relu_backward", "leaky_relu", "leaky_relu_backward", "tanh", "tanh_backward",
    "sigmoid", "sigmoid_backward", "dropout", "dropout_backward",
    "linear", "linear_backward", "batch_norm2d", "batch_norm2d_backward",
    "log_softmax", "softmax", "softmax_cross_entropy", "cross_entropy", "cross_entropy_backward",
]
