"""Issue 21, first hardware check (next GPU session): how does Hopper's FP8 wgmma accumulate?
moe_course/fp8.py models DeepSeek-V3's report ("around 14 bits", 32 products aligned per add).
This kernel runs m64n128k32 e4m3 wgmma over a long K, (0) in one accumulator for all of K and
(1) promoted every 128 of K into float32 registers, and compares both with the exact float64
sum and with the model at several accumulator widths: which width matches the hardware?"""
import numpy as np
import torch

from moe_course import fp8, kernels
from moe_course.kernels import ptr

SRC = r'''
#include "grouped_gemm.cuh"
__device__ __forceinline__ void wgmma_e4m3(float (&d)[64], u64 desc_a, u64 desc_b) {
    asm volatile(
        "{\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
        "{"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, %64, %65, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b));
}

// A [64, K] and B [128, K] e4m3 (K contiguous); D [64, 128] fp32. promote: a fresh accumulator
// for every 128 of K, added into float32 registers after each.
template <bool PROMOTE>
__device__ __forceinline__ void probe(const unsigned char* A, const unsigned char* B, float* D, int K) {
    __shared__ __align__(1024) unsigned char sa[64 * 128];
    __shared__ __align__(1024) unsigned char sb[128 * 128];
    const int t = threadIdx.x;
    float acc[64], part[64];
#pragma unroll
    for (int v = 0; v < 64; ++v) acc[v] = 0.0f, part[v] = 0.0f;
    for (int k0 = 0; k0 < K; k0 += 128) {
        __syncthreads();  // the previous chunk's multiplies are done (each thread waited on its own)
        for (int i = t; i < 64 * 8; i += 128) {
            const int r = i / 8, c = i % 8;
            *reinterpret_cast<uint4*>(&sa[swizzle_128b(r, c) * 16]) =
                *reinterpret_cast<const uint4*>(&A[(size_t)r * K + k0 + 16 * c]);
        }
        for (int i = t; i < 128 * 8; i += 128) {
            const int r = i / 8, c = i % 8;
            *reinterpret_cast<uint4*>(&sb[swizzle_128b(r, c) * 16]) =
                *reinterpret_cast<const uint4*>(&B[(size_t)r * K + k0 + 16 * c]);
        }
        fence_proxy_async();
        __syncthreads();
        float (&d)[64] = PROMOTE ? part : acc;  // chosen at compile time: registers, never the stack
        wgmma_fence();
        wgmma_fence_operands(d);
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) wgmma_e4m3(d, wgmma_desc(sa + 32 * kk), wgmma_desc(sb + 32 * kk));
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_fence_operands(d);
        if (PROMOTE)
#pragma unroll
            for (int v = 0; v < 64; ++v) acc[v] += part[v], part[v] = 0.0f;
    }
#pragma unroll
    for (int v = 0; v < 64; ++v) {
        const int r = 16 * (t / 32) + (t % 32) / 4 + 8 * ((v / 2) % 2);
        const int c = 8 * (v / 4) + 2 * (t % 4) + v % 2;
        D[r * 128 + c] = acc[v];
    }
}
extern "C" __global__ void __launch_bounds__(128) fp8_probe_one_accumulator(const unsigned char* A,
        const unsigned char* B, float* D, int K) { probe<false>(A, B, D, K); }
extern "C" __global__ void __launch_bounds__(128) fp8_probe_promoted(const unsigned char* A,
        const unsigned char* B, float* D, int K) { probe<true>(A, B, D, K); }
'''


def main():
    module = kernels.load(SRC)
    fns = {0: module.get_function("fp8_probe_one_accumulator"), 1: module.get_function("fp8_probe_promoted")}
    g = torch.Generator(device="cuda").manual_seed(0)
    print(f"{'K':>6} {'hardware':>10} {'promoted':>10}   model (no promotion) at bits: " +
          "  ".join(f"{b:>8}" for b in (12, 13, 14, 16, 20, 24)))
    for K in (256, 1024, 4096, 16384):
        for dist in ("normal", "positive"):
            a = torch.randn(64, K, device="cuda", generator=g)
            b = torch.randn(128, K, device="cuda", generator=g)
            if dist == "positive":  # no cancellation: the sum grows with K, the truncation shows most
                a, b = a.abs(), b.abs()
            aq, bq = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
            exact = aq.double() @ bq.double().T
            out = {}
            for promote in (0, 1):
                d = torch.full((64, 128), float("nan"), device="cuda")
                fns[promote]((1,), (128,), (ptr(aq.view(torch.uint8)), ptr(bq.view(torch.uint8)), ptr(d), np.int32(K),
                                  ))
                torch.cuda.synchronize()
                out[promote] = float(((d.double() - exact).norm() / exact.norm()))
            model = {bits: float(((fp8.limited_accumulate(aq.float().cpu(), bq.float().cpu(), bits=bits)
                                   - exact.cpu()).norm() / exact.cpu().norm())) if K <= 4096 else float("nan")
                     for bits in (12, 13, 14, 16, 20, 24)}
            print(f"{K:>6} {out[0]:10.2e} {out[1]:10.2e}   {dist:<9}" + "  ".join(f"{e:8.1e}" for e in model.values()))


if __name__ == "__main__":
    main()
