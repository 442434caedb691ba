"""Layers: each holds its parameters and hyper-parameters and calls one Tensor op of
gpuconv.functional in forward(); autograd records the op, so no layer has a backward of its own."""
import numpy as np

from .. import functional as F
from ..errors import ArgumentError
from ..ops._args import conv_output_size, pair
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

    def forward(self, x, activation=None):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups, self.algo, activation)

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
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)


class AvgPool2d(_Pool2d):
    def __init__(self, kernel_size, stride=None, padding=0, count_include_pad=True):
        super().__init__(kernel_size, stride, padding)
        self.count_include_pad = count_include_pad

    def forward(self, x):
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.count_include_pad)


class LPPool2d(_Pool2d):
    """L2 pooling (norm_type=2) and its relatives: (sum of x^p over the window)^(1/p)."""

    def __init__(self, norm_type, kernel_size, stride=None):
        super().__init__(kernel_size, stride, 0)
        self.norm_type = float(norm_type)

    def forward(self, x):
        return F.lp_pool2d(x, self.norm_type, self.kernel_size, self.stride)

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

    def forward(self, x, activation=None):
        return F.linear(x, self.weight, self.bias, activation)

    def output_shape(self, input_shape):
        return (input_shape[0], self.out_features)

    def flops(self, input_shape, output_shape):
        return self.out_features * (2 * self.in_features + (1 if self.bias is not None else 0))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}" + \
            ("" if self.bias is not None else ", bias=False")


class _Elementwise(Module):
    """Activations: shape in, shape out, one op per element."""

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def flops(self, input_shape, output_shape):
        return int(np.prod(output_shape[1:]))


class ReLU(_Elementwise):
    def forward(self, x):
        return F.relu(x)


class LeakyReLU(_Elementwise):
    def __init__(self, negative_slope=0.01):
        self.negative_slope = float(negative_slope)

    def forward(self, x):
        return F.leaky_relu(x, self.negative_slope)

    def extra_repr(self):
        return f"negative_slope={self.negative_slope}"


class Tanh(_Elementwise):
    def forward(self, x):
        return F.tanh(x)


class Sigmoid(_Elementwise):
    def forward(self, x):
        return F.sigmoid(x)


class Identity(_Elementwise):
    def forward(self, x):
        return x

    def flops(self, input_shape, output_shape):
        return 0


class Dropout(_Elementwise):
    """Inverted dropout: scaled at training time, the identity in eval()."""

    def __init__(self, p=0.5, seed=0):
        if not 0.0 <= p < 1.0:
            raise ArgumentError(f"Dropout p: expected 0 <= p < 1, got {p!r}")
        self.p = p
        self.rng = np.random.default_rng(seed)

    def forward(self, x):
        return F.dropout(x, self.p, self.training, self.rng)

    def flops(self, input_shape, output_shape):
        return 0

    def extra_repr(self):
        return f"p={self.p}"


class Flatten(Module):
    """(N, C, H, W) -> (N, C*H*W): a free reshape, no copy."""

    def __init__(self, start_dim=1, end_dim=-1):
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, x):
        return F.flatten(x, self.start_dim, self.end_dim)

    def output_shape(self, input_shape):
        return (input_shape[0], int(np.prod(input_shape[1:])))

    def flops(self, input_shape, output_shape):
        return 0


class AdaptiveAvgPool2d(Module):
    """Average pooling to a fixed output size whatever the input's; output_size=1 is the global
    average pool that ends a ResNet."""

    def __init__(self, output_size):
        self.output_size = pair(output_size, "output_size", minimum=1)

    def forward(self, x):
        return F.adaptive_avg_pool2d(x, self.output_size)

    def output_shape(self, input_shape):
        return tuple(input_shape[:2]) + self.output_size

    def flops(self, input_shape, output_shape):
        return int(np.prod(input_shape[1:]))

    def extra_repr(self):
        return f"output_size={self.output_size}"


class BatchNorm2d(Module):
    """Per-channel normalization of NCHW input, PyTorch's semantics: batch statistics in training
    (and running averages updated with `momentum`; None = cumulative average), the running
    statistics in eval(); then a learned scale (weight) and shift (bias) if affine."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 dtype=np.float32):
        if not isinstance(num_features, (int, np.integer)) or num_features < 1:
            raise ArgumentError(f"BatchNorm2d num_features: expected a positive int, got {num_features!r}")
        self.num_features, self.eps, self.momentum = int(num_features), float(eps), momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        self.weight = Parameter(np.ones(num_features, dtype), "weight") if affine else None
        self.bias = Parameter(np.zeros(num_features, dtype), "bias") if affine else None
        if track_running_stats:
            self.register_buffer("running_mean", np.zeros(num_features, dtype))
            self.register_buffer("running_var", np.ones(num_features, dtype))
            self.register_buffer("num_batches_tracked", np.zeros((), np.int64))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def forward(self, x):
        use_batch_stats = self.training or not self.track_running_stats
        momentum = self.momentum
        if self.training and self.track_running_stats:
            # in place: a captured CUDA graph (gpuconv.cuda.graph) replays its writes into the same
            # buffer, where a new array each step would leave the graph counting from a stale one
            self.num_batches_tracked += 1
            if momentum is None:  # cumulative moving average; a device scalar, so no host sync
                momentum = 1.0 / self.num_batches_tracked
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=use_batch_stats, momentum=momentum if self.training else None,
                            eps=self.eps)

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def flops(self, input_shape, output_shape):
        return 2 * int(np.prod(output_shape[1:]))

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"


class CrossEntropyLoss(Module):
    """Softmax + negative log-likelihood of (N, C) logits against (N,) class indices."""

    def __init__(self, reduction="mean", label_smoothing=0.0):
        self.reduction, self.label_smoothing = reduction, label_smoothing

    def forward(self, logits, target):
        return F.cross_entropy(logits, target, self.reduction, self.label_smoothing)
