// wgmma_tile.cuh: one 128 x BN tile of a grouped GEMM on Hopper tensor cores (steps 5 and 6).
//
// Two warpgroups (256 threads) each own 64 rows of the tile and issue wgmma m64nBNk16, which
// reads A and B straight from shared memory: no ldmatrix, no operand registers. All 256
// threads load slices of 64 values along K with cp.async into a ring of STAGES buffers, in the
// 128-byte swizzled layout wgmma reads (grouped_gemm.cuh). Loads for later slices are in flight
// while the tensor cores work on the current one, and the tensor cores are kept busy across
// slices (one wgmma batch may still run while the next is issued).
// Requires N % BN == 0 and K % 64 == 0 (checked on the host).
#pragma once
#include "grouped_gemm.cuh"

#define BM 128  // 2 warpgroups x 64 rows
#define BK 64   // one 128-byte swizzled row of bf16
#ifndef BN
#define BN 128  // 128 or 256
#endif
#ifndef STAGES
#define STAGES 4  // at least 3; BN = 256 fits 4 (48 KB each), BN = 128 up to 6 (32 KB each)
#endif
#define THREADS 256

struct __align__(1024) WgmmaStage {  // the swizzle pattern repeats every 1024 bytes
    bf16 a[BM * BK];
    bf16 b[BN * BK];
};
#define WGMMA_SMEM_BYTES (STAGES * sizeof(WgmmaStage) + 1024)

__device__ __forceinline__ WgmmaStage* aligned_stages(unsigned char* smem) {
    // dynamic shared memory is only guaranteed 16-byte alignment: round up to 1024
    const u32 pad = (1024 - (smem_addr(smem) & 1023)) & 1023;
    return reinterpret_cast<WgmmaStage*>(smem + pad);
}

// One slice: BM rows of X and BN rows of W[e], 64 values (8 chunks of 16 bytes) each.
__device__ __forceinline__ void load_slice(WgmmaStage& s, const bf16* X, const bf16* w, int row0,
                                           int row_end, int K, int k0) {
#pragma unroll
    for (int i = 0; i < BM * 8 / THREADS; ++i) {
        const int c = threadIdx.x + i * THREADS, r = c / 8, ch = c % 8;
        const bool valid = row0 + r < row_end;  // rows past the expert's end are zero-filled
        cp_async_16(&s.a[swizzle_128b(r, ch) * 8], X + (size_t)(valid ? row0 + r : row0) * K + k0 + ch * 8, valid);
    }
#pragma unroll
    for (int i = 0; i < BN * 8 / THREADS; ++i) {
        const int c = threadIdx.x + i * THREADS, r = c / 8, ch = c % 8;
        cp_async_16(&s.b[swizzle_128b(r, ch) * 8], w + (size_t)r * K + k0 + ch * 8, true);
    }
}

// acc = X[row0 : row0+128, :] @ w[0 : BN, :]^T for this thread's fragment of its warpgroup's 64 rows.
//
// The ring holds STAGES slices: STAGES - 2 being loaded ahead, one being multiplied, and one
// whose multiply may still be running (wgmma_wait<1> lets one batch run on while the next
// slice is prepared, so the tensor cores are not left idle at every step along K).
__device__ __forceinline__ void wgmma_tile(float (&acc)[BN / 2], WgmmaStage* stages, const bf16* X,
                                           const bf16* w, int row0, int row_end, int K) {
    const int warpgroup = threadIdx.x / 128;
    const int num_k = K / BK;
    constexpr int AHEAD = STAGES - 2;  // slices in flight ahead of the one being multiplied
#pragma unroll
    for (int v = 0; v < BN / 2; ++v) acc[v] = 0.0f;
#pragma unroll
    for (int s = 0; s < AHEAD; ++s) {  // prologue
        if (s < num_k) load_slice(stages[s], X, w, row0, row_end, K, s * BK);
        cp_async_commit();
    }
    for (int kt = 0; kt < num_k; ++kt) {
        cp_async_wait<AHEAD - 1>();  // this thread's copies of slice kt have landed
        fence_proxy_async();         // make them visible to the tensor cores' (async) proxy
        __syncthreads();             // everyone's copies too; and every warpgroup is done with slice kt-2
        const int next = kt + AHEAD;  // goes where slice kt-2 was
        if (next < num_k) load_slice(stages[next % STAGES], X, w, row0, row_end, K, next * BK);
        cp_async_commit();  // an empty group at the end keeps the wait count right

        const WgmmaStage& s = stages[kt % STAGES];
        wgmma_slice(acc, s.a + warpgroup * 64 * BK, s.b);  // this warpgroup's 64 rows
        wgmma_wait<1>();  // slice kt-1's batch is done; slice kt's may run on
        wgmma_fence_operands(acc);
    }
    wgmma_wait<0>();
    wgmma_fence_operands(acc);
}
