"""`python -m gpuconv summary`: LeNet-5's layers, output shapes, parameters and FLOPs."""
import argparse

from .models import LeNet5
from .cli import HelpFormatter


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m gpuconv summary", formatter_class=HelpFormatter)
    p.add_argument("--activation", default="relu", choices=["relu", "tanh", "sigmoid"])
    p.add_argument("--pool", default="max", choices=["max", "avg"])
    args = p.parse_args(argv)
    LeNet5(activation=args.activation, pool=args.pool).summary((1, 1, 28, 28))
    return 0
