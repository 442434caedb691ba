"""The datasets `python -m gpuconv train --dataset NAME` knows, and what training needs to know of each
without loading it: input shape, classes, normalisation and the augmentation that suits it."""
import dataclasses

from .cifar import CIFAR10
from .fashion import FashionMNIST
from .mnist import MNIST
from .transforms import Compose, Normalize, RandomCrop, RandomErasing, RandomHorizontalFlip
from ..errors import ArgumentError


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    name: str            # the command-line name
    title: str           # for people
    cls: type            # cls(split, data_dir=None, limit=None) -> dataset with .images, .labels, .classes
    in_channels: int
    image_size: int
    augment: bool        # --augment's default for this dataset
    crop_padding: int    # RandomCrop(image_size, crop_padding) when augmenting
    flip: bool           # RandomHorizontalFlip when augmenting (not for digits: a mirrored 2 is no 2)
    random_erasing: float = 0.0  # --random-erasing's default: RandomErasing(p) after Normalize when augmenting

    @property
    def mean(self):
        return self.cls.mean

    @property
    def std(self):
        return self.cls.std

    def eval_transform(self):
        """What every image goes through before the model, in training and evaluation alike."""
        return None if self.mean is None else Normalize(self.mean, self.std)

    def train_transform(self, augment, crop_padding=None, random_erasing=None):
        """The training batches' transform: (crop, flip if they suit the data, then) normalisation
        (then random erasing, whose value 0 is then the mean). crop_padding and random_erasing: None
        for this dataset's default, 0 for none."""
        steps = []
        crop_padding = self.crop_padding if crop_padding is None else crop_padding
        random_erasing = self.random_erasing if random_erasing is None else random_erasing
        if augment:
            if crop_padding:
                steps.append(RandomCrop(self.image_size, crop_padding))
            if self.flip:
                steps.append(RandomHorizontalFlip())
        if self.mean is not None:
            steps.append(Normalize(self.mean, self.std))
        if augment and random_erasing:
            steps.append(RandomErasing(random_erasing))
        return Compose(steps) if steps else None


DATASETS = {
    "mnist": DatasetInfo("mnist", "MNIST", MNIST, 1, 28, augment=False, crop_padding=2, flip=False),
    "fashion-mnist": DatasetInfo("fashion-mnist", "Fashion-MNIST", FashionMNIST, 1, 28, augment=True,
                                 crop_padding=2, flip=True),
    "cifar10": DatasetInfo("cifar10", "CIFAR-10", CIFAR10, 3, 32, augment=True, crop_padding=4, flip=True),
}


def dataset_info(name):
    if name not in DATASETS:
        raise ArgumentError(f"dataset: expected one of {', '.join(DATASETS)}, got {name!r}")
    return DATASETS[name]
