// CUDA features used (the kernel emulator supports exactly these): #define (constants) __global__ __device__ __forceinline__ template<typename T> __restrict__ __shared__ (fixed-size 1-D and 2-D arrays) __syncthreads min (long long, int) blockIdx threadIdx blockDim gridDim (.x .y .z)
//
// 2-D convolution, NCHW, weights (K, C/groups, KH, KW), PyTorch semantics (cross-correlation).
// Two algorithms, chosen per shape by gpuconv/ops/conv_cuda.py:
//   direct  implicit GEMM tiled through shared memory (forward, backward-data), plus two-pass
//           reductions for the filter and bias gradients;
//   im2col  im2col / col2im below around cuBLAS GEMMs issued from Python.
// Every reduction runs in a fixed order (no atomics), so results are bit-identical run to run.
// Offsets into arrays are long long (N*C*H*W passes 2^31 for realistic batches); per-plane and
// per-batch counts stay int so the inner loops need no 64-bit division. Grid-stride loop counters
// are long long: counter + stride overflows an int once the count passes 2^30, though it fits.

// Implicit-GEMM tiles, register-blocked. A block of (blockDim.x, blockDim.y) threads computes
// PIXELS_PER_THREAD * blockDim.x output pixels x CHANNELS_PER_THREAD * blockDim.y output channels;
// thread (tx, ty) owns pixels tx + j * blockDim.x and channels ty + i * blockDim.y (strided, so a
// warp's shared loads hit consecutive banks or one broadcast word, and its stores are coalesced).
// Per reduction row a thread loads CHANNELS_PER_THREAD weights and PIXELS_PER_THREAD inputs from
// shared memory for CHANNELS_PER_THREAD * PIXELS_PER_THREAD multiply-adds, kept in registers.
// The block shape is the tile: the launcher picks it per call from a small fixed set
// (conv_cuda.tile_config: few output channels get a narrow, long tile); the shared arrays are sized
// for the largest, MAX_TILE_K x MAX_TILE_P. The reduction walks TILE_R rows at a time and stops at
// the last real row (no multiply-adds on padding rows). Every output sums its rows in order
// r = 0, 1, ..., R - 1 whatever the tile, so the bits do not depend on the tile choice.
// No __launch_bounds__ anywhere: with NVRTC 13 it makes ptxas trade registers for occupancy and
// spill (check-kernels fails on spills).
// These #defines are the one source of the tile limits: gpuconv/ops/conv_cuda.py reads them from
// this file (cuda.runtime.source_constant) to size its grids and blocks.
#define TILE_R 16
#define PIXELS_PER_THREAD 4
#define CHANNELS_PER_THREAD 4
#define MAX_TILE_P 128
#define MAX_TILE_K 32
// Threads per block of the deterministic reductions (power of two; the launcher reads it from here).
#define REDUCE_THREADS 256
// Taps of one filter-gradient block, each an accumulator in registers (one dy load serves them all).
#define FILTER_TAPS 16

// Sum of one value per thread; a fixed tree so the rounding is the same on every run.
template<typename T>
__device__ __forceinline__ T block_sum(T value, T* buffer)
{
    const int tid = threadIdx.x;
    buffer[tid] = value;
    __syncthreads();
    for (int half = REDUCE_THREADS / 2; half > 0; half >>= 1) {
        if (tid < half) {
            buffer[tid] += buffer[tid + half];
        }
        __syncthreads();
    }
    return buffer[0];
}

