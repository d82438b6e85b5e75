"""Grader of exercise 01, a simple MoE forward pass: router, expert assignment, aggregation.

The learner writes (shapes as in :mod:`moe_course.moe`):

- ``router(x, w_router, k) -> (weights (T, k), experts (T, k))``: softmax over the experts,
  keep the ``k`` best, renormalise their weights to sum to one (as :func:`moe.topk_softmax`)
- ``assign(experts, num_experts) -> (order (T*K,), counts (E,), offsets (E+1,))``: the pairs
  sorted by expert, stably (as :func:`moe.dispatch`)
- ``aggregate(y_sorted, order, weights) -> (T, d)``: back to token order, weighted sum over each
  token's experts (as :func:`moe.combine`)
- ``simple_moe(x, w, k) -> (T, d)``: the three put together with the experts in between
"""

from __future__ import annotations

import torch

from .. import moe
from ..checking import check_close, check_equal, check_shape, check_true, grading, to_numpy
from . import CASES, as_graded, as_outputs, check_close_or_explain, fresh_seed, generator, random_experts, router_inputs

TITLE = "Exercise 01"

#: The course's answers to this exercise (and what is built on them): a learner's function that
#: calls one is refused (:func:`~moe_course.graders.as_graded`).
REFERENCES = (moe.topk_softmax, moe.softmax_topk, moe.noisy_topk, moe.dispatch, moe.combine, moe.combine_rows,
              moe.moe_forward)


def _by_expert_id(weights, experts):
    """Each row's (weight, expert) pairs ordered by expert id: any slot order is accepted."""
    experts = torch.as_tensor(experts).long()
    idx = experts.argsort(dim=-1)
    return torch.as_tensor(weights).float().gather(-1, idx), experts.gather(-1, idx)


def grade_router(router, seed: int | None = None) -> None:
    """``router(x (T, d), w_router (d, E), k) -> (weights (T, k), experts (T, k))``."""
    seed = fresh_seed(seed)
    gen = generator(seed)
    router = as_graded(router, REFERENCES)
    with grading(f"{TITLE} · router"):
        for case in CASES:
            where = f"{case}, seed {seed}"
            x, w_router = router_inputs(case, gen)
            want_w, want_e = _by_expert_id(*moe.topk_softmax(moe.router_logits(x, w_router), case.K))
            top, top_experts = moe.router_probs(x @ w_router).topk(case.K, dim=-1)  # for the mistakes
            weights, experts = as_outputs("router", router(x.clone(), w_router.clone(), case.K), 2, where)
            check_shape(f"weights ({where})", weights, (case.T, case.K))
            check_shape(f"experts ({where})", experts, (case.T, case.K))
            sums = to_numpy(weights).sum(axis=-1)
            bad = abs(sums - 1) > 1e-4
            check_true(f"weights ({where})", not bad.any(),
                       f"each token's k weights must sum to 1 (softmax over its k chosen experts, "
                       f"i.e. renormalised); token {int(bad.argmax())} sums to {sums[bad.argmax()]:.4f}")
            got_w, got_e = _by_expert_id(weights, experts)
            check_equal(f"experts, each row sorted by id ({where})", got_e, want_e)
            check_close_or_explain(f"weights, each row sorted by expert id ({where})", got_w, want_w,
                                   _router_mistakes(top, top_experts, want_w, case.K), rtol=1e-4, atol=1e-5)


def grade_assignment(assign, seed: int | None = None) -> None:
    """``assign(experts (T, K), num_experts) -> (order (T*K,), counts (E,), offsets (E+1,))``."""
    seed = fresh_seed(seed)
    gen = generator(seed)
    assign = as_graded(assign, REFERENCES)
    with grading(f"{TITLE} · expert assignment"):
        for case in CASES:
            where = f"{case}, seed {seed}"
            experts = random_experts(case, gen)
            want = moe.dispatch(experts, case.E)
            result = as_outputs("assign", assign(experts.clone(), case.E), 3, where)
            order, counts, offsets = (torch.as_tensor(to_numpy(r)).long() for r in result)
            check_equal(f"counts, tokens per expert ({where})", counts, want.counts)
            check_equal(f"offsets, E+1 entries starting at 0 ({where})", offsets, want.offsets)
            check_shape(f"order ({where})", order, (case.T * case.K,))
            check_true(f"order ({where})", torch.equal(order.sort().values, torch.arange(case.T * case.K)),
                       "order must list every pair index 0 .. T*K-1 exactly once (pair t*K + j is "
                       "token t's j-th expert)")
            flat = experts.reshape(-1).cpu()
            check_true(f"order ({where})", bool((flat[order].diff() >= 0).all()),
                       "the pairs are not grouped by expert: experts.flatten()[order] must be sorted")
            check_equal(f"order: within an expert, pairs in token order (a stable sort) ({where})",
                        order, want.order)


