// CUDA features used (the kernel emulator supports exactly these): #define (object-like and function-like macros) __global__ __device__ __forceinline__ template<typename T> template<> (explicit specialisation) __restrict__ blockIdx threadIdx blockDim gridDim (.x .y) min max (int) isnan powf pow __int_as_float __longlong_as_double
//
// 2-D pooling, NCHW, PyTorch semantics: max (padding acts as -inf), avg (count_include_pad),
// lp ((sum x^p)^(1/p)). Forward: one thread per output element. Backward is gather-style: one thread
// per input element loops over the output windows that cover it, so overlapping windows need no
// atomics and the sum runs in a fixed order. Max forward can save each window's argmax (its flat
// offset ih*W + iw in the plane, int32) and max backward reads those indices instead of re-finding
// each covering window's maximum; LP backward takes the forward's output y.
// Launch: grid.y strides over the N*C planes, grid.x over the pixels of one plane (both grid-stride),
// so no 64-bit division is needed per element; offsets into the arrays are long long, and so are
// the grid-stride loop counters: a counter plus the grid's stride passes 2^31 once a plane (or the
// plane count) passes 2^30 even though the count itself fits an int.

template<typename T> __device__ __forceinline__ T negative_infinity();
template<> __device__ __forceinline__ float negative_infinity<float>()
{
    return __int_as_float(0xff800000);  // NVRTC has no INFINITY macro
}
template<> __device__ __forceinline__ double negative_infinity<double>()
{
    return __longlong_as_double(0xfff0000000000000ULL);
}

__device__ __forceinline__ float power(float base, float exponent) { return powf(base, exponent); }
__device__ __forceinline__ double power(double base, double exponent) { return pow(base, exponent); }

// First window position (row-major) holding the maximum; a NaN counts as the maximum and the first
// NaN wins, so NaN propagates to the output and its gradient goes to that NaN.
// Returns the flat offset ih*W + iw inside the plane; the window always holds a real pixel because
// padding <= kernel/2.
template<typename T>
__device__ __forceinline__ int window_argmax(
    const T* __restrict__ plane, int H, int W, int h_start, int w_start, int KH, int KW)
{
    const int h_begin = max(h_start, 0);
    const int w_begin = max(w_start, 0);
    const int h_end = min(h_start + KH, H);
    const int w_end = min(w_start + KW, W);
    int best_offset = h_begin * W + w_begin;
    T best = negative_infinity<T>();
    bool found = false;
    for (int ih = h_begin; ih < h_end; ++ih) {
        for (int iw = w_begin; iw < w_end; ++iw) {
            const T value = plane[ih * W + iw];
            if (isnan(value)) {
                return ih * W + iw;
            }
            if (!found || value > best) {
                best = value;
                best_offset = ih * W + iw;
                found = true;
            }
        }
    }
    return best_offset;
}

// PyTorch's divisor: the window clipped to the padded input when padding counts, else the real pixels.
__device__ __forceinline__ int avg_divisor(
    int H, int W, int h_start, int w_start, int KH, int KW, int pad_h, int pad_w, int count_include_pad)
{
    const int h_end = min(h_start + KH, H + pad_h);
    const int w_end = min(w_start + KW, W + pad_w);
    if (count_include_pad) {
        return (h_end - h_start) * (w_end - w_start);
    }
    return (min(h_end, H) - max(h_start, 0)) * (min(w_end, W) - max(w_start, 0));
}

// Output windows covering input row `i`: o*stride - pad <= i <= o*stride - pad + kernel - 1.
__device__ __forceinline__ int first_window(int i, int kernel, int stride, int pad)
{
    const int lowest = i + pad - kernel + 1;  // o*stride >= lowest
    return lowest <= 0 ? 0 : (lowest + stride - 1) / stride;
}
__device__ __forceinline__ int last_window(int i, int stride, int pad, int out_size)
{
    return min((i + pad) / stride, out_size - 1);
}

