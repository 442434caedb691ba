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

from . import functional as F
from . import optim
from .autograd import no_grad
from .backend import get_array_module, parse_device, to_device
from .compiler import compile as compile_model
from .checkpoint import atomic_write, load_checkpoint, save_checkpoint
from .data import DataLoader
from .data.loader import to_float_batch
from .data.registry import DATASETS, dataset_info
from .errors import ArgumentError, CheckpointError, NonFiniteError
from .models import MODEL_TITLES, MODELS, build_model

DEFAULTS = dict(device="auto", epochs=10, batch_size=64, lr=0.05, optimizer="sgd", momentum=0.9,
                weight_decay=5e-4, schedule="cosine", seed=0, data_dir=None, limit_train=None,
                limit_test=None, checkpoint=None, resume=False, checkpoint_every=0,
                activation="relu", pool="max", dataset="mnist", model="lenet5", augment=None,
                crop_padding=None, label_smoothing=0.0)
# What a resumed run must share with the run that wrote the checkpoint.
RESUME_KEYS = ("seed", "batch_size", "activation", "pool", "optimizer", "dataset", "model", "augment",
               "crop_padding", "label_smoothing")


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
    return train_set, test_set, test_images, info.train_transform(augment, config["crop_padding"])


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
                      for start in range(0, len(images), batch_size)]
    finally:
        model.train(was_training)
    return np.concatenate(chunks)


def evaluate(model, images, labels, batch_size=1000):
    """Accuracy of `model` on (images, labels) NumPy arrays."""
    if len(labels) == 0:
        return 0.0
    return float((predict_logits(model, images, batch_size).argmax(axis=1) == labels).mean())


