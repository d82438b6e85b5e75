// warp_specialized.cuh: the skeleton of chapter 03's persistent, warp-specialised grouped GEMM
// (sm_90a): the ring of slots, the roles, which tile comes next, and the consumers' loop over
// wgmma slices. What differs from one step to the next is two small policy types, the template
// arguments of warp_specialized_grouped_gemm (CUTLASS's mainloop and epilogue, in miniature):
//   Producer  how a slice of X and W reaches a slot of shared memory (and how the consumers
//             multiply what it laid there);
//   Epilogue  what a warpgroup's finished 64 x BN accumulator becomes.
// Each step's file defines its policies and its kernel, and a later step includes an earlier
// one for the policies it reuses:
//   03_2  TmaProducer (X and W by TMA)         StagedStore (bf16 Y through shared memory)
//   03_3  GatherProducer (X's rows by cp.async)
//   03_4                                       SwigluEpilogue (A = silu(gate) * up, and H)
//   06_1  MnMajorWProducer (W stored [E, K, N])
//   06_2                                       DswigluEpilogue (the SwiGLU backward)
// (06_3, the weight gradients, has its own loop over a ragged K; it shares the ring.)
//
// Roles. A block is three warpgroups (384 threads), one block per SM, persistent as in 02_6,
// but taking its next tile from a shared counter when it is ready for one (take_tile below):
//   warpgroup 0, the producer: only loads. It gives most of its registers away (setmaxnreg) and
//     runs ahead of the math by up to STAGES slices, across tile boundaries: while the consumers
//     store one tile, the first slices of the next are already arriving.
//   warpgroups 1 and 2, the consumers: only multiply (64 rows of the 128 x BN tile each) and
//     store. No __syncthreads anywhere in the loop: the two sides meet only at mbarriers.
//       full[s]  completes when slot s holds its slice (bytes counted by TMA, and one arrival
//                per producer thread whose copies land there, if the producer copies itself);
//       empty[s] completes when the 256 consumer threads are done reading slot s.
//
// Tile order. Tile t covers M-tile m and N-tile n (tile map: which expert and rows an M-tile is).
// Consecutive t go down a group of up to group_m M-tiles of one expert before moving one N-tile
// right, so the SMs busy at the same moment share both their W tiles (all M-tiles of one
// expert) and their X rows in L2, instead of streaming a whole expert's weights once per
// M-tile. The host picks group_m (grouped_gemm.group_m_for): about one expert's M-tiles, fewer
// when K is long. Three things keep that sharing true in practice (kernels/NOTES.md, measured on
// DeepSeek-V3): groups never straddle two experts (expert_tile_coords), tiles are handed out in
// order as blocks become free (take_tile), and a warpgroup with no rows in a tile skips it.
#pragma once
#include "tma.cuh"

#define BM 128
#define BK 64
#ifndef BN  // chapter 07's FP8 kernel defines its own (128) before including this file
#define BN 256  // the host sizes shared memory for it (launch.warp_specialized_smem)
#endif
#ifndef STAGES
#define STAGES 4  // 4 x 48 KB
#endif
#define THREADS 384
#ifndef PRODUCER_REGS  // chapter 07's kernels set their own
#define PRODUCER_REGS 64  // 40 is enough for TMA alone; the gather's row list needs 64 not to spill (NVRTC 13.0)
#define CONSUMER_REGS 216  // 128 x 64 + 256 x 216 <= 65536 registers of the SM
#endif

struct __align__(1024) Slot {
    bf16 a[BM * BK];  // 128 rows of X, 64 values along K each, 128B-swizzled
    bf16 b[BN * BK];  // BN rows of W[e]
};

