// tma.cuh: Hopper's asynchronous copy machinery, used by every chapter 03 kernel (sm_90).
//
//   1. mbarrier: a 64-bit counter in shared memory that threads wait on. A phase completes when
//      the expected number of threads have arrived AND the expected number of bytes have
//      landed (the "transaction count"); waiters name the phase by its parity (0, 1, 0, ...).
//   2. TMA (cp.async.bulk.tensor): one thread asks the copy engine for a whole 2D box of a
//      tensor; the engine computes every address, zero-fills what lies outside the tensor,
//      writes shared memory in the 128-byte swizzled layout wgmma reads (grouped_gemm.cuh),
//      and counts the bytes down on an mbarrier. The tensor is described by a 128-byte tensor
//      map made on the host (moe_course/tma.py) and passed as a __grid_constant__ parameter.
//      TMA also stores: a box from shared memory to the tensor, while the SM goes on computing.
//   3. setmaxnreg: hand registers from the warpgroup that only copies to the ones that compute.
#pragma once
#include "grouped_gemm.cuh"

// The tensor map, opaque: the host fills it with cuTensorMapEncodeTiled. Passed by value as a
// `const __grid_constant__` kernel parameter, so it stays in parameter memory where TMA reads it.
struct __align__(64) TmaDesc {
    u64 v[16];
};

// ---------------------------------------------------------------------------------------------
// 1. mbarrier
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void mbar_init(u64* bar, int arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(smem_addr(bar)), "r"(arrivals));
}

// One arrival that also tells the barrier to wait for `bytes` more bytes of copies.
__device__ __forceinline__ void mbar_arrive_expect_tx(u64* bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n"
                 :: "r"(smem_addr(bar)), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_arrive(u64* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" :: "r"(smem_addr(bar)) : "memory");
}

// Wait until the phase of parity `parity` has completed. A fresh barrier is in phase 0, and
// waiting for parity 1 returns at once (the phase "before" 0 counts as complete): that is how
// a producer starts on a ring of empty slots without a special case.
__device__ __forceinline__ void mbar_wait(u64* bar, int parity) {
    asm volatile(
        "{\n.reg .pred done;\n"
        "WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT;\n"
        "}\n" :: "r"(smem_addr(bar)), "r"(parity) : "memory");
}

// The barrier counts one arrival when all cp.async copies this thread issued so far have
// landed (.noinc: that arrival is one of those the barrier was initialised to expect).
__device__ __forceinline__ void cp_async_mbar_arrive(u64* bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" :: "r"(smem_addr(bar)) : "memory");
}

// ---------------------------------------------------------------------------------------------
// 2. TMA: copy the box whose first element is at (col, row) of the tensor described by `map`
//    into shared memory at `dst` (1024-byte aligned for the 128-byte swizzle); the bytes are
//    counted on `bar`. Rows or columns outside the tensor arrive as zeros (and still count).
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void tma_load_2d(void* dst, const TmaDesc& map, int col, int row, u64* bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%2, %3}], [%4];\n"
        :: "r"(smem_addr(dst)), "l"(reinterpret_cast<u64>(&map)), "r"(col), "r"(row), "r"(smem_addr(bar))
        : "memory");
}

// The same copy from a 4-D view, coordinates innermost first (chapter 10). Hugging Face keeps an
// expert's gate rows and up rows I rows apart (gate_up_proj (E, 2I, H)); seen as (H, 2, I, E)
// with that layout's strides, one box of (64, 2, BN/2, 1) lands gate_j and up_j in neighbouring
// rows, the interleaved tile 03_4's SwiGLU epilogue reads (moe_course/tma.py: tensor_map_gate_up).
__device__ __forceinline__ void tma_load_4d(void* dst, const TmaDesc& map, int c0, int c1, int c2, int c3, u64* bar) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%2, %3, %4, %5}], [%6];\n"
        :: "r"(smem_addr(dst)), "l"(reinterpret_cast<u64>(&map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3),
           "r"(smem_addr(bar))
        : "memory");
}

// TMA the other way (chapter 06): the box at `src` in shared memory (the swizzled layout a load
// writes) to the tensor at (col, row). The issuing thread does not wait: its stores form bulk
// groups (commit), and it waits later only until a group has been READ out of shared memory
// (so the buffer may be written again) or, at the very end, until it has landed. Before the
// store, the threads that wrote the box make their writes visible to the copy engine
// (fence_proxy_async, then a barrier): shared memory written by ordinary stores is the
// "generic proxy", the TMA reads through the "async proxy".
__device__ __forceinline__ void tma_store_2d(const TmaDesc& map, const void* src, int col, int row) {
    asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];\n"
                 :: "l"(reinterpret_cast<u64>(&map)), "r"(smem_addr(src)), "r"(col), "r"(row) : "memory");
}
// The 4-D store (chapter 10): dW of gate_up_proj back to its gate | up halves, as tma_load_4d reads them.
__device__ __forceinline__ void tma_store_4d(const TmaDesc& map, const void* src, int c0, int c1, int c2, int c3) {
    asm volatile("cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%2, %3, %4, %5}], [%1];\n"
                 :: "l"(reinterpret_cast<u64>(&map)), "r"(smem_addr(src)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
                 : "memory");
}
__device__ __forceinline__ void tma_store_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
template <int N>  // until at most N of this thread's store groups still read shared memory
__device__ __forceinline__ void tma_store_wait_read() { asm volatile("cp.async.bulk.wait_group.read %0;\n" :: "n"(N) : "memory"); }
__device__ __forceinline__ void tma_store_wait_all() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }

// ---------------------------------------------------------------------------------------------
// 3. Register reallocation (sm_90a). Every thread of a warpgroup executes it, and the kernel
//    needs a register cap at entry (__launch_bounds__(threads, 1)) for it to take effect.
// ---------------------------------------------------------------------------------------------
template <int REGS>
__device__ __forceinline__ void setmaxnreg_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" :: "n"(REGS)); }
template <int REGS>
__device__ __forceinline__ void setmaxnreg_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" :: "n"(REGS)); }

// ---------------------------------------------------------------------------------------------
// 4. A timeline, when compiled with -DTRACE=n: one thread of block 0 stamps the SM clock at
//    each event of the first n slices (0: load issued, 1: slice landed, 2: slot released after
//    its multiply, 3: tile stored, counted per tile). The host reads `trace` back
//    (moe_course.io_overlap.trace_timeline); without TRACE the calls compile to nothing.
// ---------------------------------------------------------------------------------------------
#ifdef TRACE
__device__ long long trace[4][TRACE];
__device__ __forceinline__ void trace_event(int kind, int i) {
    if (blockIdx.x == 0 && blockIdx.y == 0 && i < TRACE) trace[kind][i] = clock64();
}
#else
__device__ __forceinline__ void trace_event(int, int) {}
#endif
