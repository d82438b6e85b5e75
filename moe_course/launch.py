"""Every kernel of ``kernels/`` and how it is launched: the one place for the host side.

- :class:`Step`: what one build of a kernel file needs at launch: its entry point, its tile
  (``block_m`` rows by ``block_n`` columns, K in slices of ``k_multiple``), threads, the GPU it
  needs, its dynamic shared memory (sized from that tile by the functions below), its
  ``#define``\\ s. Every launch reads the tile from its Step; nothing else restates it.
- :data:`KERNEL_FILES`: every file of ``kernels/`` -> its Step and the function that launches
  it (``tests/test_launch.py`` fails when a file has none).
- The launches every grouped GEMM shares: :func:`build_tile_map` (the M-tiles, on the GPU) and
  :func:`launch_persistent` (one block per SM, the tile order's group size).
- The kernels' input checks, all through :func:`moe_course.checks.require`: a shape, dtype or device a kernel cannot take
  is refused with a message that names the problem, never launched into an out-of-bounds read.
- :func:`run_step_on_cpu`: the same launches of the CUDA-core steps, run on the CPU
  (:mod:`moe_course.cuda_on_cpu`).

Conventions, as the kernels take them: rows sorted by expert, ``offs[e]`` the end row of expert
``e`` (int32, as ``torch._grouped_mm`` takes it); ``w`` is ``[E, N, K]`` (each expert's weight
stored like ``nn.Linear``'s) unless a launcher says otherwise; ``gather_idx[r]`` (int32) the
token that sorted row ``r`` reads. Every launch goes on torch's current stream
(:func:`moe_course.kernels.on_torch_stream`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from . import cuda_on_cpu, kernels, tma
from .checks import check_gather_range, check_offsets, check_positive, check_tensor_types, require
from .kernels import ptr
from .machine import info

# --------------------------------------------------------------------------------------------
# Input checks the launchers share (the general ones, and require, are moe_course.checks)


def check_on_gpu(tensors: dict) -> None:
    """``tensors``: name -> tensor. Each on the GPU and contiguous (the kernels index raw memory)."""
    for name, t in tensors.items():
        if t.is_cuda and t.is_contiguous():
            continue  # the usual case, passed on one line; below, one of the two fails
        require(t.device.type == "cuda", f"{name} is on {t.device}; the kernels read GPU memory: move it with .cuda()")
        require(t.is_contiguous(), f"{name} must be contiguous (call .contiguous())")


def check_gpu_at_least(min_cc: tuple[int, int], message) -> None:
    """This GPU's compute capability is at least ``min_cc``; ``message(cc)`` says why not."""
    cc = info().compute_capability or (0, 0)
    require(cc >= min_cc, lambda: message(cc), RuntimeError)


def check_tile_multiples(step: Step, N: int, K: int, names: tuple[str, str] = ("N", "K")) -> None:
    """N and K whole multiples of what one of ``step``'s tiles covers (``names``: what the caller
    calls its N and K, so the message speaks its language)."""
    n, k = names
    require(not (N % step.block_n or K % step.k_multiple),
            lambda: f"{step.name} needs {n} % {step.block_n} == 0 and {k} % {step.k_multiple} == 0; got {n}={N}, {k}={K}")


def check_out(out, M: int, N: int) -> None:
    """A caller's output buffer: contiguous bf16 ``[M, N]``."""
    require(out.shape == (M, N) and out.dtype == torch.bfloat16 and out.is_contiguous(),
            lambda: f"out must be a contiguous bf16 tensor of shape ({M}, {N})")


# --------------------------------------------------------------------------------------------
# Steps: what each kernel file needs at launch


@dataclass(frozen=True)
class Step:
    source: str  # file in kernels/
    kernel: str  # __global__ function
    title: str  # what it adds, for charts and tables
    block_m: int = 0  # rows per tile (0: no tiles: one launch per expert, or not a grouped GEMM)
    block_n: int = 1  # N must be a multiple of this
    k_multiple: int = 1  # K must be a multiple of this
    threads: int = 256
    min_cc: tuple[int, int] = (8, 0)
    smem_bytes: int = 0  # dynamic shared memory
    persistent: bool = False
    defines: dict = field(default_factory=dict)
    tma: bool = False  # chapter 03 on: X and W passed as TMA tensor maps, not pointers

    @property
    def name(self) -> str:
        return self.source + "".join(f"[{k}={v}]" for k, v in self.defines.items())

    def with_defines(self, **defines) -> Step:
        """This build with more ``#define``\\ s (an experiment's, opt-in): the same tile, shared
        memory and launcher, so it runs wherever the launcher takes a ``step``."""
        return dataclasses.replace(self, defines={**self.defines, **defines})


HOPPER = (9, 0)  # wgmma, TMA, setmaxnreg: sm_90a
MAX_EXPERTS = 1024  # build_tile_map (and 04_1's round_counts) use one thread per expert
SLICE_K = 64  # bf16 of K per slice of the wgmma rings: one 128-byte swizzled row (tma.BOX_COLS)
STAGING_BYTES = 64 * 128 * 2  # warp_specialized.cuh: one consumer warpgroup's epilogue staging buffer


def mma_sync_smem(block_m: int, block_n: int, block_k: int, stages: int) -> int:
    """02_4's ring: ``stages`` slices of (block_m + block_n) rows of ``block_k`` bf16, each row
    padded by 8 values against bank conflicts (its LDS)."""
    return stages * (block_m + block_n) * (block_k + 8) * 2


def wgmma_ring_smem(block_m: int, block_n: int, stages: int) -> int:
    """wgmma_tile.cuh's ring: ``stages`` slots of (block_m + block_n) rows x 64 bf16, + 1024 to align."""
    return stages * (block_m + block_n) * SLICE_K * 2 + 1024


def tma_ring_smem(block_m: int, block_n: int, stages: int) -> int:
    """Chapter 03's ring: the same slots, plus a full and an empty mbarrier (8 bytes each) per slot."""
    return wgmma_ring_smem(block_m, block_n, stages) + 2 * 8 * stages


def warp_specialized_smem(block_m: int, block_n: int, stages: int) -> int:
    """warp_specialized.cuh: the ring, two epilogue staging buffers, and each slot's tile (four
    ints: TileJob) and two ints to hand a tile round."""
    return tma_ring_smem(block_m, block_n, stages) + 2 * STAGING_BYTES + 16 * stages + 8


PINGPONG_BYTES = 24  # warp_specialized.cuh's ping-pong: two turn mbarriers and the two `done` words


def pingpong_step(step: Step, stages: int = 6) -> Step:
    """``step`` (06_2 or 10_2) built with warp_specialized.cuh's ping-pong schedule: each consumer
    warpgroup a whole 128 x 128 tile, the two in turns (one multiplies while the other runs its
    epilogue), and a ring of ``stages`` slots of 32 KB. Not the default: kernels/NOTES.md (session
    25) says where it stands against the cooperative schedule."""
    block_n = 128
    return dataclasses.replace(step, block_n=block_n, defines={"PINGPONG": 1, "BN": block_n, "STAGES": stages},
                               smem_bytes=warp_specialized_smem(WGMMA_BLOCK_M, block_n, stages) + PINGPONG_BYTES)


def weight_grad_smem(rows: int, block_n: int, block_k: int, stages: int) -> int:
    """06_3's shared memory: ``stages`` slots of ``rows`` rows of dY (``block_n`` wide) and of X
    (``block_k`` wide), a staging buffer per consumer warpgroup, two mbarriers a slot, 1024 to align."""
    return stages * rows * (block_n + block_k) * 2 + 2 * STAGING_BYTES + 16 * stages + 1024


def _mma_sync_step() -> Step:
    """02_4: 128 x 128 tiles, K in slices of 32, a ring of 3 (02_4_mma_sync.cu's BM, BN, BK, STAGES)."""
    block_m, block_n, block_k, stages = 128, 128, 32, 3
    return Step("02_4_mma_sync", "mma_sync_grouped_gemm", "tensor cores: mma.sync + cp.async", block_m, block_n,
                block_k, smem_bytes=mma_sync_smem(block_m, block_n, block_k, stages))


WGMMA_BLOCK_M = 128  # the M tile of every wgmma kernel: two consumer warpgroups of 64 rows


def _wgmma_step(source: str, kernel: str, title: str, block_n: int = 128, stages: int = 4, **kw) -> Step:
    """A step of chapter 02's wgmma ring (wgmma_tile.cuh: its BN and STAGES, 128 and 4 unless defined)."""
    return Step(source, kernel, title, WGMMA_BLOCK_M, block_n, SLICE_K, min_cc=HOPPER,
                smem_bytes=wgmma_ring_smem(WGMMA_BLOCK_M, block_n, stages), **kw)


