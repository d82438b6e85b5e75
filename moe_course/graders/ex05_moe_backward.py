"""Grader of exercise 05, the MoE layer's backward (chapter 06's maths, in torch).

The learner writes (notation of :mod:`moe_course.layer`: per sorted row ``r`` of an expert,
``h_r`` the pre-activation with gate and up interleaved, ``s_r`` the routing weight):

- ``swiglu_backward(da_raw (R, n), h (R, 2n), s (R,)) -> (dh (R, 2n), sa (R, n), ds (R,))``:
  given ``dA' = dout W_down[e]^T`` per row, the gradient of the pre-activation (interleaved like
  ``h``), ``s * a`` with ``a = silu(gate) * up``, and the routing weight's gradient ``<dA', a>``
- ``topk_softmax_backward(ds (T, k), weights (T, k)) -> (T, k)``: the gradient of each token's
  k top logits, given the gradient of the softmax weights over them
- ``weight_grad(dy (R, N), x (T, K), gather_idx (R,), offs (E,)) -> (E, N, K)``: each expert's
  ``dy_e^T x[gather_idx]_e``, zero for an expert with no rows

The references are autograd's gradients of the forward formulas (not the course's hand-written
backward), on fresh random inputs: rows with a zero routing weight, gates far into silu's flat
and steep parts, experts with no rows, one expert with every row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checking import CheckFailed, check_close, check_shape, grading
from . import fresh_seed

TITLE = "Exercise 05"


def _outputs(name: str, result, count: int) -> tuple:
    if result is None:
        raise CheckFailed(f"{name}: got None (did the function forget to return its result?)")
    if count > 1 and (not isinstance(result, (tuple, list)) or len(result) != count):
        raise CheckFailed(f"{name}: expected a tuple of {count} tensors, got {type(result).__name__}")
    return tuple(result) if count > 1 else (result,)


# --------------------------------------------------------------------------------------------
# 1. The SwiGLU backward


def swiglu_reference(da_raw, h, s):
    """autograd through ``L = sum_r s_r <dA'_r, a_r>``, ``a = silu(gate) * up``: returns
    ``(dL/dh, s * a, dL/ds)``."""
    h = h.detach().clone().requires_grad_()
    s = s.detach().clone().requires_grad_()
    a = F.silu(h[:, 0::2]) * h[:, 1::2]
    (s[:, None] * a * da_raw).sum().backward()
    return h.grad, (s[:, None] * a).detach(), s.grad


def swiglu_cases(seed: int) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(name, da_raw, h, s), float64, drawn afresh from ``seed``."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    saturated = randn(9, 6, scale=1.0)
    saturated[:, 0::2] = torch.tensor([-1000.0, -40.0, -8.0, -1.0, 0.0, 1e-3, 1.0, 8.0, 1000.0])[:, None]
    return [
        ("one row", randn(1, 3), randn(1, 6), torch.rand(1, generator=g, dtype=torch.float64)),
        ("ragged rows", randn(37, 5), randn(37, 10, scale=2.0), torch.rand(37, generator=g, dtype=torch.float64)),
        ("rows with routing weight 0", randn(12, 4), randn(12, 8), torch.tensor([0.0, 1.0] * 6, dtype=torch.float64)),
        ("gates deep in silu's flat and steep parts", randn(9, 3), saturated, torch.rand(9, generator=g, dtype=torch.float64)),
    ]


def _hint_dh(da_raw, h, s, got_dh) -> str:
    """Name a likely mistake when dh is wrong, by comparing with what it would produce."""
    g, u = h[:, 0::2], h[:, 1::2]
    sig = torch.sigmoid(g)

    def interleave(dg, du):
        return torch.stack((dg, du), dim=-1).reshape(h.shape)

    mistakes = {
        "dh ignores the routing weight s (dA = s * dA')": interleave(da_raw * u * sig * (1 + g * (1 - sig)), da_raw * F.silu(g)),
        "silu'(g) is sig(g) (1 + g (1 - sig(g))), not sig(g)": interleave(s[:, None] * da_raw * u * sig, s[:, None] * da_raw * F.silu(g)),
    }
    n = h.shape[1] // 2  # read as gate | up halves, written back the same way
    halves = swiglu_reference(da_raw, torch.stack((h[:, :n], h[:, n:]), dim=-1).reshape(h.shape), s)[0]
    mistakes["h is interleaved: gate_j at column 2j, up_j at 2j + 1, not gate | up halves"] = torch.cat(
        (halves[:, 0::2], halves[:, 1::2]), dim=1)
    for why, wrong in mistakes.items():
        if got_dh.shape == wrong.shape and torch.allclose(got_dh.double(), wrong, rtol=1e-6, atol=1e-9):
            return f" ({why})"
    return ""


def grade_swiglu_backward(swiglu_backward, seed: int | None = None) -> None:
    """``swiglu_backward(da_raw (R, n), h (R, 2n), s (R,)) -> (dh, sa, ds)``."""
    seed = fresh_seed(seed)
    with grading(f"{TITLE} · the SwiGLU backward"):
        for name, da_raw, h, s in swiglu_cases(seed):
            where = f"[{name}, R={h.shape[0]}, n={h.shape[1] // 2}, seed={seed}]"
            dh, sa, ds = _outputs(f"swiglu_backward {where}", swiglu_backward(da_raw.clone(), h.clone(), s.clone()), 3)
            want_dh, want_sa, want_ds = swiglu_reference(da_raw, h, s)
            check_shape(f"dh {where}", dh, want_dh.shape)
            try:
                check_close(f"dh {where}", dh, want_dh, rtol=1e-6, atol=1e-9)
            except CheckFailed as exc:
                raise CheckFailed(str(exc) + _hint_dh(da_raw, h, s, torch.as_tensor(dh))) from None
            check_shape(f"sa {where}", sa, want_sa.shape)
            check_close(f"sa = s * silu(gate) * up {where}", sa, want_sa, rtol=1e-6, atol=1e-9)
            check_shape(f"ds {where}", ds, want_ds.shape)
            check_close(f"ds = <dA', a> per row (a without s) {where}", ds, want_ds, rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------------------------
# 2. Through the softmax over the k top logits


def softmax_reference(ds, weights_logits):
    logits = weights_logits.detach().clone().requires_grad_()
    (logits.softmax(dim=-1) * ds).sum().backward()
    return logits.grad


def grade_topk_softmax_backward(topk_softmax_backward, seed: int | None = None) -> None:
    """``topk_softmax_backward(ds (T, k), weights (T, k)) -> (T, k)``."""
    seed = fresh_seed(seed)
    g = torch.Generator().manual_seed(seed)
    with grading(f"{TITLE} · through the softmax over the top k"):
        for T, k in ((1, 1), (5, 1), (17, 2), (33, 8)):
            logits = torch.randn(T, k, generator=g, dtype=torch.float64) * 3
            ds = torch.randn(T, k, generator=g, dtype=torch.float64)
            weights = logits.softmax(dim=-1)
            where = f"[T={T}, k={k}, seed={seed}]"
            (got,) = _outputs(f"topk_softmax_backward {where}", topk_softmax_backward(ds.clone(), weights.clone()), 1)
            want = softmax_reference(ds, logits)
            check_shape(f"dlogits {where}", got, want.shape)
            hint = " (with k = 1 the one weight is always 1: its logit gets no gradient)" if k == 1 else ""
            try:
                check_close(f"dlogits {where}", got, want, rtol=1e-6, atol=1e-9)
            except CheckFailed as exc:
                raise CheckFailed(str(exc) + hint) from None


# --------------------------------------------------------------------------------------------
# 3. Weight gradients, summed over each expert's rows


def weight_grad_reference(dy, x, gather_idx, offs):
    E, K = offs.numel(), x.shape[1]
    w = torch.zeros(E, dy.shape[1], K, dtype=dy.dtype, requires_grad=True)
    xs, lo, parts = x[gather_idx], 0, []
    for e, hi in enumerate(offs.tolist()):
        parts.append(xs[lo:hi] @ w[e].T)
        lo = hi
    (torch.cat(parts) * dy).sum().backward()
    return w.grad


def grade_weight_grad(weight_grad, seed: int | None = None) -> None:
    """``weight_grad(dy (R, N), x (T, K), gather_idx (R,), offs (E,)) -> (E, N, K)``."""
    seed = fresh_seed(seed)
    g = torch.Generator().manual_seed(seed)
    cases = {"ragged, experts with no rows": [0, 3, 0, 5, 1, 0], "one expert has every row": [0, 0, 9, 0],
             "a single expert": [7]}
    with grading(f"{TITLE} · the weight gradients"):
        for name, counts in cases.items():
            T, N, K = 6, 3, 4
            R = sum(counts)
            offs = torch.tensor(counts).cumsum(0)
            gather_idx = torch.randint(0, T, (R,), generator=g)
            dy = torch.randn(R, N, generator=g, dtype=torch.float64)
            x = torch.randn(T, K, generator=g, dtype=torch.float64)
            where = f"[{name}: rows per expert {counts}, seed={seed}]"
            (got,) = _outputs(f"weight_grad {where}", weight_grad(dy.clone(), x.clone(), gather_idx.clone(), offs.clone()), 1)
            want = weight_grad_reference(dy, x, gather_idx, offs)
            check_shape(f"dW {where} (E, N, K)", got, want.shape)
            for e, c in enumerate(counts):
                check_close(f"dW[{e}] {where}" + (" (an expert with no rows: zeros)" if c == 0 else ""),
                            torch.as_tensor(got)[e], want[e], rtol=1e-6, atol=1e-9)
