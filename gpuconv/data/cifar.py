"""CIFAR-10 (Krizhevsky 2009) from its official *binary* version, `cifar-10-binary.tar.gz`.

No pickle is ever read (the "python version" of CIFAR-10 is pickles; this reader never touches it).
The binary version holds, in a folder `cifar-10-batches-bin/`:
  data_batch_1.bin .. data_batch_5.bin   the 50,000 training images, 10,000 per file
  test_batch.bin                          the 10,000 test images
  batches.meta.txt                        the ten class names, one per line
Each .bin file is a run of fixed 3073-byte records: one label byte (0..9), then 3072 pixel bytes,
the 1024 red values of the 32x32 image row by row, then the green, then the blue ones. So a file is
read with one np.frombuffer and one reshape to (N, 3073), and its size must be a multiple of 3073.

Where the files are looked for, in order:
  1. the `data_dir` argument, and only it when it is given: a folder holding the .bin files, or one
     holding `cifar-10-batches-bin/`, or one holding `cifar-10-binary.tar.gz`, or the tarball itself
  2. the user cache: $XDG_CACHE_HOME/gpuconv/cifar10 (default ~/.cache/gpuconv/cifar10), in any of
     those forms
  3. a download of the tarball from the official page into the user cache
The tarball is checked against the md5 the official page publishes (the only checksum it gives)
before a byte of it is used; members are read from it in memory, nothing is extracted to disk.
Unpacked .bin files cannot be checked against a published hash (none exists for them, and the real
data was not available where this reader was written); they are checked for record size, count and
label range instead.
"""
import hashlib
import os
import tarfile
from pathlib import Path

import numpy as np

from ..errors import ArgumentError, DataError, DataNotFoundError
from . import mnist
from .loader import SplitDataset

FOLDER = "cifar-10-batches-bin"
TARBALL = "cifar-10-binary.tar.gz"
TARBALL_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
URL = "https://www.cs.toronto.edu/~kriz/"
FILES = {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)}
META = "batches.meta.txt"
RECORD = 1 + 3 * 32 * 32
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Per-channel mean and standard deviation of the training images in [0, 1], as commonly published.
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
NAME = "CIFAR-10"
FIX = (f"download {URL}{TARBALL} (md5 {TARBALL_MD5}) and pass its path, or the folder holding it, "
       "as data_dir / --data-dir")

# (path, size, mtime_ns) of a verified tarball -> {member name: bytes}
_tarballs = {}


def cache_dir():
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".cache"
    return root / "gpuconv" / "cifar10"


def parse_batch(data, name="<bytes>"):
    """(images uint8 (N, 3, 32, 32), labels uint8 (N,)) of one binary batch file's bytes."""
    if len(data) == 0 or len(data) % RECORD:
        raise DataError(f"{name}: {len(data):,} bytes is not a whole number of {RECORD}-byte CIFAR-10 "
                        f"records (1 label byte + 3072 pixel bytes); the file is truncated or not a "
                        f"CIFAR-10 binary batch")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD)
    labels = records[:, 0]
    if labels.max() >= len(CLASSES):
        bad = int(np.argmax(labels >= len(CLASSES)))
        raise DataError(f"{name}: record {bad} has label {int(labels[bad])}, outside 0..{len(CLASSES) - 1}; "
                        f"not a CIFAR-10 binary batch (CIFAR-100's records are 3074 bytes)")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def encode_batch(images, labels):
    """The binary-batch bytes of uint8 images (N, 3, 32, 32) and labels (N,): the inverse of parse_batch."""
    images, labels = np.asarray(images, np.uint8), np.asarray(labels, np.uint8)
    if images.shape[1:] != (3, 32, 32) or labels.shape != (len(images),):
        raise DataError(f"encode_batch: expected images (N, 3, 32, 32) and labels (N,), got "
                        f"{images.shape} and {labels.shape}")
    return np.concatenate([labels[:, None], images.reshape(len(images), -1)], axis=1).tobytes()