// y[n, g*Kg + k, p] = act(sum_r w[g*Kg + k, r] * x_col[n, g, r, p] + b), x_col gathered on the fly;
// act is ReLU when relu != 0 (the epilogue of a conv followed by ReLU), else the identity.
// grid: (ceil(OH*OW / tile_p), ceil(Kg / tile_k), min(N*groups, 65535)),
// block: (tile_p / PIXELS_PER_THREAD, tile_k / CHANNELS_PER_THREAD).
template<typename T>
__global__ void conv2d_forward_direct(
    const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b, T* __restrict__ y,
    int N, int C, int H, int W, int K, int KH, int KW, int OH, int OW,
    int stride_h, int stride_w, int pad_h, int pad_w, int dil_h, int dil_w, int groups, int has_bias,
    int relu)
{
    __shared__ T x_tile[TILE_R][MAX_TILE_P];
    __shared__ T w_tile[TILE_R][MAX_TILE_K + 1];  // +1: the transposed store below hits distinct banks

    const int Cg = C / groups;
    const int Kg = K / groups;
    const int taps = KH * KW;
    const int R = Cg * taps;
    const int P = OH * OW;
    const int tx = threadIdx.x;
    const int ty = threadIdx.y;
    const int threads = blockDim.x * blockDim.y;
    const int tid = ty * blockDim.x + tx;
    const int tile_p = blockDim.x * PIXELS_PER_THREAD;
    const int tile_k = blockDim.y * CHANNELS_PER_THREAD;
    const int p0 = blockIdx.x * tile_p;
    const int k0 = blockIdx.y * tile_k;
    for (long long ng = blockIdx.z; ng < (long long)N * groups; ng += gridDim.z) {
        const int n = (int)(ng / groups);
        const int g = (int)(ng % groups);
        const T* x_n = x + ((long long)n * C + (long long)g * Cg) * H * W;
        const T* w_g = w + (long long)g * Kg * R;

        T acc[CHANNELS_PER_THREAD][PIXELS_PER_THREAD];
        for (int i = 0; i < CHANNELS_PER_THREAD; ++i) {
            for (int j = 0; j < PIXELS_PER_THREAD; ++j) {
                acc[i][j] = T(0);
            }
        }

        for (int r0 = 0; r0 < R; r0 += TILE_R) {
            const int rows = min(TILE_R, R - r0);  // the last tile stops at row R - 1
            for (int e = tid; e < rows * tile_p; e += threads) {
                const int rr = e / tile_p;
                const int pp = e % tile_p;
                const int r = r0 + rr;
                const int p = p0 + pp;
                T value = T(0);
                if (p < P) {
                    const int c = r / taps;
                    const int kh = (r % taps) / KW;
                    const int kw = r % KW;
                    const int ih = (p / OW) * stride_h - pad_h + kh * dil_h;
                    const int iw = (p % OW) * stride_w - pad_w + kw * dil_w;
                    if (ih >= 0 && ih < H && iw >= 0 && iw < W) {
                        value = x_n[((long long)c * H + ih) * W + iw];
                    }
                }
                x_tile[rr][pp] = value;
            }
            for (int e = tid; e < rows * tile_k; e += threads) {
                const int rr = e % rows;  // consecutive threads read consecutive weights of one channel
                const int kk = e / rows;
                const int k = k0 + kk;
                w_tile[rr][kk] = k < Kg ? w_g[(long long)k * R + r0 + rr] : T(0);
            }
            __syncthreads();
            for (int rr = 0; rr < rows; ++rr) {
                T weight[CHANNELS_PER_THREAD];
                T input[PIXELS_PER_THREAD];
                for (int i = 0; i < CHANNELS_PER_THREAD; ++i) {
                    weight[i] = w_tile[rr][ty + i * blockDim.y];
                }
                for (int j = 0; j < PIXELS_PER_THREAD; ++j) {
                    input[j] = x_tile[rr][tx + j * blockDim.x];
                }
                for (int i = 0; i < CHANNELS_PER_THREAD; ++i) {
                    for (int j = 0; j < PIXELS_PER_THREAD; ++j) {
                        acc[i][j] += weight[i] * input[j];
                    }
                }
            }
            __syncthreads();
        }

        for (int i = 0; i < CHANNELS_PER_THREAD; ++i) {
            const int k = k0 + ty + i * blockDim.y;
            if (k < Kg) {
                const int channel = g * Kg + k;
                const T bias = has_bias ? b[channel] : T(0);
                T* y_nk = y + ((long long)n * K + channel) * P;
                for (int j = 0; j < PIXELS_PER_THREAD; ++j) {
                    const int p = p0 + tx + j * blockDim.x;
                    if (p < P) {
                        T v = acc[i][j] + bias;
                        if (relu && v <= T(0)) {  // the fused ReLU epilogue: -0 gives +0 as np.maximum does, NaN stays NaN
                            v = T(0);
                        }
                        y_nk[p] = v;
                    }
                }
            }
        }
    }
}

