"""Host side of the grouped GEMM ladder (chapter 02): one launcher for every step in ``kernels/``.

The problem: rows of ``x`` are sorted by expert, ``offs[e]`` is the end row of expert ``e``
(as ``torch._grouped_mm`` takes it), and for every expert::

    y[start_e:end_e] = x[start_e:end_e] @ w[e].T      # x [M, K], w [E, N, K], y [M, N], bf16

Every step is checked here before launch: a shape a kernel cannot take is refused with a
message that names the problem, never launched into an out-of-bounds read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from . import kernels, tma
from .bench import benchmark, interleaved
from .checking import relative_error
from .kernels import ptr
from .machine import info

MAX_EXPERTS = 1024  # build_tile_map uses one thread per expert


@dataclass(frozen=True)
class Step:
    source: str  # file in kernels/
    kernel: str  # __global__ function
    title: str  # what it adds, for charts and tables
    block_m: int  # rows per tile (0: one launch per expert)
    block_n: int = 1  # N must be a multiple of this
    k_multiple: int = 1  # K must be a multiple of this
    threads: int = 256
    min_cc: tuple[int, int] = (8, 0)
    smem_bytes: int = 0  # dynamic shared memory
    persistent: bool = False
    defines: dict = field(default_factory=dict)
    tma: bool = False  # chapter 03: X and W passed as TMA tensor maps, not pointers

    @property
    def name(self) -> str:
        return self.source + "".join(f"[{k}={v}]" for k, v in self.defines.items())


def _wgmma_smem(block_n: int, stages: int = 4) -> int:
    """Bytes of the ring in wgmma_tile.cuh: STAGES x (128 + BN) rows x 64 bf16, + 1024 to align."""
    return stages * (128 * 64 + block_n * 64) * 2 + 1024


def _tma_smem(block_n: int = 256, stages: int = 4) -> int:
    """Chapter 03's ring: the same slots, plus a full and an empty mbarrier (8 bytes each) per slot."""
    return _wgmma_smem(block_n, stages) + 2 * 8 * stages


def _ws_smem(stages: int = 4) -> int:
    """warp_specialized.cuh: the ring (128 x 256 tiles), two 16 KB epilogue staging buffers, and
    each slot's tile (three ints) and two ints to hand a tile round."""
    return _tma_smem(256, stages) + 2 * 64 * 128 * 2 + 12 * stages + 8


GROUP_M_MAX = 16
GROUP_M_MIN = 4  # DeepSeek-V3's 2-3 tiles an expert (a few more with an uneven routing) in one group
GROUP_X_BYTES = 16 << 20  # X rows one group of M-tiles reads: kept well inside the 60 MB L2


