"""The model zoo: LeNet5, SimpleCNN, the CIFAR-style ResNets of He et al. 2016 (resnet8, resnet20, ...)
and InceptionNet, a small GoogLeNet whose blocks are nn.Concat branches.

Every model is an nn.Sequential of named children (so `summary()` prints its layer table and
`show` can take feature maps after a named child), written with forward() only; autograd gives the
backward. `build_model(name, in_channels, num_classes, image_size)` builds one by its command-line
name (MODELS).

LeNet-5 (LeCun et al. 1998), as PyTorch tutorials write it for 28x28 MNIST:
conv(1->6, 5x5, pad 2) -> act -> pool 2 -> conv(6->16, 5x5) -> act -> pool 2 -> 400 -> 120 -> 84 -> 10.
The 1998 flavour is activation="tanh", pool="avg"; the modern default is ReLU + max pooling.
"""
import numpy as np

from . import nn
from .autograd import Function
from .backend import get_array_module
from .errors import ArgumentError
from .nn import cpu_ops, cpu_plan, cpu_workers

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
POOLS = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}


def _check_positive_int(value, name, model):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ArgumentError(f"{model} {name}: expected a positive int, got {value!r}")
    return int(value)


class LeNet5(nn.Sequential):
    # show: feature maps are taken after these children (what the next layer sees)
    feature_layers = {"conv1": "act1", "conv2": "act2"}

    def __init__(self, activation="relu", pool="max", num_classes=10, seed=0, dtype=np.float32,
                 in_channels=1, image_size=28):
        if activation not in ACTIVATIONS:
            raise ArgumentError(f"LeNet5 activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if pool not in POOLS:
            raise ArgumentError(f"LeNet5 pool: expected one of {sorted(POOLS)}, got {pool!r}")
        _check_positive_int(in_channels, "in_channels", "LeNet5")
        if _check_positive_int(image_size, "image_size", "LeNet5") < 12:
            raise ArgumentError(f"LeNet5 image_size: expected at least 12 pixels, got {image_size}")
        act, pool_layer = ACTIVATIONS[activation], POOLS[pool]
        init = "he" if activation == "relu" else "glorot"
        rng = np.random.default_rng(seed)
        kw = dict(init=init, rng=rng, dtype=dtype)
        side = (image_size // 2 - 4) // 2  # 28 -> 28 (pad 2) -> 14 -> 10 -> 5
        super().__init__()
        self.activation, self.pool = activation, pool
        for name, layer in [
            ("conv1", nn.Conv2d(in_channels, 6, 5, padding=2, **kw)), ("act1", act()), ("pool1", pool_layer(2)),
            ("conv2", nn.Conv2d(6, 16, 5, **kw)), ("act2", act()), ("pool2", pool_layer(2)),
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(16 * side * side, 120, **kw)), ("act3", act()),
            ("fc2", nn.Linear(120, 84, **kw)), ("act4", act()),
            ("fc3", nn.Linear(84, num_classes, init="glorot", rng=rng, dtype=dtype)),
        ]:
            self.add(name, layer)


class SimpleCNN(nn.Sequential):
    """Blocks of conv 3x3 (pad 1, no bias) -> BatchNorm -> max pool 2 -> ReLU, then
    flatten -> Linear(hidden) -> ReLU -> Linear(num_classes) (or straight to the classes when
    hidden=0). Pooling before the ReLU computes exactly conv-BN-ReLU-pool (max and ReLU commute:
    both are monotone), with the ReLU and its backward on a quarter of the values.

    The default, three blocks of widths (32, 64, 128) and hidden 128, was chosen for Fashion-MNIST on a
    held-out part of its training set over two blocks (32, 64): the third block at 7x7 costs little
    and leaves a 128 x 3 x 3 map for the first Linear instead of 64 x 7 x 7, fewer weights to overfit
    (docs/performance.md, "Choosing the Fashion-MNIST recipe"). dropout > 0 puts an nn.Dropout of that
    p before the last Linear (no parameters: a checkpoint loads with or without it)."""

    def __init__(self, in_channels=1, num_classes=10, image_size=28, widths=(32, 64, 128), hidden=128, seed=0,
                 dtype=np.float32, dropout=0.0):
        _check_positive_int(in_channels, "in_channels", "SimpleCNN")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float, np.integer, np.floating)) or not (
                0 <= dropout < 1):
            raise ArgumentError(f"SimpleCNN dropout: expected a number in [0, 1), got {dropout!r}")
        widths = tuple(_check_positive_int(w, "widths entry", "SimpleCNN") for w in widths)
        if not 1 <= len(widths) <= 4:
            raise ArgumentError(f"SimpleCNN widths: expected 1 to 4 block widths, got {widths!r}")
        side = _check_positive_int(image_size, "image_size", "SimpleCNN") >> len(widths)
        if side < 1:
            raise ArgumentError(f"SimpleCNN: {len(widths)} pools of 2 leave nothing of a {image_size}-pixel image")
        if isinstance(hidden, bool) or not isinstance(hidden, (int, np.integer)) or hidden < 0:
            raise ArgumentError(f"SimpleCNN hidden: expected an int >= 0, got {hidden!r}")
        rng = np.random.default_rng(seed)
        super().__init__()
        self.widths, self.hidden = widths, int(hidden)
        channels = in_channels
        for i, width in enumerate(widths, 1):
            self.add(f"conv{i}", nn.Conv2d(channels, width, 3, padding=1, bias=False, rng=rng, dtype=dtype))
            self.add(f"bn{i}", nn.BatchNorm2d(width, dtype=dtype))
            self.add(f"pool{i}", nn.MaxPool2d(2))
            self.add(f"relu{i}", nn.ReLU())
            channels = width
        self.add("flatten", nn.Flatten())
        features = channels * side * side
        if hidden:
            self.add("fc1", nn.Linear(features, hidden, rng=rng, dtype=dtype))
            self.add(f"relu{len(widths) + 1}", nn.ReLU())
            features = hidden
        if dropout:  # before the classifier, as in AlexNet and VGG; no parameters, nothing saved
            self.add("drop", nn.Dropout(dropout, seed=seed))
        self.fc_dropout = float(dropout)
        self.add("fc", nn.Linear(features, num_classes, init="glorot", rng=rng, dtype=dtype))
        self.feature_layers = {f"block{i}": f"relu{i}" for i in (1, 2) if i <= len(widths)}


