"""Training a model of the zoo (LeNet-5, SimpleCNN, ResNet-20, ...) on MNIST, Fashion-MNIST or CIFAR-10:
the loop behind `python -m gpuconv train` and examples/train_lenet.py.

Everything that decides the result is in the checkpoint (weights, optimizer state, epoch, batch,
seed, history), and the order of every epoch depends only on (seed, epoch), so --resume continues
to exactly the weights an uninterrupted run reaches.
"""
import argparse
import contextlib
import json
import math
import os
import signal
import sys
import threading
import time

import numpy as np
from tqdm import tqdm

from . import distributed
from . import functional as F
from . import optim
from .autograd import no_grad
from .backend import device_scope, get_array_module, is_device_array, parse_device, to_device
from .compiler import compile as compile_model
from .checkpoint import atomic_write, check_resume, load_checkpoint, save_checkpoint
from .cuda.graph import StaticStep
from .cuda.runtime import device_errors
from .data import DataLoader
from .data.loader import to_float_batch
from .data.registry import DATASETS, dataset_info
from .errors import ArgumentError, CheckpointError, NonFiniteError
from .ops.loss import check_labels
from .models import MODEL_TITLES, MODELS, build_model, simplecnn_widths_of
from .nn import Sequential
from .cli import MAX_WIDTH, HelpFormatter, parse_widths, valid_widths

DEFAULTS = dict(device="auto", epochs=10, batch_size=64, lr=0.05, optimizer="sgd", momentum=0.9,
                weight_decay=5e-4, schedule="cosine", seed=0, data_dir=None, limit_train=None,
                limit_test=None, checkpoint=None, resume=False, checkpoint_every=0,
                activation="relu", pool="max", dataset="mnist", model="lenet5", augment=None,
                crop_padding=None, random_erasing=None, label_smoothing=0.0, widths=None)
DEFAULTS.update(distributed=False)  # --distributed: gpuconv/distributed.py, issue 19
DEFAULTS.update(cuda_graph=False)  # --cuda-graph: gpuconv/cuda/graph.py, issue 17 (changes no number)
# What a resumed run must share with the run that wrote the checkpoint.
RESUME_KEYS = ("seed", "batch_size", "activation", "pool", "optimizer", "dataset", "model", "augment",
               "crop_padding", "random_erasing", "label_smoothing", "widths")

# On a GPU the loss and the correct count stay on the device and are read back (one blocking sync)
# every LOG_EVERY steps and at the end of an epoch, not after every step.
LOG_EVERY = 50


def default_checkpoint(model, dataset):
    """Where `train` writes its checkpoint when --checkpoint is not given."""
    return os.path.join("runs", f"{model}-{dataset}.npz")


def build_data(config):
    """(train set, test set, float32 test images ready for the model, training-batch transform)."""
    info = dataset_info(config["dataset"])
    train_set = info.cls("train", data_dir=config["data_dir"], limit=config["limit_train"])
    test_set = info.cls("test", data_dir=config["data_dir"], limit=config["limit_test"])
    test_images = to_float_batch(test_set.images)
    eval_transform = info.eval_transform()
    if eval_transform is not None:
        test_images = eval_transform(test_images)
    augment = info.augment if config["augment"] is None else bool(config["augment"])
    return train_set, test_set, test_images, info.train_transform(augment, config["crop_padding"],
                                                                  config["random_erasing"])


def build_optimizer(name, params, lr, momentum, weight_decay):
    if name == "sgd":
        return optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)
    if name == "adam":
        return optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ArgumentError(f"optimizer: expected 'sgd' or 'adam', got {name!r}")


