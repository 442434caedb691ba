"""`python -m gpuconv kernel-plan`: LeNet-5's GPU work on paper, for machines without a GPU.

For every conv and pool call of a LeNet-5 training step it runs the real launch code
(ops/conv_cuda.py, pool_cuda.py) with a recorder in place of the kernel launch, so the table
shows exactly the kernels, grids and blocks a GPU would get. Beside them: FLOPs, the bytes each call
must move through DRAM at least, the kernels' registers and shared memory from NVRTC (check.py), and
a roofline lower bound on time from an H100 SXM's datasheet figures. Paper, not measurement: the
bound says how fast a call could be, never how fast it is. Each direct conv launch also shows the tile
conv_cuda.tile_config chose for it, the fraction of its multiply-adds that are useful (the rest fall
on the tile's padding channels and pixels) and its shared-memory loads per multiply-add.
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
        launches.append(dict(kernel=kernel, grid=tuple(grid), block=tuple(block), shared_mem=shared_mem,
                             tile=direct_tile(kernel, block, args)))

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


DIRECT_KERNELS = ("conv2d_forward_direct", "conv2d_backward_data_direct")


def direct_tile(kernel, block, args):
    """For a direct conv launch, {"tile": "narrow 8ch x 128px", "useful": useful / issued multiply-adds,
    "loads_per_fma": shared-memory loads per issued multiply-add}; None for any other kernel.
    Issued multiply-adds count the tile's padding channels and pixels (and, were there any, rows)."""
    if kernel not in DIRECT_KERNELS:
        return None
    n, c, h, w, k, kh, kw, oh, ow = (int(a) for a in args[-18:-9]) if kernel == DIRECT_KERNELS[0] else (
        int(a) for a in args[-16:-7])
    groups = int(args[-3] if kernel == DIRECT_KERNELS[0] else args[-1])
    forward = kernel == DIRECT_KERNELS[0]
    channels, pixels = (k // groups, oh * ow) if forward else (c // groups, h * w)
    per_pixel, per_channel = conv_cuda.PIXELS_PER_THREAD, conv_cuda.CHANNELS_PER_THREAD
    tile = next(t for _, t in conv_cuda._TILES if t.block == tuple(block))
    return dict(tile=repr(tile), useful=tile.useful_fraction(pixels, channels),
                loads_per_fma=(per_pixel + per_channel) / (per_pixel * per_channel))


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


def direct_tile_rows(batch=128):
    """The direct kernels' tiles for LeNet-5's convs, forward and backward-data, at `batch`: what the
    launchers pick with algo='direct' (auto runs conv2 as im2col and needs no dx of conv1; the rows
    say whether auto runs each). A list of dicts: call, tile, useful, loads_per_fma, auto."""
    rows = []
    for name, kind, x_chw, shape, stride, padding, need_dx in LENET_CALLS:
        if kind != "conv":
            continue
        x = np.zeros((batch,) + x_chw, np.float32)
        w = np.zeros(shape, np.float32)
        oh, ow = (conv_output_size(s, shape[2], stride, padding) for s in x_chw[1:])
        dy = np.zeros((batch, shape[0], oh, ow), np.float32)
        args = ((stride, stride), (padding, padding), (1, 1), 1, "direct")
        auto = conv_cuda.choose_algo(x.shape, w.shape, 1) == "direct"
        with recorded_launches() as forward:
            conv_cuda.conv2d_forward(x, w, None, *args)
        with recorded_launches() as backward:
            conv_cuda.conv2d_backward(dy, x, w, *args, need_dx=True, need_bias=False, need_dw=False)
        for label, launches, used in (("forward", forward, auto), ("backward-data", backward, auto and need_dx)):
            (launch,) = [l for l in launches if l["tile"]]
            rows.append(dict(call=f"{name} {label}", auto=used, **launch["tile"]))
    return rows


def format_direct_tiles(rows):
    lines = [f"{'call':22s} {'tile (channels x pixels)':26s} {'useful MACs':>11s} {'shared loads/MAC':>16s}  run by auto"]
    for row in rows:
        lines.append(f"{row['call']:22s} {row['tile']:26s} {100 * row['useful']:10.1f}% "
                     f"{row['loads_per_fma'] / row['useful']:16.2f}  {'yes' if row['auto'] else 'no'}")
    return "\n".join(lines)


def _pool_rows(name, batch, x_chw, kernel, stride, padding, itemsize):
    x = np.zeros((batch,) + x_chw, np.float32)
    oh, ow = (conv_output_size(s, kernel, stride, padding) for s in x_chw[1:])
    y_elems = batch * x_chw[0] * oh * ow
    args = ((kernel, kernel), (stride, stride), (padding, padding), 0.0, True)
    with recorded_launches() as forward:
        _, indices = pool_cuda.pool2d_forward("max", x, *args, return_indices=True)
    with recorded_launches() as backward:
        pool_cuda.pool2d_backward("max", np.zeros((batch, x_chw[0], oh, ow), np.float32), x, *args,
                                  saved=indices)
    compares = y_elems * kernel * kernel
    # the forward writes y and the int32 argmax; the backward reads dy and the argmax, writes dx
    return [dict(call=f"{name} max forward", algo="-", launches=forward, flops=compares,
                 bytes=(x.size + y_elems) * itemsize + y_elems * 4),
            dict(call=f"{name} max backward", algo="-", launches=backward, flops=y_elems,
                 bytes=(x.size + y_elems) * itemsize + y_elems * 4)]


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
            tile = launch.get("tile")
            tile_text = (f" {{{tile['tile']}: {100 * tile['useful']:.0f}% of multiply-adds useful, "
                         f"{tile['loads_per_fma']:.2f} shared loads each}}") if tile else ""
            described.append(f"{launch['kernel']} {blocks}x{threads}{resource_text}{tile_text}")
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


# ---------------------------------------------------------------------------------------------------
# Every launch of one training step

# What each of gpuconv's kernels computes, in FLOPs (a multiply-add counts 2), from its int arguments
# (the useful work: the zero padding of a tile is not counted).
def _conv_macs(a):
    n, c, _, _, k, kh, kw, oh, ow, *_rest, groups = a[:16]
    return n * k * oh * ow * (c // groups) * kh * kw


def _pool_compares(a):
    planes, _, _, oh, ow, kh, kw = a[:7]
    return planes * oh * ow * kh * kw


KERNEL_FLOPS = {
    "conv2d_forward_direct": lambda a: 2 * _conv_macs(a),
    "conv2d_forward_direct_relu": lambda a: 2 * _conv_macs(a),
    "conv2d_backward_data_direct": lambda a: 2 * _conv_macs(a),
    "conv2d_backward_filter_partial": lambda a: 2 * _conv_macs(a),
    "conv2d_backward_bias_partial": lambda a: a[0] * a[1] * a[2],
    "reduce_slices": lambda a: a[1] * a[2],
    "im2col_output": lambda a: 2 * a[0] * a[1] * a[2],
    "bias_act": lambda a: 2 * a[0],
    "relu_backward": lambda a: a[0],
    "sgd_update": lambda a: 6 * a[0],
    "adam_update": lambda a: 12 * a[0],
    "col2im": lambda a: a[0] * a[1] * a[4] * a[5] * a[6] * a[7],
    "max_pool2d_forward": _pool_compares,
    "max_pool2d_backward": lambda a: a[0] * a[3] * a[4],
}


def _launch_cost(kernel_name, args):
    """(FLOPs, bytes) of one of gpuconv's launches: its arrays read or written once each."""
    arrays = [a for a in args if isinstance(a, np.ndarray) and a.ndim > 0]
    ints = [int(a) for a in args if isinstance(a, (np.integer, int))]
    base = kernel_name.split("<")[0]
    flops = KERNEL_FLOPS.get(base, lambda a: 0)(ints) if ints else 0
    return flops, sum(a.nbytes for a in arrays)


def step_launches(batch=128, optimizer="sgd", model="lenet5"):
    """Every launch of one LeNet-5 training step (the second one: state exists) at `batch`, run
    through kernel emulation on a pretend GPU: a list of dicts (what, kind, flops, bytes, source).

    kind: "own" (kernels/*.cu), "cublas" (a GEMM), "cupy" (what CuPy runs as its own kernel: an
    elementwise op, a reduction, a copy, a fill). The arithmetic is real (small enough to emulate),
    so the launches are exactly those the code issues, in order."""
    from ... import functional as F
    from ...backend import to_device
    from ...train import build_optimizer
    from .. import emulated_devices, emulation
    from ...models import LeNet5

    rng = np.random.default_rng(0)
    images = rng.random((batch, 1, 28, 28), dtype=np.float32)
    labels = np.arange(batch) % 10
    own = []
    from ...ops import elementwise_cuda
    from .. import runtime
    # every module that launches gpuconv's kernels (optim.py imports runtime.launch at the call)
    real = {m: m.launch for m in (conv_cuda, pool_cuda, elementwise_cuda, runtime)}

    def recorder(module):
        def launch(kernel, grid, block, args, shared_mem=0, op_name="kernel", shapes=None):
            name = getattr(kernel, "name", str(kernel)).split("<")[0]
            own.append((name, tuple(grid), tuple(block)) + _launch_cost(name, args))
            return real[module](kernel, grid, block, args, shared_mem=shared_mem, op_name=op_name, shapes=shapes)
        return launch

    with emulation(devices=1):
        net = LeNet5(seed=0).to("cuda:0")
        opt = build_optimizer(optimizer, net.parameters(), 0.05, 0.9, 5e-4)
        x, y = to_device(images, "cuda:0"), to_device(labels, "cuda:0")

        def step():
            with emulated_devices.EmulatedDevice(0):
                loss = F.cross_entropy(net(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()

        step()
        try:
            for module in real:
                module.launch = recorder(module)
            with emulated_devices.recording() as events, np.errstate(all="ignore"):
                step()
        finally:
            for module, launch in real.items():
                module.launch = launch
    rows, own = [], iter(own)
    for event in events:
        if event.kind == "launch" and event.what == "gemm":
            rows.append(dict(what="cuBLAS GEMM", kind="cublas", flops=event.flops, bytes=event.nbytes))
        elif event.kind == "launch":
            name, grid, block, flops, nbytes = next(own)
            blocks, threads = int(np.prod(grid)), int(np.prod(block))
            rows.append(dict(what=f"{name} {blocks}x{threads}", kind="own", flops=flops, bytes=nbytes))
        elif event.kind == "op":
            kind = "cublas" if event.what == "matmul" else "cupy"
            what = "cuBLAS GEMM (matmul)" if kind == "cublas" else f"CuPy {event.what}"
            rows.append(dict(what=what, kind=kind, flops=event.flops, bytes=event.nbytes))
    for row in rows:
        row["bound_us"] = max(row["flops"] / PEAK_FLOPS, row["bytes"] / PEAK_BYTES_PER_S) * 1e6
    allocations = [e for e in events if e.kind == "alloc"]
    step_launches.last_memory = dict(allocations=len(allocations), bytes=sum(e.nbytes for e in allocations),
                                     reads=sum(e.kind == "read" for e in events))
    return rows


step_launches.last_memory = None  # what the last call saw: allocations and host reads of the step


def format_step(rows, memory=None):
    lines = [f"{'#':>4}  {'launch':44s} {'kind':6s} {'MFLOP':>9s} {'MB':>8s} {'bound (H100, us)':>16s}"]
    for index, row in enumerate(rows, 1):
        lines.append(f"{index:>4}  {row['what'][:44]:44s} {row['kind']:6s} {row['flops'] / 1e6:9.3f} "
                     f"{row['bytes'] / 1e6:8.3f} {row['bound_us']:16.2f}")
    kinds = {k: sum(r["kind"] == k for r in rows) for k in ("own", "cublas", "cupy")}
    bound = sum(r["bound_us"] for r in rows)
    lines.append(f"total: {len(rows)} launches per step ({kinds['own']} own kernels, {kinds['cublas']} cuBLAS, "
                 f"{kinds['cupy']} CuPy), sum of bounds {bound:.1f} us; at ~3 us of launch overhead each "
                 f"the launches alone take ~{3 * len(rows)} us")
    if memory:
        lines.append(f"the step also makes {memory['allocations']} allocations ({memory['bytes'] / 1e6:.1f} MB; "
                     f"from CuPy's pool on a GPU) and {memory['reads']} blocking reads back to the host")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m gpuconv kernel-plan", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd",
                        help="the optimizer of the step listed launch by launch (as train builds it)")
    parser.add_argument("--no-step", action="store_true",
                        help="leave out the launch-by-launch list of a whole training step (it runs the "
                             "step through kernel emulation: a few seconds at batch 128)")
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
    print(f"\nThe direct kernels' tiles (conv_cuda.tile_config) for LeNet-5's convs at batch {args.batch_size}, "
          "algo='direct'; useful MACs: useful / issued multiply-adds (issued ones include the tile's "
          "padding channels and pixels); shared loads per useful multiply-add.\n")
    print(format_direct_tiles(direct_tile_rows(args.batch_size)))
    if not args.no_step:
        print(f"\nEvery launch of one LeNet-5 training step at batch {args.batch_size} ({args.optimizer}, as "
              "`train` runs it), recorded by running the step through kernel emulation; 'cupy' rows are what "
              "CuPy launches as kernels of their own (elementwise, reductions, copies, fills); bytes are "
              "the arrays each launch reads and writes once.\n")
        rows = step_launches(args.batch_size, args.optimizer)
        print(format_step(rows, step_launches.last_memory))
    return 0
