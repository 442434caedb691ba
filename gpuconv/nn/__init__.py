"""Layers and containers with PyTorch's names: gpuconv.nn.Conv2d, MaxPool2d, Sequential, ..."""
from . import init
from .init import manual_seed
from .layers import (AvgPool2d, Conv2d, CrossEntropyLoss, Dropout, Flatten, Linear, LPPool2d, MaxPool2d,
                     ReLU, Sigmoid, Tanh)
from .module import Module, Parameter
from .sequential import Sequential

__all__ = ["AvgPool2d", "Conv2d", "CrossEntropyLoss", "Dropout", "Flatten", "Linear", "LPPool2d",
           "MaxPool2d", "Module", "Parameter", "ReLU", "Sequential", "Sigmoid", "Tanh", "init", "manual_seed"]
