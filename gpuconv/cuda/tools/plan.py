"""`python -m gpuconv kernel-plan`: LeNet-5's GPU work on paper, for machines without a GPU.

For every conv and pool call of a LeNet-5 training step it runs the real launch code
(ops/conv_cuda.py, pool_cuda.py) with a recorder in place of the kernel launch, so the table
shows exactly the kernels, grids and blocks a GPU would get. Beside them: FLOPs, the bytes each call
must move through DRAM at least, the kernels' registers and shared memory from NVRTC (check.py), and
a roofline lower bound on time from an H100 SXM's datasheet figures. Paper, not measurement: the
bound says how fast a call could be, never how fast it is.
"""
import argparse
import contextlib
import sys

import numpy as np

from ...cli import HelpFormatter
from ...errors import KernelError
from ...ops import conv_cuda, pool_cuda
from ...ops._args import conv_output_size

# NVIDIA H100 SXM datasheet: FP32 (non-tensor) and HBM3 bandwidth. A bound, not a measurement.
PEAK_FLOPS = 67e12
PEAK_BYTES_PER_S = 3.35e12

# (name, kind, input shape without batch, weight shape / pool kernel, stride, padding, need_dx)
LENET_CALLS = [
    ("conv1", "conv", (1, 28, 28), (6, 1, 5, 5), 1, 2, False),
    ("pool1", "pool", (6, 28, 28), 2, 2, 0, True),
    ("conv2", "conv", (6, 14, 14), (16, 6, 5, 5), 1, 0, True),
    ("pool2", "pool", (16, 10, 10), 2, 2, 0, True),
]


@contextlib.contextmanager
def recorded_launches():
    """Swap the launchers' get_kernel/launch for recorders; yields the list of launches."""
    launches = []

    def fake_get_kernel(source, kernel_name, dtype):
        return kernel_name

    def record(kernel, grid, block, args, shared_mem=0, op_name="kernel", shapes=None):
        launches.append(dict(kernel=kernel, grid=tuple(grid), block=tuple(block), shared_mem=shared_mem))

    saved = [(module, name, getattr(module, name)) for module in (conv_cuda, pool_cuda)
             for name in ("get_kernel", "launch")]
    try:
        for module in (conv_cuda, pool_cuda):
            module.get_kernel, module.launch = fake_get_kernel, record
        with np.errstate(all="ignore"):  # the im2col GEMM runs on never-filled column buffers
            yield launches
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _conv_rows(name, batch, x_chw, w_shape, stride, padding, need_dx, itemsize):
    x = np.zeros((batch,) + x_chw, np.float32)
    w = np.zeros(w_shape, np.float32)
    b = np.zeros(w_shape[0], np.float32)
    k, r = w_shape[0], int(np.prod(w_shape[1:]))
    oh, ow = (conv_output_size(s, w_shape[2], stride, padding) for s in x_chw[1:])
    y_elems, macs = batch * k * oh * ow, batch * k * oh * ow * r
    algo = conv_cuda.choose_algo(x.shape, w.shape, 1)
    col_bytes = r * batch * oh * ow * itemsize if algo == "im2col" else 0
    pair = lambda v: (v, v)  # noqa: E731
    rows = []
    with recorded_launches() as launches:
        conv_cuda.conv2d_forward(x, w, b, pair(stride), pair(padding), (1, 1), 1, "auto")
    rows.append(dict(call=f"{name} forward", algo=algo, launches=launches, flops=2 * macs + y_elems,
                     bytes=(x.size + w.size + b.size + y_elems) * itemsize + 2 * col_bytes))
    dy = np.zeros((batch, k, oh, ow), np.float32)
    with recorded_launches() as launches:
        conv_cuda.conv2d_backward(dy, x, w, pair(stride), pair(padding), (1, 1), 1, "auto", need_dx, True)
    flops = 2 * macs * (2 if need_dx else 1) + y_elems
    moved = (dy.size + x.size + w.size * 2 + b.size + (x.size if need_dx else 0)) * itemsize
    moved += 2 * col_bytes * (2 if need_dx else 1)  # columns for dw, and dcol for col2im
    label = "backward (data + filter + bias)" if need_dx else "backward (filter + bias; no dx)"
    rows.append(dict(call=f"{name} {label}", algo=algo, launches=launches, flops=flops, bytes=moved))
    return rows