def group_m_for(M: int, E: int, K: int, block_m: int = 128) -> int:
    """At most how many M-tiles of one expert a group of the warp-specialised kernels' tile
    order holds (warp_specialized.cuh; a group never straddles two experts): about one average
    expert's M-tiles (at least GROUP_M_MIN), so its weights are read once while all its rows
    are in flight, but no more than GROUP_X_BYTES of X rows per group.
    Computed from the shapes alone: no look at the expert counts, no host sync. Measured on the
    H200 (group sizes 1-16 on the chapter 02 shapes): within 2% of the best group everywhere."""
    per_expert = math.ceil(M / max(E, 1) / block_m)
    fits = max(1, GROUP_X_BYTES // (block_m * K * 2))
    return int(max(1, min(GROUP_M_MAX, fits, max(GROUP_M_MIN, per_expert))))


STEPS: dict[str, Step] = {s.name: s for s in [
    Step("02_1_naive_per_expert", "naive_gemm", "naive, one launch per expert", 0, threads=256),
    Step("02_2_naive_grouped", "naive_grouped_gemm", "naive, one launch (tile map)", 16),
    Step("02_3_smem_tiled", "smem_tiled_grouped_gemm", "shared-memory tiles, CUDA cores", 128, 128, 32),
    Step("02_4_mma_sync", "mma_sync_grouped_gemm", "tensor cores: mma.sync + cp.async", 128, 128, 32,
         smem_bytes=3 * 256 * 40 * 2),
    Step("02_5_wgmma", "wgmma_grouped_gemm", "Hopper wgmma", 128, 128, 64, min_cc=(9, 0),
         smem_bytes=_wgmma_smem(128)),
    Step("02_6_persistent", "persistent_grouped_gemm", "persistent, device tile scheduler", 128, 128, 64,
         min_cc=(9, 0), smem_bytes=_wgmma_smem(128), persistent=True),
    Step("02_6_persistent", "persistent_grouped_gemm", "persistent, 128x256 tiles", 128, 256, 64,
         min_cc=(9, 0), smem_bytes=_wgmma_smem(256), persistent=True, defines={"BN": 256}),
    Step("02_6_persistent", "persistent_grouped_gemm", "persistent, 6 stages", 128, 128, 64,
         min_cc=(9, 0), smem_bytes=_wgmma_smem(128, 6), persistent=True, defines={"STAGES": 6}),
    # chapter 03 (the gathered and SwiGLU steps take other inputs: moe_course/io_overlap.py)
    Step("03_1_tma", "tma_grouped_gemm", "TMA, one slot: no overlap", 128, 256, 64, min_cc=(9, 0),
         smem_bytes=_tma_smem(256, 1), tma=True, defines={"STAGES": 1}),
    Step("03_1_tma", "tma_grouped_gemm", "TMA + mbarrier ring (4 slots)", 128, 256, 64, min_cc=(9, 0),
         smem_bytes=_tma_smem(256, 4), tma=True),
    Step("03_2_warp_specialized", "ws_grouped_gemm", "producer + 2 consumer warpgroups", 128, 256, 64,
         threads=384, min_cc=(9, 0), smem_bytes=_ws_smem(4), persistent=True, tma=True),
]}
LADDER = [name for name in STEPS if "[" not in name]  # one entry per file, in teaching order


def chapter_steps(chapter: str) -> dict[str, Step]:
    """The steps of one chapter (``"02"`` or ``"03"``), in teaching order."""
    return {name: s for name, s in STEPS.items() if name.startswith(chapter + "_")}
CHAPTER02_BEST = "02_6_persistent[BN=256]"  # the best of chapter 02's ladder
BEST = "03_2_warp_specialized"  # the course's best grouped GEMM (chapter 03): the default everywhere


def check_tensor_types(specs: dict) -> None:
    """``specs``: name -> (tensor, dtype, dimensions). Each a torch tensor of that dtype and rank
    (checked before where it lives: a wrong dtype is the likelier mistake)."""
    import torch

    for name, (t, dtype, dim) in specs.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != dtype:
            raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
        if t.dim() != dim:
            raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(t.shape)}")


def check_on_gpu(tensors: dict) -> None:
    """``tensors``: name -> tensor. Each on the GPU and contiguous (the kernels index raw memory)."""
    for name, t in tensors.items():
        if t.device.type != "cuda":
            raise ValueError(f"{name} is on {t.device}; the kernels read GPU memory: move it with .cuda()")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (call .contiguous())")


def check_tile_multiples(step: Step, N: int, K: int, names: tuple[str, str] = ("N", "K")) -> None:
    """N and K whole multiples of what one of ``step``'s tiles covers (``names``: what the caller
    calls its N and K, so the message speaks its language)."""
    if N % step.block_n or K % step.k_multiple:
        n, k = names
        raise ValueError(f"{step.name} needs {n} % {step.block_n} == 0 and {k} % {step.k_multiple} == 0; "
                         f"got {n}={N}, {k}={K}")


