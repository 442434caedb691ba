"""Checkpoints as .npz: parameters, optimizer state, progress and the training history.

Written to a temporary file in the same folder, flushed to disk, then renamed over the old one, so a
crash at any moment leaves either the previous checkpoint or the new one, never half of either.
Loaded with allow_pickle=False: a checkpoint is data, never code.
"""
import glob
import json
import os
import tempfile
import zipfile

import numpy as np

from .errors import CheckpointError

FORMAT = "gpuconv-checkpoint-v1"


def atomic_write(path, write):
    """Call write(file_object) on a temporary file next to `path`, fsync it, then rename it to `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    for stale in glob.glob(os.path.join(glob.escape(folder), glob.escape(os.path.basename(path)) + ".*.tmp")):
        os.unlink(stale)  # left by a writer that was killed before its rename; never the real file
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def save_checkpoint(path, model, optimizer=None, meta=None):
    """meta: JSON-serialisable dict (epoch, step, seed, history, model config, ...)."""
    arrays = {f"model/{name}": value for name, value in model.state_dict().items()}
    if optimizer is not None:
        arrays.update({f"optim/{key}": value for key, value in optimizer.state_dict().items()})
    arrays["format"] = np.array(FORMAT)
    arrays["meta"] = np.array(json.dumps(meta or {}))
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_checkpoint(path):
    """-> (model_state, optimizer_state, meta). Raises CheckpointError for anything that is not a
    complete, well-formed gpuconv checkpoint: a file that carries the format tag but was made (or
    edited) by hand is checked field by field (check_arrays, check_meta), and the error names the
    field, what was expected and what the file has."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r}: no such file")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise CheckpointError(f"checkpoint {path!r}: not a readable .npz file ({exc}); "
                              "is it a gpuconv checkpoint?") from None
    if "format" not in arrays or not _is_text(arrays["format"]) or str(arrays["format"]) != FORMAT:
        raise CheckpointError(f"checkpoint {path!r}: expected a {FORMAT} file, found keys "
                              f"{sorted(arrays)[:6]}; it was not written by gpuconv")
    where = f"checkpoint {os.fspath(path)!r}"
    unknown = sorted(k for k in arrays if k not in ("format", "meta") and not k.startswith(("model/", "optim/")))
    if unknown:
        raise CheckpointError(f"{where}: unexpected entries {unknown[:6]}; expected only format, meta, "
                              "model/* and optim/*")
    if "meta" not in arrays:
        raise CheckpointError(f"{where}: meta: missing; every gpuconv checkpoint has one (a JSON text)")
    if not _is_text(arrays["meta"]):
        raise CheckpointError(f"{where}: meta: expected a 0-d text array holding JSON, got "
                              f"{_describe_array(arrays['meta'])}")
    try:
        meta = json.loads(str(arrays["meta"]))
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{where}: meta: expected a JSON object, got text that is not JSON ({exc})") from None
    check_meta(meta, where)
    model_state = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
    optim_state = {k[len("optim/"):]: v for k, v in arrays.items() if k.startswith("optim/")}
    check_arrays(model_state, "model/", where)
    check_arrays(optim_state, "optim/", where)
    return model_state, optim_state, meta


# ----- field checks -----
# Types and ranges that hold for every checkpoint gpuconv writes; what depends on the model and the
# data (shapes, the batch index within an epoch) is checked where those are known:
# Module.load_state_dict, Optimizer.load_state_dict and check_resume.

def _is_text(array):
    return isinstance(array, np.ndarray) and array.ndim == 0 and array.dtype.kind == "U"


def _describe_array(array):
    return f"an array of dtype {array.dtype} and shape {tuple(array.shape)}"


def _describe(value):
    text = json.dumps(value) if isinstance(value, (dict, list, str, int, float, bool, type(None))) else repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _fail(where, field, expected, value):
    raise CheckpointError(f"{where}: {field}: expected {expected}, got {_describe(value)}")


