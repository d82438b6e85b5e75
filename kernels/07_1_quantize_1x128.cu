// 07_1_quantize_1x128.cu: chapter 07, step 1: the activations to FP8 e4m3, one scale per row and
// 128 columns (DeepSeek-V3's 1 x 128 groups), the token rows gathered on the way.
//
// Q[r, :] = e4m3(X[gather_idx[r], :] / scale),  scale = amax / 448 of each group of 128 values
// (1 where the group is all zero), exactly what moe_course.fp8.quantize_groups computes: the
// same float32 division, and the GPU's conversion rounds to nearest even and saturates at 448
// (cvt.rn.satfinite), as fp8.saturate clamps before its cast.
//
// The scales are written transposed, S[g, r] (K / 128 rows of ld_scales floats): a slice of 07_2
// then reads its rows' scales from one row of S. Bit for bit the torch maths *on a CPU*: torch on
// a GPU divides by a scalar as a product with its reciprocal, so its scales can differ by one ulp
// (session 12, H100).
//
// A pure bandwidth kernel: read 2 bytes a value, write 1 (and a scale per 128). Half a warp
// quantises one group: each of its 16 lanes loads 8 values (one 16-byte load), the group's
// amax is a max over the half-warp by shuffles, each lane stores its 8 bytes. The gather costs
// nothing more: a row's groups are read from the token's row wherever it is.
#include "grouped_gemm.cuh"

#define GROUP 128          // values per scale along K
#define E4M3_MAX 448.0f    // the largest finite e4m3 value
#define LANES_PER_GROUP 16

// Two floats to two e4m3 bytes (lo in the low byte), rounded to nearest even, saturated at 448.
__device__ __forceinline__ unsigned short e4m3x2(float lo, float hi) {
    unsigned short packed;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(packed) : "f"(hi), "f"(lo));
    return packed;
}

// max that keeps a NaN (fmaxf would drop it, and a NaN group would pass unnoticed)
__device__ __forceinline__ float max_keep_nan(float a, float b) { return (a > b || a != a) ? a : b; }

// rows: rows of Q; tokens: rows of X (gather_idx[r] outside [0, tokens): a zero row, as the
// gathered GEMMs read it); gather_idx null: row r is X's row r. first_bad_row: lowered to the
// first row holding an inf or NaN (the host checks it; the group's values are then meaningless).
extern "C" __global__ void __launch_bounds__(256)
quantize_1x128(const bf16* __restrict__ X, const int* __restrict__ gather_idx, int rows, int K, int tokens,
               unsigned char* __restrict__ Q, float* __restrict__ S, int ld_scales, int* __restrict__ first_bad_row) {
    const int groups = K / GROUP;
    const int units = rows * groups;  // one (row, group) per half-warp (the host keeps it < 2^31)
    const int lane = threadIdx.x % LANES_PER_GROUP;
    const int half_warp = (blockIdx.x * blockDim.x + threadIdx.x) / LANES_PER_GROUP;
    const int half_warps = gridDim.x * blockDim.x / LANES_PER_GROUP;
    // The loop runs while the warp's first half has work, so both halves reach every shuffle.
    for (int u = half_warp; u - (half_warp & 1) < units; u += half_warps) {
        const bool active = u < units;
        const int row = active ? u / groups : 0, g = active ? u % groups : 0;
        const int src = !active ? -1 : gather_idx ? gather_idx[row] : row;
        uint4 bits = make_uint4(0, 0, 0, 0);  // a row outside X: zeros
        if (0 <= src && src < tokens)
            bits = *reinterpret_cast<const uint4*>(X + (size_t)src * K + g * GROUP + lane * 8);
        const bf16* x8 = reinterpret_cast<const bf16*>(&bits);
        float v[8], amax = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = __bfloat162float(x8[i]), amax = max_keep_nan(amax, fabsf(v[i]));
#pragma unroll
        for (int offset = LANES_PER_GROUP / 2; offset; offset /= 2)  // within the half-warp
            amax = max_keep_nan(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
        if (!active) continue;
        if (!(amax <= 3.4e38f) && lane == 0) atomicMin(first_bad_row, row);  // inf or NaN
        const float scale = amax > 0.0f ? amax / E4M3_MAX : 1.0f;
        uint2 q;
        q.x = e4m3x2(v[0] / scale, v[1] / scale) | (u32)e4m3x2(v[2] / scale, v[3] / scale) << 16;
        q.y = e4m3x2(v[4] / scale, v[5] / scale) | (u32)e4m3x2(v[6] / scale, v[7] / scale) << 16;
        *reinterpret_cast<uint2*>(Q + (size_t)row * K + g * GROUP + lane * 8) = q;
        if (lane == 0) S[(size_t)g * ld_scales + row] = scale;
    }
}
