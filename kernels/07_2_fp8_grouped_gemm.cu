// 07_2_fp8_grouped_gemm.cu: chapter 07, step 2: the block-scaled FP8 grouped GEMM (DeepSeek-V3's
// scheme, as DeepGEMM computes it), on chapter 03's warp-specialised ring.
//
//   Y[rows of e] = (Xq * x_scale) @ (Wq[e] * w_scale)^T,   Y bf16, sums in fp32
//   Xq [M, K] e4m3, one scale per row and 128 of K (07_1 writes them, transposed: S[K/128, ld]);
//   Wq [E, N, K] e4m3, one scale per 128 x 128 block (w_scales [E, N/128, K/128]).
//
// What changes from 03_2, and why:
//   1. The slice is 128 values of K, not 64: an e4m3 value is one byte, so a row of the slice is
//      still 128 bytes, and TMA writes the same 128-byte swizzled layout; wgmma takes k = 32 for
//      FP8 (both operands K-major: no transposed FP8 operand on Hopper).
//   2. The accumulator is promoted. Hopper's FP8 wgmma adds its products into the fp32
//      accumulator with only ~14 bits kept (chapter 07 measured it: one accumulator over K = 4096
//      of same-sign terms is 7% off). So each slice multiplies into a fresh accumulator `part`
//      (the first wgmma with scale-d = 0), and after it the consumer adds part, times the row's
//      and the block's scales, into the fp32 `acc` with ordinary FMAs: 128 products at a time in
//      the tensor core, everything longer in true fp32. The scales must be applied there anyway,
//      since they change every 128 of K.
//   3. So two accumulators live in registers: BN = 128 (64 + 64 fp32 a thread), not 256.
//   5. The roles are numbered the other way round: consumers are warpgroups 0 and 1 (consumer c
//      is threadIdx.x / 128), the producer warpgroup 2; the producer keeps 40 registers (TMA
//      alone; 03_3's gather needed 64) and the consumers take 232 (kernels/NOTES.md, session 13:
//      4-11% faster than with the skeleton's order and split, 64 / 216, in two runs on H100s).
//   4. The scales come from global memory (L2; they are small), each loaded one slice ahead so
//      that the load is never waited for: a thread's two row scales, and the block's weight scale
//      (one float for all 128 threads of a warpgroup). (A third TMA box per slot for the row
//      scales, a float32 map without swizzle, stopped the H100 with an illegal instruction;
//      session 12, kernels/NOTES.md.)
// The tile order, the ring and the epilogue (03_2's StagedStore) are the skeleton's.
#ifndef BN  // 256: the FP8_WIDE experiment (session 14), 128 x 256 tiles, two m64n128 halves
#define BN 128
#endif
#ifndef PRODUCER_REGS  // 07_4's producer copies rows itself and keeps more
#define PRODUCER_REGS 40
#define CONSUMER_REGS 232  // 128 x 40 + 256 x 232 <= 65536
#endif
#ifndef STAGES  // 07_3 has larger slots and sets its own
#if BN == 256
#define STAGES 4  // 4 x 48 KB + two 16 KB staging buffers, as 03_2
#else
#define STAGES 5  // 5 x 32 KB + two 16 KB staging buffers
#endif
#endif
#include "03_2_warp_specialized.cu"

#define FP8_BK 128  // e4m3 values of K per slice: one 128-byte swizzled row, like 64 bf16
typedef unsigned char fp8_e4m3;  // the bits; the tensor cores read them as e4m3

struct __align__(1024) Fp8Slot {
    fp8_e4m3 a[BM * FP8_BK];  // 128 rows of Xq, 128-byte swizzled
    fp8_e4m3 b[BN * FP8_BK];  // BN rows of Wq[e]
};

