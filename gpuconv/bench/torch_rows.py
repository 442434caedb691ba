"""The same rows in PyTorch, on the same device, for a side-by-side ratio in the same run.

The model is LeNet-5 exactly as gpuconv.models.LeNet5 builds it (conv 1->6 5x5 pad 2, ReLU, max
pool 2, conv 6->16 5x5, ReLU, max pool 2, 400-120-84-10), float32, SGD with momentum 0.9. The op rows
call the same ATen functions autograd calls (convolution_backward, max_pool2d_with_indices_backward,
threshold_backward), so each row times PyTorch's own kernel for that op. One difference is by
design: PyTorch's max-pool backward reads the argmax indices its forward saved, gpuconv's
recomputes them. The step zeroes the gradients first (set_to_none, as gpuconv's zero_grad), and
the gpuconv step runs the compiled model (gpuconv.compile), as its trainer does.
"""
from collections import OrderedDict

import numpy as np

from ..models import InceptionNet, LeNet5, ResNet, SimpleCNN
from . import zoo
from .rows import ACTS, CONVS, LINEARS, POOLS, random_batch


def build_lenet(torch, in_channels=1, image_size=28, num_classes=10, activation="relu", pool="max"):
    """LeNet-5 as gpuconv.models.LeNet5 builds it, with the same child names (so the state_dict
    keys are the same too)."""
    nn = torch.nn
    act = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}[activation]
    pool_layer = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}[pool]
    side = (image_size // 2 - 4) // 2
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(in_channels, 6, 5, padding=2)), ("act1", act()), ("pool1", pool_layer(2)),
        ("conv2", nn.Conv2d(6, 16, 5)), ("act2", act()), ("pool2", pool_layer(2)), ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(16 * side * side, 120)), ("act3", act()), ("fc2", nn.Linear(120, 84)), ("act4", act()),
        ("fc3", nn.Linear(84, num_classes))]))


# gpuconv's child names -> index in the torch Sequential above
LAYER_INDEX = {"conv1": 0, "act1": 1, "pool1": 2, "conv2": 3, "act2": 4, "pool2": 5, "flatten": 6,
               "fc1": 7, "act3": 8, "fc2": 9, "act4": 10, "fc3": 11}


def torch_device(device):
    return "cpu" if str(device) == "cpu" else str(device)


class TorchRows:
    def __init__(self, torch, device, batch, seed=0):
        self.torch, self.batch = torch, batch
        self.device = torch_device(device)
        torch.manual_seed(seed)
        self.model = torch_model_like(torch, LeNet5(seed=seed)).to(self.device)  # gpuconv's weights
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        images, labels = random_batch(batch, seed)
        self.x = torch.from_numpy(images).to(self.device)
        self.labels = torch.from_numpy(labels).to(self.device)
        rng = np.random.default_rng(seed + 1)
        self.inputs, self.outputs, self.grads = {}, {}, {}
        with torch.no_grad():
            h = self.x
            for name, index in LAYER_INDEX.items():
                self.inputs[name] = h
                h = self.model[index](h)
                self.outputs[name] = h
                dy = (rng.standard_normal(tuple(h.shape)) * 0.01).astype(np.float32)
                self.grads[name] = torch.from_numpy(dy).to(self.device)
        self.logits = h.detach()
        self.pool_indices = {}

    def op(self, name, algo=None):
        torch = self.torch
        aten = torch.ops.aten
        layer_name, op = name.split(".")
        x, dy = self.inputs.get(layer_name), self.grads.get(layer_name)
        layer = self.model[LAYER_INDEX[layer_name]] if layer_name in LAYER_INDEX else None
        no_grad = torch.no_grad

        def quiet(fn):
            def run():
                with no_grad():
                    return fn()
            return run

        if layer_name in CONVS:
            w, b = layer.weight.detach(), layer.bias.detach()
            pad = CONVS[layer_name]["pad"]
            if op == "forward":
                return quiet(lambda: torch.nn.functional.conv2d(x, w, b, padding=pad))
            from .rows import backward_data_is_separate
            mask = {"backward_filter": [False, True, True],
                    "backward_data": [True, False, False] if backward_data_is_separate() else [True, True, True]}[op]
            return quiet(lambda: aten.convolution_backward(dy, x, w, [w.shape[0]], [1, 1], [pad, pad], [1, 1],
                                                           False, [0, 0], 1, mask))
        if layer_name in ACTS:
            y = self.outputs[layer_name]
            if op == "forward":
                return quiet(lambda: torch.relu(x))
            return quiet(lambda: aten.threshold_backward(dy, y, 0))
        if layer_name in POOLS:
            k = POOLS[layer_name]["k"]
            if op == "forward":
                return quiet(lambda: torch.nn.functional.max_pool2d(x, k))
            with no_grad():
                _, indices = aten.max_pool2d_with_indices(x, [k, k], [k, k])
            return quiet(lambda: aten.max_pool2d_with_indices_backward(dy, x, [k, k], [k, k], [0, 0], [1, 1],
                                                                        False, indices))
        if layer_name in LINEARS:
            w, b = layer.weight.detach(), layer.bias.detach()
            if op == "forward":
                return quiet(lambda: torch.nn.functional.linear(x, w, b))
            return quiet(lambda: (dy @ w, dy.t() @ x, dy.sum(0)))
        if layer_name == "loss":
            logits, labels = self.logits, self.labels

            def loss_and_grad():
                leaf = logits.detach().requires_grad_()
                loss = torch.nn.functional.cross_entropy(leaf, labels)
                (grad,) = torch.autograd.grad(loss, leaf)
                return loss.item(), grad  # .item(): gpuconv's loss row also reads the loss as a Python float
            return loss_and_grad
        raise KeyError(name)

    def step(self, algo=None):
        torch, model, optimizer, x, labels = self.torch, self.model, self.optimizer, self.x, self.labels

        def train_step():
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x), labels)
            loss.backward()
            optimizer.step()
            return loss.item()  # as gpuconv's step (and its trainer), which reads loss.item()
        return train_step

    def inference(self, algo=None):
        torch, model, x = self.torch, self.model, self.x

        def infer():
            with torch.inference_mode():
                return model(x)
        return infer


