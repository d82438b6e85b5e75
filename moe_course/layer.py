"""The MoE layer built from the course's own kernels (chapters 03 and 06).

Status (2026-11-29): :func:`forward` (inference) is checked and measured on the H200
(``tests/test_layer.py``, ``bench_moe_variants.py``). The trainable layer below
(:class:`MoEFunction`, :class:`CourseMoE`) is checked on the CPU against autograd in float64
(``tests/test_layer_training.py``) with :data:`TORCH_OPS`; its :data:`KERNEL_OPS` path has not
run on a GPU yet, and its weight gradients still use ``torch._grouped_mm`` (issue 7).

:func:`forward` is chapter 01's layer (:func:`moe_course.moe.moe_forward` with the default
``topk_softmax`` router) with its expert step replaced by two kernels of chapter 03:

1. the up-projection with the token rows gathered inside the load and SwiGLU in the epilogue
   (``kernels/03_4_swiglu.cu``): tokens in, activations ``A = silu(x W_gate) * (x W_up)`` out,
   with no permuted copy of ``x`` and no separate activation pass;
2. the down-projection on ``A`` (``kernels/03_2_warp_specialized.cu``);

and the router and the combine in torch (the combine gathers each token's K rows and sums
them: no atomics). The weights are prepared once by :func:`prepare` in the kernels' layout.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import grouped_gemm as gg
from . import io_overlap, moe


class KernelWeights(NamedTuple):
    """One layer's weights in the kernels' layout: ``w_router (d, E)``; ``w_gate_up
    (E, 2n, d)``, the gate and up rows interleaved (03_4's SwiGLU epilogue); ``w_down (E, d, n)``
    (``[E, N, K]``, like ``nn.Linear``'s weight)."""
    w_router: torch.Tensor
    w_gate_up: torch.Tensor
    w_down: torch.Tensor


def prepare(w: moe.MoEWeights, dtype=torch.bfloat16) -> KernelWeights:
    """Chapter 01's weights (``w_gate``, ``w_up`` ``(E, d, n)``, ``w_down`` ``(E, n, d)``) in the
    kernels' layout, contiguous, the expert weights in ``dtype`` (``None``: as they are)."""
    E, d, n = w.w_gate.shape
    gate_up = torch.stack((w.w_gate.transpose(1, 2), w.w_up.transpose(1, 2)), dim=2).reshape(E, 2 * n, d)
    cast = lambda t: (t if dtype is None else t.to(dtype)).contiguous()  # noqa: E731
    return KernelWeights(w.w_router, cast(gate_up), cast(w.w_down.transpose(1, 2)))


class Routing(NamedTuple):
    """Top-k routing in the kernels' terms: ``weights``, ``experts`` ``(T, k)``; the sort
    (:class:`moe_course.moe.Dispatch`); each sorted row's token and each expert's end row, int32."""
    weights: torch.Tensor
    experts: torch.Tensor
    dispatch: moe.Dispatch
    gather_idx: torch.Tensor
    offs: torch.Tensor


def route(x: torch.Tensor, w_router: torch.Tensor, k: int) -> Routing:
    """Softmax over the k largest logits (:func:`moe_course.moe.topk_softmax`), rows sorted by expert."""
    weights, experts = moe.topk_softmax(moe.router_logits(x, w_router), k)
    d = moe.dispatch(experts, w_router.shape[1])
    return Routing(weights, experts, d, d.token_of.to(torch.int32), d.offsets[1:].to(torch.int32))


def forward(x: torch.Tensor, kw: KernelWeights, k: int) -> torch.Tensor:
    """``x (T, d)`` bf16 on a Hopper GPU -> ``y (T, d)``: top-k routing (softmax over the k
    largest logits), then the two kernels, then the weighted combine."""
    weights, _, d, gather_idx, offs = route(x, kw.w_router, k)
    a, _ = io_overlap.swiglu_grouped_gemm(x, gather_idx, kw.w_gate_up, offs, store_h=False, validate=False)
    y_sorted = gg.grouped_gemm(a, kw.w_down, offs, step=gg.BEST, validate=False)
    return moe.combine(y_sorted, d, weights)


# --------------------------------------------------------------------------------------------
# Training: forward and backward as one torch.autograd.Function (chapter 06)
#
# What the forward keeps for the backward is what SonicMoE keeps: X, the pre-activation H and
# the routing (the top-K weights and experts, the sorted order). Not the gathered X, not A, not
# the expert outputs: the backward recomputes A from H, and gets each routing weight's gradient
# as <dA', A> (below) instead of from the expert outputs.
#
# Notation, per sorted row r (token t = token_of[r], routing weight s_r):
#   h_r = x_t W1[e]^T (gate and up interleaved), a_r = silu(g_r) * u_r, y_r = a_r W2[e]^T,
#   out_t = sum_r s_r y_r.
# Backward, given dout:
#   dA'_r = dout_t W2[e]          (gathered up-projection's mirror: rows of dout gathered)
#   ds_r  = <dA'_r, a_r>          (since <dout_t, y_r> = <dout_t W2[e], a_r>)
#   da_r  = s_r dA'_r;  dg = da * u * silu'(g);  du = da * silu(g)
#   dX_t  = sum over t's rows of dh_r W1[e]       (a gather-sum: no atomics)
#   dW1[e] = sum over e's rows of dh_r^T x_t;  dW2[e] = sum over e's rows of (s_r dout_t)^T a_r
#   the router: ds -> the K top logits through their softmax -> dlogits -> dX, dW_router.


class Ops(NamedTuple):
    """The grouped products the layer needs, in one implementation.

    ``grouped(x, w, offs)``: rows of expert e times ``w[e]^T`` (``w [E, N, K]``);
    ``gathered(x, idx, w, offs)``: the same on rows ``x[idx]``, without writing them;
    ``up(x, idx, w_gate_up, offs)``: ``(a, h)``, the gathered up-projection and its SwiGLU;
    ``weight_grad(dy, x, offs)``: ``dW[e] = dy_e^T x_e``, ``[E, N, K]`` (a sum over e's rows).
    """
    grouped: object
    gathered: object
    up: object
    weight_grad: object


def _torch_weight_grad(dy, x, offs):
    out = dy.new_zeros(offs.numel(), dy.shape[1], x.shape[1])
    b = [0] + offs.tolist()  # the loop's one host sync
    for e in range(offs.numel()):
        if b[e + 1] > b[e]:
            out[e] = dy[b[e]:b[e + 1]].T @ x[b[e]:b[e + 1]]
    return out


def _torch_up(x, idx, w, offs):
    h = gg.torch_loop(x[idx.long()], w, offs)
    return io_overlap.swiglu_of(h), h


TORCH_OPS = Ops(grouped=gg.torch_loop, gathered=lambda x, idx, w, offs: gg.torch_loop(x[idx.long()], w, offs),
                up=_torch_up, weight_grad=_torch_weight_grad)


def _grouped_mm_weight_grad(dy, x, offs):
    """On the GPU for now: torch._grouped_mm's ragged-K form (one [N, K] product per expert,
    summed over its rows). The course's own kernel for it is still to come (issue 7)."""
    if not x.is_cuda or not hasattr(torch, "_grouped_mm"):
        return _torch_weight_grad(dy, x, offs)
    return torch._grouped_mm(dy.t(), x, offs=offs)


KERNEL_OPS = Ops(
    grouped=lambda x, w, offs: gg.grouped_gemm(x, w, offs, step=gg.BEST, validate=False),
    gathered=lambda x, idx, w, offs: io_overlap.gather_grouped_gemm(x, idx, w, offs, validate=False),
    up=lambda x, idx, w, offs: io_overlap.swiglu_grouped_gemm(x, idx, w, offs, store_h=True, validate=False),
    weight_grad=_grouped_mm_weight_grad,
)


def kernels_unavailable(x, d: int, n: int) -> str | None:
    """Why the course's kernels cannot run this layer (``None``: they can)."""
    from .machine import info

    m = info()
    if not x.is_cuda or not m.has_gpu:
        return f"the tensors are on {x.device}" if m.has_gpu else f"no GPU ({m.why_no_gpu})"
    if (m.compute_capability or (0, 0)) < (9, 0):
        return f"chapter 03's kernels need a Hopper GPU (sm_90a); this one is {m.compute_capability}"
    if x.dtype != torch.bfloat16:
        return f"the kernels take bf16, got {x.dtype}"
    if d % 256 or n % 256:  # every product's N (2n, d, n, d) a multiple of 256, every K of 64
        return f"the kernels need d and n to be multiples of 256; got d={d}, n={n}"
    return None


class MoEFunction(torch.autograd.Function):
    """``out = MoEFunction.apply(x, w_router, w_gate_up, w_down, k, ops)``: top-k routing
    (softmax over the k largest logits), SwiGLU experts, weighted combine; ``w_gate_up`` is
    ``[E, 2n, d]`` interleaved, ``w_down`` ``[E, d, n]`` (:class:`KernelWeights`'s layout)."""

    @staticmethod
    def forward(ctx, x, w_router, w_gate_up, w_down, k: int, ops: Ops):
        weights, experts, d, gather_idx, offs = route(x, w_router, k)  # weights fp32, experts int64
        a, h = ops.up(x, gather_idx, w_gate_up, offs)
        y_sorted = ops.grouped(a, w_down, offs)
        out = moe.combine(y_sorted, d, weights)
        # activations: X, H and the routing; the weights are kept anyway (they are parameters)
        ctx.save_for_backward(x, h, weights, experts, d.order, d.inverse, gather_idx, offs,
                              w_router, w_gate_up, w_down)
        ctx.k, ctx.ops = k, ops
        return out

    @staticmethod
    def backward(ctx, dout):
        x, h, weights, experts, order, inverse, gather_idx, offs, w_router, w_gate_up, w_down = ctx.saved_tensors
        ops, k = ctx.ops, ctx.k
        T, R = x.shape[0], gather_idx.numel()
        dout = dout.contiguous().to(x.dtype)
        acc = torch.promote_types(x.dtype, torch.float32)  # bf16 in, fp32 for the elementwise maths
        s = weights.reshape(-1)[order].to(acc)  # the routing weight of each sorted row

        # dA' = dout[token] W2[e]: W2 as [E, n, d] for the kernels' [E, N, K]
        da_raw = ops.gathered(dout, gather_idx, w_down.transpose(1, 2).contiguous(), offs).to(acc)
        gate, up = (t.to(acc) for t in io_overlap.deinterleave(h))
        sig = torch.sigmoid(gate)
        silu_g = gate * sig
        a = silu_g * up  # recomputed from H, never kept
        ds = (da_raw * a).sum(-1)  # (R,)
        da = da_raw * s[:, None]
        dgate = da * up * sig * (1 + gate * (1 - sig))
        dup = da * silu_g
        dh = torch.stack((dgate, dup), dim=-1).reshape(R, -1).to(x.dtype)  # interleaved like H

        # dX through the experts: dh W1[e] (W1 as [E, d, 2n]), then each token's K rows summed
        dx_rows = ops.grouped(dh, w_gate_up.transpose(1, 2).contiguous(), offs)
        dx = dx_rows[inverse].view(T, k, -1).to(acc).sum(1)
        # weight gradients, summed over each expert's rows
        dw_gate_up = ops.weight_grad(dh, x[gather_idx.long()], offs)
        dy_rows = (dout[gather_idx.long()].to(acc) * s[:, None]).to(x.dtype)
        dw_down = ops.weight_grad(dy_rows, a.to(x.dtype), offs)
        # the router: ds -> the softmax over the k top logits -> all E logits
        ds_pairs = ds[inverse].view(T, k)
        w_top = weights.to(acc)
        dtop = w_top * (ds_pairs - (w_top * ds_pairs).sum(-1, keepdim=True))
        dlogits = torch.zeros(T, w_router.shape[1], device=x.device, dtype=acc)
        dlogits.scatter_(1, experts, dtop)
        dx = dx + dlogits @ w_router.to(acc).T
        dw_router = x.to(acc).T @ dlogits
        return (dx.to(x.dtype), dw_router.to(w_router.dtype), dw_gate_up.to(w_gate_up.dtype),
                dw_down.to(w_down.dtype), None, None)


class CourseMoE(torch.nn.Module):
    """A trainable MoE layer (top-k routing, SwiGLU experts) whose forward and backward run on
    the course's kernels where they can (a Hopper GPU, bf16, d and n multiples of 256), and on
    torch otherwise, with the same maths and the same memory plan (:class:`MoEFunction`).
    ``self.backend`` says which, and ``self.why_torch`` why not the kernels."""

    def __init__(self, d_model: int, d_hidden: int, num_experts: int, k: int, *, dtype=torch.bfloat16,
                 device=None, generator: torch.Generator | None = None):
        super().__init__()
        w = prepare(moe.random_weights(d_model, d_hidden, num_experts, device=device, generator=generator), dtype)
        self.k = k
        self.w_router = torch.nn.Parameter(w.w_router.to(dtype))
        self.w_gate_up = torch.nn.Parameter(w.w_gate_up.to(dtype))
        self.w_down = torch.nn.Parameter(w.w_down.to(dtype))
        self.backend, self.why_torch = "torch", "not run yet"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        self.why_torch = kernels_unavailable(x2, self.w_gate_up.shape[2], self.w_down.shape[2])
        self.backend = "torch" if self.why_torch else "kernels"
        ops = TORCH_OPS if self.why_torch else KERNEL_OPS
        y = MoEFunction.apply(x2, self.w_router, self.w_gate_up, self.w_down, self.k, ops)
        return y.reshape(*lead, -1)
