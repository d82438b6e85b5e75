// 02_4_mma_sync.cu: step 4, tensor cores through warp-level mma.sync (runs on any GPU from sm_80).
//
// The block tile stays 128 x 128; its 8 warps each own a 64 x 32 piece, computed as 4 x 4
// mma.sync m16n8k16 instructions per 16 values of K. Operands reach the tensor cores through
// ldmatrix, which loads a whole 8x8 fragment per lane group from shared memory.
// Loads use cp.async: the copy into shared memory runs while the warps compute on an earlier
// slice, STAGES slices deep (a ring of buffers). Rows are padded by 8 values (16 bytes) so the
// 8 row addresses of an ldmatrix fall in different banks.
// Requires N % 128 == 0 and K % 32 == 0 (checked on the host). Shared memory is dynamic.
#include "grouped_gemm.cuh"

#define BM 128
#define BN 128
#define BK 32
#define STAGES 3
#define LDS (BK + 8)  // padded row length in shared memory, in bf16
#define WARP_M 64
#define WARP_N 32

struct Stage {
    bf16 a[BM * LDS];
    bf16 b[BN * LDS];
};

// 128 rows x 4 chunks of 16 bytes for each of A and B: 2 chunks of each per thread.
__device__ __forceinline__ void load_stage(Stage& s, const bf16* X, const bf16* w, int row0, int row_end,
                                           int K, int k0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int c = threadIdx.x + i * 256, r = c / 4, kc = (c % 4) * 8;
        const bool valid = row0 + r < row_end;
        cp_async_16(&s.a[r * LDS + kc], X + (size_t)(valid ? row0 + r : row0) * K + k0 + kc, valid);
        cp_async_16(&s.b[r * LDS + kc], w + (size_t)r * K + k0 + kc, true);
    }
}

extern "C" __global__ void __launch_bounds__(256)
mma_sync_grouped_gemm(const bf16* __restrict__ X, const bf16* __restrict__ W, bf16* __restrict__ Y,
                      const int* __restrict__ offs, const TileInfo* __restrict__ tile_map,
                      int M, int N, int K) {
    extern __shared__ __align__(128) unsigned char smem[];
    Stage* stages = reinterpret_cast<Stage*>(smem);
    int expert, row0, row_end;
    if (!tile_rows(tile_map, offs, M, blockIdx.y, BM, expert, row0, row_end)) return;
    const int col0 = blockIdx.x * BN;
    const bf16* w = W + ((size_t)expert * N + col0) * K;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = (warp / 4) * WARP_M, wn = (warp % 4) * WARP_N;  // this warp's piece of the tile
    const int num_k = K / BK;

    float acc[4][4][4] = {};  // [m16 tile][n8 tile][fragment]
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {  // prologue: fill all but one stage
        if (s < num_k) load_stage(stages[s], X, w, row0, row_end, K, s * BK);
        cp_async_commit();
    }
    for (int kt = 0; kt < num_k; ++kt) {
        cp_async_wait<STAGES - 2>();  // slice kt has landed (for this thread's copies) ...
        __syncthreads();              // ... and for everyone's; stage (kt-1) is free again
        const int next = kt + STAGES - 1;
        if (next < num_k) load_stage(stages[next % STAGES], X, w, row0, row_end, K, next * BK);
        cp_async_commit();  // an empty group keeps the wait count right at the end

        const Stage& s = stages[kt % STAGES];
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            u32 a[4][4], b[4][2];
#pragma unroll
            for (int i = 0; i < 4; ++i)  // A: rows wm+16i .. +15, columns kk .. kk+15
                ldmatrix_x4(a[i], &s.a[(wm + 16 * i + lane % 16) * LDS + kk + (lane / 16) * 8]);
#pragma unroll
            for (int j = 0; j < 4; j += 2) {  // B: two n8 tiles per ldmatrix.x4
                u32 r[4];
                ldmatrix_x4(r, &s.b[(wn + 8 * j + lane % 8 + (lane / 16) * 8) * LDS + kk + ((lane / 8) % 2) * 8]);
                b[j][0] = r[0]; b[j][1] = r[1]; b[j + 1][0] = r[2]; b[j + 1][1] = r[3];
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) mma_m16n8k16(acc[i][j], a[i], b[j][0], b[j][1]);
        }
    }
    // Fragment of m16n8: values 0,1 at row lane/4, columns 2*(lane%4) + {0,1}; values 2,3 eight rows down.
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int row = row0 + wm + 16 * i + lane / 4 + 8 * half;
            if (row >= row_end) continue;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int col = col0 + wn + 8 * j + 2 * (lane % 4);
                *reinterpret_cast<__nv_bfloat162*>(&Y[(size_t)row * N + col]) =
                    __floats2bfloat162_rn(acc[i][j][2 * half], acc[i][j][2 * half + 1]);
            }
        }
}