// D[64 x 128] (+)= A[64 x 32] * B[128 x 32]^T in e4m3, fp32 accumulator; accumulate = 0 ignores D
// (scale-d: the first k32 of a slice starts a fresh sum without zeroing 64 registers).
__device__ __forceinline__ void wgmma_m64n128k32_e4m3(float (&d)[64], u64 desc_a, u64 desc_b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
        "{"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, %64, %65, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

// One slice, a fresh sum: 4 x k32 (+32 bytes along each 128-byte row per step), fenced, committed.
__device__ __forceinline__ void wgmma_slice_fp8(float (&part)[64], const fp8_e4m3* a, const fp8_e4m3* b) {
    wgmma_fence();
    wgmma_fence_operands(part);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_m64n128k32_e4m3(part, wgmma_desc(a + 32 * kk), wgmma_desc(b + 32 * kk), kk);
    wgmma_commit();
}

// The factors of a slice's products for a thread's two rows, x_scale[row] * w_scale, each loaded
// from global memory (L2: the scales are small) one slice ahead, so that no load is waited for.
// x: the transposed activation scales S[kt, row], ld floats a row; row_lo, row_hi: the scales'
// rows of the thread's two rows (r and r + 8 of the tile, or their tokens where rows are
// gathered; past the scales' width: clamped, such rows are never stored); w: the weight block's
// scales along K.
struct SliceScales {
    const float *x_lo, *x_hi, *w;
    int ld, num_k;
    float lo, hi, wk;  // the next slice's

    __device__ SliceScales(const float* x, int ld_, int row_lo, int row_hi, const float* w_, int num_k_)
        : x_lo(x + min(row_lo, ld_ - 1)), x_hi(x + min(row_hi, ld_ - 1)), w(w_), ld(ld_), num_k(num_k_),
          lo(__ldg(x_lo)), hi(__ldg(x_hi)), wk(__ldg(w_)) {}

    // slice kt's factors (rows r and r + 8), and slice kt + 1's loads issued
    __device__ __forceinline__ void take(int kt, float& scale_lo, float& scale_hi) {
        scale_lo = lo * wk, scale_hi = hi * wk;
        if (kt + 1 < num_k) {
            wk = __ldg(w + kt + 1);
            lo = __ldg(x_lo + (size_t)(kt + 1) * ld);
            hi = __ldg(x_hi + (size_t)(kt + 1) * ld);
        }
    }
};

// The promotion: acc += part * (x_scale[row] * w_scale), in true fp32 (wgmma's fragment layout:
// accumulators v with (v & 2) set are the thread's second row, r + 8).
__device__ __forceinline__ void promote(float (&acc)[64], const float (&part)[64], float scale_lo, float scale_hi) {
#pragma unroll
    for (int v = 0; v < 64; ++v) acc[v] = fmaf(part[v], (v & 2) ? scale_hi : scale_lo, acc[v]);
}

// The producer of 07_2 and 07_3 (thread 256; the rest of its warpgroup returns at once): the
// tiles in order (take_tile), and for each slice of K, block_m rows of Xq and block_n rows of
// Wq[e] by TMA into the next free slot; at the end, a job with no rows that stops the consumers.
template <typename SlotT>
__device__ __forceinline__ void fp8_producer(const Ring<SlotT>& ring, const Problem& p, const TmaDesc& map_x,
                                             const TmaDesc& map_w, int m_tiles, int n_tiles, int num_k,
                                             int block_m, int block_n) {
    setmaxnreg_dec<PRODUCER_REGS>();
    if (threadIdx.x != 256) return;
    const int total = m_tiles * n_tiles;
    int s = 0, parity = 0;
    for (int i = 0;; ++i) {
        const int t = take_tile<false>(p.num_tiles + 1, ring.taken, i);
        if (t >= total) {  // the consumers stop at a slot with no rows
            mbar_wait(&ring.empty[s], parity ^ 1);
            ring.job[s] = TileJob{-1, 0, 0, 0};
            mbar_arrive(&ring.full[s]);
            return;
        }
        int m, n, expert, row0, row_end;
        expert_tile_coords(t, p, m_tiles, n_tiles, m, n, block_m);
        tile_rows(p.tile_map, p.offs, p.M, m, block_m, expert, row0, row_end);
        for (int kt = 0; kt < num_k; ++kt) {
            mbar_wait(&ring.empty[s], parity ^ 1);
            ring.job[s] = TileJob{row0, row_end, n, expert};  // published by the arrive below
            SlotT& slot = ring.slots[s];
            mbar_arrive_expect_tx(&ring.full[s], sizeof(SlotT));
            tma_load_2d(slot.a, map_x, kt * FP8_BK, row0, &ring.full[s]);
            tma_load_2d(slot.b, map_w, kt * FP8_BK, expert * p.N + n * block_n, &ring.full[s]);
            if (++s == STAGES) s = 0, parity ^= 1;
        }
    }
}

// A tile's main loop for one consumer warpgroup: per slice, a fresh sum of 128 products in
// `part`, waited for, then promoted into acc. (The wait costs this warpgroup's tensor time while
// it promotes; the other consumer's multiplies fill that gap. Two accumulators in turn, so that
// slice k + 1 multiplies while slice k is promoted, need 64 more registers: the compiler then
// spilled in this loop and the kernel ran 2.5-5x slower, session 13.) s, parity: the ring
// position of the tile's first slice, whose full barrier the caller has already waited for;
// left after its last. a_off, b_off: where this warpgroup's operands start in a slot.
// has_rows false: the slots are freed and nothing is multiplied (an empty half of the tile).
// turn: ISSUE_IN_TURN's (warp_specialized.cuh): with it the two consumers issue in turn, which
// here is meant to hide each one's promotion behind the other's multiplies.
// GATHERED: the slot's X rows were copied by ordinary (cp.async) stores, which the tensor cores'
// async proxy must be fenced against before reading (03_3).
template <bool GATHERED = false, typename SlotT>
__device__ __forceinline__ void fp8_mainloop(float (&acc)[64], const Ring<SlotT>& ring, int& s, int& parity,
                                             SliceScales& scales, int num_k, int a_off, int b_off, bool has_rows,
                                             TensorTurn& turn) {
    float part[64];
    for (int kt = 0; kt < num_k; ++kt) {
        float scale_lo, scale_hi;
        scales.take(kt, scale_lo, scale_hi);
        if (kt) mbar_wait(&ring.full[s], parity);
        turn.take();
        if (has_rows) {
            if (GATHERED) fence_proxy_async();
            wgmma_slice_fp8(part, ring.slots[s].a + a_off, ring.slots[s].b + b_off);
            turn.pass();  // issued: the other warpgroup's batch may queue behind this one
            wgmma_wait<0>();
            wgmma_fence_operands(part);
        } else {
            turn.pass();
        }
        mbar_arrive(&ring.empty[s]);  // every read of the slot is done: free it
        if (has_rows) promote(acc, part, scale_lo, scale_hi);
        if (++s == STAGES) s = 0, parity ^= 1;
    }
}

#if BN == 256
// The wide tile's main loop (FP8_WIDE, an experiment): per slice, the two 128-column halves in
// turn through one `part`, each promoted with its own weight block's scale. 128 + 64 registers of
// arrays where two accumulators of the full width would need 256; a tile reads W's slice once for
// 128 rows, and its X slice once for 256 columns: 48 KB from L2 per 8.4 MFLOP, where 128 x 128
// tiles read 32 KB per 4.2 (the prediction: 07_2 is bound by L2's bandwidth at 128 x 128).
// half h of the accumulator (columns 128 h ..) is acc[64 h ..]: the fragment runs over the
// columns in groups of 8, four values a group.
template <typename SlotT>
__device__ __forceinline__ void fp8_mainloop_wide(float (&acc)[128], const Ring<SlotT>& ring, int& s, int& parity,
                                                  SliceScales (&scales)[2], int num_k, int a_off, bool has_rows,
                                                  TensorTurn& turn) {
    float part[64];
    for (int kt = 0; kt < num_k; ++kt) {
        float scale_lo[2], scale_hi[2];
        scales[0].take(kt, scale_lo[0], scale_hi[0]);
        scales[1].take(kt, scale_lo[1], scale_hi[1]);
        if (kt) mbar_wait(&ring.full[s], parity);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            turn.take();
            if (has_rows) {
                wgmma_slice_fp8(part, ring.slots[s].a + a_off, ring.slots[s].b + half * 128 * FP8_BK);
                turn.pass();
                wgmma_wait<0>();
                wgmma_fence_operands(part);
            } else {
                turn.pass();
            }
            if (half == 1) mbar_arrive(&ring.empty[s]);  // every read of the slot is done: free it
            if (has_rows) {
#pragma unroll
                for (int v = 0; v < 64; ++v)
                    acc[64 * half + v] = fmaf(part[v], (v & 2) ? scale_hi[half] : scale_lo[half], acc[64 * half + v]);
            }
        }
        if (++s == STAGES) s = 0, parity ^= 1;
    }
}
#endif

