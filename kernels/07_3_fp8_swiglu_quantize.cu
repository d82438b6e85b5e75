// 07_3_fp8_swiglu_quantize.cu: chapter 07, step 3: the FP8 up-projection whose epilogue applies
// SwiGLU and writes the activation already quantised, e4m3 with its 1 x 128 scales, ready for
// the down-projection (07_2). 07_2 + SwiGLU + 07_1 in one kernel: the bf16 pre-activation never
// goes to memory and back, and neither does the activation.
//
//   A[rows of e] = silu(G) * U,  [G | U] interleaved = (Xq * x_scale) @ (Wq[e] * w_scale)^T
//   Aq = e4m3(A / a_scale),  a_scale = amax / 448 of each row's 128 outputs (S_a transposed)
//
// What changes from 07_2, and why: the tile's shape. A 1 x 128 group of A is 128 outputs of one
// row, that is 256 interleaved columns of the GEMM (gate_j, up_j side by side), and its scale
// needs the amax of all of them before any value can be written. 07_2's 128 x 128 tile holds only
// 64 outputs of a row; two accumulators of 128 columns (acc and the promotion's part) are as
// many registers as a consumer has, so the tile cannot simply grow to 128 x 256. It becomes
// 64 x 256 instead: both consumer warpgroups take the same 64 rows, consumer c the GEMM's columns
// 128 c .. 128 c + 127 (c's 64 outputs of the group), and they exchange each row's amax through
// shared memory at the end of the tile. Per slice: 8 KB of X and 32 KB of W (40 KB slots, 4 of
// them), the same multiplies per byte loaded as 07_2 within a few percent.
//
// The epilogue: each thread holds 16 outputs of its two rows (wgmma's fragments, as 03_4);
// amax over them, over the quad of threads sharing the rows (shuffles), then over the two
// consumers (shared memory, a 256-thread named barrier); the bytes go through the staging buffer
// and leave as 16-byte rows' chunks. Forward only: the backward (chapter 06) needs the bf16
// pre-activation, which this kernel does not write.
#define STAGES 4  // 4 x 40 KB + two 16 KB staging buffers
#include "07_2_fp8_grouped_gemm.cu"

#define BM_SWIGLU 64   // rows of a tile: both consumers take all of them
#define BN_SWIGLU 256  // interleaved (gate, up) columns of a tile: one 1 x 128 group of outputs
#define E4M3_MAX 448.0f
#define W_BLOCK 128    // rows of W per weight scale (128 x 128 blocks)

struct __align__(1024) Fp8SwigluSlot {
    fp8_e4m3 a[BM_SWIGLU * FP8_BK];  // 64 rows of Xq, 128-byte swizzled
    fp8_e4m3 b[BN_SWIGLU * FP8_BK];  // 256 rows of Wq[e]: consumer c multiplies rows 128 c ..
};

// What a consumer's staging buffer holds in this epilogue: its 64 x 64 bytes of Aq, and its 64
// rows' amax for the other consumer to read.
struct QuantizedStage {
    fp8_e4m3 q[BM_SWIGLU * 64];
    float amax[BM_SWIGLU];
};
static_assert(sizeof(QuantizedStage) <= sizeof(Staging), "the epilogue reuses a staging buffer");

__device__ __forceinline__ float silu(float x) { return __fdividef(x, 1.0f + __expf(-x)); }
__device__ __forceinline__ float max_keep_nan(float a, float b) { return (a > b || a != a) ? a : b; }
__device__ __forceinline__ fp8_e4m3 to_e4m3(float x) {  // nearest even, saturated at 448
    unsigned short packed;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(packed) : "f"(0.0f), "f"(x));
    return (fp8_e4m3)(packed & 0xff);
}
// bar.sync 4: the 256 consumer threads (1, 2: one warpgroup each, warpgroup_sync)
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 4, 256;\n" ::: "memory"); }

// Where a tile's rows of X come from. Here (07_3) rows row0 .. of Xq, by TMA: 07_2's producer,
// and each row's scales are that row's. 07_4 gathers token rows instead.
struct Fp8TmaRows {
    const TmaDesc& map_x;
    const TmaDesc& map_w;
    static constexpr bool gathered = false;  // TMA's copies: counted in bytes on the full barrier
    static constexpr int full_arrivals = 1;  // the producer thread's expect_tx

    __device__ void produce(const Ring<Fp8SwigluSlot>& ring, const Problem& p, int m_tiles, int n_tiles,
                            int num_k) const {
        fp8_producer(ring, p, map_x, map_w, m_tiles, n_tiles, num_k, BM_SWIGLU, BN_SWIGLU);
    }
    __device__ int scale_row(int row, int) const { return row; }  // the scales' row of a tile row
};

