"""A variant not kept: the array-level conv's filter gradient (gpuconv/ops/conv_cpu.py) as one GEMM
per chunk over explicit im2col columns, dW = dy [O, m*OH*OW] @ columns [C*KH*KW, m*OH*OW].T, against
_RowRuns' per-output-row products over R (the code as it is). One thread, 64 images (a 2-core batch
of 128's share), 3x3 convs of stride 1 at ResNet-20's shapes, chunks of 2-16 images. Run from the
repository root, on a quiet machine:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python docs/experiments/filter_grad_one_gemm.py
"""
import numpy as np
from timing import median_ms  # beside this script: run it as python docs/experiments/...

from gpuconv import blas
from gpuconv.ops import conv_cpu, cpu_parts


def row_runs(geo, x, dy):
    layout = conv_cpu._RowRuns(geo, np.float32)

    def run():
        dw = None
        for first, last in cpu_parts.ranges(0, geo.n, layout.chunk):
            value = layout.filter_grad(x, dy, first, last)
            dw = value if dw is None else dw + value
        return conv_cpu._RowRuns.weight_grad(geo, dw)
    return run, layout.chunk


def one_gemm(geo, x, dy, m):
    columns = np.empty((geo.c, geo.kh, geo.kw, m, geo.oh, geo.ow), np.float32)
    padded = np.zeros((geo.c, m) + geo.padded, np.float32)  # the borders stay 0
    rows = np.empty((geo.o, m, geo.oh, geo.ow), np.float32)

    def run():
        dw = None
        for first, last in cpu_parts.ranges(0, geo.n, m):
            k = last - first
            padded[:, :k, geo.ph:geo.ph + geo.h, geo.pw:geo.pw + geo.w] = x[first:last].transpose(1, 0, 2, 3)
            for i in range(geo.kh):
                for j in range(geo.kw):
                    columns[:, i, j, :k] = padded[:, :k, i:i + geo.oh, j:j + geo.ow]
            rows[:, :k] = dy[first:last].transpose(1, 0, 2, 3)
            value = rows[:, :k].reshape(geo.o, -1) @ np.ascontiguousarray(columns[:, :, :, :k]).reshape(geo.k, -1).T
            dw = value if dw is None else dw + value
        return dw.reshape(geo.o, geo.c, geo.kh, geo.kw)
    return run


def main(n=64):
    rng = np.random.default_rng(0)
    with blas.num_threads(1):
        for c, o, side in [(3, 16, 32), (16, 16, 32), (32, 32, 16), (64, 64, 8)]:
            x = rng.standard_normal((n, c, side, side)).astype(np.float32)
            dy = rng.standard_normal((n, o, side, side)).astype(np.float32)
            geo = conv_cpu._Geometry(x.shape, (o, c, 3, 3), (1, 1), (1, 1), (1, 1))
            current, chunk = row_runs(geo, x, dy)
            reference = current()
            line = [f"c{c}-{o}@{side}: _RowRuns (chunk {chunk}) {median_ms(current, 9):.2f} ms"]
            for m in (2, 4, 8, 16):
                variant = one_gemm(geo, x, dy, m)
                error = np.abs(variant() - reference).max() / np.abs(reference).max()
                line.append(f"one GEMM, chunk {m}: {median_ms(variant, 9):.2f} ms (max error {error:.0e})")
            print("; ".join(line), flush=True)


if __name__ == "__main__":
    main()
