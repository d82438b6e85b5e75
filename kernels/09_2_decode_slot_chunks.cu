// 09_2_decode_slot_chunks.cu: chapter 09, step 2: 09_1 multiplying only the token slots that
// hold a token.
//
// 09_1's wgmma N is the whole capacity, SLOTS, whatever an expert's count. At 512 tokens SLOTS is
// 256, yet an expert of DeepSeek-V3 holds about 16 tokens (512 x 8 / 256): each block loads and
// multiplies 16x the slots the step needs, and a step that should wait on memory waits on the
// tensor cores instead (09_1 measured 47-68% of the copy rate at 512 tokens, H200).
//
// Here the slots come in chunks of CHUNK, each chunk its own wgmma N and its own accumulator.
// A block counts the chunks that hold a filled slot, ceil(count / CHUNK), and for each slice of
// K loads its 128 rows of W once and those chunks of X only, then runs one chain of wgmmas per
// such chunk. The count is the same for every thread of the block (a uniform branch: the
// warpgroups never diverge), and the loop over chunks is unrolled, so each accumulator stays in
// registers. With SLOTS <= CHUNK there is one chunk and this is 09_1.
#include "09_1_decode_swap_ab.cu"

#ifndef CHUNK  // the launcher also builds CHUNK=64, for full experts (decode.gemm_chunk)
#define CHUNK (SLOTS < 32 ? SLOTS : 32)  // token slots per chunk: the wgmma N of one chain
#endif
static_assert(SLOTS % CHUNK == 0 && CHUNK >= 8, "CHUNK: a wgmma N (8, 16, 32, ...) that divides SLOTS");
constexpr int CHUNKS = SLOTS / CHUNK;

// The block's work, shared with 09_3: the 128 rows n0.. of W[expert] times chunks first ..
// first + chunks - 1 of the expert's slots (chunks <= HOLD: the accumulators it holds). The
// expert's slots start at row expert * capacity of X and Y; rows: its filled slots.
template <int HOLD>
__device__ __forceinline__ void multiply_chunks(const TmaDesc& map_w, const TmaDesc& map_x, bf16* __restrict__ Y,
                                                int expert, int n0, int capacity, int rows, int first, int chunks,
                                                int N, int K) {
    extern __shared__ unsigned char smem[];
    const int num_k = K / BK;
    const int warpgroup = threadIdx.x / 128, lane = threadIdx.x % 32;
    const DecodeRing ring = decode_ring(smem);  // 09_1's ring
    DecodeSlot* slots = ring.slots;
    u64 *full = ring.full, *empty = ring.empty;

    // W's 128 rows and the filled chunks' rows: the slot's bytes this block waits for
    const u32 slot_bytes = (BW + chunks * CHUNK) * BK * sizeof(bf16);
    auto load = [&](int kt) {  // thread 0 only, as in 09_1
        const int s = kt % STAGES;
        if (kt >= STAGES) mbar_wait(&empty[s], (kt / STAGES - 1) & 1);
        mbar_arrive_expect_tx(&full[s], slot_bytes);
        tma_load_2d(slots[s].w, map_w, kt * BK, expert * N + n0, &full[s]);
        for (int c = 0; c < chunks; ++c)  // chunk c's rows start 1024-byte aligned (CHUNK x 128 B)
            tma_load_2d(slots[s].x + c * CHUNK * BK, map_x, kt * BK, expert * capacity + (first + c) * CHUNK, &full[s]);
    };
    if (threadIdx.x == 0)
        for (int kt = 0; kt < STAGES && kt < num_k; ++kt) load(kt);

    float acc[HOLD][CHUNK / 2];
#pragma unroll
    for (int c = 0; c < HOLD; ++c)
#pragma unroll
        for (int v = 0; v < CHUNK / 2; ++v) acc[c][v] = 0.0f;
    for (int kt = 0; kt < num_k; ++kt) {
        const int s = kt % STAGES;
        mbar_wait(&full[s], (kt / STAGES) & 1);
        const bf16* w = slots[s].w + warpgroup * 64 * BK;
        wgmma_fence();
#pragma unroll
        for (int c = 0; c < HOLD; ++c) {
            if (c >= chunks) break;  // uniform across the block
            wgmma_fence_operands(acc[c]);
            const bf16* x = slots[s].x + c * CHUNK * BK;
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk)
                wgmma_m64k16_swapped<CHUNK>(acc[c], wgmma_desc(w + kk * 16), wgmma_desc(x + kk * 16));
        }
        wgmma_commit();
        wgmma_wait<0>();
#pragma unroll
        for (int c = 0; c < HOLD; ++c) wgmma_fence_operands(acc[c]);
        __syncwarp();
        if (lane == 0) mbar_arrive(&empty[s]);
        if (threadIdx.x == 0 && kt + STAGES < num_k) load(kt + STAGES);
    }
    // The epilogue, through shared memory. 09_1's writes each accumulator as a 2-byte value:
    // per store a warp writes 16 contiguous bytes for each of four token slots, a fraction of
    // a 32-byte sector, and a token's 128 outputs take 16 such pieces. Here the tile goes to the
    // ring's memory first (free once every warp's last wgmma has read it), one row of 128
    // outputs per token slot, and each row leaves as 16-byte vectors: whole sectors. (Session 21,
    // H100, 7B down at 512 tokens: 09_3 75% -> 77% of the copy rate; Mixtral up at 512 88 -> 91%.)
    constexpr int PITCH = BW + 8;  // bf16 a staged row: 16 bytes of padding spread the banks
    static_assert(HOLD * CHUNK * PITCH * sizeof(bf16) <= STAGES * sizeof(DecodeSlot), "the staged tile must fit the ring");
    bf16* stage = reinterpret_cast<bf16*>(slots);
    const int t = threadIdx.x % 128;
    __syncthreads();  // every warp's last wgmma has read the ring
