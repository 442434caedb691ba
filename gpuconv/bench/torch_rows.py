"""The same rows in PyTorch, on the same device, for a side-by-side ratio in the same run.

The model is LeNet-5 exactly as gpuconv.models.LeNet5 builds it (conv 1->6 5x5 pad 2, ReLU, max
pool 2, conv 6->16 5x5, ReLU, max pool 2, 400-120-84-10), float32, SGD with momentum 0.9. The op rows
call the same ATen functions autograd calls (convolution_backward, max_pool2d_with_indices_backward,
threshold_backward), so each row times PyTorch's own kernel for that op. One difference is by
design: PyTorch's max-pool backward reads the argmax indices its forward saved, gpuconv's
recomputes them. The step zeroes the gradients first (set_to_none, as gpuconv's zero_grad), and
the gpuconv step runs the compiled model (gpuconv.compile), as its trainer does.
"""
import numpy as np

from .rows import ACTS, CONVS, LINEARS, POOLS, random_batch


def build_lenet(torch):
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))


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
        self.model = build_lenet(torch).to(self.device)
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
