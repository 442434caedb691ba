"""Array-level ops on raw NumPy/CuPy arrays (NCHW, float32/float64, PyTorch semantics).

Each op is a forward/backward pair of plain functions; the layers in gpuconv.nn keep the state.
"""
from .conv import conv2d, conv2d_backward
from .pool import (avg_pool2d, avg_pool2d_backward, lp_pool2d, lp_pool2d_backward, max_pool2d,
                   max_pool2d_backward)
