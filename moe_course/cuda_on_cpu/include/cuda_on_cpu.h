// cuda_on_cpu.h: what a CUDA C kernel sees when moe_course.cuda_on_cpu runs it on the CPU.
//
// The host C++ compiler builds the kernel as ordinary C++. This header, included before the
// kernel's source, gives it CUDA's words:
//   * qualifiers: __global__, __device__, __forceinline__, __launch_bounds__ ... mean nothing
//     here; __shared__ becomes `static`, one copy that every thread of the block (they run one
//     block at a time) sees, as on the GPU;
//   * threadIdx, blockIdx, blockDim, gridDim, warpSize: set by the scheduler (harness.h) before
//     it runs a thread;
//   * __syncthreads() and the warp functions (__shfl*_sync, __ballot_sync, __syncwarp ...): the
//     calling thread stops there and the scheduler runs the others until every thread that must
//     take part has arrived. Only one CUDA thread runs at any moment, so the schedule, and with
//     it every result, is deterministic; the harness runs the grid in two thread orders and a
//     result that differs between them is a race;
//   * atomics (plain read-modify-writes: nothing runs beside them), bit and math intrinsics.
// Anything written in PTX (asm: mma, wgmma, TMA, mbarrier) has no meaning on the CPU: a kernel
// that reaches it is reported as needing a GPU.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

#include "vector_types.h"

#ifdef CUDA_ON_CPU_SCAN  // moe_course.cuda_on_cpu finds the kernels in the preprocessed source by this mark
#define __global__ __CUDA_ON_CPU_GLOBAL__
#else
#define __global__
#endif
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static
#define __constant__ static
#define __align__(n) __attribute__((aligned(n)))
#define __CUDA_ON_CPU__ 1

extern uint3 threadIdx, blockIdx;  // set by the scheduler (harness.cpp) before it runs a thread
extern dim3 blockDim, gridDim;
constexpr int warpSize = 32;

namespace cuda_on_cpu {
enum WarpOp { WARP_SYNC, WARP_SHFL_IDX, WARP_SHFL_UP, WARP_SHFL_DOWN, WARP_SHFL_XOR, WARP_BALLOT, WARP_ANY, WARP_ALL };
enum BarrierOp { BAR_SYNC, BAR_COUNT, BAR_AND, BAR_OR };

// The scheduler's side (harness.h): the calling thread waits there for the others.
void syncthreads(const char* file, int line);
int syncthreads_reduce(BarrierOp op, int predicate, const char* file, int line);
unsigned long long warp_op(WarpOp op, unsigned mask, unsigned long long value, int arg, int width,
                           const char* file, int line);
unsigned active_mask();
[[noreturn]] void trap(const char* what, const char* file, int line);
void poison_shared(void* p, unsigned long long bytes);  // fresh shared memory holds garbage
void* dynamic_shared();
long long clock_ticks();

template <class T>
unsigned long long bits_of(T v) {
    static_assert(sizeof(T) <= 8, "warp shuffles move values of at most 8 bytes");
    unsigned long long u = 0;
    std::memcpy(&u, &v, sizeof(T));
    return u;
}
template <class T>
T from_bits(unsigned long long u) {
    T v;
    std::memcpy(&v, &u, sizeof(T));
    return v;
}
inline void syncwarp(const char* file, int line, unsigned mask = 0xffffffffu) {
    warp_op(WARP_SYNC, mask, 0, 0, 32, file, line);
}
template <class T>
T shfl(WarpOp op, const char* file, int line, unsigned mask, T v, int arg, int width = 32) {
    return from_bits<T>(warp_op(op, mask, bits_of(v), arg, width, file, line));
}

// ---------------------------------------------------------------------------------------------
// Kernel arguments: each parameter's type, read from the kernel's own signature by templates.
// ---------------------------------------------------------------------------------------------
struct ArgValue {
    enum Kind { BUFFER, NULLPTR, INT, FLOAT } kind = INT;
    void* ptr = nullptr;
    unsigned long long bytes = 0;
    long long i = 0;
    double f = 0;
};

struct ParamInfo {
    bool pointer, floating, integral, record;
    unsigned long long size;  // of the value (a record's bytes) or, for a pointer, of what it points to
};

template <class T>
ParamInfo param_info() {
    if constexpr (std::is_pointer_v<T>) {
        using E = std::remove_cv_t<std::remove_pointer_t<T>>;
        if constexpr (std::is_void_v<E>) return {true, false, false, false, 1};
        else return {true, false, false, false, sizeof(E)};
    } else {
        return {false, std::is_floating_point_v<T>, std::is_integral_v<T> || std::is_enum_v<T>,
                std::is_class_v<T>, sizeof(T)};
    }
}

template <class T>
T arg_as(const ArgValue& a) {
    if constexpr (std::is_pointer_v<T>) return static_cast<T>(a.ptr);
    else if constexpr (std::is_floating_point_v<T>) return static_cast<T>(a.f);
    else if constexpr (std::is_integral_v<T> || std::is_enum_v<T>) return static_cast<T>(a.i);
    else {  // a struct passed by value: its bytes (checked against sizeof on the way in)
        T v;
        std::memcpy(static_cast<void*>(&v), a.ptr, sizeof(T));
        return v;
    }
}

struct KernelEntry {
    const char* name;
    void* fn;
    const ParamInfo* params;
    int arity;
    void (*invoke)(void* fn, const ArgValue* args);
};

template <class... P, size_t... I>
void invoke_with(void* fn, const ArgValue* a, std::index_sequence<I...>) {
    reinterpret_cast<void (*)(P...)>(fn)(arg_as<P>(a[I])...);
}
template <class... P>
void invoke(void* fn, const ArgValue* a) {
    invoke_with<P...>(fn, a, std::index_sequence_for<P...>{});
}
template <class... P>
struct Params {
    static inline const ParamInfo info[sizeof...(P) + 1] = {param_info<P>()..., ParamInfo{}};
};
template <class... P>
KernelEntry entry(const char* name, void (*f)(P...)) {
    return {name, reinterpret_cast<void*>(f), Params<P...>::info, static_cast<int>(sizeof...(P)), &invoke<P...>};
}

}  // namespace cuda_on_cpu

