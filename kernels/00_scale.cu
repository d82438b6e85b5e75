// 00_scale.cu: the course's first kernel. y = alpha * x over n bf16 values.
//
// A memory-bound kernel: one multiply per 4 bytes moved, so its speed is set by how close it
// gets to the device's copy bandwidth (measured in notebook 00). Two habits that every later
// kernel keeps:
//   * 16-byte accesses: each thread loads and stores 8 bf16 at once (uint4), the widest access
//     a thread can make, so a warp moves 512 contiguous bytes per instruction;
//   * a grid-stride loop: a grid sized to fill the GPU walks over any n.
// The vector path needs x and y 16-byte aligned (checked on the host); a scalar loop takes the
// last n % 8 elements.
#include <cuda_bf16.h>

extern "C" __global__ void scale_bf16(const __nv_bfloat16* __restrict__ x,
                                      __nv_bfloat16* __restrict__ y,
                                      float alpha, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;

    const long long n_vec = n / 8;  // whole groups of 8 values = 16 bytes
    const uint4* x_vec = reinterpret_cast<const uint4*>(x);
    uint4* y_vec = reinterpret_cast<uint4*>(y);
    for (long long i = first; i < n_vec; i += stride) {
        uint4 v = x_vec[i];
        __nv_bfloat162* pairs = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
        for (int j = 0; j < 4; ++j) {  // arithmetic in fp32, one rounding back to bf16
            float2 f = __bfloat1622float2(pairs[j]);
            pairs[j] = __floats2bfloat162_rn(f.x * alpha, f.y * alpha);
        }
        y_vec[i] = v;
    }
    for (long long i = n_vec * 8 + first; i < n; i += stride) {  // the tail
        y[i] = __float2bfloat16(__bfloat162float(x[i]) * alpha);
    }
}
