"""Could a compiled direct convolution, written here with Numba, reach PyTorch's (oneDNN's) speed at
issue 20's 3x3 shapes? Three forward kernels, each split over two threads by image (nogil), against
torch.nn.functional.conv2d on 2 threads, batch 128, stride 1, padding 1:

- rows: NCHW, every output row the sum of shifted input rows (two output channels per pass);
- flat: NCHW with each image's padded planes flat, so a row of the output runs on into the next and
  the vectors stay long on an 8x8 map (four output channels per pass, two junk columns per row);
- blocked: NHWC, 16 output channels x PB pixels held in scalar accumulators (source generated), in
  the hope that LLVM packs them into vector registers the way oneDNN's JIT does.

Medians of 15 after 1, three rounds. Numba is not a dependency of gpuconv; install it beside
PyTorch to run this from the repository root:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE PYTHONPATH=. python docs/experiments/conv_numba_direct.py
"""
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch
from timing import median_ms


@numba.njit(nogil=True, fastmath=True, boundscheck=False)
def rows_kernel(padded, w, out, first, stop):
    channels, height, width = padded.shape[1], out.shape[2], out.shape[3]
    for n in range(first, stop):
        for co in range(0, w.shape[0], 2):
            o0, o1 = out[n, co], out[n, co + 1]
            o0[:] = 0
            o1[:] = 0
            for ci in range(channels):
                plane, a, b = padded[n, ci], w[co, ci], w[co + 1, ci]
                # the weights in scalars: indexing w inside the loop kept LLVM from vectorizing it
                a00, a01, a02, a10, a11, a12, a20, a21, a22 = (a[0, 0], a[0, 1], a[0, 2], a[1, 0], a[1, 1],
                                                               a[1, 2], a[2, 0], a[2, 1], a[2, 2])
                b00, b01, b02, b10, b11, b12, b20, b21, b22 = (b[0, 0], b[0, 1], b[0, 2], b[1, 0], b[1, 1],
                                                               b[1, 2], b[2, 0], b[2, 1], b[2, 2])
                for y in range(height):
                    r0, r1, r2, q0, q1 = plane[y], plane[y + 1], plane[y + 2], o0[y], o1[y]
                    for x in range(width):
                        u0, u1, u2 = r0[x], r0[x + 1], r0[x + 2]
                        v0, v1, v2 = r1[x], r1[x + 1], r1[x + 2]
                        t0, t1, t2 = r2[x], r2[x + 1], r2[x + 2]
                        q0[x] += a00 * u0 + a01 * u1 + a02 * u2 + a10 * v0 + a11 * v1 + a12 * v2 + a20 * t0 + a21 * t1 + a22 * t2
                        q1[x] += b00 * u0 + b01 * u1 + b02 * u2 + b10 * v0 + b11 * v1 + b12 * v2 + b20 * t0 + b21 * t1 + b22 * t2


@numba.njit(nogil=True, fastmath=True, boundscheck=False)
def flat_kernel(flat, w, out, padded_width, first, stop):
    channels, length = flat.shape[1], out.shape[2]
    for n in range(first, stop):
        for co in range(0, w.shape[0], 4):
            o0, o1, o2, o3 = out[n, co], out[n, co + 1], out[n, co + 2], out[n, co + 3]
            o0[:] = 0
            o1[:] = 0
            o2[:] = 0
            o3[:] = 0
            for ci in range(channels):
                a, b, c, d = w[co, ci], w[co + 1, ci], w[co + 2, ci], w[co + 3, ci]
                for ky in range(3):
                    r = flat[n, ci, ky * padded_width: ky * padded_width + length + 2]
                    for i in range(length):
                        u0, u1, u2 = r[i], r[i + 1], r[i + 2]
                        o0[i] += a[ky, 0] * u0 + a[ky, 1] * u1 + a[ky, 2] * u2
                        o1[i] += b[ky, 0] * u0 + b[ky, 1] * u1 + b[ky, 2] * u2
                        o2[i] += c[ky, 0] * u0 + c[ky, 1] * u1 + c[ky, 2] * u2
                        o3[i] += d[ky, 0] * u0 + d[ky, 1] * u1 + d[ky, 2] * u2


