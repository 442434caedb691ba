"""Array-level ops on raw NumPy/CuPy arrays (NCHW, float32/float64, PyTorch semantics).

Each op is a forward/backward pair of plain functions; the layers in gpuconv.nn keep the state.
conv and pool run gpuconv's CUDA kernels on CuPy arrays and im2col/BLAS NumPy code on the CPU;
the elementwise ops, linear and the loss are array-module calls that work on both.
"""
from .activation import (dropout, dropout_backward, relu, relu_backward, sigmoid, sigmoid_backward,
                         tanh, tanh_backward)
from .conv import conv2d, conv2d_backward
from .linear import linear, linear_backward
from .loss import log_softmax, softmax, softmax_cross_entropy
from .pool import (avg_pool2d, avg_pool2d_backward, lp_pool2d, lp_pool2d_backward, max_pool2d,
                   max_pool2d_backward)

__all__ = [
    "conv2d", "conv2d_backward",
    "max_pool2d", "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward",
    "lp_pool2d", "lp_pool2d_backward",
    "relu", "relu_backward", "tanh", "tanh_backward", "sigmoid", "sigmoid_backward",
    "dropout", "dropout_backward",
    "linear", "linear_backward",
    "log_softmax", "softmax", "softmax_cross_entropy",
]
