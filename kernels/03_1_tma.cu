// 03_1_tma.cu: chapter 03, step 1: tiles loaded by the copy engine (TMA) into a ring of
// STAGES slots, each completing on an mbarrier.
//
// Same tile and grid as 02_5 (one block of two warpgroups per 128 x BN tile), but no thread
// computes an address or issues a copy any more except thread 0, which asks TMA for a whole
// slice (128 rows of X and BN rows of W[e], 64 values along K) with two instructions. Each
// slot of the ring has two barriers:
//   full[s]:  completes when the slice's bytes have landed (TMA counts them down);
//   empty[s]: completes when all 8 warps have finished multiplying the slice (8 arrivals),
//             so thread 0 may load the slice STAGES further along K into it.
// With STAGES = 1 nothing overlaps: load, wait, multiply, load... With STAGES = 4, three slices
// are on their way while one is multiplied: the wait for memory is hidden behind the math.
//
// X rows past an expert's end are loaded too (they are the next expert's, or zeros past M:
// TMA fills outside the tensor with zeros) and simply never stored.
#include "tma.cuh"

#define BN 256
#ifndef STAGES
#define STAGES 4
#endif
#define BM 128
#define BK 64

// The ring's bookkeeping, four one-line functions (exercise 07 asks for them, and compiles this
// file with its own). Slice kt of K goes into slot kt % STAGES. A slot's barriers complete once
// per use of the slot, so the u-th use (u = kt / STAGES) waits for the end of phase u: an
// mbarrier wait names only the phase's parity, u & 1. Before loading slice kt into its slot,
// the producer waits until the slice that was there (kt - STAGES) has been consumed by every
// warp: phase u - 1 of empty[slot]. The first STAGES slices find their slots empty.
#ifndef RING_FROM_EXERCISE
__device__ __forceinline__ int ring_slot(int kt) { return kt % STAGES; }
__device__ __forceinline__ int ring_full_parity(int kt) { return (kt / STAGES) & 1; }
__device__ __forceinline__ bool ring_producer_waits(int kt) { return kt >= STAGES; }
__device__ __forceinline__ int ring_empty_parity(int kt) { return (kt / STAGES - 1) & 1; }
#endif

struct __align__(1024) Slot {
    bf16 a[BM * BK];  // 128 rows of X, 64 values each, 128B-swizzled (as TMA writes them)
    bf16 b[BN * BK];  // BN rows of W[e]
};
constexpr u32 SLOT_BYTES = sizeof(Slot);

extern "C" __global__ void __launch_bounds__(256, 1)
tma_grouped_gemm(const __grid_constant__ TmaDesc map_x, const __grid_constant__ TmaDesc map_w,
                 bf16* __restrict__ Y, const int* __restrict__ offs, const TileInfo* __restrict__ tile_map,
                 int M, int N, int K) {
    extern __shared__ unsigned char smem[];
    const u32 pad = (1024 - (smem_addr(smem) & 1023)) & 1023;
    Slot* slots = reinterpret_cast<Slot*>(smem + pad);
    u64* full = reinterpret_cast<u64*>(slots + STAGES);
    u64* empty = full + STAGES;

    int expert, row0, row_end;
    if (!tile_rows(tile_map, offs, M, blockIdx.y, BM, expert, row0, row_end)) return;
    const int col0 = blockIdx.x * BN;
    const int w_row = expert * N + col0;  // W seen as a 2D tensor [E * N, K]
    const int num_k = K / BK;
    const int warpgroup = threadIdx.x / 128, lane = threadIdx.x % 32;

    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(&full[s], 1);   // thread 0's arrive_expect_tx
            mbar_init(&empty[s], 8);  // one arrival per warp
        }
        fence_proxy_async();  // make the initialised barriers visible to the copy engine
    }
    __syncthreads();

    auto load = [&](int kt) {  // thread 0 only: slice kt into its slot, once the slot is free
        const int s = ring_slot(kt);
        if (ring_producer_waits(kt)) mbar_wait(&empty[s], ring_empty_parity(kt));
        trace_event(0, kt);
        mbar_arrive_expect_tx(&full[s], SLOT_BYTES);
        tma_load_2d(slots[s].a, map_x, kt * BK, row0, &full[s]);
        tma_load_2d(slots[s].b, map_w, kt * BK, w_row, &full[s]);
    };
    if (threadIdx.x == 0)
        for (int kt = 0; kt < STAGES && kt < num_k; ++kt) load(kt);

    float acc[BN / 2];
#pragma unroll
    for (int v = 0; v < BN / 2; ++v) acc[v] = 0.0f;
    for (int kt = 0; kt < num_k; ++kt) {
        const int s = ring_slot(kt);
        mbar_wait(&full[s], ring_full_parity(kt));  // the slice is in shared memory
        if (threadIdx.x == 128) trace_event(1, kt);  // traced by a thread that only multiplies
        const bf16* a = slots[s].a + warpgroup * 64 * BK;
        wgmma_fence();
        wgmma_fence_operands(acc);
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk)
            wgmma_m64k16(acc, wgmma_desc(a + kk * 16), wgmma_desc(slots[s].b + kk * 16));
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_fence_operands(acc);
        if (threadIdx.x == 128) trace_event(2, kt);
        __syncwarp();
        if (lane == 0) mbar_arrive(&empty[s]);  // this warp is done with slot s
        if (threadIdx.x == 0 && kt + STAGES < num_k) load(kt + STAGES);  // refill it once all are
    }
    store_wgmma_tile(acc, Y, N, row0 + warpgroup * 64, row_end, col0);
    if (threadIdx.x == 128) trace_event(3, 0);
}