// The transpose of the forward GEMM, gathered per input pixel (no scatter, no atomics):
// dx[n, g*Cg + c, q] = sum over (k, kh, kw) of w[g*Kg + k, c, kh, kw] * dy[n, g*Kg + k, oh, ow]
// where (oh, ow) is the output pixel whose window puts tap (kh, kw) on input pixel q, if any.
// The same register-blocked tile as the forward, over input pixels x input channels.
// grid: (ceil(H*W / tile_p), ceil(Cg / tile_k), min(N*groups, 65535)),
// block: (tile_p / PIXELS_PER_THREAD, tile_k / CHANNELS_PER_THREAD).
template<typename T>
__global__ void conv2d_backward_data_direct(
    const T* __restrict__ dy, const T* __restrict__ w, T* __restrict__ dx,
    int N, int C, int H, int W, int K, int KH, int KW, int OH, int OW,
    int stride_h, int stride_w, int pad_h, int pad_w, int dil_h, int dil_w, int groups)
{
    __shared__ T dy_tile[TILE_R][MAX_TILE_P];
    __shared__ T w_tile[TILE_R][MAX_TILE_K + 1];

    const int Cg = C / groups;
    const int Kg = K / groups;
    const int taps = KH * KW;
    const int R = Kg * taps;
    const int Q = H * W;
    const int P = OH * OW;
    const int tx = threadIdx.x;
    const int ty = threadIdx.y;
    const int threads = blockDim.x * blockDim.y;
    const int tid = ty * blockDim.x + tx;
    const int tile_q = blockDim.x * PIXELS_PER_THREAD;
    const int tile_c = blockDim.y * CHANNELS_PER_THREAD;
    const int q0 = blockIdx.x * tile_q;
    const int c0 = blockIdx.y * tile_c;
    for (long long ng = blockIdx.z; ng < (long long)N * groups; ng += gridDim.z) {
        const int n = (int)(ng / groups);
        const int g = (int)(ng % groups);
        const T* dy_n = dy + ((long long)n * K + (long long)g * Kg) * P;
        const T* w_g = w + (long long)g * Kg * Cg * taps;

        T acc[CHANNELS_PER_THREAD][PIXELS_PER_THREAD];
        for (int i = 0; i < CHANNELS_PER_THREAD; ++i) {
            for (int j = 0; j < PIXELS_PER_THREAD; ++j) {
                acc[i][j] = T(0);
            }
        }

        for (int r0 = 0; r0 < R; r0 += TILE_R) {
            const int rows = min(TILE_R, R - r0);  // the last tile stops at row R - 1
            for (int e = tid; e < rows * tile_q; e += threads) {
                const int rr = e / tile_q;
                const int qq = e % tile_q;
                const int r = r0 + rr;
                const int q = q0 + qq;
                T value = T(0);
                if (q < Q) {
                    const int k = r / taps;
                    const int kh = (r % taps) / KW;
                    const int kw = r % KW;
                    const int oh_scaled = q / W + pad_h - kh * dil_h;
                    const int ow_scaled = q % W + pad_w - kw * dil_w;
                    if (oh_scaled >= 0 && ow_scaled >= 0
                        && oh_scaled % stride_h == 0 && ow_scaled % stride_w == 0) {
                        const int oh = oh_scaled / stride_h;
                        const int ow = ow_scaled / stride_w;
                        if (oh < OH && ow < OW) {
                            value = dy_n[(long long)k * P + oh * OW + ow];
                        }
                    }
                }
                dy_tile[rr][qq] = value;
            }
            for (int e = tid; e < rows * tile_c; e += threads) {
                const int rr = e % rows;  // consecutive threads read consecutive taps of one filter
                const int cc = e / rows;
                const int c = c0 + cc;
                T weight = T(0);
                if (c < Cg) {
                    const int r = r0 + rr;
                    const int k = r / taps;
                    const int tap = r % taps;
                    weight = w_g[((long long)k * Cg + c) * taps + tap];
                }
                w_tile[rr][cc] = weight;
            }
            __syncthreads();
            for (int rr = 0; rr < rows; ++rr) {
                T weight[CHANNELS_PER_THREAD];
                T input[PIXELS_PER_THREAD];
                for (int i = 0; i < CHANNELS_PER_THREAD; ++i) {
                    weight[i] = w_tile[rr][ty + i * blockDim.y];
                }
                for (int j = 0; j < PIXELS_PER_THREAD; ++j) {
                    input[j] = dy_tile[rr][tx + j * blockDim.x];
                }
                for (int i = 0; i < CHANNELS_PER_THREAD; ++i) {
                    for (int j = 0; j < PIXELS_PER_THREAD; ++j) {
                        acc[i][j] += weight[i] * input[j];
                    }
                }
            }
            __syncthreads();
        }

        for (int i = 0; i < CHANNELS_PER_THREAD; ++i) {
            const int c = c0 + ty + i * blockDim.y;
            if (c < Cg) {
                T* dx_nc = dx + ((long long)n * C + (long long)g * Cg + c) * Q;
                for (int j = 0; j < PIXELS_PER_THREAD; ++j) {
                    const int q = q0 + tx + j * blockDim.x;
                    if (q < Q) {
                        dx_nc[q] = acc[i][j];
                    }
                }
            }
        }
    }
}

