"""Chapter 06's measurements: the whole MoE layer, forward and backward, against what a learner
would otherwise use, on the same weights and inputs; and a short training run.

Contenders (:func:`contenders`), all the same maths (softmax over the k largest logits, SwiGLU
experts, weighted combine), all trainable:

- ``torch loop``: chapter 01's layer (:func:`moe_course.moe.moe_forward`), one matmul per expert;
- ``torch._grouped_mm``: the same layer with the gate and up projections in one grouped GEMM
  and the down projection in another (CUTLASS on Hopper), autograd for the backward;
- ``course``: :class:`moe_course.layer.MoEFunction` on the course's kernels;
- ``SonicMoE``: the library (chapter 05), where it is installed and runs.

:func:`measure_layer` times each one's forward and forward + backward (interleaved, CUDA
events) and measures its memory: what the forward leaves allocated for the backward, and the
peak of forward + backward above the inputs and weights. ``benchmarks/bench_moe_layer.py``
records it for the four shapes of chapter 02; notebook 06 draws the record.
"""

from __future__ import annotations

import functools
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Callable, NamedTuple

import matplotlib.pyplot as plt
import torch
from torch.profiler import ProfilerActivity, profile

from . import layer, moe, plotting
from . import token_rounding as tr
from .bench import interleaved
from .checking import relative_error, same_bytes
from .records import finite_or_none
from .variants import grouped_mm_unavailable, sonicmoe_unavailable


class Contender(NamedTuple):
    name: str
    params: list  # the leaf tensors whose gradients the backward computes (x first)
    forward: Callable[[], torch.Tensor]  # one forward pass on the stored input

    def clear_grads(self) -> None:
        for t in self.params:
            t.grad = None

    def step(self, dout) -> None:
        """One forward + backward into fresh gradients (what a training step costs)."""
        self.clear_grads()
        self.forward().backward(dout)


def random_problem(shape, seed: int = 0, device: str = "cuda"):
    """``(w, x, dout)`` for one layer of shape ``(T, d, n, E, k)``: chapter 01's weights, the
    input and an output gradient, bf16, drawn from ``seed``."""
    T, d, n, E, k = shape
    g = torch.Generator(device=device).manual_seed(seed)
    w = moe.random_weights(d, n, E, dtype=torch.bfloat16, device=device, generator=g)
    x = torch.randn(T, d, device=device, generator=g).bfloat16()
    dout = torch.randn(T, d, device=device, generator=g).bfloat16()
    return w, x, dout


def _leaf(t):
    return t.detach().clone().contiguous().requires_grad_()


def grouped_mm_layer(x, w_router, w13, w_down, k: int):
    """The plain torch layer on ``torch._grouped_mm``: ``w13 (E, d, 2n)`` = gate | up side by
    side, ``w_down (E, n, d)``. Routing and combine as chapter 01's; autograd does the rest
    (it keeps the gathered x, H, A and the expert outputs for the backward)."""
    weights, experts = moe.topk_softmax(moe.router_logits(x, w_router), k)
    d = moe.dispatch(experts, w_router.shape[1])
    ends = d.offsets[1:].to(torch.int32)
    h = torch._grouped_mm(x[d.token_of], w13, offs=ends)
    gate, up = h.chunk(2, dim=-1)
    y = torch._grouped_mm(torch.nn.functional.silu(gate) * up, w_down, offs=ends)
    return moe.combine(y, d, weights)


def sonicmoe_layer(w: moe.MoEWeights, k: int):
    """A trainable ``sonicmoe.MoE`` holding ``w`` (its layout: router ``(E, d)``, ``c_fc``
    ``(E, 2n, d)`` gate/up interleaved, ``c_proj`` ``(E, d, n)``); returns ``(module, params)``."""
    from sonicmoe import MoE
    from sonicmoe.enums import ActivationType

    E, d, n = w.w_gate.shape
    kw = layer.prepare(w)
    m = MoE(num_experts=E, num_experts_per_tok=k, hidden_size=d, intermediate_size=n,
            activation_function=ActivationType.SWIGLU, add_bias=False, std=0.02).to("cuda", torch.bfloat16)
    with torch.no_grad():
        m.router.weight.copy_(w.w_router.t())
        m.c_fc.weight.copy_(kw.w_gate_up)
        m.c_proj.weight.copy_(kw.w_down.transpose(1, 2))
    return m, [m.router.weight, m.c_fc.weight, m.c_proj.weight]


#: The layers compared (bench_moe_layer.py's and profile_moe_layer.py's --contenders).
CONTENDERS = ("torch loop", "torch._grouped_mm", "course", "SonicMoE")