def md5_of(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_tarball(path):
    """{member base name: bytes} of the .bin and .txt members under cifar-10-batches-bin/ of a
    verified tarball. Read in memory; members are never extracted, so no path in it is trusted."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, TARBALL_MD5)
    if key not in _tarballs:
        actual = md5_of(path)
        if actual != TARBALL_MD5:
            raise DataError(f"{path}: md5 is {actual}, expected {TARBALL_MD5} for the official "
                            f"{TARBALL}. The file is corrupt or not the original; delete it and fetch it again")
        members = {}
        try:
            with tarfile.open(path, "r:gz") as tar:
                for member in tar.getmembers():
                    parts = member.name.split("/")
                    if member.isfile() and len(parts) == 2 and parts[0] == FOLDER:
                        members[parts[1]] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"{path}: not a readable .tar.gz ({exc})") from None
        _tarballs[key] = members
    return _tarballs[key]


class _Source:
    """One place that holds CIFAR-10: a folder of .bin files or a tarball."""

    def __init__(self, folder=None, tarball=None):
        self.folder, self.tarball = folder, tarball

    def read(self, name):
        if self.folder is not None:
            return (self.folder / name).read_bytes(), str(self.folder / name)
        members = read_tarball(self.tarball)
        if name not in members:
            raise DataError(f"{self.tarball}: no member {FOLDER}/{name}; found {sorted(members)}")
        return members[name], f"{self.tarball}:{FOLDER}/{name}"

    def has(self, name):
        return (self.folder / name).is_file() if self.folder is not None else True

    def __str__(self):
        return str(self.folder if self.folder is not None else self.tarball)


def _source_in(place, split):
    """A _Source for `place` (a folder in any accepted layout, or a tarball path), or (None, why)."""
    place = Path(place)
    if place.is_file():
        return _Source(tarball=place), ""
    if not place.is_dir():
        return None, "does not exist"
    for folder in (place, place / FOLDER):
        if folder.is_dir() and all((folder / name).is_file() for name in FILES[split]):
            return _Source(folder=folder), ""
    if (place / TARBALL).is_file():
        return _Source(tarball=place / TARBALL), ""
    return None, (f"no {', '.join(FILES[split])} there nor in {FOLDER}/ under it, and no {TARBALL}")


def download(dest_dir, url=None, opener=None):
    """Fetch the tarball into dest_dir (written to a temporary name, md5-checked, renamed)."""
    dest_dir = Path(dest_dir)
    url = (URL + TARBALL) if url is None else url
    opener = mnist._default_opener if opener is None else opener
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / TARBALL
    tmp = dest_dir / f".{TARBALL}.part"
    try:
        with open(tmp, "wb") as out:
            response = opener(url)
            try:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
            finally:
                response.close()
        actual = md5_of(tmp)
        if actual != TARBALL_MD5:
            raise DataError(f"{url}: md5 {actual}, expected {TARBALL_MD5}")
        os.replace(tmp, final)
        return final
    except Exception as exc:
        raise DataNotFoundError(f"{url}: {type(exc).__name__}: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


def find_source(split, data_dir=None, download_missing=True, url=None, opener=None):
    if data_dir is not None:
        source, why = _source_in(data_dir, split)
        if source is None:
            raise DataNotFoundError(f"{NAME} {split} split not found in the data_dir that was given, {data_dir}: "
                                    f"{why} (no other place is searched when a data_dir is given).\nFix: {FIX}")
        return source
    tried = []
    source, why = _source_in(cache_dir(), split)
    if source is not None:
        return source
    tried.append(f"user cache {cache_dir()}: {why}")
    if download_missing:
        try:
            return _Source(tarball=download(cache_dir(), url, opener))
        except DataNotFoundError as exc:
            tried.append(f"download into {cache_dir()}: {exc}")
    else:
        tried.append("download: disabled (download=False)")
    places = "\n".join(f"  {i}. {line}" for i, line in enumerate(tried, 1))
    raise DataNotFoundError(f"{NAME} ({split} split) not found. Places tried, in order:\n{places}\nFix: {FIX}")


def load_split(split, data_dir=None, download=True, url=None, opener=None):
    """(images uint8 (N, 3, 32, 32), labels uint8 (N,), class names) of 'train' or 'test'."""
    if split not in FILES:
        raise ArgumentError(f"split must be 'train' or 'test', got {split!r}")
    source = find_source(split, data_dir, download, url, opener)
    parts = [parse_batch(*source.read(name)) for name in FILES[split]]
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    classes = CLASSES
    if source.has(META):
        try:
            text, where = source.read(META)
        except DataError:
            text = None
        if text is not None:
            names = tuple(line.strip() for line in text.decode("ascii", "replace").splitlines() if line.strip())
            if len(names) != len(CLASSES):
                raise DataError(f"{where}: expected {len(CLASSES)} class names, one per line, got {len(names)}")
            classes = names
    images.flags.writeable = False
    return images, labels, classes


class CIFAR10(SplitDataset):
    """One CIFAR-10 split: item i is (float32 image (3, 32, 32) in [0, 1], int64 label).
    `.images` uint8 (N, 3, 32, 32), `.labels` int64 (N,), `.classes` the ten class names."""

    mean, std = MEAN, STD
    classes = CLASSES  # replaced by the names in batches.meta.txt when the data has one

    def __init__(self, split="train", data_dir=None, limit=None, download=True, url=None, opener=None):
        images, labels, self.classes = load_split(split, data_dir, download, url, opener)
        super().__init__(split, images, labels, limit)


def write_fake(folder, train_per_batch=10, test=10, seed=0, tarball=True):
    """Write small CIFAR-10 files in exactly the official binary layout (for tests and smoke runs):
    folder/cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin + batches.meta.txt and, if tarball,
    folder/cifar-10-binary.tar.gz holding that folder. Returns (folder, tarball path or None).
    The tarball's md5 is of course not the official one (see TARBALL_MD5)."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    bins = folder / FOLDER
    bins.mkdir(parents=True, exist_ok=True)
    for name, n in [(f"data_batch_{i}.bin", train_per_batch) for i in range(1, 6)] + [("test_batch.bin", test)]:
        labels = rng.integers(0, 10, n)
        # images that carry their label (brighter red for higher classes), so a model can learn something
        images = rng.integers(0, 128, (n, 3, 32, 32)) + (labels * 12)[:, None, None, None] * np.array([1, 0, 0])[None, :, None, None]
        (bins / name).write_bytes(encode_batch(images.astype(np.uint8), labels))
    (bins / META).write_text("\n".join(CLASSES) + "\n\n")
    path = None
    if tarball:
        path = folder / TARBALL
        with tarfile.open(path, "w:gz") as tar:
            tar.add(bins, arcname=FOLDER)
    return folder, path
