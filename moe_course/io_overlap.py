"""Chapter 03's maths and measurements: the layer's own inputs for its gathered kernels
(``kernels/03_3_gather.cu``: token rows gathered inside the load; ``kernels/03_4_swiglu.cu``:
the up-projection with SwiGLU in its epilogue), their references and baselines, and the
pipeline measurements (03_1's ring of 1 to 4 slots, traced timelines, the fused gather).
The kernels' launches are in :mod:`moe_course.launch`; the names chapter 03's notebook uses
are handed on below.

Conventions, as in chapter 02: ``w`` is ``[E, N, K]`` (each expert's weight stored like
``nn.Linear``'s), ``offs[e]`` the end row of expert ``e`` in the expert-sorted order. What is
new: ``x`` is the *token* matrix ``[T, K]``, and ``gather_idx[r]`` the token that sorted row ``r``
reads (with top-k routing every token appears k times).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from . import kernels
from .bench import interleaved
from .checking import relative_error
from .grouped_gemm import (MAX_REL_ERR, check_result, expert_counts, make_problem, reference, routed_experts,
                           time_interleaved, torch_grouped_mm)
# chapter 03's kernels and their launchers, where every kernel's launch lives; handed on for the notebook
from .launch import GATHER as GATHER
from .launch import SWIGLU as SWIGLU
from .launch import STEPS, Step, gather_grouped_gemm, grouped_gemm, pipeline_step, run_step, swiglu_grouped_gemm
from .records import finite_or_none

PLAIN = "03_2_warp_specialized"  # the same kernel on pre-permuted rows: the gather's yardstick


def routing_order(topk_experts, num_experts: int):
    """From top-k routing ``[T, k]`` to the expert-sorted order: ``(gather_idx, offs)``, int32.

    ``gather_idx[r]`` is the token of sorted row ``r``; rows of one expert keep token order."""
    flat = topk_experts.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    gather_idx = (order // topk_experts.shape[1]).to(torch.int32)
    offs = torch.cumsum(torch.bincount(flat, minlength=num_experts), 0).to(torch.int32)
    return gather_idx, offs


def interleave_gate_up(w_gate_up):
    """``[E, 2n, d]`` with the gate's n rows then the up-projection's n rows -> rows interleaved
    (gate_0, up_0, gate_1, up_1, ...), the layout 03_4's SwiGLU epilogue reads."""
    E, two_n, d = w_gate_up.shape
    if two_n % 2:
        raise ValueError(f"the gate-and-up weight needs an even number of rows, got {two_n}")
    n = two_n // 2
    return w_gate_up.view(E, 2, n, d).transpose(1, 2).reshape(E, two_n, d).contiguous()


def deinterleave(h):
    """``[..., 2n]`` interleaved columns -> ``(gate, up)``, each ``[..., n]``."""
    return h[..., 0::2], h[..., 1::2]


def swiglu_of(h):
    """``silu(gate) * up`` of an interleaved pre-activation ``h`` (what 03_4's epilogue writes)."""
    gate, up = deinterleave(h)
    return torch.nn.functional.silu(gate) * up


# ----------------------------------------------------------------------------- references and baselines


def gather_reference(x, gather_idx, w, offs):
    """float32 ``x[gather_idx[r]] @ w[e].T``, one torch.mm per expert."""
    return reference(x[gather_idx.long()], w, offs)


def swiglu_reference(x, gather_idx, w_interleaved, offs):
    """float32 ``(a, h)`` as :func:`swiglu_grouped_gemm` computes them."""
    h = gather_reference(x, gather_idx, w_interleaved, offs)
    return swiglu_of(h), h


def permute_then_gemm(x, gather_idx, w, offs, step: str = PLAIN):
    """What a layer does without a fused gather: write the sorted copy ``x[gather_idx]``, then
    run the GEMM on it."""
    return grouped_gemm(x.index_select(0, gather_idx), w, offs, step=step, validate=False)


def permute_then_grouped_mm(x, gather_idx, w, offs):
    """The same with PyTorch only: index_select, then ``torch._grouped_mm``."""
    return torch_grouped_mm(x.index_select(0, gather_idx), w, offs)


def gather_bytes_saved(tokens: int, top_k: int, d: int) -> int:
    """Bytes a fused gather does not move: the sorted copy of X (T*k rows of d bf16) written
    once and read back once, against X read in place."""
    return 2 * 2 * tokens * top_k * d


