"""`python -m gpuconv bench`: time every LeNet-5 op, the training step and inference of the zoo's
models and the conv ops at the shapes CNNs meet, on each device (and in PyTorch), from the command
line or from Python:

    from gpuconv import bench
    results = bench.run(devices=["cpu", "cuda"], batch_sizes=[64, 128], compare_torch=True)
    results = bench.run(devices=["cpu"], batch_sizes=[128], models=["resnet20"], conv_ops=True,
                        memory=True, compare_torch=True)
    print(bench.format_table(results))
"""
import argparse
import shlex
import sys

from ..data.registry import DATASETS
from ..models import MODELS
from ..ops.conv import ALGOS
from ..show import require_matplotlib
from .report import format_table, machine_line, plot_results, write_json
from .runner import DEFINITIONS, SCHEMA, run
from ..cli import HelpFormatter

__all__ = ["run", "format_table", "write_json", "plot_results", "machine_line", "main", "SCHEMA",
           "DEFINITIONS"]


def _int_list(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints like 64,128,256, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints >= 1, got {text!r}")
    return values


def _name_list(text):
    return [v.strip() for v in text.split(",") if v.strip()]


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m gpuconv bench", formatter_class=HelpFormatter,
        description="Time the training step and inference of LeNet-5 (or of the zoo's models, --model), "
                    "LeNet-5's ops (--ops) and the conv ops at the shapes CNNs meet (--conv-ops) on each device, "
                    "optionally beside PyTorch. Medians over --repeat calls after --warmup calls; the first call "
                    "(which compiles the kernels on a GPU) is reported apart.")
    parser.add_argument("--devices", type=_name_list, default=["cpu", "cuda"],
                        help="comma-separated devices (default cpu,cuda; an unavailable one is skipped "
                             "with the reason, and if none can run the command exits 1)")
    parser.add_argument("--batch-sizes", type=_int_list, default=[64, 128, 256],
                        help="training batch sizes (default 64,128,256)")
    parser.add_argument("--inference-batch-sizes", type=_int_list, default=None,
                        help="inference batch sizes (default: the training ones)")
    parser.add_argument("--ops", action="store_true",
                        help="also time every layer op (conv forward/backward-data/backward-filter, relu, "
                             "pool, linear, loss) at its real LeNet-5 shape")
    parser.add_argument("--model", "--models", dest="models", type=_name_list, default=["lenet5"],
                        help=f"comma-separated models whose training step and inference are timed, from "
                             f"{', '.join(MODELS)}, or 'none' for op rows alone (default lenet5)")
    parser.add_argument("--dataset", choices=list(DATASETS), default=None,
                        help="the input shape (and classes) the models run on; no data is read (default: each "
                             "model's own: mnist for lenet5, fashion-mnist for simplecnn, cifar10 for the ResNets)")
    parser.add_argument("--conv-ops", action="store_true",
                        help="also time the conv ops (forward, backward-data, backward-filter) at LeNet-5's and "
                             "ResNet-20's conv shapes, at each training batch size; with --compare-torch the "
                             "table gives the geometric mean of the ratios")
    parser.add_argument("--memory", action="store_true",
                        help="also measure each model's training-step peak memory on the CPU, gpuconv (its "
                             "executor's worker processes included) and PyTorch, each in a fresh process")
    parser.add_argument("--memory-steps", type=int, default=3,
                        help="training steps each --memory process runs (default 3)")
    parser.add_argument("--algos", type=_name_list, default=["direct", "im2col"],
                        help=f"CUDA conv algorithms to compare, from {', '.join(ALGOS)} (default "
                             "direct,im2col; the CPU has one)")
    parser.add_argument("--repeat", type=int, default=10, help="measured calls per row (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured calls after the first (default 2)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="run every row this many times, gpuconv first and PyTorch first in turn, and pool "
                             "the calls, so drift during the run favours neither (default 2)")
    parser.add_argument("--peak-size", type=int, default=2048,
                        help="side of the float32 GEMM that measures each device's peak (default 2048; 0 skips)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for NumPy's BLAS, PyTorch and gpuconv's CPU executor alike "
                             "(default: NumPy's BLAS as it is, PyTorch and the executor set to match; "
                             "overrides GPUCONV_CPU_WORKERS for the run)")
    parser.add_argument("--eager", action="store_true",
                        help="run gpuconv's train_step and inference rows on the uncompiled model, eagerly op "
                             "by op (the reference path), instead of gpuconv.compile(model) as "
                             "`python -m gpuconv train` does")
    parser.add_argument("--compare-torch", action="store_true",
                        help="time the same rows in PyTorch (the same architectures, with gpuconv's weights), "
                             "same device and thread count")
    parser.add_argument("--json", metavar="PATH", help="write every figure and the machine to PATH")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG bar chart (needs 'gpuconv[plot]')")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.plot:
        require_matplotlib()  # before measuring: a missing extra should not cost a whole run
    results = run(devices=args.devices, batch_sizes=args.batch_sizes,
                  inference_batch_sizes=args.inference_batch_sizes, ops=args.ops, algos=args.algos,
                  repeat=args.repeat, warmup=args.warmup, rounds=args.rounds, compare_torch=args.compare_torch,
                  peak_size=args.peak_size, threads=args.threads, progress=False if args.no_progress else None,
                  compiled=not args.eager, command=shlex.join(["python", "-m", "gpuconv", "bench"] + argv),
                  models=args.models, dataset=args.dataset, conv_ops=args.conv_ops, memory=args.memory,
                  memory_steps=args.memory_steps)
    print(format_table(results))
    if args.json:
        write_json(results, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        plot_results(results, args.plot)
        print(f"wrote {args.plot}")
    return 1 if results["failures"] else 0
