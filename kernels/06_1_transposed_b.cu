// 06_1_transposed_b.cu: chapter 06, step 1: the grouped GEMM with W stored [E, K, N],
//     Y[rows of e] = X[rows of e] @ W[e]        (03_2 computes X @ W[e]^T with W [E, N, K]).
//
// The layer's backward multiplies by the transposes of the forward's weights (dX = dH W_gate_up,
// with W_gate_up [E, 2n, d] read as [K = 2n, N = d]); copying a transposed weight every step
// would move the whole weight through memory twice (1.9 GB each way for Mixtral's W_gate_up).
// Instead the copy engine brings W's tile as it is stored and wgmma reads it transposed: only
// the tensor map, the producer's boxes and one bit of the instruction change
// (warp_specialized.cuh, B_MN). The forward's down-projection uses it too: the trainable layer
// keeps W_down as [E, n, d], so that the backward's heaviest product (06_2) reads it K-major.
#include "warp_specialized.cuh"

extern "C" __global__ void __launch_bounds__(THREADS, 1)
transposed_b_grouped_gemm(const __grid_constant__ TmaDesc map_x, const __grid_constant__ TmaDesc map_w,
                          bf16* __restrict__ Y, const int* __restrict__ offs, const TileInfo* __restrict__ tile_map,
                          int* __restrict__ num_tiles, int M, int N, int K, int group_m) {
    const Problem p{nullptr, nullptr, Y, nullptr, offs, tile_map, num_tiles, M, N, K, 0, group_m};
    warp_specialized_grouped_gemm</*GATHER=*/false, /*SWIGLU=*/false, /*B_MN=*/true>(map_x, map_w, p);
}
