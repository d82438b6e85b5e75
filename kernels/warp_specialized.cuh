// warp_specialized.cuh: the persistent, warp-specialised grouped GEMM of chapter 03 (sm_90a).
// Steps 03_2 (plain), 03_3 (X rows gathered inside the load) and 03_4 (SwiGLU in the epilogue),
// and chapter 06's 06_1 (W stored [E, K, N]) and 06_2 (the SwiGLU backward in the epilogue), are
// this one kernel body with different switches; each step's file says what it adds.
//
// Roles. A block is three warpgroups (384 threads), one block per SM, persistent as in 02_6,
// but taking its next tile from a shared counter when it is ready for one (take_tile below):
//   warpgroup 0, the producer: only loads. It gives most of its registers away (setmaxnreg) and
//     runs ahead of the math by up to STAGES slices, across tile boundaries: while the consumers
//     store one tile, the first slices of the next are already arriving.
//   warpgroups 1 and 2, the consumers: only multiply (64 rows of the 128 x BN tile each) and
//     store. No __syncthreads anywhere in the loop: the two sides meet only at mbarriers.
//       full[s]  completes when slot s holds its slice (bytes counted by TMA, and, for a
//                gathered X, one arrival per producer thread when its cp.async copies land);
//       empty[s] completes when the 8 consumer warps are done reading slot s.
//
// Tile order. Tile t covers M-tile m and N-tile n (tile map: which expert and rows an M-tile is).
// Consecutive t go down a group of up to group_m M-tiles of one expert before moving one N-tile
// right, so the SMs busy at the same moment share both their W tiles (all M-tiles of one
// expert) and their X rows in L2, instead of streaming a whole expert's weights once per
// M-tile. The host picks group_m (grouped_gemm.group_m_for): about one expert's M-tiles, fewer
// when K is long. Three things keep that sharing true in practice (kernels/NOTES.md, measured on
// DeepSeek-V3): groups never straddle two experts (expert_tile_coords), tiles are handed out in
// order as blocks become free (take_tile), and a warpgroup with no rows in a tile skips it.
//
// Epilogue. A warpgroup's 64 x BN result leaves through shared memory, 128 columns at a time:
// its registers are written into a small staging buffer (the 128-byte swizzle keeps those
// writes free of bank conflicts), then read back as whole 16-byte chunks of rows and stored
// with coalesced 16-byte writes (a row past the expert's end is skipped). Storing straight from
// the accumulator registers (chapter 02) writes 4 bytes per thread, 16 bytes per row and warp:
// eight times as many memory transactions.
#pragma once
#include "tma.cuh"

#define BM 128
#define BK 64
#ifndef BN
#define BN 256
#endif
#ifndef STAGES
#define STAGES 4  // 4 x 48 KB with BN = 256
#endif
#define THREADS 384
#ifndef PRODUCER_REGS
#define PRODUCER_REGS 64  // 40 is enough for TMA alone; the gather's row list needs 64 not to spill (NVRTC 13.0)
#endif
#ifndef DYNAMIC_TILES
#define DYNAMIC_TILES 1  // 0: block b takes tiles b, b + gridDim.x, ... (02_6's static order)
#endif
#ifndef EXPERT_GROUPS
#define EXPERT_GROUPS 1  // 0: groups of group_m M-tiles, wherever the experts begin (expert_tile_coords)
#endif
#ifndef SKIP_EMPTY_HALF
#define SKIP_EMPTY_HALF 1  // 0: both consumer warpgroups multiply every tile, rows past the end or not
#endif
#ifndef CONSUMER_REGS
#define CONSUMER_REGS 216  // 128 x 64 + 256 x 216 <= 65536 registers of the SM
#endif

struct __align__(1024) Slot {
    bf16 a[BM * BK];  // 128 rows of X, 64 values along K each, 128B-swizzled
    bf16 b[BN * BK];  // BN rows of W[e]
};
struct __align__(1024) Staging {  // one consumer warpgroup's epilogue buffer: 64 rows x 128 columns,
    bf16 box[2][64 * 64];         // as two 64 x 64 boxes in the 128-byte swizzled layout
};

