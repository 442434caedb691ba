// CPU emulation of the CUDA execution model, for running gpuconv's .cu kernels where no GPU exists.
//
// A kernel source is included into one C++ translation unit after this header (see
// gpuconv/cuda/emulate.py, which also rewrites `__shared__` declarations into calls below).
// Every CUDA thread of a block is a fiber (or, in the "threads" mode built for ThreadSanitizer, an
// OS thread). Blocks run one after another. A block runs in barrier phases: each live thread runs
// until it reaches __syncthreads() or returns, in forward, reverse or shuffled thread order, and a
// phase ends only when every live thread has arrived. A thread that returns while others wait at a
// barrier, or threads waiting at different barriers, abort the launch with an error.
// Shared memory is per block and filled with 0xFF bytes (a NaN in float and double, -1 in ints)
// before each block, so a read of shared memory no thread wrote shows up in the results.
//
// Only the CUDA subset gpuconv's kernels use is defined here; anything else fails to compile,
// which is the point: it tells us a kernel left the supported subset.
#pragma once

#ifndef EMU_THREADS
#define EMU_THREADS 0
#endif
#if !EMU_THREADS && (defined(EMU_USE_UCONTEXT) || !defined(__x86_64__))
#define EMU_UCONTEXT 1
#else
#define EMU_UCONTEXT 0
#endif
#if defined(__SANITIZE_ADDRESS__)
#define EMU_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#else
#define EMU_ASAN 0
#endif
#ifndef EMU_STACK_SIZE
#define EMU_STACK_SIZE (EMU_ASAN ? 256 * 1024 : 64 * 1024)
#endif

#include <cmath>
#include <math.h>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <mutex>
#include <random>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>
#include <sys/mman.h>
#include <unistd.h>
#if EMU_THREADS
#include <atomic>
#include <climits>
#include <condition_variable>
#include <memory>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <string>
#include <thread>
#endif
#if EMU_UCONTEXT
#include <ucontext.h>
#endif

// ---------------------------------------------------------------------------------------------
// CUDA keywords and built-in types

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// __restrict__ is a g++ keyword already.

struct uint3 {
    unsigned int x, y, z;
};

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

