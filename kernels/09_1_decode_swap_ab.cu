// 09_1_decode_swap_ab.cu: chapter 09, step 1: the expert GEMM of a decode step, where each
// active expert has a handful of tokens.
//
//     Y[e][s] = X[e][s] @ W[e]^T        for the filled slots s < count[e] of each expert e
//
// X and Y are in the masked layout of moe_course/decode.py: each expert owns SLOTS rows at fixed
// addresses, count[e] of them filled, so nothing here depends on a number the host would have
// to read back (the step can be captured in a CUDA graph). With 1 to 256 tokens per expert,
// chapter 03's 128-row tiles would be almost all padding, and each would still read a whole
// slab of W[e]. wgmma's M is fixed at 64 but its N may be as small as 8, so the operands swap:
// W's rows become wgmma's M (128 per block: two warpgroups of 64) and the token slots its N,
//     Y[e]^T (N x SLOTS) = W[e] (N x K) @ X[e]^T (K x SLOTS),
// both operands K-major, as they are stored. A block streams its 128 rows of W[e] through 03_1's
// ring of TMA slots; the tokens' 64 values of K ride along in the same slot. A block of an
// expert with no tokens returns before it loads anything: an idle expert's weights are never
// read. Each thread's accumulator column is a token slot, so the result leaves transposed.
#include "tma.cuh"

#define BW 128  // rows of W[e] per block: two warpgroups of 64
#define BK 64   // values of K per slice (128 bytes: one swizzle row)
#ifndef STAGES
#define STAGES 4
#endif
#ifndef SLOTS
#define SLOTS 64  // token slots per expert: the wgmma N (8, 16, 32, 64, 128 or 256)
#endif
static_assert(SLOTS == 8 || SLOTS == 16 || SLOTS == 32 || SLOTS == 64 || SLOTS == 128 || SLOTS == 256,
              "SLOTS: 8, 16, 32, 64, 128 or 256");

// D[64 x N] += W[64 x 16] * X[N x 16]^T: one wgmma with the token slots as its N.
template <int N>
__device__ __forceinline__ void wgmma_m64k16_swapped(float (&d)[N / 2], u64 desc_w, u64 desc_x);
template <>
__device__ __forceinline__ void wgmma_m64k16_swapped<8>(float (&d)[4], u64 desc_w, u64 desc_x) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3"
        "}, %4, %5, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "l"(desc_w), "l"(desc_x));
}

template <>
__device__ __forceinline__ void wgmma_m64k16_swapped<16>(float (&d)[8], u64 desc_w, u64 desc_x) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7"
        "}, %8, %9, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
        : "l"(desc_w), "l"(desc_x));
}

template <>
__device__ __forceinline__ void wgmma_m64k16_swapped<32>(float (&d)[16], u64 desc_w, u64 desc_x) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
        "}, %16, %17, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
          "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "l"(desc_w), "l"(desc_x));
}

template <>
__device__ __forceinline__ void wgmma_m64k16_swapped<64>(float (&d)[32], u64 desc_w, u64 desc_x) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21,"
        "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
        "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
          "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
          "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
          "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(desc_w), "l"(desc_x));
}

template <>
__device__ __forceinline__ void wgmma_m64k16_swapped<128>(float (&d)[64], u64 desc_w, u64 desc_x) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21,"
        "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41,"
        "%42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61,"
        "%62, %63"
        "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
          "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
          "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
          "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]),
          "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]),
          "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
          "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),
          "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_w), "l"(desc_x));
}

template <>
__device__ __forceinline__ void wgmma_m64k16_swapped<256>(float (&d)[128], u64 desc_w, u64 desc_x) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21,"
        "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41,"
        "%42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61,"
        "%62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81,"
        "%82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100,"
        "%101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116,"
        "%117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
        "}, %128, %129, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
          "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
          "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
          "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]),
          "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]),
          "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
          "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),
          "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]),
          "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]),
          "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]),
          "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]),
          "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]),
          "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]),
          "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
          "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]),
          "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]),
          "+f"(d[126]), "+f"(d[127])
        : "l"(desc_w), "l"(desc_x));
}

struct __align__(1024) DecodeSlot {
    bf16 w[BW * BK];     // 128 rows of W[e], 64 values of K each, 128B-swizzled (as TMA writes them)
    bf16 x[SLOTS * BK];  // the expert's SLOTS token slots, the same 64 values of K
};
constexpr u32 SLOT_BYTES = sizeof(DecodeSlot);