// Tile t -> (M-tile, N-tile), grouped as described above.
__device__ __forceinline__ void tile_coords(int t, int m_tiles, int n_tiles, int group_m, int& m, int& n) {
    const int per_group = group_m * n_tiles;
    const int group = t / per_group, first = group * group_m;
    const int rows = min(group_m, m_tiles - first);
    const int i = t - group * per_group;
    m = first + i % rows;
    n = i / rows;
}

struct Problem {
    const bf16* X;          // gathered: X is the token matrix [tokens, K], read at rows gather_idx[]
    const int* gather_idx;  // [M]: the row of X each sorted row comes from (GATHER only)
    bf16* Y;                // [M, N] (plain), or H, the pre-activation, [M, N] or nullptr (SWIGLU)
    bf16* A;                // SWIGLU only: [M, N / 2] = silu(gate) * up
    const int* offs;
    const TileInfo* tile_map;
    int* num_tiles;         // [0]: M-tiles (build_tile_map); [1]: the next tile to hand out (DYNAMIC_TILES)
    int M, N, K;
    int tokens;             // rows of X (GATHER): an index outside [0, tokens) reads zeros, never out of bounds
    int group_m;            // M-tiles per group of the tile order
    // DSWIGLU only (chapter 06's backward): the forward's H [M, 2N], each row's routing weight,
    // and each (N-tile, row)'s share of ds [N / BN, M]; Y receives dH [M, 2N], A receives s * A [M, N].
    const bf16* H;
    const float* row_scale;
    float* ds_part;
};

// Tile t -> (M-tile m, N-tile n) with groups that never straddle two experts (EXPERT_GROUPS):
// expert e's M-tiles first_e .. first_e + count_e - 1 own the tile numbers first_e * n_tiles ..
// (first_e + count_e) * n_tiles - 1, in groups of at most group_m of its M-tiles. So t / n_tiles
// is one of e's M-tiles, and the tile map (its expert and first row) gives first_e and count_e.
// Without it, a group of group_m M-tiles often holds the end of one expert and the start of the
// next: the two halves of that expert run a group apart in time and read its W twice
// (DeepSeek-V3, 2-3 M-tiles an expert).
__device__ __forceinline__ void expert_tile_coords(int t, const Problem& p, int m_tiles, int n_tiles, int& m, int& n) {
    if (!EXPERT_GROUPS) return tile_coords(t, m_tiles, n_tiles, p.group_m, m, n);
    const TileInfo one = p.tile_map[t / n_tiles];
    int start, end;
    expert_rows(p.offs, one.expert, p.M, start, end);
    const int first = t / n_tiles - (one.row - start) / BM, count = ceil_div(end - start, BM);
    tile_coords(t - first * n_tiles, count, n_tiles, p.group_m, m, n);
    m += first;
}

// ---------------------------------------------------------------------------------------------
// X gathered inside the load (GATHER). TMA copies boxes of a tensor, not a list of rows, so the
// producer warpgroup's 128 threads copy X's tile themselves with cp.async: 8 threads per row
// (one 16-byte chunk each, so a warp reads 4 whole rows of 128 bytes), each thread 8 of the
// 128 rows. Which token row to read is looked up once per tile, not once per slice.
// ---------------------------------------------------------------------------------------------
struct GatherRows {
    int src[BM / 16];  // this thread's 8 source rows (-1: past the expert's end, zero-filled)
};

__device__ __forceinline__ void gather_rows(GatherRows& g, const int* gather_idx, int tokens, int row0, int row_end) {
    const int t = threadIdx.x % 128;
#pragma unroll
    for (int i = 0; i < BM / 16; ++i) {
        const int row = row0 + t / 8 + 16 * i;
        const int src = row < row_end ? __ldg(&gather_idx[row]) : -1;
        g.src[i] = (unsigned)src < (unsigned)tokens ? src : -1;
    }
}

__device__ __forceinline__ void gather_slice(bf16* a, const GatherRows& g, const bf16* X, int K, int k0) {
    const int t = threadIdx.x % 128, chunk = t % 8;
#pragma unroll
    for (int i = 0; i < BM / 16; ++i) {
        const int r = t / 8 + 16 * i;
        const bool valid = g.src[i] >= 0;
        cp_async_16(&a[swizzle_128b(r, chunk) * 8], X + (size_t)(valid ? g.src[i] : 0) * K + k0 + chunk * 8, valid);
    }
}

