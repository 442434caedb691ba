"""One part of the array-level conv's stride-1 forward (gpuconv/ops/conv_cpu.py, _RowRuns) on one
thread, 64 images (a 2-core batch of 128's share): the whole chunk loop, and its pieces repeated on
one chunk (the copies into R, the batched products, the copy out to NCHW). Run from the repository
root, on a quiet machine:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python docs/experiments/row_runs_profile.py
"""

import numpy as np

from gpuconv import blas
from gpuconv.ops import conv_cpu, cpu_parts
from timing import median_ms


def main(n=64):
    for c, o, side in [(16, 16, 32), (32, 32, 16), (64, 64, 8)]:
        x = np.random.rand(n, c, side, side).astype(np.float32)
        w = np.random.rand(o, c, 3, 3).astype(np.float32)
        geo = conv_cpu._Geometry(x.shape, w.shape, (1, 1), (1, 1), (1, 1))
        layout = conv_cpu._RowRuns(geo, np.float32)
        weights, y, m = layout.weight_matrix(w), np.empty((n, o, side, side), np.float32), layout.chunk
        with blas.num_threads(1):
            whole = median_ms(lambda: [layout.forward(x, weights, a, b, y) for a, b in cpu_parts.ranges(0, n, m)])
            matrices, products = layout.matrices(x, 0, m)
            copies = median_ms(lambda: [layout.matrices(x, a, a + m) for a in range(0, n - m + 1, m)])
            product = median_ms(lambda: [np.matmul(weights, matrices, out=products) for a in range(0, n - m + 1, m)])
            out = median_ms(lambda: [y.__setitem__(slice(a, a + m), products.reshape(geo.oh, o, m, geo.ow)
                                                   .transpose(2, 1, 0, 3)) for a in range(0, n - m + 1, m)])
        gflop = 2 * n * o * c * 9 * side * side / 1e9
        print(f"c{c}-{o}@{side} chunk {m}: whole {whole:.2f} ms; copies into R {copies:.2f}, products {product:.2f} "
              f"({gflop / product * 1e3:.0f} GFLOP/s), copy out {out:.2f}")


if __name__ == "__main__":
    main()
