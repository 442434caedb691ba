"""The rows of the benchmark: every LeNet-5 op at its real shapes, the training step and inference.

`specs(batch)` describes each row once (name, what it computes, FLOPs) for both frameworks;
`GpuconvRows` builds the gpuconv callables on one device, and torch_rows.py builds PyTorch's.
The op rows time the array-level pairs of gpuconv.ops (conv2d / conv2d_backward, ...), the code
each autograd Function calls; the training step and inference rows time the model as
`python -m gpuconv train` runs it: through gpuconv.compile (the CPU executor on float32 NumPy
batches, eager autograd on the GPU), loss.backward() and an SGD step; with compiled=False
(`bench --eager`) the uncompiled model runs eagerly, op by op, everywhere: the reference path.
FLOPs count a multiply-add as 2. Pooling, ReLU and the loss are memory-bound: their FLOPs (one per
window tap or element) are given so every row has a rate, but their share of the GEMM peak is
small by nature.
"""
import inspect

import numpy as np

from .. import functional, ops, optim
from ..autograd import no_grad
from ..backend import get_array_module, to_device, uses_cuda_kernels
from ..compiler import compile as compile_model
from ..models import LeNet5

# LeNet-5 at 28x28: (layer, input shape without the batch, output shape without the batch).
CONVS = {"conv1": dict(cin=1, cout=6, k=5, pad=2, hw_in=28, hw_out=28),
         "conv2": dict(cin=6, cout=16, k=5, pad=0, hw_in=14, hw_out=10)}
POOLS = {"pool1": dict(c=6, hw_in=28, hw_out=14, k=2), "pool2": dict(c=16, hw_in=10, hw_out=5, k=2)}
ACTS = {"act1": (6, 28), "act2": (16, 10)}
LINEARS = {"fc1": (400, 120), "fc2": (120, 84), "fc3": (84, 10)}
NUM_CLASSES = 10
NUM_PARAMETERS = 61706


def backward_data_is_separate():
    """True when conv2d_backward can skip the filter gradient (need_dw=False), so the
    backward-data row times dx alone; otherwise it times dx, dw and db together."""
    return "need_dw" in inspect.signature(ops.conv2d_backward).parameters


def _conv_flops(n, cin, cout, k, hw_out, **_):
    return 2 * n * cout * hw_out * hw_out * cin * k * k


def specs(batch):
    """Op rows, in network order: dicts with name, layer, op, kind, text, flops, uses_algo,
    in_training. (The step and inference rows come from step_specs.)"""
    n, rows = batch, []

    def add(layer, op, text, flops, uses_algo=False, in_training=True):
        rows.append(dict(name=f"{layer}.{op}", layer=layer, op=op, kind="op", text=text,
                         flops=int(flops), uses_algo=uses_algo, in_training=in_training))

    data_only = backward_data_is_separate()
    for index, (conv, pool, act) in enumerate(zip(CONVS, POOLS, ACTS)):
        c = CONVS[conv]
        shape = f"{c['cin']}x{c['hw_in']}x{c['hw_in']}->{c['cout']}x{c['hw_out']}x{c['hw_out']}"
        flops = _conv_flops(n, **c)
        add(conv, "forward", f"conv {shape} {c['k']}x{c['k']} pad {c['pad']}", flops, uses_algo=True)
        add(conv, "backward_filter", "conv grad w.r.t. weight and bias (dw, db)", flops, uses_algo=True)
        first = index == 0
        if data_only:
            text = "conv grad w.r.t. input (dx)"
        else:
            text = "conv grad w.r.t. input, with dw and db (dx+dw+db)"
        if first:
            text += "; never needed in training (1-channel input)"
        add(conv, "backward_data", text, flops if data_only else 2 * flops, uses_algo=True,
            in_training=not first)
        channels, hw = ACTS[act]
        elements = n * channels * hw * hw
        add(act, "forward", f"relu {channels}x{hw}x{hw}", elements)
        add(act, "backward", "relu grad", elements)
        p = POOLS[pool]
        taps = n * p["c"] * p["hw_out"] ** 2 * p["k"] ** 2
        add(pool, "forward", f"max pool {p['k']}x{p['k']} {p['c']}x{p['hw_in']}x{p['hw_in']}", taps)
        add(pool, "backward", "max pool grad (recomputes the argmax)", taps)
    for fc, (fan_in, fan_out) in LINEARS.items():
        add(fc, "forward", f"linear {fan_in}->{fan_out}", 2 * n * fan_in * fan_out)
        add(fc, "backward", "linear grad (dx, dw, db)", 4 * n * fan_in * fan_out)
    add("loss", "forward_backward", f"softmax cross-entropy over {NUM_CLASSES} classes, loss and grad",
        5 * n * NUM_CLASSES)
    return rows


def forward_flops(batch):
    n = batch
    total = sum(_conv_flops(n, **c) for c in CONVS.values())
    total += sum(n * ch * hw * hw for ch, hw in ACTS.values())
    total += sum(n * p["c"] * p["hw_out"] ** 2 * p["k"] ** 2 for p in POOLS.values())
    total += sum(2 * n * i * o + n * o for i, o in LINEARS.values())  # linear + the fc relus
    return total