def blocked_kernel(pixels=4, lanes=16):
    """NHWC; `lanes` output channels x `pixels` output pixels in scalar accumulators."""
    acc = [[f"a{j}_{c}" for c in range(lanes)] for j in range(pixels)]
    lines = ["def kernel(padded, w, out, block, first, stop):",
             "    height, width, channels = out.shape[1], out.shape[2], padded.shape[3]",
             "    for n in range(first, stop):",
             "     for y in range(height):",
             f"      for x0 in range(0, width, {pixels}):"]
    lines += ["        " + "; ".join(f"{a} = np.float32(0)" for a in row) for row in acc]
    lines += ["        for ky in range(3):", "         for kx in range(3):", "          for ci in range(channels):",
              "            " + "; ".join(f"w{c} = w[ky, kx, ci, block + {c}]" for c in range(lanes))]
    for j, row in enumerate(acc):
        lines += [f"            s = padded[n, y + ky, x0 + {j} + kx, ci]",
                  "            " + "; ".join(f"{a} += s * w{c}" for c, a in enumerate(row))]
    lines += ["        " + "; ".join(f"out[n, y, x0 + {j}, block + {c}] = {a}" for c, a in enumerate(row))
              for j, row in enumerate(acc)]
    scope = {"np": np}
    exec("\n".join(lines), scope)
    return numba.njit(nogil=True, fastmath=True, boundscheck=False)(scope["kernel"])


def main(batch=128, rounds=3):
    torch.set_num_threads(2)
    pool = ThreadPoolExecutor(2)
    blocked = blocked_kernel()
    rng = np.random.default_rng(0)

    def halves(kernel, *args):
        half = batch // 2
        for future in [pool.submit(kernel, *args, 0, half), pool.submit(kernel, *args, half, batch)]:
            future.result()

    for channels, side in [(16, 32), (32, 16), (64, 8)]:
        x = rng.standard_normal((batch, channels, side, side), dtype=np.float32)
        w = rng.standard_normal((channels, channels, 3, 3), dtype=np.float32)
        tx, tw = torch.from_numpy(x), torch.from_numpy(w)
        reference = torch.nn.functional.conv2d(tx, tw, padding=1).numpy()
        wide = side + 2
        padded = np.zeros((batch, channels, wide, wide), np.float32)
        rows_out = np.empty_like(reference)
        flat = np.zeros((batch, channels, wide * wide + 2), np.float32)
        flat_view = flat[:, :, :wide * wide].reshape(batch, channels, wide, wide)
        flat_out = np.empty((batch, channels, side * wide), np.float32)
        nhwc = np.zeros((batch, wide, wide, channels), np.float32)
        nhwc_w = np.ascontiguousarray(w.transpose(2, 3, 1, 0))
        nhwc_out = np.empty((batch, side, side, channels), np.float32)

        def rows():
            padded[:, :, 1:-1, 1:-1] = x
            halves(rows_kernel, padded, w, rows_out)

        def flat_run():
            flat_view[:, :, 1:-1, 1:-1] = x
            halves(flat_kernel, flat, w, flat_out, wide)

        def blocked_run():
            nhwc[:, 1:-1, 1:-1, :] = x.transpose(0, 2, 3, 1)
            for block in range(0, channels, 16):
                halves(blocked, nhwc, nhwc_w, nhwc_out, block)

        def torch_run():
            with torch.no_grad():
                torch.nn.functional.conv2d(tx, tw, padding=1)

        runs = {"PyTorch": torch_run, "rows": rows, "flat": flat_run, "blocked": blocked_run}
        outputs = {"rows": lambda: rows_out, "flat": lambda: flat_out.reshape(batch, channels, side, wide)[..., :side],
                   "blocked": lambda: nhwc_out.transpose(0, 3, 1, 2)}
        times = {name: [] for name in runs}
        for _ in range(rounds):
            for name, run in runs.items():
                times[name].append(median_ms(run, repeat=15))
        gflop = 2 * batch * channels * channels * 9 * side * side / 1e9
        torch_ms = np.median(times["PyTorch"])
        print(f"c{channels}-{channels}@{side}: PyTorch {torch_ms:.2f} ms ({gflop / torch_ms * 1e3:.0f} GFLOP/s)")
        for name in ("rows", "flat", "blocked"):
            ms = np.median(times[name])
            error = np.abs(outputs[name]() - reference).max() / np.abs(reference).max()
            print(f"  {name:8s} {ms:7.2f} ms ({gflop / ms * 1e3:4.0f} GFLOP/s), PyTorch / it {torch_ms / ms:.2f}x,"
                  f" max error {error:.0e} of max |y|")


if __name__ == "__main__":
    main()