// Filter and bias gradients: two-pass deterministic reductions, no atomics.
// Pass 1 splits the N*OH*OW products of every sum into `slices` contiguous ranges; a block owns one
// (output channel k, input channel c) pair, FILTER_TAPS taps of it and one range: each thread keeps
// FILTER_TAPS accumulators in registers (one dy load serves every tap) and a fixed tree adds the
// threads' values. Partial sums go to workspace[slice][e] (e: weight, then bias index).
// Pass 2 (reduce_slices) adds each element's partials in slice order. The slice count depends only
// on the shape, so the bits are the same on every run and every GPU.
// grid: (K * C/groups, ceil(KH*KW / FILTER_TAPS), slices), block REDUCE_THREADS.
template<typename T>
__global__ void conv2d_backward_filter_partial(
    const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ partial,
    int N, int C, int H, int W, int K, int KH, int KW, int OH, int OW,
    int stride_h, int stride_w, int pad_h, int pad_w, int dil_h, int dil_w, int groups,
    int slices, int need_bias)
{
    __shared__ T sums[FILTER_TAPS][REDUCE_THREADS];
    __shared__ T bias_buffer[REDUCE_THREADS];

    const int Cg = C / groups;
    const int Kg = K / groups;
    const int taps = KH * KW;
    const int P = OH * OW;
    const int tid = threadIdx.x;
    const int k = blockIdx.x / Cg;
    const int c = blockIdx.x % Cg;
    const int tap0 = blockIdx.y * FILTER_TAPS;
    const int slice = blockIdx.z;
    const int channel_in = (k / Kg) * Cg + c;
    const int with_bias = need_bias && c == 0 && blockIdx.y == 0;  // one block per (k, slice) adds db
    const long long weights = (long long)K * Cg * taps;

    // Each tap's input offset from the output pixel's window corner, kept in registers.
    int tap_dh[FILTER_TAPS];
    int tap_dw[FILTER_TAPS];
    T acc[FILTER_TAPS];
    for (int t = 0; t < FILTER_TAPS; ++t) {
        const int tap = min(tap0 + t, taps - 1);
        tap_dh[t] = (tap / KW) * dil_h - pad_h;
        tap_dw[t] = (tap % KW) * dil_w - pad_w;
        acc[t] = T(0);
    }
    T bias_sum = T(0);

    const long long items = (long long)N * P;
    const long long chunk = (items + slices - 1) / slices;
    const long long begin = min(items, (long long)slice * chunk);
    const long long end = min(items, begin + chunk);
    long long item = begin + tid;
    int n = (int)(item / P);
    int p = (int)(item % P);
    const T* x_c = x + (long long)channel_in * H * W;
    while (item < end) {
        const T g = dy[((long long)n * K + k) * P + p];
        bias_sum += g;
        const int oh = p / OW;
        const int ow = p % OW;
        const T* x_plane = x_c + (long long)n * C * H * W;
        for (int t = 0; t < FILTER_TAPS; ++t) {
            const int ih = oh * stride_h + tap_dh[t];
            const int iw = ow * stride_w + tap_dw[t];
            if (ih >= 0 && ih < H && iw >= 0 && iw < W) {
                acc[t] += g * x_plane[ih * W + iw];
            }
        }
        item += REDUCE_THREADS;
        p += REDUCE_THREADS;
        while (p >= P) {
            p -= P;
            ++n;
        }
    }

    T* out = partial + (long long)slice * (weights + (need_bias ? K : 0));
    for (int t = 0; t < FILTER_TAPS; ++t) {
        sums[t][tid] = acc[t];
    }
    __syncthreads();
    // FILTER_TAPS trees side by side, each in the fixed order of block_sum
    for (int half = REDUCE_THREADS / 2; half > 0; half >>= 1) {
        for (int e = tid; e < FILTER_TAPS * half; e += REDUCE_THREADS) {
            const int t = e / half;
            const int i = e % half;
            sums[t][i] += sums[t][i + half];
        }
        __syncthreads();
    }
    if (tid < FILTER_TAPS && tap0 + tid < taps) {
        out[((long long)k * Cg + c) * taps + tap0 + tid] = sums[tid][0];
    }
    if (with_bias) {
        const T total = block_sum(bias_sum, bias_buffer);
        if (tid == 0) {
            out[weights + k] = total;
        }
    }
}

