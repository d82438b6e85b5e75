// 06_3_weight_grad.cu: chapter 06, step 3: the weight gradients of an MoE layer, a grouped
// GEMM whose reduction runs over each expert's rows (a ragged K, where 02-03 had a ragged M):
//     dW[e] = sum over rows r of expert e of  dY[r]^T (outer) X[src(r)]        dW [E, N, K]
// dY: [R, N] rows sorted by expert; X: [R, K] (src(r) = r) or, gathered, the token matrix
// [T, K] with src(r) = gather_idx[r]. The layer calls it twice, gathering both times:
//     dW_gate_up[e] = dH_e^T x_gathered          (dY = dH, X = the layer's input)
//     dW_down[e]    = (s A)_e^T dout_gathered    (dY = s * A from 06_2, X = the output gradient)
// so neither the gathered input nor the gathered output gradient is ever written.
//
// Both operands are stored with the reduction index (the row r) as the slow dimension: in
// wgmma's words they are MN-major, not K-major. wgmma reads MN-major tiles from shared memory
// when its transpose bits are set; the 128-byte swizzled layout is then [r][64 values of N]
// per box, which is exactly what a TMA box of dY (64 columns x 64 rows) writes.
//
// Tile: 256 (N) x 128 (K) of one expert's dW. Consumer warpgroup c owns its K columns
// 64c..64c+63, all 256 rows of N, held transposed: the accumulator is dW's tile seen as K x N,
// one m64n256k16 per 16 rows of the reduction with A = X's 64 columns and B = dY's 256 (both
// read from the slot as they arrived). Reduction: the expert's rows in slices of 64. dY's slice
// comes by TMA (rows past the expert's end are the next expert's: harmless, because X's rows
// there are zero); X's slice by cp.async (gathered or not), zero-filled past the expert's end.
//
// Why 256 x 128 and not chapter 03's 128 x 256: the gathered operand should be the narrow
// side. Both tiles load 48 KB per slice, but TMA moves dY's part on its own, while X's part is
// 16-byte cp.async copies issued by the producer's 128 threads: 16 KB of them per slice here,
// 32 KB with the tile the other way round. Measured on the H200 (kernels/NOTES.md): 10-17%
// faster on Mixtral, Qwen3 and the 7B shape (Mixtral dW_gate_up 494 -> 580 TFLOP/s), 2% slower
// on DeepSeek-V3.
//
// Why the accumulator transposed: with dW's rows (N) as wgmma's M, each consumer needed two
// m64n128k16 per 16 rows (M is 64 at most, and its 128 rows of N are two of them), reading
// 12 KB of shared memory per 16 rows where one m64n256k16 reads 10 KB; the tensor cores wait on
// shared memory less with the wider N. The price is a transposing epilogue: stmatrix .trans
// writes each 8 x 8 block of the accumulators into the staging buffer as dW's rows. Measured
// on the H100 (kernels/NOTES.md, session 19): Mixtral 562 -> 617 TFLOP/s (dW_gate_up), Qwen3
// 542 -> 568, DeepSeek-V3 1-3% slower (422 -> 417, dW_down 439 -> 426).
//
// Epilogue: the tile goes through shared memory and leaves by TMA stores
// (store_tile below): the consumers go on to the next tile's multiplies while it
// drains. With only 4-5 slices per tile (DeepSeek-V3: 256 rows per expert) the epilogue is a
// large share of each tile. The ring, the staging buffers, STAGES, THREADS and the register
// split are chapter 03's (warp_specialized.cuh); the loop is this kernel's own.
#include "warp_specialized.cuh"

#define BR 64   // rows reduced per slice
#define TN 256  // N (rows of dW) per tile
#define TK 128  // K (columns of dW) per tile

struct __align__(1024) WgSlot {
    bf16 dy[4][BR * 64];  // [box: N columns 64b .. 64b+63][r][64], from TMA
    bf16 x[2][BR * 64];   // [box: K columns 64b .. 64b+63][r][64], from cp.async
};