namespace emu {

struct Dim3 {  // the launch configuration as Python passes it: three uint32
    unsigned int x, y, z;
};

// Per-parameter facts the Python side checks arguments against.
enum Kind { KIND_POINTER = 0, KIND_SIGNED = 1, KIND_UNSIGNED = 2, KIND_FLOAT = 3, KIND_BOOL = 4,
            KIND_OTHER = 5, KIND_VOID = 6 };
struct ParamInfo {
    int size, kind, pointee_size, pointee_kind;
};

enum Order { ORDER_FORWARD = 0, ORDER_REVERSE = 1, ORDER_RANDOM = 2 };

constexpr size_t kSharedLimit = 48 * 1024;  // static + dynamic shared memory a block may use
constexpr unsigned kMaxThreads = 1024;

// Thrown inside a CUDA thread to abort the launch (caught at the thread's entry).
struct Fault {
    char message[512];
};

[[noreturn]] inline void fault(const char* format, ...) {
    Fault f;
    va_list args;
    va_start(args, format);
    vsnprintf(f.message, sizeof f.message, format, args);
    va_end(args);
    throw f;
}

// Block-wide state: written before a block starts, only read while it runs.
inline uint3 g_block_idx;
inline dim3 g_block_dim;
inline dim3 g_grid_dim;
inline unsigned long long g_block_serial = 0;  // changes per block: invalidates shared_var caches
inline size_t g_static_shared_used = 0;
inline size_t g_dynamic_shared_size = 0;
inline unsigned char* g_dynamic_shared = nullptr;
#if EMU_ASAN
inline std::vector<void*> g_shared_allocations;  // one malloc per array: ASan sees its bounds
#else
alignas(64) inline unsigned char g_shared_arena[kSharedLimit];
#endif
#if EMU_THREADS
inline std::mutex g_shared_mutex;
#endif

inline void* shared_alloc(size_t size) {
    size_t offset = (g_static_shared_used + 15) & ~size_t(15);
    if (offset + size + g_dynamic_shared_size > kSharedLimit) {
        fault("static __shared__ arrays (%zu bytes) plus dynamic shared memory (%zu bytes) exceed the "
              "%zu bytes a block may use", offset + size, g_dynamic_shared_size, kSharedLimit);
    }
    g_static_shared_used = offset + size;
#if EMU_ASAN
    void* p = malloc(size ? size : 1);
    g_shared_allocations.push_back(p);
#else
    void* p = g_shared_arena + offset;
#endif
    memset(p, 0xFF, size);
    return p;
}

// `__shared__ T name[A][B];` in a kernel becomes `auto& name = emu::shared_var<T[A][B], ID>();`:
// one object per block, shared by all its threads, allocated (and NaN-filled) on first use.
template <class T, int ID>
T& shared_var() {
#if EMU_THREADS
    // Lock-free once allocated: a mutex taken here by every thread would let ThreadSanitizer order
    // threads that never synchronise on a GPU (see BlockBarrier).
    static std::atomic<void*> storage{nullptr};
    static std::atomic<unsigned long long> serial{0};
    if (serial.load(std::memory_order_acquire) != g_block_serial) {
        std::lock_guard<std::mutex> lock(g_shared_mutex);
        if (serial.load(std::memory_order_relaxed) != g_block_serial) {
            storage.store(shared_alloc(sizeof(T)), std::memory_order_relaxed);
            serial.store(g_block_serial, std::memory_order_release);
        }
    }
    return *static_cast<T*>(storage.load(std::memory_order_relaxed));
#else
    static void* storage = nullptr;
    static unsigned long long serial = 0;
    if (serial != g_block_serial) {
        storage = shared_alloc(sizeof(T));
        serial = g_block_serial;
    }
    return *static_cast<T*>(storage);
#endif
}

// `extern __shared__ T name[];` becomes `T* name = emu::dynamic_shared<T>();`.
template <class T>
T* dynamic_shared() {
    return reinterpret_cast<T*>(g_dynamic_shared);
}

// ---------------------------------------------------------------------------------------------
// CUDA threads

enum State { RUNNABLE = 0, WAITING = 1, DONE = 2, FAULTED = 3 };

inline void (*g_body)(void*) = nullptr;  // runs the kernel with the launch's arguments
inline void* g_body_context = nullptr;

#if EMU_THREADS

inline thread_local uint3 t_thread_idx;

// A __syncthreads barrier for OS threads that also notices misuse. Built on atomics and raw futex
// calls, not on a mutex, on purpose: ThreadSanitizer derives happens-before from every lock, and a
// mutex taken when a thread leaves the barrier would order it after whatever its neighbours did
// since, hiding exactly the races (a missing second __syncthreads) this mode exists to find. Here a
// departing thread synchronises only with the arrivals of the barrier it leaves.
inline void futex_wait(std::atomic<unsigned>* word, unsigned expected) {
    syscall(SYS_futex, reinterpret_cast<unsigned*>(word), FUTEX_WAIT_PRIVATE, expected, nullptr, nullptr, 0);
}
inline void futex_wake_all(std::atomic<unsigned>* word) {
    syscall(SYS_futex, reinterpret_cast<unsigned*>(word), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
}

struct BlockBarrier {
    unsigned expected = 0;
    // Threads waiting at the barrier (low 32 bits) and threads that returned (high 32 bits) in one
    // word, so "a thread returned while another waits" is decided by one atomic order, whichever
    // of the two comes first.
    std::atomic<unsigned long long> state{0};
    std::atomic<unsigned> generation{0};
    std::atomic<int> line{-1};
    std::atomic<bool> failed{false};
    std::mutex message_mutex;  // only on the error path
    std::string message;

    void fail(const std::string& why) {
        {
            std::lock_guard<std::mutex> lock(message_mutex);
            if (message.empty()) {
                message = why;
            }
        }
        failed.store(true);
        generation.fetch_add(1);
        futex_wake_all(&generation);
    }
};
inline BlockBarrier* g_barrier = nullptr;
constexpr unsigned long long kExited = 1ull << 32;

inline std::string thread_name(uint3 t) {
    return "thread (" + std::to_string(t.x) + "," + std::to_string(t.y) + "," + std::to_string(t.z) + ")";
}

inline void syncthreads(int line) {
    BlockBarrier& b = *g_barrier;
    if (b.failed.load()) {
        return;  // the launch is already lost; let the threads run out
    }
    // Both before arriving: neither the generation nor the barrier's line can move without us.
    const unsigned generation = b.generation.load();
    int first_line = -1;
    if (!b.line.compare_exchange_strong(first_line, line) && first_line != line) {
        b.fail(thread_name(t_thread_idx) + " waits at __syncthreads on line " + std::to_string(line) +
               " while other threads wait at the one on line " + std::to_string(first_line));
        return;
    }
    const unsigned long long before = b.state.fetch_add(1);
    if (const unsigned exited = (unsigned)(before >> 32)) {
        b.fail(thread_name(t_thread_idx) + " reached __syncthreads (line " + std::to_string(line) +
               ") after " + std::to_string(exited) + " thread(s) of its block returned");
        return;
    }
    if ((unsigned)before + 1 == b.expected) {  // the last to arrive releases the others
        b.line.store(-1);
        b.state.fetch_sub(b.expected);
        b.generation.fetch_add(1);
        futex_wake_all(&b.generation);
        return;
    }
    while (b.generation.load() == generation && !b.failed.load()) {
        futex_wait(&b.generation, generation);
    }
}

inline void thread_exit(uint3 tid, const char* fault_message) {
    BlockBarrier& b = *g_barrier;
    const unsigned long long before = b.state.fetch_add(kExited);
    if (fault_message) {
        b.fail(thread_name(tid) + ": " + fault_message);
    } else if (const unsigned waiting = (unsigned)before) {
        b.fail(thread_name(tid) + " returned while " + std::to_string(waiting) +
               " thread(s) of its block wait at __syncthreads (line " + std::to_string(b.line.load()) + ")");
    }
}

#else  // fibers

struct Fiber {
    uint3 thread_idx;
    int state;
    int barrier_line;
    void* sp;  // saved stack pointer while switched out
    unsigned char* stack_lo;
#if EMU_UCONTEXT
    ucontext_t context;
#endif
#if EMU_ASAN
    void* fake_stack;
#endif
};

inline Fiber* g_current = nullptr;
inline void* g_main_sp = nullptr;
#if EMU_UCONTEXT
inline ucontext_t g_main_context;
#endif
#if EMU_ASAN
inline const void* g_main_stack_bottom = nullptr;
inline size_t g_main_stack_size = 0;
inline void* g_main_fake_stack = nullptr;
#endif
inline Fault g_fault;

inline void syncthreads(int line);

#endif  // EMU_THREADS

}  // namespace emu

#if EMU_THREADS
#define threadIdx (static_cast<const uint3&>(::emu::t_thread_idx))
#else
#define threadIdx (static_cast<const uint3&>(::emu::g_current->thread_idx))
#endif
#define blockIdx (static_cast<const uint3&>(::emu::g_block_idx))
#define blockDim (static_cast<const dim3&>(::emu::g_block_dim))
#define gridDim (static_cast<const dim3&>(::emu::g_grid_dim))
#define __syncthreads() ::emu::syncthreads(__LINE__)

// ---------------------------------------------------------------------------------------------
// Device math: what CUDA offers beyond <cmath>

inline float __int_as_float(int v) { float r; memcpy(&r, &v, sizeof r); return r; }
inline int __float_as_int(float v) { int r; memcpy(&r, &v, sizeof r); return r; }
inline double __longlong_as_double(long long v) { double r; memcpy(&r, &v, sizeof r); return r; }
inline long long __double_as_longlong(double v) { long long r; memcpy(&r, &v, sizeof r); return r; }
inline float rsqrtf(float v) { return 1.0f / sqrtf(v); }
inline double rsqrt(double v) { return 1.0 / sqrt(v); }

// min/max with exactly the overloads of CUDA's math_functions.hpp: mixed signedness goes unsigned,
// floating point goes through fminf/fmaxf (so a NaN operand is dropped, as on the GPU), and a
// mix CUDA finds ambiguous (int with long long) does not compile here either.
#define EMU_MINMAX_INT(A, B, R)                                                   \
    inline R min(A a, B b) { return (R)a < (R)b ? (R)a : (R)b; }                  \
    inline R max(A a, B b) { return (R)a > (R)b ? (R)a : (R)b; }
EMU_MINMAX_INT(int, int, int)
EMU_MINMAX_INT(unsigned int, unsigned int, unsigned int)
EMU_MINMAX_INT(int, unsigned int, unsigned int)
EMU_MINMAX_INT(unsigned int, int, unsigned int)
EMU_MINMAX_INT(long, long, long)
EMU_MINMAX_INT(unsigned long, unsigned long, unsigned long)
EMU_MINMAX_INT(long, unsigned long, unsigned long)
EMU_MINMAX_INT(unsigned long, long, unsigned long)
EMU_MINMAX_INT(long long, long long, long long)
EMU_MINMAX_INT(unsigned long long, unsigned long long, unsigned long long)
EMU_MINMAX_INT(long long, unsigned long long, unsigned long long)
EMU_MINMAX_INT(unsigned long long, long long, unsigned long long)
#undef EMU_MINMAX_INT
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(float a, double b) { return fmin((double)a, b); }
inline double max(float a, double b) { return fmax((double)a, b); }
inline double min(double a, float b) { return fmin(a, (double)b); }
inline double max(double a, float b) { return fmax(a, (double)b); }

// ---------------------------------------------------------------------------------------------
// Fiber switching

#if !EMU_THREADS
#if !EMU_UCONTEXT
// emu_switch_context(save, next): push the callee-saved registers, store the stack pointer in *save,
// load `next` and pop the registers saved there. The floating-point control words are not
// switched: kernels never change rounding modes. A new fiber's stack is prepared to "return" into
// emu_fiber_trampoline, which calls emu_fiber_entry() with a 16-byte aligned stack.
asm(R"(
    .text
    .p2align 4
    .globl emu_switch_context
    .hidden emu_switch_context
    .type emu_switch_context, @function
emu_switch_context:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch_context, .-emu_switch_context

    .p2align 4
    .globl emu_fiber_trampoline
    .hidden emu_fiber_trampoline
    .type emu_fiber_trampoline, @function
emu_fiber_trampoline:
    call emu_fiber_entry
    ud2
    .size emu_fiber_trampoline, .-emu_fiber_trampoline
)");
extern "C" void emu_switch_context(void** save, void* next) __attribute__((visibility("hidden")));
extern "C" void emu_fiber_trampoline() __attribute__((visibility("hidden")));
#endif

namespace emu {

inline void switch_to_fiber(Fiber* f) {
    g_current = f;
#if EMU_ASAN
    __sanitizer_start_switch_fiber(&g_main_fake_stack, f->stack_lo, EMU_STACK_SIZE);
#endif
#if EMU_UCONTEXT
    swapcontext(&g_main_context, &f->context);
#else
    emu_switch_context(&g_main_sp, f->sp);
#endif
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(g_main_fake_stack, nullptr, nullptr);
#endif
}

inline void switch_to_scheduler(Fiber* f, bool finished) {
#if EMU_ASAN
    __sanitizer_start_switch_fiber(finished ? nullptr : &f->fake_stack, g_main_stack_bottom,
                                   g_main_stack_size);
#else
    (void)finished;
#endif
#if EMU_UCONTEXT
    swapcontext(&f->context, &g_main_context);
#else
    emu_switch_context(&f->sp, g_main_sp);
#endif
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(f->fake_stack, &g_main_stack_bottom, &g_main_stack_size);
#endif
}

inline void syncthreads(int line) {
    Fiber* f = g_current;
    f->state = WAITING;
    f->barrier_line = line;
    switch_to_scheduler(f, false);
}

}  // namespace emu

extern "C" __attribute__((visibility("hidden"), used)) void emu_fiber_entry() {
    emu::Fiber* f = emu::g_current;
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &emu::g_main_stack_bottom, &emu::g_main_stack_size);
#endif
    try {
        emu::g_body(emu::g_body_context);
        f->state = emu::DONE;
    } catch (const emu::Fault& fault) {
        emu::g_fault = fault;
        f->state = emu::FAULTED;
    }
    emu::switch_to_scheduler(f, true);
    __builtin_trap();  // a finished fiber is never resumed
}