// When may the consumers read a gathered slice? Each producer thread's cp.async copies count
// one arrival on the slot's full barrier when they have landed (cp.async.mbarrier.arrive), so
// the producer never waits for its own copies. cp.async writes shared memory through the
// ordinary (generic) proxy and wgmma reads it through the async proxy: after the barrier, each
// consumer thread fences the two proxies (fence.proxy.async) before its wgmma reads the slice.
// Measured on the H200 with interleaved timing, the fence costs nothing visible (Qwen3 up:
// 1.457 ms with it, 1.447 ms without, within the run-to-run spread).

// ---------------------------------------------------------------------------------------------
// SwiGLU epilogue (SWIGLU). W's rows are interleaved, gate_j at row 2j and up_j at row 2j + 1
// (moe_course.io_overlap.interleave_gate_up), so a thread's two neighbouring accumulators
// (v, v + 1) are one (gate, up) pair: A[row, j] = silu(gate) * up, with no data exchanged
// (store_swiglu_staged below). H, the pre-activation, is stored too when asked for (the
// backward pass needs it).
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float silu(float x) { return __fdividef(x, 1.0f + __expf(-x)); }  // fast divide: 64 per thread and tile

// ---------------------------------------------------------------------------------------------
// The staged epilogue (see the top of this file). bar.sync 1 + c: a barrier for the 128 threads
// of consumer warpgroup c alone (barrier 0 is __syncthreads).
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void warpgroup_sync(int c) { asm volatile("bar.sync %0, 128;\n" :: "r"(1 + c) : "memory"); }

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

__device__ __forceinline__ bf16* staged(Staging& buf, int r, int col) {  // col in 0..127
    return &buf.box[col / 64][swizzle_128b(r, (col % 64) / 8) * 8 + col % 8];
}

// The warpgroup's 64 x BN accumulators, 128 columns at a time.
template <int NV>
__device__ __forceinline__ void store_tile_staged(const float (&d)[NV], Staging& buf, int c, bf16* Y, int ldy,
                                                  int row0, int row_end, int col0) {
    const int t = threadIdx.x % 128;
#pragma unroll
    for (int half = 0; half < NV / 64; ++half) {  // 128 columns = 64 accumulators per thread
#pragma unroll
        for (int v = 64 * half; v < 64 * half + 64; v += 2) {
            const int r = 16 * (t / 32) + (t % 32) / 4 + 8 * ((v / 2) % 2);  // wgmma's fragment layout
            const int col = 8 * (v / 4) + 2 * (t % 4) - 128 * half;
            *reinterpret_cast<__nv_bfloat162*>(staged(buf, r, col)) = __floats2bfloat162_rn(d[v], d[v + 1]);
        }
        copy_out_staged(buf, c, Y, ldy, row0, row_end, col0 + 128 * half);
    }
}

// The same 64 x BN accumulators leaving by TMA stores (tma_store_2d), for tiles that are always
// whole (chapter 06's weight gradients): the registers go to a staging buffer as above, then one
// thread hands its two 64 x 64 boxes to the copy engine and the warpgroup goes straight on to
// its next tile's multiplies while the bytes drain to memory. Ordinary stores are issued by the
// warpgroup itself, 16 bytes a thread at a time, and its next multiplies wait until the last is
// issued (and all SMs of a persistent grid reach their epilogue together, so memory is idle
// during the multiplies and busy after them). The one buffer is written again once the copy
// engine has read out its previous contents.
template <int NV>
__device__ __forceinline__ void store_tile_tma(const float (&d)[NV], Staging& buf, int c, const TmaDesc& map,
                                               int row0, int col0) {
    const int t = threadIdx.x % 128;
#pragma unroll
    for (int half = 0; half < NV / 64; ++half) {  // 128 columns = 64 accumulators per thread
        if (t == 0) tma_store_wait_read<0>();
        warpgroup_sync(c);  // the buffer is free
#pragma unroll
        for (int v = 64 * half; v < 64 * half + 64; v += 2) {
            const int r = 16 * (t / 32) + (t % 32) / 4 + 8 * ((v / 2) % 2);  // wgmma's fragment layout
            const int col = 8 * (v / 4) + 2 * (t % 4) - 128 * half;
            *reinterpret_cast<__nv_bfloat162*>(staged(buf, r, col)) = __floats2bfloat162_rn(d[v], d[v + 1]);
        }
        fence_proxy_async();  // these writes, visible to the copy engine
        warpgroup_sync(c);
        if (t == 0) {
            tma_store_2d(map, buf.box[0], col0 + 128 * half, row0);
            tma_store_2d(map, buf.box[1], col0 + 128 * half + 64, row0);
            tma_store_commit();
        }
    }
}