// The kernel's body, whatever the rows come from (Rows: Fp8TmaRows, or 07_4's gathered rows).
template <typename Rows>
__device__ __forceinline__ void fp8_swiglu_quantize_tiles(const Rows& rows, const float* __restrict__ x_scales,
                                                          int ld_scales, const float* __restrict__ w_scales,
                                                          fp8_e4m3* __restrict__ Aq, float* __restrict__ a_scales,
                                                          int ld_a_scales, const Problem& p) {
    const Ring<Fp8SwigluSlot> ring = make_ring<Fp8SwigluSlot>(Rows::full_arrivals);
    const int N = p.N, n_tiles = N / BN_SWIGLU, m_tiles = p.num_tiles[0], num_k = p.K / FP8_BK;

    if (threadIdx.x >= 256) {  // ---------------------------------------------------------- the producer
        rows.produce(ring, p, m_tiles, n_tiles, num_k);
    } else {  // ---------------------------------------------------------------- consumers
        setmaxnreg_inc<CONSUMER_REGS>();
        const int c = threadIdx.x / 128, t = threadIdx.x % 128, quad_lane = t % 4;
        const int r = 16 * (t / 32) + (t % 32) / 4;  // this thread's rows of the tile: r and r + 8 (both consumers')
        QuantizedStage& mine = *reinterpret_cast<QuantizedStage*>(&ring.staging[c]);
        const QuantizedStage& theirs = *reinterpret_cast<const QuantizedStage*>(&ring.staging[1 - c]);
        int s = 0, parity = 0;
        TensorTurn turn{c};
        for (;;) {
            mbar_wait(&ring.full[s], parity);
            const TileJob job = ring.job[s];
            if (job.row0 < 0) break;
            // consumer c's 128 columns are one 128 x 128 block of W's scales
            const float* w_scale = w_scales + ((size_t)job.expert * (N / W_BLOCK) + 2 * job.n + c) * num_k;
            float acc[64];
#pragma unroll
            for (int v = 0; v < 64; ++v) acc[v] = 0.0f;
            SliceScales scales(x_scales, ld_scales, rows.scale_row(job.row0 + r, job.row_end),
                               rows.scale_row(job.row0 + r + 8, job.row_end), w_scale, num_k);
            fp8_mainloop<Rows::gathered>(acc, ring, s, parity, scales, num_k, 0, c * 128 * FP8_BK, true, turn);  // 07_2's

            // SwiGLU in place: acc[v] (v even) becomes output j = 4 (v / 4) + quad_lane of this
            // consumer's 64, row r ((v & 2) == 0) or r + 8
            float amax_lo = 0.0f, amax_hi = 0.0f;
#pragma unroll
            for (int v = 0; v < 64; v += 2) {
                acc[v] = silu(acc[v]) * acc[v + 1];
                if (v & 2) amax_hi = max_keep_nan(amax_hi, fabsf(acc[v]));
                else amax_lo = max_keep_nan(amax_lo, fabsf(acc[v]));
            }
#pragma unroll
            for (int offset = 1; offset < 4; offset *= 2) {  // the quad holds the rows' 64 outputs
                amax_lo = max_keep_nan(amax_lo, __shfl_xor_sync(0xffffffffu, amax_lo, offset));
                amax_hi = max_keep_nan(amax_hi, __shfl_xor_sync(0xffffffffu, amax_hi, offset));
            }
            if (quad_lane == 0) mine.amax[r] = amax_lo, mine.amax[r + 8] = amax_hi;
            consumers_sync();  // both halves' amax are in shared memory
            amax_lo = max_keep_nan(amax_lo, theirs.amax[r]);
            amax_hi = max_keep_nan(amax_hi, theirs.amax[r + 8]);
            consumers_sync();  // read before either consumer's next tile writes its amax again
            // the scale as 07_1 computes it (an inf or NaN: 07_1 refused the inputs already)
            const float scale_lo = amax_lo > 0.0f ? amax_lo / E4M3_MAX : 1.0f;
            const float scale_hi = amax_hi > 0.0f ? amax_hi / E4M3_MAX : 1.0f;
#pragma unroll
            for (int v = 0; v < 64; v += 2) {
                const int row = r + ((v & 2) ? 8 : 0), j = 4 * (v / 4) + quad_lane;
                mine.q[row * 64 + j] = to_e4m3(acc[v] / ((v & 2) ? scale_hi : scale_lo));
            }
            const int group = job.n;  // the tile's 128 outputs are A's group n
            if (c == 0 && quad_lane == 0) {
                if (job.row0 + r < job.row_end) a_scales[(size_t)group * ld_a_scales + job.row0 + r] = scale_lo;
                if (job.row0 + r + 8 < job.row_end) a_scales[(size_t)group * ld_a_scales + job.row0 + r + 8] = scale_hi;
            }
            warpgroup_sync(c);  // the consumer's 64 x 64 bytes are staged
#pragma unroll
            for (int i = 0; i < 2; ++i) {  // 64 rows x 4 chunks of 16 bytes, 2 per thread
                const int idx = t + 128 * i, row = idx / 4, chunk = idx % 4;
                if (job.row0 + row < job.row_end)
                    *reinterpret_cast<uint4*>(&Aq[(size_t)(job.row0 + row) * (N / 2) + group * 128 + c * 64 + chunk * 16]) =
                        *reinterpret_cast<const uint4*>(&mine.q[row * 64 + chunk * 16]);
            }
            warpgroup_sync(c);  // copied out before the next tile stages its bytes
        }
        turn.finish();
    }
}

#if __INCLUDE_LEVEL__ == 0  // the kernel, only where this file is the one compiled (not in 07_4)
extern "C" __global__ void __launch_bounds__(THREADS, 1)
fp8_swiglu_quantize(const __grid_constant__ TmaDesc map_x, const __grid_constant__ TmaDesc map_w,
                    const float* __restrict__ x_scales, int ld_scales, const float* __restrict__ w_scales,
                    fp8_e4m3* __restrict__ Aq, float* __restrict__ a_scales, int ld_a_scales,
                    const int* __restrict__ offs, const TileInfo* __restrict__ tile_map, int* __restrict__ num_tiles,
                    int M, int N, int K, int group_m) {
    const Problem p{offs, tile_map, num_tiles, M, N, K, group_m};
    fp8_swiglu_quantize_tiles(Fp8TmaRows{map_x, map_w}, x_scales, ld_scales, w_scales, Aq, a_scales, ld_a_scales, p);
}
#endif