def _pool_rows(name, batch, x_chw, kernel, stride, padding, itemsize):
    x = np.zeros((batch,) + x_chw, np.float32)
    oh, ow = (conv_output_size(s, kernel, stride, padding) for s in x_chw[1:])
    y_elems = batch * x_chw[0] * oh * ow
    args = ((kernel, kernel), (stride, stride), (padding, padding), 0.0, True)
    with recorded_launches() as forward:
        pool_cuda.pool2d_forward("max", x, *args)
    with recorded_launches() as backward:
        pool_cuda.pool2d_backward("max", np.zeros((batch, x_chw[0], oh, ow), np.float32), x, *args)
    compares = y_elems * kernel * kernel
    return [dict(call=f"{name} max forward", algo="-", launches=forward, flops=compares,
                 bytes=(x.size + y_elems) * itemsize),
            dict(call=f"{name} max backward", algo="-", launches=backward, flops=compares,
                 bytes=(2 * x.size + y_elems) * itemsize)]


def lenet_plan(batch=128, itemsize=4):
    rows = []
    for name, kind, x_chw, shape, stride, padding, need_dx in LENET_CALLS:
        if kind == "conv":
            rows += _conv_rows(name, batch, x_chw, shape, stride, padding, need_dx, itemsize)
        else:
            rows += _pool_rows(name, batch, x_chw, shape, stride, padding, itemsize)
    for row in rows:
        row["bound_us"] = max(row["flops"] / PEAK_FLOPS, row["bytes"] / PEAK_BYTES_PER_S) * 1e6
        row["bound"] = "memory" if row["bytes"] / PEAK_BYTES_PER_S > row["flops"] / PEAK_FLOPS else "compute"
    return rows


def format_plan(rows, resources, markdown=False):
    """resources: {(kernel, arch): row from check.kernel_rows} for float32."""
    header = ["call", "algo", "MFLOP", "MB moved", "FLOP/B", "bound (H100, us)", "kernel launches: "
              "name grid x block [regs sm_80/sm_90, smem B]"]
    lines = []
    for row in rows:
        described = []
        for launch in row["launches"]:
            blocks = int(np.prod(launch["grid"]))
            threads = int(np.prod(launch["block"]))
            regs = "/".join(str(resources.get((launch["kernel"], arch), {}).get("registers", "?"))
                            for arch in ("sm_80", "sm_90"))
            smem = resources.get((launch["kernel"], "sm_90"), {}).get("shared_bytes", "?")
            resource_text = f" [{regs}, {smem}]" if resources else ""  # none without CuPy's NVRTC
            described.append(f"{launch['kernel']} {blocks}x{threads}{resource_text}")
        if row["algo"] == "im2col":
            described.append("+ cuBLAS GEMM")
        lines.append([row["call"], row["algo"], f"{row['flops'] / 1e6:.1f}", f"{row['bytes'] / 1e6:.2f}",
                      f"{row['flops'] / row['bytes']:.1f}", f"{row['bound_us']:.1f} ({row['bound']})",
                      "; ".join(described)])
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])
    table = [header] + lines
    widths = [max(len(line[i]) for line in table) for i in range(len(header) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line[:-1], widths)) + "  " + line[-1] for line in table)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m gpuconv kernel-plan", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    from .check import kernel_rows
    try:
        resources = {(r["kernel"], r["arch"]): r for r in kernel_rows(archs=("80", "90"))
                     if r["dtype"] == "float32"}
    except KernelError as exc:  # no CuPy/NVRTC: the plan itself needs neither, only the resources do
        print(f"kernel-plan: registers and shared memory are left out: {exc}", file=sys.stderr)
        resources = {}
    print(f"LeNet-5 conv and pool calls at batch {args.batch_size}, float32. FLOPs count a multiply-add as 2; "
          "MB moved is the least DRAM traffic (inputs read once, outputs written once, plus the im2col "
          f"matrix written and read); bound = max(FLOPs / {PEAK_FLOPS / 1e12:.0f} TFLOP/s, bytes / "
          f"{PEAK_BYTES_PER_S / 1e12:.2f} TB/s).\n")
    print(format_plan(lenet_plan(args.batch_size), resources, markdown=args.markdown))
    return 0
