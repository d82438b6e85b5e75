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
from . import CASES, Case, as_graded, as_outputs, check_close_or_explain, fresh_seed, generator, random_experts

TITLE = "Exercise 02"

#: The course's answers to this exercise: a learner's function that calls one is refused.
REFERENCES = (moe.switch_aux_loss, moe.gshard_aux_loss, moe.expert_capacity, moe.drop_tokens,
              moe.expert_queues)  # drop_tokens's queue positions: the heart of the exercise

#: Where the graded routings come from. The losses are given ``experts``, which need not be the
#: top-k of ``probs``: the same probabilities are graded with all three, so an answer that reads
#: the routing off ``probs`` (recomputes the top-k, takes the argmax as the first choice) gives
#: the same loss for different routings and cannot pass.
ROUTINGS = {
    "the top-k of probs": "plain top-k",
    "a noisy router": "the top-k of the logits plus noise, as in training: not the top-k of probs",
    "re-routed experts": "changed after the router (capacity, token rounding): any k distinct experts",
}


def _probs_and_routings(case: Case, gen: torch.Generator, skew: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Router probabilities, skewed so the loss is far from its minimum, and one routing from
    each of :data:`ROUTINGS` (column 0 each token's first choice), whose losses all differ."""
    logits = moe.skewed_logits(case.T, case.E, skew, generator=gen, device=gen.device)
    if case.empty is not None:
        logits[:, case.empty] = -30.0
    probs = logits.softmax(-1)
    for _ in range(100):  # a routing whose losses equal another's would let a routing-blind answer pass
        routings = {"the top-k of probs": probs.topk(case.K, dim=-1).indices,
                    "a noisy router": moe.noisy_topk(logits, case.K, noise_std=2.0, generator=gen).experts,
                    "re-routed experts": random_experts(case, gen)}
        losses = [float(loss(probs, e)) for e in routings.values() for loss in (moe.switch_aux_loss, moe.gshard_aux_loss)]
        if min(abs(a - b) for i, a in enumerate(losses) for b in losses[i + 2::2]) > 1e-3:
            return probs, routings
    raise RuntimeError(f"no three routings with different losses for {case}: widen the skew")


def _routing_blind(reference, probs: torch.Tensor, experts: torch.Tensor, source: str) -> dict:
    """What a loss that reads the routing off ``probs`` returns: ``{why: function giving it}``.
    (An answer that does so in any words and passes on "the top-k of probs" gives, on the other
    routings of the same probs, the loss of the recomputed top-k: these name it.)"""
    first_as_argmax = experts.clone()
    first_as_argmax[:, 0] = probs.argmax(dim=-1)
    routing = f"The routing here is {source} ({ROUTINGS[source]}): count what `experts` says"
    return {  # the first that matches is named: for GShard both are the argmax
        f"the loss takes each token's first choice as probs.argmax(-1) instead of experts[:, 0]. {routing}":
            lambda: reference(probs, first_as_argmax),
        f"the loss ignores its `experts` argument and recomputes the top-k from probs. {routing}":
            lambda: reference(probs, probs.topk(experts.shape[1], dim=-1).indices),
    }


def _grade_aux_loss(name: str, fn, reference, seed: int | None) -> None:
    seed = fresh_seed(seed)
    gen = generator(seed)
    fn = as_graded(fn, REFERENCES)
    with grading(f"{TITLE} · {name}"):
        for case in CASES:
            probs, routings = _probs_and_routings(case, gen)
            for source, experts in routings.items():
                where = f"{case}, routing: {source}, seed {seed}"
                want_p = probs.clone().requires_grad_()
                want = reference(want_p, experts)
                want.backward()
                got_p = probs.clone().requires_grad_()
                (got,) = as_outputs(name, fn(got_p, experts.clone()), 1, where)
                check_true(f"{name} ({where})", isinstance(got, torch.Tensor) and got.numel() == 1,
                           f"expected a one-number torch tensor (so it can be added to the training loss), "
                           f"got {type(got).__name__} {tuple(getattr(got, 'shape', ()))}")
                check_close_or_explain(f"{name} ({where})", got.reshape(()), want,
                                       _routing_blind(reference, probs, experts, source), rtol=1e-4, atol=1e-6)
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
    expert_capacity = as_graded(expert_capacity, REFERENCES)
    with grading(f"{TITLE} · expert capacity"):
        for T, E, K, cf in CAPACITY_CASES:
            where = f"T={T}, E={E}, k={K}, capacity_factor={cf}"
            (got,) = as_outputs("capacity", expert_capacity(T, E, K, cf), 1, where)
            want = moe.expert_capacity(T, E, K, cf)
            check_true(f"capacity ({where})", float(got) == int(float(got)),
                       f"expected a whole number of rows, got {got!r}")
            check_true(f"capacity ({where})", int(got) == want,
                       f"expected ceil({cf} * {T} * {K} / {E}) = ceil({cf * T * K / E:g}) = {want}, got {int(got)}")


def grade_drop_tokens(drop_tokens, seed: int | None = None) -> None:
    """``drop_tokens(experts (T, K), num_experts, capacity) -> (keep (T, K) bool, dropped_fraction)``."""
    seed = fresh_seed(seed)
    gen = generator(seed)
    drop_tokens = as_graded(drop_tokens, REFERENCES)
    with grading(f"{TITLE} · token dropping"):
        for case in CASES:
            experts = random_experts(case, gen, skew=1.0)
            for cf in (1.0, 0.5, 4.0):  # 4.0: room for everyone, nothing dropped
                capacity = moe.expert_capacity(case.T, case.E, case.K, cf)
                where = f"{case}, capacity {capacity}, seed {seed}"
                want = moe.drop_tokens(experts, case.E, capacity)
                keep, fraction = as_outputs("drop_tokens", drop_tokens(experts.clone(), case.E, capacity), 2, where)
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
