// 10_4_hf_weight_grad.cu: chapter 10, step 4: 06_3's weight gradient of gate_up_proj, stored in
// Hugging Face's order.
//
// dW_gate_up[e] = dH_e^T x_gathered comes out with its rows in dH's column order, gate_j and
// up_j interleaved (rows 2j, 2j + 1). transformers wants the gradient in gate_up_proj's own
// order: the I gate rows, then the I up rows. The boxes leave through a 4-D map of the gradient,
// the map 10_1 loads W through, (H, 2, I, E): a box of 64 interleaved rows (32 pairs) lands as
// 32 gate rows and 32 up rows, I rows apart. No pass over dW afterwards.
//
// What changes from 06_3: where the boxes go (GateUpStore below).
#include "06_3_weight_grad.cu"

struct GateUpStore {
    __device__ static constexpr bool as_accumulated() { return false; }  // dW's rows, as 06_3 stores them
    const TmaDesc& map;  // dW as HF's (E, 2I, H), seen (H, 2, I, E): tma.tensor_map_gate_up
    int N;               // rows of one expert's dW: 2I
    __device__ void box(const void* src, int row, int col) const {  // row of dW as [E * 2I, H]
        tma_store_4d(map, src, col, 0, (row % N) / 2, row / N);
    }
};

extern "C" __global__ void __launch_bounds__(THREADS, 1)
hf_weight_grad_grouped_gemm(const __grid_constant__ TmaDesc map_dy, const bf16* __restrict__ X,
                            const int* __restrict__ gather_idx, const __grid_constant__ TmaDesc map_dw,
                            const int* __restrict__ offs, int E, int R, int N, int K, int x_rows) {
    weight_grad(map_dy, X, gather_idx, GateUpStore{map_dw, N}, offs, E, R, N, K, x_rows);
}
