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
- ``layer_weight_grads(x, w, k, dout)`` (given in the notebook): the three put together, the
  gradients of a whole layer's router and expert weights

The references are autograd's gradients of the forward formulas (not the course's hand-written
backward), on fresh random inputs: rows with a zero routing weight, gates far into silu's flat
and steep parts (beyond exp's range, where a ratio of exponentials is inf / inf), experts with
no rows (a gradient left in ``torch.empty`` memory comes back NaN), one expert with every row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import layer, moe
from ..checking import CheckFailed, check_close, check_shape, check_true, grading
from . import CASES, as_graded, as_outputs, check_close_or_explain, fresh_seed, generator, router_inputs

TITLE = "Exercise 05"


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


#: exp(g) overflows float64 beyond this
EXP_LIMIT = 709.8


def swiglu_cases(seed: int) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(name, da_raw, h, s), float64, drawn afresh from ``seed``."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    saturated = randn(9, 6, scale=1.0)
    saturated[:, 0::2] = torch.tensor([-1000.0, -40.0, -8.0, -1.0, 0.0, 1e-3, 1.0, 8.0, 1000.0])[:, None]
    beyond_exp = randn(8, 8)  # |gate| from 710 (just past EXP_LIMIT) to 1e5, both signs
    sign = torch.tensor([-1.0, 1.0], dtype=torch.float64).repeat(16)
    beyond_exp[:, 0::2] = (sign * 10 ** (2.852 + 2.148 * torch.rand(32, generator=g, dtype=torch.float64))).view(8, 4)
    return [
        ("one row", randn(1, 3), randn(1, 6), torch.rand(1, generator=g, dtype=torch.float64)),
        ("ragged rows", randn(37, 5), randn(37, 10, scale=2.0), torch.rand(37, generator=g, dtype=torch.float64)),
        ("rows with routing weight 0", randn(12, 4), randn(12, 8), torch.tensor([0.0, 1.0] * 6, dtype=torch.float64)),
        ("gates deep in silu's flat and steep parts", randn(9, 3), saturated, torch.rand(9, generator=g, dtype=torch.float64)),
        ("gates beyond exp's range", randn(8, 4), beyond_exp, torch.rand(8, generator=g, dtype=torch.float64)),
    ]


def _dh_mistakes(da_raw, h, s) -> dict:
    """What dh would be for each likely mistake: ``{why: function giving it}``."""
    g, u = h[:, 0::2], h[:, 1::2]
    sig = torch.sigmoid(g)

    def interleave(dg, du):
        return torch.stack((dg, du), dim=-1).reshape(h.shape)

    def read_as_halves():  # gate | up halves, written back the same way
        n = h.shape[1] // 2
        halves = swiglu_reference(da_raw, torch.stack((h[:, :n], h[:, n:]), dim=-1).reshape(h.shape), s)[0]
        return torch.cat((halves[:, 0::2], halves[:, 1::2]), dim=1)

    return {
        "dh ignores the routing weight s (dA = s * dA')":
            lambda: interleave(da_raw * u * sig * (1 + g * (1 - sig)), da_raw * F.silu(g)),
        "silu'(g) is taken as sig(g); it is sig(g) (1 + g (1 - sig(g)))":
            lambda: interleave(s[:, None] * da_raw * u * sig, s[:, None] * da_raw * F.silu(g)),
        "h is read as gate | up halves; it is interleaved: gate_j at column 2j, up_j at 2j + 1": read_as_halves,
    }


def _check_finite(name: str, got, h, where: str) -> None:
    """A NaN or inf where the right answer is finite: name the gate that overflowed, or, where
    the gates are moderate, the memory that was never written."""
    got = torch.as_tensor(got)
    bad = ~torch.isfinite(got)
    if not bool(bad.any()):
        return
    r = int(bad.nonzero()[0][0])
    gates = h[r, 0::2]
    gate = float(gates[gates.abs().argmax()])
    first = f"{name} {where}: {int(bad.sum())} values are {float(got[bad][0])} (first in row {r}, whose largest gate is {gate:g})"
    if abs(gate) > EXP_LIMIT:
        raise CheckFailed(
            f"{first}. Beyond |g| = {EXP_LIMIT}, exp(|g|) is inf in float64, and inf / inf or inf * 0, as in "
            f"exp(g) / (1 + exp(g)), exp(-g) / (1 + exp(-g))**2 or exp(-g) * sig**2, is NaN. Use torch.sigmoid "
            f"(or F.silu); a plain 1 / (1 + exp(-g)) survives (1 / inf = 0).")
    raise CheckFailed(f"{first}: no overflow at such gates, so part of the result was never written? (The grader "
                      f"fills torch.empty's memory with NaN.)")


def grade_swiglu_backward(swiglu_backward, seed: int | None = None) -> None:
    """``swiglu_backward(da_raw (R, n), h (R, 2n), s (R,)) -> (dh, sa, ds)``."""
    seed = fresh_seed(seed)
    swiglu_backward = as_graded(swiglu_backward, REFERENCES)
    with grading(f"{TITLE} · the SwiGLU backward"):
        for name, da_raw, h, s in swiglu_cases(seed):
            where = f"[{name}, R={h.shape[0]}, n={h.shape[1] // 2}, seed={seed}]"
            dh, sa, ds = as_outputs("swiglu_backward", swiglu_backward(da_raw.clone(), h.clone(), s.clone()), 3, where)
            want_dh, want_sa, want_ds = swiglu_reference(da_raw, h, s)
            for got, want, label, mistakes in ((dh, want_dh, "dh", _dh_mistakes(da_raw, h, s)),
                                               (sa, want_sa, "sa = s * silu(gate) * up", {}),
                                               (ds, want_ds, "ds = <dA', a> per row (a without s)", {})):
                check_shape(f"{label} {where}", got, want.shape)
                _check_finite(label, got, h, where)
                check_close_or_explain(f"{label} {where}", got, want, mistakes, rtol=1e-6, atol=1e-9)


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
    topk_softmax_backward = as_graded(topk_softmax_backward, REFERENCES)
    with grading(f"{TITLE} · through the softmax over the top k"):
        for T, k in ((1, 1), (5, 1), (17, 2), (33, 8)):
            logits = torch.randn(T, k, generator=g, dtype=torch.float64) * 3
            ds = torch.randn(T, k, generator=g, dtype=torch.float64)
            weights = logits.softmax(dim=-1)
            where = f"[T={T}, k={k}, seed={seed}]"
            (got,) = as_outputs("topk_softmax_backward", topk_softmax_backward(ds.clone(), weights.clone()), 1, where)
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


def weight_grad_cases(seed: int) -> dict[str, list[int]]:
    """Rows per expert: fixed awkward ones, and a random ragged one with empty experts at both
    ends and inside."""
    g = torch.Generator().manual_seed(seed)
    ragged = torch.randint(0, 6, (9,), generator=g)
    ragged[[0, int(torch.randint(1, 8, (1,), generator=g)), 8]] = 0
    ragged[ragged.argmax()] += 1  # at least one row
    return {"ragged, experts with no rows": [0, 3, 0, 5, 1, 0], "one expert has every row": [0, 0, 9, 0],
            "a single expert": [7], "random ragged, empty at both ends": ragged.tolist()}


def grade_weight_grad(weight_grad, seed: int | None = None) -> None:
    """``weight_grad(dy (R, N), x (T, K), gather_idx (R,), offs (E,)) -> (E, N, K)``."""
    seed = fresh_seed(seed)
    g = torch.Generator().manual_seed(seed)
    weight_grad = as_graded(weight_grad, REFERENCES)
    with grading(f"{TITLE} · the weight gradients"):
        for name, counts in weight_grad_cases(seed).items():
            T, N, K = 6, 3, 4
            R = sum(counts)
            offs = torch.tensor(counts).cumsum(0)
            gather_idx = torch.randint(0, T, (R,), generator=g)
            dy = torch.randn(R, N, generator=g, dtype=torch.float64)
            x = torch.randn(T, K, generator=g, dtype=torch.float64)
            where = f"[{name}: rows per expert {counts}, seed={seed}]"
            (got,) = as_outputs("weight_grad", weight_grad(dy.clone(), x.clone(), gather_idx.clone(), offs.clone()),
                                1, where)
            want = weight_grad_reference(dy, x, gather_idx, offs)
            check_shape(f"dW {where} (E, N, K)", got, want.shape)
            got = torch.as_tensor(got)
            for e, c in enumerate(counts):
                check_true(f"dW[{e}] {where}", c or not bool(torch.isnan(got[e]).any()),
                           "this expert has no rows and its gradient is NaN: it was never written. The grader "
                           "fills torch.empty's memory with NaN, as memory left over from earlier work could "
                           "hold anything (often zeros on a CPU, so it passes there by luck): start from zeros "
                           "(torch.zeros, new_zeros) or write every expert")
                check_close(f"dW[{e}] {where}" + (" (an expert with no rows: zeros)" if c == 0 else ""),
                            got[e], want[e], rtol=1e-6, atol=1e-9)


#: The course's answers to this exercise (its hand-written backward, the references above, the
#: layer autograd differentiates): a learner's function that calls one is refused.
REFERENCES = (layer.swiglu_backward, layer.TORCH_OPS.dswiglu, layer.TORCH_OPS.weight_grad,
              layer.GROUPED_MM_OPS.weight_grad, moe.moe_forward, swiglu_reference, softmax_reference,
              weight_grad_reference)


# --------------------------------------------------------------------------------------------
# 4. The whole layer: the three pieces put together, against autograd

#: The layer's weights; for each, the pieces its gradient comes from, and how close it must be
#: to autograd's (largest difference / largest value). The router's weights are float32 in
#: ``moe.topk_softmax`` (routers run in fp32), so autograd's router gradient is float32-exact.
WEIGHTS = {"w_router": ("ds of swiglu_backward and topk_softmax_backward", 1e-5),
           "w_gate": ("dh of swiglu_backward and weight_grad", 1e-9),
           "w_up": ("dh of swiglu_backward and weight_grad", 1e-9),
           "w_down": ("sa of swiglu_backward and weight_grad", 1e-9)}


def grade_whole_layer(layer_weight_grads, seed: int | None = None) -> None:
    """``layer_weight_grads(x (T, d), w: moe.MoEWeights, k, dout (T, d)) -> {name: gradient}``
    for every name in :data:`WEIGHTS`: the gradients of ``<moe.moe_forward(x, w, k).y, dout>``,
    in float64, on the layers of :data:`~moe_course.graders.CASES` (k = 1, experts with no
    rows), against autograd through ``moe.moe_forward``."""
    seed = fresh_seed(seed)
    gen = generator(seed, "cpu")
    layer_weight_grads = as_graded(layer_weight_grads, REFERENCES)
    worst = dict.fromkeys(WEIGHTS, 0.0)
    with grading(f"{TITLE} · the whole layer against autograd"):
        for case in CASES:
            where = f"{case}, n={case.d // 2}, seed {seed}"
            x, w_router = router_inputs(case, gen, dtype=torch.float64)
            w = moe.random_weights(case.d, case.d // 2, case.E, dtype=torch.float64, generator=gen)
            w = w._replace(w_router=w_router)
            dout = torch.randn(case.T, case.d, generator=gen, dtype=torch.float64)
            leaves = moe.MoEWeights(*(t.clone().requires_grad_() for t in w))
            moe.moe_forward(x, leaves, case.K).y.backward(dout)
            (got,) = as_outputs("layer_weight_grads", layer_weight_grads(
                x.clone(), moe.MoEWeights(*(t.clone() for t in w)), case.K, dout.clone()), 1, where)
            check_true(f"layer_weight_grads ({where})", isinstance(got, dict) and set(got) == set(WEIGHTS),
                       f"expected a dict with the keys {sorted(WEIGHTS)}, got {type(got).__name__} "
                       f"{sorted(got) if isinstance(got, dict) else ''}")
            for name, (pieces, tolerance) in WEIGHTS.items():
                want = getattr(leaves, name).grad
                check_shape(f"gradient of {name} ({where})", got[name], want.shape)
                scale = float(want.abs().max()) or 1.0  # k = 1: the router gets no gradient at all
                err = float((torch.as_tensor(got[name]).double() - want).abs().max()) / scale
                check_true(f"gradient of {name} ({where})", err <= tolerance,
                           f"largest difference from autograd {err:.1e} of its largest value (allowed "
                           f"{tolerance:g}); it comes from {pieces}")
                worst[name] = max(worst[name], err)
        for name, err in worst.items():
            print(f"{name:<9} largest difference from autograd over {len(CASES)} layers: {err:.1e} of its "
                  f"largest value")
