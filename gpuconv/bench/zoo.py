"""Rows beyond LeNet-5: the zoo's models (a training step and inference of any model that
gpuconv.models.build_model builds, on a dataset's input shape) and the array-level conv ops at the
shapes CNNs meet (LeNet-5's two convs and ResNet-20's 3x3 convs), for gpuconv; torch_rows.py
builds PyTorch's side of the same rows.

Naming: LeNet-5 on MNIST keeps the rows "train_step" and "inference" of rows.py (so earlier
JSON files and the tables made from them still match); every other model's rows are
"<model>.train_step" and "<model>.inference". Conv op rows are "<shape>.<op>" with the shape
written c<in>-<out>k<kernel>s<stride>@<input side>, e.g. "c16-32k3s2@32.backward_filter".

FLOPs of a model row: the forward is the model summary's count (gpuconv.nn's per-layer flops, a
multiply-add counting 2) times the batch; a training step is counted as 3 forwards (the backward
of a conv or linear layer is two products of the forward's size), an estimate for the GFLOP/s
column only, which no ratio against PyTorch uses.
"""
import functools

import numpy as np

from .. import functional, ops, optim
from ..autograd import no_grad
from ..backend import to_device
from ..compiler import compile as compile_model
from ..data.registry import DATASETS, dataset_info
from ..errors import ArgumentError
from ..models import MODEL_TITLES, MODELS, build_model

# The dataset whose input shape a model is benchmarked on unless --dataset says otherwise: the
# one each model is trained on in the README.
DEFAULT_DATASET = {"lenet5": "mnist", "simplecnn": "fashion-mnist"}
LEGACY = ("lenet5", "mnist")  # the rows rows.py has always had, under their old names


def default_dataset(model):
    return DEFAULT_DATASET.get(model, "cifar10")


def check_models(models, dataset=None):
    """-> [(model, dataset)] for the run: each name from MODELS (or none at all: 'none' / an
    empty list leaves only op rows), each on `dataset` or its own default."""
    names = [models] if isinstance(models, str) else list(models or [])
    names = [n.strip() for name in names for n in str(name).split(",") if n.strip()]
    if names == ["none"]:
        names = []
    bad = [n for n in names if n not in MODELS]
    if bad:
        raise ArgumentError(f"models: expected names from {', '.join(MODELS)} (or 'none'), got {bad!r}")
    if len(set(names)) != len(names):
        raise ArgumentError(f"models: each model at most once, got {names!r}")
    if dataset is not None and dataset not in DATASETS:
        raise ArgumentError(f"dataset: expected one of {', '.join(DATASETS)} (or None for each model's "
                            f"own), got {dataset!r}")
    return [(name, dataset or default_dataset(name)) for name in names]


def is_legacy(model, dataset):
    return (model, dataset) == LEGACY


def row_prefix(model, dataset):
    return "" if is_legacy(model, dataset) else f"{model}."


def input_shape(dataset):
    info = dataset_info(dataset)
    return info.in_channels, info.image_size, len(info.cls.classes)


def build(model, dataset, seed=0):
    """The gpuconv model as `python -m gpuconv train --model M --dataset D` builds it."""
    channels, size, classes = input_shape(dataset)
    return build_model(model, channels, classes, size, seed=seed)


@functools.lru_cache(maxsize=None)
def _flops_per_image(model, dataset):
    channels, size, _ = input_shape(dataset)
    return int(build(model, dataset).summary((1, channels, size, size), print_fn=None)["total_flops"])


def forward_flops(model, dataset, batch):
    return _flops_per_image(model, dataset) * batch


def model_specs(model, dataset, batch, training=True, inference=True):
    """The step and/or inference row specs of one model (same keys as rows.step_spec)."""
    prefix, title = row_prefix(model, dataset), MODEL_TITLES.get(model, model)
    channels, size, _ = input_shape(dataset)
    where = f"{title} on {channels}x{size}x{size} ({dataset})"
    forward = forward_flops(model, dataset, batch)
    out = []
    if training:
        out.append(dict(name=f"{prefix}train_step", layer=model, op="train_step", kind="step", model=model,
                        dataset=dataset, source=("zoo", model, dataset), uses_algo=True, in_training=True,
                        text=f"{where}: forward + loss + zero_grad + backward + SGD momentum 0.9 update "
                             "(FLOPs estimated as 3 forwards)", flops=3 * forward))
    if inference:
        out.append(dict(name=f"{prefix}inference", layer=model, op="inference", kind="inference", model=model,
                        dataset=dataset, source=("zoo", model, dataset), uses_algo=True, in_training=False,
                        text=f"{where}: forward to the logits (no_grad, eval mode)", flops=forward))
    return out


def random_batch(dataset, batch, seed):
    channels, size, classes = input_shape(dataset)
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch, channels, size, size), dtype=np.float32)  # normalised data's scale
    labels = rng.integers(0, classes, batch).astype(np.int64)
    return images, labels