def check_inputs(x, w, offs, step: Step, validate_offsets: bool = True, rows: int | None = None
                 ) -> tuple[int, int, int, int]:
    """Refuse what ``step`` cannot compute, naming the problem. Returns (M, N, K, E).

    ``rows``: the number of rows the experts own, when it is not ``x``'s (gathered inputs)."""
    import torch

    check_tensor_types({"x": (x, torch.bfloat16, 2), "w": (w, torch.bfloat16, 3), "offs": (offs, torch.int32, 1)})
    M, K = x.shape
    M = M if rows is None else rows
    E, N, Kw = w.shape
    if Kw != K:
        raise ValueError(f"x has K={K} columns but w is [E, N, K] = {tuple(w.shape)}: K differs "
                         "(w holds each expert's weight as [out, in])")
    if offs.numel() != E:
        raise ValueError(f"offs must hold one end row per expert: {E} values, got {offs.numel()}")
    if E > MAX_EXPERTS:
        raise ValueError(f"at most {MAX_EXPERTS} experts, got {E}")
    check_tile_multiples(step, N, K)
    check_on_gpu({"x": x, "w": w, "offs": offs})
    cc = info().compute_capability or (0, 0)
    if cc < step.min_cc:
        raise RuntimeError(f"{step.name} needs compute capability {step.min_cc[0]}.{step.min_cc[1]} "
                           f"(wgmma is Hopper-only); this GPU is {cc[0]}.{cc[1]}")
    if validate_offsets:  # one small copy to the host; benchmarks pass validate=False
        check_offsets(offs, M)
    return M, N, K, E


def check_offsets(offs, M: int) -> None:
    """Each expert's end row, non-decreasing, the last one ``M`` (the rows): checked on the host
    (one small copy, a synchronisation; the kernels clamp malformed offsets, only this says so)."""
    o = offs.cpu()
    if o.numel() and (int(o[0]) < 0 or bool((o[1:] < o[:-1]).any()) or int(o[-1]) != M):
        raise ValueError(f"offs must be non-decreasing end rows with offs[-1] == M == {M}; got {o.tolist()[:16]}"
                         + ("..." if o.numel() > 16 else ""))


@kernels.on_torch_stream
def launch_persistent(step: Step, module, head: tuple, offs, M: int, K: int, sizes: tuple, group_m: int | None = None):
    """Launch a persistent kernel of chapters 03 and 06 (one block per SM, the tile map built on
    the GPU): ``kernel(*head, offs, tile_map, num_tiles, *sizes, group_m)``."""
    fn = module.get_function(step.kernel)
    fn.max_dynamic_shared_size_bytes = step.smem_bytes
    tile_map, num_tiles, _ = build_tile_map(module, offs, M, step.block_m)
    fn((info().sm_count,), (step.threads,),
       head + (ptr(offs), ptr(tile_map), ptr(num_tiles)) + tuple(np.int32(v) for v in sizes)
       + (np.int32(group_m or group_m_for(M, offs.numel(), K)),), shared_mem=step.smem_bytes)


def grouped_gemm(x, w, offs, step: str = BEST, out=None, validate: bool = True):
    """``y[rows of e] = x[rows of e] @ w[e].T`` for every expert, by one step of the ladder.

    ``validate`` also checks the offsets on the host (one small copy, a synchronisation);
    benchmarks turn it off. Malformed offsets can never make a kernel read out of bounds (the
    kernels clamp them), but only validation says they were malformed.
    """
    if step not in STEPS:
        raise KeyError(f"unknown step {step!r}; steps: {', '.join(STEPS)}")
    return run_step(STEPS[step], x, w, offs, out, validate)


