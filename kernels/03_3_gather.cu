// 03_3_gather.cu: chapter 03, step 3: the rows of X gathered inside the load.
//
// An MoE layer's tokens arrive in token order; the expert GEMM wants them sorted by expert.
// Permute-then-GEMM writes a sorted copy of X (K times larger than X with top-K routing) and
// reads it back. Here the GEMM reads each token's row straight from X: the producer warpgroup
// looks up gather_idx[row] once per tile and copies the rows with cp.async (TMA cannot gather
// rows on Hopper), and each producer thread's copies arrive on the slot's full barrier when
// they land. W still comes by TMA. The sorted copy of X is never written.
#include "warp_specialized.cuh"

extern "C" __global__ void __launch_bounds__(THREADS, 1)
gather_grouped_gemm(const __grid_constant__ TmaDesc map_w, const bf16* __restrict__ X,
                    const int* __restrict__ gather_idx, bf16* __restrict__ Y, const int* __restrict__ offs,
                    const TileInfo* __restrict__ tile_map, int* __restrict__ num_tiles, int M, int N, int K, int tokens,
                    int group_m) {
    const Problem p{X, gather_idx, Y, nullptr, offs, tile_map, num_tiles, M, N, K, tokens, group_m};
    warp_specialized_grouped_gemm</*GATHER=*/true, /*SWIGLU=*/false>(map_w, map_w, p);  // no map for X
}
