// 06_2_dswiglu.cu: chapter 06, step 2: the backward's first product with the SwiGLU backward
// in its epilogue.
//
// For each sorted row r (token t, expert e, routing weight s_r):
//     dA'_r = dout_t @ W_down[e]^T      (dout's rows gathered in the load, as 03_3 gathers x)
// and the epilogue turns dA' into what the rest of the backward needs, reading the forward's
// H back: dH = d(loss)/dH, s * A (A recomputed from H, never kept) and ds, the routing weight's
// gradient <dA', A>. No dA', no A and no gathered dout is ever written to memory. SonicMoE
// fuses this step the same way.
//
// What changes from 03_3: the epilogue only (DswigluEpilogue below).
#include "03_3_gather.cu"

// The accumulators hold dA' = the gathered output gradient times W_down[e] (before the routing
// weight s of the row). With the forward's H read back (gate_j, up_j at columns 2j, 2j + 1, as
// the forward wrote them):
//     a = silu(g) u,   ds += dA' a   (the routing weight's gradient, summed along the row),
//     dA = s dA',      dg = dA u silu'(g),   du = dA silu(g),   silu'(g) = sig (1 + g (1 - sig)).
// Written: dH (interleaved like H, for the input and W_gate_up gradients) and s * a (for the
// W_down gradient); A itself was never kept by the forward. The four threads of a quad share
// a row: their ds shares are summed with two shuffles, and one thread writes the tile's share
// (a row spans N / BN tiles; the host adds those few shares up, so no atomics).
//
// The loads of H come first, 16 pairs' worth at a time and unconditional (a row past the
// expert's end reads the tile's last row instead, and its results are not stored). Written as
// "if the row is valid, load, compute, store" per pair, each load would wait for the previous
// store: 64 memory round trips in a row per tile, and an epilogue as long as the mainloop
// (measured on the H200: 1.40 ms against 0.63 ms without it, Qwen3 shape).
struct DswigluEpilogue {
    const bf16* H;           // the forward's pre-activation [M, 2N]
    const float* row_scale;  // [M]: each row's routing weight s
    bf16* dH;                // [M, 2N]
    bf16* sA;                // [M, N]: s * A
    float* ds_part;          // [N / BN, M]: each (N-tile, row)'s share of ds

    __device__ void store(const float (&d)[BN / 2], Staging&, int, const Problem& p, int row0, int row_end,
                          int n_tile) {
        constexpr int NV = BN / 2;
        constexpr int BATCH = 16;  // pairs whose H is loaded together
        const int t = threadIdx.x % 128;
        const int r_first = row0 + 16 * (t / 32) + (t % 32) / 4;  // this thread's rows: r_first, r_first + 8
        bool valid[2];
        float scale[2], ds[2] = {0.0f, 0.0f};
        const bf16* h_row[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int row = r_first + 8 * i;
            valid[i] = row < row_end;
            scale[i] = valid[i] ? row_scale[row] : 0.0f;
            h_row[i] = H + (size_t)(valid[i] ? row : row_end - 1) * 2 * p.N + 2 * n_tile * BN;  // any row that exists
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {  // the thread's two rows, one after the other
            const int row = r_first + 8 * i;
#pragma unroll
            for (int b = 0; b < NV / 4; b += BATCH) {  // the row's NV / 4 pairs: v = 4 m + 2 i
                uint2 h[BATCH];
#pragma unroll
                for (int q = 0; q < BATCH; ++q) {
                    const int m = b + q, col = 8 * m + 2 * (t % 4);  // columns col, col + 1 of dA' in the tile
                    h[q] = __ldg(reinterpret_cast<const uint2*>(h_row[i] + 2 * col));  // gate, up, gate, up
                }
#pragma unroll
                for (int q = 0; q < BATCH; ++q) {
                    const int m = b + q, v = 4 * m + 2 * i;
                    const int j = n_tile * BN + 8 * m + 2 * (t % 4);
                    const float2 gu0 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&h[q].x));
                    const float2 gu1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&h[q].y));
                    const float g[2] = {gu0.x, gu1.x}, u[2] = {gu0.y, gu1.y};
                    float a[2], dh[4];
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const float sig = __fdividef(1.0f, 1.0f + __expf(-g[e])), silu_g = g[e] * sig;
                        const float da = scale[i] * d[v + e];
                        a[e] = silu_g * u[e];
                        ds[i] += d[v + e] * a[e];
                        dh[2 * e] = da * u[e] * sig * (1.0f + g[e] * (1.0f - sig));
                        dh[2 * e + 1] = da * silu_g;
                    }
                    if (valid[i]) {
                        __nv_bfloat162 out[2] = {__floats2bfloat162_rn(dh[0], dh[1]), __floats2bfloat162_rn(dh[2], dh[3])};
                        *reinterpret_cast<uint2*>(dH + (size_t)row * 2 * p.N + 2 * j) = *reinterpret_cast<const uint2*>(out);
                        *reinterpret_cast<__nv_bfloat162*>(sA + (size_t)row * p.N + j) =
                            __floats2bfloat162_rn(scale[i] * a[0], scale[i] * a[1]);
                    }
                }
            }
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {  // the quad's four shares of each row; the quad shares r_first
            ds[i] += __shfl_xor_sync(0xffffffffu, ds[i], 1);
            ds[i] += __shfl_xor_sync(0xffffffffu, ds[i], 2);
            if (t % 4 == 0 && valid[i]) ds_part[(size_t)n_tile * p.M + r_first + 8 * i] = ds[i];
        }
    }
};

#if __INCLUDE_LEVEL__ == 0  // the kernel, only where this file is the one compiled (not in 10_2)
extern "C" __global__ void __launch_bounds__(THREADS, 1)
dswiglu_grouped_gemm(const __grid_constant__ TmaDesc map_w, const bf16* __restrict__ dout,
                     const int* __restrict__ gather_idx, const bf16* __restrict__ H,
                     const float* __restrict__ row_scale, bf16* __restrict__ dH, bf16* __restrict__ sA,
                     float* __restrict__ ds_part, const int* __restrict__ offs,
                     const TileInfo* __restrict__ tile_map, int* __restrict__ num_tiles, int M, int N,
                     int K, int tokens, int group_m) {
    const Problem p{offs, tile_map, num_tiles, M, N, K, group_m};
#ifdef PINGPONG  // each consumer warpgroup a whole tile, in turns (warp_specialized.cuh); BN = 128
    warp_specialized_pingpong(p, GatherProducer{{map_w, map_w}, dout, gather_idx, tokens},
                              DswigluEpilogue{H, row_scale, dH, sA, ds_part});
#else
    warp_specialized_grouped_gemm(p, GatherProducer{{map_w, map_w}, dout, gather_idx, tokens},
                                  DswigluEpilogue{H, row_scale, dH, sA, ds_part});
#endif
}
#endif