namespace emu {

// Fibers and their stacks live for the whole process and grow to the largest block seen, so a
// launch allocates nothing per thread. Each stack has a PROT_NONE guard page below it.
inline std::vector<Fiber> g_fibers;
inline std::vector<unsigned char*> g_stacks;

inline bool ensure_fibers(unsigned n, char* err, size_t errlen) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    while (g_stacks.size() < n) {
        void* p = mmap(nullptr, EMU_STACK_SIZE + page, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) {
            snprintf(err, errlen, "could not map a %d-byte fiber stack", (int)EMU_STACK_SIZE);
            return false;
        }
        mprotect(p, page, PROT_NONE);
        g_stacks.push_back(static_cast<unsigned char*>(p) + page);
    }
    if (g_fibers.size() < n) {
        g_fibers.resize(n);
    }
    return true;
}

inline void prepare_fiber(Fiber& f, unsigned index) {
    f.state = RUNNABLE;
    f.barrier_line = -1;
    f.stack_lo = g_stacks[index];
#if EMU_UCONTEXT
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack_lo;
    f.context.uc_stack.ss_size = EMU_STACK_SIZE;
    f.context.uc_link = nullptr;
    makecontext(&f.context, emu_fiber_entry, 0);
#else
    uint64_t* sp = reinterpret_cast<uint64_t*>(f.stack_lo + EMU_STACK_SIZE - 16);
    *--sp = reinterpret_cast<uint64_t>(&emu_fiber_trampoline);
    for (int i = 0; i < 6; ++i) {
        *--sp = 0;  // rbp rbx r12 r13 r14 r15
    }
    f.sp = sp;
#endif
}

