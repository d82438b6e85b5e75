// grouped_gemm.cuh: what every grouped GEMM kernel of chapters 02 and 03 shares.
//
// The problem (an MoE expert layer): rows of X are sorted by expert; expert e owns rows
// [start_e, end_e) with end_e = offs[e] and start_e = offs[e-1] (0 for e = 0), as
// torch._grouped_mm takes them. For every expert,
//     Y[start_e:end_e, :] = X[start_e:end_e, :] @ W[e]^T
// X: [M, K] bf16 row-major; W: [E, N, K] bf16 (each expert's weight stored like nn.Linear's,
// [out, in], so K is contiguous for both operands); Y: [M, N] bf16; accumulation in fp32.
//
// Contents, in the order the chapter needs them:
//   1. the tile map: which expert and rows each M-tile of the grid works on (built on the GPU)
//   2. cp.async: 16-byte copies global -> shared that do not block the thread (sm_80+)
//   3. ldmatrix + mma.sync: warp-level tensor core instructions (sm_80+)
//   4. wgmma: warpgroup-level tensor core instructions reading shared memory (sm_90a)
#pragma once
#include <cuda_bf16.h>

// NVRTC has no C library headers: the two integer types we need, spelled out.
typedef unsigned int u32;
typedef unsigned long long u64;

typedef __nv_bfloat16 bf16;

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// 1. The tile map. The grid is launched with an upper bound of M-tiles that the host knows
//    without reading the counts (ceil(M / BM) + E); build_tile_map writes, on the GPU, which
//    expert and which first row each tile has, and (-1, 0) for tiles left over. No host sync.
// ---------------------------------------------------------------------------------------------
struct TileInfo {
    int expert;  // -1: nothing to do
    int row;     // first row of X / Y of this tile
};

// Rows of expert e, clamped to [0, M] so that malformed offsets can never index out of bounds.
__device__ __forceinline__ void expert_rows(const int* offs, int e, int M, int& start, int& end) {
    start = e == 0 ? 0 : offs[e - 1];
    end = offs[e];
    start = min(max(start, 0), M);
    end = min(max(end, start), M);
}

// One block of 1024 threads, thread e handles expert e (the host refuses E > 1024).
// tile_map[t] for t < max_tiles; num_tiles[0] = the real number of tiles, num_tiles[1] = 0.
extern "C" __global__ void build_tile_map(const int* __restrict__ offs, int E, int M, int block_m,
                                          int max_tiles, TileInfo* __restrict__ tile_map,
                                          int* __restrict__ num_tiles) {
    __shared__ int first_tile[1025];
    const int e = threadIdx.x;
    int start = 0, end = 0;
    if (e < E) expert_rows(offs, e, M, start, end);
    const int tiles = ceil_div(end - start, block_m);
    first_tile[e + 1] = e < E ? tiles : 0;
    __syncthreads();
    if (e == 0) {  // a serial prefix sum over at most 1024 values: microseconds, once
        first_tile[0] = 0;
        for (int i = 1; i <= E; ++i) first_tile[i] += first_tile[i - 1];
        num_tiles[0] = first_tile[E];
        num_tiles[1] = 0;  // the tile counter of the dynamically scheduled kernels (warp_specialized.cuh)
    }
    __syncthreads();
    for (int j = 0; j < tiles; ++j) {
        int t = first_tile[e] + j;
        if (t < max_tiles) tile_map[t] = TileInfo{e, start + j * block_m};
    }
    for (int t = first_tile[E] + e; t < max_tiles; t += blockDim.x) tile_map[t] = TileInfo{-1, 0};
}

// The rows a tile may touch: [row, row_end), row_end <= the expert's end.
__device__ __forceinline__ bool tile_rows(const TileInfo* tile_map, const int* offs, int M, int tile,
                                          int block_m, int& expert, int& row, int& row_end) {
    TileInfo info = tile_map[tile];
    if (info.expert < 0) return false;
    int start, end;
    expert_rows(offs, info.expert, M, start, end);
    expert = info.expert;
    row = info.row;
    row_end = min(end, row + block_m);
    return true;
}

// ---------------------------------------------------------------------------------------------
// 2. cp.async (sm_80+): a 16-byte copy from global to shared memory that the thread does not
//    wait for. src_bytes = 0 writes 16 zero bytes instead (rows past an expert's end).
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ u32 smem_addr(const void* p) {
    return static_cast<u32>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(smem_addr(smem)), "l"(gmem), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>  // wait until at most N committed groups are still in flight
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N)); }

// ---------------------------------------------------------------------------------------------
// 3. Warp-level tensor cores (sm_80+). mma.sync m16n8k16: a warp multiplies a 16x16 bf16 tile
//    of A by a 16x8 tile of B into 16x8 fp32. ldmatrix loads the operand fragments from
//    shared memory: x4 = four 8x8 matrices, lane i giving the address of one matrix row.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], const void* smem_row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(smem_row)));
}

__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---------------------------------------------------------------------------------------------
// 4. Warpgroup-level tensor cores (sm_90a). wgmma: the 4 warps of a warpgroup multiply a 64xK16
//    tile of A by a K16xN tile of B, both read straight from shared memory through 64-bit
//    descriptors, into fp32 registers. Issued asynchronously: fence, issue, commit, wait.
//
//    Shared-memory layout: tiles of [rows][64 bf16] (128 bytes a row), 1024-byte aligned, with
//    the 128-byte swizzle: the 16-byte chunk c of row r is stored at chunk c ^ (r % 8). The
//    swizzle spreads a column of chunks over all 32 banks; TMA (chapter 03) writes this same
//    layout by itself.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ int swizzle_128b(int row, int chunk) { return row * 8 + (chunk ^ (row & 7)); }