@kernels.on_torch_stream
def run_step(s: Step, x, w, offs, out=None, validate: bool = True, module=None, group_m: int | None = None):
    """Launch one step (``module``: an already loaded module, e.g. an exercise's own kernel;
    ``group_m``: the warp-specialised kernels' tile grouping, default :func:`group_m_for`)."""
    import torch

    M, N, K, E = check_inputs(x, w, offs, s, validate)
    if out is None:
        out = torch.empty(M, N, device=x.device, dtype=torch.bfloat16)
    elif out.shape != (M, N) or out.dtype != torch.bfloat16 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous bf16 tensor of shape ({M}, {N})")
    if M == 0 or N == 0:
        return out
    module = module or kernels.load(s.source, defines=s.defines)
    fn = module.get_function(s.kernel)
    if s.smem_bytes:
        fn.max_dynamic_shared_size_bytes = s.smem_bytes
    i32 = np.int32
    if s.block_m == 0:  # step 1: the host reads the counts (a sync) and launches per expert
        ends = offs.cpu().tolist()
        start = 0
        for e, end in enumerate(ends):
            rows = end - start
            if rows > 0:
                fn((math.ceil(N / 16), math.ceil(rows / 16)), (16, 16),
                   (ptr(x, start * K * 2), ptr(w[e]), ptr(out, start * N * 2), i32(rows), i32(N), i32(K)))
            start = end
        return out

    tile_map, num_tiles, max_tiles = build_tile_map(module, offs, M, s.block_m)
    if not s.persistent and max_tiles > 65535:
        raise ValueError(f"{s.name} launches one block row per tile: {max_tiles} tiles exceed the grid's "
                         f"65535; use a persistent step")
    if s.tma:  # the copy engine reads X and W through tensor maps (moe_course/tma.py)
        args = (tma.tensor_map_2d(x, s.block_m), tma.tensor_map_2d(w, s.block_n), ptr(out), ptr(offs), ptr(tile_map))
    else:
        args = (ptr(x), ptr(w), ptr(out), ptr(offs), ptr(tile_map))
    if s.persistent and s.tma:  # warp_specialized.cuh: the tile order's group size too
        fn((info().sm_count,), (s.threads,), args + (ptr(num_tiles), i32(M), i32(N), i32(K),
           i32(group_m or group_m_for(M, E, K, s.block_m))), shared_mem=s.smem_bytes)
    elif s.persistent:
        fn((info().sm_count,), (s.threads,), args + (ptr(num_tiles), i32(M), i32(N), i32(K)),
           shared_mem=s.smem_bytes)
    else:
        grid, block = launch_geometry(s, N, max_tiles)
        fn(grid, block, args + (i32(M), i32(N), i32(K)), shared_mem=s.smem_bytes)
    return out