inline void format_thread(char* out, size_t size, uint3 t) {
    snprintf(out, size, "thread (%u,%u,%u)", t.x, t.y, t.z);
}

// Runs one block to completion. false + message in err on misuse or a fault.
inline bool run_block(unsigned n, int order, std::mt19937_64& rng, char* err, size_t errlen) {
    const dim3 b = g_block_dim;
    for (unsigned i = 0; i < n; ++i) {
        g_fibers[i].thread_idx = uint3{i % b.x, (i / b.x) % b.y, i / (b.x * b.y)};
        prepare_fiber(g_fibers[i], i);
    }
    static std::vector<unsigned> schedule;
    schedule.resize(n);
    for (unsigned i = 0; i < n; ++i) {
        schedule[i] = order == ORDER_REVERSE ? n - 1 - i : i;
    }
    for (unsigned phase = 0;; ++phase) {
        if (order == ORDER_RANDOM) {
            std::shuffle(schedule.begin(), schedule.end(), rng);
        }
        for (unsigned i : schedule) {
            Fiber& f = g_fibers[i];
            if (f.state != RUNNABLE) {
                continue;
            }
            switch_to_fiber(&f);
            if (f.state == FAULTED) {
                char who[64];
                format_thread(who, sizeof who, f.thread_idx);
                snprintf(err, errlen, "%s: %s", who, g_fault.message);
                return false;
            }
        }
        const Fiber* waiting = nullptr;
        const Fiber* done = nullptr;
        unsigned waiting_count = 0;
        for (unsigned i = 0; i < n; ++i) {
            const Fiber& f = g_fibers[i];
            if (f.state == WAITING) {
                if (waiting && waiting->barrier_line != f.barrier_line) {
                    char a[64], c[64];
                    format_thread(a, sizeof a, waiting->thread_idx);
                    format_thread(c, sizeof c, f.thread_idx);
                    snprintf(err, errlen, "%s waits at the __syncthreads on line %d while %s waits at "
                             "the one on line %d (barrier %u): every thread of a block must reach the "
                             "same __syncthreads", a, waiting->barrier_line, c, f.barrier_line, phase + 1);
                    return false;
                }
                waiting = waiting ? waiting : &f;
                ++waiting_count;
            } else if (f.state == DONE && !done) {
                done = &f;
            }
        }
        if (!waiting) {
            return true;
        }
        if (done) {
            char a[64], c[64];
            format_thread(a, sizeof a, done->thread_idx);
            format_thread(c, sizeof c, waiting->thread_idx);
            snprintf(err, errlen, "%s returned while %u thread(s) of its block, e.g. %s, wait at "
                     "__syncthreads (line %d, barrier %u): a __syncthreads must be reached by every "
                     "thread of the block, so threads may only return after the last one",
                     a, waiting_count, c, waiting->barrier_line, phase + 1);
            return false;
        }
        for (unsigned i = 0; i < n; ++i) {
            g_fibers[i].state = RUNNABLE;
        }
    }
}