def contenders(x, w: moe.MoEWeights, k: int, names=CONTENDERS) -> tuple[dict[str, Contender], dict[str, str]]:
    """Each named contender with its own copy of ``x`` and the weights (bf16); and, for those
    that cannot run here, why not."""
    out, skipped = {}, {}
    kw = layer.prepare(w)
    if "torch loop" in names:
        p = [_leaf(t) for t in (x, w.w_router, w.w_gate, w.w_up, w.w_down)]
        out["torch loop"] = Contender("torch loop", p, lambda p=p: moe.moe_forward(p[0], moe.MoEWeights(*p[1:]), k).y)
    if "torch._grouped_mm" in names:
        why = grouped_mm_unavailable(x.device.type)
        if why:
            skipped["torch._grouped_mm"] = why
        else:
            p = [_leaf(t) for t in (x, w.w_router, torch.cat((w.w_gate, w.w_up), dim=2), w.w_down)]
            out["torch._grouped_mm"] = Contender("torch._grouped_mm", p, lambda p=p: grouped_mm_layer(*p, k))
    if "course" in names:
        why = layer.kernels_unavailable(x, w.w_gate.shape[1], w.w_gate.shape[2])
        if why:
            skipped["course"] = why
        else:
            p = [_leaf(t) for t in (x, *kw)]
            out["course"] = Contender("course", p, lambda p=p: layer.MoEFunction.apply(*p, k, layer.KERNEL_OPS))
    if "SonicMoE" in names:
        why = sonicmoe_unavailable(x.device.type)
        if why:
            skipped["SonicMoE"] = why
        else:
            try:
                from sonicmoe import KernelBackendMoE

                m, params = sonicmoe_layer(w, k)
                xs = _leaf(x)
                out["SonicMoE"] = Contender("SonicMoE", [xs, *params],
                                            lambda: m(xs, kernel_backend_moe=KernelBackendMoE.sonicmoe)[0])
            except Exception as exc:  # an install that imports but cannot build the layer
                skipped["SonicMoE"] = f"building sonicmoe.MoE failed: {str(exc).splitlines()[0][:160]}"
    return out, skipped