// One thread per output pixel (forward) or per input pixel (backward) of each plane.
// The counters are long long (see the top); inside a plane the pixel fits an int (the launcher
// checks H*W and OH*OW), so the bodies cast it once and divide in 32 bits.
#define FOR_EACH_PIXEL(pixel_index, count)                                                 \
    for (long long pixel_index = (long long)blockIdx.x * blockDim.x + threadIdx.x;         \
         pixel_index < (long long)(count); pixel_index += (long long)blockDim.x * gridDim.x)
#define FOR_EACH_PLANE(plane)                                                              \
    for (long long plane = blockIdx.y; plane < (long long)planes; plane += gridDim.y)

// y = the window maximum; with save_indices, indices[o] = its flat offset ih*W + iw in the plane
// (what the backward reads). Without it `indices` is not touched (a 1-element dummy is passed).
template<typename T>
__global__ void max_pool2d_forward(
    const T* __restrict__ x, T* __restrict__ y, int* __restrict__ indices, int save_indices, int planes,
    int H, int W, int OH, int OW, int KH, int KW, int stride_h, int stride_w, int pad_h, int pad_w)
{
    FOR_EACH_PLANE(plane) {
        const T* x_plane = x + plane * H * W;
        T* y_plane = y + plane * OH * OW;
        FOR_EACH_PIXEL(pixel_index, OH * OW) {
            const int pixel = (int)pixel_index;
            const int oh = pixel / OW;
            const int ow = pixel % OW;
            const int winner = window_argmax(
                x_plane, H, W, oh * stride_h - pad_h, ow * stride_w - pad_w, KH, KW);
            y_plane[pixel] = x_plane[winner];
            if (save_indices) {
                indices[plane * OH * OW + pixel] = winner;
            }
        }
    }
}

// dx[q] = sum of dy[o] over the covering windows o whose saved argmax is q, in a fixed order.
template<typename T>
__global__ void max_pool2d_backward(
    const T* __restrict__ dy, const int* __restrict__ indices, T* __restrict__ dx, int planes, int H, int W,
    int OH, int OW, int KH, int KW, int stride_h, int stride_w, int pad_h, int pad_w)
{
    FOR_EACH_PLANE(plane) {
        const int* index_plane = indices + plane * OH * OW;
        const T* dy_plane = dy + plane * OH * OW;
        T* dx_plane = dx + plane * H * W;
        FOR_EACH_PIXEL(pixel_index, H * W) {
            const int pixel = (int)pixel_index;
            const int ih = pixel / W;
            const int iw = pixel % W;
            const int oh_end = last_window(ih, stride_h, pad_h, OH);
            const int ow_end = last_window(iw, stride_w, pad_w, OW);
            T grad = T(0);
            for (int oh = first_window(ih, KH, stride_h, pad_h); oh <= oh_end; ++oh) {
                for (int ow = first_window(iw, KW, stride_w, pad_w); ow <= ow_end; ++ow) {
                    if (index_plane[oh * OW + ow] == pixel) {
                        grad += dy_plane[oh * OW + ow];
                    }
                }
            }
            dx_plane[pixel] = grad;
        }
    }
}

template<typename T>
__global__ void avg_pool2d_forward(
    const T* __restrict__ x, T* __restrict__ y, int planes, int H, int W, int OH, int OW,
    int KH, int KW, int stride_h, int stride_w, int pad_h, int pad_w, int count_include_pad)
{
    FOR_EACH_PLANE(plane) {
        const T* x_plane = x + plane * H * W;
        T* y_plane = y + plane * OH * OW;
        FOR_EACH_PIXEL(pixel_index, OH * OW) {
            const int pixel = (int)pixel_index;
            const int h_start = (pixel / OW) * stride_h - pad_h;
            const int w_start = (pixel % OW) * stride_w - pad_w;
            const int h_end = min(h_start + KH, H);
            const int w_end = min(w_start + KW, W);
            T sum = T(0);
            for (int ih = max(h_start, 0); ih < h_end; ++ih) {
                for (int iw = max(w_start, 0); iw < w_end; ++iw) {
                    sum += x_plane[ih * W + iw];
                }
            }
            const int divisor = avg_divisor(H, W, h_start, w_start, KH, KW, pad_h, pad_w, count_include_pad);
            y_plane[pixel] = sum / T(divisor);
        }
    }
}

