"""Chapter 03's kernels that take an MoE layer's own inputs: token rows gathered inside the load
(``kernels/03_3_gather.cu``) and the up-projection with SwiGLU in its epilogue
(``kernels/03_4_swiglu.cu``). Steps 03_1 and 03_2 take the chapter 02 inputs and live in
:mod:`moe_course.grouped_gemm`'s ``STEPS``.

Conventions, as in chapter 02: ``w`` is ``[E, N, K]`` (each expert's weight stored like
``nn.Linear``'s), ``offs[e]`` the end row of expert ``e`` in the expert-sorted order. What is
new: ``x`` is the *token* matrix ``[T, K]``, and ``gather_idx[r]`` the token that sorted row ``r``
reads (with top-k routing every token appears k times).
"""

from __future__ import annotations

import numpy as np

import dataclasses

from . import kernels, tma
from .grouped_gemm import Step, _ws_smem, check_inputs, grouped_gemm, launch_persistent
from .kernels import ptr

GATHER = Step("03_3_gather", "gather_grouped_gemm", "X rows gathered in the load (cp.async)", 128, 256, 64,
              threads=384, min_cc=(9, 0), smem_bytes=_ws_smem(4), persistent=True, tma=True)
SWIGLU = Step("03_4_swiglu", "swiglu_grouped_gemm", "gathered up-projection + SwiGLU epilogue", 128, 256, 64,
              threads=384, min_cc=(9, 0), smem_bytes=_ws_smem(4), persistent=True, tma=True)
PLAIN = "03_2_warp_specialized"  # the same kernel on pre-permuted rows: the gather's yardstick


