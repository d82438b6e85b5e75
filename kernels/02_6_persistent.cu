// 02_6_persistent.cu: step 6, a persistent kernel with a device-side tile scheduler.
//
// Steps 2-5 launch an upper bound of tiles, and the blocks with nothing to do still cost a
// launch slot. Here the grid is one block per SM, and each block walks the real list of tiles:
// tile t, t + gridDim.x, t + 2*gridDim.x, ... The number of tiles is read on the GPU, from
// what build_tile_map wrote, so the host never waits for the expert counts, and every SM gets
// an equal share of tiles whatever the routing did. Tiles are numbered with the N tiles of one
// M tile next to each other, so blocks running at the same time share the rows of X in L2.
#include "wgmma_tile.cuh"

extern "C" __global__ void __launch_bounds__(THREADS, 1)
persistent_grouped_gemm(const bf16* __restrict__ X, const bf16* __restrict__ W, bf16* __restrict__ Y,
                        const int* __restrict__ offs, const TileInfo* __restrict__ tile_map,
                        const int* __restrict__ num_tiles, int M, int N, int K) {
    extern __shared__ unsigned char smem[];
    WgmmaStage* stages = aligned_stages(smem);
    const int n_tiles = N / BN;
    const int total = num_tiles[0] * n_tiles;  // decided on the GPU by build_tile_map
    for (int t = blockIdx.x; t < total; t += gridDim.x) {
        int expert, row0, row_end;
        tile_rows(tile_map, offs, M, t / n_tiles, BM, expert, row0, row_end);
        const int col0 = (t % n_tiles) * BN;
        float acc[BN / 2];
        wgmma_tile(acc, stages, X, W + ((size_t)expert * N + col0) * K, row0, row_end, K);
        store_wgmma_tile(acc, Y, N, row0 + (threadIdx.x / 128) * 64, row_end, col0);
        __syncthreads();  // the next tile's prologue reuses stages the other warpgroup may still read
    }
}
