"""Stride-1 conv layouts tried against conv_cpu.py's choice (_layout_class: _RowRuns at these shapes)
on one thread, 64 images (a 2-core batch of 128's share). The "flat" layouts copy a chunk's images
once into one zero-padded buffer per channel: rows of W + P values, images H + P rows apart, so
that neighbouring rows and images share their padding and every kernel tap is one contiguous shift
of the buffer. Then
  flat9: the KH*KW shifted copies (long runs) and one GEMM (O, KH*KW*C) @ (KH*KW*C, N);
  flat3: KW shifted copies and one batched GEMM per kernel row (K = KW*C), the KH products summed;
  flat1: no copies, one GEMM per tap (K = C), the KH*KW products summed;
and flat3's filter gradient (dy in the same layout, one GEMM per kernel row), against conv_cpu's.
Output columns past each row (W + P - OW of them) and rows past each image are computed and dropped.
Four runs on 2026-12-03 (07:2x-08:36 UTC, docs/performance.md, session 11): at c16-16@32 and
c32-32@16 the best flat variant took 0.7x-1.15x _RowRuns' time, run to run, at c64-64@8 and LeNet-5's
conv2 1.2x-1.7x; its copies are cheaper (long runs), its GEMMs slower (flat3's K = 48 ran at 44-56
GFLOP/s on one core where _RowRuns' K = 144 runs at about 68): no consistent gain.
Each line: the layout, images per chunk, milliseconds, the largest difference from conv_cpu's
result relative to its largest value. Run from the repository root, on a quiet machine:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python docs/experiments/conv_flat_layouts.py
"""
import numpy as np
from timing import median_ms as median_ms_of

from gpuconv import blas
from gpuconv.ops import conv_cpu, cpu_parts

def median_ms(function):
    return median_ms_of(function, repeat=15)


SHAPES = [(16, 16, 32, 3, 1), (32, 32, 16, 3, 1), (64, 64, 8, 3, 1), (6, 16, 14, 5, 0), (3, 16, 32, 3, 1)]


class Flat:
    """A chunk of m images in the flat layout; `copies` is 9 (flat9), 3 (flat3) or 1 (flat1)."""

    def __init__(self, geo, m, copies):
        self.geo, self.m, self.copies = geo, m, copies
        self.row, self.rows = geo.w + geo.pw, geo.h + geo.ph  # shared padding: P zeros after each row
        self.n = m * self.rows * self.row                    # output columns, dropped ones included
        self.reach = self.n + (geo.kh - 1) * self.row        # what the taps of one kernel column read
        self.buffer = np.zeros((geo.c, self.reach + geo.kw + (geo.ph + 1) * self.row), np.float32)
        start = geo.pw + geo.ph * self.row
        self.interior = self.buffer[:, start:start + self.n].reshape(geo.c, m, self.rows, self.row)[:, :, :geo.h, :geo.w]
        if copies == 9:
            self.columns = np.empty((geo.kh, geo.kw, geo.c, self.n), np.float32)
        elif copies == 3:
            self.columns = np.empty((geo.kw, geo.c, self.reach), np.float32)
            # kernel row i's matrix [(kw, c), n] starts i rows into each shifted copy
            self.by_kernel_row = np.ndarray((geo.kh, geo.kw * geo.c, self.n), np.float32, buffer=self.columns,
                                            strides=(4 * self.row, 4 * self.reach, 4))
        self.dy = np.zeros((geo.o, m, self.rows, self.row), np.float32)  # the dropped positions stay 0

    def weights(self, w):
        if self.copies == 9:
            return np.ascontiguousarray(w.transpose(0, 2, 3, 1)).reshape(w.shape[0], -1)
        if self.copies == 3:
            return np.ascontiguousarray(w.transpose(2, 0, 3, 1)).reshape(w.shape[2], w.shape[0], -1)
        return np.ascontiguousarray(w.transpose(2, 3, 0, 1)).reshape(-1, w.shape[0], w.shape[1])

    def fill(self, x, first, last):
        geo = self.geo
        self.interior[...] = x[first:last].transpose(1, 0, 2, 3)
        if self.copies == 9:
            for i in range(geo.kh):
                for j in range(geo.kw):
                    offset = i * self.row + j
                    self.columns[i, j] = self.buffer[:, offset:offset + self.n]
        elif self.copies == 3:
            for j in range(geo.kw):
                self.columns[j] = self.buffer[:, j:j + self.reach]

    def forward(self, x, weights, first, last, y):
        geo = self.geo
        self.fill(x, first, last)
        if self.copies == 9:
            out = weights @ self.columns.reshape(-1, self.n)
        elif self.copies == 3:
            products = np.matmul(weights, self.by_kernel_row)
            out = products[0]
            for row in products[1:]:
                out += row
        else:
            out = None
            for i in range(geo.kh):
                for j in range(geo.kw):
                    offset = i * self.row + j
                    product = weights[i * geo.kw + j] @ self.buffer[:, offset:offset + self.n]
                    out = product if out is None else out.__iadd__(product)
        y[first:last] = out.reshape(geo.o, self.m, self.rows, self.row)[:, :, :geo.oh, :geo.ow].transpose(1, 0, 2, 3)

    def filter_grad(self, x, dy, first, last):
        """flat3: [KH, O, KW*C] for images first..last-1."""
        geo = self.geo
        self.fill(x, first, last)
        self.dy[:, :, :geo.oh, :geo.ow] = dy[first:last].transpose(1, 0, 2, 3)
        return np.matmul(self.dy.reshape(geo.o, -1), self.by_kernel_row.transpose(0, 2, 1))

    def weight_grad(self, summed):
        geo = self.geo
        return summed.reshape(geo.kh, geo.o, geo.kw, geo.c).transpose(1, 3, 0, 2)