def routing_order(topk_experts, num_experts: int):
    """From top-k routing ``[T, k]`` to the expert-sorted order: ``(gather_idx, offs)``, int32.

    ``gather_idx[r]`` is the token of sorted row ``r``; rows of one expert keep token order."""
    import torch

    flat = topk_experts.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    gather_idx = (order // topk_experts.shape[1]).to(torch.int32)
    offs = torch.cumsum(torch.bincount(flat, minlength=num_experts), 0).to(torch.int32)
    return gather_idx, offs


def _check_gather(x, gather_idx, w, offs, step: Step, validate: bool):
    import torch

    if not isinstance(gather_idx, torch.Tensor) or gather_idx.dtype != torch.int32 or gather_idx.dim() != 1:
        raise TypeError("gather_idx must be a 1-D torch.int32 tensor (the token of each expert-sorted row)")
    if gather_idx.device != x.device or not gather_idx.is_contiguous():
        raise ValueError(f"gather_idx must be contiguous and on {x.device}, like x")
    M, N, K, E = check_inputs(x, w, offs, step, validate, rows=gather_idx.numel())
    if validate:
        check_gather_range(gather_idx, x.shape[0])
    return M, N, K, E


def check_gather_range(gather_idx, tokens: int) -> None:
    """Every index a row of the token matrix (one small copy to the host, a synchronisation;
    the kernels read a zero row for an index outside, only this says it was wrong)."""
    if gather_idx.numel():
        lo, hi = int(gather_idx.min()), int(gather_idx.max())
        if lo < 0 or hi >= tokens:
            raise ValueError(f"gather_idx must index rows of x (0..{tokens - 1}); got values {lo}..{hi}")


def _launch(step: Step, x, gather_idx, w, offs, outputs, M, N, K, group_m=None):
    module = kernels.load(step.source, defines=step.defines)
    launch_persistent(step, module, (tma.tensor_map_2d(w, step.block_n), ptr(x), ptr(gather_idx), *outputs),
                      offs, M, K, (M, N, K, x.shape[0]), group_m)


def gather_grouped_gemm(x, gather_idx, w, offs, out=None, validate: bool = True, step: Step = GATHER):
    """``y[r] = x[gather_idx[r]] @ w[e].T`` for the rows ``r`` of each expert ``e``, without
    writing ``x[gather_idx]`` anywhere. ``validate`` checks the offsets and indices on the host
    (a synchronisation; benchmarks turn it off). An index outside ``x`` reads a zero row."""
    import torch

    M, N, K, E = _check_gather(x, gather_idx, w, offs, step, validate)
    if out is None:
        out = torch.empty(M, N, device=x.device, dtype=torch.bfloat16)
    elif out.shape != (M, N) or out.dtype != torch.bfloat16 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous bf16 tensor of shape ({M}, {N})")
    if M and N:
        _launch(step, x, gather_idx, w, offs, (ptr(out),), M, N, K)
    return out


def swiglu_grouped_gemm(x, gather_idx, w_interleaved, offs, store_h: bool = True, validate: bool = True):
    """The up-projection of an MoE layer: ``(a, h)`` with ``h[r] = x[gather_idx[r]] @ w[e].T``
    (``[M, 2n]``, gate and up columns interleaved, or ``None`` when ``store_h`` is False) and
    ``a = silu(gate) * up`` (``[M, n]``). ``w_interleaved``: :func:`interleave_gate_up`'s."""
    import torch

    M, N, K, E = _check_gather(x, gather_idx, w_interleaved, offs, SWIGLU, validate)
    a = torch.empty(M, N // 2, device=x.device, dtype=torch.bfloat16)
    h = torch.empty(M, N, device=x.device, dtype=torch.bfloat16) if store_h else None
    if M and N:
        _launch(SWIGLU, x, gather_idx, w_interleaved, offs, (ptr(h) if store_h else np.uint64(0), ptr(a)), M, N, K)
    return a, h


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
    import torch

    gate, up = deinterleave(h)
    return torch.nn.functional.silu(gate) * up


# ----------------------------------------------------------------------------- references and baselines


def gather_reference(x, gather_idx, w, offs):
    """float32 ``x[gather_idx[r]] @ w[e].T``, one torch.mm per expert."""
    from .grouped_gemm import reference

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
    from .grouped_gemm import torch_grouped_mm

    return torch_grouped_mm(x.index_select(0, gather_idx), w, offs)


def gather_bytes_saved(tokens: int, top_k: int, d: int) -> int:
    """Bytes a fused gather does not move: the sorted copy of X (T*k rows of d bf16) written
    once and read back once, against X read in place."""
    return 2 * 2 * tokens * top_k * d


def example_routing(tokens: int, experts: int, top_k: int, skew: float = 0.0, seed: int = 0, device="cuda"):
    """Top-k routing of random logits (:func:`moe_course.grouped_gemm.routed_experts`), as
    ``(gather_idx, offs)`` on ``device``."""
    from .grouped_gemm import routed_experts

    gather_idx, offs = routing_order(routed_experts(tokens, experts, top_k, skew, seed), experts)
    return gather_idx.to(device), offs.to(device)


__all__ = ["GATHER", "SWIGLU", "PLAIN", "routing_order", "gather_grouped_gemm", "swiglu_grouped_gemm",
           "interleave_gate_up", "deinterleave", "swiglu_of", "gather_reference", "swiglu_reference", "permute_then_gemm",
           "permute_then_grouped_mm", "gather_bytes_saved", "example_routing"]


# ----------------------------------------------------------------------------- measuring chapter 03

PIPELINE_STAGES = (1, 2, 3, 4)  # slots of 03_1's ring: 1 = no overlap at all


def pipeline_step(stages: int) -> Step:
    """03_1 with a ring of ``stages`` slots (the same tile, the same kernel otherwise)."""
    from .grouped_gemm import STEPS, _tma_smem

    base = STEPS["03_1_tma"]
    return dataclasses.replace(base, defines={"STAGES": stages}, smem_bytes=_tma_smem(base.block_n, stages))


def trace_timeline(step: Step, x, w, offs, slices: int = 256, group_m: int | None = None) -> dict:
    """Run ``step`` compiled with ``-DTRACE`` (kernels/tma.cuh) and return block 0's timeline in
    microseconds from its first load: ``issued``, ``landed``, ``released`` per slice (NaN where a
    slice was not reached) and ``stored`` per tile."""
    import cupy

    from .grouped_gemm import run_step

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
    return {"issued": t[0].tolist(), "landed": t[1].tolist(), "released": t[2].tolist(), "stored": t[3].tolist(),
            "clock_mhz": clock_hz / 1e6, "step": step.name}


def timeline_gaps(trace: dict) -> list[tuple[float, float, float]]:
    """The gaps between one slice's multiply and the next: ``(start, stored, end)`` in us, where
    ``stored`` is when a tile's epilogue finished inside the gap (else ``start``): from ``start`` to
    ``stored`` the consumers were storing a tile, from ``stored`` to ``end`` waiting for a slice."""
    landed = np.asarray(trace["landed"], dtype=float)
    released = np.asarray(trace["released"], dtype=float)
    stored = np.sort(np.asarray([t for t in trace.get("stored", []) if t == t], dtype=float))
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
    from .grouped_gemm import STEPS, check_result, expert_counts, make_problem, reference, run_step, time_interleaved

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
                row.update({f"trace_{k}": v for k, v in timeline_summary(trace).items()})
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
    import torch

    from .bench import interleaved
    from .checking import relative_error
    from .grouped_gemm import MAX_REL_ERR, torch_grouped_mm

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
