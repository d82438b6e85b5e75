"""CUDA C run on the CPU (moe_course.cuda_on_cpu): the course's kernels give torch's results,
and every kind of kernel bug it promises to report is reported, by name, with a planted bug."""

import math
import re

import pytest
import torch

from moe_course import ROOT, cuda_on_cpu, launch
from moe_course import grouped_gemm as gg
from moe_course import token_rounding as tr

pytestmark = pytest.mark.skipif(cuda_on_cpu.compiler() is None, reason="no C++ compiler on this machine")

PROBES = r'''
#include <cuda_bf16.h>
extern "C" __global__ void to_bf16(const float* x, __nv_bfloat16* y, float* back, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { y[i] = __float2bfloat16(x[i]); back[i] = __bfloat162float(y[i]); }
}
extern "C" __global__ void warp_sums(const int* x, int* sum, int* scan, unsigned* vote) {
    const int lane = threadIdx.x % 32, v = x[threadIdx.x];
    int s = v;
    for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
    int c = v;
    for (int o = 1; o < 32; o *= 2) { const int up = __shfl_up_sync(0xffffffffu, c, o); if (lane >= o) c += up; }
    sum[threadIdx.x] = s;
    scan[threadIdx.x] = c;
    vote[threadIdx.x] = __ballot_sync(0xffffffffu, v > 5);
    if (threadIdx.x == 3) printf("thread 3: warp sum %d\n", s);
}
extern "C" __global__ void counts(const int* x, int* hist, int* total) {
    __shared__ int local[8];
    if (threadIdx.x < 8) local[threadIdx.x] = 0;
    __syncthreads();
    atomicAdd(&local[x[blockIdx.x * blockDim.x + threadIdx.x] % 8], 1);
    const int n = __syncthreads_count(x[blockIdx.x * blockDim.x + threadIdx.x] > 3);
    if (threadIdx.x < 8) atomicAdd(&hist[threadIdx.x], local[threadIdx.x]);
    if (threadIdx.x == 0) atomicAdd(total, n);
}
extern "C" __global__ void shifted(float* y) {      // a race: reads a neighbour's value with no barrier
    __shared__ float s[64];
    s[threadIdx.x] = threadIdx.x;
    y[threadIdx.x] = s[(threadIdx.x + 1) % 64];
}
extern "C" __global__ void half_return(float* y) {  // half the block leaves before the barrier
    __shared__ float s[64];
    if (threadIdx.x >= 32) return;
    s[threadIdx.x] = 1;
    __syncthreads();
    y[threadIdx.x] = s[threadIdx.x];
}
extern "C" __global__ void two_barriers(float* y) {  // threads wait at different barriers
    __shared__ float s[64];
    if (threadIdx.x < 32) { s[threadIdx.x] = 1; __syncthreads(); }
    else { s[threadIdx.x] = 2; __syncthreads(); }
    y[threadIdx.x] = s[63 - threadIdx.x];
}
extern "C" __global__ void lane_leaves(int* y) {    // a lane returns before a full-mask shuffle
    if (threadIdx.x % 32 == 7) return;
    y[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (int)threadIdx.x, 1);
}
extern "C" __global__ void one_past(const float* x, float* y) { y[threadIdx.x] = x[threadIdx.x + 1]; }
extern "C" __global__ void shared_past(float* y) {
    __shared__ float s[32];
    s[threadIdx.x] = 1;
    __syncthreads();
    y[threadIdx.x] = s[threadIdx.x];
}
extern "C" __global__ void unaligned(const __nv_bfloat16* x, float* y) {
    const uint4 v = *reinterpret_cast<const uint4*>(x + 1 + 8 * threadIdx.x);
    y[threadIdx.x] = v.x;
}
extern "C" __global__ void spins(float* y) { while (y[0] == 0.0f) {} }
extern "C" __global__ void reads_uninitialised_shared(float* y) {
    __shared__ float s[64];
    y[threadIdx.x] = s[threadIdx.x];
}
'''


@pytest.fixture(scope="module")
def probes():
    return cuda_on_cpu.load(PROBES)