def predict_logits(model, images, batch_size=1000):
    """Logits (N, classes) on the host for float32 NCHW `images`, run batch by batch on the model's
    device in eval mode (the model's train/eval mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            chunks = [to_device(model(to_device(images[start:start + batch_size], model.device)).data, "cpu")
                      for start in range(0, max(len(images), 1), batch_size)]  # empty in, (0, classes) out
    finally:
        model.train(was_training)
    return np.concatenate(chunks)


def evaluate(model, images, labels, batch_size=1000, group=None):
    """Accuracy of `model` on (images, labels) NumPy arrays. With a distributed `group`, each rank
    scores its contiguous share and the counts are summed (every rank gets the same number)."""
    if len(labels) == 0:
        return 0.0
    if group is not None and group.world_size > 1:
        n, r, w = len(labels), group.rank, group.world_size
        part = slice(r * n // w, (r + 1) * n // w)
        correct = int((predict_logits(model, images[part], batch_size).argmax(axis=1) == labels[part]).sum())
        return float(group.sum_host([correct], "evaluation")[0]) / n
    return float((predict_logits(model, images, batch_size).argmax(axis=1) == labels).mean())


def first_non_finite_layer(model, x):
    """Run x through the model step by step -> the name of the first step whose output is NaN/Inf.
    The steps are the children of a model whose forward is nn.Sequential's (a chain); any other
    model (an nn.Residual, an nn.Concat, a forward of its own) is one step, named by its class:
    its children are not a chain, and feeding one's output to the next raised in the middle of
    the error report."""
    xp = get_array_module(x)
    if not bool(xp.isfinite(x).all()):
        return "input"
    chain = isinstance(model, Sequential) and type(model).forward is Sequential.forward
    steps = model.named_children() if chain else [(type(model).__name__, model)]
    with no_grad():
        for name, layer in steps:
            x = layer(x).data
            if not bool(xp.isfinite(x).all()):
                return name
    return "loss"


@contextlib.contextmanager
def sigint_deferred():
    """Ctrl-C inside the block is held until the block ends, then raised: an optimizer update is
    never left half done (some parameters stepped, others not). Only in the main thread, where
    Python delivers signals; the previous handler is restored exactly."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


