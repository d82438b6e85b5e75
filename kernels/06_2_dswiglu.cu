// 06_2_dswiglu.cu: chapter 06, step 2: the backward's first product with the SwiGLU backward
// in its epilogue.
//
// For each sorted row r (token t, expert e, routing weight s_r):
//     dA'_r = dout_t @ W_down[e]^T      (dout's rows gathered in the load, as 03_3 gathers x)
// and the epilogue turns dA' into what the rest of the backward needs, reading the forward's
// H back (store_dswiglu in warp_specialized.cuh): dH = d(loss)/dH, s * A (A recomputed from H,
// never kept) and ds, the routing weight's gradient <dA', A>. No dA', no A and no gathered dout
// is ever written to memory. SonicMoE fuses this step the same way.
#include "warp_specialized.cuh"

extern "C" __global__ void __launch_bounds__(THREADS, 1)
dswiglu_grouped_gemm(const __grid_constant__ TmaDesc map_w, const bf16* __restrict__ dout,
                     const int* __restrict__ gather_idx, const bf16* __restrict__ H,
                     const float* __restrict__ row_scale, bf16* __restrict__ dH, bf16* __restrict__ sA,
                     float* __restrict__ ds_part, const int* __restrict__ offs,
                     const TileInfo* __restrict__ tile_map, int* __restrict__ num_tiles, int M, int N,
                     int K, int tokens, int group_m) {
    const Problem p{dout, gather_idx, dH, sA, offs, tile_map, num_tiles, M, N, K, tokens, group_m, H, row_scale, ds_part};
    warp_specialized_grouped_gemm</*GATHER=*/true, /*SWIGLU=*/false, /*B_MN=*/false, /*DSWIGLU=*/true>(map_w, map_w, p);
}
