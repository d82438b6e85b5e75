// 09_3_decode_slot_split.cu: chapter 09, step 3: 09_2 with an expert's slots split over blocks.
//
// 09_2 keeps one accumulator per chunk of the capacity in registers, and its ring holds a slice
// of every chunk: at 256 slots (the capacity at 512 tokens) that is 154 registers a thread and
// 4 x 48 KB of ring, so one block fits an SM. When an expert's few tokens use one or two chunks,
// the block still has one SM to itself: its start (barriers, the first loads' latency) and its
// end (the epilogue) leave the SM's memory traffic idle, and with a short K (the 7B
// down-projection: four slices of 64) those are a large part of its life.
//
// Here an expert's slots come in GROUPS groups of HELD chunks, a block each: block (n-tile,
// group, expert) takes chunks group*HELD .. group*HELD+HELD-1 and returns at once if they hold
// no token. Its ring and its accumulators are sized for HELD chunks, not for the capacity: it is
// 09_2's block (multiply_chunks) built with SLOTS = HELD * CHUNK, 58 registers a thread, so two
// blocks share an SM and one's start and end hide under the other's loads. The price: an expert
// with more than HELD chunks has its W read once by each of its groups' blocks, so this suits
// sparse experts (a few dozen rows each), and decode.gemm_step keeps 09_2 where experts are full.
#ifndef CAPACITY
#define CAPACITY 256  // token slots per expert in the masked layout (128 or 256)
#endif
#ifndef HELD
#define HELD 2  // chunks per block
#endif
#define CHUNK 32               // 09_2's chunk of token slots: the wgmma N of one chain
#define SLOTS (HELD * CHUNK)  // 09_1's ring holds HELD chunks of token rows a slice
#include "09_2_decode_slot_chunks.cu"
static_assert(CAPACITY % SLOTS == 0, "CAPACITY: a multiple of HELD * CHUNK");
#define GROUPS (CAPACITY / SLOTS)  // an expert's groups of HELD chunks: blocks per (n-tile, expert)

extern "C" __global__ void __launch_bounds__(256)
decode_grouped_gemm_split(const __grid_constant__ TmaDesc map_w,  // W as [E * N, K], boxes of 128 rows
                          const __grid_constant__ TmaDesc map_x,  // X as [E * CAPACITY, K], boxes of CHUNK rows
                          bf16* __restrict__ Y,                   // [E, CAPACITY, N]
                          const int* __restrict__ count,          // [E]: filled slots per expert
                          int N, int K) {
    // The groups of slots are the grid's fastest index: x = n-tile * GROUPS + group. Most groups
    // past an expert's first find no token and return, each after holding a resident block's
    // place for its launch and one read of the count. With the groups as the slowest index (the
    // grid's z), those empty blocks all came after the last working one (7B at 512 tokens: 4608
    // of 6144); interleaved, they come and go beside working blocks. (Session 21, H100, 7B down:
    // 75% -> 79% of the copy rate at 512 tokens, 75 -> 82% at 256.)
    const int expert = blockIdx.y, n0 = blockIdx.x / GROUPS * BW, first = blockIdx.x % GROUPS * HELD;  // first chunk
    const int rows = min(count[expert], CAPACITY);
    const int chunks = min((rows + CHUNK - 1) / CHUNK - first, HELD);  // the filled chunks of this block's HELD
    if (chunks <= 0) return;  // an idle expert, or slots past its count: nothing read
    // 09_2's block on HELD chunks. (A loop over the groups inside one block instead of a block
    // per group made ptxas serialise the wgmmas, warning C7519.)
    multiply_chunks<HELD>(map_w, map_x, Y, expert, n0, CAPACITY, rows, first, chunks, N, K);
}