// db partials alone (the im2col path, whose filter gradient is a GEMM): partial[slice][k] is the sum
// of dy[n, k, p] over the slice's range of the N*OH*OW items, fixed-order tree.
// grid: (K, slices), block REDUCE_THREADS.
template<typename T>
__global__ void conv2d_backward_bias_partial(
    const T* __restrict__ dy, T* __restrict__ partial, int N, int K, int P, int slices)
{
    __shared__ T buffer[REDUCE_THREADS];

    const int k = blockIdx.x;
    const int slice = blockIdx.y;
    const long long items = (long long)N * P;
    const long long chunk = (items + slices - 1) / slices;
    const long long begin = min(items, (long long)slice * chunk);
    const long long end = min(items, begin + chunk);
    long long item = begin + threadIdx.x;
    int n = (int)(item / P);
    int p = (int)(item % P);
    T sum = T(0);
    while (item < end) {
        sum += dy[((long long)n * K + k) * P + p];
        item += REDUCE_THREADS;
        p += REDUCE_THREADS;
        while (p >= P) {
            p -= P;
            ++n;
        }
    }
    const T total = block_sum(sum, buffer);
    if (threadIdx.x == 0) {
        partial[(long long)slice * K + k] = total;
    }
}

// Pass 2: out[e] = sum over s of partial[s][e] in slice order, e < first_count into `first`, the rest
// into `second` (dw then db). One thread per element.
template<typename T>
__global__ void reduce_slices(
    const T* __restrict__ partial, T* __restrict__ first, T* __restrict__ second, int first_count,
    int count, int slices)
{
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < count;
         e += (long long)blockDim.x * gridDim.x) {
        T sum = T(0);
        for (int s = 0; s < slices; ++s) {
            sum += partial[(long long)s * count + e];
        }
        if (e < first_count) {
            first[e] = sum;
        } else {
            second[e - first_count] = sum;
        }
    }
}