# ----------------------------------------------------------------------------------------------
# the zoo's models in PyTorch

_CLASSES = {}


def _resnet_classes(torch):
    """PyTorch versions of gpuconv.models' ShortcutA and BasicBlock (defined once torch is
    imported: the bench never imports torch unless asked)."""
    if "resnet" in _CLASSES:
        return _CLASSES["resnet"]
    nn, F = torch.nn, torch.nn.functional

    class ShortcutA(nn.Module):
        """Option A: every stride-th pixel, the extra channels zero, half before and half after."""

        def __init__(self, in_channels, out_channels, stride):
            super().__init__()
            self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

        def forward(self, x):
            extra = self.out_channels - self.in_channels
            before = extra // 2
            return F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, before, extra - before))

    class BasicBlock(nn.Module):
        def __init__(self, in_channels, out_channels, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(out_channels)
            self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(out_channels)
            self.relu = nn.ReLU()
            self.shortcut = (ShortcutA(in_channels, out_channels, stride)
                             if stride != 1 or in_channels != out_channels else None)

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + (x if self.shortcut is None else self.shortcut(x)))

    _CLASSES["resnet"] = ShortcutA, BasicBlock
    return ShortcutA, BasicBlock


def _concat_class(torch):
    """nn.Concat's twin: torch.cat of the branches' outputs, as an Inception block's forward writes it."""
    if "concat" not in _CLASSES:
        class Concat(torch.nn.ModuleList):
            def __init__(self, branches, dim):
                super().__init__(branches)
                self.dim = dim

            def forward(self, x):
                return torch.cat([branch(x) for branch in self], dim=self.dim)

        _CLASSES["concat"] = Concat
    return _CLASSES["concat"]


def _torch_layer(nn, layer):
    """The PyTorch layer of the same kind and hyper-parameters as a gpuconv layer of the zoo's
    chains, or None for a kind only one model has."""
    kind = type(layer).__name__
    if kind == "Conv2d":
        o, c, k, _ = layer.weight.data.shape
        return nn.Conv2d(c, o, k, stride=layer.stride, padding=layer.padding, bias=layer.bias is not None)
    if kind == "BatchNorm2d":
        return nn.BatchNorm2d(layer.num_features, eps=layer.eps, momentum=layer.momentum)
    if kind == "MaxPool2d":
        return nn.MaxPool2d(layer.kernel_size, layer.stride)
    if kind == "AdaptiveAvgPool2d":
        return nn.AdaptiveAvgPool2d(1)
    if kind == "Linear":
        o, i = layer.weight.data.shape
        return nn.Linear(i, o)
    return {"ReLU": nn.ReLU, "Flatten": nn.Flatten}.get(kind, lambda: None)()


def _torch_sequential(torch, model):
    """The PyTorch twin of a ResNet, SimpleCNN or InceptionNet: child by child through _torch_layer,
    each ResNet stage (a Sequential of BasicBlocks) as the same stage of PyTorch BasicBlocks, each
    nn.Concat as a torch.cat of its branches' twins."""
    nn = torch.nn
    children = []
    for name, layer in model.named_children():
        if type(layer).__name__ == "Concat":
            twin = _concat_class(torch)([_torch_sequential(torch, branch) for branch in layer], layer.dim)
        elif type(layer).__name__ == "Sequential" and isinstance(model, ResNet):  # a stage of BasicBlocks
            _, BasicBlock = _resnet_classes(torch)
            twin = nn.Sequential(OrderedDict(
                (block_name, BasicBlock(block.conv1.in_channels, block.conv1.out_channels, block.conv1.stride[0]))
                for block_name, block in layer.named_children()))
        else:
            twin = _torch_layer(nn, layer)
        if twin is None:
            raise TypeError(f"no PyTorch equivalent for {type(model).__name__} child {name} ({type(layer).__name__})")
        children.append((name, twin))
    return nn.Sequential(OrderedDict(children))


