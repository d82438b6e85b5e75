"""Exercise 02's grader passes right answers, written here without the course's reference, and
FAILS known wrong ones, each with a message that says what went wrong; an answer that calls the
reference is refused."""

import math

import torch
import torch.nn.functional as F

from moe_course import moe
from moe_course.graders import ex02_load_balancing as ex02

from grader_checks import must_fail, must_pass, unfilled

# --- the auxiliary losses ------------------------------------------------------------------------


def switch_ok(probs, experts):
    E = probs.shape[1]
    f = torch.bincount(experts.reshape(-1), minlength=E).to(probs.dtype) / experts.numel()
    return E * (f * probs.mean(0)).sum()


def gshard_ok(probs, experts):
    return switch_ok(probs, experts[:, :1])


def switch_soft_fraction(probs, experts):  # f_e from probabilities instead of counts
    E = probs.shape[1]
    return E * (probs.mean(0) * probs.mean(0)).sum()


def switch_divided_by_tokens(probs, experts):  # f_e over T, not T*K: K times too large
    E = probs.shape[1]
    f = torch.bincount(experts.flatten(), minlength=E).float() / experts.shape[0]
    return E * (f * probs.mean(0)).sum()


def switch_without_E(probs, experts):
    return switch_ok(probs, experts) / probs.shape[1]


def switch_detached(probs, experts):
    return switch_ok(probs.detach(), experts)


# The routing read off probs instead of taken from `experts`, in several words
def switch_recomputes_topk(probs, experts):
    return switch_ok(probs, probs.topk(experts.shape[1], dim=-1).indices)


def switch_recomputes_topk_by_threshold(probs, experts):  # the top-k as a mask: the same mistake
    kth = probs.topk(experts.shape[1], dim=-1).values[:, -1:]
    f = (probs >= kth).float().mean(0) / experts.shape[1]
    return probs.shape[1] * (f * probs.mean(0)).sum()


def gshard_first_choice_argmax(probs, experts):
    return switch_ok(probs, probs.argmax(dim=-1, keepdim=True))


def gshard_first_choice_max(probs, experts):
    E = probs.shape[1]
    f = F.one_hot(probs.max(dim=-1).indices, E).float().mean(0)
    return E * (f * probs.mean(0)).sum()


def test_switch_aux_loss_grader():
    must_pass(ex02.grade_switch_aux_loss, switch_ok)
    must_fail(ex02.grade_switch_aux_loss, switch_soft_fraction, "Switch auxiliary loss")
    must_fail(ex02.grade_switch_aux_loss, switch_divided_by_tokens, "values differ")
    must_fail(ex02.grade_switch_aux_loss, switch_without_E, "values differ")
    must_fail(ex02.grade_switch_aux_loss, switch_detached, "differentiable")
    must_fail(ex02.grade_switch_aux_loss, gshard_ok, "values differ")  # first choices only
    must_fail(ex02.grade_switch_aux_loss, lambda p, e: switch_ok(p, e).item(), "one-number torch tensor")
    must_fail(ex02.grade_switch_aux_loss, lambda p, e: None, "got None")
    must_fail(ex02.grade_switch_aux_loss, unfilled, "Exercise 02 · Switch auxiliary loss: not implemented yet")


def test_gshard_aux_loss_grader():
    must_pass(ex02.grade_gshard_aux_loss, gshard_ok)
    must_fail(ex02.grade_gshard_aux_loss, switch_ok, "values differ")  # counts every choice
    must_fail(ex02.grade_gshard_aux_loss, lambda p, e: gshard_ok(p, e.flip(-1)), "values differ")
    must_fail(ex02.grade_gshard_aux_loss, unfilled, "not implemented yet")


def test_a_loss_that_reads_the_routing_off_probs_fails():
    recomputed = r"routing: a noisy router(.|\n)*ignores its `experts` argument and recomputes the top-k from probs"
    must_fail(ex02.grade_switch_aux_loss, switch_recomputes_topk, recomputed)
    must_fail(ex02.grade_switch_aux_loss, switch_recomputes_topk_by_threshold, recomputed)
    argmax = r"takes each token's first choice as probs.argmax\(-1\) instead of experts\[:, 0\]"
    must_fail(ex02.grade_gshard_aux_loss, gshard_first_choice_argmax, argmax)
    must_fail(ex02.grade_gshard_aux_loss, gshard_first_choice_max, argmax)


def test_a_routing_read_off_probs_in_other_words_gets_the_same_message():
    """Any loss of probs alone that is right on the top-k routing gives, on the others, the
    loss of the recomputed top-k: the message names it, whatever words computed it."""
    def by_sorting(probs, experts):
        return switch_ok(probs, probs.argsort(dim=-1, descending=True)[:, :experts.shape[1]])
    must_fail(ex02.grade_switch_aux_loss, by_sorting, "recomputes the top-k from probs")