def saved_for_backward(forward: Callable[[], torch.Tensor], params
                       ) -> tuple[torch.Tensor, list[tuple[tuple, str, int]]]:
    """Run ``forward()`` and list what autograd saves for the backward, weights (``params``)
    excluded: ``(output, [(shape, dtype, bytes), ...])``, each storage counted once (views share
    it). Works on any device (saved-tensor hooks, no GPU memory statistics)."""
    weights = {p.untyped_storage().data_ptr() for p in params}
    seen, kept = set(), []

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights and ptr not in seen:
            seen.add(ptr)
            kept.append((tuple(t.shape), str(t.dtype).removeprefix("torch."), t.untyped_storage().nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output = forward()
    return output, kept


def gradients(c: Contender, dout) -> list[torch.Tensor]:
    """Output and every gradient of one forward + backward, in chapter 01's layouts (so that all
    contenders compare): x, w_router (d, E), w_gate and w_up (E, d, n), w_down (E, n, d)."""
    c.clear_grads()
    out = c.forward()
    out.backward(dout)
    g = [t.grad for t in c.params]
    if c.name == "torch loop":
        return [out.detach(), *g]
    if c.name == "torch._grouped_mm":
        gate, up = g[2].chunk(2, dim=2)
        return [out.detach(), g[0], g[1], gate, up, g[3]]
    if c.name == "course":
        return [out.detach(), g[0], g[1], g[2][:, 0::2].transpose(1, 2), g[2][:, 1::2].transpose(1, 2), g[3]]
    if c.name == "SonicMoE":
        return [out.detach(), g[0], g[1].t(), g[2][:, 0::2].transpose(1, 2), g[2][:, 1::2].transpose(1, 2),
                g[3].transpose(1, 2)]
    raise ValueError(c.name)


GRADIENT_NAMES = ("out", "x", "w_router", "w_gate", "w_up", "w_down")


def agreement(a: list, b: list) -> dict[str, float | None]:
    """Relative error (Frobenius) of each of :func:`gradients`' tensors, ``a`` against ``b``
    (None where it is NaN or infinite)."""
    return {n: finite_or_none(float((x.float() - y.float()).norm() / y.float().norm().clamp_min(1e-30)))
            for n, x, y in zip(GRADIENT_NAMES, a, b)}


def memory(c: Contender, dout) -> dict[str, int]:
    """Bytes above what was allocated before the forward (inputs, weights):

    - ``held_after_forward_bytes``: still allocated after the forward, less its output: what the
      layer keeps for its backward, its *activation memory* (the SonicMoE paper's measure). In a
      model this is what adds up, layer after layer, until the backward reaches the layer;
    - ``peak_fwd_bwd_bytes``: the peak of forward + backward, which also holds the gradients of
      the input and the weights (every contender allocates those alike: ``gradient_bytes``;
      for DeepSeek-V3's 256 experts they alone are 22 GiB) and the backward's temporaries."""
    c.clear_grads()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = c.forward()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base - out.untyped_storage().nbytes()
    out.backward(dout)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    grads = sum(t.grad.nbytes for t in c.params if t.grad is not None)
    c.clear_grads()
    return {"held_after_forward_bytes": held, "peak_fwd_bwd_bytes": peak, "gradient_bytes": grads}


def layer_flops(T: int, d: int, n: int, k: int) -> dict[str, float]:
    """The expert GEMMs' FLOPs: forward 2 T k d (2n) + 2 T k n d = 6 T k d n; the backward twice that."""
    f = 6.0 * T * k * d * n
    return {"forward": f, "forward+backward": 3 * f}


def measure_layer(shape, names=CONTENDERS, seed: int = 0,
                  rounds: int = 3, reps: int = 3, reference: str = "torch._grouped_mm",
                  progress: Callable[[str], None] = print) -> dict:
    """One shape ``(T, d, n, E, k)`` on this GPU: for each contender, forward and forward +
    backward time (TFLOP/s of the expert GEMMs), memory (:func:`memory`) and agreement with
    ``reference`` (out and every gradient); and why any contender was skipped."""
    T, d, n, E, k = shape
    w, x, dout = random_problem(shape, seed)
    found, skipped = contenders(x, w, k, names)
    del w  # each contender holds its own copy
    rows, failed, ref = {}, {}, None
    # the reference first; then each contender's output and gradients are compared and dropped,
    # so that at most two sets of gradients are alive (DeepSeek-V3's weight gradients: 22 GiB a set)
    for name in sorted(found, key=lambda nm: nm != reference):
        c = found[name]
        progress(f"{name}: first run (compiles)")
        try:
            g = gradients(c, dout)
            if name == reference:
                ref = g
            rows[name] = {"agreement_with_" + reference: agreement(g, ref) if ref is not None else None}
            del g
            rows[name] |= memory(c, dout)
        except Exception as exc:  # e.g. SonicMoE's backward on a setting it does not support
            where = traceback.extract_tb(exc.__traceback__)[-1]
            failed[name] = (f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]} "
                            f"({Path(where.filename).name}:{where.lineno})")
            progress(f"{name} failed: {failed[name]}")
            found.pop(name)
            rows.pop(name, None)
        c.clear_grads()
        torch.cuda.empty_cache()
    del ref
    flops = layer_flops(T, d, n, k)

    progress("timing, contenders interleaved")
    timed = {f"{name}|forward": c.forward for name, c in found.items()}
    timed |= {f"{name}|forward+backward": functools.partial(c.step, dout) for name, c in found.items()}
    res = interleaved(timed, rounds=rounds, reps=reps, warmup=2,
                      flops={key: flops[key.split("|")[1]] for key in timed})
    for key, m in res.items():
        name, what = key.split("|")
        rows[name][what] = m.timing()
    return {"shape": list(shape), "contenders": rows, "skipped": skipped | failed, "flops": flops}


def speedups(result: dict, base: str = "torch._grouped_mm") -> dict[str, dict[str, float]]:
    """For each contender: its forward + backward speed and peak memory relative to ``base``."""
    c = result["contenders"]
    if "forward+backward" not in c.get(base, {}):  # the base was not measured (skipped, or failed)
        return {}
    b = c[base]
    out = {}
    for name, r in c.items():
        if "forward+backward" in r:
            out[name] = {"fwd_bwd_speedup": b["forward+backward"]["ms"] / r["forward+backward"]["ms"],
                         "forward_speedup": b["forward"]["ms"] / r["forward"]["ms"],
                         "activation_memory_ratio": r["held_after_forward_bytes"] / max(b["held_after_forward_bytes"], 1),
                         "peak_memory_ratio": r["peak_fwd_bwd_bytes"] / b["peak_fwd_bwd_bytes"]}
    return out