def torch_model_like(torch, model):
    """A PyTorch nn.Module of the same architecture as the gpuconv `model` (LeNet5, SimpleCNN,
    ResNet or InceptionNet), with the same child names, parameter count and shapes, and gpuconv's parameters and
    buffers copied in, on the CPU. Raises AssertionError if the two differ anywhere."""
    if isinstance(model, LeNet5):
        fc1 = model.fc1.weight.data.shape[1]
        side = int(round((fc1 // 16) ** 0.5))
        image_size = next(s for s in range(12, 4096) if (s // 2 - 4) // 2 == side)
        torch_model = build_lenet(torch, model.conv1.weight.data.shape[1], image_size,
                                  model.fc3.weight.data.shape[0], model.activation, model.pool)
    elif isinstance(model, (ResNet, SimpleCNN, InceptionNet)):
        torch_model = _torch_sequential(torch, model)
    else:
        raise TypeError(f"no PyTorch equivalent for {type(model).__name__}")
    copy_weights(torch, model, torch_model)
    return torch_model


def copy_weights(torch, model, torch_model):
    ours, theirs = model.state_dict(), torch_model.state_dict()
    assert list(ours) == list(theirs), f"state_dict keys differ: {list(ours)} vs {list(theirs)}"
    ours_count = sum(int(p.data.size) for p in model.parameters())
    theirs_count = sum(p.numel() for p in torch_model.parameters())
    assert ours_count == theirs_count, f"parameter counts differ: gpuconv {ours_count}, PyTorch {theirs_count}"
    state = OrderedDict()
    for key, value in ours.items():
        assert tuple(value.shape) == tuple(theirs[key].shape), \
            f"{key}: gpuconv shape {value.shape}, PyTorch {tuple(theirs[key].shape)}"
        state[key] = torch.from_numpy(np.ascontiguousarray(value)).to(theirs[key].dtype)
    torch_model.load_state_dict(state)
    return torch_model


class TorchZooRows:
    """PyTorch's step and inference for one zoo model, with the weights of gpuconv's (same seed)."""

    def __init__(self, torch, device, model, dataset, batch, seed=0):
        self.torch, self.batch = torch, batch
        self.device = torch_device(device)
        self.model = torch_model_like(torch, zoo.build(model, dataset, seed)).to(self.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        images, labels = zoo.random_batch(dataset, batch, seed)
        self.x = torch.from_numpy(images).to(self.device)
        self.labels = torch.from_numpy(labels).to(self.device)

    def step(self, algo=None):
        torch, model, optimizer, x, labels = self.torch, self.model, self.optimizer, self.x, self.labels

        def train_step():
            model.train()
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x), labels)
            loss.backward()
            optimizer.step()
            return loss.item()
        return train_step

    def inference(self, algo=None):
        torch, model, x = self.torch, self.model, self.x

        def infer():
            model.eval()
            with torch.inference_mode():
                return model(x)
        return infer


class TorchConvRows:
    """The conv op rows in PyTorch: F.conv2d, and the ATen convolution_backward autograd calls
    (dx alone; dw with db where the shape has a bias), on the same arrays as gpuconv's."""

    def __init__(self, torch, device, batch, seed=0):
        self.torch, self.batch, self.seed = torch, batch, seed
        self.device = torch_device(device)
        self.arrays = {}

    def _arrays(self, label):
        if label not in self.arrays:
            self.arrays[label] = [None if a is None else self.torch.from_numpy(a).to(self.device)
                                  for a in zoo.conv_arrays(label, self.batch, self.seed)]
        return self.arrays[label]

    def op(self, name, algo=None):
        torch = self.torch
        label, op = name.split(".")
        c = zoo.conv_shapes()[label]
        x, w, b, dy = self._arrays(label)
        s, p = c["stride"], c["pad"]

        def quiet(fn):
            def run():
                with torch.no_grad():
                    return fn()
            return run
        if op == "forward":
            return quiet(lambda: torch.nn.functional.conv2d(x, w, b, stride=s, padding=p))
        mask = {"backward_data": [True, False, False], "backward_filter": [False, True, b is not None]}[op]
        bias_sizes = [w.shape[0]] if b is not None else None
        return quiet(lambda: torch.ops.aten.convolution_backward(dy, x, w, bias_sizes, [s, s], [p, p], [1, 1],
                                                                 False, [0, 0], 1, mask))