#define __syncthreads() ::cuda_on_cpu::syncthreads(__FILE__, __LINE__)
#define __syncthreads_count(p) ::cuda_on_cpu::syncthreads_reduce(::cuda_on_cpu::BAR_COUNT, (p), __FILE__, __LINE__)
#define __syncthreads_and(p) ::cuda_on_cpu::syncthreads_reduce(::cuda_on_cpu::BAR_AND, (p), __FILE__, __LINE__)
#define __syncthreads_or(p) ::cuda_on_cpu::syncthreads_reduce(::cuda_on_cpu::BAR_OR, (p), __FILE__, __LINE__)
#define __syncwarp(...) ::cuda_on_cpu::syncwarp(__FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_sync(...) ::cuda_on_cpu::shfl(::cuda_on_cpu::WARP_SHFL_IDX, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::cuda_on_cpu::shfl(::cuda_on_cpu::WARP_SHFL_UP, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::cuda_on_cpu::shfl(::cuda_on_cpu::WARP_SHFL_DOWN, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) ::cuda_on_cpu::shfl(::cuda_on_cpu::WARP_SHFL_XOR, __FILE__, __LINE__, __VA_ARGS__)
#define __ballot_sync(mask, p) ((unsigned)::cuda_on_cpu::warp_op(::cuda_on_cpu::WARP_BALLOT, (mask), (p) ? 1 : 0, 0, 32, __FILE__, __LINE__))
#define __any_sync(mask, p) ((int)::cuda_on_cpu::warp_op(::cuda_on_cpu::WARP_ANY, (mask), (p) ? 1 : 0, 0, 32, __FILE__, __LINE__))
#define __all_sync(mask, p) ((int)::cuda_on_cpu::warp_op(::cuda_on_cpu::WARP_ALL, (mask), (p) ? 1 : 0, 0, 32, __FILE__, __LINE__))
#define __activemask() ::cuda_on_cpu::active_mask()
#define __trap() ::cuda_on_cpu::trap("__trap()", __FILE__, __LINE__)

// Fences order memory between threads that run at once; here none do.
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __threadfence_system() {}
inline void __nanosleep(unsigned) {}
inline long long clock64() { return cuda_on_cpu::clock_ticks(); }
template <class T>
inline T __ldg(const T* p) { return *p; }
// Only the asm helpers of the course's headers take shared-memory addresses; on the CPU an
// address is an address.
inline unsigned long long __cvta_generic_to_shared(const void* p) { return reinterpret_cast<unsigned long long>(p); }

// min and max, as CUDA declares them for every arithmetic type.
#define COURSE_MINMAX(T)                                   \
    inline T min(T a, T b) { return b < a ? b : a; }       \
    inline T max(T a, T b) { return a < b ? b : a; }
COURSE_MINMAX(int)
COURSE_MINMAX(unsigned int)
COURSE_MINMAX(long long)
COURSE_MINMAX(unsigned long long)
COURSE_MINMAX(long)
COURSE_MINMAX(unsigned long)
#undef COURSE_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

// Atomics: nothing runs beside the calling thread, so a plain read-modify-write is atomic.
#define COURSE_ATOMIC(name, expr)                       \
    template <class T, class U>                         \
    inline T name(T* p, U v_) {                         \
        const T v = static_cast<T>(v_);                 \
        const T old = *p;                               \
        *p = (expr);                                    \
        return old;                                     \
    }
COURSE_ATOMIC(atomicAdd, old + v)
COURSE_ATOMIC(atomicSub, old - v)
COURSE_ATOMIC(atomicExch, v)
COURSE_ATOMIC(atomicMin, v < old ? v : old)
COURSE_ATOMIC(atomicMax, old < v ? v : old)
COURSE_ATOMIC(atomicAnd, old & v)
COURSE_ATOMIC(atomicOr, old | v)
COURSE_ATOMIC(atomicXor, old ^ v)
#undef COURSE_ATOMIC
template <class T, class U, class V>
inline T atomicCAS(T* p, U compare, V value) {
    const T old = *p;
    if (old == static_cast<T>(compare)) *p = static_cast<T>(value);
    return old;
}
inline unsigned atomicInc(unsigned* p, unsigned limit) {
    const unsigned old = *p;
    *p = old >= limit ? 0 : old + 1;
    return old;
}

// Bits and reinterpretations.
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float f) { int x; std::memcpy(&x, &f, 4); return x; }
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned x; std::memcpy(&x, &f, 4); return x; }
inline double __longlong_as_double(long long x) { double f; std::memcpy(&f, &x, 8); return f; }
inline long long __double_as_longlong(double f) { long long x; std::memcpy(&x, &f, 8); return x; }
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((1ull * a * b) >> 32); }
inline int __mul24(int a, int b) { return a * b; }

// Fast-math intrinsics: on the GPU they trade accuracy for speed; here they are the plain
// functions, which can differ from the GPU's in the last bits.
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