def pipeline_step(stages: int, title: str = "TMA + mbarrier ring (4 slots)") -> Step:
    """03_1 with a ring of ``stages`` slots (the same tile, the same kernel otherwise), named by
    its slots (``03_1_tma[STAGES=2]``): chapter 03's pipeline measurements and exercise 07."""
    block_n = 256  # 03_1_tma.cu's BN
    return Step("03_1_tma", "tma_grouped_gemm", title, WGMMA_BLOCK_M, block_n, SLICE_K, min_cc=HOPPER,
                smem_bytes=tma_ring_smem(WGMMA_BLOCK_M, block_n, stages), tma=True, defines={"STAGES": stages})


def _warp_specialized_step(source: str, kernel: str, title: str) -> Step:
    """A kernel on chapter 03's skeleton (warp_specialized.cuh): 128 x 256 tiles, a ring of 4
    slots, a producer warpgroup and two consumers, persistent."""
    block_n, stages = 256, 4  # warp_specialized.cuh's BN and STAGES
    return Step(source, kernel, title, WGMMA_BLOCK_M, block_n, SLICE_K, threads=384, min_cc=HOPPER,
                smem_bytes=warp_specialized_smem(WGMMA_BLOCK_M, block_n, stages), persistent=True, tma=True)


SCALE = Step("00_scale", "scale_bf16", "y = alpha x: 16-byte loads, a grid-stride loop")

#: The grouped GEMM ladder of chapters 02 and 03: ``y = x @ w[e].T`` on ``(x, w, offs)``, one
#: entry per build, by name (``02_6_persistent[BN=256]``), in teaching order.
STEPS: dict[str, Step] = {s.name: s for s in [
    Step("02_1_naive_per_expert", "naive_gemm", "naive, one launch per expert"),
    Step("02_2_naive_grouped", "naive_grouped_gemm", "naive, one launch (tile map)", 16),
    Step("02_3_smem_tiled", "smem_tiled_grouped_gemm", "shared-memory tiles, CUDA cores", 128, 128, 32),
    _mma_sync_step(),
    _wgmma_step("02_5_wgmma", "wgmma_grouped_gemm", "Hopper wgmma"),
    _wgmma_step("02_6_persistent", "persistent_grouped_gemm", "persistent, device tile scheduler", persistent=True),
    _wgmma_step("02_6_persistent", "persistent_grouped_gemm", "persistent, 128x256 tiles", block_n=256,
                persistent=True, defines={"BN": 256}),
    _wgmma_step("02_6_persistent", "persistent_grouped_gemm", "persistent, 6 stages", stages=6, persistent=True,
                defines={"STAGES": 6}),
    pipeline_step(1, "TMA, one slot: no overlap"),
    dataclasses.replace(pipeline_step(4), defines={}),  # the kernel's own STAGES: 4
    _warp_specialized_step("03_2_warp_specialized", "ws_grouped_gemm", "producer + 2 consumer warpgroups"),
]}
LADDER = [name for name in STEPS if "[" not in name]  # one entry per file, in teaching order
CHAPTER02_BEST = "02_6_persistent[BN=256]"  # the best of chapter 02's ladder
BEST = "03_2_warp_specialized"  # the course's best grouped GEMM (chapter 03): the default everywhere


def chapter_steps(chapter: str) -> dict[str, Step]:
    """The steps of one chapter (``"02"`` or ``"03"``), in teaching order."""
    return {name: s for name, s in STEPS.items() if name.startswith(chapter + "_")}


# Chapter 03's kernels that take an MoE layer's own inputs (the token matrix and gather_idx)
GATHER = _warp_specialized_step("03_3_gather", "gather_grouped_gemm", "X rows gathered in the load (cp.async)")
SWIGLU = _warp_specialized_step("03_4_swiglu", "swiglu_grouped_gemm", "gathered up-projection + SwiGLU epilogue")

# Chapter 04: the routing metadata (top-K, rounded counts, tile map, selection): four launches
ROUTING = Step("04_1_token_rounding", "select_tokens", "token rounding's routing metadata, no host sync",
               threads=512)
ROUTING_MODES = {"top-K": 0, "up": 1, "down": 2, "nearest": 3, "padded": 4}  # round_counts' mode argument
TOPK_WARPS = 8  # tokens per block of route_topk (one warp per token)

# Chapter 06: what the trainable layer needs beyond chapter 03's kernels
TRANSPOSED_B = _warp_specialized_step("06_1_transposed_b", "transposed_b_grouped_gemm",
                                      "W stored [E, K, N], read transposed")
DSWIGLU = _warp_specialized_step("06_2_dswiglu", "dswiglu_grouped_gemm",
                                 "gathered dout @ W_down^T + SwiGLU backward epilogue")


def _weight_grad_step() -> Step:
    """06_3: tiles of 256 (N) x 128 (K) of dW, its reduction over each expert's rows 64 rows a
    slice (06_3_weight_grad.cu's TN, TK and BR), a ring of 4 slots."""
    rows, block_n, block_k, stages = 64, 256, 128, 4
    return Step("06_3_weight_grad", "weight_grad_grouped_gemm", "dW[e] = dy_e^T x_e (reduction over rows)",
                rows, block_n, block_k, threads=384, min_cc=HOPPER, persistent=True, tma=True,
                smem_bytes=weight_grad_smem(rows, block_n, block_k, stages))


WEIGHT_GRAD = _weight_grad_step()
COMBINE = Step("06_4_combine", "combine_rows", "each token gathers and sums its k rows (no atomics)", threads=128,
               min_cc=HOPPER)
EPILOGUE_BOX_ROWS = 64  # 06_3 stores dW in TMA boxes of 64 x 64 (store_tile)

# Chapter 10: the layer's kernels on Hugging Face's weight layout (no copy of the weights)
HF_SWIGLU = _warp_specialized_step("10_1_hf_swiglu", "hf_swiglu_grouped_gemm",
                                   "03_4 on HF's gate_up_proj (E, 2I, H): a 4-D tensor map")
HF_DSWIGLU = _warp_specialized_step("10_2_hf_dswiglu", "hf_dswiglu_grouped_gemm",
                                    "06_2 on HF's down_proj (E, H, I), read MN-major")
HF_TRANSPOSED_B = _warp_specialized_step("10_3_hf_transposed_b", "hf_transposed_b_grouped_gemm",
                                         "06_1 on HF's gate_up_proj through the 4-D map")
HF_WEIGHT_GRAD = dataclasses.replace(WEIGHT_GRAD, source="10_4_hf_weight_grad", kernel="hf_weight_grad_grouped_gemm",
                                     title="06_3 stored into HF's gate | up halves (4-D map)")
HF_DOWN_WEIGHT_GRAD = dataclasses.replace(WEIGHT_GRAD, source="10_5_hf_down_weight_grad",
                                          kernel="hf_down_weight_grad_grouped_gemm",
                                          title="06_3 storing its tile as accumulated: dW transposed")

# Chapter 09: a decode step's expert GEMM, the token slots as wgmma's N (one build per width)
DECODE_SLOTS = (8, 16, 32, 64, 128, 256)
DECODE_ROWS, DECODE_STAGES = 128, 4  # 09_1's BW (rows of W per block) and STAGES


def decode_smem(slots: int) -> int:
    """09_1's ring: STAGES slots of 128 rows of W and ``slots`` token rows, 64 values of K each,
    two mbarriers a slot, and up to 1 KB to align the ring."""
    return DECODE_STAGES * (DECODE_ROWS + slots) * SLICE_K * 2 + 2 * DECODE_STAGES * 8 + 1024


DECODE_STEPS = {c: Step("09_1_decode_swap_ab", "decode_grouped_gemm", f"decode, swap AB, {c} token slots",
                        DECODE_ROWS, c, SLICE_K, threads=256, min_cc=HOPPER, smem_bytes=decode_smem(c), tma=True,
                        defines={} if c == 64 else {"SLOTS": c})
                for c in DECODE_SLOTS}
#: 09_2's chunk of token slots (its wgmma N per chain): the slots of a capacity come in chunks of
#: this many, and only the chunks holding a token are loaded and multiplied
DECODE_CHUNK = 32


def decode_chunk(slots: int) -> int:
    """09_2's chunk for a capacity of ``slots``: :data:`DECODE_CHUNK`, or the capacity where that
    is smaller (one chunk: 09_1's maths)."""
    return min(slots, DECODE_CHUNK)


def decode_chunked_step(slots: int, chunk: int) -> Step:
    """09_2 built for ``slots`` token slots in chunks of ``chunk`` (the file's own: 64 slots, chunks
    of :func:`decode_chunk`)."""
    return Step("09_2_decode_slot_chunks", "decode_grouped_gemm_chunked",
                f"decode, swap AB, {slots} token slots in chunks of {chunk}", DECODE_ROWS, slots, SLICE_K,
                threads=256, min_cc=HOPPER, smem_bytes=decode_smem(slots), tma=True,
                defines=({} if slots == 64 else {"SLOTS": slots}) | ({} if chunk == decode_chunk(slots) else {"CHUNK": chunk}))


