"""Fashion-MNIST (Xiao, Rasul and Vollgraf 2017): Zalando's 28x28 grey clothing images, 10 classes,
60,000 training and 10,000 test images, in the same four IDX files (and file names) as MNIST.

Where the files are looked for, in order:
  1. the `data_dir` argument, and only it when it is given (a folder that does not exist or lacks a
     file is an error naming it, never a silent fall-back to another copy)
  2. the Debian/Ubuntu package `dataset-fashion-mnist`: /usr/share/datasets/fashion-mnist
  3. the user cache: $XDG_CACHE_HOME/gpuconv/fashion-mnist (default ~/.cache/gpuconv/fashion-mnist)
  4. a download from the official mirror into the user cache
Each file may be raw or gzipped and is checked against the sha256 of its uncompressed bytes (pinned
from the Debian package's files, 2026-12-02; the .gz bytes can differ between mirrors).
"""
import os
from pathlib import Path

import numpy as np

from ..errors import ArgumentError, DataError, DataNotFoundError
from . import mnist
from .loader import SplitDataset

FILES = mnist.FILES  # the same four names as MNIST

SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FIX_COMMAND = "sudo apt-get install dataset-fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
# Per-channel mean and standard deviation of the training images in [0, 1] (computed from them).
MEAN, STD = (0.2860,), (0.3530,)
NAME = "Fashion-MNIST"


def cache_dir():
    """The user cache folder for Fashion-MNIST (it need not exist yet)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".cache"
    return root / "gpuconv" / "fashion-mnist"


def _candidate_dirs(data_dir):
    if data_dir is not None:
        return [("data_dir argument", Path(data_dir))]
    return [("Debian package dataset-fashion-mnist", SYSTEM_DIR), ("user cache", cache_dir())]


def find_file(name, data_dir=None, download_missing=True, mirrors=None, opener=None):
    """Path of Fashion-MNIST file `name` (raw or .gz) following the search order."""
    tried = []
    for label, folder in _candidate_dirs(data_dir):
        found = mnist._file_in(folder, name)
        if found is not None:
            return found
        why = "folder does not exist" if not folder.is_dir() else f"no {name} or {name}.gz there"
        tried.append(f"{label} {folder}: {why}")
    if data_dir is not None:
        raise DataNotFoundError(
            f"{NAME} file {name} (raw or .gz) not found in the data_dir that was given "
            f"(no other place is searched when a data_dir is given): {tried[0]}.\n"
            f"Fix: put the four {NAME} files there, or leave data_dir out to use the installed copy "
            f"({FIX_COMMAND})")
    if download_missing:
        try:
            return mnist.download(name, cache_dir(), MIRRORS if mirrors is None else mirrors, opener,
                                  sha256=SHA256, dataset=NAME, fix=FIX_COMMAND)
        except DataNotFoundError as exc:
            tried.append(f"download into {cache_dir()}: {exc}")
    else:
        tried.append("download: disabled (download=False)")
    places = "\n".join(f"  {i}. {line}" for i, line in enumerate(tried, 1))
    raise DataNotFoundError(f"{NAME} file {name} (raw or .gz) not found. Places tried, in order:\n{places}\n"
                            f"Fix: {FIX_COMMAND}\n(or put the four files in a folder and pass data_dir=...)")


def load_split(split, data_dir=None, download=True, mirrors=None, opener=None):
    """(images uint8 (N, 28, 28), labels uint8 (N,)) of split 'train' or 'test', verified, read-only."""
    if split not in FILES:
        raise ArgumentError(f"split must be 'train' or 'test', got {split!r}")
    arrays = []
    for name in FILES[split]:
        path = find_file(name, data_dir, download, mirrors, opener)
        arrays.append((path, mnist._load_file(path, name, SHA256, NAME, FIX_COMMAND)))
    (image_path, images), (label_path, labels) = arrays
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise DataError(f"{image_path}: expected uint8 images of shape (N, 28, 28), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataError(f"{label_path}: expected uint8 labels of shape (N,), got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{NAME} {split} split: {len(images)} images in {image_path} but {len(labels)} "
                        f"labels in {label_path}; the counts must be equal")
    if labels.size and labels.max() >= len(CLASSES):
        raise DataError(f"{label_path}: label {int(labels.max())} out of range 0..{len(CLASSES) - 1}")
    return images, labels


class FashionMNIST(SplitDataset):
    """One Fashion-MNIST split: item i is (float32 image (1, 28, 28) in [0, 1], int64 label).
    `.images` uint8 (N, 28, 28), `.labels` int64 (N,), `.classes` the ten class names."""

    classes = CLASSES
    mean, std = MEAN, STD

    def __init__(self, split="train", data_dir=None, limit=None, download=True, mirrors=None, opener=None):
        super().__init__(split, *load_split(split, data_dir, download, mirrors, opener), limit)
