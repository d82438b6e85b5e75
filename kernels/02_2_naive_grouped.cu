// 02_2_naive_grouped.cu: step 2, one launch for all experts.
//
// Same arithmetic as step 1, but the host no longer loops or reads the counts. The grid has
// an upper bound of M-tiles the host knows without looking at the counts (ceil(M/16) + E);
// build_tile_map (grouped_gemm.cuh) runs first, on the GPU, and tells each tile its expert
// and first row. Tiles left over exit at once. No synchronisation, two launches in all.
#include "grouped_gemm.cuh"

#define TILE 16

extern "C" __global__ void naive_grouped_gemm(const bf16* __restrict__ X,       // [M, K], rows sorted by expert
                                              const bf16* __restrict__ W,       // [E, N, K]
                                              bf16* __restrict__ Y,             // [M, N]
                                              const int* __restrict__ offs,     // [E] end row of each expert
                                              const TileInfo* __restrict__ tile_map,
                                              int M, int N, int K) {
    int expert, row0, row_end;
    if (!tile_rows(tile_map, offs, M, blockIdx.y, TILE, expert, row0, row_end)) return;
    const int row = row0 + threadIdx.y;
    const int col = blockIdx.x * TILE + threadIdx.x;
    if (row >= row_end || col >= N) return;
    const bf16* w = W + ((size_t)expert * N + col) * K;
    float acc = 0.0f;
    for (int k = 0; k < K; ++k) acc += __bfloat162float(X[(size_t)row * K + k]) * __bfloat162float(w[k]);
    Y[(size_t)row * N + col] = __float2bfloat16(acc);
}
