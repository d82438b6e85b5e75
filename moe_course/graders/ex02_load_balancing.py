"""Grader of exercise 02, load balancing: auxiliary losses, expert capacity, token dropping.

The learner writes (shapes as in :mod:`moe_course.moe`):

- ``switch_aux_loss(probs (T, E), experts (T, K)) -> scalar``: ``E * sum_e f_e * P_e`` with
  ``f_e`` the fraction of all ``T*K`` pairs sent to ``e`` (as :func:`moe.switch_aux_loss`)
- ``gshard_aux_loss(probs, experts) -> scalar``: the same with ``f_e`` counting first choices
  only (as :func:`moe.gshard_aux_loss`)
- ``expert_capacity(num_tokens, num_experts, k, capacity_factor) -> int``:
  ``ceil(capacity_factor * T * K / E)`` (as :func:`moe.expert_capacity`)
- ``drop_tokens(experts, num_experts, capacity) -> (keep (T, K) bool, dropped_fraction)``:
  first choices served first, then in token order (as :func:`moe.drop_tokens`)
"""

from __future__ import annotations

import math

import torch

from .. import moe
from ..checking import CheckFailed, check_close, check_equal, check_shape, check_true, grading, to_numpy
from . import CASES, Case, as_tensor_pair, fresh_seed, generator, random_experts

TITLE = "Exercise 02"


def _probs_and_experts(case: Case, gen: torch.Generator, skew: float = 1.0):
    """Router probabilities and top-K experts, skewed so the loss is far from its minimum."""
    logits = moe.skewed_logits(case.T, case.E, skew, generator=gen, device=gen.device)
    if case.empty is not None:
        logits[:, case.empty] = -30.0
    probs = logits.softmax(-1)
    return probs, probs.topk(case.K, dim=-1).indices


def _grade_aux_loss(name: str, fn, reference, seed: int | None) -> None:
    seed = fresh_seed(seed)
    gen = generator(seed)
    with grading(f"{TITLE} · {name}"):
        for case in CASES:
            where = f"{case}, seed {seed}"
            probs, experts = _probs_and_experts(case, gen)
            want_p = probs.clone().requires_grad_()
            want = reference(want_p, experts)
            want.backward()
            got_p = probs.clone().requires_grad_()
            got = fn(got_p, experts.clone())
            if got is None:
                raise CheckFailed(f"{name} ({where}): got None (did the function forget to return its result?)")
            check_true(f"{name} ({where})", isinstance(got, torch.Tensor) and got.numel() == 1,
                       f"expected a one-number torch tensor (so it can be added to the training loss), "
                       f"got {type(got).__name__} {tuple(getattr(got, 'shape', ()))}")
            check_close(f"{name} ({where})", got.reshape(()), want, rtol=1e-4, atol=1e-6)
            check_true(f"{name} ({where})", got.requires_grad,
                       "the loss must be differentiable with respect to probs (P_e is a mean of the "
                       "probabilities; only f_e, a count, carries no gradient); it has no gradient")
            got.reshape(()).backward()
            check_close(f"d {name} / d probs ({where})", got_p.grad, want_p.grad, rtol=1e-4, atol=1e-7)


def grade_switch_aux_loss(switch_aux_loss, seed: int | None = None) -> None:
    """``switch_aux_loss(probs (T, E), experts (T, K)) -> scalar tensor``."""
    _grade_aux_loss("Switch auxiliary loss", switch_aux_loss, moe.switch_aux_loss, seed)


def grade_gshard_aux_loss(gshard_aux_loss, seed: int | None = None) -> None:
    """``gshard_aux_loss(probs (T, E), experts (T, K)) -> scalar tensor`` (first choices only)."""
    _grade_aux_loss("GShard auxiliary loss", gshard_aux_loss, moe.gshard_aux_loss, seed)


#: (T, E, K, capacity factor): exact and fractional T*K/E, factors below and above 1. The factors
#: are exact binary fractions, so no float rounding can move an exact product across an integer.
CAPACITY_CASES = ((64, 8, 2, 1.0), (96, 8, 2, 1.0), (50, 8, 2, 1.25), (100, 16, 1, 1.5),
                  (7, 4, 1, 2.0), (10, 4, 2, 0.5), (12, 4, 1, 1.0), (1000, 64, 8, 1.25), (3, 8, 1, 1.0))


def grade_expert_capacity(expert_capacity) -> None:
    """``expert_capacity(num_tokens, num_experts, k, capacity_factor) -> int``."""
    with grading(f"{TITLE} · expert capacity"):
        for T, E, K, cf in CAPACITY_CASES:
            where = f"T={T}, E={E}, k={K}, capacity_factor={cf}"
            got = expert_capacity(T, E, K, cf)
            want = moe.expert_capacity(T, E, K, cf)
            if got is None:
                raise CheckFailed(f"capacity ({where}): got None (did the function forget to return its result?)")
            check_true(f"capacity ({where})", float(got) == int(float(got)),
                       f"expected a whole number of rows, got {got!r}")
            check_true(f"capacity ({where})", int(got) == want,
                       f"expected ceil({cf} * {T} * {K} / {E}) = ceil({cf * T * K / E:g}) = {want}, got {int(got)}")


def grade_drop_tokens(drop_tokens, seed: int | None = None) -> None:
    """``drop_tokens(experts (T, K), num_experts, capacity) -> (keep (T, K) bool, dropped_fraction)``."""
    seed = fresh_seed(seed)
    gen = generator(seed)
    with grading(f"{TITLE} · token dropping"):
        for case in CASES:
            experts = random_experts(case, gen, skew=1.0)
            for cf in (1.0, 0.5, 4.0):  # 4.0: room for everyone, nothing dropped
                capacity = moe.expert_capacity(case.T, case.E, case.K, cf)
                where = f"{case}, capacity {capacity}, seed {seed}"
                want = moe.drop_tokens(experts, case.E, capacity)
                keep, fraction = as_tensor_pair("drop_tokens", drop_tokens(experts.clone(), case.E, capacity), where)
                check_shape(f"keep ({where})", keep, (case.T, case.K))
                keep = torch.as_tensor(to_numpy(keep)).bool()
                kept = torch.bincount(experts.cpu()[keep], minlength=case.E)
                over = kept > capacity
                check_true(f"keep ({where})", not over.any(),
                           f"expert {int(over.int().argmax())} keeps {int(kept.max())} pairs, more than its "
                           f"capacity {capacity}")
                want_kept = torch.bincount(experts.cpu()[want.keep.cpu()], minlength=case.E)
                check_equal(f"pairs kept per expert ({where})", kept, want_kept)
                if not torch.equal(keep, want.keep.cpu()):
                    first = tuple(int(v) for v in (keep != want.keep.cpu()).nonzero()[0])
                    raise CheckFailed(
                        f"keep ({where}): the right number of pairs per expert, but not the right ones; "
                        f"first difference at [token {first[0]}, choice {first[1]}]: expected "
                        f"{bool(want.keep[first])}, got {bool(keep[first])}. Serve every token's first "
                        f"choice (column 0) before any second choice, and within a column in token order.")
                check_true(f"dropped_fraction ({where})", math.isclose(float(fraction), want.dropped_fraction,
                                                                       abs_tol=1e-6),
                           f"expected {want.dropped_fraction:.6f} (dropped pairs / all T*K pairs), got {float(fraction):.6f}")