def table(data: dict) -> str:
    """A benchmark record's ``data`` (``{"shapes": {name: measure_layer(...)}}``) as a text table:
    time, TFLOP/s, speed and memory relative to ``torch._grouped_mm``, and the largest relative
    error of the output and gradients against it (where it was recorded)."""
    lines = [f"{'shape':<14} {'contender':<18} {'fwd ms':>7} {'fwd+bwd ms':>10} {'TFLOP/s':>7} {'speed':>6} "
             f"{'activations MiB':>15} {'ratio':>6} {'peak MiB':>8} {'ratio':>6} {'max err':>8}"]
    for name, res in data["shapes"].items():
        sp = speedups(res)
        for c, r in res["contenders"].items():
            if "forward+backward" not in r:
                continue
            s = sp.get(c, {})
            err = r.get("agreement_with_torch._grouped_mm")  # None in it: NaN or infinite
            worst = max(float("inf") if e is None else e for e in err.values()) if err else None
            lines.append(f"{name:<14} {c:<18} {r['forward']['ms']:7.2f} {r['forward+backward']['ms']:10.2f} "
                         f"{r['forward+backward']['tflops']:7.0f} {s.get('fwd_bwd_speedup', float('nan')):5.2f}x "
                         f"{r['held_after_forward_bytes'] / 2**20:15.0f} {s.get('activation_memory_ratio', float('nan')):5.2f}x "
                         f"{r['peak_fwd_bwd_bytes'] / 2**20:8.0f} {s.get('peak_memory_ratio', float('nan')):5.2f}x "
                         + (f"{worst:8.1e}" if worst is not None else f"{'-':>8}"))
        for c, why in res["skipped"].items():
            lines.append(f"{name:<14} {c:<18} skipped: {why}")
    lines.append("speed and ratios: against torch._grouped_mm on the same shape; activations: what the forward "
                 "keeps for the backward; peak: forward + backward, gradients included")
    return "\n".join(lines)


def plot_layer(record, live: bool, base: str = "torch._grouped_mm"):
    """Two charts from a record of :func:`measure_layer` results: forward + backward speed
    relative to ``base``, and the activation memory each contender keeps, per shape."""
    shapes = list(record.data["shapes"])
    names = []
    for s in shapes:
        names += [c for c in record.data["shapes"][s]["contenders"] if c not in names]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.2))
    sp = {s: speedups(record.data["shapes"][s], base) for s in shapes}
    # a contender not measured on a shape (None) gets no bar and a "not measured" label, never a 0
    plotting.grouped_bars(shapes, {c: [sp[s].get(c, {}).get("fwd_bwd_speedup") for s in shapes] for c in names},
                          ylabel=f"forward + backward, x {base}", record=record, live=live, fmt="%.2f",
                          ceiling=1.5, ceiling_label="1.5x: chapter 06's minimum", ax=a1,
                          title="speed (higher is better)")
    kept = {c: [record.data["shapes"][s]["contenders"].get(c, {}).get("held_after_forward_bytes") for s in shapes]
            for c in names}
    mib = {c: [None if b is None else b / 2**20 for b in v] for c, v in kept.items()}
    plotting.grouped_bars(shapes, mib, ylabel="MiB kept for the backward", record=record, live=live, ax=a2,
                          title="activation memory (lower is better)")
    fig.tight_layout()
    return fig