def test_the_routings_differ_from_the_top_k_of_probs():
    """Every case grades three routings of the same probs whose losses differ, for any seed."""
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        for case in ex02.CASES:
            probs, routings = ex02._probs_and_routings(case, gen)
            assert list(routings) == list(ex02.ROUTINGS)
            topk = probs.topk(case.K, dim=-1).indices
            assert torch.equal(routings["the top-k of probs"], topk)
            for source in ("a noisy router", "re-routed experts"):
                assert (routings[source][:, 0] != probs.argmax(-1)).any(), (seed, case, source)
                assert abs(float(moe.switch_aux_loss(probs, routings[source]) - moe.switch_aux_loss(probs, topk))) > 1e-3
                if case.empty is not None:
                    assert not (routings[source] == case.empty).any()


# --- capacity ------------------------------------------------------------------------------------

def test_capacity_grader():
    must_pass(ex02.grade_expert_capacity, lambda T, E, k, cf: math.ceil(cf * T * k / E), seeds=(None,))
    wrong = {
        "floor": lambda T, E, k, cf: math.floor(cf * T * k / E),
        "off by one": lambda T, E, k, cf: math.ceil(cf * T * k / E) + 1,
        "int() truncates": lambda T, E, k, cf: int(cf * T * k / E),
        "k forgotten": lambda T, E, k, cf: math.ceil(cf * T / E),
        "factor forgotten": lambda T, E, k, cf: math.ceil(T * k / E),
    }
    for fn in wrong.values():
        must_fail(ex02.grade_expert_capacity, fn, r"expected ceil\(", seeds=(None,))
    must_fail(ex02.grade_expert_capacity, lambda T, E, k, cf: cf * T * k / E, "whole number", seeds=(None,))
    must_fail(ex02.grade_expert_capacity, unfilled, "not implemented yet", seeds=(None,))


# --- token dropping ------------------------------------------------------------------------------

def _queue_positions(queue, num_experts):
    one_hot = F.one_hot(queue, num_experts)
    return (one_hot.cumsum(0) * one_hot).sum(1) - 1


def positions(experts, num_experts):  # each pair's place in its expert's queue, GShard's order
    T, k = experts.shape
    return _queue_positions(experts.t().reshape(-1), num_experts).view(k, T).t()


def drop_ok(experts, num_experts, capacity):
    keep = positions(experts, num_experts) < capacity
    return keep, 1 - keep.float().mean().item()


def drop_off_by_one(experts, num_experts, capacity):  # keeps capacity + 1 per expert
    keep = positions(experts, num_experts) <= capacity
    return keep, 1 - keep.float().mean().item()


def drop_token_major(experts, num_experts, capacity):  # token 0's choices, then token 1's, ...
    keep = (_queue_positions(experts.reshape(-1), num_experts) < capacity).view(experts.shape)
    return keep, 1 - keep.float().mean().item()


def drop_keeps_the_last(experts, num_experts, capacity):  # last come, first served
    T, k = experts.shape
    queue = experts.t().reshape(-1).flip(0)
    keep = (_queue_positions(queue, num_experts) < capacity).flip(0).view(k, T).t()
    return keep, 1 - keep.float().mean().item()


def drop_fraction_of_tokens(experts, num_experts, capacity):  # counts tokens with all pairs dropped
    keep, _ = drop_ok(experts, num_experts, capacity)
    return keep, (~keep).all(dim=1).float().mean().item()


def drop_reports_kept_fraction(experts, num_experts, capacity):
    keep, dropped = drop_ok(experts, num_experts, capacity)
    return keep, 1 - dropped


def test_drop_tokens_grader():
    must_pass(ex02.grade_drop_tokens, drop_ok)
    must_fail(ex02.grade_drop_tokens, drop_off_by_one, "more than its capacity")
    must_fail(ex02.grade_drop_tokens, drop_token_major, "not the right ones")
    must_fail(ex02.grade_drop_tokens, drop_keeps_the_last, "not the right ones")
    must_fail(ex02.grade_drop_tokens, drop_fraction_of_tokens, "dropped_fraction")
    must_fail(ex02.grade_drop_tokens, drop_reports_kept_fraction, "dropped_fraction")
    must_fail(ex02.grade_drop_tokens, lambda e, n, c: (torch.ones_like(e, dtype=torch.bool), 0.0),
              "more than its capacity")
    must_fail(ex02.grade_drop_tokens, lambda e, n, c: None, "got None")
    must_fail(ex02.grade_drop_tokens, unfilled, "not implemented yet")


# --- shortcuts -----------------------------------------------------------------------------------

def test_shortcuts_are_refused():
    must_fail(ex02.grade_switch_aux_loss, moe.switch_aux_loss, "the function given is the course's own "
                                                              "moe_course.moe.switch_aux_loss")
    # GShard through the course's Switch loss on the first column: refused too
    must_fail(ex02.grade_gshard_aux_loss, lambda p, e: moe.switch_aux_loss(p, e[:, :1]),
              "calls the course's own moe_course.moe.switch_aux_loss")
    must_fail(ex02.grade_expert_capacity, lambda T, E, k, cf: moe.expert_capacity(T, E, k, cf),
              "moe_course.moe.expert_capacity", seeds=(None,))

    def drop_via_course(experts, num_experts, capacity):
        r = moe.drop_tokens(experts, num_experts, capacity)
        return r.keep, r.dropped_fraction
    must_fail(ex02.grade_drop_tokens, drop_via_course, "drop_via_course, line .* moe_course.moe.drop_tokens")
