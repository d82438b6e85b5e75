"""The reference maths of a mixture-of-experts (MoE) layer, readable top to bottom.

Every check in the course (exercise graders, kernel tests, later chapters) compares against
the functions here. Notation, used in every docstring:

- ``T`` tokens, ``d`` model width, ``n`` hidden width of one expert, ``E`` experts,
  ``K`` experts per token (top-K), ``C`` tokens per expert (capacity).

One forward pass, in the order of this file:

1. **router**: a linear map gives each token ``E`` logits; the router keeps ``K`` experts per
   token and a weight for each (:func:`topk_softmax` and friends).
2. **dispatch**: the ``T*K`` (token, expert) pairs are sorted by expert, so each expert's tokens
   sit in one contiguous block of rows (:func:`dispatch`, :func:`permute`).
3. **experts**: each block goes through its expert's SwiGLU feed-forward network
   (:func:`swiglu`, :func:`experts_forward`): three matrix products per expert; or all experts
   at once, three ``torch._grouped_mm`` calls (:func:`experts_forward_grouped_mm`).
4. **combine**: the rows go back to token order (the inverse permutation) and each token sums
   its ``K`` expert outputs, weighted by the router (:func:`combine`).

Then the load-balancing pieces: auxiliary losses (:func:`switch_aux_loss`,
:func:`gshard_aux_loss`), expert capacity (:func:`expert_capacity`), each pair's place in its
expert's queue (:func:`expert_queues`, with no host sync) and token dropping (:func:`drop_tokens`);
and :class:`MoELayer`, the whole layer as an ``nn.Module``.

Weights are stored for ``x @ W`` (input features first): the router is ``(d, E)``, the experts
``(E, d, n)``, ``(E, d, n)`` and ``(E, n, d)``. The real models' shapes are in
:mod:`moe_course.configs`.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import (check_device, check_finite, check_ids_in_range, check_int, check_offsets, check_same_dtype,
                     require)
from .machine import info

# --------------------------------------------------------------------------------------------
# Input checks (moe_course.checks): bad input gets an error that names the argument.


def _check_tensor(name: str, t, ndim: int, what: str) -> None:
    require(isinstance(t, Tensor), f"{name} must be a torch.Tensor {what}, got {type(t).__name__}")
    require(t.dim() == ndim, f"{name} must be {what} ({ndim} dimensions), got shape {tuple(t.shape)}")


def _check_k(k, num_experts: int) -> None:
    require(isinstance(k, int) and not isinstance(k, bool),
             f"k (experts per token) must be an int, got {type(k).__name__}")
    require(1 <= k <= num_experts,
             f"k (experts per token) must be between 1 and the number of experts ({num_experts}), got {k}")


def _check_experts(experts, num_experts: int) -> None:
    _check_tensor("experts", experts, 2, "of expert ids, shape (T, K)")
    require(not experts.is_floating_point() and experts.dtype != torch.bool,
             f"experts must hold integer expert ids, got dtype {experts.dtype}")
    require(isinstance(num_experts, int) and num_experts >= 1,
             f"num_experts must be a positive int, got {num_experts!r}")
    check_ids_in_range(experts, num_experts, "experts", f"the {num_experts} experts")


def device() -> str:
    """The torch device the course's torch-level code runs on: ``"cuda"`` where this machine
    has a usable GPU (see :func:`moe_course.machine.info`), else ``"cpu"``."""
    return "cuda" if info().has_gpu and torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------------
# Random weights and synthetic router logits (the shapes of real models are in ``configs``)


class MoEWeights(NamedTuple):
    """All the weights of one MoE layer.

    - ``w_router``: ``(d, E)``
    - ``w_gate``, ``w_up``: ``(E, d, n)``, the two input projections of each SwiGLU expert
    - ``w_down``: ``(E, n, d)``, each expert's output projection
    """
    w_router: Tensor
    w_gate: Tensor
    w_up: Tensor
    w_down: Tensor

    @property
    def num_experts(self) -> int:
        return self.w_router.shape[1]


def random_weights(d: int, n: int, num_experts: int, *, dtype=torch.float32, device=None,
                   generator: torch.Generator | None = None) -> MoEWeights:
    """Random :class:`MoEWeights` (``w_router (d, E)``, ``w_gate, w_up (E, d, n)``,
    ``w_down (E, n, d)``), scaled by ``1/sqrt(fan_in)`` so activations stay of order one."""
    for name, v in (("d", d), ("n", n), ("num_experts", num_experts)):
        check_int(v, name, 1)
    check_device(device)

    def randn(*shape, fan_in):
        w = torch.randn(*shape, generator=generator, device=device or "cpu", dtype=torch.float32)
        return w.div_(math.sqrt(fan_in)).to(dtype)  # in place: full-size fp32 weights are large

    return MoEWeights(randn(d, num_experts, fan_in=d), randn(num_experts, d, n, fan_in=d),
                      randn(num_experts, d, n, fan_in=d), randn(num_experts, n, d, fan_in=n))


def skewed_logits(num_tokens: int, num_experts: int, skew: float = 0.0, *,
                  generator: torch.Generator | None = None, device=None) -> Tensor:
    """Synthetic router logits ``(T, E)`` for demos: standard normal noise plus a preference
    ``-skew * log(1 + e)`` for expert ``e``. ``skew = 0`` is an unbiased router; the larger the
    skew, the more tokens the low-numbered experts attract (a Zipf-like popularity)."""
    check_int(num_tokens, "num_tokens", 0)
    check_int(num_experts, "num_experts", 1)
    check_device(device)
    noise = torch.randn(num_tokens, num_experts, generator=generator, device=device or "cpu")
    bias = -skew * torch.log1p(torch.arange(num_experts, dtype=torch.float32, device=noise.device))
    return noise + bias


# --------------------------------------------------------------------------------------------
# 1. Router: E logits per token -> K experts per token and their weights


class TopK(NamedTuple):
    """A token-choice routing: each token's ``K`` experts and their combine weights.

    - ``weights``: ``(T, K)`` float32, each token's weight for each of its experts
    - ``experts``: ``(T, K)`` int64, expert ids, each row ordered from the highest score down
    """
    weights: Tensor
    experts: Tensor


def router_logits(x: Tensor, w_router: Tensor) -> Tensor:
    """``(T, d) @ (d, E) -> (T, E)``: how much each token wants each expert."""
    _check_tensor("x", x, 2, "of tokens, shape (T, d)")
    _check_tensor("w_router", w_router, 2, "shape (d, E)")
    require(x.shape[1] == w_router.shape[0],
             f"x has width d={x.shape[1]} but w_router expects d={w_router.shape[0]} (shape (d, E))")
    check_same_dtype({"x": x, "w_router": w_router})
    return x @ w_router


def _check_logits(logits: Tensor) -> None:
    """``(T, E)``, no NaN or infinity: a NaN logit would give its token NaN weights, and the
    NaN would spread to every output it is summed into (one reduction, one synchronisation)."""
    _check_tensor("logits", logits, 2, "shape (T, E)")
    check_finite(logits, "logits")


def router_probs(logits: Tensor) -> Tensor:
    """``(T, E) -> (T, E)``: softmax over the experts, in float32 (routers run in fp32 even when
    the layer runs in bf16: small logit differences decide which expert a token gets)."""
    _check_logits(logits)
    return logits.float().softmax(dim=-1)


def softmax_topk(logits: Tensor, k: int) -> TopK:
    """Softmax over all ``E`` experts, then keep the ``k`` largest probabilities as they are
    (Switch Transformer, GShard): each token's weights sum to *less* than one.

    ``logits (T, E) -> TopK(weights (T, k), experts (T, k))``
    """
    probs = router_probs(logits)
    _check_k(k, probs.shape[1])
    weights, experts = probs.topk(k, dim=-1)
    return TopK(weights, experts)


def topk_softmax(logits: Tensor, k: int, validate: bool = True) -> TopK:
    """Keep the ``k`` largest logits, then softmax over those ``k`` only (Mixtral; Qwen3 with
    ``norm_topk_prob``): each token's weights sum to one. Since softmax keeps the order, it picks
    the same experts as :func:`softmax_topk`; its weights are those renormalised.

    ``logits (T, E) -> TopK(weights (T, k), experts (T, k))``. ``validate=False`` skips the NaN
    check (a reduction read back by the host): a decode step captured in a CUDA graph
    (:mod:`moe_course.decode`) must not wait for the device.
    """
    if validate:
        _check_logits(logits)
    else:
        _check_tensor("logits", logits, 2, "shape (T, E)")
    _check_k(k, logits.shape[1])
    top, experts = logits.float().topk(k, dim=-1)
    return TopK(top.softmax(dim=-1), experts)


def noisy_topk(logits: Tensor, k: int, noise_std: float | Tensor = 1.0, *,
               generator: torch.Generator | None = None) -> TopK:
    """Noisy top-k gating (Shazeer et al. 2017): add Gaussian noise to the logits, keep the ``k``
    largest noisy logits and softmax over them. The noise lets experts the router slightly
    dislikes still get tokens (and gradient) during training; at inference it is switched off.

    ``noise_std`` is a number or a ``(T, E)`` tensor (the paper learns it per token:
    ``softplus(x @ w_noise)``). ``logits (T, E) -> TopK(weights (T, k), experts (T, k))``
    """
    _check_logits(logits)
    _check_k(k, logits.shape[1])
    if isinstance(noise_std, Tensor):
        require(noise_std.shape in ((), logits.shape),
                 f"noise_std must be a number or shaped like the logits {tuple(logits.shape)}, "
                 f"got shape {tuple(noise_std.shape)}")
    else:
        require(noise_std >= 0, f"noise_std must be >= 0, got {noise_std}")
    noise = torch.randn(logits.shape, generator=generator, device=logits.device)
    top, experts = (logits.float() + noise * noise_std).topk(k, dim=-1)
    return TopK(top.softmax(dim=-1), experts)


class ExpertChoice(NamedTuple):
    """An expert-choice routing: each expert's ``C`` tokens and their weights.

    - ``weights``: ``(E, C)`` float32, the router probability of each chosen token for its expert
    - ``tokens``: ``(E, C)`` int64, token ids, each row ordered from the highest score down
    """
    weights: Tensor
    tokens: Tensor


def expert_choice(logits: Tensor, capacity: int) -> ExpertChoice:
    """Expert choice (Zhou et al. 2022): the experts choose, not the tokens. Each expert takes the
    ``capacity`` tokens with the highest softmax score for it. Every expert gets exactly ``C``
    tokens (perfect balance, by construction); a token may get several experts, or none.

    ``logits (T, E) -> ExpertChoice(weights (E, C), tokens (E, C))``
    """
    probs = router_probs(logits)
    num_tokens = probs.shape[0]
    require(isinstance(capacity, int) and 1 <= capacity <= num_tokens,
             f"capacity (tokens per expert) must be an int between 1 and the number of tokens "
             f"({num_tokens}), got {capacity!r}")
    weights, tokens = probs.t().topk(capacity, dim=-1)
    return ExpertChoice(weights, tokens)


#: The token-choice routers by name (what :class:`MoELayer` and the notebooks pick from).
TOKEN_CHOICE_ROUTERS = {"softmax_topk": softmax_topk, "topk_softmax": topk_softmax,
                        "noisy_topk": noisy_topk}


# --------------------------------------------------------------------------------------------
# 2. Dispatch: sort the T*K (token, expert) pairs by expert


class Dispatch(NamedTuple):
    """Where every (token, slot) pair goes once the pairs are sorted by expert.

    The ``T*K`` pairs are numbered in token order, ``i = t*K + j`` for token ``t``'s ``j``-th
    expert. Sorted row ``r`` holds pair ``order[r]``; pair ``i`` sits at sorted row ``inverse[i]``.

    - ``order``: ``(T*K,)`` int64, the permutation (a stable sort by expert: within one expert,
      pairs keep their token order; dropped pairs, if any, come last)
    - ``inverse``: ``(T*K,)`` int64, its inverse: ``inverse[order[r]] == r``
    - ``token_of``: ``(T*K,)`` int64, the token of each sorted row (``order // K``)
    - ``counts``: ``(E,)`` int64, rows (tokens) per expert; an expert may have none
    - ``offsets``: ``(E+1,)`` int64, expert ``e``'s rows are ``offsets[e]:offsets[e+1]``;
      ``offsets[0] == 0`` and ``offsets[E]`` is the number of pairs kept
    - ``kept``: that number, as a Python int (``T*K`` unless pairs were dropped)
    """
    order: Tensor
    inverse: Tensor
    token_of: Tensor
    counts: Tensor
    offsets: Tensor
    kept: int


def dispatch(experts: Tensor, num_experts: int, keep: Tensor | None = None, validate: bool = True) -> Dispatch:
    """Sort the pairs by expert. ``experts (T, K)`` int -> :class:`Dispatch`.

    ``keep`` (``(T, K)`` bool, optional) marks the pairs that fit in their expert's capacity
    (:func:`drop_tokens`); the others are sorted after every expert's rows and not counted.
    ``validate=False`` skips the check that every id is in range (it reads the ids back from
    the device: one synchronisation), for a caller that has checked them already.
    """
    if validate:
        _check_experts(experts, num_experts)
    num_tokens, k = experts.shape
    flat = experts.reshape(-1).long()
    counts = torch.bincount(flat, minlength=num_experts)  # ids in range: checked above, or by the caller
    key = flat
    if keep is not None:
        require(isinstance(keep, Tensor) and keep.shape == experts.shape and keep.dtype == torch.bool,
                 f"keep must be a bool tensor shaped like experts {tuple(experts.shape)}, got "
                 f"{getattr(keep, 'dtype', type(keep).__name__)} {tuple(getattr(keep, 'shape', ()))}")
        key = torch.where(keep.reshape(-1), flat, num_experts)  # a dropped pair sorts after expert E-1
        counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    order = torch.argsort(key, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=key.device)
    offsets[1:] = counts.cumsum(0)
    # Without dropping every pair is kept, known without reading the device.
    kept = order.numel() if keep is None else int(offsets[-1])
    return Dispatch(order, inverse, order // k, counts, offsets, kept)


def permute(x: Tensor, d: Dispatch) -> Tensor:
    """Gather the tokens' rows in expert order: ``x (T, d) -> x_sorted (R, d)``, where ``R`` is
    ``d.kept`` (``T*K`` without dropping). Row ``r`` is ``x[token_of[r]]``."""
    _check_tensor("x", x, 2, "of tokens, shape (T, d)")
    return x[d.token_of[: d.kept]]


# --------------------------------------------------------------------------------------------
# 3. Experts: one SwiGLU feed-forward network per expert


def swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """One expert: ``(silu(x @ w_gate) * (x @ w_up)) @ w_down``.

    ``x (m, d)``, ``w_gate (d, n)``, ``w_up (d, n)``, ``w_down (n, d) -> (m, d)``
    """
    return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down


def _check_expert_weights(w_gate: Tensor, w_up: Tensor, w_down: Tensor, width: int | None = None) -> None:
    _check_tensor("w_gate", w_gate, 3, "shape (E, d, n)")
    require(w_up.shape == w_gate.shape,
             f"w_up must have the shape of w_gate {tuple(w_gate.shape)} (E, d, n), got {tuple(w_up.shape)}")
    e, d, n = w_gate.shape
    require(tuple(w_down.shape) == (e, n, d),
             f"w_down must have shape (E, n, d) = {(e, n, d)}, got {tuple(w_down.shape)}")
    if width is not None:
        require(width == d, f"the tokens have width d={width} but the experts expect d={d}")


def _check_experts_input(x_sorted: Tensor, offsets: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor,
                         validate: bool) -> None:
    """What both expert steps take: ``x_sorted (R, d)`` of the weights' dtype, the weights'
    shapes, ``offsets (E+1,)``; with ``validate``, the offsets themselves (from 0, non-decreasing,
    ending at ``R``: otherwise a row would go to two experts or to none). One small copy to the
    host: :func:`moe_forward`, whose offsets come from :func:`dispatch`, skips it."""
    _check_tensor("x_sorted", x_sorted, 2, "shape (R, d)")
    _check_expert_weights(w_gate, w_up, w_down, x_sorted.shape[1])
    check_same_dtype({"x_sorted": x_sorted, "w_gate": w_gate, "w_up": w_up, "w_down": w_down})
    _check_tensor("offsets", offsets, 1, "shape (E+1,)")
    require(offsets.shape == (w_gate.shape[0] + 1,),
            f"offsets must have shape (E+1,) = ({w_gate.shape[0] + 1},), got {tuple(offsets.shape)}")
    if validate:
        check_offsets(offsets, x_sorted.shape[0], "offsets", starts_at_zero=True)


def experts_forward(x_sorted: Tensor, offsets: Tensor, w_gate: Tensor, w_up: Tensor,
                    w_down: Tensor, validate: bool = True) -> Tensor:
    """Run each expert on its block of rows: a plain Python loop over experts.

    ``x_sorted (R, d)``, ``offsets (E+1,)``, ``w_gate, w_up (E, d, n)``, ``w_down (E, n, d)``
    -> ``(R, d)``. Expert ``e`` processes rows ``offsets[e]:offsets[e+1]``; an expert with no
    rows launches nothing. ``validate``: check the offsets (:func:`_check_experts_input`).
    """
    _check_experts_input(x_sorted, offsets, w_gate, w_up, w_down, validate=False)
    # The loop needs the block sizes on the host: one device-to-host copy (a sync on a GPU), which
    # the check reads too. Chapter 02 removes it by scheduling the blocks on the device.
    host = offsets.cpu()
    if validate:
        check_offsets(host, x_sorted.shape[0], "offsets", starts_at_zero=True)
    bounds = host.tolist()
    out = x_sorted.new_empty(x_sorted.shape)
    for e in range(w_gate.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            out[lo:hi] = swiglu(x_sorted[lo:hi], w_gate[e], w_up[e], w_down[e])
    return out


def experts_forward_grouped_mm(x_sorted: Tensor, offsets: Tensor, w_gate: Tensor, w_up: Tensor,
                               w_down: Tensor, validate: bool = True) -> Tensor:
    """The same experts as :func:`experts_forward`, without the loop: each of the three
    projections is one ``torch._grouped_mm`` call for all experts (CUTLASS on a Hopper GPU; torch
    has a slower fallback elsewhere, the CPU included). The block sizes stay on the device, so
    there is no host sync either (unless ``validate`` checks the offsets: :func:`moe_forward`
    does not). Same arguments and result as :func:`experts_forward`.

    ``torch._grouped_mm`` wants each expert's *end* row as int32 (``offsets[1:]``) and rows of a
    multiple of 16 bytes: ``d`` and ``n`` multiples of 8 in bf16, of 4 in float32.
    """
    _check_experts_input(x_sorted, offsets, w_gate, w_up, w_down, validate)
    num_experts, d, n = w_gate.shape
    grouped_mm = getattr(torch, "_grouped_mm", None)
    require(grouped_mm is not None, f"this torch ({torch.__version__}) has no torch._grouped_mm")
    misaligned = grouped_mm_misaligned(x_sorted.dtype, d=d, n=n)
    require(misaligned is None, misaligned)
    if x_sorted.shape[0] == 0:
        return x_sorted.new_empty(0, d)
    ends = offsets[1:].to(torch.int32)  # on the device: no sync, unlike the loop's .tolist()
    gate = grouped_mm(x_sorted, w_gate, offs=ends)
    up = grouped_mm(x_sorted, w_up, offs=ends)
    return grouped_mm(F.silu(gate) * up, w_down, offs=ends)


def grouped_mm_misaligned(dtype: torch.dtype, **widths: int) -> str | None:
    """Why ``torch._grouped_mm`` cannot take rows of these ``widths`` in ``dtype`` (``None``: it
    can): it reads every row, of the inputs and of the weights either way round, in 16-byte
    pieces, so each width must be a multiple of ``16 // dtype.itemsize`` elements."""
    align = 16 // dtype.itemsize
    if all(width % align == 0 for width in widths.values()):
        return None
    return (f"torch._grouped_mm needs rows of a multiple of 16 bytes: {' and '.join(widths)} multiples of {align} "
            f"in {str(dtype).removeprefix('torch.')}; got {', '.join(f'{k}={v}' for k, v in widths.items())}")


#: The expert step by name: what ``moe_forward(..., expert_step=NAME)`` runs.
EXPERTS = {"loop": experts_forward, "grouped_mm": experts_forward_grouped_mm}


# --------------------------------------------------------------------------------------------
# 4. Combine: back to token order, weighted sum over each token's experts


def combine(y_sorted: Tensor, d: Dispatch, weights: Tensor) -> Tensor:
    """Undo the sort and sum each token's ``K`` expert outputs, weighted by the router.

    ``y_sorted (R, d)`` (rows in expert order), ``weights (T, K)`` -> ``(T, d)``.
    ``y_sorted[inverse]`` puts the rows back in (token, slot) order; pairs dropped for capacity
    (rows ``R`` and beyond) contribute zero. A gather, not a scatter: no atomics, deterministic.
    """
    _check_tensor("y_sorted", y_sorted, 2, "shape (R, d)")
    _check_tensor("weights", weights, 2, "shape (T, K)")
    num_tokens, k = weights.shape
    require(d.order.numel() == num_tokens * k,
             f"weights {tuple(weights.shape)} do not match the dispatch of {d.order.numel()} pairs")
    missing = num_tokens * k - y_sorted.shape[0]
    require(missing >= 0, f"y_sorted has {y_sorted.shape[0]} rows, more than the {num_tokens * k} pairs")
    if missing:  # dropped pairs: their rows are zero
        y_sorted = torch.cat([y_sorted, y_sorted.new_zeros(missing, y_sorted.shape[1])])
    y = y_sorted[d.inverse].view(num_tokens, k, y_sorted.shape[1])
    return torch.einsum("tk,tkd->td", weights.to(y.dtype), y)


def combine_rows(y_rows: Tensor, token_of: Tensor, row_weights: Tensor, num_tokens: int) -> Tensor:
    """The general combine, for routings where a token has any number of experts (expert
    choice, token rounding): ``out[token_of[r]] += row_weights[r] * y_rows[r]``.

    ``y_rows (R, d)``, ``token_of (R,)`` int64, ``row_weights (R,)`` -> ``(T, d)``. A scatter-add:
    on a GPU the order of the additions (and so the last bits) can vary between runs.
    """
    _check_tensor("y_rows", y_rows, 2, "shape (R, d)")
    require(token_of.shape == (y_rows.shape[0],) and row_weights.shape == (y_rows.shape[0],),
             f"token_of and row_weights must have shape (R,) = ({y_rows.shape[0]},), got "
             f"{tuple(token_of.shape)} and {tuple(row_weights.shape)}")
    check_ids_in_range(token_of, num_tokens, "token_of", f"the {num_tokens} tokens")
    out = y_rows.new_zeros(num_tokens, y_rows.shape[1])
    return out.index_add_(0, token_of, y_rows * row_weights.to(y_rows.dtype)[:, None])


# --------------------------------------------------------------------------------------------
# 5. Load balancing: auxiliary losses, capacity, dropping


def _check_probs_experts(probs: Tensor, experts: Tensor) -> None:
    _check_tensor("probs", probs, 2, "of router probabilities, shape (T, E)")
    _check_experts(experts, probs.shape[1])
    require(experts.shape[0] == probs.shape[0],
             f"probs has {probs.shape[0]} tokens but experts has {experts.shape[0]}")


def tokens_per_expert(experts: Tensor, num_experts: int) -> Tensor:
    """``experts (T, K) -> (E,)`` int64: how many (token, expert) pairs each expert received."""
    _check_experts(experts, num_experts)
    return _counts(experts, num_experts)


def _counts(experts: Tensor, num_experts: int) -> Tensor:
    """:func:`tokens_per_expert` without the checks (for callers that made them)."""
    return torch.bincount(experts.reshape(-1).long(), minlength=num_experts)


def switch_aux_loss(probs: Tensor, experts: Tensor) -> Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2021): ``E * sum_e f_e * P_e``.

    - ``f_e``: the fraction of the ``T*K`` (token, expert) pairs sent to expert ``e`` (a count:
      no gradient flows through it)
    - ``P_e``: the mean router probability of expert ``e`` over the tokens (differentiable)

    ``probs (T, E)`` (softmax over all experts), ``experts (T, K)`` -> scalar. It is 1 when both
    are uniform, up to ``E`` when everything goes to one expert. Counting all ``K`` choices is
    how Mixtral-style top-K models use it (some code divides by ``T`` instead of ``T*K``, which
    scales it by ``K``). Models add ``alpha * loss`` to the task loss, ``alpha`` about 1e-2.
    """
    _check_probs_experts(probs, experts)
    return _switch_loss(probs, experts)


def _switch_loss(probs: Tensor, experts: Tensor) -> Tensor:
    """:func:`switch_aux_loss` without the checks (each reads the ids back from the device)."""
    num_experts = probs.shape[1]
    f = _counts(experts, num_experts).to(probs.dtype) / experts.numel()
    return num_experts * (f * probs.mean(dim=0)).sum()


def gshard_aux_loss(probs: Tensor, experts: Tensor) -> Tensor:
    """GShard's load-balancing loss (Lepikhin et al. 2020, Algorithm 1): like
    :func:`switch_aux_loss` but ``f_e`` counts only each token's *first* choice
    (``experts[:, 0]``), the fraction of tokens whose top expert is ``e``.

    ``probs (T, E)``, ``experts (T, K)`` (column 0 the top choice) -> scalar. Written, as in
    its reference implementation, ``mean_e(f_e * P_e) * E**2``, which is ``E * sum_e f_e P_e``:
    1 at perfect balance, and equal to the Switch loss when ``K = 1``.
    """
    _check_probs_experts(probs, experts)
    return _switch_loss(probs, experts[:, :1])


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
    """Rows each expert may take: ``ceil(capacity_factor * T * K / E)``.

    With a capacity factor of 1 a perfectly balanced router fills every expert exactly; 1.25
    leaves 25% slack. (The tiny epsilon keeps float rounding, e.g. ``1.1 * 100 = 110.00000000000001``,
    from adding a row.)
    """
    for name, v in (("num_tokens", num_tokens), ("num_experts", num_experts)):
        require(isinstance(v, int) and v >= 1, f"{name} must be a positive int, got {v!r}")
    _check_k(k, num_experts)
    require(capacity_factor > 0, f"capacity_factor must be > 0, got {capacity_factor}")
    return math.ceil(capacity_factor * num_tokens * k / num_experts - 1e-9)


class Capacity(NamedTuple):
    """Which pairs fit in their expert's capacity.

    - ``keep``: ``(T, K)`` bool, True where the pair is processed
    - ``position``: ``(T, K)`` int64, the pair's place in its expert's queue (0 = first served)
    - ``capacity``: the capacity used
    - ``dropped_fraction``: the fraction of the ``T*K`` pairs dropped (a Python float)
    """
    keep: Tensor
    position: Tensor
    capacity: int
    dropped_fraction: float


class Queues(NamedTuple):
    """Each expert's queue of (token, expert) pairs, in GShard's order (:func:`expert_queues`).

    - ``position``: ``(T, K)`` int64, each pair's place in its expert's queue (0 = first served)
    - ``counts``: ``(E,)`` int64, the length of each queue (pairs per expert; 0 for an idle one)
    """
    position: Tensor
    counts: Tensor


def expert_queues(experts: Tensor, num_experts: int) -> Queues:
    """Where each pair stands in its expert's queue, without reading anything back to the host.

    The queue order is GShard's: every token's first choice, in token order, then every token's
    second choice, and so on. A one-hot comparison ``(E, T*K)`` and a running sum along each
    expert's row (a scan, as a GPU computes it) give each pair the number of pairs before it with
    the same expert: no ``bincount``, no sort, no ``.item()``, so the result's shape never depends
    on the values and a CUDA graph can capture it. The ids are not checked here (a check would read them back):
    they come from ``topk``, or the caller checks them (:func:`drop_tokens` does).

    ``experts (T, K)`` int -> :class:`Queues`
    """
    _check_tensor("experts", experts, 2, "of expert ids, shape (T, K)")
    num_tokens, k = experts.shape
    queue = experts.t().reshape(-1).long()  # (K*T,): all first choices, then all second choices, ...
    # (E, K*T) bool, each expert's row along the queue: the running sum goes along a row, the
    # memory's inner dimension, which a GPU scans far faster than down a column, and int32 halves
    # its bytes (7B at 512 tokens, H100: 20 us, against 767 us for int64 down a (K*T, E) one-hot)
    one_hot = torch.arange(num_experts, device=queue.device)[:, None] == queue
    before_and_self = one_hot.cumsum(dim=1, dtype=torch.int32).gather(0, queue[None]).squeeze(0)  # this pair too
    return Queues((before_and_self.long() - 1).view(k, num_tokens).t(), one_hot.sum(dim=1))


def drop_tokens(experts: Tensor, num_experts: int, capacity: int) -> Capacity:
    """Give each expert at most ``capacity`` pairs; drop the rest (first come, first served).

    The queue order is GShard's: every token's *first* choice is served before any token's
    second choice, and so on; within one choice, in token order. A dropped pair contributes
    nothing (the token keeps only its residual connection in a real model).

    ``experts (T, K)`` int -> :class:`Capacity`
    """
    _check_experts(experts, num_experts)
    require(isinstance(capacity, int) and capacity >= 0, f"capacity must be an int >= 0, got {capacity!r}")
    position = expert_queues(experts, num_experts).position
    keep = position < capacity
    dropped = (keep.numel() - int(keep.sum())) / keep.numel() if keep.numel() else 0.0
    return Capacity(keep, position, capacity, dropped)


# --------------------------------------------------------------------------------------------
# The whole layer


class MoEOutput(NamedTuple):
    """What one MoE forward pass produced, for losses and plots.

    - ``y``: ``(T, d)`` the layer's output
    - ``probs``: ``(T, E)`` float32 router probabilities (for the auxiliary losses)
    - ``experts``: ``(T, K)`` int64 experts per token (``None`` for expert choice)
    - ``counts``: ``(E,)`` int64 rows each expert processed
    - ``dropped_fraction``: pairs dropped for capacity (expert choice: tokens no expert chose)
    """
    y: Tensor
    probs: Tensor
    experts: Tensor | None
    counts: Tensor
    dropped_fraction: float


def moe_forward(x: Tensor, w: MoEWeights, k: int, *, router: str = "topk_softmax",
                capacity_factor: float | None = None, noise_std: float | Tensor = 0.0,
                generator: torch.Generator | None = None,
                on_step: Callable[[str], None] | None = None,
                expert_step: str | Callable[..., Tensor] = "loop") -> MoEOutput:
    """One MoE forward pass, from the four steps above. ``x (T, d) -> MoEOutput`` (``y (T, d)``).

    ``router``: a name in :data:`TOKEN_CHOICE_ROUTERS` or ``"expert_choice"``.
    ``capacity_factor``: token choice: drop pairs beyond :func:`expert_capacity` (``None``: keep
    all); expert choice: each expert takes ``expert_capacity(T, E, k, capacity_factor or 1)``.
    ``noise_std``: the noise of ``noisy_topk`` (0 turns it off, e.g. at inference).
    ``on_step``: called with ``"router"``, ``"dispatch"``, ``"experts"``, ``"combine"`` as each
    step ends (chapter 01 times the steps with it).
    ``expert_step``: the expert step, a name in :data:`EXPERTS` (``"loop"``, the default:
    :func:`experts_forward`; ``"grouped_mm"``: :func:`experts_forward_grouped_mm`) or a function
    with their arguments.
    """
    mark = on_step or (lambda step: None)
    if not callable(expert_step):
        require(expert_step in EXPERTS, f"unknown expert step {expert_step!r}; choose one of "
                                         f"{sorted(EXPERTS)} or pass a function")
        # the offsets come from dispatch, right by construction: no host check of them
        expert_step = functools.partial(EXPERTS[expert_step], validate=False)
    logits = router_logits(x, w.w_router)
    num_tokens, num_experts = logits.shape
    _check_expert_weights(w.w_gate, w.w_up, w.w_down, x.shape[1])
    _check_k(k, num_experts)
    require(router in TOKEN_CHOICE_ROUTERS or router == "expert_choice",
             f"unknown router {router!r}; choose one of {sorted(TOKEN_CHOICE_ROUTERS) + ['expert_choice']}")
    probs = router_probs(logits)

    if router == "expert_choice":
        if num_tokens == 0:  # an empty batch: nothing to choose, an empty result
            return MoEOutput(x * 0, probs, None, torch.zeros(num_experts, dtype=torch.long, device=x.device), 0.0)
        cap = min(num_tokens, expert_capacity(num_tokens, num_experts, k, capacity_factor or 1.0))
        choice = expert_choice(logits, cap)
        mark("router")
        rows = choice.tokens.reshape(-1)  # already grouped by expert: C rows each
        offsets = torch.arange(num_experts + 1, device=x.device) * cap
        x_rows = x[rows]
        mark("dispatch")
        y_rows = expert_step(x_rows, offsets, w.w_gate, w.w_up, w.w_down)
        mark("experts")
        y = combine_rows(y_rows, rows, choice.weights.reshape(-1), num_tokens)
        mark("combine")
        unrouted = 1.0 - torch.zeros(num_tokens, device=x.device).index_fill_(0, rows, 1.0).mean().item()
        return MoEOutput(y, probs, None, torch.full((num_experts,), cap, device=x.device), unrouted)

    if router == "noisy_topk":
        weights, experts = noisy_topk(logits, k, noise_std, generator=generator)
    else:
        weights, experts = TOKEN_CHOICE_ROUTERS[router](logits, k)
    mark("router")
    keep, dropped = None, 0.0
    if capacity_factor is not None:
        cap = drop_tokens(experts, num_experts, expert_capacity(num_tokens, num_experts, k, capacity_factor))
        keep, dropped = cap.keep, cap.dropped_fraction
    d = dispatch(experts, num_experts, keep)
    x_sorted = permute(x, d)
    mark("dispatch")
    y_sorted = expert_step(x_sorted, d.offsets, w.w_gate, w.w_up, w.w_down)
    mark("experts")
    y = combine(y_sorted, d, weights)
    mark("combine")
    return MoEOutput(y, probs, experts, d.counts, dropped)


class MoELayer(nn.Module):
    """An MoE layer with SwiGLU experts and a per-expert loop: the course's torch baseline.

    ``forward(x)`` takes ``x (..., d)`` and returns ``y`` of the same shape; with
    ``return_output=True`` it returns the :class:`MoEOutput` too (probabilities for an auxiliary
    loss, tokens per expert). The noise of ``router="noisy_topk"`` is learnt
    (``softplus(x @ w_noise)``) and used only in training mode.
    """

    def __init__(self, d_model: int, d_hidden: int, num_experts: int, k: int, *,
                 router: str = "topk_softmax", capacity_factor: float | None = None,
                 dtype=None, device=None, generator: torch.Generator | None = None):
        super().__init__()
        check_int(num_experts, "num_experts", 1)
        _check_k(k, num_experts)
        require(router in TOKEN_CHOICE_ROUTERS or router == "expert_choice",
                 f"unknown router {router!r}; choose one of {sorted(TOKEN_CHOICE_ROUTERS) + ['expert_choice']}")
        self.k, self.router, self.capacity_factor = k, router, capacity_factor
        w = random_weights(d_model, d_hidden, num_experts, dtype=dtype or torch.float32, device=device,
                           generator=generator)
        self.w_router, self.w_gate, self.w_up, self.w_down = (nn.Parameter(t) for t in w)
        self.w_noise = nn.Parameter(torch.zeros_like(self.w_router)) if router == "noisy_topk" else None

    def weights(self) -> MoEWeights:
        return MoEWeights(self.w_router, self.w_gate, self.w_up, self.w_down)

    def forward(self, x: Tensor, return_output: bool = False):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        noise = F.softplus(x2 @ self.w_noise).float() if self.w_noise is not None and self.training else 0.0
        out = moe_forward(x2, self.weights(), self.k, router=self.router,
                          capacity_factor=self.capacity_factor, noise_std=noise)
        y = out.y.reshape(*lead, out.y.shape[-1])
        return (y, out) if return_output else y

    def extra_repr(self) -> str:
        e, d, n = self.w_gate.shape
        return (f"d={d}, n={n}, E={e}, K={self.k}, router={self.router}, "
                f"capacity_factor={self.capacity_factor}")


# --------------------------------------------------------------------------------------------
# Memory, counted


def activation_bytes(shape, dtype_bytes: int = 2) -> dict[str, int]:
    """Bytes that one training forward pass of :func:`moe_forward` (token choice, no dropping)
    leaves allocated for the backward pass (autograd's saved tensors) plus the output, by part.
    ``shape``: ``(T, d, n, E, K)`` (e.g. a :class:`moe_course.configs.MoEShape`);
    ``dtype_bytes``: 2 for bf16, 4 for fp32.

    The ``T*K``-row tensors dominate: they grow with ``K``. (SonicMoE keeps only ``x``, the
    pre-activations and the routing metadata; chapter 06.)
    """
    T, d, n, E, K = shape
    rows = T * K
    return {
        "router: probs (fp32), top-K weights and ids": 4 * T * E + 4 * rows + 8 * rows,
        "dispatch: order, inverse, token_of, counts, offsets": 8 * (3 * rows + 2 * E + 1),
        "gathered input x_sorted (T*K, d)": dtype_bytes * rows * d,
        "SwiGLU: gate, silu(gate), up, their product (T*K, n)": dtype_bytes * 4 * rows * n,
        "expert outputs in token order (T*K, d)": dtype_bytes * rows * d,
        "layer output (T, d)": dtype_bytes * T * d,
    }