def example_routing(tokens: int, experts: int, top_k: int, skew: float = 0.0, seed: int = 0, device="cuda"):
    """Top-k routing of random logits (:func:`moe_course.grouped_gemm.routed_experts`), as
    ``(gather_idx, offs)`` on ``device``."""
    gather_idx, offs = routing_order(routed_experts(tokens, experts, top_k, skew, seed), experts)
    return gather_idx.to(device), offs.to(device)


# ----------------------------------------------------------------------------- measuring chapter 03

PIPELINE_STAGES = (1, 2, 3, 4)  # slots of 03_1's ring (launch.pipeline_step): 1 = no overlap at all


def trace_timeline(step: Step, x, w, offs, slices: int = 256, group_m: int | None = None) -> dict:
    """Run ``step`` compiled with ``-DTRACE`` (kernels/tma.cuh) and return block 0's timeline in
    microseconds from its first load: ``issued``, ``landed``, ``released`` per slice (None where
    a slice was not reached: a record holds no NaN) and ``stored`` per tile."""
    import cupy  # a GPU's: imported only where one runs

    traced = dataclasses.replace(step, defines={**step.defines, "TRACE": slices})
    module = kernels.load(traced.source, defines=traced.defines)
    buf = cupy.ndarray((4, slices), cupy.int64, module.get_global("trace"))
    buf.fill(-1)
    run_step(traced, x, w, offs, validate=False, module=module, group_m=group_m)
    cupy.cuda.Device().synchronize()
    t = buf.get().astype(np.float64)
    t[t < 0] = np.nan
    clock_hz = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["clockRate"] * 1e3
    t = (t - np.nanmin(t[0])) / clock_hz * 1e6
    times = [[finite_or_none(v) for v in row.tolist()] for row in t]
    return {"issued": times[0], "landed": times[1], "released": times[2], "stored": times[3],
            "clock_mhz": clock_hz / 1e6, "step": step.name}


def timeline_gaps(trace: dict) -> list[tuple[float, float, float]]:
    """The gaps between one slice's multiply and the next: ``(start, stored, end)`` in us, where
    ``stored`` is when a tile's epilogue finished inside the gap (else ``start``): from ``start`` to
    ``stored`` the consumers were storing a tile, from ``stored`` to ``end`` waiting for a slice."""
    landed = np.asarray(trace["landed"], dtype=float)
    released = np.asarray(trace["released"], dtype=float)
    stored = np.sort(np.asarray([t for t in trace.get("stored", []) if t is not None and t == t], dtype=float))
    gaps = []
    for i in range(1, len(landed)):
        start, end = released[i - 1], landed[i]
        if not (start == start and end == end) or end <= start:
            continue
        inside = stored[(stored > start) & (stored <= end)]
        gaps.append((float(start), float(inside[-1]) if len(inside) else float(start), float(end)))
    return gaps


def timeline_summary(trace: dict) -> dict:
    """From a timeline: time spent multiplying (landed -> released), storing tiles, and waiting
    for a slice that had not landed yet, over the slices traced (shares of the traced span)."""
    landed = np.asarray(trace["landed"], dtype=float)
    released = np.asarray(trace["released"], dtype=float)
    ok = ~np.isnan(landed) & ~np.isnan(released)
    if ok.sum() < 2:
        return {"slices": int(ok.sum()), "busy_us": float("nan"), "wait_us": float("nan"),
                "store_us": float("nan"), "span_us": float("nan"), "wait_share": float("nan"),
                "store_share": float("nan")}
    gaps = timeline_gaps(trace)
    span = float(released[ok][-1] - landed[ok][0])
    wait = sum(end - stored for _, stored, end in gaps)
    store = sum(stored - start for start, stored, _ in gaps)
    return {"slices": int(ok.sum()), "busy_us": float(np.sum(released[ok] - landed[ok])), "wait_us": wait,
            "store_us": store, "span_us": span, "wait_share": wait / span, "store_share": store / span}


