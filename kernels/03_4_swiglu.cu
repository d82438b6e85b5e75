// 03_4_swiglu.cu: chapter 03, step 4: the up-projection of an MoE layer in one kernel:
// token rows gathered in the load (03_3) and the SwiGLU activation applied in the epilogue.
//
// The expert FFN is down(silu(x @ W_gate^T) * (x @ W_up^T)). With W_gate and W_up interleaved
// row by row into one [E, 2n, d] weight, one GEMM computes both, and each thread holds the
// matching (gate, up) values side by side in its accumulators: the epilogue writes
// A = silu(gate) * up, [M, n], ready for the down-projection, and (if H is not null) the
// pre-activation H, [M, 2n], which the backward pass needs. No separate activation kernel reads
// H back. Chapter 06 builds the layer on it.
#include "warp_specialized.cuh"

extern "C" __global__ void __launch_bounds__(THREADS, 1)
swiglu_grouped_gemm(const __grid_constant__ TmaDesc map_w, const bf16* __restrict__ X,
                    const int* __restrict__ gather_idx, bf16* __restrict__ H, bf16* __restrict__ A,
                    const int* __restrict__ offs, const TileInfo* __restrict__ tile_map,
                    int* __restrict__ num_tiles, int M, int N, int K, int tokens,
                    int group_m) {
    const Problem p{X, gather_idx, H, A, offs, tile_map, num_tiles, M, N, K, tokens, group_m};
    warp_specialized_grouped_gemm</*GATHER=*/true, /*SWIGLU=*/true>(map_w, map_w, p);
}