inline void forget_abandoned_fibers(unsigned n) {
#if EMU_ASAN
    // Fibers left waiting at a barrier never unwound their frames: clear their stacks' poison.
    for (unsigned i = 0; i < n; ++i) {
        ASAN_UNPOISON_MEMORY_REGION(g_stacks[i], EMU_STACK_SIZE);
    }
#else
    (void)n;
#endif
}

}  // namespace emu
#endif  // !EMU_THREADS

// ---------------------------------------------------------------------------------------------
// Launch

namespace emu {

#if EMU_THREADS
// One OS thread per CUDA thread of a block, started once per launch and reused for every block
// (thread creation under TSan costs far more than running a small block). Blocks still run one
// after another: the pool's mutex orders each block's work after the previous block's.
class WorkerPool {
public:
    WorkerPool(unsigned n, int order, std::mt19937_64& rng) : workers_(n) {
        std::vector<unsigned> slots(n);
        for (unsigned i = 0; i < n; ++i) {
            slots[i] = order == ORDER_REVERSE ? n - 1 - i : i;
        }
        if (order == ORDER_RANDOM) {
            std::shuffle(slots.begin(), slots.end(), rng);
        }
        threads_.reserve(n);
        for (unsigned i = 0; i < n; ++i) {
            workers_[i].linear = slots[i];
            threads_.emplace_back([this, i] { work(workers_[i]); });
        }
    }