def first_non_finite_layer(model, x):
    """Run x through the model layer by layer; name of the first layer whose output is NaN/Inf."""
    xp = get_array_module(x)
    if not bool(xp.isfinite(x).all()):
        return "input"
    with no_grad():
        for name, layer in model.named_children():
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
        self.device = parse_device(c["device"])
        info = dataset_info(c["dataset"])
        if c["augment"] is None:
            c["augment"] = info.augment
        if c["crop_padding"] is None:
            c["crop_padding"] = info.crop_padding
        if isinstance(c["crop_padding"], bool) or not isinstance(c["crop_padding"], int) or c["crop_padding"] < 0:
            raise ArgumentError(f"crop_padding: expected an int >= 0, got {c['crop_padding']!r}")
        if not (isinstance(c["label_smoothing"], (int, float)) and 0.0 <= c["label_smoothing"] < 1.0):
            raise ArgumentError(f"label_smoothing: expected a number in [0, 1), got {c['label_smoothing']!r}")
        self.model = build_model(c["model"], info.in_channels, len(info.cls.classes), info.image_size,
                                 seed=c["seed"], activation=c["activation"], pool=c["pool"]).to(self.device)
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
        self.loader = DataLoader(self.train_set, batch_size=c["batch_size"], shuffle=True, seed=c["seed"],
                                 transform=self.transform, device=self.device)
        self.epoch, self.batch, self.step, self.history = 0, 0, 0, []
        self.progress = dict(seen=0, loss_sum=0.0, correct=0, seconds=0.0)  # the epoch so far
        if c["resume"] and os.path.exists(c["checkpoint"]):
            self.restore(c["checkpoint"])

    # ----- checkpoints -----
    def meta(self):
        keys = RESUME_KEYS + ("schedule", "epochs")
        return dict(epoch=self.epoch, batch=self.batch, step=self.step, history=self.history,
                    progress=self.progress, config={k: self.config[k] for k in keys})

    def save(self):
        if self.config["checkpoint"]:
            save_checkpoint(self.config["checkpoint"], self.model, self.optimizer, self.meta())
            history_path = os.path.splitext(self.config["checkpoint"])[0] + ".history.json"
            text = json.dumps(self.history, indent=1).encode()
            atomic_write(history_path, lambda f: f.write(text))

    def restore(self, path):
        model_state, optim_state, meta = load_checkpoint(path)
        saved = meta.get("config", {})
        saved = dict(dict(dataset="mnist", model="lenet5"), **saved)  # checkpoints from before the zoo
        for key in RESUME_KEYS:
            if key in saved and saved[key] != self.config[key]:
                raise CheckpointError(f"--resume: the checkpoint was trained with {key}={saved[key]!r}, "
                                      f"this run asks for {key}={self.config[key]!r}; pass the same value")
        self.model.load_state_dict(model_state)
        self.optimizer.load_state_dict(optim_state)
        self.epoch, self.batch, self.step = meta["epoch"], meta["batch"], meta["step"]
        self.history = meta["history"]
        self.progress = dict(dict(seen=0, loss_sum=0.0, correct=0, seconds=0.0), **meta.get("progress", {}))
        if self.schedule is not None:
            self.schedule.epoch = self.epoch
            self.schedule.epoch -= 1
            self.schedule.step()
        self.log(f"resumed from {path}: epoch {self.epoch + 1}, batch {self.batch}")

    # ----- training -----
    def train_step(self, x, y):
        """One SGD step on a batch -> (loss as a float, logits array)."""
        logits = self.net(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.config["label_smoothing"])
        value = loss.item()
        if not math.isfinite(value):
            layer = first_non_finite_layer(self.model, x)
            raise NonFiniteError(f"loss became {value} at step {self.step + 1} (epoch {self.epoch + 1}); "
                                 f"the first non-finite output came from layer {layer!r}. The last good "
                                 "checkpoint is kept; lower --lr or check the input data")
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.batch += 1
        self.step += 1
        return value, logits.data

    def fit(self):
        c = self.config
        test_accuracy = None
        while self.epoch < c["epochs"]:
            progress = self.progress
            started = time.perf_counter() - progress["seconds"]
            batches = self.loader.batches(self.epoch, start=self.batch)
            bar = tqdm(batches, total=len(self.loader) - self.batch, desc=f"epoch {self.epoch + 1}/{c['epochs']}",
                       leave=False, disable=None, unit="batch")
            for x, y in bar:
                x, y = to_device(x, self.device), to_device(y, self.device)
                with sigint_deferred():  # Ctrl-C lands between steps: weights and counts agree
                    loss, logits = self.train_step(x, y)
                    progress["seen"] += len(y)
                    progress["loss_sum"] += loss * len(y)
                    progress["correct"] += int((logits.argmax(axis=1) == y).sum())
                    progress["seconds"] = time.perf_counter() - started
                bar.set_postfix(loss=f"{loss:.4f}", acc=f"{progress['correct'] / progress['seen']:.4f}",
                                refresh=False)
                if c["checkpoint_every"] and self.step % c["checkpoint_every"] == 0:
                    self.save()
            bar.close()
            seconds, seen = time.perf_counter() - started, progress["seen"]
            test_accuracy = evaluate(self.net, self.test_images, self.test_set.labels)
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
            test_accuracy = evaluate(self.net, self.test_images, self.test_set.labels)
        return test_accuracy


def build_parser():
    p = argparse.ArgumentParser(prog="python -m gpuconv train",
                                description="Train a model of the zoo on MNIST, Fashion-MNIST or CIFAR-10 "
                                            "(default: LeNet-5 on MNIST).")
    p.add_argument("--dataset", choices=list(DATASETS), default=DEFAULTS["dataset"])
    p.add_argument("--model", choices=list(MODELS), default=DEFAULTS["model"])
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random crop (padding 2 for 28x28, 4 for 32x32) and, except on MNIST, horizontal "
                        "flip of every training batch (default: on for fashion-mnist and cifar10, off for mnist)")
    p.add_argument("--crop-padding", type=int, default=None,
                   help="with --augment: the zero padding of the random crop, 0 for no crop (flip only); "
                        "default 2 for 28x28 images, 4 for 32x32")
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
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    config = {k: v for k, v in vars(args).items()}
    if config["checkpoint"] is None:
        config["checkpoint"] = default_checkpoint(config["model"], config["dataset"])
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
        trainer.save()
        where = f"; checkpoint written to {trainer.config['checkpoint']}" if trainer.config["checkpoint"] else ""
        print(f"interrupted at epoch {trainer.epoch + 1}, batch {trainer.batch}{where}", file=sys.stderr)
        return 130
    print(f"test accuracy: {accuracy:.4f}")
    return 0