def plot_losses(curves: dict[str, list[float]], record, live: bool, ax=None):
    """Loss per step of each training run, overlaid (log scale)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.8))
    for (label, losses), style in zip(curves.items(), ("-", "--", ":", "-.")):
        ax.plot(range(1, len(losses) + 1), losses, style, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (MSE to the teacher)")
    ax.legend(fontsize=8)
    plotting.stamp(ax, record, live)
    return ax


# --------------------------------------------------------------------------------------------
# The hand-written backward against autograd, in float64 (any machine)


def float64_gradients(T: int, d: int, n: int, E: int, k: int, router_bias: float = 0.0, seed: int = 0,
                      ops: layer.Ops | None = None, routing: str = "top-K", tile: int = tr.DEFAULT_TILE) -> tuple[dict, dict]:
    """Gradients of ``<g, out>`` for a random ``g``, with respect to x and every weight: by autograd
    through chapter 01's layer (:func:`moe_course.moe.moe_forward`; for token rounding, chapter
    04's :func:`moe_course.token_rounding.moe_forward` on the rounded routing, its weights taken
    from the router's probabilities so that autograd reaches the router) and by
    :class:`moe_course.layer.MoEFunction` (``ops``, default :data:`moe_course.layer.TORCH_OPS`),
    both in float64 on the CPU, ours mapped back to chapter 01's layouts. ``router_bias`` pushes
    tokens towards expert 0 (large: one expert takes all)."""
    g = torch.Generator().manual_seed(seed)
    w = moe.random_weights(d, n, E, dtype=torch.float64, generator=g)
    x = torch.randn(T, d, dtype=torch.float64, generator=g)
    x[:, 0] = 1.0
    w.w_router[0] += router_bias * torch.linspace(1, 0, E, dtype=torch.float64)
    grad_out = torch.randn(T, d, dtype=torch.float64, generator=g)
    ref = [t.clone().requires_grad_() for t in (x, *w)]
    if routing == "top-K":
        moe.moe_forward(ref[0], moe.MoEWeights(*ref[1:]), k).y.backward(grad_out)
    else:
        probs = moe.router_probs(moe.router_logits(ref[0], ref[1]))
        rounded = tr.token_rounding(probs.detach(), k, tile, routing)
        rounded = rounded._replace(weights=probs[rounded.token_ids, rounded.expert_ids].double())
        tr.moe_forward(ref[0], moe.MoEWeights(*ref[1:]), rounded).backward(grad_out)
    ours = [t.clone().requires_grad_() for t in (x, *layer.prepare(w, dtype=None))]
    layer.MoEFunction.apply(*ours, k, ops or layer.TORCH_OPS, routing, tile).backward(grad_out)
    dx, dr, dgu, dd = (t.grad for t in ours)
    mine = {"x": dx, "w_router": dr, "w_gate": dgu[:, 0::2].transpose(1, 2), "w_up": dgu[:, 1::2].transpose(1, 2),
            "w_down": dd}
    theirs = dict(zip(["x", "w_router", "w_gate", "w_up", "w_down"], (t.grad for t in ref)))
    return mine, theirs


def max_rel_errors(mine: dict, theirs: dict) -> dict[str, float]:
    """Largest difference of each tensor, relative to the largest value of the reference."""
    return {k: float((mine[k] - theirs[k]).abs().max() / theirs[k].abs().max().clamp_min(1e-30)) for k in mine}


# --------------------------------------------------------------------------------------------
# The kernels against the same maths in torch, on the GPU


def integer_router_inputs(T: int, d: int, n: int, E: int, router_bias: float = 0.0, seed: int = 0,
                          device: str = "cuda"):
    """``(x, w_router, w_gate_up, w_down, dout)`` in bf16 whose router logits are small integers:
    ``w_router`` picks x's first ``E`` features, a permutation of ``0 .. E-1`` per token (plus
    ``router_bias`` on expert 0). They are exact in bf16 and float32 alike, so a bf16 and a
    float32 run of the layer pick the same experts and their results can be compared."""
    g = torch.Generator(device=device).manual_seed(seed)
    kw = layer.prepare(moe.random_weights(d, n, E, device=device, generator=g), dtype=torch.bfloat16)
    w_router = torch.zeros(d, E, device=device, dtype=torch.bfloat16)
    w_router[:E] = torch.eye(E, device=device, dtype=torch.bfloat16)
    x = torch.randn(T, d, device=device, generator=g).bfloat16()
    x[:, :E] = torch.argsort(torch.rand(T, E, device=device, generator=g), dim=1).bfloat16()
    x[:, 0] += router_bias
    dout = torch.randn(T, d, device=device, generator=g).bfloat16()
    return x, w_router, kw.w_gate_up, kw.w_down, dout


def layer_outputs(inputs, k: int, ops: layer.Ops, dtype=None, routing: str = "top-K", tile: int = tr.DEFAULT_TILE
                  ) -> list[torch.Tensor]:
    """One forward + backward of :class:`moe_course.layer.MoEFunction` on ``inputs`` = ``(x,
    w_router, w_gate_up, w_down, dout)`` (copies, cast to ``dtype`` if given): ``[out, dx,
    dw_router, dw_gate_up, dw_down]``."""
    leaves = [t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in inputs[:4]]
    out = layer.MoEFunction.apply(*leaves, k, ops, routing, tile)
    out.backward(inputs[4].to(dtype or inputs[4].dtype))
    return [out.detach()] + [t.grad for t in leaves]


def kernels_and_torch(x, w_router, w_gate_up, w_down, dout, k: int, routing: str = "top-K", tile: int = tr.DEFAULT_TILE
                      ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Output and the five gradients of :class:`moe_course.layer.MoEFunction`, on the course's
    kernels in bf16 and on the same maths in float32 torch (:data:`moe_course.layer.TORCH_OPS`),
    both float32 for comparing: ``{"out": (kernels, torch), "x": ..., "w_down": ...}``."""
    inputs = (x, w_router, w_gate_up, w_down, dout)
    kernels = layer_outputs(inputs, k, layer.KERNEL_OPS, torch.bfloat16, routing, tile)
    reference = layer_outputs(inputs, k, layer.TORCH_OPS, torch.float32, routing, tile)
    labels = ("out", "x", "w_router", "w_gate_up", "w_down")
    return {label: (a.float(), b.float()) for label, a, b in zip(labels, kernels, reference)}


# --------------------------------------------------------------------------------------------
# The layer's products one by one: each course kernel against the same product on the library