def measure_pipeline(shapes: dict, stages=PIPELINE_STAGES, seed: int = 0, rounds: int = 5) -> list[dict]:
    """03_1 with 1..4 slots and 03_2 on each shape's up- and down-projection: TFLOP/s (timed
    interleaved), and the traced share of time the math waited for memory. Checked first."""
    rows = []
    for shape, (T, d, n, E, K) in shapes.items():
        counts = expert_counts(T, E, K, seed=seed)
        for proj in ("up", "down"):
            d_in, d_out = (d, 2 * n) if proj == "up" else (n, d)
            p = make_problem(counts, d_in, d_out, seed=seed)
            ref = reference(p.x, p.w, p.offs)
            variants = {f"03_1_tma, {s} slot{'s' if s > 1 else ''}": pipeline_step(s) for s in stages}
            variants["03_2_warp_specialized"] = STEPS["03_2_warp_specialized"]
            fns, by_label = {}, {}
            for label, step in variants.items():
                fn = lambda x, w, o, s=step: run_step(s, x, w, o, validate=False)
                row = {"shape": shape, "proj": proj, "impl": label, "stages": step.defines.get("STAGES", 4),
                       "M": p.x.shape[0], "N": d_out, "Kdim": d_in, "flops": p.flops}
                row.update(check_result(fn, p.x, p.w, p.offs, ref))
                if "error" not in row:
                    fns[label] = fn
                by_label[label] = row
                rows.append(row)
            timed = time_interleaved(fns, p.x, p.w, p.offs, flops=p.flops, bytes=p.bytes, rounds=rounds)
            for label in fns:
                row = by_label[label]
                row.update(timed[label])
                trace = trace_timeline(variants[label], p.x, p.w, p.offs)
                # None, not NaN, where too few slices were traced: a record holds finite numbers
                row.update({f"trace_{k}": finite_or_none(v) for k, v in timeline_summary(trace).items()})
                if shape == next(iter(shapes)) and proj == "up":
                    row["trace"] = trace
            del p, ref
    return rows


def measure_gather(shapes: dict, seed: int = 0, rounds: int = 5) -> list[dict]:
    """On each shape's up-projection: the same kernel on pre-permuted rows (03_2), with the
    gather fused (03_3), permute-then-GEMM, and PyTorch's permute + torch._grouped_mm; then the
    SwiGLU epilogue (03_4) against 03_3 + a separate activation. Checked first, then timed
    interleaved."""
    rows = []
    for shape, dims in shapes.items():
        rows += _measure_gather_shape(shape, *dims, seed=seed, rounds=rounds)
    return rows


def _measure_gather_shape(shape, T, d, n, E, K, seed, rounds) -> list[dict]:
    gather_idx, offs = example_routing(T, E, K, seed=seed)
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, d, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(E, 2 * n, d, device="cuda", generator=g) / d ** 0.5).to(torch.bfloat16)
    x_sorted = x.index_select(0, gather_idx)
    M = gather_idx.numel()
    flops = 2.0 * M * 2 * n * d
    ref = gather_reference(x, gather_idx, w, offs)
    ref_a = swiglu_of(ref)

    def separate_swiglu():  # 03_3 then the activation as its own pass over H
        return swiglu_of(gather_grouped_gemm(x, gather_idx, w, offs, validate=False))

    impls = {
        "03_2 on pre-permuted rows": lambda: grouped_gemm(x_sorted, w, offs, step=PLAIN, validate=False),
        "03_3 gather in the load": lambda: gather_grouped_gemm(x, gather_idx, w, offs, validate=False),
        "permute, then 03_2": lambda: permute_then_gemm(x, gather_idx, w, offs),
        "torch: permute, then _grouped_mm": lambda: permute_then_grouped_mm(x, gather_idx, w, offs),
        "torch._grouped_mm on pre-permuted rows": lambda: torch_grouped_mm(x_sorted, w, offs),
        "03_4 gather + SwiGLU (a and h)": lambda: swiglu_grouped_gemm(x, gather_idx, w, offs, validate=False),
        "03_4 gather + SwiGLU (a only)": lambda: swiglu_grouped_gemm(x, gather_idx, w, offs, store_h=False,
                                                                    validate=False),
        "03_3, then SwiGLU in torch": separate_swiglu,
    }
    checked, rows = {}, []
    for label, fn in impls.items():
        out = fn()
        swiglu = "SwiGLU" in label
        err = relative_error(out[0] if isinstance(out, tuple) else out, ref_a if swiglu else ref)
        row = {"shape": shape, "impl": label, "T": T, "d": d, "n": n, "E": E, "K": K, "M": M,
               "flops": flops, "rel_err": err, "bytes_saved_by_fusing_gather": gather_bytes_saved(T, K, d)}
        if err >= MAX_REL_ERR:
            row["error"] = f"wrong result: relative error {err:.3g}"
        else:
            checked[label] = fn
        rows.append(row)
    timed = interleaved(checked, rounds=rounds, reps=10, flops=flops)
    for row in rows:
        if m := timed.get(row["impl"]):
            row.update(m.timing())
    return rows
