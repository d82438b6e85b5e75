// 10_3_hf_transposed_b.cu: chapter 10, step 3: 06_1's product with Hugging Face's gate_up_proj,
// the input gradient's rows:
//     dX_rows[r] = dH[r] @ W_gate_up[e]          (then 06_4 sums each token's rows)
// W_gate_up[e] is (2I, H): K = 2I rows, N = H columns, read MN-major as 06_1 reads it. But dH's
// columns are interleaved like H (gate_j, up_j at 2j, 2j + 1) while gate_up_proj's rows are the
// I gate rows, then the I up rows: K must run in the same order on both sides. W's boxes come
// through 10_1's 4-D map instead of a 2-D one, (H, 2, I, E), a box of 64 columns of H by 32
// (gate, up) pairs: its 64 rows land interleaved, in dH's order. Nothing else changes.
//
// What changes from 06_1: the load of W's boxes (GateUpMnMajorWProducer below).
#include "06_1_transposed_b.cu"

struct GateUpMnMajorWProducer : MnMajorWProducer {
    __device__ void issue(Slot& slot, u64* full, const Problem&, int expert, int n, int row0, int kt) {
        mbar_arrive_expect_tx(full, sizeof(Slot));
        tma_load_2d(slot.a, map_x, kt * BK, row0, full);
#pragma unroll
        for (int b = 0; b < BN / 64; ++b)  // rows kt * BK .. of K = pairs kt * BK / 2 ..
            tma_load_4d(slot.b + b * 64 * BK, map_w, n * BN + 64 * b, 0, kt * (BK / 2), expert, full);
    }
};

extern "C" __global__ void __launch_bounds__(THREADS, 1)
hf_transposed_b_grouped_gemm(const __grid_constant__ TmaDesc map_x, const __grid_constant__ TmaDesc map_gate_up,
                             bf16* __restrict__ Y, const int* __restrict__ offs,
                             const TileInfo* __restrict__ tile_map, int* __restrict__ num_tiles, int M, int N,
                             int K, int group_m) {
    const Problem p{offs, tile_map, num_tiles, M, N, K, group_m};
    warp_specialized_grouped_gemm(p, GateUpMnMajorWProducer{{{map_x, map_gate_up}}}, StagedStore{Y});
}
