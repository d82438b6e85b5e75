"""The MoE layer built from the course's own kernels (chapters 03 and 06).

:func:`forward` (inference) and :class:`MoEFunction` / :class:`CourseMoE` (training) share one
plan, chapter 01's layer with every step on a course kernel where there is a Hopper GPU:

1. the router's logits (``x @ W_router``, torch), then the top-k and the sort by expert on
   chapter 04's routing kernels (``kernels/04_1_token_rounding.cu``, plain top-K, no host
   synchronisation), and the softmax over each token's k logits; or, with ``routing`` one of
   "nearest", "up", "down", chapter 04's token rounding (in torch), each row weighted by the
   router's probability of its pair;
2. the up-projection with the token rows gathered inside the load and SwiGLU in the epilogue
   (``kernels/03_4_swiglu.cu``): tokens in, ``A = silu(x W_gate) * (x W_up)`` out (and, for
   training, the pre-activation ``H``), with no permuted copy of ``x`` and no activation pass;
3. the down-projection on ``A`` (``kernels/06_1_transposed_b.cu``: ``W_down`` kept as
   ``[E, n, d]``, chapter 01's layout);
4. the combine: each token gathers its k rows and sums them, weighted (``06_4_combine.cu``,
   no atomics; with token rounding a token has any number of rows: :func:`combine_by_token`);

and the backward (:class:`MoEFunction`) on ``06_2`` (the output gradient gathered, times
``W_down^T``, with the SwiGLU backward in the epilogue), ``06_1`` (``dX``), ``06_3`` (the weight
gradients) and ``06_4``. The weights are prepared once by :func:`prepare` in the kernels'
layout. The same maths in plain torch (:data:`TORCH_OPS`) runs anywhere, the CPU included.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import launch, moe
from . import token_rounding as tr
from .checks import check_choice, check_int
from .io_overlap import deinterleave, swiglu_of
from .machine import info


class KernelWeights(NamedTuple):
    """One layer's weights in the kernels' layout: ``w_router (d, E)``; ``w_gate_up
    (E, 2n, d)``, the gate and up rows interleaved (03_4's SwiGLU epilogue); ``w_down (E, n, d)``
    (chapter 01's layout: 06_1 reads it transposed, 06_2 as it is)."""
    w_router: torch.Tensor
    w_gate_up: torch.Tensor
    w_down: torch.Tensor


def prepare(w: moe.MoEWeights, dtype=torch.bfloat16) -> KernelWeights:
    """Chapter 01's weights (``w_gate``, ``w_up`` ``(E, d, n)``, ``w_down`` ``(E, n, d)``) in the
    kernels' layout, contiguous, the expert weights in ``dtype`` (``None``: as they are)."""
    E, d, n = w.w_gate.shape
    gate_up = torch.stack((w.w_gate.transpose(1, 2), w.w_up.transpose(1, 2)), dim=2).reshape(E, 2 * n, d)
    cast = lambda t: (t if dtype is None else t.to(dtype)).contiguous()
    return KernelWeights(w.w_router, cast(gate_up), cast(w.w_down))


#: The layer's routings: plain top-K (softmax over each token's k largest logits), or chapter
#: 04's tile-aware token rounding of the top-K counts (each row weighted by the router's
#: probability of the pair, a softmax over all experts), to the nearest tile, up or down.
ROUTINGS = ("top-K", "nearest", "up", "down")


class Routing(NamedTuple):
    """A routing in the kernels' terms. Always: ``gather_idx`` ``(R,)``, the token of each
    expert-sorted row (within an expert, in token order); ``offs`` ``(E,)``, each expert's end
    row; ``row_weights`` ``(R,)`` fp32, each row's combine weight. Top-K only (else None):
    ``weights`` and ``experts`` ``(T, k)``, each token's; ``pos`` ``(T, k)``, where each
    (token, slot) pair's row is. Token rounding only (else None): ``probs`` ``(T, E)``, the
    router's probabilities; ``row_experts`` ``(R,)``, each row's expert. (With rounding a token
    has any number of rows, none included.) int32 indices, ``experts`` int64."""
    weights: torch.Tensor | None
    experts: torch.Tensor | None
    gather_idx: torch.Tensor
    offs: torch.Tensor
    pos: torch.Tensor | None
    row_weights: torch.Tensor
    probs: torch.Tensor | None = None
    row_experts: torch.Tensor | None = None


def route(x: torch.Tensor, w_router: torch.Tensor, k: int, method: str = "top-K", tile: int = tr.DEFAULT_TILE) -> Routing:
    """``method`` "top-K": softmax over the k largest logits (:func:`moe_course.moe.topk_softmax`),
    rows sorted by expert. On a GPU the top-k and the sort are chapter 04's routing kernels
    (:func:`moe_course.token_rounding.route_cuda`, plain top-K): no host synchronisation, where
    torch's sort by expert needs one (``torch.bincount`` reads the counts back). Elsewhere, torch.
    "nearest", "up", "down": chapter 04's token rounding (:func:`moe_course.token_rounding.
    token_rounding`) of the router's probabilities to multiples of ``tile`` rows per expert, in
    torch (it reads the row count back: one synchronisation)."""
    check_choice(method, "routing", ROUTINGS)
    logits = moe.router_logits(x, w_router).float()  # routers decide in float32
    T, E = logits.shape
    if method != "top-K":
        return _rounded(logits, k, tile, method)
    if logits.is_cuda and T:  # (an empty batch routes in torch: nothing to launch)
        return _route_on_gpu(logits, k)
    weights, experts = moe.topk_softmax(logits, k)
    d = moe.dispatch(experts, E)
    i32 = torch.int32
    return Routing(weights, experts, d.token_of.to(i32), d.offsets[1:].to(i32), d.inverse.view(T, k).to(i32),
                   weights.reshape(-1)[d.order])


def _rounded(logits: torch.Tensor, k: int, tile: int, method: str) -> Routing:
    probs = moe.router_probs(logits)
    r = tr.token_rounding(probs, k, tile, method)
    i32 = torch.int32
    return Routing(None, None, r.token_ids.to(i32), r.offsets[1:].to(i32), None, r.weights, probs, r.expert_ids.to(i32))


def _route_on_gpu(logits: torch.Tensor, k: int) -> Routing:
    T, E = logits.shape
    r = tr.route_cuda(logits, k, method="top-K", validate=False)  # top-K adds no rows: exactly T k
    R = T * k
    token, expert = r.token_ids[:R], r.expert_ids[:R]
    experts = r.topk.long()  # (T, k), best first
    weights = logits.gather(1, experts).softmax(dim=-1)
    # which of its token's k slots each row is, and so where each (token, slot) pair's row is
    slot = (experts[token.long()] == expert[:, None].long()).int().argmax(dim=1)
    pair = token.long() * k + slot
    pos = torch.empty(R, device=logits.device, dtype=torch.int32)
    pos[pair] = torch.arange(R, device=logits.device, dtype=torch.int32)
    return Routing(weights, experts, token, r.ends, pos.view(T, k), weights.reshape(-1)[pair])


# --------------------------------------------------------------------------------------------
# The products the layer needs, in two implementations: the course's kernels and plain torch
#
# Notation, per sorted row r (token t = gather_idx[r], expert e, routing weight s_r):
#   h_r = x_t W1[e]^T (gate and up interleaved), a_r = silu(g_r) * u_r, y_r = a_r W2[e],
#   out_t = sum over t's rows of s_r y_r            (W1 = w_gate_up [E, 2n, d], W2 = w_down [E, n, d])
# Backward, given dout:
#   dA'_r = dout_t W2[e]^T        (the up-projection's mirror: rows of dout gathered)
#   ds_r  = <dA'_r, a_r>          (since <dout_t, y_r> = <dout_t W2[e]^T, a_r>)
#   da_r  = s_r dA'_r;  dg = da * u * silu'(g);  du = da * silu(g)
#   dX_t  = sum over t's rows of dh_r W1[e]       (a gather-sum: no atomics)
#   dW1[e] = sum over e's rows of dh_r^T x_t;  dW2[e] = sum over e's rows of (s_r a_r)^T dout_t
#   the router: ds -> the k top logits through their softmax -> dlogits -> dX, dW_router.


class Ops(NamedTuple):
    """``up(x, idx, w_gate_up, offs)``: ``(a, h)``, the gathered up-projection and its SwiGLU;
    ``times_w(x, w, offs)``: rows of expert e times ``w[e]`` (``w [E, K, N]``);
    ``dswiglu(dout, idx, w_down, h, s, offs)``: ``(dh, s * a, ds)`` (above);
    ``weight_grad(dy, x, idx, offs)``: ``dW[e] = dy_e^T x[idx]_e``, ``[E, N, K]``;
    ``combine(rows, pos, weights)``: ``out_t = sum_j weights[t, j] rows[pos[t, j]]`` (None: ones)."""
    up: object
    times_w: object
    dswiglu: object
    weight_grad: object
    combine: object


def _per_expert(offs, fn):
    """Call ``fn(e, lo, hi)`` for every expert with rows: the torch ops' one host sync."""
    lo = 0
    for e, hi in enumerate(offs.tolist()):
        if hi > lo:
            fn(e, lo, hi)
        lo = hi


def _torch_times_w(x, w, offs):
    out = x.new_zeros(x.shape[0], w.shape[2])
    _per_expert(offs, lambda e, lo, hi: out[lo:hi].copy_(x[lo:hi] @ w[e]))
    return out


def _torch_up(x, idx, w, offs):
    xs = x[idx.long()]
    h = xs.new_zeros(xs.shape[0], w.shape[1])
    _per_expert(offs, lambda e, lo, hi: h[lo:hi].copy_(xs[lo:hi] @ w[e].T))
    return swiglu_of(h), h


def _torch_dswiglu(dout, idx, w_down, h, s, offs):
    acc = torch.promote_types(dout.dtype, torch.float32)  # bf16 in, fp32 for the elementwise maths
    douts = dout[idx.long()].to(acc)
    da_raw = douts.new_zeros(douts.shape[0], w_down.shape[1])
    _per_expert(offs, lambda e, lo, hi: da_raw[lo:hi].copy_(douts[lo:hi] @ w_down[e].to(acc).T))
    return swiglu_backward(da_raw, h, s)


def swiglu_backward(da_raw, h, s):
    """The SwiGLU backward of ``06_2``'s epilogue, in torch: ``dA' (R, n)`` (before the routing
    weights), the forward's ``h (R, 2n)`` (gate, up interleaved), ``s (R,)`` -> ``(dh, s * a, ds)``."""
    acc = torch.promote_types(da_raw.dtype, torch.float32)
    da_raw = da_raw.to(acc)
    gate, up = (t.to(acc) for t in deinterleave(h))
    sig = torch.sigmoid(gate)
    silu_g = gate * sig
    a = silu_g * up  # recomputed from H, never kept
    s = s.to(acc)[:, None]
    da = da_raw * s
    dh = torch.stack((da * up * sig * (1 + gate * (1 - sig)), da * silu_g), dim=-1).reshape(h.shape)
    return dh.to(h.dtype), (s * a).to(h.dtype), (da_raw * a).sum(-1)


def _torch_weight_grad(dy, x, idx, offs):
    xs = x[idx.long()] if idx is not None else x
    out = dy.new_zeros(offs.numel(), dy.shape[1], x.shape[1])
    _per_expert(offs, lambda e, lo, hi: out[e].copy_(dy[lo:hi].T @ xs[lo:hi]))
    return out


def _torch_combine(rows, pos, weights):
    acc = torch.promote_types(rows.dtype, torch.float32)
    picked = rows.to(acc)[pos.long()]  # (T, k, d)
    summed = picked.sum(1) if weights is None else torch.einsum("tk,tkd->td", weights.to(acc), picked)
    return summed.to(rows.dtype)


TORCH_OPS = Ops(up=_torch_up, times_w=_torch_times_w, dswiglu=_torch_dswiglu, weight_grad=_torch_weight_grad,
                combine=_torch_combine)

# The same products on torch._grouped_mm (CUTLASS on Hopper): the library each of the course's
# kernels is measured against (benchmarks/bench_layer_kernels.py); no host sync. A transposed
# weight is passed as a transposed view: _grouped_mm reads either layout (autograd's backward
# through the torch._grouped_mm layer does the same).


def _grouped_mm_up(x, idx, w, offs):
    h = torch._grouped_mm(x[idx.long()], w.transpose(1, 2), offs=offs)
    return swiglu_of(h), h


def _grouped_mm_dswiglu(dout, idx, w_down, h, s, offs):
    return swiglu_backward(torch._grouped_mm(dout[idx.long()], w_down.transpose(1, 2), offs=offs), h, s)


def _grouped_mm_weight_grad(dy, x, idx, offs):
    return torch._grouped_mm(dy.t(), x[idx.long()] if idx is not None else x, offs=offs)  # offsets along K


GROUPED_MM_OPS = Ops(up=_grouped_mm_up, times_w=lambda x, w, offs: torch._grouped_mm(x, w, offs=offs),
                     dswiglu=_grouped_mm_dswiglu, weight_grad=_grouped_mm_weight_grad, combine=_torch_combine)


def kernel_ops(**defines) -> Ops:
    """The layer's products on the course's kernels; ``defines``: each GEMM built with these
    ``#define``\\ s too (an experiment's, as ``benchmarks/bench_layer_kernels.py --try`` times one)."""
    up, times_w, dswiglu, weight_grad = (step.with_defines(**defines) for step in
                                         (launch.SWIGLU, launch.TRANSPOSED_B, launch.DSWIGLU, launch.WEIGHT_GRAD))
    return Ops(
        up=lambda x, idx, w, offs: launch.swiglu_grouped_gemm(x, idx, w, offs, store_h=True, validate=False, step=up),
        times_w=lambda x, w, offs: launch.transposed_b_grouped_gemm(x, w, offs, validate=False, step=times_w),
        dswiglu=lambda dout, idx, w, h, s, offs: launch.dswiglu_grouped_gemm(dout, idx, w, h, s.contiguous(), offs,
                                                                            validate=False, step=dswiglu),
        weight_grad=lambda dy, x, idx, offs: launch.weight_grad(dy, x, idx, offs, validate=False, step=weight_grad),
        combine=lambda rows, pos, weights: launch.combine(rows, pos, weights, validate=False),
    )


KERNEL_OPS = kernel_ops()


def kernels_unavailable(x, d: int, n: int) -> str | None:
    """Why the course's kernels cannot run this layer (``None``: they can)."""
    m = info()
    if not x.is_cuda or not m.has_gpu:
        return f"the tensors are on {x.device}" if m.has_gpu else f"no GPU ({m.why_no_gpu})"
    if (m.compute_capability or (0, 0)) < (9, 0):
        return f"chapter 03's kernels need a Hopper GPU (sm_90a); this one is {m.compute_capability}"
    if x.dtype != torch.bfloat16:
        return f"the kernels take bf16, got {x.dtype}"
    if x.shape[0] == 0:
        return "an empty batch (0 tokens): nothing to launch"
    if d % 256 or n % 256:  # every product's N (2n, d, n) a multiple of 256 or 128, every K of 256
        return f"the kernels need d and n to be multiples of 256; got d={d}, n={n}"
    return None


def forward(x: torch.Tensor, kw: KernelWeights, k: int) -> torch.Tensor:
    """``x (T, d)`` bf16 on a Hopper GPU -> ``y (T, d)``, inference only (nothing kept):
    top-k routing, the two kernels, then the weighted combine."""
    r = route(x, kw.w_router, k)
    a, _ = launch.swiglu_grouped_gemm(x, r.gather_idx, kw.w_gate_up, r.offs, store_h=False, validate=False)
    return KERNEL_OPS.combine(KERNEL_OPS.times_w(a, kw.w_down, r.offs), r.pos, r.weights)


class Fp8Weights(NamedTuple):
    """One layer's experts in FP8 for chapter 07's kernels, quantised once (offline): e4m3
    weights, K-major, with one float32 scale per 128 x 128 block. ``gate_up (E, 2n, d)``
    interleaved as :class:`KernelWeights`'s; ``down (E, d, n)``, the down-projection's weight
    transposed (FP8 wgmma reads both operands K-major). The router stays as it is."""
    w_router: torch.Tensor
    gate_up: torch.Tensor
    gate_up_scales: torch.Tensor
    down: torch.Tensor
    down_scales: torch.Tensor


def prepare_fp8(kw: KernelWeights) -> Fp8Weights:
    """:class:`KernelWeights` quantised to :class:`Fp8Weights`, an expert at a time (the float32
    temporaries of a whole DeepSeek-V3 layer would not fit)."""
    from . import fp8

    return Fp8Weights(kw.w_router, *fp8.quantize_experts(fp8.quantize_blocks, kw.w_gate_up),
                      *fp8.quantize_experts(fp8.quantize_blocks, kw.w_down.transpose(1, 2).contiguous()))


# 07_4 gathers its token rows with cp.async from 128 producer threads instead of one TMA copy,
# and its mainloop runs up to a quarter slower than 07_3's where the GEMM is long (H100,
# record fp8_grouped_gemm: Mixtral and DeepSeek-V3 +23-25%, Qwen3 +3%, 7B -4%). What it saves
# is 07_1's pass over T k rows instead of T, a share of the up-projection that falls as 1 / 2n:
# 83% of 07_3's time on 7B (2n = 512), 34% on Qwen3 (1536), 12% on DeepSeek-V3 (4096).
FP8_GATHER_MAX_WIDTH = 2048


def gathers_in_kernel(fw: Fp8Weights) -> bool:
    """Whether :func:`forward_fp8` gathers the token rows inside the up-projection (07_4) rather
    than quantising the gathered rows first (07_1 on T k rows, then 07_3): where the experts are
    narrow (2n <= :data:`FP8_GATHER_MAX_WIDTH`), so the saved quantisation pass outweighs 07_4's
    slower loads."""
    return fw.gate_up.shape[1] <= FP8_GATHER_MAX_WIDTH


def forward_fp8(x: torch.Tensor, fw: Fp8Weights, k: int, gather: bool | None = None) -> torch.Tensor:
    """:func:`forward` with the experts in FP8 (chapter 07), inference only: the routing as
    there; the up-projection with SwiGLU and its output quantised in the epilogue; the
    down-projection (07_2); the weighted combine (06_4). Four launches, no host synchronisation.
    The up-projection either gathers the token rows in its load, quantised once (07_1 on the T
    rows, then 07_4: ``gather=True``), or takes the rows gathered and quantised (07_1 on T k
    rows, then 07_3: ``gather=False``); ``None`` chooses by :func:`gathers_in_kernel`."""
    if gather is None:
        gather = gathers_in_kernel(fw)
    r = route(x, fw.w_router, k)
    if gather:
        x_q, x_scales = launch.quantize_1x128(x, validate=False)  # the T token rows, once
        a_q, a_scales = launch.fp8_gather_swiglu_quantize(x_q, x_scales, r.gather_idx, fw.gate_up,
                                                          fw.gate_up_scales, r.offs, validate=False)
    else:
        x_q, x_scales = launch.quantize_1x128(x, r.gather_idx, validate=False)  # T k rows, gathered
        a_q, a_scales = launch.fp8_swiglu_quantize(x_q, x_scales, fw.gate_up, fw.gate_up_scales, r.offs,
                                                   validate=False)
    y = launch.fp8_grouped_gemm(a_q, a_scales, fw.down, fw.down_scales, r.offs, validate=False)
    return KERNEL_OPS.combine(y, r.pos, r.weights)


# --------------------------------------------------------------------------------------------
# Training: forward and backward as one torch.autograd.Function (chapter 06)
#
# What the forward keeps for the backward is what SonicMoE keeps: X, the pre-activation H and
# the routing (the top-k weights and experts, the sorted order). Not the gathered X, not A, not
# the expert outputs: the backward recomputes A from H, and gets each routing weight's gradient
# as <dA', A> (above) instead of from the expert outputs.


def combine_by_token(rows: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor | None, num_tokens: int):
    """``out[t] = sum over rows r of token t of weights[r] * rows[r]`` (``weights`` None: ones),
    fp32 sums: the combine of a routing where a token has any number of rows (token rounding).
    In torch (``index_add_``: atomic adds on a GPU, so the order of the sums may vary); the
    course's ``06_4`` takes exactly k rows per token."""
    acc = torch.promote_types(rows.dtype, torch.float32)
    terms = rows.to(acc) if weights is None else rows.to(acc) * weights.to(acc)[:, None]
    out = torch.zeros(num_tokens, rows.shape[1], dtype=acc, device=rows.device)
    return out.index_add_(0, tokens.long(), terms).to(rows.dtype)


class MoEFunction(torch.autograd.Function):
    """``out = MoEFunction.apply(x, w_router, w_gate_up, w_down, k, ops, routing="top-K", tile=DEFAULT_TILE)``:
    routing (:data:`ROUTINGS`: top-K, or chapter 04's token rounding to multiples of ``tile``),
    SwiGLU experts, weighted combine; ``w_gate_up`` is ``[E, 2n, d]`` interleaved, ``w_down``
    ``[E, n, d]`` (:class:`KernelWeights`'s layout)."""

    @staticmethod
    def forward(ctx, x, w_router, w_gate_up, w_down, k: int, ops: Ops, routing: str = "top-K",
                tile: int = tr.DEFAULT_TILE):
        r = route(x, w_router, k, routing, tile)
        a, h = ops.up(x, r.gather_idx, w_gate_up, r.offs)
        y = ops.times_w(a, w_down, r.offs)
        if r.pos is not None:  # top-K: each token has exactly k rows
            out = ops.combine(y, r.pos, r.weights)
        else:
            out = combine_by_token(y, r.gather_idx, r.row_weights, x.shape[0])
        # activations: X, H and the routing; the weights are kept anyway (they are parameters)
        ctx.save_for_backward(x, h, r.weights, r.experts, r.row_weights, r.pos, r.gather_idx, r.offs, r.probs,
                              r.row_experts, w_router, w_gate_up, w_down)
        ctx.ops = ops
        return out

    @staticmethod
    def backward(ctx, dout):
        (x, h, weights, experts, s, pos, gather_idx, offs, probs, row_experts,
         w_router, w_gate_up, w_down) = ctx.saved_tensors
        if h.numel() and h.untyped_storage().nbytes() == 0:
            raise RuntimeError("MoEFunction's backward ran twice on one forward (retain_graph=True): it frees H "
                               "after its one use, so a second backward needs a second forward")
        ops = ctx.ops
        T = x.shape[0]
        dout = dout.contiguous().to(x.dtype)
        acc = torch.promote_types(x.dtype, torch.float32)
        s = s.to(acc)  # the routing weight of each sorted row

        # in an order that lets each temporary go as soon as its last use is done
        dh, sa, ds = ops.dswiglu(dout, gather_idx, w_down, h, s, offs)
        # H's last use. Autograd would keep it until the backward returns; its memory goes back to
        # the allocator now, before the weight gradients are allocated (Mixtral: 0.9 GB less at the peak)
        h.untyped_storage().resize_(0)
        dw_down = ops.weight_grad(sa, dout, gather_idx, offs)
        del sa
        dx_rows = ops.times_w(dh, w_gate_up, offs)  # dh W1[e]; each token's rows summed next
        dx = ops.combine(dx_rows, pos, None) if pos is not None else combine_by_token(dx_rows, gather_idx, None, T)
        del dx_rows
        dw_gate_up = ops.weight_grad(dh, x, gather_idx, offs)
        del dh
        # the router: each row's ds -> the routing weights -> the logits
        if pos is not None:  # top-K: a softmax over each token's k top logits
            ds_pairs = ds.to(acc)[pos.long()]
            w_top = weights.to(acc)
            dtop = w_top * (ds_pairs - (w_top * ds_pairs).sum(-1, keepdim=True))
            dlogits = torch.zeros(T, w_router.shape[1], device=x.device, dtype=acc)
            dlogits.scatter_(1, experts, dtop)
        else:  # token rounding: the rows' weights are entries of the softmax over all E logits
            dprobs = torch.zeros(T, w_router.shape[1], device=x.device, dtype=acc)
            dprobs[gather_idx.long(), row_experts.long()] = ds.to(acc)  # each (token, expert) pair once
            p = probs.to(acc)
            dlogits = p * (dprobs - (p * dprobs).sum(-1, keepdim=True))
        # the router's two products in the layer's dtype, as autograd does them for x @ w_router
        # (in float32 they cost a copy of x in float32 and two slow GEMMs: 0.6 ms of Qwen3's 8)
        dlogits = dlogits.to(x.dtype)
        dx = torch.addmm(dx, dlogits, w_router.to(x.dtype).T)
        dw_router = x.T @ dlogits
        return (dx, dw_router.to(w_router.dtype), dw_gate_up.to(w_gate_up.dtype), dw_down.to(w_down.dtype),
                None, None, None, None)


class CourseMoE(torch.nn.Module):
    """A trainable MoE layer (top-k routing or token rounding, SwiGLU experts) whose forward and
    backward run on the course's kernels where they can (a Hopper GPU, bf16, d and n multiples of
    256), and on torch otherwise, with the same maths and the same memory plan
    (:class:`MoEFunction`). ``self.backend`` says which, and ``self.why_torch`` why not the kernels.
    ``routing``: one of :data:`ROUTINGS`; ``tile``: the rows per tile token rounding rounds to."""

    def __init__(self, d_model: int, d_hidden: int, num_experts: int, k: int, *, routing: str = "top-K",
                 tile: int = tr.DEFAULT_TILE, dtype=torch.bfloat16, device=None, generator: torch.Generator | None = None):
        super().__init__()
        check_choice(routing, "routing", ROUTINGS)
        check_int(d_model, "d_model", 1)
        check_int(d_hidden, "d_hidden", 1)
        check_int(num_experts, "num_experts", 1)
        check_int(k, "k", 1, num_experts, " (experts per token)")
        check_int(tile, "tile", 1)
        w = prepare(moe.random_weights(d_model, d_hidden, num_experts, device=device, generator=generator), dtype)
        self.k, self.routing, self.tile = k, routing, tile
        self.w_router = torch.nn.Parameter(w.w_router.to(dtype))
        self.w_gate_up = torch.nn.Parameter(w.w_gate_up.to(dtype))
        self.w_down = torch.nn.Parameter(w.w_down.to(dtype))
        self.backend, self.why_torch = "torch", "not run yet"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        self.why_torch = kernels_unavailable(x2, self.w_gate_up.shape[2], self.w_down.shape[1])
        self.backend = "torch" if self.why_torch else "kernels"
        ops = TORCH_OPS if self.why_torch else KERNEL_OPS
        y = MoEFunction.apply(x2, self.w_router, self.w_gate_up, self.w_down, self.k, ops, self.routing, self.tile)
        return y.reshape(*lead, y.shape[-1])

    def extra_repr(self) -> str:
        E, two_n, d = self.w_gate_up.shape
        rounding = "" if self.routing == "top-K" else f", tile={self.tile}"
        return f"d_model={d}, d_hidden={two_n // 2}, num_experts={E}, k={self.k}, routing={self.routing}{rounding}"
