// 02_5_wgmma.cu: step 5, Hopper's warpgroup tensor core instruction (sm_90a only).
//
// Same grid as steps 2-4 (one block per 128 x BN tile, the tile map telling each block its
// expert), but the math is wgmma: a warpgroup multiplies 64 x 16 by 16 x BN per instruction,
// operands read directly from swizzled shared memory (wgmma_tile.cuh). Larger tiles per
// instruction, no operand traffic through registers.
#include "wgmma_tile.cuh"

extern "C" __global__ void __launch_bounds__(THREADS, 1)
wgmma_grouped_gemm(const bf16* __restrict__ X, const bf16* __restrict__ W, bf16* __restrict__ Y,
                   const int* __restrict__ offs, const TileInfo* __restrict__ tile_map, int M, int N, int K) {
    extern __shared__ unsigned char smem[];
    WgmmaStage* stages = aligned_stages(smem);
    int expert, row0, row_end;
    if (!tile_rows(tile_map, offs, M, blockIdx.y, BM, expert, row0, row_end)) return;
    const int col0 = blockIdx.x * BN;
    float acc[BN / 2];
    wgmma_tile(acc, stages, X, W + ((size_t)expert * N + col0) * K, row0, row_end, K);
    store_wgmma_tile(acc, Y, N, row0 + (threadIdx.x / 128) * 64, row_end, col0);
}