# ----------------------------------------------------------------------------------------------
# ResNet for CIFAR (He, Zhang, Ren, Sun 2016, section 4.2)


class ShortcutAFunction(Function):
    """The paper's option A shortcut where a stage halves the size and doubles the channels: take
    every second pixel (stride 2) and pad the channels with zeros, half before and half after, as
    the common CIFAR implementations do. No parameters."""

    def __init__(self, out_channels, stride):
        self.out_channels, self.stride = out_channels, stride

    def forward(self, x):
        xp = get_array_module(x)
        s = self.stride
        sub = x[:, :, ::s, ::s]
        extra = self.out_channels - x.shape[1]
        self.before = extra // 2
        self.in_shape, self.in_channels = x.shape, x.shape[1]
        out = xp.zeros((sub.shape[0], self.out_channels) + sub.shape[2:], x.dtype)
        out[:, self.before:self.before + x.shape[1]] = sub
        return out

    def backward(self, g):
        xp = get_array_module(g)
        s = self.stride
        dx = xp.zeros(self.in_shape, g.dtype)
        dx[:, :, ::s, ::s] = g[:, self.before:self.before + self.in_channels]
        return dx


class ShortcutA(nn.Module):
    def __init__(self, in_channels, out_channels, stride):
        if out_channels < in_channels:
            raise ArgumentError(f"ShortcutA: out_channels {out_channels} < in_channels {in_channels}")
        self.in_channels, self.out_channels, self.stride = int(in_channels), int(out_channels), int(stride)

    def forward(self, x):
        return ShortcutAFunction(self.out_channels, self.stride)(x)

    def output_shape(self, input_shape):
        n, _, h, w = input_shape
        return (n, self.out_channels, -(-h // self.stride), -(-w // self.stride))

    def flops(self, input_shape, output_shape):
        return 0

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class ShortcutAOp(cpu_ops.Op):
    """ShortcutA in the CPU executor (gpuconv/nn/cpu_plan.py), on its batch-innermost arrays
    [C, H, W, n]: the same values as ShortcutAFunction, side by side with it. The padding channels
    of the output, and the positions of dx the stride skips, are never written: their buffers are
    zeroed when allocated and reused."""

    def __init__(self, layer, index):
        self.layer, self.index = layer, index

    def setup(self, shape):
        layer = self.layer
        if len(shape) != 3 or shape[0] != layer.in_channels:
            raise cpu_ops.Unsupported("shortcut channels")
        self.in_shape, self.before = tuple(shape), (layer.out_channels - layer.in_channels) // 2
        return tuple(layer.output_shape((1,) + self.in_shape)[1:])

    def forward(self, chunk, x, scratch):
        s, c = self.layer.stride, self.in_shape[0]
        y = cpu_ops.buffer(chunk.store, (self.index, "y"), (self.layer.out_channels,) + x[0, ::s, ::s].shape,
                           zero=True)
        y[self.before:self.before + c] = x[:, ::s, ::s]
        return y

    def backward(self, chunk, dy, need_dx, grads, scratch):
        if not need_dx:
            return None
        s, c = self.layer.stride, self.in_shape[0]
        dx = cpu_ops.buffer(scratch, (self.index, "dx"), self.in_shape + (chunk.n,), zero=True)
        dx[:, ::s, ::s] = dy[self.before:self.before + c]
        return dx


@cpu_plan.lowers(ShortcutA)
def _lower_shortcut_a(layers, index, ops):
    ops.append(ShortcutAOp(layers[index], index))
    return 1


cpu_workers.describable(ShortcutA, lambda layer: dict(in_channels=layer.in_channels, out_channels=layer.out_channels,
                                                      stride=layer.stride),
                        lambda settings: ShortcutA(**settings))


class BasicBlock(nn.Module):
    """conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut, then ReLU. The shortcut is
    the identity, or option A (ShortcutA) where the shape changes."""

    def __init__(self, in_channels, out_channels, stride=1, rng=None, dtype=np.float32):
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False, rng=rng,
                               dtype=dtype)
        self.bn1 = nn.BatchNorm2d(out_channels, dtype=dtype)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False, rng=rng, dtype=dtype)
        self.bn2 = nn.BatchNorm2d(out_channels, dtype=dtype)
        self.relu = nn.ReLU()  # one instance, used twice
        if stride != 1 or in_channels != out_channels:
            self.shortcut = ShortcutA(in_channels, out_channels, stride)
        else:
            self.shortcut = None

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.shortcut is None else self.shortcut(x)))

    def output_shape(self, input_shape):
        return self.conv2.output_shape(self.conv1.output_shape(input_shape))

    def flops(self, input_shape, output_shape):
        middle = self.conv1.output_shape(input_shape)
        elements = int(np.prod(output_shape[1:]))
        return (self.conv1.flops(input_shape, middle) + 3 * int(np.prod(middle[1:]))  # conv, BN, ReLU
                + self.conv2.flops(middle, output_shape) + 4 * elements)  # conv, BN, add, ReLU

    def im2col_elements(self, output_shape):
        middle_channels = self.conv1.out_channels
        return (self.conv1.in_channels + middle_channels) * 9 * output_shape[2] * output_shape[3]


