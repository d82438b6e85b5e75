// 10_2_hf_dswiglu.cu: chapter 10, step 2: 06_2's product and SwiGLU backward on Hugging Face's
// down_proj.
//
//     dA'_r = dout_t @ W_down[e]        (dout's rows gathered in the load, as in 06_2)
// The course's layer keeps W_down as [E, n, d], so 06_2 reads W_down[e]^T K-major; transformers
// keeps down_proj (E, H, I) = [E, d, n], the forward's layout (10_1's down-projection reads it
// as it is). Here the backward reads it the other way: as 06_1 reads W stored [E, K, N], boxes
// of 64 rows of K (H) by 64 columns of N (I), multiplied transposed. The epilogue is 06_2's:
// dH (interleaved like H), s * A, and each row's share of ds.
//
// What changes from 06_2: the producer's load of W and the multiply (GatherMnMajorWProducer).
#include "06_2_dswiglu.cu"

struct GatherMnMajorWProducer : GatherProducer {  // 03_3's gathered rows; W's tile as 06_1 loads it
    __device__ void issue(Slot& slot, u64* full, const Problem& p, int expert, int n, int, int kt) {
        mbar_arrive_expect_tx(full, BN * BK * 2);  // W's bytes only: dout's rows arrive by themselves
#pragma unroll
        for (int b = 0; b < BN / 64; ++b)
            tma_load_2d(slot.b + b * 64 * BK, map_w, n * BN + 64 * b, expert * p.K + kt * BK, full);
    }
    __device__ static void multiply(float (&acc)[BN / 2], const Slot& slot, int c) {
        fence_proxy_async();  // generic-proxy copies -> async-proxy reads
        wgmma_slice_b_mn(acc, slot.a + c * 64 * BK, slot.b);
    }
};

extern "C" __global__ void __launch_bounds__(THREADS, 1)
hf_dswiglu_grouped_gemm(const __grid_constant__ TmaDesc map_down, const bf16* __restrict__ dout,
                        const int* __restrict__ gather_idx, const bf16* __restrict__ H,
                        const float* __restrict__ row_scale, bf16* __restrict__ dH, bf16* __restrict__ sA,
                        float* __restrict__ ds_part, const int* __restrict__ offs,
                        const TileInfo* __restrict__ tile_map, int* __restrict__ num_tiles, int M, int N,
                        int K, int tokens, int group_m) {
    const Problem p{offs, tile_map, num_tiles, M, N, K, group_m};
#ifdef PINGPONG  // as in 06_2
    warp_specialized_pingpong(p, GatherMnMajorWProducer{{{map_down, map_down}, dout, gather_idx, tokens}},
                              DswigluEpilogue{H, row_scale, dH, sA, ds_part});
#else
    warp_specialized_grouped_gemm(p, GatherMnMajorWProducer{{{map_down, map_down}, dout, gather_idx, tokens}},
                                  DswigluEpilogue{H, row_scale, dH, sA, ds_part});
#endif
}
