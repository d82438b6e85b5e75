// 02_1_naive_per_expert.cu: step 1 of the grouped GEMM ladder, the sequential baseline.
//
// The host loops over the experts and launches this plain GEMM once per expert, with the
// pointers moved to that expert's rows and weight. To know each expert's row count the host
// must first copy the offsets from the GPU (a synchronisation), then pay one launch per expert.
//
// One thread computes one output element: a dot product of length K read straight from global
// memory. Threads next to each other in x share the row of X but read rows of W that are K
// elements apart, so nothing is coalesced and nothing is reused: slow on purpose.
#include <cuda_bf16.h>

extern "C" __global__ void naive_gemm(const __nv_bfloat16* __restrict__ X,  // [M, K] this expert's rows
                                      const __nv_bfloat16* __restrict__ W,  // [N, K] this expert's weight
                                      __nv_bfloat16* __restrict__ Y,        // [M, N]
                                      int M, int N, int K) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    const int row = blockIdx.y * blockDim.y + threadIdx.y;
    if (row >= M || col >= N) return;
    float acc = 0.0f;
    for (int k = 0; k < K; ++k)
        acc += __bfloat162float(X[(size_t)row * K + k]) * __bfloat162float(W[(size_t)col * K + k]);
    Y[(size_t)row * N + col] = __float2bfloat16(acc);
}