// Tiles: for each expert, (N / TN) x (K / TK) tiles, numbered expert-major.
__device__ __forceinline__ void wg_tile(int t, int n_tiles, int k_tiles, int& e, int& n, int& k) {
    e = t / (n_tiles * k_tiles);
    const int i = t % (n_tiles * k_tiles);
    n = i / k_tiles;
    k = i % k_tiles;
}

__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<u32*>(&v);
}

// Four 8 x 8 blocks of bf16 from a warp's registers (each thread: two neighbouring values of a
// row of each block, mma's fragment layout) to shared memory, transposed: thread i gives the
// address of row i % 8 of block i / 8 as stored, i.e. of column i % 8 of the block it holds.
__device__ __forceinline__ void stmatrix_x4_trans(void* row, u32 b0, u32 b1, u32 b2, u32 b3) {
    asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n"
                 :: "r"(smem_addr(row)), "r"(b0), "r"(b1), "r"(b2), "r"(b3) : "memory");
}

// Consumer c's accumulators (its 64 columns of K by 256 rows of N) to the staging buffer,
// transposed, as dW's rows: N rows 128 half .. 128 half + 127, two 64 x 64 boxes.
__device__ __forceinline__ void stage_transposed(const float (&d)[128], Staging& buf, int half, int t) {
    const int warp = t / 32, lane = t % 32, q = lane / 8;
    const int k_block = 16 * warp + 8 * (q % 2);  // the first K of the 8 x 8 blocks this thread addresses
    // wgmma's fragment: accumulators 4j .. 4j + 3 of a thread are rows (K) lane / 4 and + 8 of
    // the warp's 16, columns (N) 8j + 2 (lane % 4) and + 1. stmatrix .trans takes four 8 x 8
    // blocks in that layout and writes each block's columns as rows: the 16 bytes at row n of N
    // hold 8 values of K, as dW's box wants them.
#pragma unroll
    for (int j = 16 * half; j < 16 * half + 16; j += 2) {  // N columns 8j .. 8j + 15
        const int n = 8 * (j + q / 2) + lane % 8 - 128 * half;
        stmatrix_x4_trans(&buf.box[n / 64][swizzle_128b(n % 64, k_block / 8) * 8],
                          pack_bf16(d[4 * j], d[4 * j + 1]), pack_bf16(d[4 * j + 2], d[4 * j + 3]),
                          pack_bf16(d[4 * j + 4], d[4 * j + 5]), pack_bf16(d[4 * j + 6], d[4 * j + 7]));
    }
}

// The tile leaves by TMA stores (tma_store_2d), 128 of its N at a time: staged (transposed, as
// dW's rows; or, for a Store that wants dW transposed, as_accumulated(): 10_5, as the registers
// hold it, chapter 03's stage_accumulators), then one thread hands the two 64 x 64 boxes to the
// copy engine and the warpgroup goes straight on to its next tile's multiplies while the bytes
// drain to memory. (Ordinary stores are issued by the warpgroup itself, and its next multiplies
// wait until the last is issued; all SMs of a persistent grid reach their epilogue together, so
// memory would idle during the multiplies and be swamped after them.) The buffer is written
// again once the copy engine has read out its previous contents. For tiles that are always
// whole: TMA clips only at the tensor's edges. (row0, col0): the tile's first box in the Store's
// matrix; N runs down its rows, or along its columns as accumulated.
template <class Store>
__device__ __forceinline__ void store_tile(const float (&d)[128], Staging& buf, int c, const Store& dw, int row0,
                                           int col0) {
    const int t = threadIdx.x % 128;
#pragma unroll
    for (int half = 0; half < 2; ++half) {  // N 128 half .. 128 half + 127: two boxes
        if (t == 0) tma_store_wait_read<0>();
        warpgroup_sync(c);  // the buffer is free
        if constexpr (Store::as_accumulated())
            stage_accumulators(d, buf, half, t);
        else
            stage_transposed(d, buf, half, t);
        fence_proxy_async();  // these writes, visible to the copy engine
        warpgroup_sync(c);
        if (t == 0) {
            if constexpr (Store::as_accumulated()) {
                dw.box(buf.box[0], row0, col0 + 128 * half);
                dw.box(buf.box[1], row0, col0 + 128 * half + 64);
            } else {
                dw.box(buf.box[0], row0 + 128 * half, col0);
                dw.box(buf.box[1], row0 + 128 * half + 64, col0);
            }
            tma_store_commit();
        }
    }
}

