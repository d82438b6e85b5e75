// 10_5_hf_down_weight_grad.cu: chapter 10, step 5: the gradient of Hugging Face's down_proj
// (E, H, I) with no sorted copy of the output gradient.
//
// down_proj's gradient is dW[e] = dout_e^T (s A)_e, H x I. 06_3 computes dY_e^T X_e with dY
// loaded by TMA as it is stored (sorted rows) and X gathered row by row (cp.async), so taken
// that way round it needed dout's rows sorted first: a copy of R x H values (10_x's backward
// until session 19). The course's own layer takes the product the other way round, dY = s A
// (sorted) and X = dout (gathered), and gets (s A)_e^T dout_e = dW[e]^T, I x H: its own
// down-projection's layout, not transformers'.
//
// 06_3 holds each tile transposed (its accumulator is K x N: kernels/06_3_weight_grad.cu), so
// with dY = s A and X = dout the registers already hold dW[e]'s tile the way down_proj stores it:
// H rows by I columns. Storing them as they are (AsAccumulatedStore: no stmatrix .trans) gives
// down_proj's gradient directly, and dout is gathered like 06_3's X always is.
//
// What changes from 06_3: where the boxes go, and the tile left as accumulated.
#include "06_3_weight_grad.cu"

// A 64 x 64 box of dW[e]^T: row `row` of the gradient seen as an [E * K, N] matrix (E x H rows of
// I values), columns col..
struct AsAccumulatedStore {
    __device__ static constexpr bool as_accumulated() { return true; }  // dW[e]^T, as the registers hold it
    const TmaDesc& map;
    __device__ void box(const void* src, int row, int col) const { tma_store_2d(map, src, col, row); }
};

extern "C" __global__ void __launch_bounds__(THREADS, 1)
hf_down_weight_grad_grouped_gemm(const __grid_constant__ TmaDesc map_dy,  // s A [R, I], 64-row boxes
                                 const bf16* __restrict__ X,               // dout [T, H], gathered
                                 const int* __restrict__ gather_idx,
                                 const __grid_constant__ TmaDesc map_dw,   // down_proj's gradient [E * H, I]
                                 const int* __restrict__ offs, int E, int R, int N, int K, int x_rows) {
    weight_grad(map_dy, X, gather_idx, AsAccumulatedStore{map_dw}, offs, E, R, N, K, x_rows);
}