class ZooRows:
    """The step and inference callables of one zoo model on one device at one batch size, run as
    the trainer runs them: gpuconv.compile(model) (which uses the CPU executor where it can lower
    the model, and runs it eagerly op by op where it cannot), or eagerly with compiled=False."""

    def __init__(self, device, model, dataset, batch, seed=0, compiled=True):
        self.device, self.batch, self.name, self.dataset = device, batch, model, dataset
        self.model = build(model, dataset, seed).to(device)
        self.net = compile_model(self.model) if compiled else self.model
        self.optimizer = optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        images, labels = random_batch(dataset, batch, seed)
        self.x, self.labels = to_device(images, device), to_device(labels, device)

    def uses_executor(self, training=True):
        """Does the row run the model in the CPU executor, in the mode the row runs it (training for
        a step, eval for inference: a ResNet lowers in eval only)?"""
        if not hasattr(self.net, "uses_executor"):
            return False
        self.net.train(training)
        return bool(self.net.uses_executor(self.x))

    def step(self, algo):
        net, optimizer, x, labels = self.net, self.optimizer, self.x, self.labels

        def train_step():
            net.train()
            loss = functional.cross_entropy(net(x), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return loss.item()  # as PyTorch's side: the step ends with its loss on the host
        return train_step

    def inference(self, algo):
        net, x = self.net, self.x

        def infer():
            net.eval()
            with no_grad():
                return net(x)
        return infer


# ----------------------------------------------------------------------------------------------
# conv ops at the shapes users meet

# (cin, cout, kernel, stride, padding, input side, bias, where it comes from)
CONV_SHAPES = (
    (1, 6, 5, 1, 2, 28, True, "LeNet-5 conv1"),
    (6, 16, 5, 1, 0, 14, True, "LeNet-5 conv2"),
    (3, 16, 3, 1, 1, 32, False, "ResNet-20 stem"),
    (16, 16, 3, 1, 1, 32, False, "ResNet-20 stage 1"),
    (16, 32, 3, 2, 1, 32, False, "ResNet-20 stage 2, first conv"),
    (32, 32, 3, 1, 1, 16, False, "ResNet-20 stage 2"),
    (32, 64, 3, 2, 1, 16, False, "ResNet-20 stage 3, first conv"),
    (64, 64, 3, 1, 1, 8, False, "ResNet-20 stage 3"),
)
CONV_OPS = ("forward", "backward_data", "backward_filter")


def conv_label(cin, cout, k, stride, hw):
    return f"c{cin}-{cout}k{k}s{stride}@{hw}"


def conv_shapes():
    """label -> dict(cin, cout, k, stride, pad, hw_in, hw_out, bias, where)."""
    out = {}
    for cin, cout, k, stride, pad, hw, bias, where in CONV_SHAPES:
        hw_out = (hw + 2 * pad - k) // stride + 1
        out[conv_label(cin, cout, k, stride, hw)] = dict(cin=cin, cout=cout, k=k, stride=stride, pad=pad, hw_in=hw,
                                                        hw_out=hw_out, bias=bias, where=where)
    return out


def conv_specs(batch):
    """The conv op rows: every shape of CONV_SHAPES, forward, backward_data (dx alone) and
    backward_filter (dw, with db where the layer has a bias). A first layer's backward_data
    (1 or 3 input channels: the image) never runs in training: in_training False."""
    rows = []
    for label, c in conv_shapes().items():
        flops = 2 * batch * c["cout"] * c["hw_out"] ** 2 * c["cin"] * c["k"] ** 2
        shape = (f"{c['cin']}x{c['hw_in']}x{c['hw_in']}->{c['cout']}x{c['hw_out']}x{c['hw_out']} "
                 f"{c['k']}x{c['k']} stride {c['stride']} pad {c['pad']}")
        for op in CONV_OPS:
            what = {"forward": "conv", "backward_data": "conv grad w.r.t. input (dx)",
                    "backward_filter": "conv grad w.r.t. weight" + (" and bias (dw, db)" if c["bias"] else " (dw)")}[op]
            rows.append(dict(name=f"{label}.{op}", layer=label, op=op, kind="conv_op", source=("conv",),
                             text=f"{what} {shape} ({c['where']})", flops=int(flops), uses_algo=True,
                             in_training=not (op == "backward_data" and c["cin"] <= 3)))
    return rows


def conv_arrays(label, batch, seed=0):
    """NumPy float32 x, w, b (or None), dy for one conv shape: He-scaled weights, unit inputs."""
    c = conv_shapes()[label]
    rng = np.random.default_rng([seed, c["cin"], c["cout"], c["k"], c["stride"], c["hw_in"]])
    x = rng.standard_normal((batch, c["cin"], c["hw_in"], c["hw_in"]), dtype=np.float32)
    w = (rng.standard_normal((c["cout"], c["cin"], c["k"], c["k"]), dtype=np.float32)
         * np.float32(np.sqrt(2.0 / (c["cin"] * c["k"] ** 2))))
    b = rng.standard_normal(c["cout"], dtype=np.float32) * np.float32(0.1) if c["bias"] else None
    dy = rng.standard_normal((batch, c["cout"], c["hw_out"], c["hw_out"]), dtype=np.float32) * np.float32(0.01)
    return x, w, b, dy


class ConvRows:
    """gpuconv.ops.conv2d / conv2d_backward at every conv shape, on one device and batch size.
    Arrays are made on first use of a shape (a device and batch hold only the shapes timed)."""

    def __init__(self, device, batch, seed=0):
        self.device, self.batch, self.seed = device, batch, seed
        self.arrays = {}

    def _arrays(self, label):
        if label not in self.arrays:
            self.arrays[label] = [None if a is None else to_device(a, self.device)
                                  for a in conv_arrays(label, self.batch, self.seed)]
        return self.arrays[label]

    def op(self, name, algo):
        label, op = name.split(".")
        c = conv_shapes()[label]
        x, w, b, dy = self._arrays(label)
        s, p = c["stride"], c["pad"]
        if op == "forward":
            return lambda: ops.conv2d(x, w, b, stride=s, padding=p, algo=algo)
        if op == "backward_filter":
            return lambda: ops.conv2d_backward(dy, x, w, stride=s, padding=p, algo=algo, need_dx=False,
                                               need_bias=b is not None)
        if op == "backward_data":
            return lambda: ops.conv2d_backward(dy, x, w, stride=s, padding=p, algo=algo, need_dx=True,
                                               need_dw=False, need_bias=False)
        raise KeyError(name)


def geometric_mean(values):
    """Geometric mean of positive numbers; None for none (or any that is not positive and finite)."""
    values = [float(v) for v in values]
    if not values or any(not np.isfinite(v) or v <= 0 for v in values):
        return None
    return float(np.exp(np.mean(np.log(values))))


def conv_geomeans(rows):
    """[dict(device, batch_size, op, geomean, rows)]: the geometric mean of torch/ours over the
    conv op rows that training runs, per device and batch size, for each op and for 'all'."""
    groups = {}
    for row in rows:
        if row["kind"] != "conv_op" or not row["in_training"] or not row.get("speed_ratio_vs_torch"):
            continue
        for op in (row["op"], "all"):
            groups.setdefault((row["device"], row["batch_size"], op), []).append(row["speed_ratio_vs_torch"])
    return [dict(device=device, batch_size=batch, op=op, geomean=geometric_mean(ratios), rows=len(ratios))
            for (device, batch, op), ratios in groups.items()]


def table_notes(results):
    """The table's footer lines for these rows (report.format_table prints them): which models ran
    eagerly, the conv ops' geometric means, and each training step's peak memory."""
    out = []
    eager = sorted({r["name"] for r in results["rows"] if r.get("model") and r.get("executor") is False
                    and r["device"] == "cpu" and results["settings"].get("compiled", True)})
    if eager:
        out.append(f"{', '.join(eager)}: gpuconv.compile cannot lower the model as it runs there into the CPU "
                   "executor (gpuconv.compile(model).unsupported says why), so these rows run eagerly op by op, "
                   "as training does.")
    for g in results.get("conv_geomeans") or []:
        if g["op"] == "all":
            parts = [f"{op} {x['geomean']:.2f}" for op in ("forward", "backward_data", "backward_filter")
                     for x in results["conv_geomeans"] if (x["device"], x["batch_size"], x["op"]) ==
                     (g["device"], g["batch_size"], op) and x["geomean"]]
            out.append(f"conv ops, {g['device']} batch {g['batch_size']}: geometric mean of torch/ours "
                       f"{g['geomean']:.2f} over {g['rows']} rows that training runs ({', '.join(parts)}).")
    memory_rows = [r for r in results["rows"] if r.get("memory")]
    if memory_rows:
        out.append("peak memory of a training step, each framework in a fresh process after its imports "
                   f"({results['settings'].get('memory_steps')} steps): peak resident set, with the CPU "
                   "executor's worker processes counted (each one's peak less the arena it shares with the "
                   "caller, which the caller's figure holds); +MiB = the peak less the process after its imports:")
        for r in memory_rows:
            cells = []
            for framework, label in (("gpuconv", "gpuconv"), ("torch", "PyTorch")):
                m = r["memory"].get(framework)
                if not m:
                    continue
                if "error" in m:
                    cells.append(f"{label} failed")
                    continue
                workers = f", {len(m['workers'])} worker process(es) counted" if m.get("workers") else ""
                cells.append(f"{label} +{m['step_bytes'] / 2 ** 20:.0f} MiB (peak {m['peak_rss_bytes'] / 2 ** 20:.0f} "
                             f"MiB{workers})")
            out.append(f"  batch {r['batch_size']} {r['name']}: " + "; ".join(cells))
    return out
