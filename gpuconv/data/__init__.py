"""Data: the IDX file format, MNIST (found, verified, loaded), and a NumPy DataLoader."""
from .idx import read_idx, write_idx
from .loader import ArrayDataset, DataLoader
from .mnist import MNIST, MnistArrays, load_mnist

__all__ = ["read_idx", "write_idx", "ArrayDataset", "DataLoader", "MNIST", "MnistArrays", "load_mnist"]
