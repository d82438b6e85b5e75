"""Exercise 01's grader passes right answers, written here without the course's reference, and
FAILS known wrong ones, each with a message that says what went wrong; an answer that calls the
reference is refused."""

import torch

from moe_course import moe
from moe_course.graders import ex01_simple_moe as ex01
from moe_course.moe import topk_softmax

from grader_checks import must_fail, must_pass, unfilled

# --- the router ----------------------------------------------------------------------------------


def router_ok(x, w_router, k):
    top, experts = (x @ w_router).topk(k, dim=-1)
    return top.softmax(-1), experts


def router_not_renormalised(x, w_router, k):
    return (x @ w_router).softmax(-1).topk(k, dim=-1)


def router_softmax_of_probabilities(x, w_router, k):  # softmax applied twice
    top, experts = (x @ w_router).softmax(-1).topk(k, dim=-1)
    return top.softmax(-1), experts


def router_smallest(x, w_router, k):  # picks the least likely experts
    top, experts = (-(x @ w_router)).topk(k, dim=-1)
    return (-top).softmax(-1), experts


def router_uniform_weights(x, w_router, k):
    _, experts = (x @ w_router).topk(k, dim=-1)
    return torch.full(experts.shape, 1.0 / k, device=x.device), experts


def test_router_grader():
    must_pass(ex01.grade_router, router_ok)
    # any order within a row is accepted
    must_pass(ex01.grade_router, lambda x, w, k: tuple(t.flip(-1) for t in router_ok(x, w, k)))
    must_fail(ex01.grade_router, router_not_renormalised, "must sum to 1")
    must_fail(ex01.grade_router, router_softmax_of_probabilities, "the softmax is taken twice")
    must_fail(ex01.grade_router, router_smallest, "experts, each row sorted by id")
    must_fail(ex01.grade_router, router_uniform_weights, "the same weight 1/k")
    must_fail(ex01.grade_router, lambda x, w, k: router_ok(x, w, 1), r"expected shape \(16, 2\)")
    must_fail(ex01.grade_router, lambda x, w, k: None, "got None")
    must_fail(ex01.grade_router, lambda x, w, k: router_ok(x, w, k)[0], "expected a pair")
    must_fail(ex01.grade_router, unfilled, "Exercise 01 · router: not implemented yet")


# --- the expert assignment -----------------------------------------------------------------------

def assign_ok(experts, num_experts):
    flat = experts.reshape(-1)
    counts = torch.bincount(flat, minlength=num_experts)
    return torch.argsort(flat, stable=True), counts, torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def assign_unstable(experts, num_experts):  # right groups, but reversed within each expert
    order, counts, offsets = assign_ok(experts, num_experts)
    flat = experts.flatten()
    key = flat * flat.numel() + (flat.numel() - 1 - torch.arange(flat.numel(), device=flat.device))
    return key.argsort(), counts, offsets


def assign_no_leading_zero(experts, num_experts):
    order, counts, offsets = assign_ok(experts, num_experts)
    return order, counts, offsets[1:]


def assign_offsets_left_unwritten(experts, num_experts):  # torch.empty, offsets[0] never set
    order, counts, _ = assign_ok(experts, num_experts)
    offsets = torch.empty(num_experts + 1, dtype=torch.long, device=experts.device)
    offsets[1:] = counts.cumsum(0)
    return order, counts, offsets


def assign_bincount_without_minlength(experts, num_experts):  # loses trailing empty experts
    order, _, _ = assign_ok(experts, num_experts)
    counts = torch.bincount(experts.flatten())
    return order, counts, torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def assign_tokens_not_pairs(experts, num_experts):  # sorts, then returns token ids instead of pairs
    order, counts, offsets = assign_ok(experts, num_experts)
    return order // experts.shape[1], counts, offsets


def test_assignment_grader():
    must_pass(ex01.grade_assignment, assign_ok)
    must_fail(ex01.grade_assignment, assign_unstable, "stable sort")
    must_fail(ex01.grade_assignment, assign_no_leading_zero, "offsets, E\\+1 entries")
    must_fail(ex01.grade_assignment, assign_offsets_left_unwritten, "offsets, E\\+1 entries starting at 0")
    must_fail(ex01.grade_assignment, assign_bincount_without_minlength, "counts")
    must_fail(ex01.grade_assignment, assign_tokens_not_pairs, "every pair index")
    must_fail(ex01.grade_assignment, lambda e, n: None, "got None")
    must_fail(ex01.grade_assignment, lambda e, n: assign_ok(e, n)[:2], "expected 3 values, got a tuple of 2")
    must_fail(ex01.grade_assignment, unfilled, "not implemented yet")


# --- the output aggregation ----------------------------------------------------------------------

def _back_in_pair_order(y_sorted, order):
    y = torch.empty_like(y_sorted)
    y[order] = y_sorted
    return y


