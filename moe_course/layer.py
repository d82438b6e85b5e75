"""The MoE layer built from the course's own kernels (chapters 03 and 06).

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


def prepare(w: moe.MoEWeights) -> KernelWeights:
    """Chapter 01's weights (``w_gate``, ``w_up`` ``(E, d, n)``, ``w_down`` ``(E, n, d)``) in the
    kernels' layout, bf16 and contiguous."""
    E, d, n = w.w_gate.shape
    gate_up = torch.stack((w.w_gate.transpose(1, 2), w.w_up.transpose(1, 2)), dim=2).reshape(E, 2 * n, d)
    bf16 = lambda t: t.to(torch.bfloat16).contiguous()  # noqa: E731
    return KernelWeights(w.w_router, bf16(gate_up), bf16(w.w_down.transpose(1, 2)))


def forward(x: torch.Tensor, kw: KernelWeights, k: int) -> torch.Tensor:
    """``x (T, d)`` bf16 on a Hopper GPU -> ``y (T, d)``: top-k routing (softmax over the k
    largest logits), then the two kernels, then the weighted combine."""
    logits = moe.router_logits(x, kw.w_router)
    weights, experts = moe.topk_softmax(logits, k)
    d = moe.dispatch(experts, kw.w_gate_up.shape[0])
    gather_idx = d.token_of.to(torch.int32)
    offs = d.offsets[1:].to(torch.int32)
    a, _ = io_overlap.swiglu_grouped_gemm(x, gather_idx, kw.w_gate_up, offs, store_h=False, validate=False)
    y_sorted = gg.grouped_gemm(a, kw.w_down, offs, step=gg.BEST, validate=False)
    return moe.combine(y_sorted, d, weights)
