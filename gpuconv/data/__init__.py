"""Data: the IDX file format, MNIST, Fashion-MNIST and CIFAR-10 (found, verified, loaded), batch
transforms for augmentation, and a NumPy DataLoader."""
from .cifar import CIFAR10
from .fashion import FashionMNIST
from .idx import read_idx, write_idx
from .loader import ArrayDataset, DataLoader
from .mnist import MNIST, MnistArrays, load_mnist
from .transforms import Compose, Normalize, RandomCrop, RandomErasing, RandomHorizontalFlip

__all__ = ["read_idx", "write_idx", "ArrayDataset", "DataLoader", "MNIST", "MnistArrays", "load_mnist",
           "FashionMNIST", "CIFAR10", "Compose", "Normalize", "RandomCrop", "RandomErasing",
           "RandomHorizontalFlip"]
