// 03_2_warp_specialized.cu: chapter 03, step 2: a producer warpgroup and two consumer
// warpgroups, in a persistent kernel (the body is in warp_specialized.cuh).
//
// What changes from 03_1: the thread that issues the loads no longer multiplies, so a load is
// never late because its issuer was busy in wgmma, and a multiply never waits for the issuer
// to come back around. The producer runs up to STAGES slices ahead, across tiles; the
// consumers keep one wgmma batch running while they issue the next (wgmma_wait<1>), and
// release a slot as soon as the batch that read it is done. One block per SM walks the tiles
// in groups that share weights in L2.
#include "warp_specialized.cuh"

extern "C" __global__ void __launch_bounds__(THREADS, 1)
ws_grouped_gemm(const __grid_constant__ TmaDesc map_x, const __grid_constant__ TmaDesc map_w,
                bf16* __restrict__ Y, const int* __restrict__ offs, const TileInfo* __restrict__ tile_map,
                int* __restrict__ num_tiles, int M, int N, int K, int group_m) {
    const Problem p{nullptr, nullptr, Y, nullptr, offs, tile_map, num_tiles, M, N, K, 0, group_m};
    warp_specialized_grouped_gemm</*GATHER=*/false, /*SWIGLU=*/false>(map_x, map_w, p);
}
