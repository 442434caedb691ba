"""`python -m gpuconv COMMAND`: train, bench, bench-report, show, check-kernels, kernel-plan, gpu-check, mutants,
summary."""
import importlib
import os
import sys

from .errors import GpuconvError

COMMANDS = {
    "train": ("gpuconv.train", "train a model (LeNet-5, SimpleCNN, ResNet-20, ...) on MNIST, Fashion-MNIST or CIFAR-10"),
    "bench": ("gpuconv.bench", "time every op and the training step on each device (and PyTorch)"),
    "bench-report": ("gpuconv.bench.series", "one Markdown table (medians, min-max) from a series of bench --json files"),
    "show": ("gpuconv.show", "draw filters, feature maps, training curves and a confusion matrix"),
    "check-kernels": ("gpuconv.cuda.tools.check", "compile every CUDA kernel with NVRTC for every arch"),
    "kernel-plan": ("gpuconv.cuda.tools.plan", "LeNet-5's CUDA launches, FLOPs, bytes and resources on paper"),
    "gpu-check": ("gpuconv.cuda.tools.gpu_check", "on a GPU: the likeliest failures first, then tests, bench "
                  "and one LeNet-5 epoch, in one table"),
    "mutants": ("gpuconv.cuda.tools.mutants", "mutation testing of kernels/*.cu: plant slips, run the emulated "
                "tests, print the score and every survivor"),
    "summary": ("gpuconv.summary_cli", "print a model's layers, parameter counts and FLOPs"),
}

# The exit status of a command whose reader went away (`... | head -1`): 128 + SIGPIPE, what a
# shell reports for a program the signal ended, which is how a C program would have ended.
BROKEN_PIPE_STATUS = 141


def usage():
    lines = ["usage: python -m gpuconv COMMAND [options]", "       python -m gpuconv --version", "",
             "commands:"]
    lines += [f"  {name:<15}{text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "python -m gpuconv COMMAND --help for each command's options"]
    return "\n".join(lines)


def version_line():
    from . import __version__, version_source
    return f"gpuconv {__version__} ({version_source()})"


def run(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(version_line())
        return 0
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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        code = run(argv)
        sys.stdout.flush()  # a closed pipe shows here, inside the try, not at interpreter exit
        return code
    except BrokenPipeError:
        # The reader of our stdout is gone (`| head -1`): that ends the command, quietly. As the
        # Python docs on SIGPIPE advise, point stdout at /dev/null so that the interpreter's final
        # flush of what is still buffered cannot raise a second BrokenPipeError at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return BROKEN_PIPE_STATUS


if __name__ == "__main__":
    sys.exit(main())