// SwiGLU of the warpgroup's 64 x BN accumulators (BN / 2 output columns, at most 128).
template <int NV>
__device__ __forceinline__ void store_swiglu_staged(const float (&d)[NV], Staging& buf, int c, bf16* A, int lda,
                                                    int row0, int row_end, int col0) {
    static_assert(NV <= 128, "one staging buffer holds 128 output columns");
    const int t = threadIdx.x % 128;
#pragma unroll
    for (int v = 0; v < NV; v += 2) {
        const int r = 16 * (t / 32) + (t % 32) / 4 + 8 * ((v / 2) % 2);
        const int j = 4 * (v / 4) + t % 4;  // (col, col + 1) = (gate_j, up_j)
        *staged(buf, r, j) = __float2bfloat16_rn(silu(d[v]) * d[v + 1]);
    }
    copy_out_staged(buf, c, A, lda, row0, row_end, col0 / 2);
}

// ---------------------------------------------------------------------------------------------
// The SwiGLU backward in the epilogue (DSWIGLU, chapter 06). The accumulators hold dA' = the
// gathered output gradient times W_down[e] (before the routing weight s of the row). With the
// forward's H read back (gate_j, up_j at columns 2j, 2j + 1, as the forward wrote them):
//     a = silu(g) u,   ds += dA' a   (the routing weight's gradient, summed along the row),
//     dA = s dA',      dg = dA u silu'(g),   du = dA silu(g),   silu'(g) = sig (1 + g (1 - sig)).
// Written: dH (interleaved like H, for the input and W_gate_up gradients) and s * a (for the
// W_down gradient); A itself was never kept by the forward. The four threads of a quad share
// a row: their ds shares are summed with two shuffles, and one thread writes the tile's share
// (a row spans N / BN tiles; the host adds those few shares up, so no atomics).
// ---------------------------------------------------------------------------------------------
// The loads of H come first, 16 pairs' worth at a time and unconditional (a row past the
// expert's end reads the tile's last row instead, and its results are not stored): written as
// "if the row is valid, load, compute, store" per pair, each load waited for the previous
// store, 64 memory round trips in a row per tile, and the epilogue took as long as the mainloop
// (measured on the H200: 1.40 ms against 0.63 ms without it, Qwen3 shape).
template <int NV>
__device__ __forceinline__ void store_dswiglu(const float (&d)[NV], const Problem& p, int row0, int row_end, int n_tile) {
    constexpr int BATCH = 16;  // pairs whose H is loaded together
    const int t = threadIdx.x % 128;
    const int r_first = row0 + 16 * (t / 32) + (t % 32) / 4;  // this thread's rows: r_first, r_first + 8
    bool valid[2];
    float scale[2], ds[2] = {0.0f, 0.0f};
    const bf16* h_row[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int row = r_first + 8 * i;
        valid[i] = row < row_end;
        scale[i] = valid[i] ? p.row_scale[row] : 0.0f;
        h_row[i] = p.H + (size_t)(valid[i] ? row : row_end - 1) * 2 * p.N + 2 * n_tile * BN;  // any row that exists
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {  // the thread's two rows, one after the other
        const int row = r_first + 8 * i;
#pragma unroll
        for (int b = 0; b < NV / 4; b += BATCH) {  // the row's NV / 4 pairs: v = 4 m + 2 i
            uint2 h[BATCH];
#pragma unroll
            for (int q = 0; q < BATCH; ++q) {
                const int m = b + q, col = 8 * m + 2 * (t % 4);  // columns col, col + 1 of dA' in the tile
                h[q] = __ldg(reinterpret_cast<const uint2*>(h_row[i] + 2 * col));  // gate, up, gate, up
            }
#pragma unroll
            for (int q = 0; q < BATCH; ++q) {
                const int m = b + q, v = 4 * m + 2 * i;
                const int j = n_tile * BN + 8 * m + 2 * (t % 4);
                const float2 gu0 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&h[q].x));
                const float2 gu1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&h[q].y));
                const float g[2] = {gu0.x, gu1.x}, u[2] = {gu0.y, gu1.y};
                float a[2], dh[4];
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float sig = __fdividef(1.0f, 1.0f + __expf(-g[e])), silu_g = g[e] * sig;
                    const float da = scale[i] * d[v + e];
                    a[e] = silu_g * u[e];
                    ds[i] += d[v + e] * a[e];
                    dh[2 * e] = da * u[e] * sig * (1.0f + g[e] * (1.0f - sig));
                    dh[2 * e + 1] = da * silu_g;
                }
                if (valid[i]) {
                    __nv_bfloat162 out[2] = {__floats2bfloat162_rn(dh[0], dh[1]), __floats2bfloat162_rn(dh[2], dh[3])};
                    *reinterpret_cast<uint2*>(p.Y + (size_t)row * 2 * p.N + 2 * j) = *reinterpret_cast<const uint2*>(out);
                    *reinterpret_cast<__nv_bfloat162*>(p.A + (size_t)row * p.N + j) =
                        __floats2bfloat162_rn(scale[i] * a[0], scale[i] * a[1]);
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {  // the quad's four shares of each row; the quad shares r_first
        ds[i] += __shfl_xor_sync(0xffffffffu, ds[i], 1);
        ds[i] += __shfl_xor_sync(0xffffffffu, ds[i], 2);
        if (t % 4 == 0 && valid[i]) p.ds_part[(size_t)n_tile * p.M + r_first + 8 * i] = ds[i];
    }
}

