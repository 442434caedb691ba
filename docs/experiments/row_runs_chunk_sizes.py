"""The array-level stride-1 conv (gpuconv/ops/conv_cpu.py, _RowRuns) with its chunks' size
ROW_RUNS_BYTES at 1, 2 (the code's), 4 and 8 MiB: forward, input gradient and filter gradient at
batch 128 on the default workers, 3x3 convs at ResNet-20's shapes. Run from the repository root,
on a quiet machine:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python docs/experiments/row_runs_chunk_sizes.py
"""
import numpy as np
from timing import median_ms  # beside this script: run it as python docs/experiments/...

from gpuconv.ops import conv_cpu


def main(n=128):
    rng = np.random.default_rng(0)
    chosen = conv_cpu.ROW_RUNS_BYTES
    try:
        for c, o, side in [(3, 16, 32), (16, 16, 32), (32, 32, 16), (64, 64, 8)]:
            x = rng.random((n, c, side, side), dtype=np.float32)
            w = rng.random((o, c, 3, 3), dtype=np.float32)
            dy = rng.random((n, o, side, side), dtype=np.float32)
            line = []
            for mib in (1, 2, 4, 8):
                conv_cpu.ROW_RUNS_BYTES = mib << 20
                forward = median_ms(lambda: conv_cpu.conv2d_forward(x, w, None, (1, 1), (1, 1), (1, 1)), 9)
                data = median_ms(lambda: conv_cpu.conv2d_backward(dy, x, w, (1, 1), (1, 1), (1, 1), True, False, False), 9)
                weight = median_ms(lambda: conv_cpu.conv2d_backward(dy, x, w, (1, 1), (1, 1), (1, 1), False, False, True), 9)
                line.append(f"{mib} MiB: forward {forward:.2f}, dx {data:.2f}, dW {weight:.2f} ms")
            print(f"c{c}-{o}@{side}: " + "; ".join(line), flush=True)
    finally:
        conv_cpu.ROW_RUNS_BYTES = chosen


if __name__ == "__main__":
    main()
