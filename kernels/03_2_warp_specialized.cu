// 03_2_warp_specialized.cu: chapter 03, step 2: a producer warpgroup and two consumer
// warpgroups, in a persistent kernel (the skeleton is warp_specialized.cuh; this file gives it
// its two plainest policies).
//
// What changes from 03_1: the thread that issues the loads no longer multiplies, so a load is
// never late because its issuer was busy in wgmma, and a multiply never waits for the issuer
// to come back around. The producer runs up to STAGES slices ahead, across tiles; the
// consumers free a slot as soon as the multiply that read it is done. One block per SM walks
// the tiles in groups that share weights in L2.
#include "warp_specialized.cuh"

// The producer: thread 0 asks TMA for the slice of X (128 rows from the tile's first) and of
// W[e] (BN rows from the tile's N-tile); the slot's full barrier counts their bytes.
struct TmaProducer {
    const TmaDesc& map_x;
    const TmaDesc& map_w;
    int w_row;  // the tile's first row of W, seen as a 2D tensor [E * N, K]

    __device__ static constexpr bool all_threads() { return false; }
    __device__ void begin_tile(const Problem& p, int expert, int n, int, int) { w_row = expert * p.N + n * BN; }
    __device__ void issue(Slot& slot, u64* full, const Problem&, int, int, int row0, int kt) {
        mbar_arrive_expect_tx(full, sizeof(Slot));
        tma_load_2d(slot.a, map_x, kt * BK, row0, full);
        tma_load_2d(slot.b, map_w, kt * BK, w_row, full);
    }
    __device__ void copy(Slot&, u64*, const Problem&, int) {}
    __device__ void finish(u64*) {}
    __device__ static void multiply(float (&acc)[BN / 2], const Slot& slot, int c) {
        wgmma_slice(acc, slot.a + c * 64 * BK, slot.b);  // this warpgroup's 64 rows of X
    }
};

// The epilogue: a warpgroup's 64 x BN result leaves through shared memory, 128 columns at a
// time: its registers are written into the staging buffer (stage_accumulators), then read back
// as whole 16-byte chunks of rows and stored with coalesced 16-byte writes (a row past the
// expert's end is skipped). Storing straight from the accumulator registers (chapter 02) writes
// 4 bytes per thread, 16 bytes per row and warp: eight times as many memory transactions.

// The buffer's 64 x 128 values to Y[row0 : row0 + 64, col0 : col0 + 128], rows past row_end skipped.
__device__ __forceinline__ void copy_out_staged(Staging& buf, int c, bf16* Y, int ldy, int row0, int row_end, int col0) {
    const int t = threadIdx.x % 128;
    warpgroup_sync(c);  // every thread's values are in the buffer
#pragma unroll
    for (int i = 0; i < 8; ++i) {  // 64 rows x 16 chunks of 16 bytes, 8 per thread; a warp: 2 whole rows
        const int idx = t + 128 * i, r = idx / 16, chunk = idx % 16;
        const uint4 val = *reinterpret_cast<const uint4*>(&buf.box[chunk / 8][swizzle_128b(r, chunk % 8) * 8]);
        if (row0 + r < row_end) *reinterpret_cast<uint4*>(&Y[(size_t)(row0 + r) * ldy + col0 + chunk * 8]) = val;
    }
    warpgroup_sync(c);  // read back before the buffer is written again
}

struct StagedStore {
    bf16* Y;  // [M, N]
    __device__ void store(const float (&acc)[BN / 2], Staging& buf, int c, const Problem& p, int row0, int row_end,
                          int n) {
        const int t = threadIdx.x % 128;
#pragma unroll
        for (int half = 0; half < BN / 128; ++half) {
            stage_accumulators(acc, buf, half, t);
            copy_out_staged(buf, c, Y, p.N, row0, row_end, n * BN + 128 * half);
        }
    }
};

#if __INCLUDE_LEVEL__ == 0  // the kernel, only where this file is the one compiled (not in 03_3, 06_1)
extern "C" __global__ void __launch_bounds__(THREADS, 1)
ws_grouped_gemm(const __grid_constant__ TmaDesc map_x, const __grid_constant__ TmaDesc map_w,
                bf16* __restrict__ Y, const int* __restrict__ offs, const TileInfo* __restrict__ tile_map,
                int* __restrict__ num_tiles, int M, int N, int K, int group_m) {
    const Problem p{offs, tile_map, num_tiles, M, N, K, group_m};
    warp_specialized_grouped_gemm(p, TmaProducer{map_x, map_w}, StagedStore{Y});
}
#endif
