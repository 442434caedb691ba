"""Mini-batches from a dataset, as NumPy arrays: x float32 (N, C, H, W), y int64 (N,).

The order of epoch e depends only on (seed, e), so resuming training at epoch e (even mid-epoch, via
`batches(epoch, start)`) replays exactly the batches an uninterrupted run would have seen. A
`transform` (gpuconv.data.transforms) is applied to each batch where it lives (after the move to
`device`, if one is given) with the generator `batch_rng(epoch, b)`, which depends only on
(seed, epoch, batch index) and, when sharded, the rank: augmented batches replay exactly too.
"""
import numpy as np

from ..backend import to_device

from ..errors import ArgumentError, ShapeError


def to_float_batch(images):
    """uint8 pixels -> float32 in [0, 1]; float images -> float32. (N, H, W) gains a channel axis."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        batch = images.astype(np.float32) / np.float32(255)
    else:
        batch = images.astype(np.float32, copy=False)
    if batch.ndim == 3:
        batch = batch[:, None]
    return batch


class ArrayDataset:
    """A dataset over in-memory arrays: images (N, H, W) or (N, C, H, W), integer labels (N,)."""

    def __init__(self, images, labels):
        images, labels = np.asarray(images), np.asarray(labels)
        if images.ndim not in (3, 4):
            raise ShapeError(f"images must be (N, H, W) or (N, C, H, W), got shape {images.shape}")
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise ShapeError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
        if len(images) != len(labels):
            raise ShapeError(f"{len(images)} images but {len(labels)} labels; the counts must be equal")
        self.images = images
        self.labels = labels.astype(np.int64)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return to_float_batch(self.images[index][None])[0], self.labels[index]

    def get_batch(self, indices):
        return to_float_batch(self.images[indices]), self.labels[indices]


class SplitDataset(ArrayDataset):
    """One split of a stored dataset (MNIST, FashionMNIST, CIFAR10): its first `limit` samples
    (all of them for None), labels read-only."""

    def __init__(self, split, images, labels, limit=None):
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
                raise ArgumentError(f"limit must be a positive int or None, got {limit!r}")
            images, labels = images[:limit], labels[:limit]
        super().__init__(images, labels)
        self.split = split
        self.labels.flags.writeable = False

    def __repr__(self):
        return f"{type(self).__name__}(split={self.split!r}, n={len(self)})"


def _check_int(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ArgumentError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class DataLoader:
    """Iterate (x, y) batches over `dataset`, optionally shuffled, reproducibly.

    Each `for` over the loader plays the current epoch and then advances `epoch`; call
    `set_epoch(e)` to choose the epoch (e.g. when resuming). Datasets with `get_batch(indices)` or
    `.images`/`.labels` are batched by fancy indexing; any other dataset by calling getitem per sample.

    Sharding (data-parallel training, gpuconv.distributed): with `world_size` N > 1, batch b of the
    epoch is the global batch order[b*N*B:(b+1)*N*B] and rank r takes its elements r, r+N, r+2N, ...;
    the N ranks' batches are disjoint and together are exactly the batch one process at batch N*B
    sees. A last global batch with fewer than N samples is dropped (every rank must get a sample)."""

    def __init__(self, dataset, batch_size, shuffle=False, drop_last=False, seed=0, transform=None,
                 device=None, rank=0, world_size=1):
        self.dataset = dataset
        self.transform, self.device = transform, device
        self.batch_size = _check_int(batch_size, "batch_size", 1)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.seed = _check_int(seed, "seed", 0)
        self.epoch = 0
        self.world_size = _check_int(world_size, "world_size", 1)
        self.rank = _check_int(rank, "rank", 0)
        if self.rank >= self.world_size:
            raise ArgumentError(f"rank: expected 0 <= rank < world_size={self.world_size}, got {rank!r}")

    def set_epoch(self, epoch):
        self.epoch = _check_int(epoch, "epoch", 0)

    def __len__(self):
        n, step = len(self.dataset), self.batch_size * self.world_size
        full, tail = divmod(n, step)
        return full + (1 if tail >= self.world_size and not self.drop_last else 0)

    def order(self, epoch):
        """The sample indices of `epoch`, in the order they are served (depends only on seed and epoch)."""
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def _fetch(self, indices):
        dataset = self.dataset
        if hasattr(dataset, "get_batch"):
            x, y = dataset.get_batch(indices)
        elif hasattr(dataset, "images") and hasattr(dataset, "labels"):
            x, y = to_float_batch(dataset.images[indices]), dataset.labels[indices]
        else:
            samples = [dataset[int(i)] for i in indices]
            x = np.stack([np.asarray(s[0]) for s in samples])
            y = np.array([s[1] for s in samples])
        return np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)

    def batch_rng(self, epoch, index):
        """The random generator of batch `index` of `epoch` for the transform: seeded by
        (seed, epoch, index) only, and by the rank when sharded, so that the ranks' images get
        independent crops and flips rather than the same draws."""
        key = [self.seed, epoch, index] + ([self.rank] if self.world_size > 1 else [])
        return np.random.default_rng(key)

    def batches(self, epoch, start=0):
        """Yield the batches of `epoch` from batch number `start` on (for an exact mid-epoch resume)."""
        order, step = self.order(epoch), self.batch_size * self.world_size
        for b in range(_check_int(start, "start", 0), len(self)):
            x, y = self._fetch(order[b * step:(b + 1) * step][self.rank::self.world_size])
            if self.device is not None:
                x, y = to_device(x, self.device), to_device(y, self.device)
            if self.transform is not None:
                x = self.transform(x, self.batch_rng(epoch, b))
            yield x, y

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1
        return self.batches(epoch)
