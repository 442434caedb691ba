"""Batch transforms for augmentation: RandomCrop, RandomHorizontalFlip, RandomErasing, Normalize, Compose.

Each transform takes a whole float batch (N, C, H, W) and a NumPy random Generator and returns a new
batch of the same array module (NumPy or CuPy): the random choices (one crop offset and one flip coin
per image, one rectangle per erased image) are drawn on the host, a few bytes per image, and applied to the batch where it lives with
array operations (one fancy index, one `where`), with no Python loop over the images. Drawing on the
host makes the augmentation identical on the CPU and the GPU.

The DataLoader hands batch b of epoch e the generator `np.random.default_rng([seed, epoch, b])`, so
what every image looks like depends only on (seed, epoch, batch index), like the order of the
batches: a resumed run sees exactly the batches an uninterrupted one would.
"""
import numbers

import numpy as np

from ..backend import get_array_module
from ..errors import ArgumentError, ShapeError


def _check_batch(x, name):
    if getattr(x, "ndim", None) != 4:
        raise ShapeError(f"{name}: expected a batch of shape (N, C, H, W), got shape "
                         f"{tuple(getattr(x, 'shape', ()))}")


def _real(value):
    """A real number other than a bool: Python's, or a NumPy scalar (np.float32(0.5) is a probability too)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _as_rng(rng):
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


class RandomCrop:
    """Pad every image by `padding` zeros on each side, then cut a random size x size window from
    it (a random shift of up to `padding` pixels when size equals the image size), like
    torchvision.transforms.RandomCrop(size, padding)."""

    def __init__(self, size, padding=0):
        size = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
        if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1
                                 for s in size):
            raise ArgumentError(f"RandomCrop size: expected a positive int or (height, width), got {size!r}")
        if isinstance(padding, bool) or not isinstance(padding, (int, np.integer)) or padding < 0:
            raise ArgumentError(f"RandomCrop padding: expected an int >= 0, got {padding!r}")
        self.size, self.padding = (int(size[0]), int(size[1])), int(padding)

    def offsets(self, n, height, width, rng):
        """(top, left) per image in the padded image, drawn from rng: two int arrays of length n."""
        (h, w), p = self.size, self.padding
        if h > height + 2 * p or w > width + 2 * p:
            raise ShapeError(f"RandomCrop: a {h}x{w} crop does not fit a {height}x{width} image padded by {p}")
        rng = _as_rng(rng)
        return (rng.integers(0, height + 2 * p - h + 1, size=n),
                rng.integers(0, width + 2 * p - w + 1, size=n))

    def __call__(self, x, rng):
        _check_batch(x, "RandomCrop")
        xp = get_array_module(x)
        n, c, height, width = x.shape
        top, left = self.offsets(n, height, width, rng)
        p, (h, w) = self.padding, self.size
        padded = xp.pad(x, ((0, 0), (0, 0), (p, p), (p, p))) if p else x
        rows = xp.asarray(top)[:, None] + xp.arange(h)[None, :]        # (N, h)
        cols = xp.asarray(left)[:, None] + xp.arange(w)[None, :]       # (N, w)
        images = xp.arange(n)[:, None, None, None]
        channels = xp.arange(c)[None, :, None, None]
        return padded[images, channels, rows[:, None, :, None], cols[:, None, None, :]]

    def __repr__(self):
        return f"RandomCrop(size={self.size}, padding={self.padding})"


class RandomHorizontalFlip:
    """Mirror each image left-right with probability p."""

    def __init__(self, p=0.5):
        if not _real(p) or not 0.0 <= p <= 1.0:
            raise ArgumentError(f"RandomHorizontalFlip p: expected a number in [0, 1], got {p!r}")
        self.p = float(p)

    def flips(self, n, rng):
        """A bool array of length n: which images are mirrored."""
        return _as_rng(rng).random(n) < self.p

    def __call__(self, x, rng):
        _check_batch(x, "RandomHorizontalFlip")
        xp = get_array_module(x)
        flip = xp.asarray(self.flips(len(x), rng))[:, None, None, None]
        return xp.where(flip, x[..., ::-1], x)

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"


class RandomErasing:
    """With probability p, replace one random rectangle of each image by `value` (all channels),
    as in Zhong et al. 2017 and torchvision.transforms.RandomErasing: the rectangle's area is a
    uniform fraction `scale` of the image, its aspect ratio (height / width) log-uniform in
    `ratio`; a draw that does not fit in the image is drawn again, up to 10 times, after which the
    image is left whole. Put it after Normalize so that value=0 is the data's mean.

    It hides a part of the object, so the model cannot lean on one region alone: a regulariser for
    datasets whose training images a CNN soon fits (Fashion-MNIST, CIFAR-10)."""

    ATTEMPTS = 10

    def __init__(self, p=0.5, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0.0):
        if not _real(p) or not 0.0 <= p <= 1.0:
            raise ArgumentError(f"RandomErasing p: expected a number in [0, 1], got {p!r}")
        for name, pair, low in (("scale", scale, 0.0), ("ratio", ratio, 0.0)):
            ok = (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(_real(v) for v in pair)
                  and low < pair[0] <= pair[1] < np.inf and (name != "scale" or pair[1] <= 1.0))
            if not ok:
                bound = "0 < low <= high <= 1" if name == "scale" else "0 < low <= high, finite"
                raise ArgumentError(f"RandomErasing {name}: expected (low, high) with {bound}, got {pair!r}")
        if not _real(value) or not np.isfinite(value):
            raise ArgumentError(f"RandomErasing value: expected a finite number, got {value!r}")
        self.p, self.scale, self.ratio, self.value = float(p), tuple(map(float, scale)), tuple(map(float, ratio)), float(value)

    def boxes(self, n, height, width, rng):
        """(top, left, h, w) per image, four int arrays of length n; h = w = 0 for an image left whole."""
        rng = _as_rng(rng)
        erase = rng.random(n) < self.p
        area = height * width * rng.uniform(*self.scale, size=(n, self.ATTEMPTS))
        aspect = np.exp(rng.uniform(np.log(self.ratio[0]), np.log(self.ratio[1]), size=(n, self.ATTEMPTS)))
        with np.errstate(over="ignore", under="ignore"):  # extreme ratios: inf or 0, which never fit
            h, w = np.rint(np.sqrt(area * aspect)), np.rint(np.sqrt(area / aspect))
        fits = (h >= 1) & (w >= 1) & (h < height) & (w < width)
        h, w = np.where(fits, h, 0).astype(np.int64), np.where(fits, w, 0).astype(np.int64)  # no cast of inf
        first = fits.argmax(axis=1)  # the first draw that fits (0 if none does: masked out below)
        rows = np.arange(n)
        keep = erase & fits[rows, first]
        h, w = np.where(keep, h[rows, first], 0), np.where(keep, w[rows, first], 0)
        top = (rng.random(n) * (height - h + 1)).astype(np.int64)
        left = (rng.random(n) * (width - w + 1)).astype(np.int64)
        return top, left, h, w

    def __call__(self, x, rng):
        _check_batch(x, "RandomErasing")
        xp = get_array_module(x)
        n, _, height, width = x.shape
        if xp.dtype(x.dtype).kind == "f" and abs(self.value) > float(np.finfo(x.dtype).max):
            raise ArgumentError(f"RandomErasing value: {self.value!r} is not finite in a {x.dtype} batch "
                                f"(largest {np.finfo(x.dtype).max})")  # it would erase with inf
        top, left, h, w = (xp.asarray(a)[:, None] for a in self.boxes(n, height, width, rng))
        rows, cols = xp.arange(height)[None, :], xp.arange(width)[None, :]
        inside = (((rows >= top) & (rows < top + h))[:, :, None]
                  & ((cols >= left) & (cols < left + w))[:, None, :])      # (N, H, W)
        return xp.where(inside[:, None], xp.asarray(self.value, dtype=x.dtype), x)

    def __repr__(self):
        return f"RandomErasing(p={self.p}, scale={self.scale}, ratio={self.ratio}, value={self.value})"


class Normalize:
    """(x - mean[c]) / std[c] per channel; deterministic (the rng is ignored)."""

    def __init__(self, mean, std):
        mean, std = np.atleast_1d(np.asarray(mean, np.float64)), np.atleast_1d(np.asarray(std, np.float64))
        if mean.ndim != 1 or mean.shape != std.shape:
            raise ArgumentError(f"Normalize: mean and std must be two sequences of the same length, got "
                                f"{mean.tolist()} and {std.tolist()}")
        if not (np.isfinite(std).all() and (std > 0).all() and np.isfinite(mean).all()):
            raise ArgumentError(f"Normalize std: expected finite numbers > 0, got {std.tolist()}")
        self.mean, self.std = tuple(mean.tolist()), tuple(std.tolist())

    def __call__(self, x, rng=None):
        _check_batch(x, "Normalize")
        if x.shape[1] != len(self.mean) and len(self.mean) != 1:
            raise ShapeError(f"Normalize: {len(self.mean)} channel means for a batch of {x.shape[1]} channels")
        xp = get_array_module(x)
        mean = xp.asarray(self.mean, dtype=x.dtype)[None, :, None, None]
        scale = xp.asarray([1.0 / s for s in self.std], dtype=x.dtype)[None, :, None, None]
        return (x - mean) * scale

    def __repr__(self):
        return f"Normalize(mean={self.mean}, std={self.std})"


class Compose:
    """Apply transforms in order, all drawing from the same generator."""

    def __init__(self, transforms):
        self.transforms = list(transforms)
        for t in self.transforms:
            if not callable(t):
                raise ArgumentError(f"Compose: every transform must be callable, got {t!r}")

    def __call__(self, x, rng=None):
        rng = _as_rng(rng)
        for t in self.transforms:
            x = t(x, rng)
        return x

    def __repr__(self):
        return "Compose([" + ", ".join(map(repr, self.transforms)) + "])"