// ---------------------------------------------------------------------------------------------
// Shared memory: the ring of STAGES slots (1024-byte aligned, as the 128-byte swizzle needs),
// the two consumers' staging buffers, a full and an empty mbarrier per slot (initialised by one
// thread before the block's one __syncthreads), then which tile each slot's slice is of.
// SlotT: what one slice holds (Slot here, another layout in 06_3).
// ---------------------------------------------------------------------------------------------
struct TileJob {  // what the consumers need of a tile: its rows [row0, row_end) and its N-tile
    int row0, row_end, n;
};

template <typename SlotT>
struct Ring {
    SlotT* slots;
    Staging* staging;
    u64* full;   // full[s]: slot s holds its slice (bytes counted by TMA, cp.async arrivals)
    u64* empty;  // empty[s]: the 8 consumer warps are done reading slot s
    TileJob* job;  // job[s]: the tile whose slice slot s holds (row0 < 0: no tiles left)
    int* taken;    // two words through which the producer's thread 0 hands a tile to the others
                   // (job and taken: warp_specialized_grouped_gemm only; 06_3 has no room for them)
};

template <typename SlotT>
__device__ __forceinline__ Ring<SlotT> make_ring(int full_arrivals) {
    extern __shared__ unsigned char smem[];
    const u32 pad = (1024 - (smem_addr(smem) & 1023)) & 1023;
    Ring<SlotT> r;
    r.slots = reinterpret_cast<SlotT*>(smem + pad);
    r.staging = reinterpret_cast<Staging*>(r.slots + STAGES);
    r.full = reinterpret_cast<u64*>(r.staging + 2);
    r.empty = r.full + STAGES;
    r.job = reinterpret_cast<TileJob*>(r.empty + STAGES);
    r.taken = reinterpret_cast<int*>(r.job + STAGES);
    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(&r.full[s], full_arrivals);
            mbar_init(&r.empty[s], 8);  // one arrival per consumer warp
        }
        fence_proxy_async();
    }
    __syncthreads();  // the last block-wide barrier: from here on, roles meet at mbarriers only
    return r;
}

