// 06_4_combine.cu: chapter 06, step 4: the combine, out[t] = sum_j w[t, j] * rows[pos[t, j]].
//
// Each token gathers its k rows (pos: where its j-th expert's row sits in the expert-sorted
// order) and sums them in fp32: a gather, not a scatter, so there are no atomics and the result
// is the same on every run. The forward combines the expert outputs with the routing weights;
// the backward combines each token's k rows of dX with w = nullptr (weights of one).
// One block per token; each thread moves 16 bytes (8 values) at a time.
#include <cuda_bf16.h>

extern "C" __global__ void __launch_bounds__(128)
combine_rows(const __nv_bfloat16* __restrict__ rows, const int* __restrict__ pos, const float* __restrict__ w,
             __nv_bfloat16* __restrict__ out, int k, int d, int num_rows) {
    const int t = blockIdx.x;
    for (int c = threadIdx.x; c < d / 8; c += blockDim.x) {
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int j = 0; j < k; ++j) {
            const int r = pos[t * k + j];
            if ((unsigned)r >= (unsigned)num_rows) continue;  // a dropped pair: contributes nothing
            const float wj = w ? w[t * k + j] : 1.0f;
            const uint4 raw = *reinterpret_cast<const uint4*>(rows + (size_t)r * d + 8 * c);
            const __nv_bfloat162* v = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const float2 f = __bfloat1622float2(v[q]);
                acc[2 * q] += wj * f.x;
                acc[2 * q + 1] += wj * f.y;
            }
        }
        uint4 packed;
        __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
        for (int q = 0; q < 4; ++q) o[q] = __floats2bfloat162_rn(acc[2 * q], acc[2 * q + 1]);
        *reinterpret_cast<uint4*>(out + (size_t)t * d + 8 * c) = packed;
    }
}
