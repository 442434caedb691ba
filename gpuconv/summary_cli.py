"""`python -m gpuconv summary`: a model's layers, output shapes, parameters and FLOPs.

    python -m gpuconv summary                                   # LeNet-5 on MNIST's 1x28x28
    python -m gpuconv summary --model resnet20 --dataset cifar10   # ResNet-20 on 3x32x32, one row per block
    python -m gpuconv summary --model simplecnn --widths 48,96,192 # a wider SimpleCNN
"""
import argparse

from .data.registry import DATASETS, dataset_info
from .errors import ArgumentError
from .models import MODELS, build_model
from .cli import HelpFormatter, parse_widths


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m gpuconv summary", formatter_class=HelpFormatter)
    p.add_argument("--model", choices=list(MODELS), default="lenet5")
    p.add_argument("--dataset", choices=list(DATASETS), default="mnist",
                   help="sets the input shape and the number of classes (no data is read)")
    p.add_argument("--activation", default="relu", choices=["relu", "tanh", "sigmoid"], help="LeNet-5 only")
    p.add_argument("--pool", default="max", choices=["max", "avg"], help="LeNet-5 only")
    p.add_argument("--widths", type=parse_widths, default=None, metavar="W1,W2,...",
                   help="SimpleCNN only: the channels of its conv blocks (default 32,64,128)")
    args = p.parse_args(argv)
    if args.widths is not None and args.model != "simplecnn":
        raise ArgumentError(f"--widths: sets SimpleCNN's block widths, and --model is {args.model}; drop --widths")
    if args.model != "lenet5" and (args.activation, args.pool) != ("relu", "max"):
        raise ArgumentError(f"--activation, --pool: choose LeNet-5's, and --model is {args.model}, whose layers are "
                            f"fixed; got --activation {args.activation} --pool {args.pool}: drop them")
    info = dataset_info(args.dataset)
    model = build_model(args.model, info.in_channels, len(info.cls.classes), info.image_size,
                        activation=args.activation, pool=args.pool, widths=args.widths)
    model.summary((1, info.in_channels, info.image_size, info.image_size))
    return 0