def op_cases(shape, device: str = "cuda", seed: int = 0) -> list[tuple[str, str, Callable, float, float]]:
    """The seven products of one forward + backward of the layer on shape ``(T, d, n, E, k)``, on
    realistic inputs (a real routing, each product's inputs made by the one before it):
    ``(product, course kernel, run(ops), flops, bytes)``; ``run`` calls the product through an
    :class:`moe_course.layer.Ops` (``layer.KERNEL_OPS``, ``layer.GROUPED_MM_OPS``, ...)."""
    T, d, n, E, k = shape
    g = torch.Generator(device=device).manual_seed(seed)
    bf16 = torch.bfloat16
    x = torch.randn(T, d, device=device, generator=g).to(bf16)
    dout = torch.randn(T, d, device=device, generator=g).to(bf16)
    w_router = (torch.randn(d, E, device=device, generator=g) * d ** -0.5).to(bf16)
    w_gate_up = (torch.randn(E, 2 * n, d, device=device, generator=g) * d ** -0.5).to(bf16)
    w_down = (torch.randn(E, n, d, device=device, generator=g) * n ** -0.5).to(bf16)
    r = layer.route(x, w_router, k)
    idx, offs, s = r.gather_idx, r.offs, r.row_weights.float().contiguous()
    made = layer.GROUPED_MM_OPS  # the inputs of the later products, made once by the library
    a, h = made.up(x, idx, w_gate_up, offs)
    dh, sa, _ = made.dswiglu(dout, idx, w_down, h, s, offs)
    y = made.times_w(a, w_down, offs)
    R = idx.numel()
    return [
        ("up: x[gather] W_gate_up^T, SwiGLU", "03_4_swiglu", lambda ops: ops.up(x, idx, w_gate_up, offs),
         2.0 * R * d * 2 * n, 0.0),
        ("down: A W_down", "06_1_transposed_b", lambda ops: ops.times_w(a, w_down, offs), 2.0 * R * n * d, 0.0),
        ("dA' = dout[gather] W_down^T, SwiGLU backward", "06_2_dswiglu",
         lambda ops: ops.dswiglu(dout, idx, w_down, h, s, offs), 2.0 * R * d * n, 0.0),
        ("dX rows: dH W_gate_up", "06_1_transposed_b", lambda ops: ops.times_w(dh, w_gate_up, offs),
         2.0 * R * 2 * n * d, 0.0),
        ("dW_gate_up = dH^T x[gather]", "06_3_weight_grad", lambda ops: ops.weight_grad(dh, x, idx, offs),
         2.0 * R * 2 * n * d, 0.0),
        ("dW_down = (s A)^T dout[gather]", "06_3_weight_grad", lambda ops: ops.weight_grad(sa, dout, idx, offs),
         2.0 * R * n * d, 0.0),
        ("combine: each token's k weighted rows", "06_4_combine", lambda ops: ops.combine(y, r.pos, r.weights),
         0.0, 2.0 * (R + T) * d),
    ]


def measure_ops(shape, mine: layer.Ops | None = None, theirs: layer.Ops | None = None, device: str = "cuda",
                names=("course", "torch._grouped_mm"), rounds: int = 5, reps: int = 5, tolerance: float = 2e-2,
                progress: Callable[[str], None] = print, tried: dict | None = None) -> list[dict]:
    """Each product of :func:`op_cases`, ``mine`` (default the course's kernels) against
    ``theirs`` (default ``torch._grouped_mm`` plus the torch around it: the gather, the
    elementwise SwiGLU and its backward): every output compared first (relative error below
    ``tolerance``), then both timed in turns. A product that fails its check is not timed.
    ``tried``: label -> Ops, experimental builds of ``mine`` (:func:`moe_course.layer.kernel_ops`
    with more #defines), each required to give ``mine``'s bytes, then timed in the same turns:
    ``row["tried"][label]``."""
    mine, theirs = mine or layer.KERNEL_OPS, theirs or layer.GROUPED_MM_OPS
    rows = []
    for product, kernel, run, flops, nbytes in op_cases(shape, device):
        ours, ref = _outputs(run(mine)), _outputs(run(theirs))
        err = max(relative_error(a, b) for a, b in zip(ours, ref))
        del ref
        row = {"product": product, "kernel": kernel, "flops": flops, "bytes": nbytes, "rel_err": finite_or_none(err)}
        if not err < tolerance:
            rows.append(row | {"status": "failed", "note": f"relative error {err:.2e} above {tolerance:.0e}: not timed"})
            progress(f"{product}: FAILED its check ({err:.2e})")
            continue
        fns = {names[0]: lambda run=run: run(mine), names[1]: lambda run=run: run(theirs)}
        same = {label: all(same_bytes(a, b) for a, b in zip(_outputs(run(ops)), ours))
                for label, ops in (tried or {}).items()}
        del ours
        fns |= {f"[{label}]": (lambda run=run, ops=ops: run(ops)) for label, ops in (tried or {}).items() if same[label]}
        res = interleaved(fns, rounds=rounds, reps=reps, warmup=2, flops=flops, bytes=nbytes)
        row |= {"status": "ok"} | {name: res[name].timing() | {"tbps": res[name].tbps} for name in names}
        if tried:
            row["tried"] = {label: (res[f"[{label}]"].timing() if same[label] else
                                    {"error": f"not {names[0]}'s bytes: not timed"}) for label in tried}
        rows.append(row)
        progress(f"{product}: {names[0]} {res[names[0]].ms:.3f} ms, {names[1]} {res[names[1]].ms:.3f} ms"
                 + "".join(f", [{label}] {res[f'[{label}]'].ms:.3f} ms" for label in tried or {} if same[label]))
    return rows