def launch_geometry(s: Step, N: int, max_tiles: int) -> tuple[tuple[int, int], tuple[int, ...]]:
    """(grid, block) of a non-persistent step: one block per (N-tile, M-tile). Steps of 16-row
    tiles (the naive kernel, exercise 03) are 16 x 16 threads, one output each."""
    if s.block_m == 16:
        return (math.ceil(N / 16), max_tiles), (16, 16)
    return (N // s.block_n, max_tiles), (s.threads,)


def max_tiles_for(M: int, E: int, block_m: int) -> int:
    """An upper bound of the M-tiles, known without reading the counts: ceil(M / block_m) + E."""
    return math.ceil(M / block_m) + E


def run_step_on_cpu(s: Step, x, w, offs, out=None, module=None, build_map_module=None):
    """``run_step``'s launches, run on the CPU (:mod:`moe_course.cuda_on_cpu`): the tile map by
    ``build_tile_map`` and the step's kernel, one thread at a time in two thread orders, so a
    race, a barrier that not every thread reaches, or an index out of bounds is reported, not
    hidden. For the CUDA-core steps (02_1 to 02_3) and the exercises, at small sizes (slow);
    steps written in PTX (02_4 on) raise :class:`~moe_course.cuda_on_cpu.NeedsGPU`.
    ``x``, ``w``, ``offs``: CPU tensors; ``module``: a CPU module (default: the step's file)."""
    import torch

    from . import cuda_on_cpu

    check_tensor_types({"x": (x, torch.bfloat16, 2), "w": (w, torch.bfloat16, 3), "offs": (offs, torch.int32, 1)})
    M, K = x.shape
    E, N, _ = w.shape
    check_tile_multiples(s, N, K)
    check_offsets(offs, M)
    out = torch.empty(M, N, dtype=torch.bfloat16) if out is None else out
    if M == 0 or N == 0:
        return out
    module = module or cuda_on_cpu.load(s.source, defines=s.defines)
    if s.block_m == 0:  # step 1: one launch per expert, on the expert's rows
        start = 0
        for e, end in enumerate(offs.tolist()):
            rows = end - start
            if rows > 0:
                module.launch(s.kernel, (math.ceil(N / 16), math.ceil(rows / 16)), (16, 16),
                              (x[start:end], w[e], out[start:end], rows, N, K))
            start = end
        return out
    max_tiles = max_tiles_for(M, E, s.block_m)
    tile_map = torch.empty(max_tiles, 2, dtype=torch.int32)
    num_tiles = torch.empty(2, dtype=torch.int32)
    (build_map_module or module).launch("build_tile_map", (1,), (1024,),
                                        (offs, E, M, s.block_m, max_tiles, tile_map, num_tiles))
    grid, block = launch_geometry(s, N, max_tiles)
    module.launch(s.kernel, grid, block, (x, w, out, offs, tile_map, M, N, K), shared_mem=s.smem_bytes)
    return out


@kernels.on_torch_stream
def build_tile_map(module, offs, M: int, block_m: int):
    """Launch ``build_tile_map`` (grouped_gemm.cuh): (tile_map, num_tiles, max_tiles), all on the GPU.
    ``num_tiles[0]``: the real number of M-tiles; ``num_tiles[1]``: zero, the counter from which
    the dynamically scheduled kernels (warp_specialized.cuh) take their tiles.

    ``max_tiles`` = ceil(M / block_m) + E bounds the real count without reading the offsets."""
    import torch

    E = offs.numel()
    max_tiles = max_tiles_for(M, E, block_m)
    tile_map = torch.empty(max_tiles, 2, device=offs.device, dtype=torch.int32)
    num_tiles = torch.empty(2, device=offs.device, dtype=torch.int32)  # [M-tiles, tile counter]
    module.get_function("build_tile_map")((1,), (1024,), (
        ptr(offs), np.int32(E), np.int32(M), np.int32(block_m), np.int32(max_tiles), ptr(tile_map), ptr(num_tiles)))
    return tile_map, num_tiles, max_tiles


# ----------------------------------------------------------------------------- baselines


def reference(x, w, offs):
    """float32 result, one torch.mm per expert, computed from the bf16 inputs."""
    import torch

    y = torch.zeros(x.shape[0], w.shape[1], device=x.device, dtype=torch.float32)
    start = 0
    for e, end in enumerate(offs.cpu().tolist()):
        if end > start:
            y[start:end] = x[start:end].float() @ w[e].float().T
        start = end
    return y


def torch_loop(x, w, offs, out=None):
    """What a plain PyTorch MoE does: the host reads the counts, then one bf16 mm per expert."""
    import torch

    out = torch.empty(x.shape[0], w.shape[1], device=x.device, dtype=x.dtype) if out is None else out
    start = 0
    for e, end in enumerate(offs.cpu().tolist()):
        if end > start:
            torch.mm(x[start:end], w[e].T, out=out[start:end])
        start = end
    return out


def torch_grouped_mm(x, w, offs):
    """PyTorch's grouped GEMM (CUTLASS on sm90): takes w as [E, K, N], here a transposed view."""
    import torch

    return torch._grouped_mm(x, w.transpose(1, 2), offs=offs)


# ----------------------------------------------------------------------------- problems


def routed_experts(tokens: int, experts: int, top_k: int, skew: float = 0.0, seed: int = 0):
    """The experts ``(tokens, top_k)`` token-choice top-k picks from random router logits, on the CPU.

    ``skew`` biases the router towards low-numbered experts (logit bias ``-skew * log(1 + e)``):
    0 gives near-uniform counts, 1 a heavily loaded few, as real routers do early in training.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    bias = -skew * torch.log1p(torch.arange(experts, dtype=torch.float32))
    return (torch.randn(tokens, experts, generator=g) + bias).topk(top_k, dim=1).indices


def expert_counts(tokens: int, experts: int, top_k: int, skew: float = 0.0, seed: int = 0):
    """Rows per expert after :func:`routed_experts`."""
    import torch

    return torch.bincount(routed_experts(tokens, experts, top_k, skew, seed).flatten(), minlength=experts)


@dataclass
class Problem:
    x: object
    w: object
    offs: object
    counts: object

    @property
    def flops(self) -> float:
        return 2.0 * self.x.shape[0] * self.w.shape[1] * self.w.shape[2]

    @property
    def bytes(self) -> float:
        """Fewest bytes moved: x and every weight read once, y written once (bf16)."""
        return 2.0 * (self.x.numel() + self.w.numel() + self.x.shape[0] * self.w.shape[1])


def make_problem(counts, d_in: int, d_out: int, device: str = "cuda", seed: int = 0) -> Problem:
    """Random x [sum(counts), d_in] and w [E, d_out, d_in] (scaled so outputs are ~N(0, 1))."""
    import torch

    counts = torch.as_tensor(counts, dtype=torch.int64)
    g = torch.Generator(device=device).manual_seed(seed)
    M, E = int(counts.sum()), counts.numel()
    x = torch.randn(M, d_in, device=device, generator=g).to(torch.bfloat16)
    w = (torch.randn(E, d_out, d_in, device=device, generator=g) / math.sqrt(d_in)).to(torch.bfloat16)
    offs = torch.cumsum(counts, 0).to(device=device, dtype=torch.int32)
    return Problem(x, w, offs, counts)


# ----------------------------------------------------------------------------- measuring the ladder

SLOW_STEPS = ("02_1_naive_per_expert", "02_2_naive_grouped")  # ~1 TFLOP/s: seconds per call
SLOW_STEP_MAX_FLOPS = 1e12  # larger problems are not timed for the naive steps (the table says so)
BASELINES = {
    "torch loop": torch_loop,  # one torch.mm (cuBLAS) per expert, counts read on the host
    "torch._grouped_mm": torch_grouped_mm,  # CUTLASS sm90 grouped GEMM inside PyTorch
}
MAX_REL_ERR = 1e-2  # bf16 output against a float32 reference


def _reps_for(fn, budget_ms: float = 200.0) -> tuple[int, int]:
    """(reps, warm-up calls): a stable median for fast kernels, without spending minutes on
    the naive steps (a call of seconds is timed once; this probe call was its warm-up)."""
    import time

    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = (time.perf_counter() - t0) * 1e3
    return int(min(100, max(1, budget_ms / max(once, 1e-3)))), (0 if once > 100 else 3)


def implementation(impl: str):
    """``fn(x, w, offs)`` for a baseline's name or a step's (steps launched without the host check)."""
    return BASELINES.get(impl) or (lambda x, w, o, s=impl: grouped_gemm(x, w, o, step=s, validate=False))


def check_result(fn, x, w, offs, ref) -> dict:
    """``rel_err`` of ``fn`` against ``ref``, and an ``error`` when it is too large: a wrong result
    is reported, never timed."""
    err = relative_error(fn(x, w, offs), ref)
    return {"rel_err": err} if err < MAX_REL_ERR else {"rel_err": err, "error": f"wrong result: relative error {err:.3g}"}


def time_result(fn, x, w, offs, *, flops: float, bytes: float = 0.0, name: str, reps: int | None = None,
                warmup: int = 3) -> dict:
    """Median time of ``fn(x, w, offs)``; ``reps=None`` picks the repetitions from one probe call."""
    call = lambda: fn(x, w, offs)
    if reps is None:
        reps, warmup = _reps_for(call)
    m = benchmark(call, reps=reps, warmup=warmup, flops=flops, bytes=bytes, name=name)
    return m.timing()


FAST_CALL_MS = 20.0  # implementations faster than this are timed interleaved (bench.interleaved)


def time_interleaved(fns: dict, x, w, offs, *, flops: float, bytes: float = 0.0, rounds: int = 5,
                     reps: int = 10) -> dict[str, dict]:
    """Time several implementations of one problem in turns (:func:`moe_course.bench.interleaved`),
    so that the GPU's clock drifting over the run is not charged to whichever ran last."""
    calls = {name: (lambda fn=fn: fn(x, w, offs)) for name, fn in fns.items()}
    res = interleaved(calls, rounds=rounds, reps=reps, flops=flops, bytes=bytes)
    return {name: m.timing() for name, m in res.items()}


def measure_ladder(shapes: dict, projections=("up", "down"), routings=(("uniform", 0.0),),
                   impls=None, seed: int = 0, progress=None, on_row=None) -> list[dict]:
    """Check, then time, every implementation on every (shape, projection, routing).

    ``shapes``: name -> (T, d, n, E, K). Up-projection: X[T*K, d] x W[E, 2n, d];
    down-projection: X[T*K, n] x W[E, d, n]. Returns one row per measurement, with the error
    against a float32 reference and the rates; a wrong result is reported, never timed.
    Implementations that take under FAST_CALL_MS a call are timed interleaved with each other;
    slower ones (the naive steps, seconds a call) on their own, with fewer repetitions.
    """
    import time

    import torch

    impls = list(impls or (list(BASELINES) + list(STEPS)))
    rows = []
    for shape, (T, d, n, E, K) in shapes.items():
        for routing, skew in routings:
            counts = expert_counts(T, E, K, skew=skew, seed=seed)
            for proj in projections:
                d_in, d_out = (d, 2 * n) if proj == "up" else (n, d)
                p = make_problem(counts, d_in, d_out, seed=seed)
                ref = reference(p.x, p.w, p.offs)
                problem_rows, fast, slow = [], {}, {}
                for impl in impls:
                    if impl in SLOW_STEPS and (routing != routings[0][0] or p.flops > SLOW_STEP_MAX_FLOPS):
                        continue  # first routing and problems under 1 TFLOP only: a call takes seconds
                    fn = implementation(impl)
                    row = {"shape": shape, "proj": proj, "routing": routing, "impl": impl, "T": T, "d": d, "n": n,
                           "E": E, "K": K, "M": p.x.shape[0], "N": d_out, "Kdim": d_in,
                           "max_rows_per_expert": int(counts.max()), "flops": p.flops, "bytes": p.bytes}
                    if progress:
                        progress(f"{shape} {proj} {routing} {impl}")
                    try:
                        row.update(check_result(fn, p.x, p.w, p.offs, ref))  # also compiles the kernel
                    except Exception as exc:  # a shape this step refuses: say so in the table
                        row["error"] = f"{type(exc).__name__}: {exc}"
                    problem_rows.append(row)
                    if "error" in row:
                        continue
                    once_ms = float("inf")
                    if impl not in SLOW_STEPS:  # one compiled call, to sort fast from slow
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        fn(p.x, p.w, p.offs)
                        torch.cuda.synchronize()
                        once_ms = (time.perf_counter() - t0) * 1e3
                    (fast if once_ms < FAST_CALL_MS else slow)[impl] = (fn, row)
                if fast:
                    timed = time_interleaved({k: fn for k, (fn, _) in fast.items()}, p.x, p.w, p.offs,
                                             flops=p.flops, bytes=p.bytes)
                    for impl, (_, row) in fast.items():
                        row.update(timed[impl])
                for impl, (fn, row) in slow.items():
                    row.update(time_result(fn, p.x, p.w, p.offs, flops=p.flops, bytes=p.bytes, name=impl))
                rows.extend(problem_rows)
                if on_row:
                    on_row(rows)
                del p, ref
    return rows


def ladder_table(rows, matmul_tflops: float) -> str:
    """The results of :func:`measure_ladder` as a text table, with the ratios that matter."""
    by_key = {(r["shape"], r["proj"], r["routing"], r["impl"]): r for r in rows}
    out = [f"{'shape':<15}{'proj':<5}{'routing':<9}{'implementation':<26}{'ms':>9}{'TFLOP/s':>9}"
           f"{'% dense':>9}{'x grouped_mm':>13}{'x loop':>8}"]
    for r in rows:
        key = (r["shape"], r["proj"], r["routing"])
        if "error" in r:
            out.append(f"{r['shape']:<15}{r['proj']:<5}{r['routing']:<9}{r['impl']:<26}  {r['error'][:70]}")
            continue
        gmm = by_key.get(key + ("torch._grouped_mm",), {}).get("tflops")
        loop = by_key.get(key + ("torch loop",), {}).get("tflops")
        out.append(f"{r['shape']:<15}{r['proj']:<5}{r['routing']:<9}{r['impl']:<26}{r['ms']:>9.3f}"
                   f"{r['tflops']:>9.1f}{100 * r['tflops'] / matmul_tflops:>8.0f}%"
                   f"{r['tflops'] / gmm if gmm else float('nan'):>13.2f}{r['tflops'] / loop if loop else float('nan'):>8.2f}")
    return "\n".join(out)