def _weighted_sum(y_pairs, weights):
    """``out[t] = sum_j weights[t, j] * y_pairs[t*K + j]``: rows in pair (token) order."""
    num_tokens, k = weights.shape
    return (weights.unsqueeze(-1) * y_pairs.view(num_tokens, k, -1)).sum(1)


def _router_mistakes(top, top_experts, want_w, k: int) -> dict:
    """What the usual router mistakes return (check_close_or_explain names the one that matches)."""
    return {
        "the softmax is taken twice (over the k probabilities instead of renormalising them)":
            lambda: _by_expert_id(top.softmax(-1), top_experts)[0],
        "every chosen expert gets the same weight 1/k": lambda: torch.full_like(want_w, 1 / k),
    }


def _aggregation_mistakes(y_sorted, d, weights) -> dict:
    """What the usual aggregation mistakes return, for rows ``y_sorted`` in dispatch ``d``'s order."""
    y_pairs = y_sorted[d.inverse]  # the rows back in pair order
    k = weights.shape[1]
    return {
        "y_sorted[order] is taken as the rows in pair order: that applies the permutation a second "
        "time. Put row r back at pair order[r] (y[order] = y_sorted), or gather with the inverse "
        "permutation": lambda: _weighted_sum(y_sorted[d.order], weights),
        "the rows are summed without the router weights": lambda: _weighted_sum(y_pairs, torch.ones_like(weights)),
        "the rows are averaged, not weighted by the router":
            lambda: _weighted_sum(y_pairs, torch.full_like(weights, 1 / k)),
        "weight i is applied to sorted row i: the weights are in pair order, like the rows once put back":
            lambda: _weighted_sum((y_sorted * weights.reshape(-1, 1))[d.inverse], torch.ones_like(weights)),
    }


def grade_aggregation(aggregate, seed: int | None = None) -> None:
    """``aggregate(y_sorted (T*K, d), order (T*K,), weights (T, K)) -> (T, d)``."""
    seed = fresh_seed(seed)
    gen = generator(seed)
    aggregate = as_graded(aggregate, REFERENCES)
    with grading(f"{TITLE} · output aggregation"):
        for case in CASES:
            where = f"{case}, seed {seed}"
            experts = random_experts(case, gen)
            d = moe.dispatch(experts, case.E)
            order = d.order
            weights = torch.rand(case.T, case.K, generator=gen, device=gen.device) + 0.1
            weights = weights / weights.sum(-1, keepdim=True)
            y_sorted = torch.randn(case.T * case.K, case.d, generator=gen, device=gen.device)
            got = aggregate(y_sorted.clone(), order.clone(), weights.clone())
            check_close_or_explain(f"output ({where})", got, moe.combine(y_sorted, d, weights),
                                   _aggregation_mistakes(y_sorted, d, weights), rtol=1e-4, atol=1e-5)


def grade_simple_moe(simple_moe, seed: int | None = None) -> None:
    """``simple_moe(x (T, d), w: moe.MoEWeights, k) -> (T, d)``, the whole forward pass."""
    seed = fresh_seed(seed)
    gen = generator(seed)
    simple_moe = as_graded(simple_moe, REFERENCES)
    with grading(f"{TITLE} · the whole MoE forward pass"):
        for case in CASES:
            where = f"{case}, seed {seed}"
            x, w_router = router_inputs(case, gen)
            w = moe.random_weights(case.d, 2 * case.d, case.E, device=gen.device, generator=gen)
            w = w._replace(w_router=w_router)
            want = moe.moe_forward(x, w, case.K)
            got = simple_moe(x.clone(), moe.MoEWeights(*(t.clone() for t in w)), case.K)
            check_close(f"MoE output ({where})", got, want.y, rtol=1e-4, atol=1e-4)
