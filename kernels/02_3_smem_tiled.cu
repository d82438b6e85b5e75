// 02_3_smem_tiled.cu: step 3, shared-memory tiling on CUDA cores.
//
// Each block computes a 128 x 128 tile of Y. Per step of 32 along K it loads a 128 x 32 slice
// of X and of W[e] into shared memory once (16-byte loads, coalesced), and every value loaded
// is then used 128 times. Each of the 256 threads keeps an 8 x 8 block of outputs in
// registers, so one value read from shared memory feeds 8 multiply-adds.
// The slices are stored transposed, as fp32, so the inner loop reads 4 values per instruction.
// Requires N % 128 == 0 and K % 32 == 0 (checked on the host).
#include "grouped_gemm.cuh"

#define BM 128
#define BN 128
#define BK 32
#define TM 8  // outputs per thread along M
#define TN 8  // and along N
#define PAD 4  // keeps float4 alignment, shifts banks between rows

extern "C" __global__ void __launch_bounds__(256)
smem_tiled_grouped_gemm(const bf16* __restrict__ X, const bf16* __restrict__ W, bf16* __restrict__ Y,
                        const int* __restrict__ offs, const TileInfo* __restrict__ tile_map,
                        int M, int N, int K) {
    __shared__ __align__(16) float As[BK][BM + PAD];
    __shared__ __align__(16) float Bs[BK][BN + PAD];
    int expert, row0, row_end;
    if (!tile_rows(tile_map, offs, M, blockIdx.y, BM, expert, row0, row_end)) return;
    const int col0 = blockIdx.x * BN;
    const bf16* w = W + ((size_t)expert * N + col0) * K;
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;

    float acc[TM][TN] = {};
    for (int k0 = 0; k0 < K; k0 += BK) {
        // 128 rows x 4 chunks of 8 values = 512 chunks of X and of W, 2 of each per thread
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int c = tid + i * 256, r = c / 4, kc = (c % 4) * 8;
            uint4 xa = make_uint4(0, 0, 0, 0);  // rows past the expert's end count as zeros
            if (row0 + r < row_end) xa = *reinterpret_cast<const uint4*>(&X[(size_t)(row0 + r) * K + k0 + kc]);
            const uint4 wb = *reinterpret_cast<const uint4*>(&w[(size_t)r * K + k0 + kc]);
            const bf16* xv = reinterpret_cast<const bf16*>(&xa);
            const bf16* wv = reinterpret_cast<const bf16*>(&wb);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                As[kc + j][r] = __bfloat162float(xv[j]);
                Bs[kc + j][r] = __bfloat162float(wv[j]);
            }
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < BK; ++k) {
            float a[TM], b[TN];
            *reinterpret_cast<float4*>(&a[0]) = *reinterpret_cast<const float4*>(&As[k][ty * TM]);
            *reinterpret_cast<float4*>(&a[4]) = *reinterpret_cast<const float4*>(&As[k][ty * TM + 4]);
            *reinterpret_cast<float4*>(&b[0]) = *reinterpret_cast<const float4*>(&Bs[k][tx * TN]);
            *reinterpret_cast<float4*>(&b[4]) = *reinterpret_cast<const float4*>(&Bs[k][tx * TN + 4]);
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();  // before the next slice overwrites what others may still read
    }
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int row = row0 + ty * TM + i;
        if (row >= row_end) break;
#pragma unroll
        for (int j = 0; j < TN; j += 2)
            *reinterpret_cast<__nv_bfloat162*>(&Y[(size_t)row * N + col0 + tx * TN + j]) =
                __floats2bfloat162_rn(acc[i][j], acc[i][j + 1]);
    }
}
