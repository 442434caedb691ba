// CUDA features used (the kernel emulator supports exactly these): __global__ template<typename T> __restrict__ blockIdx threadIdx blockDim gridDim (.x)
//
// Elementwise epilogues that would otherwise be two or three CuPy kernels each: a layer's bias add
// fused with its ReLU, and ReLU's backward in one pass. Grid-stride over `count` elements.
// ReLU keeps NumPy's rule, np.maximum(v, 0): NaN stays NaN (v <= 0 is false for NaN) and -0 gives +0
// (y + b is -0 when both are -0; `v < 0` would keep it, and the sign of a zero would depend on the device).

// y[i] = act(y[i] + b[(i / inner) % channels]) in place: a Linear's (N, C) output has inner = 1,
// an NCHW output inner = H*W. relu = 0 adds the bias only.
template<typename T>
__global__ void bias_act(
    T* __restrict__ y, const T* __restrict__ b, long long count, int inner, int channels, int relu)
{
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (long long)blockDim.x * gridDim.x) {
        T v = y[i] + b[(i / inner) % channels];
        if (relu && v <= T(0)) {
            v = T(0);
        }
        y[i] = v;
    }
}

// dx = dy where y > 0, else 0 (y: ReLU's output or input; NaN gets 0, as xp.where(y > 0, dy, 0)).
template<typename T>
__global__ void relu_backward(
    const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx, long long count)
{
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (long long)blockDim.x * gridDim.x) {
        dx[i] = y[i] > T(0) ? dy[i] : T(0);
    }
}