#pragma unroll
    for (int c = 0; c < HOLD; ++c) {
        if (c >= chunks) break;
#pragma unroll
        for (int v = 0; v < CHUNK / 2; ++v) {  // accumulator v: row r of W (an output), token slot col
            const int r = 16 * (t / 32) + (t % 32) / 4 + 8 * ((v / 2) % 2);
            const int col = c * CHUNK + 8 * (v / 4) + 2 * (t % 4) + v % 2;
            stage[col * PITCH + warpgroup * 64 + r] = __float2bfloat16_rn(acc[c][v]);
        }
    }
    __syncthreads();
    const int filled = min(rows - first * CHUNK, chunks * CHUNK);  // this block's filled slots
    constexpr int VECS = BW / 8;                                     // 16-byte vectors a row
    for (int i = threadIdx.x; i < filled * VECS; i += 256) {  // the block's 256 threads
        const int slot = i / VECS, part = i % VECS;
        *reinterpret_cast<uint4*>(Y + ((size_t)expert * capacity + first * CHUNK + slot) * N + n0 + 8 * part) =
            *reinterpret_cast<const uint4*>(stage + slot * PITCH + 8 * part);
    }
}

extern "C" __global__ void __launch_bounds__(256)
decode_grouped_gemm_chunked(const __grid_constant__ TmaDesc map_w,  // W as [E * N, K], boxes of 128 rows
                            const __grid_constant__ TmaDesc map_x,  // X as [E * SLOTS, K], boxes of CHUNK rows
                            bf16* __restrict__ Y,                   // [E, SLOTS, N]
                            const int* __restrict__ count,          // [E]: filled slots per expert
                            int N, int K) {
    const int expert = blockIdx.y, n0 = blockIdx.x * BW;
    const int rows = min(count[expert], SLOTS);
    if (rows <= 0) return;  // an idle expert: W[e] is never read
    // every chunk that holds a filled slot, from the first
    multiply_chunks<CHUNKS>(map_w, map_x, Y, expert, n0, SLOTS, rows, 0, (rows + CHUNK - 1) / CHUNK, N, K);
}