// col[(c*KH + kh)*KW + kw, n, p] = x[n, c, ih, iw] (0 in the padding). Rows of one group are
// contiguous and (n, p) is one long GEMM dimension, so each group is a single cuBLAS call.
// grid.y strides over the C*KH*KW*N lines (row, n), grid.x over the OH*OW pixels of a line.
template<typename T>
__global__ void im2col(
    const T* __restrict__ x, T* __restrict__ col,
    int N, int C, int H, int W, int KH, int KW, int OH, int OW,
    int stride_h, int stride_w, int pad_h, int pad_w, int dil_h, int dil_w)
{
    const int P = OH * OW;
    const long long lines = (long long)C * KH * KW * N;
    for (long long line = blockIdx.y; line < lines; line += gridDim.y) {
        const int n = (int)(line % N);
        const int row = (int)(line / N);
        const int kw = row % KW;
        const int kh = (row / KW) % KH;
        const int c = row / (KH * KW);
        const T* x_plane = x + ((long long)n * C + c) * H * W;
        T* col_line = col + line * P;
        for (long long p_index = (long long)blockIdx.x * blockDim.x + threadIdx.x; p_index < P;
             p_index += (long long)blockDim.x * gridDim.x) {
            const int p = (int)p_index;
            const int ih = (p / OW) * stride_h - pad_h + kh * dil_h;
            const int iw = (p % OW) * stride_w - pad_w + kw * dil_w;
            T value = T(0);
            if (ih >= 0 && ih < H && iw >= 0 && iw < W) {
                value = x_plane[ih * W + iw];
            }
            col_line[p] = value;
        }
    }
}

// The im2col GEMM's channel-major output of a batch chunk, (K, n, OH*OW), into NCHW y (the chunk's
// first sample at y), with the bias and, when relu != 0, ReLU: one pass instead of a transposing
// copy, a bias add and an activation. Grid-stride over the chunk's n*K*OH*OW outputs.
template<typename T>
__global__ void im2col_output(
    const T* __restrict__ src, const T* __restrict__ b, T* __restrict__ y, int n, int K, int P,
    int has_bias, int relu)
{
    const long long count = (long long)n * K * P;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (long long)blockDim.x * gridDim.x) {
        const int p = (int)(i % P);
        const long long sample_channel = i / P;
        const int k = (int)(sample_channel % K);
        const long long sample = sample_channel / K;
        T v = src[((long long)k * n + sample) * P + p];
        if (has_bias) {
            v += b[k];
        }
        if (relu && v <= T(0)) {
            v = T(0);
        }
        y[i] = v;
    }
}

// The adjoint of im2col, gather-style: each thread owns one dx element and adds, in a fixed tap
// order, every col entry that im2col copied from it. grid.y strides over the N*C planes, grid.x
// over the H*W pixels of a plane.
template<typename T>
__global__ void col2im(
    const T* __restrict__ col, T* __restrict__ dx,
    int N, int C, int H, int W, int KH, int KW, int OH, int OW,
    int stride_h, int stride_w, int pad_h, int pad_w, int dil_h, int dil_w)
{
    const int P = OH * OW;
    for (long long plane = blockIdx.y; plane < (long long)N * C; plane += gridDim.y) {
        const int n = (int)(plane / C);
        const int c = (int)(plane % C);
        T* dx_plane = dx + plane * H * W;
        for (long long pixel_index = (long long)blockIdx.x * blockDim.x + threadIdx.x; pixel_index < H * W;
             pixel_index += (long long)blockDim.x * gridDim.x) {
            const int pixel = (int)pixel_index;
            const int ih = pixel / W;
            const int iw = pixel % W;
            T sum = T(0);
            for (int kh = 0; kh < KH; ++kh) {
                const int oh_scaled = ih + pad_h - kh * dil_h;
                if (oh_scaled < 0 || oh_scaled % stride_h != 0 || oh_scaled / stride_h >= OH) {
                    continue;
                }
                const int oh = oh_scaled / stride_h;
                for (int kw = 0; kw < KW; ++kw) {
                    const int ow_scaled = iw + pad_w - kw * dil_w;
                    if (ow_scaled < 0 || ow_scaled % stride_w != 0 || ow_scaled / stride_w >= OW) {
                        continue;
                    }
                    const int line = ((c * KH + kh) * KW + kw) * N + n;
                    sum += col[(long long)line * P + oh * OW + ow_scaled / stride_w];
                }
            }
            dx_plane[pixel] = sum;
        }
    }
}
