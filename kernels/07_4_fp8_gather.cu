// 07_4_fp8_gather.cu: chapter 07, step 4: 07_3 with the token rows gathered inside the load, as
// 03_3 gathered bf16 rows: the layer's input is quantised once, T rows, not T k gathered rows.
//
// Why: with top-k routing the up-projection's rows are the tokens' rows, each k times over. 07_1
// gathering them writes k copies of every quantised row (the H100 record: on the 7B shape,
// k = 8, quantising the gathered rows took 0.465 ms beside the FP8 GEMM's 0.428). Here 07_1
// quantises the T rows of X (no gather), and this kernel reads each tile's rows from them by
// gather_idx, with each row's scales from its token's.
//
// What changes from 07_3: where the rows come from (Fp8GatheredRows below). TMA cannot gather
// rows, so the producer warpgroup's 128 threads copy a tile's 64 rows themselves with cp.async
// (8 threads a row, one 16-byte chunk each, 4 rows a thread), each thread's copies arriving on
// the slot's full barrier when they land; thread 256 still loads W by TMA. The consumers fence
// the generic proxy against the async one before their wgmma reads a slot (03_3 says why), and
// look up their two rows' tokens once a tile for the scales. The epilogue is 07_3's.
#define PRODUCER_REGS 56   // the tile's 4 source rows a thread, its pointers: 40 spilled in 03_3
#define CONSUMER_REGS 224  // 128 x 56 + 256 x 224 <= 65536
#include "07_3_fp8_swiglu_quantize.cu"

struct Fp8GatheredRows {
    const TmaDesc& map_w;
    const fp8_e4m3* X;      // the token rows, quantised: [tokens, K] e4m3
    const int* gather_idx;  // [M]: the token of each sorted row
    int tokens;             // an index outside [0, tokens) reads a zero row, never out of bounds
    static constexpr bool gathered = true;
    static constexpr int full_arrivals = 1 + 128;  // thread 256's expect_tx, and each copier's cp.async arrival

    // the token whose scales a tile row takes (a row past its expert's end: any valid row, unstored)
    __device__ int scale_row(int row, int row_end) const {
        const int token = row < row_end ? __ldg(&gather_idx[row]) : 0;
        return (unsigned)token < (unsigned)tokens ? token : 0;
    }

    __device__ void produce(const Ring<Fp8SwigluSlot>& ring, const Problem& p, int m_tiles, int n_tiles,
                            int num_k) const {
        setmaxnreg_dec<PRODUCER_REGS>();
        const int t = threadIdx.x % 128, chunk = t % 8, total = m_tiles * n_tiles;
        int s = 0, parity = 0;
        for (int i = 0;; ++i) {
            // thread 256 claims the tile and hands it to the other 127 (take_tile's way, words used in turn)
            if (t == 0) ring.taken[i % 2] = atomicAdd(p.num_tiles + 1, 1);
            asm volatile("bar.sync 3, 128;\n" ::: "memory");  // 1, 2: the consumers' epilogues; 4: both consumers
            const int tile = ring.taken[i % 2];
            if (tile >= total) {  // one more slot, holding no slice: the consumers stop there
                mbar_wait(&ring.empty[s], parity ^ 1);
                if (t == 0) {
                    ring.job[s] = TileJob{-1, 0, 0, 0};
                    mbar_arrive(&ring.full[s]);
                }
                cp_async_mbar_arrive(&ring.full[s]);  // the arrival the barrier expects of each copier
                return;
            }
            int m, n, expert, row0, row_end;
            expert_tile_coords(tile, p, m_tiles, n_tiles, m, n, BM_SWIGLU);
            tile_rows(p.tile_map, p.offs, p.M, m, BM_SWIGLU, expert, row0, row_end);
            int src[BM_SWIGLU / 16];  // this thread's 4 rows' tokens (-1: past the expert's end, zero-filled)
#pragma unroll
            for (int j = 0; j < BM_SWIGLU / 16; ++j) {
                const int row = row0 + t / 8 + 16 * j;
                const int token = row < row_end ? __ldg(&gather_idx[row]) : -1;
                src[j] = (unsigned)token < (unsigned)tokens ? token : -1;
            }
            for (int kt = 0; kt < num_k; ++kt) {
                mbar_wait(&ring.empty[s], parity ^ 1);
                Fp8SwigluSlot& slot = ring.slots[s];
                if (t == 0) {
                    ring.job[s] = TileJob{row0, row_end, n, expert};  // published by the arrive below
                    mbar_arrive_expect_tx(&ring.full[s], sizeof(slot.b));  // W's bytes: X's rows arrive by themselves
                    tma_load_2d(slot.b, map_w, kt * FP8_BK, expert * p.N + n * BN_SWIGLU, &ring.full[s]);
                }
#pragma unroll
                for (int j = 0; j < BM_SWIGLU / 16; ++j) {
                    const int r = t / 8 + 16 * j;
                    const bool valid = src[j] >= 0;
                    cp_async_16(&slot.a[swizzle_128b(r, chunk) * 16],
                                X + (size_t)(valid ? src[j] : 0) * p.K + kt * FP8_BK + chunk * 16, valid);
                }
                cp_async_mbar_arrive(&ring.full[s]);  // arrives by itself once this thread's copies land
                if (++s == STAGES) s = 0, parity ^= 1;
            }
        }
    }
};

extern "C" __global__ void __launch_bounds__(THREADS, 1)
fp8_gather_swiglu_quantize(const __grid_constant__ TmaDesc map_w, const fp8_e4m3* __restrict__ X,
                           const int* __restrict__ gather_idx, int tokens, const float* __restrict__ x_scales,
                           int ld_scales, const float* __restrict__ w_scales, fp8_e4m3* __restrict__ Aq,
                           float* __restrict__ a_scales, int ld_a_scales, const int* __restrict__ offs,
                           const TileInfo* __restrict__ tile_map, int* __restrict__ num_tiles, int M, int N, int K,
                           int group_m) {
    const Problem p{offs, tile_map, num_tiles, M, N, K, group_m};
    fp8_swiglu_quantize_tiles(Fp8GatheredRows{map_w, X, gather_idx, tokens}, x_scales, ld_scales, w_scales, Aq,
                              a_scales, ld_a_scales, p);
}
