// Small kernels that pin down the emulator's execution model (tests/test_emulator.py).

// Writes only the first half of a shared array, then copies all of it out: the second half shows
// what unwritten shared memory reads as.
extern "C" __global__ void read_unwritten_shared(float* __restrict__ out, int* __restrict__ out_int)
{
    __shared__ float values[64];
    __shared__ int counts[64];
    const int tid = threadIdx.x;
    if (tid < 32) {
        values[tid] = (float)tid;
        counts[tid] = tid;
    }
    __syncthreads();
    out[tid] = values[tid];
    out_int[tid] = counts[tid];
}

// Dynamic shared memory: half of it written, then all of it read back.
extern "C" __global__ void read_dynamic_shared(double* __restrict__ out)
{
    extern __shared__ double scratch[];
    const int tid = threadIdx.x;
    if (tid % 2 == 0) {
        scratch[tid] = 2.0 * tid;
    }
    __syncthreads();
    out[blockIdx.x * blockDim.x + tid] = scratch[tid];
}

// Thread 3 returns before the barrier the others wait at.
extern "C" __global__ void early_exit(float* __restrict__ out)
{
    if (threadIdx.x == 3) {
        return;
    }
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}

// Odd threads wait at one barrier, even threads at another.
extern "C" __global__ void divergent_barriers(float* __restrict__ out)
{
    if (threadIdx.x % 2) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1.0f;
}

// Every thread records its (blockIdx, threadIdx, blockDim, gridDim) at its global linear index.
extern "C" __global__ void record_indices(int* __restrict__ out)
{
    const long long block = ((long long)blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    const long long thread = ((long long)threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    int* row = out + (block * blockDim.x * blockDim.y * blockDim.z + thread) * 12;
    row[0] = blockIdx.x; row[1] = blockIdx.y; row[2] = blockIdx.z;
    row[3] = threadIdx.x; row[4] = threadIdx.y; row[5] = threadIdx.z;
    row[6] = blockDim.x; row[7] = blockDim.y; row[8] = blockDim.z;
    row[9] = gridDim.x; row[10] = gridDim.y; row[11] = gridDim.z;
}

// The order in which the threads run: order[total] is a counter in global memory (fibers run one
// at a time, so this is race-free there, and only there).
extern "C" __global__ void record_order(int* __restrict__ order)
{
    const int total = blockDim.x * gridDim.x;
    const int slot = order[total]++;
    order[slot] = blockIdx.x * blockDim.x + threadIdx.x;
}

// 64-bit indexing and by-value 64-bit and 32-bit parameters of every kind.
extern "C" __global__ void index64(double* __restrict__ out, long long base, unsigned long long mask,
                                   int scale, float offset, double factor, long long n)
{
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        out[i] = (double)((base + i * scale) & (long long)mask) * factor + offset;
    }
}

// Argument checking: a float array, a float and an int.
extern "C" __global__ void scale(float* __restrict__ x, float factor, int n)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        x[i] *= factor;
    }
}

// Planted bug: the last thread writes one element past the end of `out`.
extern "C" __global__ void write_past_end(float* __restrict__ out, int n)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) {
        out[i] = 1.0f;
    }
}

// Planted bug: reads one element past a static shared array.
extern "C" __global__ void shared_past_end(float* __restrict__ out)
{
    __shared__ float tile[32];
    tile[threadIdx.x] = (float)threadIdx.x;
    __syncthreads();
    out[threadIdx.x] = tile[threadIdx.x + 1];
}

// Device math and min/max overloads the emulator provides.
extern "C" __global__ void math_functions(const float* __restrict__ x, float* __restrict__ out_f,
                                          const double* __restrict__ xd, double* __restrict__ out_d,
                                          long long* __restrict__ out_i)
{
    const float v = x[0];
    const double d = xd[0];
    out_f[0] = expf(v); out_f[1] = logf(v); out_f[2] = powf(v, 1.5f); out_f[3] = sqrtf(v);
    out_f[4] = fabsf(-v); out_f[5] = fmaxf(v, NAN); out_f[6] = fminf(v, 2.0f); out_f[7] = rsqrtf(v);
    out_f[8] = __int_as_float(__float_as_int(v)); out_f[9] = max(v, 1.0f); out_f[10] = min(v, 1.0f);
    out_f[11] = isnan(v) ? 1.0f : 0.0f; out_f[12] = exp(v); out_f[13] = max(v, NAN);
    out_d[0] = exp(d); out_d[1] = log(d); out_d[2] = pow(d, 1.5); out_d[3] = sqrt(d); out_d[4] = fabs(-d);
    out_d[5] = fmax(d, 0.5); out_d[6] = fmin(d, 0.5); out_d[7] = __longlong_as_double(__double_as_longlong(d));
    out_d[8] = max(d, 1.0f);
    out_i[0] = min(-1, 2u);           // mixed signedness goes unsigned, as in CUDA
    out_i[1] = max(-3, 2);
    out_i[2] = min(-5ll, 3ll);
    out_i[3] = max(4294967296ll, 7ll);
}