def _int(where, field, value, minimum=0, maximum=None):
    # bool is an int to Python; true/false in the JSON is a hand-made file, not a count
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (
            maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        _fail(where, field, f"an int {bound}", value)
    return value


def _number(where, field, value, minimum=None, maximum=None, positive=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or (
            minimum is not None and value < minimum) or (maximum is not None and value > maximum) or (
            positive and value <= 0):
        if positive:
            bound = " > 0"
        elif maximum is not None:
            bound = f" in [{minimum}, {maximum}]"
        elif minimum is not None:
            bound = f" >= {minimum}"
        else:
            bound = ""
        _fail(where, field, f"a finite number{bound}", value)
    return value


HISTORY_FIELDS = {  # field of an epoch record -> (checker, keyword bounds)
    "epoch": (_int, dict(minimum=1)),
    "train_loss": (_number, dict(minimum=0)),
    "train_accuracy": (_number, dict(minimum=0, maximum=1)),
    "test_accuracy": (_number, dict(minimum=0, maximum=1)),
    "seconds": (_number, dict(minimum=0)),
    "images_per_s": (_number, dict(minimum=0)),
    "lr": (_number, dict(minimum=0)),
}
CONFIG_TEXT = ("activation", "pool", "optimizer", "schedule", "dataset", "model")
CONFIG_INTS = {"seed": 0, "batch_size": 1, "epochs": 1, "crop_padding": 0}  # field -> minimum


def check_meta(meta, where="checkpoint"):
    """Types and ranges of the meta JSON. Every field is optional here (a checkpoint of a model
    alone is fine for `show`); check_resume asks for what a resume needs. Keys gpuconv does not
    know are left alone, so that a newer gpuconv's checkpoint still shows."""
    if not isinstance(meta, dict):
        _fail(where, "meta", "a JSON object", meta)
    for field in ("epoch", "batch", "step"):
        if field in meta:
            _int(where, f"meta.{field}", meta[field])
    if "history" in meta:
        history = meta["history"]
        if not isinstance(history, list):
            _fail(where, "meta.history", "a list of per-epoch records", history)
        for index, record in enumerate(history):
            if not isinstance(record, dict):
                _fail(where, f"meta.history[{index}]", "an object (one epoch's record)", record)
            for field, (check, bounds) in HISTORY_FIELDS.items():
                if field in record:
                    check(where, f"meta.history[{index}].{field}", record[field], **bounds)
    if "progress" in meta:
        progress = meta["progress"]
        if not isinstance(progress, dict):
            _fail(where, "meta.progress", "an object with seen, loss_sum, correct and seconds", progress)
        unknown = sorted(set(progress) - {"seen", "loss_sum", "correct", "seconds"})
        if unknown:
            _fail(where, "meta.progress", "only the keys seen, loss_sum, correct and seconds", progress)
        seen = _int(where, "meta.progress.seen", progress.get("seen", 0))
        _int(where, "meta.progress.correct", progress.get("correct", 0), maximum=seen)
        _number(where, "meta.progress.loss_sum", progress.get("loss_sum", 0.0), minimum=0)
        _number(where, "meta.progress.seconds", progress.get("seconds", 0.0), minimum=0)
    if "config" in meta:
        config = meta["config"]
        if not isinstance(config, dict):
            _fail(where, "meta.config", "an object (the run's settings)", config)
        for field in CONFIG_TEXT:
            if field in config and not isinstance(config[field], str):
                _fail(where, f"meta.config.{field}", "a string", config[field])
        for field, minimum in CONFIG_INTS.items():
            if field in config:
                _int(where, f"meta.config.{field}", config[field], minimum=minimum)
        if "augment" in config and not isinstance(config["augment"], bool):
            _fail(where, "meta.config.augment", "true or false", config["augment"])
        erasing = config.get("random_erasing", 0.0)
        if isinstance(erasing, bool) or not isinstance(erasing, (int, float)) or not 0 <= erasing <= 1:
            _fail(where, "meta.config.random_erasing", "a probability in [0, 1]", erasing)
        widths = config.get("widths")
        if widths is not None and not (isinstance(widths, list) and 1 <= len(widths) <= 4 and all(
                isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths)):
            _fail(where, "meta.config.widths", "null or a list of 1 to 4 positive ints", widths)
        if widths is not None and config.get("model", "lenet5") != "simplecnn":  # only SimpleCNN has widths
            _fail(where, "meta.config.widths", f"null for model {config.get('model', 'lenet5')!r} (widths are "
                  "SimpleCNN's block widths)", widths)
        smoothing = config.get("label_smoothing", 0.0)
        if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0 <= smoothing < 1:
            _fail(where, "meta.config.label_smoothing", "a number in [0, 1)", smoothing)


def check_arrays(state, prefix, where="checkpoint"):
    """Every stored array is numbers (bool, int or float) and every float is finite; no text, no
    complex values, no NaN weights. Whether an int may stand where the model holds floats is
    Module.load_state_dict's and Optimizer.load_state_dict's call: they refuse it."""
    for key, array in state.items():
        if array.dtype.kind not in "biuf":
            raise CheckpointError(f"{where}: {prefix}{key}: expected numbers, got {_describe_array(array)}")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise CheckpointError(f"{where}: {prefix}{key}: expected finite values, got "
                                  f"{int((~np.isfinite(array)).sum())} NaN or Inf of {array.size}")


def check_resume(meta, batches_per_epoch, batch_size, where="checkpoint"):
    """What a resumed training run needs, against this run's data: epoch, batch, step and history
    present, the batch index within the epoch, the step and history counts that follow from them,
    and the epoch's running counts no larger than the batches seen allow."""
    for field in ("epoch", "batch", "step", "history"):
        if field not in meta:
            raise CheckpointError(f"{where}: meta.{field}: missing; a resumable checkpoint is written by "
                                  "python -m gpuconv train --checkpoint")
    epoch, batch = meta["epoch"], meta["batch"]
    # batch == batches_per_epoch: stopped after an epoch's last step, before its end-of-epoch record
    _int(where, "meta.batch", batch, maximum=batches_per_epoch)
    expected_step = epoch * batches_per_epoch + batch
    if meta["step"] != expected_step:
        raise CheckpointError(
            f"{where}: meta.step: expected {expected_step} (epoch {epoch} x {batches_per_epoch} batches "
            f"+ batch {batch}, for this run's data at batch size {batch_size}), got {meta['step']}; was the "
            "checkpoint made with another number of training images?")
    if len(meta["history"]) != epoch:
        raise CheckpointError(f"{where}: meta.history: expected one record per finished epoch ({epoch}), "
                              f"got {len(meta['history'])}")
    seen = meta.get("progress", {}).get("seen", 0)
    if seen > batch * batch_size:
        raise CheckpointError(f"{where}: meta.progress.seen: expected at most {batch * batch_size} "
                              f"({batch} batches of {batch_size}), got {seen}")