// Where a 64 x 64 box of dW goes: row `row` of dW seen as an [E * N, K] matrix, columns col..
struct DwStore {
    __device__ static constexpr bool as_accumulated() { return false; }  // dW's rows are N: the tile leaves transposed
    const TmaDesc& map;
    __device__ void box(const void* src, int row, int col) const { tma_store_2d(map, src, col, row); }
};

// The kernel's body, for any place the boxes of dW go (Store: DwStore here; 10_4 stores them
// into Hugging Face's gate | up halves; 10_5 stores dW transposed, as accumulated).
template <class Store>
__device__ __forceinline__ void weight_grad(const TmaDesc& map_dy, const bf16* __restrict__ X,
                                            const int* __restrict__ gather_idx, const Store& dw,
                                            const int* __restrict__ offs, int E, int R, int N, int K, int x_rows) {
    const Ring<WgSlot> ring = make_ring<WgSlot>(1 + 128);  // expect_tx + each producer thread's cp.async
    WgSlot* slots = ring.slots;
    Staging* staging = ring.staging;
    u64 *full = ring.full, *empty = ring.empty;
    const int warpgroup = threadIdx.x / 128, lane = threadIdx.x % 32;
    const int n_tiles = N / TN, k_tiles = K / TK, total = E * n_tiles * k_tiles;

    if (warpgroup == 0) {  // producer: dY by TMA (thread 0), X by cp.async (all 128)
        setmaxnreg_dec<PRODUCER_REGS>();
        const int t128 = threadIdx.x;
        int s = 0, parity = 0;
        for (int t = blockIdx.x; t < total; t += gridDim.x) {
            int e, n, k, start, end;
            wg_tile(t, n_tiles, k_tiles, e, n, k);
            expert_rows(offs, e, R, start, end);
            // X: 64 rows x 128 columns = 2 boxes x 8 chunks of 16 bytes per row. Thread t copies
            // chunk t % 16 of rows t / 16, + 8, + 16, ...: a warp reads two rows' 256 bytes.
            // Which token each row comes from is a load from gather_idx, and a copy cannot start
            // before it returns; so a slice's 16 indices of a warp are fetched one slice early
            // and their latency hides behind the wait for a free slot. (Fetched in the loop
            // itself, the producer stalled on them every slice: 2.3x slower, measured on the
            // H200.) Lane L holds the index of row 2 warp + L % 2 + 8 ((L / 2) % 8); a thread's
            // i-th row, 2 warp + lane / 16 + 8 i, is in lane 2 i + lane / 16 (passed by shuffles).
            const int box = (t128 % 16) / 8, chunk = t128 % 8, warp = t128 / 32;
            const bf16* x_col = X + k * TK + box * 64 + chunk * 8;
            auto source_row = [&](int r0) {
                const int row = r0 + 2 * warp + lane % 2 + 8 * ((lane / 2) % 8);
                return row < end ? (gather_idx ? __ldg(&gather_idx[row]) : row) : -1;
            };
            int src_now = source_row(start);
            for (int r0 = start; r0 < end; r0 += BR) {
                const int src_next = r0 + BR < end ? source_row(r0 + BR) : -1;  // in flight during the wait
                mbar_wait(&empty[s], parity ^ 1);
                if (t128 == 0) {
                    mbar_arrive_expect_tx(&full[s], 4 * BR * 64 * 2);
#pragma unroll
                    for (int b = 0; b < 4; ++b) tma_load_2d(slots[s].dy[b], map_dy, n * TN + 64 * b, r0, &full[s]);
                }
#pragma unroll
                for (int i = 0; i < BR / 8; ++i) {
                    const int r = 2 * warp + lane / 16 + 8 * i;
                    const int src = __shfl_sync(0xffffffffu, src_now, 2 * i + lane / 16);
                    const bool valid = (unsigned)src < (unsigned)x_rows;
                    cp_async_16(&slots[s].x[box][swizzle_128b(r, chunk) * 8], x_col + (size_t)(valid ? src : 0) * K, valid);
                }
                cp_async_mbar_arrive(&full[s]);
                src_now = src_next;
                if (++s == STAGES) s = 0, parity ^= 1;
            }
        }
    } else {  // consumers
        setmaxnreg_inc<CONSUMER_REGS>();
        const int c = warpgroup - 1;
        int s = 0, parity = 0;
        TensorTurn turn{c};  // ISSUE_IN_TURN's (warp_specialized.cuh); nothing by default
        for (int t = blockIdx.x; t < total; t += gridDim.x) {
            int e, n, k, start, end;
            wg_tile(t, n_tiles, k_tiles, e, n, k);
            expert_rows(offs, e, R, start, end);
            float acc[128];  // dW's tile transposed: its K columns 64c .. 64c + 63 by its 256 rows of N
#pragma unroll
            for (int v = 0; v < 128; ++v) acc[v] = 0.0f;
            for (int r0 = start; r0 < end; r0 += BR) {
                mbar_wait(&full[s], parity);
                fence_proxy_async();  // X came by cp.async (generic proxy)
                turn.take();
                wgmma_fence();
                wgmma_fence_operands(acc);
                // Every 16-row batch of the slot, even those past the expert's end (X's rows are
                // zero there): skipping them costs more than it saves (a branch around a wgmma
                // makes the compiler wait for the accumulators at it; kernels/NOTES.md).
#pragma unroll
                for (int kk = 0; kk < BR / 16; ++kk)  // 16 rows of the reduction = 16 x 128 B further
                    wgmma_m64n256k16</*TRANS_A=*/1, /*TRANS_B=*/1>(acc, wgmma_desc_mn(slots[s].x[c] + kk * 16 * 64, 0),
                                                                wgmma_desc_mn(slots[s].dy[0] + kk * 16 * 64, BR * 64 * 2));
                wgmma_commit();
                turn.pass();
                // As in chapter 03: wait for the batch and free its slot at once. (Keeping one
                // batch running while the next is issued measured the same here, within 2%.)
                wgmma_wait<0>();
                wgmma_fence_operands(acc);
                mbar_arrive(&empty[s]);  // every consumer thread: the ring counts 256 (warp_specialized.cuh)
                if (++s == STAGES) s = 0, parity ^= 1;
            }
            if constexpr (Store::as_accumulated())  // dW[e]^T[k*128 + 64c + row][n*256 + col] (10_5)
                store_tile(acc, staging[c], c, dw, e * K + k * TK + 64 * c, n * TN);
            else  // dW[e][n*256 + row][k*128 + 64c + col]: the rows of dW are N
                store_tile(acc, staging[c], c, dw, e * N + n * TN, k * TK + 64 * c);
        }
        turn.finish();
        if (threadIdx.x % 128 == 0) tma_store_wait_all();  // shared memory must outlive the stores reading it
    }
}

#if __INCLUDE_LEVEL__ == 0  // the kernel, only where this file is the one compiled (not in 10_4)
extern "C" __global__ void __launch_bounds__(THREADS, 1)
weight_grad_grouped_gemm(const __grid_constant__ TmaDesc map_dy, const bf16* __restrict__ X,
                         const int* __restrict__ gather_idx,  // nullptr: X's rows are the sorted rows
                         const __grid_constant__ TmaDesc map_dw,  // dW as an [E * N, K] matrix, 64 x 64 boxes
                         const int* __restrict__ offs, int E, int R, int N, int K, int x_rows) {
    weight_grad(map_dy, X, gather_idx, DwStore{map_dw}, offs, E, R, N, K, x_rows);
}
#endif