def _outputs(result) -> tuple:
    """A product's outputs as a tuple (some return one tensor, some several)."""
    return result if isinstance(result, tuple) else (result,)


def ops_table(data: dict, names=("course", "torch._grouped_mm")) -> str:
    """The products of :func:`measure_ops` per shape: time, rate and the course's speed."""
    head = (f"{'shape':<14} {'product':<44} {'kernel':<18} {names[0] + ' ms':>10} {names[1] + ' ms':>21} "
            f"{'rate':>13} {'speed':>6}")
    lines = [head, "-" * len(head)]
    for shape, rows in data["shapes"].items():
        for r in rows:
            if r["status"] != "ok":
                lines.append(f"{shape:<14} {r['product']:<44} {r['kernel']:<18} {r['status'].upper()}: {r['note']}")
                continue
            a, b = r[names[0]], r[names[1]]
            rate = f"{a['tflops']:.0f} TFLOP/s" if r["flops"] else f"{a['tbps']:.2f} TB/s"
            lines.append(f"{shape:<14} {r['product']:<44} {r['kernel']:<18} {a['ms']:>10.3f} {b['ms']:>21.3f} "
                         f"{rate:>13} {b['ms'] / a['ms']:>5.2f}x")
    lines.append(f"rate: the course's kernel (TFLOP/s of the product, TB/s for the combine); speed: "
                 f"{names[1]}'s time over the course's")
    return "\n".join(lines)


def tried_table(data: dict, name: str = "course") -> str:
    """The experimental builds of a ``layer_kernels`` record (``bench_layer_kernels.py --try``):
    per shape and product, the default build's ms and each tried build's, with its speed over
    the default (above 1: the experiment is faster)."""
    lines = []
    for shape, rows in data["shapes"].items():
        for r in rows:
            for label, t in r.get("tried", {}).items():
                head = f"{shape:<14} {r['product']:<44} [{label}]"
                lines.append(f"{head} {t['error']}" if "error" in t else
                             f"{head} {t['ms']:8.3f} ms against {r[name]['ms']:.3f}: {r[name]['ms'] / t['ms']:.3f}x")
    return "\n".join(lines)


def schedules_table(data: dict) -> str:
    """benchmarks/bench_dswiglu_schedules.py's record: each build of 06_2 and 10_2 on each shape,
    ms, TFLOP/s and speed over the same product's cooperative build."""
    lines = []
    for shape, row in data.get("shapes", {}).items():
        base = {p: row["builds"][f"{p} cooperative"]["ms"] for p in ("06_2", "10_2") if f"{p} cooperative" in row["builds"]}
        lines.append(f"--- {shape}")
        for name, m in row["builds"].items():
            ref = base.get(name[:4])
            lines.append(f"  {name:<26} {m['ms']:8.3f} ms  {m['tflops']:6.0f} TFLOP/s"
                         + (f"  {ref / m['ms']:.2f}x cooperative" if ref else ""))
    return "\n".join(lines)


def kernel_profile(shape, name: str = "course", iters: int = 3, seed: int = 0) -> dict:
    """Where one forward + backward of contender ``name`` spends its GPU time on shape ``(T, d,
    n, E, k)``: torch.profiler over ``iters`` steps (it sees every kernel of the process, CuPy's
    launches too), after two warm-up steps. ``{"ms_per_iter": CUDA-event time of a step,
    "kernels": {kernel name: (ms per step, calls per step)}}``, largest first; or ``{"skipped":
    why}``."""
    w, x, dout = random_problem(shape, seed)
    found, skipped = contenders(x, w, shape[4], (name,))
    del w
    if name not in found:
        return {"skipped": skipped.get(name, "not available")}
    c = found[name]
    step = functools.partial(c.step, dout)
    for _ in range(2):  # compiles, autotuning, the allocator's first requests
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    end.record()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    per = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name][0] += ev.device_time / 1e3 / iters  # us -> ms
            per[ev.name][1] += 1
    kernels = {nm: (round(t, 4), cnt / iters) for nm, (t, cnt) in sorted(per.items(), key=lambda kv: -kv[1][0])}
    return {"ms_per_iter": round(start.elapsed_time(end) / iters, 4), "kernels": kernels}