DECODE_CHUNKED_STEPS = {c: decode_chunked_step(c, decode_chunk(c)) for c in DECODE_SLOTS}
#: 09_2 with chunks of 64 slots (at 128 and 256 slots): for full experts (decode.gemm_chunk), fewer
#: and wider wgmma chains than chunks of 32, and still not 09_1's whole capacity
DECODE_WIDE_CHUNK = 64
DECODE_WIDE_CHUNK_STEPS = {c: decode_chunked_step(c, DECODE_WIDE_CHUNK) for c in DECODE_SLOTS if c > DECODE_WIDE_CHUNK}
#: 09_3's block: HELD chunks of DECODE_CHUNK slots (its ring and accumulators); an expert's
#: capacity comes in groups of this many slots, a block each (the grid's fastest index)
DECODE_SPLIT_HELD = 2
DECODE_SPLIT_SLOTS = DECODE_SPLIT_HELD * DECODE_CHUNK
#: 09_3 at the capacities it is built for (more slots than one block holds)
DECODE_SPLIT_STEPS = {c: Step("09_3_decode_slot_split", "decode_grouped_gemm_split",
                              f"decode, {c} token slots split over blocks of {DECODE_SPLIT_SLOTS}", DECODE_ROWS,
                              DECODE_SPLIT_SLOTS, SLICE_K, threads=256, min_cc=HOPPER,
                              smem_bytes=decode_smem(DECODE_SPLIT_SLOTS), tma=True,
                              defines={} if c == 256 else {"CAPACITY": c})
                      for c in DECODE_SLOTS if c > DECODE_SPLIT_SLOTS}
#: The decode GEMMs by chapter-09 step: 1 multiplies every slot, 2 only the chunks holding a token,
#: 3 those chunks split over blocks of DECODE_SPLIT_SLOTS slots (at 128 and 256 slots)
DECODE_GEMMS = {1: DECODE_STEPS, 2: DECODE_CHUNKED_STEPS, 3: DECODE_SPLIT_STEPS}


# --------------------------------------------------------------------------------------------
# What every grouped GEMM's launch shares: the tile map, the persistent grid


def max_tiles_for(M: int, E: int, block_m: int) -> int:
    """An upper bound of the M-tiles, known without reading the counts: ceil(M / block_m) + E."""
    return math.ceil(M / block_m) + E


@kernels.on_torch_stream
def build_tile_map(module, offs, M: int, block_m: int):
    """Launch ``build_tile_map`` (grouped_gemm.cuh): (tile_map, num_tiles, max_tiles), all on the GPU.
    ``num_tiles[0]``: the real number of M-tiles; ``num_tiles[1]``: zero, the counter from which
    the dynamically scheduled kernels (warp_specialized.cuh) take their tiles.

    ``max_tiles`` = ceil(M / block_m) + E bounds the real count without reading the offsets."""
    E = offs.numel()
    max_tiles = max_tiles_for(M, E, block_m)
    tile_map = torch.empty(max_tiles, 2, device=offs.device, dtype=torch.int32)
    num_tiles = torch.empty(2, device=offs.device, dtype=torch.int32)  # [M-tiles, tile counter]
    module.get_function("build_tile_map")((1,), (1024,), (
        ptr(offs), np.int32(E), np.int32(M), np.int32(block_m), np.int32(max_tiles), ptr(tile_map), ptr(num_tiles)))
    return tile_map, num_tiles, max_tiles


GROUP_M_MAX = 16
GROUP_M_MIN = 4  # DeepSeek-V3's 2-3 tiles an expert (a few more with an uneven routing) in one group
GROUP_X_BYTES = 16 << 20  # X rows one group of M-tiles reads: kept well inside the 60 MB L2


