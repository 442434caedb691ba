"""The forward GEMM of a 3x3 conv alone, at issue 20's shapes, batch 128: the im2col rows R
(N*H*W x 9C) times the weights, both orientations, with NumPy's BLAS on 2 threads; no im2col, no
copy. PyTorch's whole conv at the same shapes: docs/experiments/conv_numba_direct.py. Medians of
15 after 1. Run from the repository root:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE PYTHONPATH=. python docs/experiments/conv_gemm_alone.py
"""
import numpy as np
from timing import median_ms

from gpuconv.bench.machine import blas_config


def main(batch=128):
    print("BLAS:", blas_config())
    rng = np.random.default_rng(0)
    for channels, side in [(16, 32), (32, 16), (64, 8)]:
        m, k = batch * side * side, 9 * channels
        rows = rng.standard_normal((m, k), dtype=np.float32)
        weight = rng.standard_normal((k, channels), dtype=np.float32)
        out = np.empty((m, channels), np.float32)
        rows_t, weight_t = np.ascontiguousarray(rows.T), np.ascontiguousarray(weight.T)
        out_t = np.empty((channels, m), np.float32)
        by_rows = median_ms(lambda: np.matmul(rows, weight, out=out), repeat=15)
        by_channels = median_ms(lambda: np.matmul(weight_t, rows_t, out=out_t), repeat=15)
        gflop = 2 * m * k * channels / 1e9
        print(f"c{channels}@{side}: R @ W {by_rows:.2f} ms ({gflop / by_rows * 1e3:.0f} GFLOP/s), "
              f"W.T @ R.T {by_channels:.2f} ms ({gflop / by_channels * 1e3:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
