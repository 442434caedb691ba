// CUDA features used (the kernel emulator supports exactly these): #define (constants) __global__ template<typename T> __restrict__ blockIdx threadIdx blockDim gridDim (.x) sqrt
//
// The optimizers' update of every parameter in one launch: parameters, gradients and state are
// flat buffers (gpuconv/optim.py makes each Parameter's .data and .grad a view into them), so a
// step is one kernel instead of a few elementwise kernels per parameter. The hyperparameters are
// read from a small device array, not passed as kernel arguments: a captured CUDA graph replays its
// kernels with the arguments of the capture, and lr (schedules) and Adam's bias correction change.
// Each element follows the arithmetic of optim.py's NumPy path in the same order, in T.

// hyper: [lr, momentum, weight_decay]; flags: 1 = momentum, 2 = nesterov, 4 = weight decay.
template<typename T>
__global__ void sgd_update(
    T* __restrict__ w, const T* __restrict__ g, T* __restrict__ velocity, const T* __restrict__ hyper,
    long long count, int flags)
{
    const T lr = hyper[0];
    const T momentum = hyper[1];
    const T weight_decay = hyper[2];
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (long long)blockDim.x * gridDim.x) {
        T grad = g[i];
        if (flags & 4) {
            grad = grad + weight_decay * w[i];
        }
        if (flags & 1) {
            T v = velocity[i] * momentum;
            v = v + grad;
            velocity[i] = v;
            grad = (flags & 2) ? grad + momentum * v : v;
        }
        w[i] = w[i] - lr * grad;
    }
}

// hyper: [step_size, beta1, 1 - beta1, beta2, 1 - beta2, eps, weight_decay]; step_size carries the
// bias correction (lr * sqrt(1 - beta2^t) / (1 - beta1^t)), computed on the host per step.
template<typename T>
__global__ void adam_update(
    T* __restrict__ w, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v,
    const T* __restrict__ hyper, long long count, int flags)
{
    const T step_size = hyper[0];
    const T beta1 = hyper[1];
    const T one_minus_beta1 = hyper[2];
    const T beta2 = hyper[3];
    const T one_minus_beta2 = hyper[4];
    const T eps = hyper[5];
    const T weight_decay = hyper[6];
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (long long)blockDim.x * gridDim.x) {
        T grad = g[i];
        if (flags & 4) {
            grad = grad + weight_decay * w[i];
        }
        T m_i = m[i] * beta1;
        m_i = m_i + one_minus_beta1 * grad;
        T v_i = v[i] * beta2;
        v_i = v_i + (one_minus_beta2 * grad) * grad;
        m[i] = m_i;
        v[i] = v_i;
        w[i] = w[i] - (step_size * m_i) / (sqrt(v_i) + eps);
    }
}