def test_bf16_conversions_are_bit_exact(probes):
    n = 1 << 15
    x = torch.randn(n) * torch.logspace(-44, 38, n)
    x[:9] = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0, 1.00390625, 1.01171875, 3.4e38, 1e-45, 2.0**-133])
    y, back = torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n)
    probes.launch("to_bf16", n // 256, 256, (x, y, back, n))
    assert torch.equal(y.view(torch.int16), x.bfloat16().view(torch.int16))  # torch rounds to nearest even too
    assert torch.equal(back, y.float())


def test_warp_functions_atomics_and_printf(probes, capsys):
    x = torch.randint(0, 10, (64,), dtype=torch.int32)
    s, scan, vote = (torch.zeros(64, dtype=torch.int32) for _ in range(3))
    result = probes.launch("warp_sums", 1, 64, (x, s, scan, vote))
    w = x.view(2, 32)
    assert torch.equal(s.view(2, 32), w.sum(1, keepdim=True).expand(2, 32).int())
    assert torch.equal(scan.view(2, 32), w.cumsum(1).int())
    bits = ((w > 5).long() << torch.arange(32)).sum(1)
    assert torch.equal(vote.view(2, 32).long() & 0xFFFFFFFF, bits[:, None].expand(2, 32))
    assert result.printed == f"thread 3: warp sum {int(w[0].sum())}\n"  # once, not once per thread order
    assert capsys.readouterr().out == result.printed

    x = torch.randint(0, 100, (4 * 128,), dtype=torch.int32)
    hist, total = torch.zeros(8, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    probes.launch("counts", 4, 128, (x, hist, total))
    assert torch.equal(hist, torch.bincount(x % 8, minlength=8).int())
    assert int(total) == int((x > 3).sum())


@pytest.mark.parametrize("threads", [False, True], ids=["fibers", "host threads"])
@pytest.mark.parametrize("step,counts,K,N", [
    ("02_1_naive_per_expert", [0, 1, 17, 0, 40], 48, 40),
    ("02_2_naive_grouped", [0, 1, 17, 0, 40], 48, 40),
    ("02_2_naive_grouped", [33], 16, 130),
    ("02_3_smem_tiled", [0, 3, 130, 0, 1], 64, 128),
])
def test_chapter_02_kernels_match_torch_bit_for_bit(step, counts, K, N, threads):
    if threads and step != "02_2_naive_grouped":
        pytest.skip("the host-thread scheduler (macOS's) is checked on one kernel")
    s = launch.STEPS[step]
    p = gg.make_problem(counts, K, N, device="cpu", seed=3)
    y = torch.full((p.x.shape[0], N), float("nan"), dtype=torch.bfloat16)
    module = cuda_on_cpu.load(s.source, threads=threads)
    launch.run_step_on_cpu(s, p.x, p.w, p.offs, out=y, module=module)
    # fp32 sums in the same order as the float32 reference: the same bits once rounded
    assert torch.equal(y, gg.reference(p.x, p.w, p.offs).to(torch.bfloat16))


def test_the_tile_map_is_chapter_02s():
    module = cuda_on_cpu.load("02_2_naive_grouped")
    counts = [0, 1, 17, 0, 40, 16]
    offs = torch.tensor(counts).cumsum(0).int()
    M, E = sum(counts), len(counts)
    max_tiles = launch.max_tiles_for(M, E, 16)
    tile_map, num_tiles = torch.full((max_tiles, 2), 7, dtype=torch.int32), torch.full((2,), 7, dtype=torch.int32)
    module.launch("build_tile_map", 1, 1024, (offs, E, M, 16, max_tiles, tile_map, num_tiles))
    want = [(e, start + 16 * j) for e, (start, n) in enumerate(zip([0, *offs.tolist()[:-1]], counts))
            for j in range(math.ceil(n / 16))]
    assert num_tiles.tolist() == [len(want), 0]
    assert tile_map.tolist() == [list(t) for t in want] + [[-1, 0]] * (max_tiles - len(want))


def test_first_kernel_and_combine_match_torch():
    x = torch.randn(1000).bfloat16()
    y = torch.empty_like(x)
    cuda_on_cpu.load("00_scale").launch("scale_bf16", 2, 64, (x, y, 1.5, x.numel()))
    assert torch.equal(y, (x.float() * 1.5).bfloat16())

    T, k, d, R = 5, 3, 64, 9
    rows = torch.randn(R, d).bfloat16()
    pos = torch.randint(-1, R + 2, (T, k), dtype=torch.int32)  # outside [0, R): a dropped pair
    weights = torch.rand(T, k)
    out = torch.empty(T, d, dtype=torch.bfloat16)
    cuda_on_cpu.load("06_4_combine").launch("combine_rows", T, 128, (rows, pos, weights, out, k, d, R))
    kept = ((pos >= 0) & (pos < R)).float()
    want = (weights[..., None] * kept[..., None] * rows.float()[pos.clamp(0, R - 1).long()]).sum(1)
    assert torch.allclose(out.float(), want, atol=1e-2, rtol=1e-2)


def test_token_rounding_kernels_match_torch():
    """route_topk (warp shuffles, atomics) and round_counts (barriers, shuffle scans) on the CPU."""
    T, E, k, tile = 40, 24, 3, 8
    scores = tr.scores_with_counts([5] * 24, T, k, seed=1, ties=False)
    module = cuda_on_cpu.load(tr.KERNEL_SOURCE)
    topk = torch.empty(T, k, dtype=torch.int32)
    topk_counts = torch.zeros(E, dtype=torch.int32)
    module.launch("route_topk", math.ceil(T / launch.TOPK_WARPS), 32 * launch.TOPK_WARPS, (scores, T, E, k, topk, topk_counts))
    assert torch.equal(topk.long(), tr.topk_experts(scores, k))
    assert torch.equal(topk_counts.long(), torch.bincount(topk.flatten().long(), minlength=E))
    for method in ("nearest", "up", "down"):
        counts, offsets = torch.empty(E, dtype=torch.int32), torch.empty(E + 1, dtype=torch.int32)
        module.launch("round_counts", 1, 1024, (topk_counts, E, T, tile, launch.ROUTING_MODES[method], counts, offsets))
        want = tr.round_counts(topk_counts.long(), tile, method, num_tokens=T)
        assert torch.equal(counts.long(), want), method
        assert torch.equal(offsets.long(), torch.cat([torch.zeros(1, dtype=torch.long), want.cumsum(0)])), method


# ----------------------------------------------------------------------------- bugs it reports


def test_a_missing_barrier_is_a_race(probes):
    with pytest.raises(cuda_on_cpu.RaceDetected, match=r"y\[0\] is nan when threads .* ascending .* but 1 in "
                                                        r"descending order .*missing __syncthreads"):
        probes.launch("shifted", 1, 64, (torch.zeros(64),))


def test_shared_memory_starts_as_garbage(probes):
    y = torch.zeros(64)
    probes.launch("reads_uninitialised_shared", 1, 64, (y,))
    assert bool(y.isnan().all())


def test_the_second_barrier_of_a_tiled_kernel_is_needed():
    source = (ROOT / "kernels" / "02_3_smem_tiled.cu").read_text()
    broken, n = re.subn(r"__syncthreads\(\);  // before the next slice.*", ";", source)
    assert n == 1
    p = gg.make_problem([0, 130, 2], 64, 128, device="cpu", seed=5)
    with pytest.raises(cuda_on_cpu.RaceDetected, match="results differ between thread orders"):
        launch.run_step_on_cpu(launch.STEPS["02_3_smem_tiled"], p.x, p.w, p.offs, module=cuda_on_cpu.load(broken))


def test_barrier_divergence_is_reported_not_hung(probes):
    with pytest.raises(cuda_on_cpu.BarrierDivergence,
                       match=r"threads 0 to 31 wait at __syncthreads\(\) at cell.cu line \d+\n  threads 32 to 63 "
                             r"have returned\n.*a return before a barrier"):
        probes.launch("half_return", 1, 64, (torch.zeros(64),))
    with pytest.raises(cuda_on_cpu.BarrierDivergence, match="same __syncthreads"):
        probes.launch("two_barriers", 1, 64, (torch.zeros(64),))
    with pytest.raises(cuda_on_cpu.BarrierDivergence, match="lane 7 of warp 0 .* has returned"):
        probes.launch("lane_leaves", 1, 64, (torch.zeros(64, dtype=torch.int32),))


@pytest.mark.skipif(not cuda_on_cpu.has_sanitizers(), reason="this compiler has no AddressSanitizer")
def test_out_of_bounds_names_the_argument_element_line_and_thread(probes):
    with pytest.raises(cuda_on_cpu.OutOfBounds,
                       match=r"one_past reads 4 bytes just past the end of x \(element 64; x holds 64 elements, "
                             r"shape \[64\]\) at cell.cu line \d+: `extern .*` \(block 0, thread 63, ascending"):
        probes.launch("one_past", 1, 64, (torch.zeros(64), torch.zeros(64)))
    with pytest.raises(cuda_on_cpu.OutOfBounds, match="outside the shared array s"):
        probes.launch("shared_past", 1, 33, (torch.zeros(33),))
    with pytest.raises(cuda_on_cpu.Misaligned, match=r"a load of uint4 at x\[1\] .* not 16-byte aligned"):
        probes.launch("unaligned", 1, 8, (torch.zeros(80, dtype=torch.bfloat16), torch.zeros(8)))


def test_an_endless_loop_times_out(probes):
    with pytest.raises(cuda_on_cpu.KernelTimeout, match="did not finish in 2 s"):
        probes.launch("spins", 1, 1, (torch.zeros(1),), timeout=2)


def test_ptx_needs_a_gpu_and_compile_errors_quote_the_line():
    with pytest.raises(cuda_on_cpu.NeedsGPU, match=r"02_5_wgmma.cu uses wgmma\.mma_async.* only an NVIDIA GPU runs"):
        cuda_on_cpu.load("02_5_wgmma")
    with pytest.raises(cuda_on_cpu.NeedsGPU, match=r"mma\.sync"):
        cuda_on_cpu.load("02_4_mma_sync")
    with pytest.raises(cuda_on_cpu.CompileError, match=r"(?s)cell.cu line 2: .*undeclared_name.*>\s+2 \| +y\[0\]"):
        cuda_on_cpu.load('extern "C" __global__ void k(float* y) {\n  y[0] = undeclared_name;\n}\n')


def test_bad_arguments_are_refused_by_name(probes):
    x = torch.zeros(64)
    with pytest.raises(TypeError, match=r"argument x of to_bf16 is `const float\*` \(float32 elements\); got a "
                                        r"tensor of float64"):
        probes.launch("to_bf16", 1, 64, (x.double(), torch.zeros(64, dtype=torch.bfloat16), x, 64))
    with pytest.raises(TypeError, match=r"to_bf16 takes 4 arguments \(x, y, back, n\), got 3"):
        probes.launch("to_bf16", 1, 64, (x, x, x))
    with pytest.raises(TypeError, match="argument n of to_bf16 is `int`, a value"):
        probes.launch("to_bf16", 1, 64, (x, torch.zeros(64, dtype=torch.bfloat16), x, x))
    with pytest.raises(ValueError, match="must be contiguous"):
        probes.launch("one_past", 1, 64, (torch.zeros(64, 2)[:, 0], x))
    with pytest.raises(ValueError, match="at most 1024"):
        probes.launch("one_past", 1, (64, 32), (x, x))
    with pytest.raises(KeyError, match="has no kernel 'nope'"):
        probes.launch("nope", 1, 1, ())


def test_no_compiler_says_how_to_get_one(monkeypatch):
    monkeypatch.setattr(cuda_on_cpu, "compiler", lambda: None)
    with pytest.raises(cuda_on_cpu.NoCompiler, match="needs a C\\+\\+ compiler .* apt install g\\+\\+"):
        cuda_on_cpu.load("00_scale")
