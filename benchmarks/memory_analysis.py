#!/usr/bin/env python3
"""Activation memory of one MoE layer: what each implementation keeps from forward to backward.

    python benchmarks/memory_analysis.py                         # the four chapter-02 shapes
    python benchmarks/memory_analysis.py --config deepseek-v3 --json
    python benchmarks/memory_analysis.py --config qwen3-30b-a3b --tokens 4096

Training keeps, for every layer, the tensors its backward pass will need ("activations"); for
an MoE layer they are most of a step's memory. This counts them from a formula, term by term,
for three implementations of the same layer (router, top-K, SwiGLU experts, weighted combine):

  torch-loop   (a) plain torch, one matmul per expert (the course's baseline)
  grouped-mm   (b) the same maths on torch._grouped_mm: tokens sorted by expert, one call for
                   all experts. Faster, but autograd keeps the same tensors as (a).
  sonicmoe     (c) SonicMoE's design (Guo et al., arXiv 2512.14080): keeps only X, the
                   pre-activation H and the routing metadata. It never keeps the gathered X
                   (gathers happen inside the GEMM's loads) nor A or Y: the backward recomputes
                   A from H, and gets the routing weights' gradient as <dA', A> instead of
                   <dO, Y> (the terms below follow sonicmoe/functional/__init__.py).
                   The paper's "45% less activation memory" is against ScatterMoE, a fused
                   kernel that already keeps less than this torch layer does.

On a GPU it also builds (a) and (b) from plain torch ops, checks that they agree, and measures
next to the formula: the bytes autograd saved (counted through saved-tensor hooks), the memory
still allocated after the forward pass (less the output, plus X), and the peak of forward +
backward (which also holds the weight gradients and the backward's temporaries), and records
it (benchmarks/results/memory_analysis__<gpu>.json). Without a GPU it shows the recorded
measurement of the same shape, labelled with the GPU and the date, or says it was skipped.
Exit code 1 if (a) and (b) disagree.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

from moe_course import configs
from moe_course.checks import argument_type, positive_int, run_command

KIND = "memory_analysis"  # benchmarks/results/memory_analysis__<gpu>.json
BF16, FP32, INT32, INT64 = 2, 4, 4, 8
IMPLEMENTATIONS = {
    "torch-loop": "(a) torch, one matmul per expert",
    "grouped-mm": "(b) torch._grouped_mm",
    "sonicmoe": "(c) SonicMoE's design",
}
MIB = 2**20


@dataclass(frozen=True)
class Term:
    name: str
    size: str  # its shape and dtype, in the layer's letters
    bytes: int
    why: str  # which operation keeps it, and for what


def terms(shape, impl: str) -> list[Term]:
    """The tensors ``impl`` keeps for the backward pass of one MoE layer of ``shape`` (an
    ``MoEShape``, an ``MoEConfig`` or a ``(T, d, n, E, K)`` tuple), bf16 activations."""
    T, d, n, E, K = shape.shape if isinstance(shape, configs.MoEConfig) else configs.MoEShape(*shape)
    TK = T * K
    if impl == "sonicmoe":
        return [
            Term("X", "T x d bf16", T * d * BF16,
                 "the layer's input: the router's matmul and the up-projection keep it (the "
                 "up-projection gathers its rows again in the backward)"),
            Term("H", "TK x 2n bf16", TK * 2 * n * BF16,
                 "the pre-activation (gate and up halves); the backward recomputes SiLU(gate) and "
                 "A from it inside the dH kernel"),
            Term("top-K scores", "T x K fp32", TK * FP32, "the fused softmax-top-K keeps its output"),
            Term("top-K indices", "T x K int32", TK * INT32, "...and which experts it chose"),
            Term("token indices", "3 x TK int32", 3 * TK * INT32,
                 "routing metadata: each row's token (gather), its place in the sort, and the way back"),
            Term("expert offsets", "(E+1) int32", (E + 1) * INT32, "where each expert's rows start"),
        ]
    if impl not in ("torch-loop", "grouped-mm"):
        raise ValueError(f"unknown implementation {impl!r}; known: {', '.join(IMPLEMENTATIONS)}")
    loop = impl == "torch-loop"
    out = [
        Term("X", "T x d bf16", T * d * BF16,
             "the layer's input: the router's matmul X.W_r keeps it for the router's weight gradient"),
        Term("router probabilities", "T x E fp32", T * E * FP32, "softmax's backward needs its output"),
        Term("top-K scores", "T x K + T fp32", (TK + T) * FP32,
             "renormalising p / sum(p) keeps both p and the sum"),
        Term("top-K indices", "T x K int64", TK * INT64,
             "topk's backward scatters the gradient back to the chosen experts"),
        Term("token indices", "2 x TK int64", 2 * TK * INT64,
             "each expert's (token, slot) pairs from torch.where, kept by the gathers and index_add" if loop else
             "each row's token and its place in the sort, kept by the gathers and index_add"),
    ]
    if not loop:
        out.append(Term("expert offsets", "E int32", E * INT32, "torch._grouped_mm keeps its group ends"))
    out += [
        Term("gathered X", "TK x d bf16", TK * d * BF16,
             "X[token] for each routed row: the up-projection keeps its input for dW1"),
        Term("H", "TK x 2n bf16", TK * 2 * n * BF16,
             "the up-projection's output: SiLU keeps the gate half, the product keeps the up half"),
        Term("SiLU(gate)", "TK x n bf16", TK * n * BF16, "the product SiLU(gate) * up keeps this factor too"),
        Term("A", "TK x n bf16", TK * n * BF16, "the down-projection keeps its input for dW2"),
        Term("Y", "TK x d bf16", TK * d * BF16,
             "weighting Y by the routing weight keeps Y for the weight's gradient <dO, Y>"),
        Term("routing weights", "TK bf16", TK * BF16, "...and keeps each row's weight for dY"),
        Term("weighted Y", "TK x d bf16", TK * d * BF16,
             "index_add, summing each token's K rows, keeps its source too: its gradient "
             "formula (torch's derivatives.yaml) calls expand_as(source), so the tensor stays alive"),
    ]
    return out


def total_bytes(shape, impl: str) -> int:
    return sum(t.bytes for t in terms(shape, impl))


def analyse(shape) -> dict:
    """``{impl: {"terms": [...], "total_bytes": int}}`` for every implementation."""
    return {impl: {"terms": [asdict(t) for t in terms(shape, impl)], "total_bytes": total_bytes(shape, impl)}
            for impl in IMPLEMENTATIONS}


# ----------------------------------------------------------------------------------------------
# The layer in plain torch, to measure (a) and (b). Written here on purpose, small and
# self-contained: what autograd keeps depends on exactly these operations, and the formula
# above follows them line by line.
# ----------------------------------------------------------------------------------------------

def make_inputs(shape, device: str = "cpu", seed: int = 0):
    """Random bf16 ``x`` (T x d, requires grad) and weights ``w_router`` (d x E), ``w_up``
    (E x d x 2n), ``w_down`` (E x n x d), scaled so activations stay near unit size."""
    import torch

    T, d, n, E, K = configs.MoEShape(*shape)
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*size, scale=1.0):
        return torch.randn(*size, device=device, dtype=torch.bfloat16, generator=gen).mul_(scale).requires_grad_()

    return randn(T, d), randn(d, E, scale=d**-0.5), randn(E, d, 2 * n, scale=d**-0.5), randn(E, n, d, scale=n**-0.5)


def _route(x, w_router, K):
    import torch

    probs = torch.softmax((x @ w_router).float(), dim=-1)
    top_p, top_i = probs.topk(K, dim=-1)
    weights = (top_p / top_p.sum(dim=-1, keepdim=True)).to(x.dtype)
    return weights, top_i


def _swiglu(h):
    import torch.nn.functional as F

    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def moe_torch_loop(x, w_router, w_up, w_down, K: int):
    """(a) one matmul per expert on the rows routed to it."""
    import torch

    weights, top_i = _route(x, w_router, K)
    out = torch.zeros_like(x)
    for e in range(w_up.shape[0]):
        tok, slot = torch.where(top_i == e)
        if tok.numel() == 0:
            continue
        y = _swiglu(x[tok] @ w_up[e]) @ w_down[e]
        out = out.index_add(0, tok, y * weights[tok, slot, None])
    return out


def moe_grouped_mm(x, w_router, w_up, w_down, K: int):
    """(b) rows sorted by expert, then one torch._grouped_mm per projection."""
    import torch

    weights, top_i = _route(x, w_router, K)
    order = top_i.flatten().argsort(stable=True)  # rows grouped by expert
    tok = order // K  # the token each row came from
    ends = torch.bincount(top_i.flatten(), minlength=w_up.shape[0]).cumsum(0).to(torch.int32)
    h = torch._grouped_mm(x[tok], w_up, offs=ends)
    y = torch._grouped_mm(_swiglu(h), w_down, offs=ends)
    return torch.zeros_like(x).index_add(0, tok, y * weights.flatten()[order, None])


LAYERS = {"torch-loop": moe_torch_loop, "grouped-mm": moe_grouped_mm}


def forward_saving(impl: str, x, w_router, w_up, w_down, K: int):
    """Run ``impl``'s forward pass and count the bytes autograd saved for the backward, through
    saved-tensor hooks: each storage once (views of one tensor share it), weights excluded
    (:func:`moe_course.layer_measurements.saved_for_backward`). Returns ``(output, saved_bytes)``. Works
    on any device."""
    from moe_course import layer_measurements

    out, saved = layer_measurements.saved_for_backward(lambda: LAYERS[impl](x, w_router, w_up, w_down, K),
                                             (w_router, w_up, w_down))
    return out, sum(nbytes for *_, nbytes in saved)


def _measure_one(impl: str, shape, seed: int) -> tuple[dict, object]:
    import torch

    x, wr, wu, wd = make_inputs(shape, "cuda", seed)
    dout = torch.randn_like(x)
    for _attempt in ("warm-up", "measured"):  # the warm-up creates cuBLAS workspaces and the like
        for t in (x, wr, wu, wd):
            t.grad = None
        out = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out, saved = forward_saving(impl, x, wr, wu, wd, shape[-1])
        torch.cuda.synchronize()
        # New allocations still alive, less the output; plus X, which existed before the
        # forward but which the layer now keeps alive, as the formula counts it.
        held = torch.cuda.memory_allocated() - base - out.untyped_storage().nbytes() + x.nbytes
        out.backward(dout)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    grads = sum(t.grad.nbytes for t in (x, wr, wu, wd))
    return ({"saved_bytes": saved, "held_after_forward_bytes": held, "peak_fwd_bwd_bytes": peak,
             "gradient_bytes": grads}, out.detach())


def measure_gpu(shape, seed: int = 0) -> dict:
    """On a GPU: for (a) and (b), the bytes autograd saved, the memory still allocated after the
    forward pass (less its output), and the peak of forward + backward above the inputs and
    weights (it holds their gradients too); and whether the two outputs agree."""
    import torch

    from moe_course import records

    results, outputs = {}, {}
    shape = tuple(configs.MoEShape(*shape))
    for impl in LAYERS:
        error = None
        try:
            results[impl], outputs[impl] = _measure_one(impl, shape, seed)
        except torch.cuda.OutOfMemoryError as exc:
            error = f"out of GPU memory ({str(exc).splitlines()[0][:120]})"
        except RuntimeError as exc:  # e.g. torch._grouped_mm on a GPU it does not support
            error = f"failed: {str(exc).splitlines()[0][:160]}"
        if error:  # outside the except block, so the failed run's tensors are freed first
            results[impl] = {"error": error}
        torch.cuda.empty_cache()
    if len(outputs) == 2:
        a, b = outputs["torch-loop"].float(), outputs["grouped-mm"].float()
        err = records.finite_or_none(float((b - a).norm() / a.norm().clamp_min(1e-30)))  # None: NaN or infinite
        results["agreement"] = {"relative_error": err, "ok": err is not None and err < 2e-2}
    return results


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------

def _mib(b) -> str:
    return "-" if b is None else f"{b / MIB:,.1f}"


def table(cfg: configs.MoEConfig, result: dict) -> str:
    impls = list(IMPLEMENTATIONS)
    names = []
    for impl in ("grouped-mm", "torch-loop", "sonicmoe"):  # (b) lists every term of (a), in order
        names += [t["name"] for t in result["formula"][impl]["terms"] if t["name"] not in names]
    width = 30
    lines = [f"{cfg.title} {cfg.shape}: cached for the backward pass, MiB",
             f"  {'term':<{width}}" + "".join(f"{impl:>14}" for impl in impls)]
    for name in names:
        row = []
        for impl in impls:
            found = [t["bytes"] for t in result["formula"][impl]["terms"] if t["name"] == name]
            row.append(_mib(found[0]) if found else "-")
        lines.append(f"  {name:<{width}}" + "".join(f"{v:>14}" for v in row))
    lines.append(f"  {'total (formula)':<{width}}"
                 + "".join(f"{_mib(result['formula'][i]['total_bytes']):>14}" for i in impls))
    measured = result.get("measured")
    if result.get("measured_on"):
        lines.append(f"  measured rows: RECORDED on {result['measured_on']} (no GPU here)")
    if isinstance(measured, dict):
        for key, label in (("saved_bytes", "saved by autograd"), ("held_after_forward_bytes", "held after forward"),
                           ("peak_fwd_bwd_bytes", "peak fwd+bwd *")):
            cells = []
            for impl in impls:
                m = measured.get(impl, {})
                cells.append("error" if "error" in m else _mib(m.get(key)) if key in m else "-")
            lines.append(f"  {'measured: ' + label:<{width}}" + "".join(f"{v:>14}" for v in cells))
        for impl in LAYERS:
            if "error" in measured.get(impl, {}):
                lines.append(f"  {impl}: {measured[impl]['error']}")
        if "agreement" in measured:
            a = measured["agreement"]
            err = "NaN or infinite" if a["relative_error"] is None else f"{a['relative_error']:.2e}"
            lines.append(f"  (a) and (b) outputs agree: relative error {err} "
                         f"({'ok' if a['ok'] else 'FAILED'})")
        lines.append("  * the peak also holds the weight gradients "
                     f"({_mib(measured.get('torch-loop', {}).get('gradient_bytes'))} MiB with dX) "
                     "and the backward's temporaries")
    else:
        lines.append(f"  measured: {measured}")
    ratio = result["formula"]["sonicmoe"]["total_bytes"] / result["formula"]["torch-loop"]["total_bytes"]
    lines.append(f"  SonicMoE's design keeps {ratio:.0%} of what the torch layer keeps")
    return "\n".join(lines)


def legend() -> str:
    seen, lines = set(), ["what each term is (T tokens, d model dim, n expert dim, E experts, K top-K, TK = T x K rows):"]
    for impl in IMPLEMENTATIONS:
        for t in terms((8, 8, 8, 8, 2), impl):
            key = (t.name, t.why)
            if key in seen:
                continue
            seen.add(key)
            tag = "  " if impl == "torch-loop" else f"  [{impl}] "
            lines.append(f"{tag}{t.name} ({t.size}): {t.why}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="memory_analysis.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", type=argument_type(configs.by_name), default=None, metavar="NAME",
                    help="an MoE configuration (repeat for several): "
                         f"{', '.join(configs.names())} (default: the four shapes of chapter 02)")
    ap.add_argument("--tokens", type=positive_int, default=None,
                    help="tokens per batch T instead of the configuration's (e.g. smaller, to fit a GPU)")
    ap.add_argument("--no-measure", action="store_true", help="the formula only, even on a GPU")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--no-save", action="store_true",
                    help="do not record the measurement (recorded: GPU runs at the configurations' own T)")
    args = ap.parse_args(argv)
    cfgs = args.config or list(configs.CHAPTER02)
    if args.tokens is not None:
        cfgs = [c.with_tokens(args.tokens) for c in cfgs]

    from moe_course import machine, records

    measure = not args.no_measure and machine.has_gpu()
    why_not = "skipped (--no-measure)" if args.no_measure else machine.skip_reason()
    # Without a GPU, what a GPU measured at the same shape, labelled with where and when.
    recorded = None if measure or args.no_measure else records.load(KIND)
    results, failed = {}, False
    for cfg in cfgs:
        result = {"shape": cfg.shape.as_dict(), "formula": analyse(cfg)}
        old = recorded.data["configs"].get(cfg.name) if recorded else None
        if measure:
            result["measured"] = measure_gpu(cfg.shape)
            failed |= not result["measured"].get("agreement", {}).get("ok", True)
        elif old and old["shape"] == result["shape"] and isinstance(old.get("measured"), dict):
            result["measured"], result["measured_on"] = old["measured"], recorded.label()
        else:
            result["measured"] = why_not
        results[cfg.name] = result
    if measure and args.tokens is None and not args.no_save and not failed:
        prior = records.load(KIND, gpu=machine.info().gpu)
        kept = {k: v for k, v in (prior.data["configs"] if prior else {}).items() if k not in results}
        print(f"recorded in {records.save(KIND, {'configs': {**kept, **results}}).path}", file=sys.stderr)
    if args.json:
        out = {"gpu": machine.info().gpu, "configs": results}
        print(json.dumps(out, indent=1))
    else:
        print("\n\n".join(table(cfg, results[cfg.name]) for cfg in cfgs))
        print()
        print(legend())
    if failed:
        print("memory_analysis.py: (a) and (b) disagree: see 'agreement' above", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_command(main))
