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
    complete gpuconv checkpoint."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r}: no such file")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise CheckpointError(f"checkpoint {path!r}: not a readable .npz file ({exc}); "
                              "is it a gpuconv checkpoint?") from None
    if "format" not in arrays or str(arrays["format"]) != FORMAT:
        raise CheckpointError(f"checkpoint {path!r}: expected a {FORMAT} file, found keys "
                              f"{sorted(arrays)[:6]}; it was not written by gpuconv")
    model_state = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
    optim_state = {k[len("optim/"):]: v for k, v in arrays.items() if k.startswith("optim/")}
    meta = json.loads(str(arrays["meta"]))
    return model_state, optim_state, meta
