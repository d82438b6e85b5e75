// 03_4_swiglu.cu: chapter 03, step 4: the up-projection of an MoE layer in one kernel:
// token rows gathered in the load (03_3) and the SwiGLU activation applied in the epilogue.
//
// The expert FFN is down(silu(x @ W_gate^T) * (x @ W_up^T)). With W_gate and W_up interleaved
// row by row into one [E, 2n, d] weight, one GEMM computes both, and each thread holds the
// matching (gate, up) values side by side in its accumulators: the epilogue writes
// A = silu(gate) * up, [M, n], ready for the down-projection, and (if H is not null) the
// pre-activation H, [M, 2n], which the backward pass needs. No separate activation kernel reads
// H back. Chapter 06 builds the layer on it.
//
// What changes from 03_3: the epilogue only (SwigluEpilogue below).
#include "03_3_gather.cu"

// W's rows are interleaved, gate_j at row 2j and up_j at row 2j + 1
// (moe_course.io_overlap.interleave_gate_up), so a thread's two neighbouring accumulators
// (v, v + 1) are one (gate, up) pair: A[row, j] = silu(gate) * up, with no data exchanged.
__device__ __forceinline__ float silu(float x) { return __fdividef(x, 1.0f + __expf(-x)); }  // fast divide: 64 per thread and tile

struct SwigluEpilogue {
    StagedStore h;  // H, the pre-activation [M, N], as 03_2 stores Y (h.Y null: not stored)
    bf16* A;        // [M, N / 2] = silu(gate) * up

    // SwiGLU of the warpgroup's 64 x BN accumulators (BN / 2 output columns, at most 128), through
    // the staging buffer like 03_2's store.
    __device__ void store(const float (&acc)[BN / 2], Staging& buf, int c, const Problem& p, int row0, int row_end,
                          int n) {
        static_assert(BN / 2 <= 128, "one staging buffer holds 128 output columns");
        if (h.Y) h.store(acc, buf, c, p, row0, row_end, n);
        const int t = threadIdx.x % 128;
#pragma unroll
        for (int v = 0; v < BN / 2; v += 2) {
            const int r = 16 * (t / 32) + (t % 32) / 4 + 8 * ((v / 2) % 2);
            const int j = 4 * (v / 4) + t % 4;  // (col, col + 1) = (gate_j, up_j)
            *staged(buf, r, j) = __float2bfloat16_rn(silu(acc[v]) * acc[v + 1]);
        }
        copy_out_staged(buf, c, A, p.N / 2, row0, row_end, n * BN / 2);
    }
};

#if __INCLUDE_LEVEL__ == 0  // the kernel, only where this file is the one compiled (not in 10_1)
extern "C" __global__ void __launch_bounds__(THREADS, 1)
swiglu_grouped_gemm(const __grid_constant__ TmaDesc map_w, const bf16* __restrict__ X,
                    const int* __restrict__ gather_idx, bf16* __restrict__ H, bf16* __restrict__ A,
                    const int* __restrict__ offs, const TileInfo* __restrict__ tile_map,
                    int* __restrict__ num_tiles, int M, int N, int K, int tokens,
                    int group_m) {
    const Problem p{offs, tile_map, num_tiles, M, N, K, group_m};
    warp_specialized_grouped_gemm(p, GatherProducer{{map_w, map_w}, X, gather_idx, tokens}, SwigluEpilogue{{H}, A});
}
#endif