def aggregate_ok(y_sorted, order, weights):
    T, k = weights.shape
    return (weights.unsqueeze(-1) * _back_in_pair_order(y_sorted, order).view(T, k, -1)).sum(1)


def aggregate_inverse_gather(y_sorted, order, weights):  # the other right way: gather with the inverse
    T, k = weights.shape
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return torch.einsum("tk,tkd->td", weights, y_sorted[inverse].view(T, k, -1))


def aggregate_permutes_twice(y_sorted, order, weights):  # the mistake the spec warns about
    T, k = weights.shape
    return (weights.unsqueeze(-1) * y_sorted[order].view(T, k, -1)).sum(1)


def aggregate_permutes_twice_index_select(y_sorted, order, weights):  # the same mistake, other words
    T, k = weights.shape
    rows = torch.index_select(y_sorted, 0, order).reshape(T, k, -1)
    return torch.einsum("tk,tkd->td", weights, rows)


def aggregate_unweighted(y_sorted, order, weights):
    T, k = weights.shape
    return _back_in_pair_order(y_sorted, order).view(T, k, -1).sum(1)


def aggregate_weights_on_sorted_rows(y_sorted, order, weights):  # weight r applied to sorted row r
    T, k = weights.shape
    return _back_in_pair_order(y_sorted * weights.reshape(-1, 1), order).view(T, k, -1).sum(1)


def aggregate_mean(y_sorted, order, weights):
    T, k = weights.shape
    return _back_in_pair_order(y_sorted, order).view(T, k, -1).mean(1)


def test_aggregation_grader():
    must_pass(ex01.grade_aggregation, aggregate_ok)
    must_pass(ex01.grade_aggregation, aggregate_inverse_gather)
    for wrong in (aggregate_permutes_twice, aggregate_permutes_twice_index_select):
        must_fail(ex01.grade_aggregation, wrong, r"values differ(.|\n)*y_sorted\[order\] is taken as the rows in "
                                                 r"pair order: that applies the permutation a second time")
    must_fail(ex01.grade_aggregation, aggregate_unweighted, "summed without the router weights")
    must_fail(ex01.grade_aggregation, aggregate_mean, "averaged, not weighted")
    must_fail(ex01.grade_aggregation, aggregate_weights_on_sorted_rows, "weight i is applied to sorted row i")
    must_fail(ex01.grade_aggregation, lambda y, o, w: aggregate_ok(y, o, w) * 1.01, r"output \(T=.*values differ")
    must_fail(ex01.grade_aggregation, lambda *a: None, "got None")
    must_fail(ex01.grade_aggregation, unfilled, "not implemented yet")


# --- the whole layer -----------------------------------------------------------------------------

def simple_moe_from(router, aggregate=aggregate_ok):
    """The notebook's given layer, with the router and aggregation swapped in."""
    def simple_moe(x, w, k):
        weights, experts = router(x, w.w_router, k)
        order, counts, offsets = assign_ok(experts, w.num_experts)
        x_sorted = x[order // k]
        y_sorted = torch.cat([moe.swiglu(x_sorted[lo:hi], w.w_gate[e], w.w_up[e], w.w_down[e])
                              for e, (lo, hi) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist()))])
        return aggregate(y_sorted, order, weights)
    return simple_moe


def test_whole_layer_grader():
    must_pass(ex01.grade_simple_moe, simple_moe_from(router_ok))
    must_fail(ex01.grade_simple_moe, simple_moe_from(router_not_renormalised), "MoE output")
    must_fail(ex01.grade_simple_moe, simple_moe_from(router_ok, aggregate_permutes_twice), "MoE output")


# --- shortcuts: the course's own answer is refused, however it is reached --------------------------

def router_helper(logits, k):
    return topk_softmax(logits, k)


def test_shortcuts_are_refused():
    refused = "calls the course's own moe_course.moe.topk_softmax: the grader compares"
    must_fail(ex01.grade_router, lambda x, w, k: moe.topk_softmax(x @ w, k), refused)
    must_fail(ex01.grade_router, lambda x, w, k: topk_softmax(x @ w, k), refused)  # imported by name
    must_fail(ex01.grade_router, lambda x, w, k: router_helper(x @ w, k), "router_helper, line .*" + refused)
    must_fail(ex01.grade_router, lambda x, w, k: moe.moe_forward(x, moe.random_weights(x.shape[1], 4, w.shape[1]),
                                                                 k).experts, "the course's own moe_course.moe.moe_forward")
    must_fail(ex01.grade_assignment, lambda e, n: moe.dispatch(e, n)[::4], "moe_course.moe.dispatch")
    must_fail(ex01.grade_aggregation,
              lambda y, o, w: moe.combine(y, moe.Dispatch(o, torch.argsort(o), o // w.shape[1], None, None, o.numel()), w),
              "moe_course.moe.combine")
    must_fail(ex01.grade_simple_moe, lambda x, w, k: moe.moe_forward(x, w, k).y, "moe_course.moe.moe_forward")
