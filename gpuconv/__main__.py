"""`python -m gpuconv COMMAND`: train, bench, show, check-kernels, summary."""
import importlib
import sys

from .errors import GpuconvError

COMMANDS = {
    "train": ("gpuconv.train", "train a model (LeNet-5, SimpleCNN, ResNet-20, ...) on MNIST, Fashion-MNIST or CIFAR-10"),
    "bench": ("gpuconv.bench", "time every op and the training step on each device (and PyTorch)"),
    "show": ("gpuconv.show", "draw filters, feature maps, training curves and a confusion matrix"),
    "check-kernels": ("gpuconv.cuda.check", "compile every CUDA kernel with NVRTC for every arch"),
    "kernel-plan": ("gpuconv.cuda.plan", "LeNet-5's CUDA launches, FLOPs, bytes and resources on paper"),
    "summary": ("gpuconv.summary_cli", "print a model's layers, parameter counts and FLOPs"),
}


def usage():
    lines = ["usage: python -m gpuconv COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<15}{text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "python -m gpuconv COMMAND --help for each command's options"]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"gpuconv: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return module.main(rest) or 0
    except GpuconvError as exc:
        # Our own errors already say what went wrong and how to fix it: no traceback.
        print(f"gpuconv {command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