template<typename T>
__global__ void avg_pool2d_backward(
    const T* __restrict__ dy, T* __restrict__ dx, int planes, int H, int W, int OH, int OW,
    int KH, int KW, int stride_h, int stride_w, int pad_h, int pad_w, int count_include_pad)
{
    FOR_EACH_PLANE(plane) {
        const T* dy_plane = dy + plane * OH * OW;
        T* dx_plane = dx + plane * H * W;
        FOR_EACH_PIXEL(pixel_index, H * W) {
            const int pixel = (int)pixel_index;
            const int ih = pixel / W;
            const int iw = pixel % W;
            const int oh_end = last_window(ih, stride_h, pad_h, OH);
            const int ow_end = last_window(iw, stride_w, pad_w, OW);
            T grad = T(0);
            for (int oh = first_window(ih, KH, stride_h, pad_h); oh <= oh_end; ++oh) {
                for (int ow = first_window(iw, KW, stride_w, pad_w); ow <= ow_end; ++ow) {
                    const int divisor = avg_divisor(H, W, oh * stride_h - pad_h, ow * stride_w - pad_w,
                                                    KH, KW, pad_h, pad_w, count_include_pad);
                    grad += dy_plane[oh * OW + ow] / T(divisor);
                }
            }
            dx_plane[pixel] = grad;
        }
    }
}

// y = (sum over the window of x^p)^(1/p); padded positions contribute nothing.
template<typename T>
__global__ void lp_pool2d_forward(
    const T* __restrict__ x, T* __restrict__ y, int planes, int H, int W, int OH, int OW,
    int KH, int KW, int stride_h, int stride_w, int pad_h, int pad_w, T norm_type)
{
    FOR_EACH_PLANE(plane) {
        const T* x_plane = x + plane * H * W;
        T* y_plane = y + plane * OH * OW;
        FOR_EACH_PIXEL(pixel_index, OH * OW) {
            const int pixel = (int)pixel_index;
            const int h_start = (pixel / OW) * stride_h - pad_h;
            const int w_start = (pixel % OW) * stride_w - pad_w;
            const int h_end = min(h_start + KH, H);
            const int w_end = min(w_start + KW, W);
            T sum = T(0);
            for (int ih = max(h_start, 0); ih < h_end; ++ih) {
                for (int iw = max(w_start, 0); iw < w_end; ++iw) {
                    sum += power(x_plane[ih * W + iw], norm_type);
                }
            }
            y_plane[pixel] = power(sum, T(1) / norm_type);
        }
    }
}

// d y / d x_i = x_i^(p-1) * S^(1/p - 1) = (x_i / y)^(p-1), with S = y^p the window's sum;
// 0 where y == 0 (the sum vanished), which also keeps 0/0 out.
template<typename T>
__global__ void lp_pool2d_backward(
    const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ y, T* __restrict__ dx,
    int planes, int H, int W, int OH, int OW, int KH, int KW, int stride_h, int stride_w,
    int pad_h, int pad_w, T norm_type)
{
    FOR_EACH_PLANE(plane) {
        const T* x_plane = x + plane * H * W;
        const T* y_plane = y + plane * OH * OW;
        const T* dy_plane = dy + plane * OH * OW;
        T* dx_plane = dx + plane * H * W;
        FOR_EACH_PIXEL(pixel_index, H * W) {
            const int pixel = (int)pixel_index;
            const int ih = pixel / W;
            const int iw = pixel % W;
            const T value = x_plane[pixel];
            const int oh_end = last_window(ih, stride_h, pad_h, OH);
            const int ow_end = last_window(iw, stride_w, pad_w, OW);
            T grad = T(0);
            for (int oh = first_window(ih, KH, stride_h, pad_h); oh <= oh_end; ++oh) {
                for (int ow = first_window(iw, KW, stride_w, pad_w); ow <= ow_end; ++ow) {
                    const T out = y_plane[oh * OW + ow];
                    if (out != T(0)) {
                        grad += dy_plane[oh * OW + ow] * power(value / out, norm_type - T(1));
                    }
                }
            }
            dx_plane[pixel] = grad;
        }
    }
}
