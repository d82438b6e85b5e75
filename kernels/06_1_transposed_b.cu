// 06_1_transposed_b.cu: chapter 06, step 1: the grouped GEMM with W stored [E, K, N],
//     Y[rows of e] = X[rows of e] @ W[e]        (03_2 computes X @ W[e]^T with W [E, N, K]).
//
// The layer's backward multiplies by the transposes of the forward's weights (dX = dH W_gate_up,
// with W_gate_up [E, 2n, d] read as [K = 2n, N = d]); copying a transposed weight every step
// would move the whole weight through memory twice (1.9 GB each way for Mixtral's W_gate_up).
// Instead the copy engine brings W's tile as it is stored and wgmma reads it transposed: only
// the tensor map, the producer's boxes and one bit of the instruction change. The forward's
// down-projection uses it too: the trainable layer keeps W_down as [E, n, d], so that the
// backward's heaviest product (06_2) reads it K-major.
//
// What changes from 03_2: the producer's load of W and the multiply (MnMajorWProducer below).
#include "03_2_warp_specialized.cu"

// W's tile arrives as BN / 64 TMA boxes of 64 x 64 (the map describes W as an [E * K, N]
// matrix): box b holds the slice's 64 rows of K for N columns 64b .. 64b + 63, and wgmma reads
// the tile transposed (wgmma_slice_b_mn, in grouped_gemm.cuh).
struct MnMajorWProducer : TmaProducer {
    __device__ void issue(Slot& slot, u64* full, const Problem& p, int expert, int n, int row0, int kt) {
        mbar_arrive_expect_tx(full, sizeof(Slot));
        tma_load_2d(slot.a, map_x, kt * BK, row0, full);
#pragma unroll
        for (int b = 0; b < BN / 64; ++b)
            tma_load_2d(slot.b + b * 64 * BK, map_w, n * BN + 64 * b, expert * p.K + kt * BK, full);
    }
    __device__ static void multiply(float (&acc)[BN / 2], const Slot& slot, int c) {
        wgmma_slice_b_mn(acc, slot.a + c * 64 * BK, slot.b);
    }
};

#if __INCLUDE_LEVEL__ == 0  // the kernel, only where this file is the one compiled (not in 10_3)
extern "C" __global__ void __launch_bounds__(THREADS, 1)
transposed_b_grouped_gemm(const __grid_constant__ TmaDesc map_x, const __grid_constant__ TmaDesc map_w,
                          bf16* __restrict__ Y, const int* __restrict__ offs, const TileInfo* __restrict__ tile_map,
                          int* __restrict__ num_tiles, int M, int N, int K, int group_m) {
    const Problem p{offs, tile_map, num_tiles, M, N, K, group_m};
    warp_specialized_grouped_gemm(p, MnMajorWProducer{{map_x, map_w}}, StagedStore{Y});
}
#endif
