"""Layers: each keeps what its backward needs and calls one op of gpuconv.functional each way."""
import numpy as np

from .. import functional as F
from ..errors import ArgumentError
from ..functional._args import conv_output_size, pair
from .init import initialize
from .module import Module, Parameter


class Conv2d(Module):
    """2-D convolution, PyTorch's signature. One filter bank of shape
    (out_channels, in_channels/groups, kH, kW) is shared by every position: the local receptive field
    is kH x kW x in_channels/groups, and the parameter count does not depend on the image size."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, init="he", rng=None, algo="auto", dtype=np.float32):
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ArgumentError(f"Conv2d {name}: expected a positive int, got {value!r}")
        if in_channels % groups or out_channels % groups:
            raise ArgumentError(f"Conv2d groups: expected a divisor of in_channels={in_channels} and "
                                f"out_channels={out_channels}, got groups={groups}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = pair(kernel_size, "kernel_size", minimum=1)
        self.stride = pair(stride, "stride", minimum=1)
        self.padding = padding if padding == "same" else pair(padding, "padding", minimum=0)
        self.dilation = pair(dilation, "dilation", minimum=1)
        self.algo = algo
        shape = (out_channels, in_channels // groups) + self.kernel_size
        self.weight = Parameter(initialize(shape, init, rng, dtype), "weight")
        self.bias = Parameter(np.zeros(out_channels, dtype), "bias") if bias else None
        self._x = None

    def _args(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                    groups=self.groups, algo=self.algo)

    def forward(self, x):
        self._x = x
        return F.conv2d(x, self.weight.data, self.bias.data if self.bias else None, **self._args())

    def backward(self, dy, need_dx=True):
        dx, dw, db = F.conv2d_backward(dy, self._x, self.weight.data, need_dx=need_dx,
                                       need_bias=self.bias is not None, **self._args())
        self.weight.grad = dw
        if self.bias is not None:
            self.bias.grad = db
        return dx

    def output_shape(self, input_shape):
        n, _, h, w = input_shape
        if self.padding == "same":
            return (n, self.out_channels, h, w)
        out = [conv_output_size(size, k, s, p, d) for size, k, s, p, d in
               zip((h, w), self.kernel_size, self.stride, self.padding, self.dilation)]
        return (n, self.out_channels, *out)

    def flops(self, input_shape, output_shape):
        """Multiply-adds x 2: every output value is a dot product over one receptive field."""
        _, c_out, h_out, w_out = output_shape
        per_output = 2 * (self.in_channels // self.groups) * self.kernel_size[0] * self.kernel_size[1]
        return c_out * h_out * w_out * (per_output + (1 if self.bias is not None else 0))

    def im2col_elements(self, output_shape):
        """Size of the im2col matrix per image: one column of C/groups*kH*kW values for every output
        position, so each input pixel is copied up to kH*kW times. That copy is the price of
        turning the convolution into one matrix product (a GEMM)."""
        _, _, h_out, w_out = output_shape
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1] * h_out * w_out

    def extra_repr(self):
        text = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            text += f", padding={self.padding}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        return text + ("" if self.bias is not None else ", bias=False")


class _Pool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0):
        self.kernel_size = pair(kernel_size, "kernel_size", minimum=1)
        self.stride = self.kernel_size if stride is None else pair(stride, "stride", minimum=1)
        self.padding = pair(padding, "padding", minimum=0)
        self._x = None

    def output_shape(self, input_shape):
        n, c, h, w = input_shape
        return (n, c, *(conv_output_size(size, k, s, p) for size, k, s, p in
                        zip((h, w), self.kernel_size, self.stride, self.padding)))

    def flops(self, input_shape, output_shape):
        return int(np.prod(output_shape[1:])) * self.kernel_size[0] * self.kernel_size[1]

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class MaxPool2d(_Pool2d):
    def forward(self, x):
        self._x = x
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)

    def backward(self, dy, need_dx=True):
        return F.max_pool2d_backward(dy, self._x, self.kernel_size, self.stride, self.padding)


class AvgPool2d(_Pool2d):
    def __init__(self, kernel_size, stride=None, padding=0, count_include_pad=True):
        super().__init__(kernel_size, stride, padding)
        self.count_include_pad = count_include_pad

    def forward(self, x):
        self._x = x
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.count_include_pad)

    def backward(self, dy, need_dx=True):
        return F.avg_pool2d_backward(dy, self._x, self.kernel_size, self.stride, self.padding,
                                     self.count_include_pad)


class LPPool2d(_Pool2d):
    """L2 pooling (norm_type=2) and its relatives: (sum of x^p over the window)^(1/p)."""

    def __init__(self, norm_type, kernel_size, stride=None):
        super().__init__(kernel_size, stride, 0)
        self.norm_type = float(norm_type)

    def forward(self, x):
        self._x = x
        return F.lp_pool2d(x, self.norm_type, self.kernel_size, self.stride)

    def backward(self, dy, need_dx=True):
        return F.lp_pool2d_backward(dy, self._x, self.norm_type, self.kernel_size, self.stride)

    def extra_repr(self):
        return f"norm_type={self.norm_type}, " + super().extra_repr()


class Linear(Module):
    """Fully connected: every output sees every input, so parameters = in*out + out."""

    def __init__(self, in_features, out_features, bias=True, init="he", rng=None, dtype=np.float32):
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ArgumentError(f"Linear {name}: expected a positive int, got {value!r}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(initialize((out_features, in_features), init, rng, dtype), "weight")
        self.bias = Parameter(np.zeros(out_features, dtype), "bias") if bias else None
        self._x = None

    def forward(self, x):
        self._x = x
        return F.linear(x, self.weight.data, self.bias.data if self.bias else None)

    def backward(self, dy, need_dx=True):
        dx, dw, db = F.linear_backward(dy, self._x, self.weight.data, need_dx=need_dx)
        self.weight.grad = dw
        if self.bias is not None:
            self.bias.grad = db
        return dx

    def output_shape(self, input_shape):
        return (input_shape[0], self.out_features)

    def flops(self, input_shape, output_shape):
        return self.out_features * (2 * self.in_features + (1 if self.bias is not None else 0))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}"


class _Elementwise(Module):
    """Activations: the backward needs only the forward's output."""
    _y = None

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def flops(self, input_shape, output_shape):
        return int(np.prod(output_shape[1:]))


