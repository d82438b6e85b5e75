// 09_3_decode_persistent.cu: chapter 09, step 3: 09_2 as a persistent kernel, one ring per
// block running on from one (expert, n-tile) to the next.
//
// 09_2 launches a block per 128 rows of each expert's W. Where K is short that block lives
// for a few slices only: the 7B shape's down-projection has K = 256, four slices of 64, so
// each block initialises its barriers, fills its ring, waits one DRAM latency for the first
// slice, multiplies four slices and stores, and the next block on that SM starts from an
// empty ring again (09_2 measured 70% of the copy rate there at 64 tokens, H200). The ring
// never streams.
//
// Here the grid is as many blocks as fit on the GPU at once, and block b takes the work
// items b, b + gridDim.x, b + 2 gridDim.x, ... of the list (expert 0, tile 0), (expert 0,
// tile 1), ..., (E - 1, last tile). Its thread 0 loads slices through the same ring of
// STAGES slots, and when one item's slices are all requested it goes on with the next
// item's, so the next item's weights arrive while this one multiplies and stores. Items of
// an expert with no tokens are skipped (their weights are never read), on counts every
// thread reads alike. Within an item everything is 09_2: only the chunks of slots that hold
// a token are loaded and multiplied.
#include "09_2_decode_slot_chunks.cu"

extern "C" __global__ void __launch_bounds__(256)
decode_grouped_gemm_persistent(const __grid_constant__ TmaDesc map_w,  // W as [E * N, K], boxes of 128 rows
                               const __grid_constant__ TmaDesc map_x,  // X as [E * SLOTS, K], boxes of CHUNK rows
                               bf16* __restrict__ Y,                   // [E, SLOTS, N]
                               const int* __restrict__ count,          // [E]: filled slots per expert
                               int N, int K, int E) {
    const int tiles = N / BW, items = E * tiles, num_k = K / BK;
    // the first item at or after i (in this block's stride) whose expert holds a token
    auto next_item = [&](int i) {
        while (i < items && count[i / tiles] <= 0) i += gridDim.x;
        return i;
    };
    auto chunks_of = [&](int item) { return (min(count[item / tiles], SLOTS) + CHUNK - 1) / CHUNK; };

    extern __shared__ unsigned char smem[];
    const u32 pad = (1024 - (smem_addr(smem) & 1023)) & 1023;
    DecodeSlot* slots = reinterpret_cast<DecodeSlot*>(smem + pad);
    u64* full = reinterpret_cast<u64*>(slots + STAGES);
    u64* empty = full + STAGES;
    const int warpgroup = threadIdx.x / 128, lane = threadIdx.x % 32;

    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(&full[s], 1);
            mbar_init(&empty[s], 8);
        }
        fence_proxy_async();
    }
    __syncthreads();

    // Thread 0's side of the ring: the item and slice it loads next, and how many loads so far
    // (load L goes to slot L % STAGES, the (L / STAGES)-th time round the ring).
    int load_item = next_item(blockIdx.x), load_kt = 0, loads = 0;
    auto load_next = [&]() {  // thread 0 only: one slice of the next item still to load, if any
        if (load_item >= items) return;
        const int s = loads % STAGES, expert = load_item / tiles, n0 = (load_item % tiles) * BW;
        const int chunks = chunks_of(load_item);
        if (loads >= STAGES) mbar_wait(&empty[s], (loads / STAGES - 1) & 1);
        mbar_arrive_expect_tx(&full[s], (BW + chunks * CHUNK) * BK * sizeof(bf16));
        tma_load_2d(slots[s].w, map_w, load_kt * BK, expert * N + n0, &full[s]);
        for (int c = 0; c < chunks; ++c)
            tma_load_2d(slots[s].x + c * CHUNK * BK, map_x, load_kt * BK, expert * SLOTS + c * CHUNK, &full[s]);
        ++loads;
        if (++load_kt == num_k) {
            load_kt = 0;
            load_item = next_item(load_item + gridDim.x);
        }
    };
    if (threadIdx.x == 0)
        for (int s = 0; s < STAGES; ++s) load_next();

    int used = 0;  // slices consumed so far, over all of this block's items
    for (int item = next_item(blockIdx.x); item < items; item = next_item(item + gridDim.x)) {
        const int expert = item / tiles, n0 = (item % tiles) * BW;
        const int rows = min(count[expert], SLOTS), chunks = chunks_of(item);
        float acc[CHUNKS][CHUNK / 2];
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
            for (int v = 0; v < CHUNK / 2; ++v) acc[c][v] = 0.0f;
        for (int kt = 0; kt < num_k; ++kt, ++used) {
            const int s = used % STAGES;
            mbar_wait(&full[s], (used / STAGES) & 1);
            const bf16* w = slots[s].w + warpgroup * 64 * BK;
            wgmma_fence();
#pragma unroll
            for (int c = 0; c < CHUNKS; ++c) {
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
            for (int c = 0; c < CHUNKS; ++c) wgmma_fence_operands(acc[c]);
            __syncwarp();
            if (lane == 0) mbar_arrive(&empty[s]);
            if (threadIdx.x == 0) load_next();  // this or a later item's slice, into the ring
        }
        // 09_2's epilogue, while the ring already holds the next item's first slices
        const int t = threadIdx.x % 128;
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c) {
            if (c >= chunks) break;
#pragma unroll
            for (int v = 0; v < CHUNK / 2; ++v) {
                const int r = 16 * (t / 32) + (t % 32) / 4 + 8 * ((v / 2) % 2);
                const int col = c * CHUNK + 8 * (v / 4) + 2 * (t % 4) + v % 2;
                if (col < rows)
                    Y[((size_t)expert * SLOTS + col) * N + n0 + warpgroup * 64 + r] = __float2bfloat16_rn(acc[c][v]);
            }
        }
    }
}