def group_m_for(M: int, E: int, K: int, block_m: int) -> int:
    """At most how many M-tiles of one expert a group of the warp-specialised kernels' tile
    order holds (warp_specialized.cuh; a group never straddles two experts): about one average
    expert's M-tiles (at least GROUP_M_MIN), so its weights are read once while all its rows
    are in flight, but no more than GROUP_X_BYTES of X rows per group.
    Computed from the shapes alone: no look at the expert counts, no host sync. Measured on the
    H200 (group sizes 1-16 on the chapter 02 shapes): within 2% of the best group everywhere."""
    per_expert = math.ceil(M / max(E, 1) / block_m)
    fits = max(1, GROUP_X_BYTES // (block_m * K * 2))
    return int(max(1, min(GROUP_M_MAX, fits, max(GROUP_M_MIN, per_expert))))


@kernels.on_torch_stream
def launch_persistent(step: Step, module, head: tuple, offs, M: int, K: int, sizes: tuple, group_m: int | None = None):
    """Launch a persistent kernel of chapters 03 and 06 (one block per SM, the tile map built on
    the GPU): ``kernel(*head, offs, tile_map, num_tiles, *sizes, group_m)``."""
    fn = module.get_function(step.kernel)
    fn.max_dynamic_shared_size_bytes = step.smem_bytes
    tile_map, num_tiles, _ = build_tile_map(module, offs, M, step.block_m)
    fn((info().sm_count,), (step.threads,),
       head + (ptr(offs), ptr(tile_map), ptr(num_tiles)) + tuple(np.int32(v) for v in sizes)
       + (np.int32(group_m or group_m_for(M, offs.numel(), K, step.block_m)),), shared_mem=step.smem_bytes)


def launch_geometry(s: Step, N: int, max_tiles: int) -> tuple[tuple[int, int], tuple[int, ...]]:
    """(grid, block) of a non-persistent step: one block per (N-tile, M-tile). Steps of 16-row
    tiles (the naive kernel, exercise 03) are 16 x 16 threads, one output each."""
    if s.block_m == 16:
        return (math.ceil(N / 16), max_tiles), (16, 16)
    return (N // s.block_n, max_tiles), (s.threads,)


# --------------------------------------------------------------------------------------------
# 00: the first kernel


BLOCKS_PER_SM = 8  # 00_scale: enough resident warps to keep many 16-byte loads in flight


def check_bf16_cuda(name: str, t, align: int = 16) -> None:
    require(isinstance(t, torch.Tensor), lambda: f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    require(t.dtype == torch.bfloat16, lambda: f"{name} must be bfloat16, got {t.dtype}", TypeError)
    require(t.device.type == "cuda",
            lambda: f"{name} is on {t.device}; the kernel reads GPU memory: move it with .cuda()")
    require(t.is_contiguous(), lambda: f"{name} must be contiguous (call .contiguous())")
    require(t.data_ptr() % align == 0, lambda: f"{name} must start on a {align}-byte boundary for 16-byte loads "
                                               f"(its address ends in {t.data_ptr() % align} mod {align}; a sliced view?)")


@kernels.on_torch_stream
def scale(x, alpha: float, out=None):
    """``alpha * x`` in bf16 by the course's first kernel (``kernels/00_scale.cu``): the pattern
    every launcher here follows: check the inputs, load the module (compiled once per process),
    size the grid from the GPU, launch on torch's stream, return a torch tensor."""
    check_bf16_cuda("x", x)
    if out is None:
        out = torch.empty_like(x)
    check_bf16_cuda("out", out)
    require(out.shape == x.shape, lambda: f"out has shape {tuple(out.shape)}, x has {tuple(x.shape)}")
    n = x.numel()
    if n == 0:
        return out
    kernel = kernels.load(SCALE.source).get_function(SCALE.kernel)
    blocks = max(1, min(-(-n // (8 * SCALE.threads)), info().sm_count * BLOCKS_PER_SM))
    kernel((blocks,), (SCALE.threads,), (ptr(x), ptr(out), np.float32(alpha), np.int64(n)))
    return out


# --------------------------------------------------------------------------------------------
# 02-03: the grouped GEMM ladder, y[rows of e] = x[rows of e] @ w[e].T


def check_inputs(x, w, offs, step: Step, validate_offsets: bool = True, rows: int | None = None
                 ) -> tuple[int, int, int, int]:
    """Refuse what ``step`` cannot compute, naming the problem. Returns (M, N, K, E).

    ``rows``: the number of rows the experts own, when it is not ``x``'s (gathered inputs)."""
    check_tensor_types({"x": (x, torch.bfloat16, 2), "w": (w, torch.bfloat16, 3), "offs": (offs, torch.int32, 1)})
    M, K = x.shape
    M = M if rows is None else rows
    E, N, Kw = w.shape
    require(Kw == K, lambda: f"x has K={K} columns but w is [E, N, K] = {tuple(w.shape)}: K differs "
                             "(w holds each expert's weight as [out, in])")
    require(offs.numel() == E, lambda: f"offs must hold one end row per expert: {E} values, got {offs.numel()}")
    require(E <= MAX_EXPERTS, lambda: f"at most {MAX_EXPERTS} experts, got {E}")
    check_tile_multiples(step, N, K)
    check_on_gpu({"x": x, "w": w, "offs": offs})
    check_gpu_at_least(step.min_cc, lambda cc: f"{step.name} needs compute capability {step.min_cc[0]}."
                                               f"{step.min_cc[1]} (wgmma is Hopper-only); this GPU is {cc[0]}.{cc[1]}")
    if validate_offsets:  # one small copy to the host; benchmarks pass validate=False
        check_offsets(offs, M)
    return M, N, K, E


def grouped_gemm(x, w, offs, step: str = BEST, out=None, validate: bool = True):
    """``y[rows of e] = x[rows of e] @ w[e].T`` for every expert, by one step of the ladder.

    ``validate`` also checks the offsets on the host (one small copy, a synchronisation);
    benchmarks turn it off. Malformed offsets can never make a kernel read out of bounds (the
    kernels clamp them), but only validation says they were malformed.
    """
    require(step in STEPS, lambda: f"unknown step {step!r}; steps: {', '.join(STEPS)}", KeyError)
    return run_step(STEPS[step], x, w, offs, out, validate)


@kernels.on_torch_stream
def run_step(s: Step, x, w, offs, out=None, validate: bool = True, module=None, group_m: int | None = None):
    """Launch one step (``module``: an already loaded module, e.g. an exercise's own kernel;
    ``group_m``: the warp-specialised kernels' tile grouping, default :func:`group_m_for`)."""
    M, N, K, E = check_inputs(x, w, offs, s, validate)
    if out is None:
        out = torch.empty(M, N, device=x.device, dtype=torch.bfloat16)
    else:
        check_out(out, M, N)
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
    require(s.persistent or max_tiles <= 65535, lambda: f"{s.name} launches one block row per tile: {max_tiles} "
                                                        f"tiles exceed the grid's 65535; use a persistent step")
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


def run_step_on_cpu(s: Step, x, w, offs, out=None, module=None, build_map_module=None):
    """``run_step``'s launches, run on the CPU (:mod:`moe_course.cuda_on_cpu`): the tile map by
    ``build_tile_map`` and the step's kernel, one thread at a time in two thread orders, so a
    race, a barrier that not every thread reaches, or an index out of bounds is reported, not
    hidden. For the CUDA-core steps (02_1 to 02_3) and the exercises, at small sizes (slow);
    steps written in PTX (02_4 on) raise :class:`~moe_course.cuda_on_cpu.NeedsGPU`.
    ``x``, ``w``, ``offs``: CPU tensors; ``module``: a CPU module (default: the step's file)."""
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


# --------------------------------------------------------------------------------------------
# 03_3, 03_4: the token rows gathered inside the load; SwiGLU in the epilogue


def check_gather(x, gather_idx, w, offs, step: Step, validate: bool) -> tuple[int, int, int, int]:
    """:func:`check_inputs` for a gathered step (the experts own ``gather_idx``'s rows), and
    ``gather_idx`` itself. Returns (M, N, K, E)."""
    require(isinstance(gather_idx, torch.Tensor) and gather_idx.dtype == torch.int32 and gather_idx.dim() == 1,
            "gather_idx must be a 1-D torch.int32 tensor (the token of each expert-sorted row)", TypeError)
    require(gather_idx.device == x.device and gather_idx.is_contiguous(),
            lambda: f"gather_idx must be contiguous and on {x.device}, like x")
    M, N, K, E = check_inputs(x, w, offs, step, validate, rows=gather_idx.numel())
    if validate:
        check_gather_range(gather_idx, x.shape[0])
    return M, N, K, E


def _launch_gathered(step: Step, x, gather_idx, w, offs, outputs, M, N, K):
    module = kernels.load(step.source, defines=step.defines)
    launch_persistent(step, module, (tma.tensor_map_2d(w, step.block_n), ptr(x), ptr(gather_idx), *outputs),
                      offs, M, K, (M, N, K, x.shape[0]))


def gather_grouped_gemm(x, gather_idx, w, offs, out=None, validate: bool = True, step: Step = GATHER):
    """``y[r] = x[gather_idx[r]] @ w[e].T`` for the rows ``r`` of each expert ``e``, without
    writing ``x[gather_idx]`` anywhere. ``validate`` checks the offsets and indices on the host
    (a synchronisation; benchmarks turn it off). An index outside ``x`` reads a zero row."""
    M, N, K, E = check_gather(x, gather_idx, w, offs, step, validate)
    if out is None:
        out = torch.empty(M, N, device=x.device, dtype=torch.bfloat16)
    else:
        check_out(out, M, N)
    if M and N:
        _launch_gathered(step, x, gather_idx, w, offs, (ptr(out),), M, N, K)
    return out


def swiglu_grouped_gemm(x, gather_idx, w_interleaved, offs, store_h: bool = True, validate: bool = True,
                        step: Step = SWIGLU):
    """The up-projection of an MoE layer: ``(a, h)`` with ``h[r] = x[gather_idx[r]] @ w[e].T``
    (``[M, 2n]``, gate and up columns interleaved, or ``None`` when ``store_h`` is False) and
    ``a = silu(gate) * up`` (``[M, n]``). ``w_interleaved``: gate and up rows interleaved
    (:func:`moe_course.io_overlap.interleave_gate_up`)."""
    M, N, K, E = check_gather(x, gather_idx, w_interleaved, offs, step, validate)
    a = torch.empty(M, N // 2, device=x.device, dtype=torch.bfloat16)
    h = torch.empty(M, N, device=x.device, dtype=torch.bfloat16) if store_h else None
    if M and N:
        outputs = (ptr(h) if store_h else np.uint64(0), ptr(a))
        if step is HF_SWIGLU:  # W through the 4-D map that interleaves HF's gate and up halves
            module = kernels.load(step.source, defines=step.defines)
            launch_persistent(step, module, (tma.tensor_map_gate_up(w_interleaved, step.block_n), ptr(x),
                                             ptr(gather_idx), *outputs), offs, M, K, (M, N, K, x.shape[0]))
        else:
            _launch_gathered(step, x, gather_idx, w_interleaved, offs, outputs, M, N, K)
    return a, h


def hf_swiglu_grouped_gemm(x, gather_idx, gate_up_proj, offs, store_h: bool = True, validate: bool = True):
    """:func:`swiglu_grouped_gemm` on Hugging Face's ``gate_up_proj (E, 2I, H)`` as it is (each
    expert's I gate rows, then its I up rows; ``kernels/10_1_hf_swiglu.cu``): the same ``(a, h)``,
    ``h`` with gate and up columns interleaved, bit for bit what 03_4 gives on the interleaved
    copy, without making one."""
    return swiglu_grouped_gemm(x, gather_idx, gate_up_proj, offs, store_h, validate, step=HF_SWIGLU)


# --------------------------------------------------------------------------------------------
# 04_1: the routing metadata of token rounding, on the GPU


@kernels.on_torch_stream
def route_tokens(scores, k: int, tile: int, method: str, rows: int, module=None) -> tuple:
    """Launch ``kernels/04_1_token_rounding.cu`` on checked float32 ``scores (T, E)`` on the GPU
    (:func:`moe_course.token_rounding.route_cuda` checks them and names the fields): top-K,
    the rounded counts, chapter 02's tile map of ``tile`` rows on them, then each expert's
    selection, into row buffers of ``rows`` entries. Four launches, no host synchronisation.
    Returns ``(token_ids, expert_ids, weights, from_topk, counts, ends, offsets, topk_counts,
    topk, tile_map, num_tiles)``, int32 indices."""
    num_tokens, num_experts = scores.shape
    module = module or kernels.load(ROUTING.source)
    dev, i32 = scores.device, torch.int32
    topk = torch.empty(num_tokens, k, dtype=i32, device=dev)
    topk_counts = torch.zeros(num_experts, dtype=i32, device=dev)  # atomics add to it
    counts = torch.empty(num_experts, dtype=i32, device=dev)
    offsets = torch.empty(num_experts + 1, dtype=i32, device=dev)
    token_ids = torch.empty(rows, dtype=i32, device=dev)
    expert_ids = torch.empty(rows, dtype=i32, device=dev)
    weights = torch.empty(rows, dtype=torch.float32, device=dev)
    from_topk = torch.empty(rows, dtype=torch.bool, device=dev)
    keys = torch.empty(num_experts, num_tokens, dtype=i32, device=dev)  # scratch: each expert's keys
    flags = torch.empty(num_experts, num_tokens, dtype=torch.uint8, device=dev)  # scratch: top-K flags
    n = np.int32
    module.get_function("route_topk")((math.ceil(num_tokens / TOPK_WARPS),), (32 * TOPK_WARPS,),
                                      (ptr(scores), n(num_tokens), n(num_experts), n(k), ptr(topk), ptr(topk_counts)))
    module.get_function("round_counts")((1,), (1024,), (ptr(topk_counts), n(num_experts), n(num_tokens), n(tile),
                                                        n(ROUTING_MODES[method]), ptr(counts), ptr(offsets)))
    ends = offsets[1:]
    tile_map, num_tiles, _ = build_tile_map(module, ends, rows, tile)  # chapter 02's, on the rounded counts
    module.get_function(ROUTING.kernel)((num_experts,), (ROUTING.threads,), (
        ptr(scores), ptr(topk), n(num_tokens), n(num_experts), n(k), ptr(topk_counts), ptr(counts), ptr(offsets),
        n(int(method == "padded")), ptr(keys), ptr(flags), ptr(token_ids), ptr(expert_ids), ptr(weights),
        ptr(from_topk)))
    return token_ids, expert_ids, weights, from_topk, counts, ends, offsets, topk_counts, topk, tile_map, num_tiles


# --------------------------------------------------------------------------------------------
# 06_1 .. 06_4: the trainable layer's kernels (moe_course.layer); validate=True also checks the
# offsets and indices on the host (a synchronisation; the layer turns it off)


def check_hopper_inputs(tensors: dict, dims: dict, dtypes: dict | None = None) -> None:
    """Every tensor a torch tensor of the right dtype (bf16 unless told) and rank, contiguous,
    on the GPU; and the GPU a Hopper."""
    check_tensor_types({name: (t, (dtypes or {}).get(name, torch.bfloat16), dims[name]) for name, t in tensors.items()})
    check_on_gpu(tensors)
    check_gpu_at_least(HOPPER, lambda cc: f"chapter 06's kernels need a Hopper GPU (sm_90a, wgmma and TMA); "
                                          f"this one is {cc[0]}.{cc[1]}")


def check_expert_offsets(offs, rows: int, validate: bool) -> int:
    """1 to MAX_EXPERTS experts (and, with ``validate``, their end rows: :func:`check_offsets`); returns E."""
    E = offs.numel()
    require(0 < E <= MAX_EXPERTS, lambda: f"between 1 and {MAX_EXPERTS} experts, got {E}")
    if validate:
        check_offsets(offs, rows)
    return E


def check_gather_idx(gather_idx, rows: int, tokens: int, validate: bool) -> None:
    require(gather_idx.numel() == rows,
            lambda: f"gather_idx must hold one token per sorted row: {rows}, got {gather_idx.numel()}")
    if validate:
        check_gather_range(gather_idx, tokens)


def transposed_b_grouped_gemm(x, w, offs, validate: bool = True, step: Step = TRANSPOSED_B):
    """``y[rows of e] = x[rows of e] @ w[e]``, ``x [M, K]``, ``w [E, K, N]`` (N contiguous),
    ``y [M, N]`` bf16 (``kernels/06_1_transposed_b.cu``). N a multiple of 256, K of 64."""
    check_hopper_inputs({"x": x, "w": w, "offs": offs}, {"x": 2, "w": 3, "offs": 1}, {"offs": torch.int32})
    M, K = x.shape
    E, Kw, N = w.shape
    require(Kw == K, lambda: f"x has K={K} columns but w is [E, K, N] = {tuple(w.shape)}: K differs")
    check_tile_multiples(step, N, K)
    require(check_expert_offsets(offs, M, validate) == E,
            lambda: f"offs must hold one end row per expert: {E}, got {offs.numel()}")
    y = torch.empty(M, N, device=x.device, dtype=torch.bfloat16)
    if M:
        module = kernels.load(step.source)
        if step is HF_TRANSPOSED_B:  # HF's gate_up_proj: K (2I) rows read interleaved, as dH's columns are
            w_map = tma.tensor_map_gate_up(w, step.k_multiple)
        else:
            w_map = tma.tensor_map_2d(w, step.k_multiple)  # w as an [E * K, N] matrix: boxes of a slice of K x 64 of N
        launch_persistent(step, module, (tma.tensor_map_2d(x, step.block_m), w_map, ptr(y)), offs, M, K, (M, N, K))
    return y


def hf_transposed_b_grouped_gemm(dh, gate_up_proj, offs, validate: bool = True):
    """``dh[rows of e] @ gate_up_proj[e]`` with ``dh [R, 2I]`` interleaved like H and HF's
    ``gate_up_proj (E, 2I, H)`` as it is (``kernels/10_3_hf_transposed_b.cu``): what
    :func:`transposed_b_grouped_gemm` gives on the interleaved copy."""
    return transposed_b_grouped_gemm(dh, gate_up_proj, offs, validate, step=HF_TRANSPOSED_B)


def dswiglu_grouped_gemm(dout, gather_idx, w_down, h, row_scale, offs, validate: bool = True, step: Step = DSWIGLU):
    """The backward's first product and the SwiGLU backward (``kernels/06_2_dswiglu.cu``).

    ``dout [T, d]`` (the layer's output gradient), ``w_down [E, n, d]``, ``h [R, 2n]`` (the
    forward's pre-activation, gate and up interleaved), ``row_scale [R]`` fp32 (each sorted row's
    routing weight). Returns ``(dh [R, 2n], sa [R, n], ds [R])``: the pre-activation's gradient,
    ``s * silu(gate) * up`` and each row's routing-weight gradient ``<dout W_down[e], a>`` (fp32).
    ``step``: another build of 06_2 (:func:`pingpong_step`)."""
    E, n, d = _dswiglu_weight(w_down, dout, "w_down [E, n, d]", transposed=False)
    return _dswiglu(step, lambda: tma.tensor_map_2d(w_down, step.block_n),  # [E * n, d]: K-major boxes
                    dout, gather_idx, w_down, h, row_scale, offs, E, n, d, validate)


def hf_dswiglu_grouped_gemm(dout, gather_idx, down_proj, h, row_scale, offs, validate: bool = True,
                            step: Step = HF_DSWIGLU):
    """:func:`dswiglu_grouped_gemm` on HF's ``down_proj (E, H, I)`` as it is, read MN-major
    (``kernels/10_2_hf_dswiglu.cu``): the same ``(dh, sa, ds)``."""
    E, n, d = _dswiglu_weight(down_proj, dout, "down_proj [E, d, n]", transposed=True)
    return _dswiglu(step, lambda: tma.tensor_map_2d(down_proj, step.k_multiple),  # [E * d, n]: MN-major
                    dout, gather_idx, down_proj, h, row_scale, offs, E, n, d, validate)


def _dswiglu_weight(w, dout, layout: str, transposed: bool) -> tuple[int, int, int]:
    """``(E, n, d)`` of the down-projection's weight, stored ``[E, n, d]`` or (``transposed``,
    HF's ``down_proj``) ``[E, d, n]``, checked against ``dout [T, d]``."""
    require(w.dim() == 3 and dout.dim() == 2,
            lambda: f"expected {layout} and dout [T, d], got {tuple(w.shape)} and {tuple(dout.shape)}")
    E, a, b = w.shape
    n, d = (b, a) if transposed else (a, b)
    require(dout.shape[1] == d, lambda: f"dout has d={dout.shape[1]} columns but the weight is {layout} = "
                                        f"{tuple(w.shape)}")
    return E, n, d


def _dswiglu(step: Step, w_map, dout, gather_idx, w, h, row_scale, offs, E: int, n: int, d: int, validate: bool):
    """The checks and the launch of 06_2 or 10_2; ``w_map()`` makes the weight's tensor map."""
    check_hopper_inputs(
        {"dout": dout, "gather_idx": gather_idx, "w_down": w, "h": h, "row_scale": row_scale, "offs": offs},
        {"dout": 2, "gather_idx": 1, "w_down": 3, "h": 2, "row_scale": 1, "offs": 1},
        {"gather_idx": torch.int32, "row_scale": torch.float32, "offs": torch.int32})
    T = dout.shape[0]
    R = gather_idx.numel()
    require(h.shape == (R, 2 * n), lambda: f"h must be [R, 2n] = ({R}, {2 * n}), got {tuple(h.shape)}")
    require(row_scale.shape == (R,), lambda: f"row_scale must be [R] = ({R},), got {tuple(row_scale.shape)}")
    check_tile_multiples(step, n, d, names=("n", "d"))
    require(check_expert_offsets(offs, R, validate) == E,
            lambda: f"offs must hold one end row per expert: {E}, got {offs.numel()}")
    check_gather_idx(gather_idx, R, T, validate)
    dh = torch.empty(R, 2 * n, device=dout.device, dtype=torch.bfloat16)
    sa = torch.empty(R, n, device=dout.device, dtype=torch.bfloat16)
    ds_part = torch.empty(n // step.block_n, R, device=dout.device, dtype=torch.float32)  # one share per N-tile
    if R:
        module = kernels.load(step.source, defines=step.defines)
        args = (w_map(), ptr(dout), ptr(gather_idx), ptr(h), ptr(row_scale), ptr(dh), ptr(sa), ptr(ds_part))
        launch_persistent(step, module, args, offs, R, d, (R, n, d, T))
    return dh, sa, ds_part.sum(0)


@kernels.on_torch_stream
def weight_grad(dy, x, gather_idx, offs, validate: bool = True, step: Step = WEIGHT_GRAD):
    """``dW[e] = dy[rows of e]^T @ x[gather_idx[rows of e]]``, ``[E, N, K]`` bf16 (fp32 sums):
    ``dy [R, N]`` sorted by expert, ``x [T, K]`` (``gather_idx`` None: ``x`` is ``[R, K]``, row r
    itself). An expert with no rows gets zeros (``kernels/06_3_weight_grad.cu``). N a multiple
    of 256, K of 128. ``step``: another build of ``06_3`` (other ``defines`` and shared memory,
    for experiments), or chapter 10's: 10_4 stores ``dW`` in HF's gate | up halves, 10_5
    (:data:`HF_DOWN_WEIGHT_GRAD`) each ``dW[e]`` transposed, ``[E, K, N]``."""
    tensors = {"dy": dy, "x": x, "offs": offs} | ({"gather_idx": gather_idx} if gather_idx is not None else {})
    check_hopper_inputs(tensors, {"dy": 2, "x": 2, "offs": 1, "gather_idx": 1},
                        {"offs": torch.int32, "gather_idx": torch.int32})
    R, N = dy.shape
    T, K = x.shape
    E = check_expert_offsets(offs, R, validate)
    check_tile_multiples(step, N, K)
    if gather_idx is None:
        require(T == R, lambda: f"without gather_idx, x must have dy's {R} rows, got {T}")
    else:
        check_gather_idx(gather_idx, R, T, validate)
    # 10_5 stores each dW[e] transposed, (K, N); the others (N, K)
    dw = torch.empty((E, K, N) if step is HF_DOWN_WEIGHT_GRAD else (E, N, K), device=dy.device, dtype=torch.bfloat16)
    fn = kernels.load(step.source, defines=step.defines).get_function(step.kernel)
    fn.max_dynamic_shared_size_bytes = step.smem_bytes
    i32 = np.int32
    idx = ptr(gather_idx) if gather_idx is not None else np.uint64(0)
    # dy's rows arrive a slice of block_m rows at a time (a map is needed even with no rows)
    dy_map = tma.tensor_map_2d(dy if R else dy.new_zeros(step.block_m, N), step.block_m)
    if step is HF_WEIGHT_GRAD:  # rows of dW interleaved like dh's columns, stored in HF's gate | up halves
        require(N % 2 == 0, lambda: f"dh must have 2I columns (gate and up interleaved), got {N}")
        dw_map = tma.tensor_map_gate_up(dw, EPILOGUE_BOX_ROWS)
    else:
        dw_map = tma.tensor_map_2d(dw, EPILOGUE_BOX_ROWS)
    fn((info().sm_count,), (step.threads,),
       (dy_map, ptr(x), idx, dw_map, ptr(offs), i32(E), i32(R), i32(N), i32(K), i32(T)), shared_mem=step.smem_bytes)
    return dw


def hf_weight_grad_down(sa, dout, gather_idx, offs, validate: bool = True):
    """The gradient of HF's ``down_proj (E, H, I)`` in its own layout, ``dout_e^T (s A)_e``, from
    ``sa [R, I]`` (sorted rows) and ``dout [T, H]`` gathered by ``gather_idx``
    (``kernels/10_5_hf_down_weight_grad.cu``): :func:`weight_grad`'s ``(s A)_e^T dout_e`` stored
    transposed, with no sorted copy of ``dout``. I a multiple of 256, H of 128."""
    return weight_grad(sa, dout, gather_idx, offs, validate, step=HF_DOWN_WEIGHT_GRAD)


def hf_weight_grad_gate_up(dh, x, gather_idx, offs, validate: bool = True):
    """The gradient of HF's ``gate_up_proj (E, 2I, H)`` in its own order (gate rows, then up
    rows) from ``dh [R, 2I]`` interleaved like H (``kernels/10_4_hf_weight_grad.cu``): what
    :func:`weight_grad` gives, its rows put back in gate_up_proj's order by the store."""
    return weight_grad(dh, x, gather_idx, offs, validate, step=HF_WEIGHT_GRAD)


@kernels.on_torch_stream
def decode_grouped_gemm(x_slots, w, count, out=None, step: int = 2, chunk: int | None = None):
    """``y[e, s] = x_slots[e, s] @ w[e].T`` for the filled slots ``s < count[e]`` of each expert:
    ``x_slots [E, C, K]`` (the masked layout; ``C`` one of :data:`DECODE_SLOTS`), ``w [E, N, K]``,
    ``count [E]`` int32 on the GPU, read there (no host sync: the launch can be captured in a CUDA
    graph). Returns ``y [E, C, N]`` bf16; rows past an expert's count are not written, and an
    expert with no tokens is not read. N a multiple of 128, K of 64. ``step``: 2
    (``kernels/09_2_decode_slot_chunks.cu``, only the chunks of slots that hold a token are
    multiplied), 1 (``kernels/09_1_decode_swap_ab.cu``, every slot) or 3
    (``kernels/09_3_decode_slot_split.cu``, 09_2's chunks of 32 split over blocks of
    :data:`DECODE_SPLIT_SLOTS` slots; ``C`` 128 or 256). ``chunk``: 09_2's chunk of slots,
    :data:`DECODE_CHUNK` (default) or :data:`DECODE_WIDE_CHUNK` (at more slots than that)."""
    require(step in DECODE_GEMMS, lambda: f"step must be one of {tuple(DECODE_GEMMS)} (09_1, 09_2, 09_3), got {step!r}")
    require(chunk in (None, DECODE_CHUNK, DECODE_WIDE_CHUNK) and (chunk is None or step == 2),
            lambda: f"chunk is 09_2's (step=2): {DECODE_CHUNK} or {DECODE_WIDE_CHUNK}, got {chunk!r} at step {step}")
    check_hopper_inputs({"x_slots": x_slots, "w": w, "count": count}, {"x_slots": 3, "w": 3, "count": 1},
                        {"count": torch.int32})
    E, C, K = x_slots.shape
    Ew, N, Kw = w.shape
    require(Ew == E and Kw == K, lambda: f"x_slots is [E, C, K] = {tuple(x_slots.shape)} but w is [E, N, K] = "
                                         f"{tuple(w.shape)}: E or K differs")
    require(count.numel() == E, lambda: f"count must hold one number per expert: {E}, got {count.numel()}")
    require(C in DECODE_SLOTS, lambda: f"the token slots per expert (C) must be one of {DECODE_SLOTS}, got {C}")
    require(step != 3 or C in DECODE_SPLIT_STEPS,
            lambda: f"09_3 (step=3) splits more token slots than one block of {DECODE_SPLIT_SLOTS} holds: C must be "
                    f"one of {tuple(DECODE_SPLIT_STEPS)}, got {C} (09_2 does the rest)")
    wide = chunk == DECODE_WIDE_CHUNK
    require(not wide or C in DECODE_WIDE_CHUNK_STEPS,
            lambda: f"chunks of {DECODE_WIDE_CHUNK} need more token slots than that (C > {DECODE_WIDE_CHUNK}); "
                    f"got C={C}")
    kernel = DECODE_WIDE_CHUNK_STEPS[C] if wide else DECODE_GEMMS[step][C]
    require(N % DECODE_ROWS == 0 and K % SLICE_K == 0,
            lambda: f"{kernel.name} needs N % {DECODE_ROWS} == 0 and K % {SLICE_K} == 0; got N={N}, K={K}")
    y = torch.empty(E, C, N, device=w.device, dtype=torch.bfloat16) if out is None else out
    check_out(y.view(E * C, N), E * C, N)
    if out is not None:  # 09_2's and 09_3's epilogues write 16-byte vectors
        check_bf16_cuda("out", out)
    fn = kernels.load(kernel.source, defines=kernel.defines).get_function(kernel.kernel)
    fn.max_dynamic_shared_size_bytes = kernel.smem_bytes
    x_box = C if step == 1 else min(C, chunk or DECODE_CHUNK)  # 09_2 and 09_3 load a chunk of slots per copy
    groups = C // DECODE_SPLIT_SLOTS if step == 3 else 1  # 09_3: a block per group of slots, the fastest index
    fn((N // DECODE_ROWS * groups, E), (kernel.threads,),
       (tma.tensor_map_2d(w, DECODE_ROWS), tma.tensor_map_2d(x_slots, x_box), ptr(y), ptr(count), np.int32(N),
        np.int32(K)), shared_mem=kernel.smem_bytes)
    return y


@kernels.on_torch_stream
def combine(rows, pos, weights, validate: bool = True):
    """``out[t] = sum_j weights[t, j] * rows[pos[t, j]]`` (``weights`` None: all ones), fp32
    sums, bf16 out (``kernels/06_4_combine.cu``). ``rows [R, d]``, ``pos [T, k]`` int32 (a
    position outside ``rows``: a dropped pair, adds nothing), ``weights [T, k]`` fp32."""
    tensors = {"rows": rows, "pos": pos} | ({"weights": weights} if weights is not None else {})
    check_hopper_inputs(tensors, {"rows": 2, "pos": 2, "weights": 2}, {"pos": torch.int32, "weights": torch.float32})
    T, k = pos.shape
    R, d = rows.shape
    require(d % 8 == 0, lambda: f"rows must have a multiple of 8 columns (16-byte loads), got {d}")
    require(weights is None or weights.shape == (T, k),
            lambda: f"weights must be [T, k] = ({T}, {k}), got {None if weights is None else tuple(weights.shape)}")
    out = torch.empty(T, d, device=rows.device, dtype=torch.bfloat16)
    if T:
        fn = kernels.load(COMBINE.source).get_function(COMBINE.kernel)
        fn((T,), (COMBINE.threads,), (ptr(rows), ptr(pos), ptr(weights) if weights is not None else np.uint64(0),
                                      ptr(out), np.int32(k), np.int32(d), np.int32(R)))
    return out


# --------------------------------------------------------------------------------------------
# 07_1, 07_2: FP8 (chapter 07): activations quantised in 1 x 128 groups, weights in 128 x 128
# blocks (moe_course.fp8 is the maths, on any machine; these are its kernels)

FP8_GROUP = 128  # values of K per scale (and rows of W per scale): DeepSeek-V3's blocks
FP8_SCALE_ALIGN = 4  # the scales' rows are padded to 4 floats: TMA reads rows of 16-byte multiples
FP8_STAGES = 5  # 07_2_fp8_grouped_gemm.cu's STAGES
FP8_SLOT_BYTES = 32 * 1024  # its Fp8Slot: 128 + 128 rows of 128 bytes
QUANTIZE = Step("07_1_quantize_1x128", "quantize_1x128", "to e4m3 in 1 x 128 groups, rows gathered",
                threads=256, min_cc=(8, 9), k_multiple=FP8_GROUP)
FP8_GEMM = Step("07_2_fp8_grouped_gemm", "fp8_grouped_gemm", "block-scaled FP8 grouped GEMM, promoted every 128 of K",
                WGMMA_BLOCK_M, FP8_GROUP, FP8_GROUP, threads=384, min_cc=HOPPER, persistent=True, tma=True,
                smem_bytes=FP8_STAGES * FP8_SLOT_BYTES + 2 * STAGING_BYTES + 32 * FP8_STAGES + 8 + 1024)
#: 07_2 with 128 x 256 tiles, each consumer running two m64n128 halves through one accumulator,
#: so a tile reads W's slice once for 128 rows and X's once for 256 columns: the same bytes out,
#: 11-17% faster on the four shapes (H200, session 15; kernels/NOTES.md). The default wherever N
#: divides by 256 (:func:`fp8_gemm_step`).
FP8_WIDE_STAGES = 4
FP8_GEMM_WIDE = Step("07_2_fp8_grouped_gemm", "fp8_grouped_gemm", "07_2 with 128 x 256 tiles",
                     WGMMA_BLOCK_M, 2 * FP8_GROUP, FP8_GROUP, threads=384, min_cc=HOPPER, persistent=True, tma=True,
                     smem_bytes=FP8_WIDE_STAGES * 48 * 1024 + 2 * STAGING_BYTES + 32 * FP8_WIDE_STAGES + 8 + 1024,
                     defines={"BN": 256})
FP8_SWIGLU_STAGES = 4  # 07_3_fp8_swiglu_quantize.cu's STAGES
FP8_SWIGLU_SLOT_BYTES = 40 * 1024  # its Fp8SwigluSlot: 64 + 256 rows of 128 bytes
FP8_SWIGLU = Step("07_3_fp8_swiglu_quantize", "fp8_swiglu_quantize",
                  "FP8 up-projection, SwiGLU and its e4m3 quantisation in the epilogue",
                  64, 2 * FP8_GROUP, FP8_GROUP, threads=384, min_cc=HOPPER, persistent=True, tma=True,
                  smem_bytes=FP8_SWIGLU_STAGES * FP8_SWIGLU_SLOT_BYTES + 2 * STAGING_BYTES + 32 * FP8_SWIGLU_STAGES
                  + 8 + 1024)
FP8_GATHER = Step("07_4_fp8_gather", "fp8_gather_swiglu_quantize", "07_3 with the token rows gathered in the load",
                  64, 2 * FP8_GROUP, FP8_GROUP, threads=384, min_cc=HOPPER, persistent=True, tma=True,
                  smem_bytes=FP8_SWIGLU.smem_bytes)
QUANTIZE_BLOCKS_PER_SM = 8  # 07_1: 64 resident warps an SM keep enough 16-byte loads in flight


def fp8_scales_width(rows: int) -> int:
    """The row length of the transposed activation scales ``[K / 128, width]``: ``rows``,
    padded to a multiple of FP8_SCALE_ALIGN."""
    return -(-rows // FP8_SCALE_ALIGN) * FP8_SCALE_ALIGN


@kernels.on_torch_stream
def quantize_1x128(x, gather_idx=None, validate: bool = True):
    """``x [T, K]`` bf16 (rows ``gather_idx`` of it, if given) to ``(q, scales)``: ``q [R, K]``
    ``float8_e4m3fn`` and ``scales [K / 128, width]`` float32, **transposed** (``scales[g, r]``
    is row r's scale for columns ``128 g .. 128 g + 127``; width padded by
    :func:`fp8_scales_width`, the padding 1): bit for bit what
    :func:`moe_course.fp8.quantize_groups` gives, whose scales are ``scales[:, :R].T``
    (``kernels/07_1_quantize_1x128.cu``). ``validate`` reads back whether a row held an inf or
    NaN (one synchronisation) and names it; an index of ``gather_idx`` outside ``x``: a zero row."""
    check_tensor_types({"x": (x, torch.bfloat16, 2)})
    T, K = x.shape
    if gather_idx is not None:
        check_tensor_types({"gather_idx": (gather_idx, torch.int32, 1)})
    tensors = {"x": x} | ({"gather_idx": gather_idx} if gather_idx is not None else {})
    check_on_gpu(tensors)
    require(K % FP8_GROUP == 0, lambda: f"x has K={K} columns, not a multiple of {FP8_GROUP}: a group of 128 "
                                        "must not straddle two rows (pad K)")
    check_gpu_at_least(QUANTIZE.min_cc, lambda cc: f"the e4m3 conversion needs compute capability 8.9 or later; "
                                                   f"this GPU is {cc[0]}.{cc[1]}")
    R = T if gather_idx is None else gather_idx.numel()
    require(R * (K // FP8_GROUP) < 2**30, lambda: f"{R} rows x {K // FP8_GROUP} groups: too many for one launch")
    if validate and gather_idx is not None:
        check_gather_range(gather_idx, T)
    width = fp8_scales_width(R)
    q = torch.empty(R, K, device=x.device, dtype=torch.float8_e4m3fn)
    scales = torch.empty(K // FP8_GROUP, width, device=x.device, dtype=torch.float32)
    scales[:, R:] = 1.0  # the padding: read for 07_2's rows past M, never used
    first_bad = torch.full((1,), 2**31 - 1, device=x.device, dtype=torch.int32)
    if R and K:
        fn = kernels.load(QUANTIZE.source).get_function(QUANTIZE.kernel)
        half_warps = R * (K // FP8_GROUP)
        blocks = max(1, min(-(-half_warps // (QUANTIZE.threads // 16)), info().sm_count * QUANTIZE_BLOCKS_PER_SM))
        fn((blocks,), (QUANTIZE.threads,), (ptr(x), ptr(gather_idx) if gather_idx is not None else np.uint64(0),
                                             np.int32(R), np.int32(K), np.int32(T), ptr(q), ptr(scales),
                                             np.int32(width), ptr(first_bad)))
    if validate:
        row = int(first_bad)
        require(row >= R, lambda: f"x holds an inf or NaN in row {row if gather_idx is None else int(gather_idx[row])}"
                                  f"{'' if gather_idx is None else f' (sorted row {row})'}: no scale fits it; check "
                                  "what produced it")
    return q, scales


def _check_fp8_gemm(step: Step, x_q, x_scales, w_q, w_scales, offs, validate: bool,
                    rows: int | None = None) -> tuple[int, int, int]:
    """The inputs of 07_2 to 07_4 (one message per mistake), and (M, N, K): M the GEMM's rows,
    ``rows`` where they are gathered from x_q's (07_4), else x_q's."""
    e4m3 = torch.float8_e4m3fn
    check_tensor_types({"x_q": (x_q, e4m3, 2), "x_scales": (x_scales, torch.float32, 2), "w_q": (w_q, e4m3, 3),
                        "w_scales": (w_scales, torch.float32, 3), "offs": (offs, torch.int32, 1)})
    M, K = x_q.shape
    E, N, Kw = w_q.shape
    require(Kw == K, lambda: f"x_q has K={K} columns but w_q is [E, N, K] = {tuple(w_q.shape)}: K differs")
    check_tile_multiples(step, N, K)
    groups = K // FP8_GROUP
    require(x_scales.shape[0] == groups and x_scales.shape[1] >= M and x_scales.shape[1] % FP8_SCALE_ALIGN == 0,
            lambda: f"x_scales must be [K / 128, width] = ({groups}, >= {M}, a multiple of {FP8_SCALE_ALIGN}) "
                    f"(transposed, as quantize_1x128 writes them), got {tuple(x_scales.shape)}")
    require(tuple(w_scales.shape) == (E, N // FP8_GROUP, groups),
            lambda: f"w_scales must be [E, N / 128, K / 128] = ({E}, {N // FP8_GROUP}, {groups}), "
                    f"got {tuple(w_scales.shape)}")
    require(offs.numel() == E, lambda: f"offs must hold one end row per expert: {E} values, got {offs.numel()}")
    require(E <= MAX_EXPERTS, lambda: f"at most {MAX_EXPERTS} experts, got {E}")
    check_on_gpu({"x_q": x_q, "x_scales": x_scales, "w_q": w_q, "w_scales": w_scales, "offs": offs})
    check_gpu_at_least(HOPPER, lambda cc: f"{step.source} needs a Hopper GPU (FP8 wgmma, TMA); "
                                          f"this one is {cc[0]}.{cc[1]}")
    if validate:
        check_offsets(offs, M if rows is None else rows)
        check_positive(x_scales[:, :M], "x_scales")
        check_positive(w_scales, "w_scales")
    return (M if rows is None else rows), N, K


def fp8_gemm_step(n: int) -> Step:
    """07_2's build for an output ``n`` wide: 128 x 256 tiles where ``n`` divides by 256, else
    128 x 128."""
    return FP8_GEMM_WIDE if n % FP8_GEMM_WIDE.block_n == 0 else FP8_GEMM


@kernels.on_torch_stream
def fp8_grouped_gemm(x_q, x_scales, w_q, w_scales, offs, out=None, validate: bool = True, step: Step | None = None):
    """``y[rows of e] = (x_q * x_scales)[rows of e] @ (w_q[e] * w_scales[e]).T`` in bf16
    (``kernels/07_2_fp8_grouped_gemm.cu``): ``x_q [M, K]`` e4m3 with ``x_scales [K / 128, width]``
    as :func:`quantize_1x128` gives them, ``w_q [E, N, K]`` e4m3 with ``w_scales [E, N / 128,
    K / 128]`` as :func:`moe_course.fp8.quantize_blocks` gives them. N and K multiples of 128.
    ``validate`` also checks the offsets and that every scale is positive and finite (a
    synchronisation; benchmarks turn it off). ``step``: 07_2's build, :func:`fp8_gemm_step` by default."""
    M, N, K = _check_fp8_gemm(step or FP8_GEMM, x_q, x_scales, w_q, w_scales, offs, validate)
    step = step or fp8_gemm_step(N)
    if out is None:
        out = torch.empty(M, N, device=x_q.device, dtype=torch.bfloat16)
    else:
        check_out(out, M, N)
    if M:
        module = kernels.load(step.source, defines=step.defines)
        head = (tma.tensor_map_fp8(x_q, step.block_m), tma.tensor_map_fp8(w_q, step.block_n),
                ptr(x_scales), np.int32(x_scales.shape[1]), ptr(w_scales), ptr(out))
        launch_persistent(step, module, head, offs, M, K, (M, N, K))
    return out


@kernels.on_torch_stream
def fp8_swiglu_quantize(x_q, x_scales, w_q, w_scales, offs, validate: bool = True, step: Step = FP8_SWIGLU):
    """The FP8 up-projection with SwiGLU, its output quantised for the down-projection
    (``kernels/07_3_fp8_swiglu_quantize.cu``): ``h = (x_q * x_scales) @ (w_q[e] * w_scales[e]).T``
    with ``w_q [E, 2n, K]``'s rows interleaved (gate_j, up_j), ``a = silu(gate) * up`` in fp32,
    and ``(a_q [M, n] e4m3, a_scales [n / 128, width])``, what :func:`quantize_1x128` would give
    for ``a`` (1 x 128 groups, transposed scales, the padding 1). Inputs as
    :func:`fp8_grouped_gemm`'s; 2n a multiple of 256. ``step``: another build of 07_3 (other
    ``defines``, the same tile), as benchmarks try one."""
    M, N, K = _check_fp8_gemm(step, x_q, x_scales, w_q, w_scales, offs, validate)
    width = fp8_scales_width(M)
    a_q = torch.empty(M, N // 2, device=x_q.device, dtype=torch.float8_e4m3fn)
    a_scales = torch.empty(N // 2 // FP8_GROUP, width, device=x_q.device, dtype=torch.float32)
    a_scales[:, M:] = 1.0  # the padding, as quantize_1x128 writes it
    if M:
        module = kernels.load(step.source, defines=step.defines)
        head = (tma.tensor_map_fp8(x_q, step.block_m), tma.tensor_map_fp8(w_q, step.block_n),
                ptr(x_scales), np.int32(x_scales.shape[1]), ptr(w_scales), ptr(a_q), ptr(a_scales), np.int32(width))
        launch_persistent(step, module, head, offs, M, K, (M, N, K))
    return a_q, a_scales


@kernels.on_torch_stream
def fp8_gather_swiglu_quantize(x_q, x_scales, gather_idx, w_q, w_scales, offs, validate: bool = True,
                               step: Step = FP8_GATHER):
    """:func:`fp8_swiglu_quantize` on rows ``gather_idx`` of ``x_q [T, K]`` (the layer's tokens,
    quantised once by :func:`quantize_1x128` without a gather: ``x_scales [K / 128, width(T)]``),
    read inside the kernel (``kernels/07_4_fp8_gather.cu``): the same ``(a_q [M, n], a_scales)``
    for ``M = len(gather_idx)`` sorted rows, bit for bit, without the gathered copy. An index
    outside ``x_q``: a zero row (``validate`` names it instead). ``step``: another build of 07_4."""
    check_tensor_types({"gather_idx": (gather_idx, torch.int32, 1)})
    M = gather_idx.numel()
    _, N, K = _check_fp8_gemm(step, x_q, x_scales, w_q, w_scales, offs, validate, rows=M)
    check_on_gpu({"gather_idx": gather_idx})
    T = x_q.shape[0]
    if validate:
        check_gather_range(gather_idx, T)
    width = fp8_scales_width(M)
    a_q = torch.empty(M, N // 2, device=x_q.device, dtype=torch.float8_e4m3fn)
    a_scales = torch.empty(N // 2 // FP8_GROUP, width, device=x_q.device, dtype=torch.float32)
    a_scales[:, M:] = 1.0
    if M:
        module = kernels.load(step.source, defines=step.defines)
        head = (tma.tensor_map_fp8(w_q, step.block_n), ptr(x_q), ptr(gather_idx), np.int32(T), ptr(x_scales),
                np.int32(x_scales.shape[1]), ptr(w_scales), ptr(a_q), ptr(a_scales), np.int32(width))
        launch_persistent(step, module, head, offs, M, K, (M, N, K))
    return a_q, a_scales


# --------------------------------------------------------------------------------------------
# The table: every kernel file, its Step and its launcher

KERNEL_FILES: dict[str, tuple[Step, object]] = {
    SCALE.source: (SCALE, scale),
    **{s.source: (s, grouped_gemm) for name, s in STEPS.items() if name in LADDER},
    GATHER.source: (GATHER, gather_grouped_gemm),
    SWIGLU.source: (SWIGLU, swiglu_grouped_gemm),
    ROUTING.source: (ROUTING, route_tokens),
    TRANSPOSED_B.source: (TRANSPOSED_B, transposed_b_grouped_gemm),
    DSWIGLU.source: (DSWIGLU, dswiglu_grouped_gemm),
    WEIGHT_GRAD.source: (WEIGHT_GRAD, weight_grad),
    COMBINE.source: (COMBINE, combine),
    HF_SWIGLU.source: (HF_SWIGLU, hf_swiglu_grouped_gemm),
    HF_DSWIGLU.source: (HF_DSWIGLU, hf_dswiglu_grouped_gemm),
    HF_TRANSPOSED_B.source: (HF_TRANSPOSED_B, hf_transposed_b_grouped_gemm),
    HF_WEIGHT_GRAD.source: (HF_WEIGHT_GRAD, hf_weight_grad_gate_up),
    HF_DOWN_WEIGHT_GRAD.source: (HF_DOWN_WEIGHT_GRAD, hf_weight_grad_down),
    DECODE_STEPS[64].source: (DECODE_STEPS[64], decode_grouped_gemm),
    DECODE_CHUNKED_STEPS[256].source: (DECODE_CHUNKED_STEPS[256], decode_grouped_gemm),
    DECODE_SPLIT_STEPS[256].source: (DECODE_SPLIT_STEPS[256], decode_grouped_gemm),
    QUANTIZE.source: (QUANTIZE, quantize_1x128),
    FP8_GEMM.source: (FP8_GEMM, fp8_grouped_gemm),
    FP8_SWIGLU.source: (FP8_SWIGLU, fp8_swiglu_quantize),
    FP8_GATHER.source: (FP8_GATHER, fp8_gather_swiglu_quantize),
}