// ---------------------------------------------------------------------------------------------
// Which tile next. Statically (02_6), block b takes tiles b, b + gridDim.x, ...: blocks drift
// apart over the waves (each tile's time varies a little), and tiles that share W's rows stop
// running at the same moment, so W is read from memory again (DeepSeek-V3, 2-3 M-tiles per
// expert: Nsight Compute counted 22-25 GB read by the up-projection and dX products whose
// weights are 15 GB). Dynamically, a producer ready for a new tile takes the next number from a
// counter in global memory (build_tile_map zeroes it): the tiles in flight are always one
// window of consecutive numbers, whose members share W's rows (tile_coords) and started within
// a few microseconds of each other. The consumers learn each tile from its first slot (job:
// the producer has already looked up its rows), and a job with no rows tells them to stop.
// ---------------------------------------------------------------------------------------------
// The tile claimed, for all the producer's 128 threads (ALL_THREADS: the gather needs it) or
// for thread 0 alone. Thread 0 hands it round through shared memory: two words, used in turn;
// when thread 0 writes taken[i % 2] again (tile i + 2), every thread has passed tile i + 1's
// barrier and so has read tile i's. (Claiming the next tile one tile early, to hide the
// atomic's round trip, made DeepSeek-V3's up-projection 17% slower: the claims then follow the
// order in which the blocks began their previous tiles, and the window comes apart.)
template <bool ALL_THREADS>
__device__ __forceinline__ int take_tile(int* counter, int* taken, int i) {
    if (!DYNAMIC_TILES) return blockIdx.x + i * gridDim.x;
    if (!ALL_THREADS) return atomicAdd(counter, 1);
    if (threadIdx.x == 0) taken[i % 2] = atomicAdd(counter, 1);
    asm volatile("bar.sync 3, 128;\n" ::: "memory");  // barriers 1, 2: the consumers' epilogues
    return taken[i % 2];
}