def profile_table(title: str, res: dict, width: int = 70) -> str:
    """:func:`kernel_profile`'s result as lines: the step's time, the kernels' total, the GPU's
    idle time (host overhead and waits), then each kernel with at least 1% of the total."""
    if "skipped" in res:
        return f"=== {title}\n   skipped: {res['skipped']}"
    busy = sum(t for t, _ in res["kernels"].values())
    lines = [f"=== {title}",
             f"   {res['ms_per_iter']:.3f} ms per forward+backward (CUDA events); kernels {busy:.3f} ms; "
             f"GPU idle {res['ms_per_iter'] - busy:.3f} ms"]
    for nm, (t, cnt) in res["kernels"].items():
        if t >= 0.01 * busy:
            lines.append(f"   {t:8.3f} ms {100 * t / res['ms_per_iter']:5.1f}%  x{cnt:<4g} {nm[:width]}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# One CUDA graph for the whole step: how much of the eager time is the host's?


def graphed_step(c: Contender, dout) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Capture one forward + backward of ``c`` in a CUDA graph, after a warm-up on a side stream
    (as torch's documentation asks: first calls compile, allocate and pick algorithms); returns
    the graph and its output tensor. Replaying it reruns the step on whatever its input buffers
    then hold: the output tensor and the ``.grad`` tensors the capture allocated get the results.
    Needs every launch on torch's current stream and no host synchronisation: the course's layer
    qualifies, the ``torch._grouped_mm`` layer does not (its sort by expert reads the counts back
    to the host)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            c.step(dout)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    c.clear_grads()
    with torch.cuda.graph(graph):
        out = c.forward()
        out.backward(dout)
    return graph, out.detach()


def eager_and_graph(shape, seed: int = 0, rounds: int = 5, reps: int = 10) -> dict:
    """The course's layer on one shape ``(T, d, n, E, k)``: forward + backward launched from
    Python, and the same step replayed as one CUDA graph, timed in turns (:func:`interleaved`)."""
    T, d, n, E, k = shape
    w, x, dout = random_problem(shape, seed)
    c = contenders(x, w, k, ("course",))[0]["course"]
    graph, _ = graphed_step(c, dout)
    return interleaved({"eager": functools.partial(c.step, dout), "CUDA graph": graph.replay}, rounds=rounds,
                       reps=reps, warmup=3,
                       flops=layer_flops(T, d, n, k)["forward+backward"])


# --------------------------------------------------------------------------------------------
# A short training run: does the layer train like the torch reference?


def teacher_student(d: int, n: int, E: int, k: int, tokens: int, steps: int, lr: float = 3e-3, seed: int = 0,
                    device: str = "cuda", dtype=torch.bfloat16, ops: layer.Ops | None = None,
                    progress: Callable[[int, float], None] | None = None) -> list[float]:
    """Train an MoE layer (:class:`moe_course.layer.MoEFunction`, with ``ops``) for ``steps``
    Adam steps to imitate a fixed random teacher MoE layer on fresh random tokens each step
    (mean squared error); return the loss of every step. The student's initial weights, the
    teacher and the data depend on ``seed`` only, so two runs with different ``ops`` or dtypes
    see exactly the same problem."""
    ops = ops or (layer.KERNEL_OPS if device == "cuda" else layer.TORCH_OPS)
    g = torch.Generator(device="cpu").manual_seed(seed)
    teacher = layer.prepare(moe.random_weights(d, n, E, generator=g), dtype=torch.float32)
    student = layer.prepare(moe.random_weights(d, n, E, generator=g), dtype=torch.float32)
    params = [torch.nn.Parameter(t.to(device=device, dtype=dtype)) for t in student]
    teacher = [t.to(device) for t in teacher]
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for step in range(steps):
        x = torch.randn(tokens, d, generator=g).to(device)
        with torch.no_grad():
            target = layer.MoEFunction.apply(x, *teacher, k, layer.TORCH_OPS)
        y = layer.MoEFunction.apply(x.to(dtype), *params, k, ops)
        loss = torch.nn.functional.mse_loss(y.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if progress:
            progress(step, losses[-1])
    return losses