// The ring in dynamic shared memory: STAGES slots, 1024-aligned (the 128B swizzle's unit), then a
// "full" and an "empty" mbarrier per slot, initialised by thread 0 before any thread uses them.
struct DecodeRing {
    DecodeSlot* slots;
    u64* full;
    u64* empty;
};
__device__ __forceinline__ DecodeRing decode_ring(unsigned char* smem) {
    const u32 pad = (1024 - (smem_addr(smem) & 1023)) & 1023;
    DecodeSlot* slots = reinterpret_cast<DecodeSlot*>(smem + pad);
    u64* full = reinterpret_cast<u64*>(slots + STAGES);
    u64* empty = full + STAGES;
    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(&full[s], 1);   // thread 0's arrive_expect_tx
            mbar_init(&empty[s], 8);  // one arrival per warp
        }
        fence_proxy_async();  // the initialised barriers, visible to the copy engine
    }
    __syncthreads();
    return {slots, full, empty};
}

#if __INCLUDE_LEVEL__ == 0  // the kernel, only where this file is the one compiled (not in 09_2)
extern "C" __global__ void __launch_bounds__(256)
decode_grouped_gemm(const __grid_constant__ TmaDesc map_w,  // W as [E * N, K], boxes of 128 rows
                    const __grid_constant__ TmaDesc map_x,  // X as [E * SLOTS, K], boxes of SLOTS rows
                    bf16* __restrict__ Y,                   // [E, SLOTS, N]
                    const int* __restrict__ count,          // [E]: filled slots per expert
                    int N, int K) {
    const int expert = blockIdx.y, n0 = blockIdx.x * BW;
    const int rows = min(count[expert], SLOTS);
    if (rows <= 0) return;  // the whole block, before any barrier: W[e] is never read

    extern __shared__ unsigned char smem[];
    const int num_k = K / BK;
    const int warpgroup = threadIdx.x / 128, lane = threadIdx.x % 32;
    const DecodeRing ring = decode_ring(smem);  // slots and barriers, ready for every thread
    DecodeSlot* slots = ring.slots;
    u64 *full = ring.full, *empty = ring.empty;

    auto load = [&](int kt) {  // thread 0 only: slice kt into its slot, once the slot is free (03_1's ring)
        const int s = kt % STAGES;
        if (kt >= STAGES) mbar_wait(&empty[s], (kt / STAGES - 1) & 1);
        mbar_arrive_expect_tx(&full[s], SLOT_BYTES);
        tma_load_2d(slots[s].w, map_w, kt * BK, expert * N + n0, &full[s]);
        tma_load_2d(slots[s].x, map_x, kt * BK, expert * SLOTS, &full[s]);
    };
    if (threadIdx.x == 0)
        for (int kt = 0; kt < STAGES && kt < num_k; ++kt) load(kt);

    float acc[SLOTS / 2];
#pragma unroll
    for (int v = 0; v < SLOTS / 2; ++v) acc[v] = 0.0f;
    for (int kt = 0; kt < num_k; ++kt) {
        const int s = kt % STAGES;
        mbar_wait(&full[s], (kt / STAGES) & 1);
        const bf16* w = slots[s].w + warpgroup * 64 * BK;  // this warpgroup's 64 rows of W
        wgmma_fence();
        wgmma_fence_operands(acc);
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk)
            wgmma_m64k16_swapped<SLOTS>(acc, wgmma_desc(w + kk * 16), wgmma_desc(slots[s].x + kk * 16));
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_fence_operands(acc);
        __syncwarp();
        if (lane == 0) mbar_arrive(&empty[s]);  // this warp is done with slot s
        if (threadIdx.x == 0 && kt + STAGES < num_k) load(kt + STAGES);
    }
    // Accumulator v of thread t: row r of this warpgroup's 64 rows of W (an output feature),
    // column c a token slot (wgmma's fragment layout, as in chapter 03's epilogue): Y[e][c][n].
    const int t = threadIdx.x % 128;
#pragma unroll
    for (int v = 0; v < SLOTS / 2; ++v) {
        const int r = 16 * (t / 32) + (t % 32) / 4 + 8 * ((v / 2) % 2);
        const int c = 8 * (v / 4) + 2 * (t % 4) + v % 2;
        if (c < rows) Y[((size_t)expert * SLOTS + c) * N + n0 + warpgroup * 64 + r] = __float2bfloat16_rn(acc[v]);
    }
}
#endif