class Trainer:
    """One training run: model, optimizer, schedule, data, progress; fit() runs it."""

    def __init__(self, config, log=print):
        self.config = dict(DEFAULTS, **config)
        self.log = log
        c = self.config
        if not (isinstance(c["epochs"], int) and c["epochs"] >= 1):
            raise ArgumentError(f"epochs: expected an int >= 1, got {c['epochs']!r}")
        if not (isinstance(c["batch_size"], int) and c["batch_size"] >= 1):
            raise ArgumentError(f"batch_size: expected an int >= 1, got {c['batch_size']!r}")
        if c["resume"] and not c["checkpoint"]:
            raise ArgumentError("resume: --resume needs --checkpoint PATH to resume from")
        if c["cuda_graph"] and c["distributed"]:  # before MPI starts, and before the device's refusal
            raise ArgumentError("cuda_graph: --cuda-graph with --distributed is not supported (the gradients are "
                                "averaged over MPI inside the step, which a CUDA graph cannot hold); drop one")
        self.dist = None  # --distributed: the ProcessGroup; printing and checkpoints on rank 0 alone
        if c["distributed"]:
            self.dist = distributed.init(device=c["device"])
            distributed.fit_cpu(self.dist)
            self.log = log if self.dist.rank == 0 else (lambda *args, **kwargs: None)
            self.log(f"distributed: {self.dist.world_size} ranks over {self.dist.backend}, batch {c['batch_size']} "
                     f"per rank ({c['batch_size'] * self.dist.world_size} a step)")
        self.device = self.dist.device if self.dist else parse_device(c["device"])
        if c["cuda_graph"] and self.device.kind == "cpu":
            # refused, not ignored: the flag asks for something this run cannot do, as
            # torch.cuda.CUDAGraph refuses without CUDA
            raise ArgumentError(f"cuda_graph: --cuda-graph captures the training step as a CUDA graph, and this "
                                f"run trains on {self.device}; pass --device cuda, or drop --cuda-graph")
        info = dataset_info(c["dataset"])
        if c["augment"] is None:
            c["augment"] = info.augment
        crop_given = c["crop_padding"] is not None
        if c["crop_padding"] is None:
            c["crop_padding"] = info.crop_padding
        erasing_given = c["random_erasing"] is not None
        if c["random_erasing"] is None:
            c["random_erasing"] = info.random_erasing
        if (isinstance(c["random_erasing"], bool) or not isinstance(c["random_erasing"], (int, float))
                or not 0.0 <= c["random_erasing"] <= 1.0):
            raise ArgumentError(f"random_erasing: expected a probability in [0, 1], got {c['random_erasing']!r}")

        def refuse_without_augmentation(key, given, verb):
            # erasing and cropping are part of the augmentation: without it a setting the user gave
            # would do nothing, yet be saved in the checkpoint as if it had
            if given and c[key] and not c["augment"]:
                default = "off" if not info.augment else "on"
                raise ArgumentError(f"{key}: {c[key]!r} {verb} augmented batches only, and this run does not "
                                    f"augment (--no-augment, or {c['dataset']}'s default, {default}); add --augment")

        refuse_without_augmentation("random_erasing", erasing_given, "erases")
        if isinstance(c["crop_padding"], bool) or not isinstance(c["crop_padding"], int) or c["crop_padding"] < 0:
            raise ArgumentError(f"crop_padding: expected an int >= 0, got {c['crop_padding']!r}")
        refuse_without_augmentation("crop_padding", crop_given, "crops")
        if not (isinstance(c["label_smoothing"], (int, float)) and 0.0 <= c["label_smoothing"] < 1.0):
            raise ArgumentError(f"label_smoothing: expected a number in [0, 1), got {c['label_smoothing']!r}")
        if c["model"] != "lenet5" and (c["activation"], c["pool"]) != ("relu", "max"):
            raise ArgumentError(f"activation, pool: choose LeNet-5's (--model lenet5), and this run trains "
                                f"{c['model']}, whose layers are fixed (ReLU, max pooling); got activation="
                                f"{c['activation']!r}, pool={c['pool']!r}: drop --activation and --pool")
        if c["widths"] is not None and c["model"] != "simplecnn":
            raise ArgumentError(f"widths: sets SimpleCNN's block widths (--model simplecnn), "
                                f"and this run trains {c['model']}; drop --widths")
        if c["widths"] is not None and not valid_widths(c["widths"]):  # --widths' limits, for Python too
            raise ArgumentError(f"widths: expected a list of 1 to 4 ints in [1, {MAX_WIDTH}] (SimpleCNN's "
                                f"block widths), got {c['widths']!r}")
        self.model = build_model(c["model"], info.in_channels, len(info.cls.classes), info.image_size,
                                 seed=c["seed"], activation=c["activation"], pool=c["pool"],
                                 widths=None if c["widths"] is None else tuple(c["widths"])).to(self.device)
        # kept as the model has them, so that the checkpoint says which SimpleCNN it holds
        c["widths"] = list(self.model.widths) if c["model"] == "simplecnn" else None
        self.net = compile_model(self.model)  # the CPU executor where it applies, eager elsewhere
        self.optimizer = build_optimizer(c["optimizer"], self.model.parameters(), c["lr"], c["momentum"],
                                         c["weight_decay"])
        schedule = optim.SCHEDULES.get(c["schedule"], "missing")
        if schedule == "missing":
            raise ArgumentError(f"schedule: expected one of {sorted(optim.SCHEDULES)}, got {c['schedule']!r}")
        self.schedule = None if schedule is None else (
            schedule(self.optimizer, T_max=c["epochs"]) if schedule is optim.CosineAnnealingLR
            else schedule(self.optimizer, step_size=max(1, c["epochs"] // 3)))
        self.train_set, self.test_set, self.test_images, self.transform = build_data(c)
        shard = dict(rank=self.dist.rank, world_size=self.dist.world_size) if self.dist else {}
        # host batches are augmented where they are made; GPU-resident ones in batches()
        self.loader = DataLoader(self.train_set, batch_size=c["batch_size"], shuffle=True, seed=c["seed"],
                                 transform=self.transform, **shard)
        self.num_classes = len(info.cls.classes)  # the model was built with this many outputs
        self.device_data = self._dataset_on_device()
        self.pending = None  # (loss sum, correct count) of steps not yet read back from the GPU
        self.epoch, self.batch, self.step, self.history = 0, 0, 0, []
        self.progress = dict(seen=0, loss_sum=0.0, correct=0, seconds=0.0)  # the epoch so far
        if c["resume"] and os.path.exists(c["checkpoint"]):
            self.restore(c["checkpoint"])
        if self.dist:  # rank 0's weights everywhere; optimizer.step() averages the gradients first
            same = [c[k] for k in ("epochs", "batch_size", "seed", "lr", "optimizer", "schedule", "checkpoint_every")]
            self.dist.check_same(same + [len(self.train_set), len(self.test_set), self.epoch, self.batch],
                                 "the settings, the data sizes or the resumed position")
            self.net = distributed.DistributedDataParallel(self.net, self.optimizer, process_group=self.dist)
        # --cuda-graph: the step recorded, captured and replayed (eager for what it cannot run, e.g. the
        # last, partial batch)
        self.graph_step = StaticStep(self.forward_loss, self.optimizer, self.model, log=self.log) \
            if c["cuda_graph"] else None

    # ----- checkpoints -----
    def meta(self):
        self.read_progress()
        keys = RESUME_KEYS + ("schedule", "epochs")
        return dict(epoch=self.epoch, batch=self.batch, step=self.step, history=self.history,
                    progress=self.progress, config={k: self.config[k] for k in keys},
                    world_size=self.dist.world_size if self.dist else 1)

    def save(self):
        if self.config["checkpoint"]:
            meta = self.meta()
            if self.dist:  # every rank takes part; rank 0 writes
                self.net.sync_buffers()
                meta["progress"] = self.global_progress(self.progress)
                if self.dist.rank != 0:
                    return
            save_checkpoint(self.config["checkpoint"], self.model, self.optimizer, meta)
            history_path = os.path.splitext(self.config["checkpoint"])[0] + ".history.json"
            text = json.dumps(self.history, indent=1).encode()
            atomic_write(history_path, lambda f: f.write(text))

    def restore(self, path):
        model_state, optim_state, meta = load_checkpoint(path)  # types and ranges of every field
        saved = meta.get("config", {})
        # checkpoints from before the zoo, and from before --random-erasing (which then erased nothing)
        saved = dict(dict(dataset="mnist", model="lenet5", random_erasing=0.0), **saved)
        if "widths" not in saved:  # from before the config recorded them: the weights tell
            saved["widths"] = None
            if saved["model"] == "simplecnn":
                widths = simplecnn_widths_of(model_state)
                saved["widths"] = None if widths is None else list(widths)
        # Without augmentation, crop padding and erasing did nothing (then, and in this run): a
        # checkpoint from before they were refused without --augment may hold any value, which no
        # run may ask for now; they are not compared.
        unaugmented = saved.get("augment") is False and not self.config["augment"]
        inert = ("crop_padding", "random_erasing") if unaugmented else ()
        if self.config["model"] != "lenet5":  # its layers are fixed: a checkpoint from before other
            inert += ("activation", "pool")   # values were refused may hold any (they did nothing)
        for key in RESUME_KEYS:
            if key in saved and key not in inert and saved[key] != self.config[key]:
                hint = "pass the same value"
                if key == "widths" and isinstance(saved[key], list):  # as the option is typed
                    hint = f"pass --widths {','.join(str(w) for w in saved[key])}"
                raise CheckpointError(f"--resume: the checkpoint was trained with {key}={saved[key]!r}, "
                                      f"this run asks for {key}={self.config[key]!r}; {hint}")
        ranks, saved_ranks = self.dist.world_size if self.dist else 1, distributed.saved_world_size(meta, path)
        per_epoch = len(self.loader) if ranks == saved_ranks else len(
            DataLoader(self.train_set, self.config["batch_size"], world_size=saved_ranks))  # its steps, its batch
        check_resume(meta, per_epoch, self.config["batch_size"] * saved_ranks, f"checkpoint {path!r}")
        try:  # the shapes and kinds of the arrays against this model and optimizer
            self.model.load_state_dict(model_state)
            self.optimizer.load_state_dict(optim_state)
        except CheckpointError as exc:
            raise CheckpointError(f"checkpoint {path!r}: {exc}") from None
        self.epoch, self.batch, self.step = meta["epoch"], meta["batch"], meta["step"]
        self.history = meta["history"]
        self.progress = dict(dict(seen=0, loss_sum=0.0, correct=0, seconds=0.0), **meta.get("progress", {}))
        if ranks != saved_ranks:  # the position in this run's global batches
            self.batch = distributed.resume_batch(saved_ranks, self.batch, self.config["batch_size"], ranks)
            self.step = self.epoch * len(self.loader) + self.batch
        if self.dist and self.dist.rank != 0:  # the saved counts are all ranks'; rank 0 carries them
            self.progress.update(seen=0, loss_sum=0.0, correct=0)
        if self.schedule is not None:
            self.schedule.epoch = self.epoch
            self.schedule.epoch -= 1
            self.schedule.step()
        self.log(f"resumed from {path}: epoch {self.epoch + 1}, batch {self.batch}")

    # ----- training -----
    def forward_loss(self, x, y):
        """(loss, logits) Tensors of a batch."""
        logits = self.net(x)
        return F.cross_entropy(logits, y, label_smoothing=self.config["label_smoothing"]), logits

    def train_step(self, x, y):
        """One SGD step on a batch -> (loss, logits array). The loss is a 0-d array on the batch's
        device: nothing here reads a GPU value back (the caller reads sums once per LOG_EVERY steps).
        On the CPU the loss is checked before the update, which costs nothing there. With
        --cuda-graph both arrays are the graph's buffers, overwritten by the next step."""
        if self.graph_step is not None:
            loss, logits = self.graph_step(x, y)
        else:
            loss, logits = self.forward_loss(x, y)
            if not is_device_array(loss.data):
                self.check_finite(loss.data, x, self.step + 1)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            loss, logits = loss.data, logits.data
        self.batch += 1
        self.step += 1
        return loss, logits

    def accumulate(self, loss, logits, y):
        """Add a step's loss and correct count to the epoch's: on the GPU as device sums, no sync."""
        n = len(y)
        with device_scope(y):
            correct = (logits.argmax(axis=1) == y).sum()
            if self.pending is None:
                self.pending = [loss.astype("float64") * n, correct, self.step]
            else:
                self.pending[0] = self.pending[0] + loss.astype("float64") * n
                self.pending[1] = self.pending[1] + correct
        self.progress["seen"] += n

    def read_progress(self, x=None):
        """Fold the device sums into `progress` (one blocking read) and refuse a non-finite loss,
        before anything (a checkpoint, the epoch's record) is made of them. `x`, the last batch,
        lets the error name the first layer that gives a non-finite output."""
        if self.pending is None:
            return
        loss_sum, correct, first_step = self.pending
        self.pending = None
        loss_sum = float(loss_sum)
        self.check_finite(loss_sum, x, self.step, first_step)
        self.progress["correct"] += int(correct)
        self.progress["loss_sum"] += loss_sum

    def check_finite(self, value, x, step, first_step=None):
        value = float(value)
        if math.isfinite(value):
            return
        layer = repr(first_non_finite_layer(self.model, x)) if x is not None else "unknown here"
        where = f"at step {step}" if first_step in (None, step) else f"between steps {first_step} and {step}"
        raise NonFiniteError(f"loss became {value} {where} (epoch {self.epoch + 1}); the first non-finite "
                             f"output came from layer {layer}. The last good checkpoint is kept; lower --lr "
                             "or check the input data")

    # ----- data on the device -----
    def _dataset_on_device(self):
        """The training images (uint8, as stored) and labels moved to the GPU once, or None on the
        CPU or for a dataset without uint8 .images and .labels. Labels are range-checked here, on
        the host, before the copy: the loss then never reads them back."""
        images, labels = getattr(self.train_set, "images", None), getattr(self.train_set, "labels", None)
        if self.device.kind == "cpu" or images is None or labels is None or np.asarray(images).dtype != np.uint8:
            return None
        labels = np.asarray(labels).astype(np.int64)
        check_labels(labels, len(labels), self.num_classes)
        with device_scope(self.device):
            return to_device(np.ascontiguousarray(images), self.device), to_device(labels, self.device)

    def batches(self, epoch, start=0):
        """(x, y) on the model's device for every batch of `epoch` from `start`, in the loader's
        order. With the dataset on the GPU, a batch is gathered and normalised there (the same
        arithmetic as data.loader.to_float_batch); otherwise the loader's batch is checked and copied."""
        if self.device_data is None:
            for x, y in self.loader.batches(epoch, start=start):
                if self.device.kind != "cpu":
                    check_labels(y, len(y), self.num_classes)  # on the host, before the copy
                yield to_device(x, self.device), to_device(y, self.device)
            return
        images, labels = self.device_data
        size, rank, ranks = self.loader.batch_size, self.loader.rank, self.loader.world_size
        with device_scope(self.device):
            xp = get_array_module(images)
            order = to_device(self.loader.order(epoch), self.device)  # one small copy an epoch
        for b in range(start, len(self.loader)):
            with device_scope(self.device):  # not held across the yield: the step nests its own scopes
                index = order[b * size * ranks:(b + 1) * size * ranks][rank::ranks]  # this rank's share
                x = images[index].astype(xp.float32) / xp.float32(255)
                x = x[:, None] if x.ndim == 3 else x
                if self.transform is not None:  # augmented on the GPU, drawn as the loader draws
                    x = self.transform(x, self.loader.batch_rng(epoch, b))
                batch = x, labels[index]
            yield batch

    def fit(self):
        c = self.config
        test_accuracy = None
        while self.epoch < c["epochs"]:
            progress = self.progress
            started = time.perf_counter() - progress["seconds"]
            batches = self.batches(self.epoch, start=self.batch)
            bar = tqdm(batches, total=len(self.loader) - self.batch, desc=f"epoch {self.epoch + 1}/{c['epochs']}",
                       leave=False, disable=None, unit="batch")
            on_host, x = self.device.kind == "cpu", None
            for x, y in bar:
                # Ctrl-C lands between steps (weights and counts agree); the model's GPU is current;
                # out of memory anywhere in the step (the optimizer's too) names the step and the batch
                with sigint_deferred(), device_scope(self.device), \
                        device_errors("training step", {"x": x.shape}):
                    loss, logits = self.train_step(x, y)
                    self.accumulate(loss, logits, y)
                    progress["seconds"] = time.perf_counter() - started
                if on_host or self.step % LOG_EVERY == 0:  # a GPU is read back once per LOG_EVERY steps
                    self.read_progress(x)
                    bar.set_postfix(loss=f"{progress['loss_sum'] / progress['seen']:.4f}",
                                    acc=f"{progress['correct'] / progress['seen']:.4f}", refresh=False)
                if c["checkpoint_every"] and self.step % c["checkpoint_every"] == 0:
                    self.save()
            bar.close()
            self.read_progress(x)
            seconds = time.perf_counter() - started
            progress = self.global_progress(progress) if self.dist else progress
            seen = progress["seen"]
            test_accuracy = self.evaluate()
            record = dict(epoch=self.epoch + 1, train_loss=progress["loss_sum"] / max(seen, 1),
                          train_accuracy=progress["correct"] / max(seen, 1), test_accuracy=test_accuracy,
                          seconds=seconds, images_per_s=seen / seconds if seconds else 0.0, lr=self.optimizer.lr)
            self.history.append(record)
            self.log(f"epoch {record['epoch']}/{c['epochs']}: train loss {record['train_loss']:.4f}, "
                     f"train accuracy {record['train_accuracy']:.4f}, test accuracy {test_accuracy:.4f}, "
                     f"{seconds:.1f} s, {record['images_per_s']:,.0f} images/s")
            self.epoch, self.batch = self.epoch + 1, 0
            self.progress = dict(seen=0, loss_sum=0.0, correct=0, seconds=0.0)
            if self.schedule is not None:
                self.schedule.step()
            self.save()
        if test_accuracy is None:  # resumed a finished run
            test_accuracy = self.evaluate()
        return test_accuracy

    # ----- --distributed -----
    def evaluate(self):
        if self.dist:
            self.net.sync_buffers()  # rank 0's BatchNorm running statistics on every rank
        return evaluate(self.net, self.test_images, self.test_set.labels, group=self.dist)

    def global_progress(self, progress):
        """The epoch's counts summed over the ranks (time: this rank's)."""
        seen, loss_sum, correct = self.dist.sum_host([progress["seen"], progress["loss_sum"], progress["correct"]],
                                                     "progress")
        return dict(progress, seen=int(seen), loss_sum=float(loss_sum), correct=int(correct))


def build_parser():
    p = argparse.ArgumentParser(prog="python -m gpuconv train",
                                description="Train a model of the zoo on MNIST, Fashion-MNIST or CIFAR-10 "
                                            "(default: LeNet-5 on MNIST).", formatter_class=HelpFormatter)
    p.add_argument("--dataset", choices=list(DATASETS), default=DEFAULTS["dataset"])
    p.add_argument("--model", choices=list(MODELS), default=DEFAULTS["model"])
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random crop (padding 2 for 28x28, 4 for 32x32) and, except on MNIST, horizontal "
                        "flip of every training batch (default: on for fashion-mnist and cifar10, off for mnist)")
    p.add_argument("--crop-padding", type=int, default=None,
                   help="with --augment: the zero padding of the random crop, 0 for no crop (flip only); "
                        "default 2 for 28x28 images, 4 for 32x32")
    p.add_argument("--random-erasing", type=float, default=None, metavar="P",
                   help="with --augment: erase one random rectangle of each training image with probability P "
                        "(Zhong et al. 2017; default: " + ", ".join(
                            f"{info.random_erasing:g} for {name}" for name, info in DATASETS.items()) + ")")
    p.add_argument("--widths", type=parse_widths, default=None, metavar="W1,W2,...",
                   help="--model simplecnn only: the channels of its 1 to 4 conv blocks (default 32,64,128)")
    p.add_argument("--label-smoothing", type=float, default=DEFAULTS["label_smoothing"],
                   help="cross-entropy against (1 - e) one-hot + e / classes (default 0)")
    p.add_argument("--device", default=DEFAULTS["device"], help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--optimizer", choices=["sgd", "adam"], default=DEFAULTS["optimizer"])
    p.add_argument("--momentum", type=float, default=DEFAULTS["momentum"])
    p.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    p.add_argument("--schedule", choices=sorted(optim.SCHEDULES), default=DEFAULTS["schedule"])
    p.add_argument("--activation", choices=["relu", "tanh", "sigmoid"], default=DEFAULTS["activation"])
    p.add_argument("--pool", choices=["max", "avg"], default=DEFAULTS["pool"])
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--data-dir", default=None,
                   help="where the dataset is (MNIST / Fashion-MNIST: the four IDX files, .gz or raw; CIFAR-10: "
                        "the binary .bin files, their cifar-10-batches-bin folder or cifar-10-binary.tar.gz); "
                        "when given, the only place looked at")
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N training images")
    p.add_argument("--limit-test", type=int, default=None, help="use only the first N test images")
    p.add_argument("--checkpoint", default=None,
                   help="write a checkpoint (.npz) here after every epoch (default: runs/MODEL-DATASET.npz)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="also write one every N steps")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint if it exists")
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel over the ranks of `mpiexec -n N` (--batch-size is per rank)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="on a GPU, capture the training step as a CUDA graph once and replay it (the same numbers, "
                        "fewer launches from Python); a batch of another shape, and anything the capture cannot "
                        "hold, runs eagerly")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    config = {k: v for k, v in vars(args).items()}
    if config["checkpoint"] is None:
        config["checkpoint"] = default_checkpoint(config["model"], config["dataset"])
    if config.get("distributed"):
        with distributed.guard():  # an error on one rank stops every rank, naming it
            return _main(config)
    return _main(config)


def _main(config):
    trainer = Trainer(config)
    info = dataset_info(trainer.config["dataset"])
    of = "" if info.name == "mnist" else f" of {info.title}"
    trainer.log(f"training {MODEL_TITLES[trainer.config['model']]} ({trainer.model.num_parameters():,} parameters) "
                f"on {trainer.device}, {len(trainer.train_set):,} training and {len(trainer.test_set):,} test "
                f"images{of}")
    if trainer.transform is not None:
        trainer.log(f"training batches: {trainer.transform}")
    trainer.log(f"checkpoint: {trainer.config['checkpoint']} (after every epoch; --resume continues from it)")
    try:
        accuracy = trainer.fit()
    except KeyboardInterrupt:
        saved = trainer.config["checkpoint"] and trainer.dist is None  # ranks stopped at different steps
        if saved:                                                          # must not meet in a collective
            trainer.save()
        where = f"; checkpoint written to {trainer.config['checkpoint']}" if saved else ""
        print(f"interrupted at epoch {trainer.epoch + 1}, batch {trainer.batch}{where}", file=sys.stderr)
        return 130
    if trainer.dist is None or trainer.dist.rank == 0:
        print(f"test accuracy: {accuracy:.4f}")
    return 0