# The executor runs a BasicBlock as its forward above computes it: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))
cpu_plan.lowers_residual(BasicBlock, lambda block: (
    [block.conv1, block.bn1, block.relu, block.conv2, block.bn2],
    [] if block.shortcut is None else cpu_plan.steps(block.shortcut), [block.relu]))


class ResNet(nn.Sequential):
    """CIFAR ResNet: conv3x3(16) -> BN -> ReLU -> 3 stages of n BasicBlocks (16, 32, 64 channels;
    the 2nd and 3rd start with stride 2) -> global average pool -> Linear. depth = 6n + 2
    (resnet20: n = 3, 0.27M parameters). Shortcuts are identities, option A (zero-padded channels,
    no parameters) where a stage changes the shape. Takes 1- or 3-channel input of any size >= 4."""

    feature_layers = {"conv1": "relu", "layer1": "layer1"}

    def __init__(self, depth=20, in_channels=3, num_classes=10, widths=(16, 32, 64), seed=0, dtype=np.float32):
        if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 8 or (depth - 2) % 6:
            raise ArgumentError(f"ResNet depth: expected 6n + 2 with n >= 1 (8, 14, 20, 32, 44, 56, 110), "
                                f"got {depth!r}")
        _check_positive_int(in_channels, "in_channels", "ResNet")
        n = (depth - 2) // 6
        rng = np.random.default_rng(seed)
        super().__init__()
        self.depth = int(depth)
        self.add("conv1", nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False, rng=rng, dtype=dtype))
        self.add("bn1", nn.BatchNorm2d(widths[0], dtype=dtype))
        self.add("relu", nn.ReLU())
        channels = widths[0]
        for stage, width in enumerate(widths, 1):
            blocks = nn.Sequential()
            for i in range(n):
                stride = 2 if stage > 1 and i == 0 else 1
                blocks.add(str(i), BasicBlock(channels, width, stride, rng=rng, dtype=dtype))
                channels = width
            self.add(f"layer{stage}", blocks)
        self.add("pool", nn.AdaptiveAvgPool2d(1))
        self.add("flatten", nn.Flatten())
        self.add("fc", nn.Linear(channels, num_classes, init="glorot", rng=rng, dtype=dtype))

    def layer_table(self, input_shape):
        """As Sequential's, with one row per residual block (layer1.0, layer1.1, ...)."""
        rows, shape = [], (1,) + tuple(input_shape[1:])
        for name, layer in self.named_children():
            parts = ([(f"{name}.{sub}", block) for sub, block in layer.named_children()]
                     if isinstance(layer, nn.Sequential) else [(name, layer)])
            for part_name, part in parts:
                out = part.output_shape(shape)
                rows.append((part_name, part, out, sum(p.size for p in part.parameters()), part.flops(shape, out)))
                shape = out
        return rows