#if __INCLUDE_LEVEL__ == 0  // the kernel, only where this file is the one compiled (not in 07_3)
extern "C" __global__ void __launch_bounds__(THREADS, 1)
fp8_grouped_gemm(const __grid_constant__ TmaDesc map_x, const __grid_constant__ TmaDesc map_w,
                 const float* __restrict__ x_scales, int ld_scales, const float* __restrict__ w_scales,
                 bf16* __restrict__ Y,
                 const int* __restrict__ offs, const TileInfo* __restrict__ tile_map, int* __restrict__ num_tiles,
                 int M, int N, int K, int group_m) {
    const Problem p{offs, tile_map, num_tiles, M, N, K, group_m};
    const Ring<Fp8Slot> ring = make_ring<Fp8Slot>(1);  // thread 0's expect_tx: the two boxes' bytes
    const int n_tiles = N / BN, m_tiles = num_tiles[0], num_k = K / FP8_BK;

    if (threadIdx.x >= 256) {  // -------------------------------------------- the producer: thread 256
        fp8_producer(ring, p, map_x, map_w, m_tiles, n_tiles, num_k, BM, BN);
    } else {  // ---------------------------------------------------------------- consumers
        setmaxnreg_inc<CONSUMER_REGS>();
        const int c = threadIdx.x / 128, t = threadIdx.x % 128;
        const int r = c * 64 + 16 * (t / 32) + (t % 32) / 4;  // this thread's rows of the tile: r and r + 8
        int s = 0, parity = 0;
        TensorTurn turn{c};
        for (;;) {
            mbar_wait(&ring.full[s], parity);  // the tile's first slice, or the end
            const TileJob job = ring.job[s];
            if (job.row0 < 0) break;
            const int r0 = job.row0 + c * 64;
            const bool has_rows = r0 < job.row_end;  // as in the skeleton: an empty half skips
#if BN == 256  // two weight blocks across the tile: w_scales [E, N / 128, K / 128]
            const float* w_scale = w_scales + ((size_t)job.expert * (2 * n_tiles) + 2 * job.n) * num_k;
            float acc[BN / 2];
#pragma unroll
            for (int v = 0; v < BN / 2; ++v) acc[v] = 0.0f;
            SliceScales scales[2] = {
                SliceScales(x_scales, ld_scales, job.row0 + r, job.row0 + r + 8, w_scale, num_k),
                SliceScales(x_scales, ld_scales, job.row0 + r, job.row0 + r + 8, w_scale + num_k, num_k)};
            fp8_mainloop_wide(acc, ring, s, parity, scales, num_k, c * 64 * FP8_BK, has_rows, turn);
#else
            // BN = 128 = the weights' scale block: one weight scale per slice of this tile
            const float* w_scale = w_scales + ((size_t)job.expert * n_tiles + job.n) * num_k;
            float acc[BN / 2];
#pragma unroll
            for (int v = 0; v < BN / 2; ++v) acc[v] = 0.0f;
            SliceScales scales(x_scales, ld_scales, job.row0 + r, job.row0 + r + 8, w_scale, num_k);
            fp8_mainloop(acc, ring, s, parity, scales, num_k, c * 64 * FP8_BK, 0, has_rows, turn);
#endif
            if (has_rows) StagedStore{Y}.store(acc, ring.staging[c], c, p, r0, job.row_end, job.n);
        }
        turn.finish();
    }
}
#endif