// The grouped GEMM itself, whatever goes in and comes out: rows [offs[e-1], offs[e]) are
// expert e's, and the tile map says which expert and rows each of the num_tiles[0] M-tiles has.
struct Problem {
    const int* offs;
    const TileInfo* tile_map;
    int* num_tiles;  // [0]: M-tiles (build_tile_map); [1]: the next tile to hand out (take_tile)
    int M, N, K;
    int group_m;     // M-tiles per group of the tile order
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

// Tile t -> (M-tile m, N-tile n) with groups that never straddle two experts: expert e's M-tiles
// first_e .. first_e + count_e - 1 own the tile numbers first_e * n_tiles ..
// (first_e + count_e) * n_tiles - 1, in groups of at most group_m of its M-tiles. So t / n_tiles
// is one of e's M-tiles, and the tile map (its expert and first row) gives first_e and count_e.
// (A group of group_m M-tiles wherever the experts begin often holds the end of one expert and
// the start of the next: the two halves of that expert run a group apart in time and read its
// W twice; DeepSeek-V3 has 2-3 M-tiles an expert.)
// (block_m: the rows of an M-tile, BM but in 07_3)
__device__ __forceinline__ void expert_tile_coords(int t, const Problem& p, int m_tiles, int n_tiles, int& m, int& n,
                                                   int block_m = BM) {
    const TileInfo one = p.tile_map[t / n_tiles];
    int start, end;
    expert_rows(p.offs, one.expert, p.M, start, end);
    const int first = t / n_tiles - (one.row - start) / block_m, count = ceil_div(end - start, block_m);
    tile_coords(t - first * n_tiles, count, n_tiles, p.group_m, m, n);
    m += first;
}

// ---------------------------------------------------------------------------------------------
// The epilogue's buffer: each consumer warpgroup stages 64 rows x 128 columns of its result in
// shared memory before they leave (03_2's StagedStore says why), as two 64 x 64 boxes in the
// 128-byte swizzled layout (which keeps the writes of wgmma's fragments free of bank conflicts,
// and is what a TMA box store reads). bar.sync 1 + c: a barrier for the 128 threads of consumer
// warpgroup c alone (barrier 0 is __syncthreads, 3 the producer's: take_tile).
// ---------------------------------------------------------------------------------------------
struct __align__(1024) Staging {
    bf16 box[2][64 * 64];
};

__device__ __forceinline__ void warpgroup_sync(int c) { asm volatile("bar.sync %0, 128;\n" :: "r"(1 + c) : "memory"); }

// ---------------------------------------------------------------------------------------------
// ISSUE_IN_TURN (an experiment, session 26; kernels/NOTES.md): the two consumer warpgroups issue
// their batches of multiplies in turn, 0 then 1, batch by batch. Why: both wait on the same full
// slot, so left alone they issue at the same moment; if the tensor cores interleave the two
// batches (warp w of each warpgroup shares SM sub-core w), both finish together, and whatever
// each does between its batches (the wait, freeing the slot, 07_2's promotion) leaves the tensor
// cores idle. In turn, 0's batch is queued whole ahead of 1's: 0's gap falls while 1's batch runs.
// Named barriers 5 + c, "warpgroup c may issue": bar.sync by c's 128 threads, bar.arrive by the
// other's (1, 2: warpgroup_sync; 3: take_tile; 4: 07_3's consumers_sync). Turns alternate
// strictly (an arrival cannot run ahead: the next one needs the other's turn first), so both
// warpgroups must issue equally often: both take every tile and every slice, an empty half too.
// moe_course/pingpong_model.py (explore_issue_turns) checks this protocol warp by warp.
struct TensorTurn {
    int c;  // this consumer warpgroup: 0 or 1
#ifdef ISSUE_IN_TURN
    // warpgroup 1 gives 0 its first turn; so no register remembers whether a turn is the first
    // (06_2 has none to spare: a `started` flag spilled there)
    __device__ explicit TensorTurn(int c_) : c(c_) { if (c == 1) asm volatile("bar.arrive 5, 256;\n" ::: "memory"); }
    __device__ __forceinline__ void take() const { asm volatile("bar.sync %0, 256;\n" :: "r"(5 + c) : "memory"); }
    // after the batch is issued (and before it is waited for): the other's batch queues behind it
    __device__ __forceinline__ void pass() const { asm volatile("bar.arrive %0, 256;\n" :: "r"(6 - c) : "memory"); }
    // at the end, warpgroup 0 takes the turn warpgroup 1 gave last (no barrier left half-arrived)
    __device__ __forceinline__ void finish() const { if (c == 0) asm volatile("bar.sync 5, 256;\n" ::: "memory"); }
#else  // the default: each warpgroup issues as soon as its slot is full
    __device__ explicit TensorTurn(int c_) : c(c_) {}
    __device__ __forceinline__ void take() const {}
    __device__ __forceinline__ void pass() const {}
    __device__ __forceinline__ void finish() const {}
#endif
};

__device__ __forceinline__ bf16* staged(Staging& buf, int r, int col) {  // col in 0..127
    return &buf.box[col / 64][swizzle_128b(r, (col % 64) / 8) * 8 + col % 8];
}

// Columns 128 half .. 128 half + 127 of the warpgroup's 64 x N accumulators, as bf16, into the
// buffer (each thread's pairs of neighbouring columns in wgmma's fragment layout; t: the
// thread's index in its warpgroup).
template <int NV>
__device__ __forceinline__ void stage_accumulators(const float (&d)[NV], Staging& buf, int half, int t) {
#pragma unroll
    for (int v = 64 * half; v < 64 * half + 64; v += 2) {  // 128 columns = 64 accumulators per thread
        const int r = 16 * (t / 32) + (t % 32) / 4 + 8 * ((v / 2) % 2);  // wgmma's fragment layout
        const int col = 8 * (v / 4) + 2 * (t % 4) - 128 * half;
        *reinterpret_cast<__nv_bfloat162*>(staged(buf, r, col)) = __floats2bfloat162_rn(d[v], d[v + 1]);
    }
}

// ---------------------------------------------------------------------------------------------
// Shared memory: the ring of STAGES slots (1024-byte aligned, as the 128-byte swizzle needs),
// the two consumers' staging buffers, a full and an empty mbarrier per slot (initialised by one
// thread before the block's one __syncthreads), then which tile each slot's slice is of.
// SlotT: what one slice holds (Slot here, another layout in 06_3).
// ---------------------------------------------------------------------------------------------
struct TileJob {  // what the consumers need of a tile: its rows [row0, row_end), its N-tile, its expert
    int row0, row_end, n;
    int expert;  // (07_2 reads the expert's weight scales; the others need only the rows)
};

template <typename SlotT>
struct Ring {
    SlotT* slots;
    Staging* staging;
    u64* full;   // full[s]: slot s holds its slice (bytes counted by TMA, cp.async arrivals)
    u64* empty;  // empty[s]: the 256 consumer threads are done reading slot s
    TileJob* job;  // job[s]: the tile whose slice slot s holds (row0 < 0: no tiles left)
    int* taken;    // two words through which the producer's thread 0 hands a tile to the others
                   // (job and taken: warp_specialized_grouped_gemm only; 06_3 has no room for them)
    u64* turn;     // turn[c]: consumer warpgroup c may start its next mainloop (the ping-pong only)
    int* done;     // done[c]: consumer warpgroup c met the end (the ping-pong only)
};

// (pingpong: each slice is read by one consumer warpgroup, not both, and the turns exist)
template <typename SlotT>
__device__ __forceinline__ Ring<SlotT> make_ring(int full_arrivals, bool pingpong = false) {
    extern __shared__ unsigned char smem[];
    const u32 pad = (1024 - (smem_addr(smem) & 1023)) & 1023;
    Ring<SlotT> r;
    r.slots = reinterpret_cast<SlotT*>(smem + pad);
    r.staging = reinterpret_cast<Staging*>(r.slots + STAGES);
    r.full = reinterpret_cast<u64*>(r.staging + 2);
    r.empty = r.full + STAGES;
    r.job = reinterpret_cast<TileJob*>(r.empty + STAGES);
    r.taken = reinterpret_cast<int*>(r.job + STAGES);
    r.turn = reinterpret_cast<u64*>(r.taken + 2);
    r.done = reinterpret_cast<int*>(r.turn + 2);
    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(&r.full[s], full_arrivals);
            mbar_init(&r.empty[s], pingpong ? 128 : 256);  // one arrival per consumer thread that reads it
        }
        if (pingpong) {  // (only the ping-pong's host size has room for these)
            mbar_init(&r.turn[0], 128);
            mbar_init(&r.turn[1], 128);
            r.done[0] = r.done[1] = 0;
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
// weights are 15 GB). Here a producer ready for a new tile takes the next number from a
// counter in global memory (build_tile_map zeroes it): the tiles in flight are always one
// window of consecutive numbers, whose members share W's rows (tile_coords) and started within
// a few microseconds of each other. The consumers learn each tile from its first slot (job:
// the producer has already looked up its rows), and a job with no rows tells them to stop.
// ---------------------------------------------------------------------------------------------
// The tile claimed, for all the producer's 128 threads (ALL_THREADS: a producer that copies
// with every thread) or for thread 0 alone. Thread 0 hands it round through shared memory: two
// words, used in turn; when thread 0 writes taken[i % 2] again (tile i + 2), every thread has
// passed tile i + 1's barrier and so has read tile i's. (Claiming the next tile one tile early,
// to hide the atomic's round trip, made DeepSeek-V3's up-projection 17% slower: the claims then
// follow the order in which the blocks began their previous tiles, and the window comes apart.)
template <bool ALL_THREADS>
__device__ __forceinline__ int take_tile(int* counter, int* taken, int i) {
    if (!ALL_THREADS) return atomicAdd(counter, 1);
    if (threadIdx.x == 0) taken[i % 2] = atomicAdd(counter, 1);
    asm volatile("bar.sync 3, 128;\n" ::: "memory");  // barriers 1, 2: the consumers' epilogues
    return taken[i % 2];
}

// ---------------------------------------------------------------------------------------------
// The kernel body, for any Producer and Epilogue. What they provide (03_2 is the plainest pair):
//
// struct Producer {
//     static constexpr bool all_threads();   // do all 128 producer threads copy (each arriving
//                                            // once on every slot's full barrier), or thread 0 alone?
//     void begin_tile(const Problem&, int expert, int n, int row0, int row_end);  // once a tile
//     void issue(Slot&, u64* full, const Problem&, int expert, int n, int row0, int kt);
//                                            // thread 0: the bytes to expect, and its TMA loads
//     void copy(Slot&, u64* full, const Problem&, int kt);  // every producer thread, after issue
//     void finish(u64* full);                // every producer thread, on the last (empty) slot
//     static void multiply(float (&acc)[BN / 2], const Slot&, int c);
//                                            // consumer warpgroup c's wgmma batch on the slot
// };
// struct Epilogue {
//     void store(const float (&acc)[BN / 2], Staging& buf, int c, const Problem&, int row0,
//                int row_end, int n);        // consumer warpgroup c's rows [row0, row_end)
// };
// ---------------------------------------------------------------------------------------------

// The producer's loop: tiles claimed one after another (take_tile), each tile's num_k slices
// laid into the ring in order, then one more slot with no slice (job.row0 = -1): the end.
// (total = m_tiles n_tiles, the tiles of the whole problem)
template <typename Producer>
__device__ __forceinline__ void produce_tiles(const Problem& p, Producer& producer, const Ring<Slot>& ring,
                                              int total, int m_tiles, int n_tiles, int num_k) {
    constexpr bool all_threads = Producer::all_threads();
    Slot* slots = ring.slots;
    u64 *full = ring.full, *empty = ring.empty;
    int s = 0, parity = 0, slice = 0;  // slice: counted across tiles, for the trace
    for (int i = 0;; ++i) {
        const int t = take_tile<all_threads>(p.num_tiles + 1, ring.taken, i);
        if (t >= total) {  // one more slot, holding no slice: the consumers stop there
            mbar_wait(&empty[s], parity ^ 1);
            if (threadIdx.x == 0) {
                ring.job[s] = TileJob{-1, 0, 0, 0};
                mbar_arrive(&full[s]);
            }
            producer.finish(&full[s]);
            break;
        }
        int m, n, expert, row0, row_end;
        expert_tile_coords(t, p, m_tiles, n_tiles, m, n);
        tile_rows(p.tile_map, p.offs, p.M, m, BM, expert, row0, row_end);
        producer.begin_tile(p, expert, n, row0, row_end);
        for (int kt = 0; kt < num_k; ++kt) {
            mbar_wait(&empty[s], parity ^ 1);  // the consumers are done with this slot
            if (threadIdx.x == 0) {
                trace_event(0, slice);
                ring.job[s] = TileJob{row0, row_end, n, expert};  // published by the arrive in issue (a release)
                producer.issue(slots[s], &full[s], p, expert, n, row0, kt);
            }
            producer.copy(slots[s], &full[s], p, kt);
            ++slice;
            if (++s == STAGES) s = 0, parity ^= 1;
        }
    }
}

template <typename Producer, typename Epilogue>
__device__ __forceinline__ void warp_specialized_grouped_gemm(const Problem& p, Producer producer, Epilogue epilogue) {
    constexpr bool all_threads = Producer::all_threads();
    const Ring<Slot> ring = make_ring<Slot>(all_threads ? 1 + 128 : 1);  // thread 0's expect_tx (+ each copier)
    Slot* slots = ring.slots;
    Staging* staging = ring.staging;
    u64 *full = ring.full, *empty = ring.empty;
    const int warpgroup = threadIdx.x / 128;

    const int n_tiles = p.N / BN, m_tiles = p.num_tiles[0];
    const int total = m_tiles * n_tiles, num_k = p.K / BK;

    if (warpgroup == 0) {  // ------------------------------------------------ producer
        setmaxnreg_dec<PRODUCER_REGS>();
        if (!all_threads && threadIdx.x != 0) return;  // only TMA to issue: thread 0 alone
        produce_tiles(p, producer, ring, total, m_tiles, n_tiles, num_k);
    } else {  // ---------------------------------------------------------------- consumers
        setmaxnreg_inc<CONSUMER_REGS>();
        const int c = warpgroup - 1;  // which 64 rows of the tile
        const bool tracer = threadIdx.x == 128;
        int s = 0, parity = 0, slice = 0;
        TensorTurn turn{c};
        for (int tile = 0;; ++tile) {
            mbar_wait(&full[s], parity);  // the tile's first slice, or the end
            const TileJob job = ring.job[s];
            if (job.row0 < 0) break;
            const int row_end = job.row_end, n = job.n, r0 = job.row0 + c * 64;  // this warpgroup's rows
            // An expert's last M-tile is often mostly past its end (DeepSeek-V3: ~256 rows an
            // expert, so a third tile of a few rows for half of them). A warpgroup whose 64 rows
            // are all past the end multiplies nothing: the other one has the tensor cores to
            // itself and the tile takes about half as long.
            const bool has_rows = r0 < row_end;
            float acc[BN / 2];
#pragma unroll
            for (int v = 0; v < BN / 2; ++v) acc[v] = 0.0f;
            for (int kt = 0; kt < num_k; ++kt) {
                if (kt) mbar_wait(&full[s], parity);
                if (tracer) trace_event(1, slice);
                turn.take();
                if (has_rows) {
                    Producer::multiply(acc, slots[s], c);
                    turn.pass();
                    // Wait for this slice's multiply and free its slot at once: the producer gets
                    // the slot one slice earlier than with wgmma_wait<1> (chapter 02), and the
                    // tensor cores do not idle meanwhile, since the other consumer warpgroup's
                    // batch is still running. Measured: equal or faster on every shape.
                    wgmma_wait<0>();
                    wgmma_fence_operands(acc);
                } else {
                    turn.pass();
                }
                // Every consumer thread arrives (not lane 0 for its warp): each has read the slot,
                // and the job at a tile's first slice, and its own arrival is what orders those
                // reads before the producer's next writes there. With one arrival per warp,
                // compute-sanitizer's racecheck reported lane 31's read of job[s] racing the
                // producer (03_2/03_3/03_4/06_1, 15 530 report lines on the H200; a __syncwarp
                // before lane 0's arrival did not clear them); with 256 arrivals: none, and the
                // speed is unchanged (kernels/NOTES.md).
                mbar_arrive(&empty[s]);
                if (tracer) trace_event(2, slice);
                ++slice;
                if (++s == STAGES) s = 0, parity ^= 1;
            }
            // The producer is already loading the next tile while we store this one.
            if (has_rows) epilogue.store(acc, staging[c], c, p, r0, row_end, n);
            if (tracer) trace_event(3, tile);
        }
        turn.finish();
    }
}

// ---------------------------------------------------------------------------------------------
// The ping-pong schedule (CUTLASS's KernelTmaWarpSpecializedPingpong, in miniature). Above, the
// two consumer warpgroups share every tile (64 rows each) and so store their results at the
// same moment: while both run an epilogue, the tensor cores have nothing to do. Where the
// epilogue is long (06_2's SwiGLU backward reads H and writes dH and s A: a quarter of the
// tile's time on Mixtral), that gap is worth filling. Here each consumer warpgroup takes a
// whole tile (both 64-row halves, BN = 128 so the accumulators fit), the two take the block's
// tiles in turn (warpgroup 0 the even ones, 1 the odd ones), and their mainloops alternate:
// one multiplies while the other runs its epilogue.
//
// The turns. turn[c] completes a phase when warpgroup 1 - c has issued the last multiply of
// its tile; warpgroup c waits for it before its next mainloop (warpgroup 0 starts with the
// turn). So the mainloops, and with them the reads of the ring, follow the producer's order
// of slices exactly, and a warpgroup finds its tile's slices by counting: the block's tile i
// owns slices i num_k .. i num_k + num_k - 1. Its waits on full[] are safe because every
// earlier slice has been waited on by then (a wait for a parity is right only when the
// barrier is at most one phase away). Each slice is read by one warpgroup: empty[] counts 128.
//
// The end. The producer lays one job with no rows after the block's last tile, in the slot
// where the next tile would begin, so the warpgroup whose turn it is meets it. That one says
// so in its own flag, done[c], and passes the turn; the other reads done[other] after its own
// turn wait, never while waiting on full[] for a slice that will never come.
//
// Why a flag each and not one for both: the four warps of a warpgroup are scheduled on their
// own and pass a barrier at different moments. With one shared flag, a warp that came late to
// its turn wait could read the flag its own warpgroup's other warps had just set on meeting the
// end, and leave without its turn arrival: the other warpgroup's turn never completed. That was
// the hang where a block takes two tiles or more (sessions 23-24; a model of the protocol with
// each warp its own actor finds it, kernels/NOTES.md, session 25). Only builds with -DPINGPONG
// use this schedule (launch.pingpong_step).
// ---------------------------------------------------------------------------------------------
template <typename Producer, typename Epilogue>
__device__ __forceinline__ void warp_specialized_pingpong(const Problem& p, Producer producer, Epilogue epilogue) {
    static_assert(BN == 128, "the ping-pong keeps a whole 128 x BN tile in one warpgroup's registers: BN = 128");
    constexpr bool all_threads = Producer::all_threads();
    const Ring<Slot> ring = make_ring<Slot>(all_threads ? 1 + 128 : 1, /*pingpong=*/true);
    const int warpgroup = threadIdx.x / 128;
    const int n_tiles = p.N / BN, m_tiles = p.num_tiles[0];
    const int total = m_tiles * n_tiles, num_k = p.K / BK;

    if (warpgroup == 0) {  // ------------------------------------------------ producer (unchanged)
        setmaxnreg_dec<PRODUCER_REGS>();
        if (!all_threads && threadIdx.x != 0) return;
        produce_tiles(p, producer, ring, total, m_tiles, n_tiles, num_k);
        return;
    }
    setmaxnreg_inc<CONSUMER_REGS>();  // ------------------------------------ consumers
    const int c = warpgroup - 1, other = 1 - c;
    volatile int* done = ring.done;  // done[c]: written by warpgroup c alone
    int turn_parity = 0;
    for (int tile = c;; tile += 2) {  // the block's tiles c, c + 2, c + 4, ...
        if (tile > 0) {  // warpgroup 0 has the first turn
            mbar_wait(&ring.turn[c], turn_parity);
            turn_parity ^= 1;
            if (done[other]) break;  // the other warpgroup met the end
        }
        const long long first = (long long)tile * num_k;  // the tile's first slice in the ring's order
        int s = (int)(first % STAGES), parity = (int)((first / STAGES) & 1);
        mbar_wait(&ring.full[s], parity);
        const TileJob job = ring.job[s];
        if (job.row0 < 0) {  // the end: tell the other warpgroup, and let it look
            done[c] = 1;
            mbar_arrive(&ring.turn[other]);  // a release: `done` is seen after the other's wait
            break;
        }
        const bool lower_half = job.row0 + 64 < job.row_end;  // the tile's rows 64..127 exist
        float acc[2][BN / 2];
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int v = 0; v < BN / 2; ++v) acc[h][v] = 0.0f;
        for (int kt = 0; kt < num_k; ++kt) {
            if (kt) mbar_wait(&ring.full[s], parity);
            Producer::multiply(acc[0], ring.slots[s], 0);
            if (lower_half) Producer::multiply(acc[1], ring.slots[s], 1);
            if (kt == num_k - 1) mbar_arrive(&ring.turn[other]);  // its multiplies may queue behind ours
            wgmma_wait<0>();
            wgmma_fence_operands(acc[0]);
            wgmma_fence_operands(acc[1]);
            mbar_arrive(&ring.empty[s]);  // every thread, as above
            if (++s == STAGES) s = 0, parity ^= 1;
        }
        // The other warpgroup multiplies while this one stores.
        epilogue.store(acc[0], ring.staging[c], c, p, job.row0, job.row_end, job.n);
        if (lower_half) epilogue.store(acc[1], ring.staging[c], c, p, job.row0 + 64, job.row_end, job.n);
    }
}