def resnet(depth):
    def build(in_channels=3, num_classes=10, seed=0, dtype=np.float32, **_):
        return ResNet(depth, in_channels, num_classes, seed=seed, dtype=dtype)
    build.__name__ = build.__qualname__ = f"resnet{depth}"
    build.__doc__ = f"ResNet-{depth} for CIFAR (He et al. 2016): {(depth - 2) // 6} blocks per stage."
    return build


resnet8, resnet14, resnet20, resnet32, resnet44, resnet56, resnet110 = (resnet(d) for d in (8, 14, 20, 32, 44, 56, 110))
RESNET_DEPTHS = (8, 14, 20, 32, 44, 56, 110)


class InceptionNet(nn.Sequential):
    """A small GoogLeNet (Szegedy et al. 2015) for 28-32 pixel images: conv 3x3 (32) -> ReLU -> max
    pool 2, two Inception blocks, max pool 2, a third block, global average pool, Linear.

    A block is an nn.Concat of three branches on one input, each conv followed by a ReLU: 1x1 |
    1x1 -> 3x3 | 1x1 -> 3x3 -> 3x3 (the 5x5 branch as two 3x3, as Inception v2 writes it); the
    1x1 convs before the 3x3 reduce the channels they read, the block's parameter saving. Left out
    of GoogLeNet: the fourth branch (a 3x3 max pool of stride 1, then 1x1) and batch norm, so that
    the whole model lowers into the CPU executor in training too (gpuconv.compile). Block widths
    (1x1, 3x3 reduce, 3x3, double-3x3 reduce, double-3x3): (16, 16, 24, 8, 8) -> 48 channels,
    (24, 24, 32, 8, 16) -> 72, (32, 32, 48, 16, 16) -> 96."""

    BLOCKS = ((16, 16, 24, 8, 8), (24, 24, 32, 8, 16), (32, 32, 48, 16, 16))
    feature_layers = {"conv1": "relu1", "inception1": "inception1"}  # show: the stem's maps, the first block's

    def __init__(self, in_channels=3, num_classes=10, image_size=32, seed=0, dtype=np.float32):
        _check_positive_int(in_channels, "in_channels", "InceptionNet")
        if _check_positive_int(image_size, "image_size", "InceptionNet") < 4:
            raise ArgumentError(f"InceptionNet: two pools of 2 leave nothing of a {image_size}-pixel image")
        rng = np.random.default_rng(seed)
        super().__init__()
        self.add("conv1", nn.Conv2d(in_channels, 32, 3, padding=1, rng=rng, dtype=dtype))
        self.add("relu1", nn.ReLU())
        self.add("pool1", nn.MaxPool2d(2))
        channels = 32
        for index, widths in enumerate(self.BLOCKS, 1):
            self.add(f"inception{index}", self._block(channels, widths, rng, dtype))
            channels = widths[0] + widths[2] + widths[4]
            if index == 2:
                self.add("pool2", nn.MaxPool2d(2))
        self.add("gap", nn.AdaptiveAvgPool2d(1))
        self.add("flatten", nn.Flatten())
        self.add("fc", nn.Linear(channels, num_classes, init="glorot", rng=rng, dtype=dtype))

    @staticmethod
    def _block(c, widths, rng, dtype):
        one, reduce3, three, reduce5, five = widths

        def conv(c_in, c_out, k):
            return [nn.Conv2d(c_in, c_out, k, padding=k // 2, rng=rng, dtype=dtype), nn.ReLU()]

        return nn.Concat(nn.Sequential(*conv(c, one, 1)),
                         nn.Sequential(*conv(c, reduce3, 1), *conv(reduce3, three, 3)),
                         nn.Sequential(*conv(c, reduce5, 1), *conv(reduce5, five, 3), *conv(five, five, 3)))


MODELS = ("lenet5", "simplecnn") + tuple(f"resnet{d}" for d in RESNET_DEPTHS) + ("inception",)


def simplecnn_widths_of(state):
    """A SimpleCNN state dict's block widths, read from its conv weights: checkpoints written before
    the config recorded them (SimpleCNN's default went from two blocks to three) still load."""
    widths = []
    while f"conv{len(widths) + 1}.weight" in state and len(widths) < 4:
        widths.append(int(state[f"conv{len(widths) + 1}.weight"].shape[0]))
    return tuple(widths) or None


def build_model(name, in_channels=1, num_classes=10, image_size=28, seed=0, activation="relu", pool="max",
                dtype=np.float32, widths=None):
    """The zoo by command-line name: lenet5, simplecnn, resnet8, resnet14, resnet20, ..., resnet110,
    inception.
    widths: SimpleCNN's block widths (None: its default), for a checkpoint of another shape."""
    if name == "lenet5":
        return LeNet5(activation=activation, pool=pool, num_classes=num_classes, seed=seed, dtype=dtype,
                      in_channels=in_channels, image_size=image_size)
    if name == "simplecnn":
        return SimpleCNN(in_channels, num_classes, image_size, seed=seed, dtype=dtype,
                         **({} if widths is None else dict(widths=widths)))
    if name.startswith("resnet") and name[6:].isdigit() and int(name[6:]) in RESNET_DEPTHS:
        return ResNet(int(name[6:]), in_channels, num_classes, seed=seed, dtype=dtype)
    if name == "inception":
        return InceptionNet(in_channels, num_classes, image_size, seed=seed, dtype=dtype)
    raise ArgumentError(f"model: expected one of {', '.join(MODELS)}, got {name!r}")


MODEL_TITLES = ({"lenet5": "LeNet-5", "simplecnn": "SimpleCNN"} | {f"resnet{d}": f"ResNet-{d}" for d in RESNET_DEPTHS}
                | {"inception": "InceptionNet"})