    ~WorkerPool() {
        for (Worker& w : workers_) {
            {
                std::lock_guard<std::mutex> lock(w.mutex);
                w.quit = true;
            }
            w.wake.notify_all();
        }
        for (auto& t : threads_) {
            t.join();
        }
    }

    bool run_block(char* err, size_t errlen) {
        BlockBarrier barrier;
        barrier.expected = (unsigned)workers_.size();
        g_barrier = &barrier;
        ++generation_;
        // Each worker synchronises only with this thread, never with another worker.
        for (Worker& w : workers_) {
            {
                std::lock_guard<std::mutex> lock(w.mutex);
                w.start = generation_;
                w.done = false;
            }
            w.wake.notify_all();
        }
        for (Worker& w : workers_) {
            std::unique_lock<std::mutex> lock(w.mutex);
            w.wake.wait(lock, [&] { return w.done; });
        }
        g_barrier = nullptr;
        if (barrier.failed.load()) {
            snprintf(err, errlen, "%s", barrier.message.c_str());
            return false;
        }
        return true;
    }

private:
    struct Worker {
        unsigned linear = 0;  // this worker's CUDA thread, as x + y*bx + z*bx*by
        std::mutex mutex;
        std::condition_variable wake;
        unsigned start = 0;
        bool done = false, quit = false;
    };

    void work(Worker& w) {
        unsigned seen = 0;
        for (;;) {
            {
                std::unique_lock<std::mutex> lock(w.mutex);
                w.wake.wait(lock, [&] { return w.quit || w.start != seen; });
                if (w.quit) {
                    return;
                }
                seen = w.start;
            }
            const dim3 b = g_block_dim;
            const uint3 tid{w.linear % b.x, (w.linear / b.x) % b.y, w.linear / (b.x * b.y)};
            t_thread_idx = tid;
            try {
                g_body(g_body_context);
                thread_exit(tid, nullptr);
            } catch (const Fault& fault) {
                thread_exit(tid, fault.message);
            }
            {
                std::lock_guard<std::mutex> lock(w.mutex);
                w.done = true;
            }
            w.wake.notify_all();
        }
    }

