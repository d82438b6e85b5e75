"""Chapter 02: the grouped GEMM of an MoE layer, its baselines, its problems, and the
check-then-time runner behind ``benchmarks/bench_grouped_gemm.py``.

The problem: rows of ``x`` are sorted by expert, ``offs[e]`` is the end row of expert ``e``
(as ``torch._grouped_mm`` takes it), and for every expert::

    y[start_e:end_e] = x[start_e:end_e] @ w[e].T      # x [M, K], w [E, N, K], y [M, N], bf16

The course's kernels for it, the ladder's :data:`STEPS`, and their launches (every input
checked first) are in :mod:`moe_course.launch`; the names this chapter's notebook uses are
handed on below.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .bench import benchmark, interleaved
from .checking import relative_error
from .checks import check_choice, check_device, check_int, check_offsets, require
# the ladder and its launcher, where every kernel's launch lives; handed on for chapter 02's notebook
from .launch import BEST as BEST
from .launch import CHAPTER02_BEST as CHAPTER02_BEST
from .launch import STEPS, grouped_gemm
from .launch import chapter_steps as chapter_steps
from .records import finite_or_none


# ----------------------------------------------------------------------------- baselines


def _check_end_rows(x, w, offs) -> None:
    """One end row per expert, non-decreasing, the last one ``x``'s row count (the host reads
    them anyway: the two functions below loop over them)."""
    require(offs.numel() == w.shape[0], lambda: f"offs must hold one end row per expert: {w.shape[0]} values, "
                                                f"got {offs.numel()}")
    check_offsets(offs, x.shape[0])


def reference(x, w, offs):
    """float32 result, one torch.mm per expert, computed from the bf16 inputs (the offsets
    checked first: every check of the course's kernels trusts this result)."""
    _check_end_rows(x, w, offs)
    y = torch.zeros(x.shape[0], w.shape[1], device=x.device, dtype=torch.float32)
    start = 0
    for e, end in enumerate(offs.cpu().tolist()):
        if end > start:
            y[start:end] = x[start:end].float() @ w[e].float().T
        start = end
    return y


def torch_loop(x, w, offs, out=None):
    """What a plain PyTorch MoE does: the host reads the counts, then one bf16 mm per expert."""
    _check_end_rows(x, w, offs)
    out = torch.empty(x.shape[0], w.shape[1], device=x.device, dtype=x.dtype) if out is None else out
    start = 0
    for e, end in enumerate(offs.cpu().tolist()):
        if end > start:
            torch.mm(x[start:end], w[e].T, out=out[start:end])
        start = end
    return out


def torch_grouped_mm(x, w, offs):
    """PyTorch's grouped GEMM (CUTLASS on sm90): takes w as [E, K, N], here a transposed view."""
    return torch._grouped_mm(x, w.transpose(1, 2), offs=offs)


# ----------------------------------------------------------------------------- problems


def routed_experts(tokens: int, experts: int, top_k: int, skew: float = 0.0, seed: int = 0):
    """The experts ``(tokens, top_k)`` token-choice top-k picks from random router logits, on the CPU.

    ``skew`` biases the router towards low-numbered experts (logit bias ``-skew * log(1 + e)``):
    0 gives near-uniform counts, 1 a heavily loaded few, as real routers do early in training.
    """
    g = torch.Generator().manual_seed(seed)
    bias = -skew * torch.log1p(torch.arange(experts, dtype=torch.float32))
    return (torch.randn(tokens, experts, generator=g) + bias).topk(top_k, dim=1).indices


def expert_counts(tokens: int, experts: int, top_k: int, skew: float = 0.0, seed: int = 0):
    """Rows per expert after :func:`routed_experts`."""
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
    counts = torch.as_tensor(counts)
    require(counts.dim() == 1 and not counts.is_floating_point() and counts.dtype != torch.bool,
            lambda: f"counts must be a 1-D list of whole numbers (rows per expert), got {counts.dtype} "
                    f"of shape {tuple(counts.shape)}", TypeError)
    require(counts.numel() >= 1 and int(counts.min()) >= 0,
            lambda: f"counts (rows per expert) must be >= 0, one per expert; got {counts.tolist()[:16]}")
    counts = counts.long()
    check_int(d_in, "d_in", 1)
    check_int(d_out, "d_out", 1)
    check_device(device)
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
#: What measure_ladder checks and times, in table order: the two baselines, then every step
IMPLEMENTATIONS = list(BASELINES) + list(STEPS)
MAX_REL_ERR = 1e-2  # bf16 output against a float32 reference


def _reps_for(fn, budget_ms: float = 200.0) -> tuple[int, int]:
    """(reps, warm-up calls): a stable median for fast kernels, without spending minutes on
    the naive steps (a call of seconds is timed once; this probe call was its warm-up)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = (time.perf_counter() - t0) * 1e3
    return int(min(100, max(1, budget_ms / max(once, 1e-3)))), (0 if once > 100 else 3)


def implementation(impl: str):
    """``fn(x, w, offs)`` for a baseline's name or a step's (steps launched without the host check)."""
    check_choice(impl, "implementation", IMPLEMENTATIONS)
    return BASELINES.get(impl) or (lambda x, w, o, s=impl: grouped_gemm(x, w, o, step=s, validate=False))


def check_result(fn, x, w, offs, ref) -> dict:
    """``rel_err`` of ``fn`` against ``ref``, and an ``error`` when it is too large: a wrong result
    is reported, never timed."""
    err = relative_error(fn(x, w, offs), ref)
    if err < MAX_REL_ERR:
        return {"rel_err": err}
    return {"rel_err": finite_or_none(err), "error": f"wrong result: relative error {err:.3g}"}


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
    impls = list(impls or IMPLEMENTATIONS)
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