class ReLU(_Elementwise):
    def forward(self, x):
        self._y = F.relu(x)
        return self._y

    def backward(self, dy, need_dx=True):
        return F.relu_backward(dy, self._y)


class Tanh(_Elementwise):
    def forward(self, x):
        self._y = F.tanh(x)
        return self._y

    def backward(self, dy, need_dx=True):
        return F.tanh_backward(dy, self._y)


class Sigmoid(_Elementwise):
    def forward(self, x):
        self._y = F.sigmoid(x)
        return self._y

    def backward(self, dy, need_dx=True):
        return F.sigmoid_backward(dy, self._y)


class Dropout(_Elementwise):
    """Inverted dropout: scaled at training time, the identity in eval()."""

    def __init__(self, p=0.5, seed=0):
        if not 0.0 <= p < 1.0:
            raise ArgumentError(f"Dropout p: expected 0 <= p < 1, got {p!r}")
        self.p = p
        self.rng = np.random.default_rng(seed)
        self._mask = None

    def forward(self, x):
        if not self.training or self.p == 0.0:
            self._mask = None
            return x
        y, self._mask = F.dropout(x, self.p, self.rng)
        return y

    def backward(self, dy, need_dx=True):
        return dy if self._mask is None else F.dropout_backward(dy, self._mask, self.p)

    def flops(self, input_shape, output_shape):
        return 0

    def extra_repr(self):
        return f"p={self.p}"


class Flatten(Module):
    """(N, C, H, W) -> (N, C*H*W): a free reshape, no copy."""
    _shape = None

    def forward(self, x):
        self._shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy, need_dx=True):
        return dy.reshape(self._shape)

    def output_shape(self, input_shape):
        return (input_shape[0], int(np.prod(input_shape[1:])))

    def flops(self, input_shape, output_shape):
        return 0


class CrossEntropyLoss(Module):
    """Softmax + negative log-likelihood, mean over the batch. backward() gives dL/dlogits."""
    _dlogits = None

    def forward(self, logits, labels):
        loss, self._dlogits = F.softmax_cross_entropy(logits, labels)
        return loss

    def backward(self, dy=1.0, need_dx=True):
        return self._dlogits if dy == 1.0 else self._dlogits * dy