    std::vector<Worker> workers_;
    std::vector<std::thread> threads_;
    unsigned generation_ = 0;
};
#endif

// Forget the block's static __shared__ arrays (under ASan each was its own allocation).
inline void release_static_shared() {
    g_static_shared_used = 0;
#if EMU_ASAN
    for (void* p : g_shared_allocations) {
        free(p);
    }
    g_shared_allocations.clear();
#endif
}

inline void reset_shared_for_block() {
    ++g_block_serial;
    release_static_shared();
    if (g_dynamic_shared_size) {
        memset(g_dynamic_shared, 0xFF, g_dynamic_shared_size);
    }
}

inline int run_grid(void (*body)(void*), void* context, Dim3 grid, Dim3 block, size_t shared_bytes,
                    int order, unsigned long long seed, char* err, size_t errlen) {
    static std::mutex launch_mutex;  // the emulator's state is global: one launch at a time
    std::lock_guard<std::mutex> lock(launch_mutex);
    err[0] = '\0';
    if (!grid.x || !grid.y || !grid.z || !block.x || !block.y || !block.z) {
        snprintf(err, errlen, "invalid configuration: grid (%u,%u,%u), block (%u,%u,%u) has a zero "
                 "dimension (CUDA refuses such a launch; skip the launch for empty arrays)",
                 grid.x, grid.y, grid.z, block.x, block.y, block.z);
        return 1;
    }
    const unsigned long long threads = (unsigned long long)block.x * block.y * block.z;
    if (block.x > 1024 || block.y > 1024 || block.z > 64 || threads > kMaxThreads) {
        snprintf(err, errlen, "invalid configuration: block (%u,%u,%u) exceeds CUDA's limits "
                 "(x, y <= 1024, z <= 64, x*y*z <= 1024 threads)", block.x, block.y, block.z);
        return 1;
    }
    if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
        snprintf(err, errlen, "invalid configuration: grid (%u,%u,%u) exceeds CUDA's limits "
                 "(x < 2^31, y, z <= 65535)", grid.x, grid.y, grid.z);
        return 1;
    }
    if (shared_bytes > kSharedLimit) {
        snprintf(err, errlen, "shared_mem=%zu bytes exceeds the %zu bytes of shared memory a block may "
                 "use without an opt-in", shared_bytes, kSharedLimit);
        return 1;
    }
    const unsigned n = (unsigned)threads;
#if !EMU_THREADS
    if (!ensure_fibers(n, err, errlen)) {
        return 1;
    }
#endif
    g_body = body;
    g_body_context = context;
    g_block_dim = dim3(block.x, block.y, block.z);
    g_grid_dim = dim3(grid.x, grid.y, grid.z);
    g_dynamic_shared_size = shared_bytes;
    // malloc'd per launch at exactly the requested size, so ASan sees its end.
    g_dynamic_shared = static_cast<unsigned char*>(malloc(shared_bytes ? shared_bytes : 1));
    std::mt19937_64 rng(seed);

    const unsigned long long blocks = (unsigned long long)grid.x * grid.y * grid.z;
    std::vector<unsigned long long> block_order;
    if (order == ORDER_RANDOM && blocks <= (1ull << 22)) {
        block_order.resize(blocks);
        for (unsigned long long i = 0; i < blocks; ++i) {
            block_order[i] = i;
        }
        std::shuffle(block_order.begin(), block_order.end(), rng);
    }
    int status = 0;
#if EMU_THREADS
    std::unique_ptr<WorkerPool> pool;
    try {
        pool = std::make_unique<WorkerPool>(n, order, rng);
    } catch (const std::exception& e) {
        snprintf(err, errlen, "could not start %u OS threads (one per CUDA thread): %s", n, e.what());
        free(g_dynamic_shared);
        g_dynamic_shared = nullptr;
        g_dynamic_shared_size = 0;
        return 1;
    }
#endif
    for (unsigned long long i = 0; i < blocks; ++i) {
        unsigned long long linear = block_order.empty()
            ? (order == ORDER_REVERSE ? blocks - 1 - i : i) : block_order[i];
        g_block_idx = uint3{(unsigned)(linear % grid.x), (unsigned)((linear / grid.x) % grid.y),
                            (unsigned)(linear / ((unsigned long long)grid.x * grid.y))};
        reset_shared_for_block();
        char why[768];
        why[0] = '\0';
#if EMU_THREADS
        const bool ok = pool->run_block(why, sizeof why);
#else
        const bool ok = run_block(n, order, rng, why, sizeof why);
#endif
        if (!ok) {
            snprintf(err, errlen, "block (%u,%u,%u): %s", g_block_idx.x, g_block_idx.y, g_block_idx.z, why);
#if !EMU_THREADS
            forget_abandoned_fibers(n);
#endif
            status = 1;
            break;
        }
    }
    release_static_shared();
    free(g_dynamic_shared);
    g_dynamic_shared = nullptr;
    g_dynamic_shared_size = 0;
    return status;
}