def chunks_of(n, m):
    return list(cpu_parts.ranges(0, n, m))


def main(n=64):
    for c, o, side, k, p in SHAPES:
        rng = np.random.default_rng(0)
        x = rng.random((n, c, side, side), np.float32)
        w = rng.random((o, c, k, k), np.float32)
        geo = conv_cpu._Geometry(x.shape, w.shape, (1, 1), (p, p), (1, 1))
        dy = rng.random((n, o, geo.oh, geo.ow), np.float32)
        reference, lines = np.empty((n, o, geo.oh, geo.ow), np.float32), []
        with blas.num_threads(1):
            layout = conv_cpu._layout_class(geo, np.float32)(geo, np.float32)
            weights = layout.weight_matrix(w)
            lines.append((f"{type(layout).__name__} forward", layout.chunk, median_ms(
                lambda: [layout.forward(x, weights, a, b, reference) for a, b in chunks_of(n, layout.chunk)]), 0.0))
            for copies in (9, 3, 1):
                for m in (2, 4, 8, 16):
                    flat, y = Flat(geo, m, copies), np.empty_like(reference)
                    flat_weights = flat.weights(w)
                    ms = median_ms(lambda: [flat.forward(x, flat_weights, a, b, y) for a, b in chunks_of(n, m)])
                    lines.append((f"flat{copies} forward", m, ms, np.abs(y - reference).max() / np.abs(reference).max()))
            grad_layout = conv_cpu._filter_grad_class(geo, np.float32)(geo, np.float32)

            def reference_grad():
                return sum(grad_layout.filter_grad(x, dy, a, b) for a, b in chunks_of(n, grad_layout.chunk))
            want = grad_layout.weight_grad(geo, reference_grad())
            lines.append((f"{type(grad_layout).__name__} filter gradient", grad_layout.chunk, median_ms(reference_grad), 0.0))
            if k == 3:
                for m in (2, 4, 8, 16):
                    flat = Flat(geo, m, 3)

                    def flat_grad():
                        return sum(flat.filter_grad(x, dy, a, b).copy() for a, b in chunks_of(n, m))
                    got = flat.weight_grad(flat_grad())
                    lines.append(("flat3 filter gradient", m, median_ms(flat_grad),
                                  np.abs(got - want).max() / np.abs(want).max()))
        print(f"c{c}-{o}k{k}@{side}:")
        for name, m, ms, error in lines:
            print(f"  {name:32s} m={m:<3d} {ms:7.2f} ms  {error:.0e}")


if __name__ == "__main__":
    main()