// ---------------------------------------------------------------------------------------------
// The kernel body.
// ---------------------------------------------------------------------------------------------
// B_MN: W is stored [E, K, N] (N contiguous) instead of [E, N, K]; its tile arrives as BN / 64
// TMA boxes of 64 x 64 (the map describes W as an [E * K, N] matrix) and wgmma reads it
// transposed (wgmma_slice_b_mn). Chapter 06 multiplies by W and by W^T without copying W.
template <bool GATHER, bool SWIGLU, bool B_MN = false, bool DSWIGLU = false>
__device__ __forceinline__ void warp_specialized_grouped_gemm(const TmaDesc& map_x, const TmaDesc& map_w,
                                                              const Problem& p) {
    const Ring<Slot> ring = make_ring<Slot>(GATHER ? 1 + 128 : 1);  // expect_tx (+ each producer thread's cp.async)
    Slot* slots = ring.slots;
    Staging* staging = ring.staging;
    u64 *full = ring.full, *empty = ring.empty;
    const int warpgroup = threadIdx.x / 128, lane = threadIdx.x % 32;

    const int n_tiles = p.N / BN, m_tiles = p.num_tiles[0];
    const int total = m_tiles * n_tiles, num_k = p.K / BK;

    if (warpgroup == 0) {  // ------------------------------------------------ producer
        setmaxnreg_dec<PRODUCER_REGS>();
        if (!GATHER && threadIdx.x != 0) return;  // TMA needs a single thread
        int s = 0, parity = 0, slice = 0;  // slice: counted across tiles, for the trace
        for (int i = 0;; ++i) {
            const int t = take_tile<GATHER>(p.num_tiles + 1, ring.taken, i);
            if (t >= total) {  // one more slot, holding no slice: the consumers stop there
                mbar_wait(&empty[s], parity ^ 1);
                if (threadIdx.x == 0) {
                    ring.job[s] = TileJob{-1, 0, 0};
                    mbar_arrive(&full[s]);
                }
                if (GATHER) cp_async_mbar_arrive(&full[s]);
                break;
            }
            int m, n, expert, row0, row_end;
            expert_tile_coords(t, p, m_tiles, n_tiles, m, n);
            tile_rows(p.tile_map, p.offs, p.M, m, BM, expert, row0, row_end);
            const int w_row = expert * p.N + n * BN;
            GatherRows g;
            if (GATHER) gather_rows(g, p.gather_idx, p.tokens, row0, row_end);
            for (int kt = 0; kt < num_k; ++kt) {
                mbar_wait(&empty[s], parity ^ 1);  // the consumers are done with this slot
                if (threadIdx.x == 0) {
                    trace_event(0, slice);
                    ring.job[s] = TileJob{row0, row_end, n};  // published by the arrive below (a release)
                    mbar_arrive_expect_tx(&full[s], GATHER ? BN * BK * 2 : sizeof(Slot));
                    if (!GATHER) tma_load_2d(slots[s].a, map_x, kt * BK, row0, &full[s]);
                    if (B_MN) {
#pragma unroll
                        for (int b = 0; b < BN / 64; ++b)
                            tma_load_2d(slots[s].b + b * 64 * BK, map_w, n * BN + 64 * b, expert * p.K + kt * BK, &full[s]);
                    } else {
                        tma_load_2d(slots[s].b, map_w, kt * BK, w_row, &full[s]);
                    }
                }
                if (GATHER) {
                    gather_slice(slots[s].a, g, p.X, p.K, kt * BK);
                    cp_async_mbar_arrive(&full[s]);  // arrives by itself once this thread's copies land
                }
                ++slice;
                if (++s == STAGES) s = 0, parity ^= 1;
            }
        }
    } else {  // ---------------------------------------------------------------- consumers
        setmaxnreg_inc<CONSUMER_REGS>();
        const int c = warpgroup - 1;  // which 64 rows of the tile
        const bool tracer = threadIdx.x == 128;
        int s = 0, parity = 0, slice = 0;
        for (int tile = 0;; ++tile) {
            mbar_wait(&full[s], parity);  // the tile's first slice, or the end
            const TileJob job = ring.job[s];
            if (job.row0 < 0) break;
            const int row_end = job.row_end, n = job.n, r0 = job.row0 + c * 64;  // this warpgroup's rows
            // An expert's last M-tile is often mostly past its end (DeepSeek-V3: ~256 rows an
            // expert, so a third tile of a few rows for half of them). A warpgroup whose 64 rows
            // are all past the end multiplies nothing (SKIP_EMPTY_HALF): the other one has the
            // tensor cores to itself and the tile takes about half as long.
            const bool has_rows = !SKIP_EMPTY_HALF || r0 < row_end;
            float acc[BN / 2];
#pragma unroll
            for (int v = 0; v < BN / 2; ++v) acc[v] = 0.0f;
            for (int kt = 0; kt < num_k; ++kt) {
                if (kt) mbar_wait(&full[s], parity);
                if (tracer) trace_event(1, slice);
                if (has_rows) {
                    if (GATHER) fence_proxy_async();  // generic-proxy copies -> async-proxy reads
                    if (B_MN) wgmma_slice_b_mn(acc, slots[s].a + c * 64 * BK, slots[s].b);
                    else wgmma_slice(acc, slots[s].a + c * 64 * BK, slots[s].b);
                    // Wait for this slice's multiply and free its slot at once: the producer gets
                    // the slot one slice earlier than with wgmma_wait<1> (chapter 02), and the
                    // tensor cores do not idle meanwhile, since the other consumer warpgroup's
                    // batch is still running. Measured: equal or faster on every shape.
                    wgmma_wait<0>();
                    wgmma_fence_operands(acc);
                }
                if (lane == 0) mbar_arrive(&empty[s]);
                if (tracer) trace_event(2, slice);
                ++slice;
                if (++s == STAGES) s = 0, parity ^= 1;
            }
            // The producer is already loading the next tile while we store this one.
            if (has_rows) {
                if (DSWIGLU) {
                    store_dswiglu(acc, p, r0, row_end, n);
                } else if (SWIGLU) {
                    if (p.Y) store_tile_staged(acc, staging[c], c, p.Y, p.N, r0, row_end, n * BN);
                    store_swiglu_staged(acc, staging[c], c, p.A, p.N / 2, r0, row_end, n * BN);
                } else {
                    store_tile_staged(acc, staging[c], c, p.Y, p.N, r0, row_end, n * BN);
                }
            }
            if (tracer) trace_event(3, tile);
        }
    }
}