def step_flops(batch):
    """Forward, backward (conv1 skips dx) and the SGD-momentum update (3 FLOPs per parameter)."""
    n = batch
    conv1, conv2 = (_conv_flops(n, **c) for c in CONVS.values())
    backward = conv1 + 2 * conv2
    backward += sum(n * ch * hw * hw for ch, hw in ACTS.values())
    backward += sum(n * p["c"] * p["hw_out"] ** 2 * p["k"] ** 2 for p in POOLS.values())
    backward += sum(4 * n * i * o + n * o for i, o in LINEARS.values())
    return forward_flops(batch) + backward + 5 * n * NUM_CLASSES + 3 * NUM_PARAMETERS


def step_spec(batch):
    return dict(name="train_step", layer="model", op="train_step", kind="step",
                text="forward + loss + zero_grad + backward + SGD momentum 0.9 update", flops=step_flops(batch),
                uses_algo=True, in_training=True)


def inference_spec(batch):
    return dict(name="inference", layer="model", op="inference", kind="inference",
                text="forward to the logits (no_grad)", flops=forward_flops(batch), uses_algo=True,
                in_training=False)


def random_batch(batch, seed):
    rng = np.random.default_rng(seed)
    images = rng.random((batch, 1, 28, 28), dtype=np.float32)
    labels = rng.integers(0, NUM_CLASSES, batch).astype(np.int64)
    return images, labels


class GpuconvRows:
    """Callables for every row on one device at one batch size, over real LeNet-5 activations."""

    def __init__(self, device, batch, seed=0, compiled=True):
        self.device, self.batch = device, batch
        self.model = LeNet5(seed=seed).to(device)
        # compiled: as the trainer runs it (gpuconv.train.Trainer.net); else eager, op by op
        self.net = compile_model(self.model) if compiled else self.model
        self.optimizer = optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        images, labels = random_batch(batch, seed)
        self.x, self.labels = to_device(images, device), to_device(labels, device)
        rng = np.random.default_rng(seed + 1)
        self.inputs, self.outputs, self.grads = {}, {}, {}
        h = self.x
        with no_grad():  # the op rows' inputs: each layer's real input, as an array
            for name, layer in self.model.named_children():
                self.inputs[name] = h
                h = layer(h).data
                self.outputs[name] = h
                dy = (rng.standard_normal(h.shape) * 0.01).astype(np.float32)
                self.grads[name] = to_device(dy, device)
        self.logits = h

    def op(self, name, algo):
        """The gpuconv.ops array call(s) one op row times: what the op's autograd Function runs."""
        layer_name, op = name.split(".")
        layer = getattr(self.model, layer_name, None)
        x, dy = self.inputs.get(layer_name), self.grads.get(layer_name)
        if layer_name in CONVS:
            w, b = layer.weight.data, layer.bias.data
            pad = CONVS[layer_name]["pad"]
            if op == "forward":
                return lambda: ops.conv2d(x, w, b, padding=pad, algo=algo)
            if op == "backward_filter":
                return lambda: ops.conv2d_backward(dy, x, w, padding=pad, algo=algo, need_dx=False)
            extra = dict(need_dw=False, need_bias=False) if backward_data_is_separate() else {}
            return lambda: ops.conv2d_backward(dy, x, w, padding=pad, algo=algo, need_dx=True, **extra)
        if layer_name in ACTS:
            y = self.outputs[layer_name]
            return (lambda: ops.relu(x)) if op == "forward" else (lambda: ops.relu_backward(dy, y))
        if layer_name in POOLS:
            k = POOLS[layer_name]["k"]
            if op == "forward":
                return lambda: ops.max_pool2d(x, k)
            # the GPU path reads the argmax its forward saved (train does that): made once, untimed
            indices = ops.max_pool2d(x, k, return_indices=True)[1] if uses_cuda_kernels(x) else None
            return lambda: ops.max_pool2d_backward(dy, x, k, indices=indices)
        if layer_name in LINEARS:
            w, b = layer.weight.data, layer.bias.data
            if op == "forward":
                return lambda: ops.linear(x, w, b)
            return lambda: ops.linear_backward(dy, x, w, need_dx=True)
        if layer_name == "loss":
            logits, labels = self.logits, self.labels
            one = get_array_module(logits).ones((), logits.dtype)  # d(loss)/d(loss), as backward() seeds it

            def loss_and_grad():
                loss, probs = ops.cross_entropy(logits, labels)
                dlogits = ops.cross_entropy_backward(one, probs, labels)
                return float(loss), dlogits  # float(): the trainer reads the loss with loss.item()
            return loss_and_grad
        raise KeyError(name)

    def set_algo(self, algo):
        for name in CONVS:
            getattr(self.model, name).algo = algo

    def step(self, algo):
        """One training step as gpuconv.train.Trainer.train_step runs it."""
        net, optimizer, x, labels = self.net, self.optimizer, self.x, self.labels

        def train_step():
            self.set_algo(algo)  # the model is shared by every algo's rows
            loss = functional.cross_entropy(net(x), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return loss.data  # not read back: the trainer reads its loss sums once per LOG_EVERY steps
        return train_step

    def inference(self, algo):
        net, x = self.net, self.x

        def infer():
            self.set_algo(algo)
            with no_grad():
                return net(x)
        return infer
