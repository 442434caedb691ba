"""Layers and containers with PyTorch's names: gpuconv.nn.Conv2d, BatchNorm2d, Sequential, ..."""
from . import init
from .init import manual_seed
from .layers import (AdaptiveAvgPool2d, AvgPool2d, BatchNorm2d, Conv2d, CrossEntropyLoss, Dropout, Flatten,
                     Identity, LeakyReLU, Linear, LPPool2d, MaxPool2d, ReLU, Sigmoid, Tanh)
from .module import Module, Parameter
from .sequential import Concat, ModuleList, Residual, Sequential

__all__ = ["AdaptiveAvgPool2d", "AvgPool2d", "BatchNorm2d", "Concat", "Conv2d", "CrossEntropyLoss", "Dropout", "Flatten",
           "Identity", "LeakyReLU", "Linear", "LPPool2d", "MaxPool2d", "Module", "ModuleList", "Parameter",
           "ReLU", "Residual", "Sequential", "Sigmoid", "Tanh", "init", "manual_seed"]
