// Block-wide tree reductions: one with the barriers a shared-memory tree needs, one without.
#define THREADS 256

extern "C" __global__ void __launch_bounds__(THREADS) block_sum(const float* __restrict__ x, float* __restrict__ out, int n)
{
    __shared__ float partial[THREADS];
    const int tid = threadIdx.x;
    const int i = blockIdx.x * THREADS + tid;
    partial[tid] = i < n ? x[i] : 0.0f;
    __syncthreads();
    for (int half = THREADS / 2; half > 0; half >>= 1) {
        if (tid < half) {
            partial[tid] += partial[tid + half];
        }
        __syncthreads();
    }
    if (tid == 0) {
        out[blockIdx.x] = partial[0];
    }
}

// The same tree with every __syncthreads dropped: a thread may read a partial sum before its
// owner wrote it.
extern "C" __global__ void block_sum_unsynced(const float* __restrict__ x, float* __restrict__ out, int n)
{
    __shared__ float partial[THREADS];
    const int tid = threadIdx.x;
    const int i = blockIdx.x * THREADS + tid;
    partial[tid] = i < n ? x[i] : 0.0f;
    for (int half = THREADS / 2; half > 0; half >>= 1) {
        if (tid < half) {
            partial[tid] += partial[tid + half];
        }
    }
    if (tid == 0) {
        out[blockIdx.x] = partial[0];
    }
}

// Templated, with dynamic shared memory sized by the launch: out = reverse of x within a block.
template<typename T>
__global__ void reverse_in_block(const T* __restrict__ x, T* __restrict__ out)
{
    extern __shared__ __align__(16) unsigned char raw[];
    T* buffer = reinterpret_cast<T*>(raw);
    const int tid = threadIdx.x;
    const long long base = (long long)blockIdx.x * blockDim.x;
    buffer[tid] = x[base + tid];
    __syncthreads();
    out[base + tid] = buffer[blockDim.x - 1 - tid];
}
