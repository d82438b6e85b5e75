// 03_3_gather.cu: chapter 03, step 3: the rows of X gathered inside the load.
//
// An MoE layer's tokens arrive in token order; the expert GEMM wants them sorted by expert.
// Permute-then-GEMM writes a sorted copy of X (K times larger than X with top-K routing) and
// reads it back. Here the GEMM reads each token's row straight from X: the producer warpgroup
// looks up gather_idx[row] once per tile and copies the rows with cp.async (TMA cannot gather
// rows on Hopper), and each producer thread's copies arrive on the slot's full barrier when
// they land. W still comes by TMA. The sorted copy of X is never written.
//
// What changes from 03_2: the producer only (GatherProducer below); the skeleton and the
// epilogue are 03_2's.
#include "03_2_warp_specialized.cu"

// TMA copies boxes of a tensor, not a list of rows, so the producer warpgroup's 128 threads
// copy X's tile themselves with cp.async: 8 threads per row (one 16-byte chunk each, so a warp
// reads 4 whole rows of 128 bytes), each thread 8 of the 128 rows. Which token row to read is
// looked up once per tile, not once per slice.
//
// When may the consumers read a gathered slice? Each producer thread's cp.async copies count
// one arrival on the slot's full barrier when they have landed (cp.async.mbarrier.arrive), so
// the producer never waits for its own copies. cp.async writes shared memory through the
// ordinary (generic) proxy and wgmma reads it through the async proxy: after the barrier, each
// consumer thread fences the two proxies (fence.proxy.async) before its wgmma reads the slice.
// Measured on the H200 with interleaved timing, the fence costs nothing visible (Qwen3 up:
// 1.457 ms with it, 1.447 ms without, within the run-to-run spread).
struct GatherProducer : TmaProducer {  // TmaProducer's load of W; map_x is not used
    const bf16* X;          // the token matrix [tokens, K]
    const int* gather_idx;  // [M]: the row of X each sorted row comes from
    int tokens;             // rows of X: an index outside [0, tokens) reads zeros, never out of bounds
    int src[BM / 16];       // this thread's 8 source rows in the tile (-1: past the expert's end, zero-filled)

    __device__ static constexpr bool all_threads() { return true; }
    __device__ void begin_tile(const Problem& p, int expert, int n, int row0, int row_end) {
        TmaProducer::begin_tile(p, expert, n, row0, row_end);
        const int t = threadIdx.x % 128;
#pragma unroll
        for (int i = 0; i < BM / 16; ++i) {
            const int row = row0 + t / 8 + 16 * i;
            const int idx = row < row_end ? __ldg(&gather_idx[row]) : -1;
            src[i] = (unsigned)idx < (unsigned)tokens ? idx : -1;
        }
    }
    __device__ void issue(Slot& slot, u64* full, const Problem&, int, int, int, int kt) {
        mbar_arrive_expect_tx(full, BN * BK * 2);  // W's bytes only: X's rows arrive by themselves
        tma_load_2d(slot.b, map_w, kt * BK, w_row, full);
    }
    __device__ void copy(Slot& slot, u64* full, const Problem& p, int kt) {
        const int t = threadIdx.x % 128, chunk = t % 8;
#pragma unroll
        for (int i = 0; i < BM / 16; ++i) {
            const int r = t / 8 + 16 * i;
            const bool valid = src[i] >= 0;
            cp_async_16(&slot.a[swizzle_128b(r, chunk) * 8], X + (size_t)(valid ? src[i] : 0) * p.K + kt * BK + chunk * 8,
                        valid);
        }
        cp_async_mbar_arrive(full);  // arrives by itself once this thread's copies land
    }
    __device__ void finish(u64* full) { cp_async_mbar_arrive(full); }  // the arrival the barrier expects of this thread
    __device__ static void multiply(float (&acc)[BN / 2], const Slot& slot, int c) {
        fence_proxy_async();  // generic-proxy copies -> async-proxy reads
        TmaProducer::multiply(acc, slot, c);
    }
};

#if __INCLUDE_LEVEL__ == 0  // the kernel, only where this file is the one compiled (not in 03_4, 06_2)
extern "C" __global__ void __launch_bounds__(THREADS, 1)
gather_grouped_gemm(const __grid_constant__ TmaDesc map_w, const bf16* __restrict__ X,
                    const int* __restrict__ gather_idx, bf16* __restrict__ Y, const int* __restrict__ offs,
                    const TileInfo* __restrict__ tile_map, int* __restrict__ num_tiles, int M, int N, int K, int tokens,
                    int group_m) {
    const Problem p{offs, tile_map, num_tiles, M, N, K, group_m};
    warp_specialized_grouped_gemm(p, GatherProducer{{map_w, map_w}, X, gather_idx, tokens}, StagedStore{Y});
}
#endif
