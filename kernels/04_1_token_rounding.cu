// 04_1_token_rounding.cu: tile-aware token rounding (chapter 04). The routing metadata of a
// grouped GEMM, built on the GPU with no host synchronisation: four launches on one stream.
//
//   1. route_topk      one warp per token: its K best experts; f_e counted with atomics
//   2. round_counts    one block, one thread per expert: f_e rounded to a tile multiple, and
//                      the offsets of every expert's rows (a prefix sum)
//   3. build_tile_map  (grouped_gemm.cuh, chapter 02): which expert and first row each tile has
//   4. select_tokens   one block per expert: keep the expert's best rounded-f_e candidates and
//                      write them, in token order, at the expert's rows
//
// The host sizes every buffer from an upper bound (T*K + E*(tile-1) rows at most), so nothing is
// read back; the real row count is offsets[E], on the GPU.
//
// Tie rules (the same as moe_course/token_rounding.py, checked bit for bit by its tests):
//   top-K:    higher score first; equal scores go to the lower expert id
//   ranking:  an expert's top-K tokens before its other candidates; within each group higher
//             score first; equal scores go to the lower token id
// Rounding to the nearest multiple sends an exact half tile up. -0.0 and 0.0 are equal scores.
// NaN scores are refused on the host (a NaN has no place in a ranking).
#include "grouped_gemm.cuh"

#define FULL_MASK 0xffffffffu

enum Mode { MODE_TOPK = 0, MODE_UP = 1, MODE_DOWN = 2, MODE_NEAREST = 3, MODE_PADDED = 4 };

// Is (v, e) ranked before (best, best_e)? Higher score first, then the lower id.
__device__ __forceinline__ bool ranks_before(float v, int e, float best, int best_e) {
    return v > best || (v == best && e < best_e);
}