__device__ __forceinline__ u64 wgmma_desc(const void* smem_tile) {
    u64 addr = smem_addr(smem_tile);
    u64 desc = (addr & 0x3FFFF) >> 4;    // start address, in 16-byte units
    desc |= u64(16 >> 4) << 16;          // leading byte offset (unused with this swizzle)
    desc |= u64(1024 >> 4) << 32;        // stride byte offset: 8 rows x 128 bytes
    desc |= u64(1) << 62;                // 128-byte swizzle
    return desc;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>  // wait until at most N committed wgmma groups are still running
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory"); }

// Make ordinary (generic-proxy) writes to shared memory, cp.async's included, visible to the
// tensor cores' async proxy before a barrier.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Keep the compiler from moving accumulator reads/writes across an async wgmma.
template <int N>
__device__ __forceinline__ void wgmma_fence_operands(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// D[64 x 128] += A[64 x 16] * B[16 x 128]^T, A and B in shared memory (K-major, 128B swizzle;
// TRANS_A / TRANS_B = 1: that operand is MN-major instead, see wgmma_desc_mn).
// d holds this thread's 64 fp32 accumulators in wgmma's fragment order.
template <int TRANS_A = 0, int TRANS_B = 0>
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], u64 desc_a, u64 desc_b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, %64, %65, p, 1, 1, %66, %67;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "n"(TRANS_A), "n"(TRANS_B));
}

// D[64 x 256] += A[64 x 16] * B[16 x 256]^T, the same for 256 columns.
// d holds this thread's 128 fp32 accumulators in wgmma's fragment order.
template <int TRANS_A = 0, int TRANS_B = 0>
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], u64 desc_a, u64 desc_b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
        "{"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63,"
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79,"
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95,"
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111,"
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
        "}, %128, %129, p, 1, 1, %130, %131;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
          "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
          "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
          "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
          "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
          "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
          "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
          "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
          "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(desc_a), "l"(desc_b), "n"(TRANS_A), "n"(TRANS_B));
}

// One name for both widths: the accumulator array's size picks the instruction.
template <int TRANS_B = 0>
__device__ __forceinline__ void wgmma_m64k16(float (&d)[64], u64 a, u64 b) { wgmma_m64n128k16<0, TRANS_B>(d, a, b); }
template <int TRANS_B = 0>
__device__ __forceinline__ void wgmma_m64k16(float (&d)[128], u64 a, u64 b) { wgmma_m64n256k16<0, TRANS_B>(d, a, b); }

// One slice of 64 values along K: the warpgroup's batch of 4 x k16 wgmma on its A rows and the
// B tile (both [rows][64] in the 128-byte swizzled layout; +32 bytes per k16 inside a row),
// fenced and committed. The caller decides how long to let it run (wgmma_wait<N>).
template <int NV>
__device__ __forceinline__ void wgmma_slice(float (&acc)[NV], const bf16* a, const bf16* b) {
    wgmma_fence();
    wgmma_fence_operands(acc);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_m64k16(acc, wgmma_desc(a + kk * 16), wgmma_desc(b + kk * 16));
    wgmma_commit();
}

// The same slice with B stored MN-major (chapter 06: a weight kept as [E, K, N], N contiguous,
// read without transposing it first). B's tile is then BN / 64 boxes, one per 64 columns of N,
// each [64 rows of K][64 values of N] in the 128-byte swizzled layout (what a 64 x 64 TMA box of
// the [E * K, N] matrix writes). Its descriptor (wgmma_desc_mn) says where the next 64 columns
// of N start (the box size, 8 KB) and where the next 8 rows of K (1024 bytes); a k16 step moves
// 16 rows down the box (2048 bytes), and the instruction's transpose bit for B is set.
__device__ __forceinline__ u64 wgmma_desc_mn(const void* smem_tile, u32 mn_block_bytes) {
    u64 addr = smem_addr(smem_tile);
    u64 desc = (addr & 0x3FFFF) >> 4;
    desc |= u64((mn_block_bytes & 0x3FFFF) >> 4) << 16;  // leading byte offset: the next 64 columns of N
    desc |= u64(1024 >> 4) << 32;                         // stride byte offset: the next 8 rows of K
    desc |= u64(1) << 62;                                 // 128-byte swizzle
    return desc;
}

template <int NV>
__device__ __forceinline__ void wgmma_slice_b_mn(float (&acc)[NV], const bf16* a, const bf16* b) {
    wgmma_fence();
    wgmma_fence_operands(acc);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
        wgmma_m64k16</*TRANS_B=*/1>(acc, wgmma_desc(a + kk * 16), wgmma_desc_mn(b + kk * 16 * 64, 64 * 64 * 2));
    wgmma_commit();
}

// Accumulator fragment of m64nNk16: value v of thread t (in its warpgroup) sits at
//     row = 16 * (t / 32) + (t % 32) / 4 + 8 * ((v / 2) % 2),   col = 8 * (v / 4) + 2 * (t % 4) + v % 2.
// Store pairs of columns as bf16x2, rows past row_end skipped.
template <int NV>  // NV = N / 2 values per thread
__device__ __forceinline__ void store_wgmma_tile(const float (&d)[NV], bf16* Y, int ldy, int row0,
                                                 int row_end, int col0) {
    const int t = threadIdx.x % 128;
    const int r = row0 + 16 * (t / 32) + (t % 32) / 4;
#pragma unroll
    for (int v = 0; v < NV; v += 2) {
        const int row = r + 8 * ((v / 2) % 2);
        const int col = col0 + 8 * (v / 4) + 2 * (t % 4);
        if (row < row_end)
            *reinterpret_cast<__nv_bfloat162*>(&Y[(size_t)row * ldy + col]) = __floats2bfloat162_rn(d[v], d[v + 1]);
    }
}