template <class T>
constexpr int kind_of() {
    if constexpr (std::is_pointer_v<T>) {
        return KIND_POINTER;
    } else if constexpr (std::is_same_v<T, bool>) {
        return KIND_BOOL;
    } else if constexpr (std::is_floating_point_v<T>) {
        return KIND_FLOAT;
    } else if constexpr (std::is_integral_v<T>) {
        return std::is_signed_v<T> ? KIND_SIGNED : KIND_UNSIGNED;
    } else if constexpr (std::is_void_v<T>) {
        return KIND_VOID;
    } else {
        return KIND_OTHER;
    }
}

template <class T>
ParamInfo info_of() {
    ParamInfo p{(int)sizeof(T), kind_of<T>(), 0, KIND_VOID};
    if constexpr (std::is_pointer_v<T>) {
        using Element = std::remove_cv_t<std::remove_pointer_t<T>>;
        p.pointee_kind = kind_of<Element>();
        if constexpr (!std::is_void_v<Element>) {
            p.pointee_size = (int)sizeof(Element);
        }
    }
    return p;
}

// The kernel's real parameter types, found by deduction on its function pointer.
template <class... P>
int param_info(void (*)(P...), ParamInfo* out, int capacity) {
    const ParamInfo all[] = {info_of<P>()..., ParamInfo{0, KIND_VOID, 0, KIND_VOID}};
    const int count = (int)sizeof...(P);
    for (int i = 0; i < count && i < capacity; ++i) {
        out[i] = all[i];
    }
    return count;
}

template <class T>
T read_arg(void* cell) {
    T value;
    memcpy(&value, cell, sizeof value);
    return value;
}

template <class... P, size_t... I>
std::tuple<std::remove_cv_t<P>...> read_args(void** args, std::index_sequence<I...>) {
    return std::tuple<std::remove_cv_t<P>...>{read_arg<std::remove_cv_t<P>>(args[I])...};
}

// Like cudaLaunchKernel: args[i] points to the value of parameter i.
template <class... P>
int launch(void (*kernel)(P...), const Dim3* grid, const Dim3* block, size_t shared_bytes, void** args,
           int nargs, int order, unsigned long long seed, char* err, size_t errlen) {
    if (nargs != (int)sizeof...(P)) {
        snprintf(err, errlen, "expected %d arguments, got %d", (int)sizeof...(P), nargs);
        return 1;
    }
    using Params = std::tuple<std::remove_cv_t<P>...>;
    struct Context {
        void (*kernel)(P...);
        Params params;
    };
    Context context{kernel, read_args<P...>(args, std::index_sequence_for<P...>{})};
    auto body = [](void* p) {
        Context* c = static_cast<Context*>(p);
        std::apply(c->kernel, c->params);
    };
    return run_grid(body, &context, *grid, *block, shared_bytes, order, seed, err, errlen);
}

}  // namespace emu

#define EMU_EXPORT extern "C" __attribute__((visibility("default")))

EMU_EXPORT void* emu_alloc(size_t size) { return malloc(size ? size : 1); }
EMU_EXPORT void emu_free(void* p) { free(p); }
EMU_EXPORT int emu_stack_size() { return EMU_STACK_SIZE; }
EMU_EXPORT int emu_uses_ucontext() {
#if EMU_THREADS
    return -1;
#else
    return EMU_UCONTEXT;
#endif
}