// A float turned into an unsigned integer with the same order (higher score, higher key), so
// that the ranking can be searched bit by bit. Positive floats: set the sign bit; negative
// floats: flip every bit (a larger magnitude becomes a smaller key). -0.0 is made 0.0 first.
__device__ __forceinline__ unsigned ordered_key(float s) {
    if (s == 0.0f) s = 0.0f;
    const unsigned u = __float_as_uint(s);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// ---------------------------------------------------------------------------------------------
// 1. Top-K. Lane i of a token's warp looks after experts i, i + 32, i + 64, ... (E <= 1024: at
//    most 32 each, one bit of `taken` per expert). K rounds: every lane finds its best expert
//    not yet taken, a butterfly of shuffles gives every lane the warp's best, its lane marks it.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void route_topk(const float* __restrict__ scores, int T, int E, int K,
                                      int* __restrict__ topk, int* __restrict__ topk_counts) {
    const int lane = threadIdx.x % 32;
    const int t = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (t >= T) return;  // t is the same for the whole warp: the warp leaves together
    const float* row = scores + (size_t)t * E;
    const float minus_inf = __int_as_float(0xff800000);
    unsigned taken = 0;  // bit i: expert lane + 32 i is already one of this token's top-K
    for (int j = 0; j < K; ++j) {
        float best = minus_inf;
        int best_e = E;  // "none yet": loses to every real expert, -inf scores included
        for (int i = 0, e = lane; e < E; ++i, e += 32) {
            const float v = row[e];
            if (!((taken >> i) & 1u) && ranks_before(v, e, best, best_e)) {
                best = v;
                best_e = e;
            }
        }
        for (int offset = 16; offset > 0; offset /= 2) {  // after this, every lane holds the winner
            const float v = __shfl_xor_sync(FULL_MASK, best, offset);
            const int e = __shfl_xor_sync(FULL_MASK, best_e, offset);
            if (ranks_before(v, e, best, best_e)) {
                best = v;
                best_e = e;
            }
        }
        if (best_e >= E) {  // only NaN left (the host refuses NaN): mark the rest, never index past E
            for (; j < K; ++j)
                if (lane == 0) topk[(size_t)t * K + j] = -1;
            break;
        }
        if (best_e % 32 == lane) taken |= 1u << (best_e / 32);
        if (lane == 0) {
            topk[(size_t)t * K + j] = best_e;
            atomicAdd(&topk_counts[best_e], 1);  // integer adds: the total is the same in any order
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Round the counts. One block of 1024 threads, thread e handles expert e (the host refuses
//    E > 1024). counts[e] = rounded f_e, capped at T (an expert has T candidates at most; padding
//    rows are empty, so padding is not capped). offsets[E + 1]: expert e owns rows
//    [offsets[e], offsets[e + 1]); offsets + 1 is the `offs` of chapter 02's grouped GEMM.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void round_counts(const int* __restrict__ topk_counts, int E, int T, int tile, int mode,
                                        int* __restrict__ counts, int* __restrict__ offsets) {
    __shared__ int prefix[1025];
    const int e = threadIdx.x;
    int r = 0;
    if (e < E) {
        const int f = topk_counts[e];
        switch (mode) {
            case MODE_UP:
            case MODE_PADDED: r = (f + tile - 1) / tile * tile; break;
            case MODE_DOWN: r = f / tile * tile; break;
            case MODE_NEAREST: r = (2 * f + tile) / (2 * tile) * tile; break;  // a half goes up
            default: r = f;  // plain top-K
        }
        if (mode != MODE_PADDED) r = min(r, T);
        counts[e] = r;
    }
    prefix[e + 1] = r;
    __syncthreads();
    if (e == 0) {  // a serial prefix sum over at most 1024 values, as in build_tile_map
        prefix[0] = 0;
        for (int i = 1; i <= E; ++i) prefix[i] += prefix[i - 1];
    }
    __syncthreads();
    for (int i = e; i <= E; i += blockDim.x) offsets[i] = prefix[i];
}

// ---------------------------------------------------------------------------------------------
// 4. Select each expert's tokens. Helper: an exclusive prefix sum over the block (every thread
//    calls it; blockDim.x a multiple of 32). Returns the sum of v over the threads before this
//    one; `total` gets the sum over the block.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ int block_exclusive_scan(int v, int* warp_sums, int& total) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    int x = v;  // inclusive prefix sum within the warp
    for (int offset = 1; offset < 32; offset *= 2) {
        const int y = __shfl_up_sync(FULL_MASK, x, offset);
        if (lane >= offset) x += y;
    }
    if (lane == 31) warp_sums[warp] = x;
    __syncthreads();
    if (warp == 0) {  // the warps' totals, prefix-summed by the first warp
        int s = lane < warps ? warp_sums[lane] : 0;
        for (int offset = 1; offset < 32; offset *= 2) {
            const int y = __shfl_up_sync(FULL_MASK, s, offset);
            if (lane >= offset) s += y;
        }
        warp_sums[lane] = s;
    }
    __syncthreads();
    total = warp_sums[warps - 1];
    const int before = (warp == 0 ? 0 : warp_sums[warp - 1]) + x - v;
    __syncthreads();  // warp_sums is used again by the next call
    return before;
}

// One block per expert e. Its candidates are all T tokens, ranked top-K first, then by score,
// then by token id, and it keeps the first counts[e]. Where the cut falls:
//   counts[e] <= f_e (rounding down, or no change): the best counts[e] of its top-K tokens;
//   counts[e] >  f_e (rounding up): all its top-K tokens and the best counts[e] - f_e others.
// So the cut is always inside one group: find the keep-th largest key of that group (radix
// select), keep every key above it and, of the keys equal to it, the lowest token ids.
// keys, flags: scratch [E][T] (this expert's row of each), so that every pass after the first
// reads contiguous memory. With `padded`, the top-K tokens are kept and the rows up to
// counts[e] are written empty (token -1, weight 0).
extern "C" __global__ void __launch_bounds__(512) select_tokens(
        const float* __restrict__ scores, const int* __restrict__ topk, int T, int E, int K,
        const int* __restrict__ topk_counts, const int* __restrict__ counts, const int* __restrict__ offsets,
        int padded, unsigned* __restrict__ keys, unsigned char* __restrict__ flags,
        int* __restrict__ token_ids, int* __restrict__ expert_ids, float* __restrict__ weights,
        bool* __restrict__ from_topk) {
    __shared__ int hist[256];
    __shared__ int warp_sums[32];
    __shared__ unsigned found[2];
    const int e = blockIdx.x;
    unsigned* key = keys + (size_t)e * T;
    unsigned char* top = flags + (size_t)e * T;

    // (a) This expert's candidates: each token's key and whether the token picked this expert.
    for (int t = threadIdx.x; t < T; t += blockDim.x) {
        key[t] = ordered_key(scores[(size_t)t * E + e]);
        bool picked = false;
        for (int j = 0; j < K; ++j) picked |= topk[(size_t)t * K + j] == e;
        top[t] = picked;
    }
    __syncthreads();  // also makes this block's global writes visible to the whole block

    // (b) Which group the cut is in and how many of that group to keep.
    const int f = topk_counts[e], r = counts[e];
    const bool cut_in_topk = padded || r <= f;
    const int group_size = cut_in_topk ? f : T - f;
    const int keep = padded ? f : (cut_in_topk ? r : r - f);
    const bool partial = 0 < keep && keep < group_size;  // otherwise all of the group, or none

    // (c) Radix select: the keep-th largest key of the group, 8 bits at a time from the top.
    //     Each pass counts, among the group's keys that match the bits found so far, how many
    //     have each value of the next 8 bits; walking those 256 counts from the top finds the
    //     digit where the keep-th key lies. `need`: how many still to take among the keys that
    //     match the prefix (all keys above it are taken). After 4 passes `cut` is the key itself
    //     and `need` the number of keys equal to it that are kept.
    unsigned cut = 0;
    int ties_kept = 0;
    if (partial) {
        unsigned prefix = 0;
        int need = keep;  // 1 <= need <= number of the group's keys that match prefix
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
            __syncthreads();
            const unsigned decided = shift == 24 ? 0u : ~0u << (shift + 8);  // bits already in prefix
            for (int t = threadIdx.x; t < T; t += blockDim.x) {
                const unsigned k = key[t];
                if ((top[t] != 0) == cut_in_topk && (k & decided) == prefix) atomicAdd(&hist[(k >> shift) & 255u], 1);
            }
            __syncthreads();
            if (threadIdx.x == 0) {
                int digit = 255;
                while (digit > 0 && hist[digit] < need) need -= hist[digit--];  // digit > 0: bad input stays in bounds
                found[0] = prefix | ((unsigned)digit << shift);
                found[1] = (unsigned)need;
            }
            __syncthreads();
            prefix = found[0];
            need = (int)found[1];
        }
        cut = prefix;
        ties_kept = need;
    }

    // (d) Write the kept tokens in token order: chunks of blockDim.x tokens, two prefix sums per
    //     chunk (ties at the cut seen so far; rows written so far).
    const int start = offsets[e];
    int written = 0, ties_seen = 0;
    for (int base = 0; base < T; base += blockDim.x) {
        const int t = base + threadIdx.x;
        const bool valid = t < T;
        const bool picked = valid && top[t] != 0;
        const unsigned k = valid ? key[t] : 0u;
        const bool in_group = valid && picked == cut_in_topk;
        const bool tie = partial && in_group && k == cut;
        int ties_here, rows_here;
        const int tie_rank = ties_seen + block_exclusive_scan(tie, warp_sums, ties_here);
        bool kept;
        if (!valid) kept = false;
        else if (!in_group) kept = picked;  // top-K kept when rounding up; others never when down
        else if (!partial) kept = keep > 0;  // the whole group, or none of it
        else kept = k > cut || (tie && tie_rank < ties_kept);
        const int row = start + written + block_exclusive_scan(kept, warp_sums, rows_here);
        if (kept) {
            token_ids[row] = t;
            expert_ids[row] = e;
            weights[row] = scores[(size_t)t * E + e];
            from_topk[row] = picked;
        }
        written += rows_here;
        ties_seen += ties_here;
    }
    if (padded) {
        for (int row = start + f + threadIdx.x; row < start + r; row += blockDim.x) {
            token_ids[row] = -1;
            expert_ids[row] = e;
            weights[row] = 0.0f;
            from_topk[row] = false;
        }
    }
}
