"""The exercise graders pass the reference and FAIL known wrong answers, each with a message
that says what went wrong. Every wrong answer is tried with several seeds: it must fail on all
of them (a grader that lets a wrong answer through by luck is a broken grader)."""

import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from moe_course import ROOT, moe
from moe_course.checking import CheckFailed
from moe_course.graders import ex01_simple_moe as ex01
from moe_course.graders import ex02_load_balancing as ex02

SEEDS = (0, 1, 2)


def must_fail(grade, fn, match: str, seeds=SEEDS):
    for seed in seeds:
        with pytest.raises(CheckFailed, match=match):
            grade(fn, seed=seed) if seed is not None else grade(fn)


def must_pass(grade, fn, capsys, seeds=SEEDS + (None,)):  # None: a fresh random seed
    for seed in seeds:
        grade(fn, seed=seed)
    assert "PASS" in capsys.readouterr().out


def unfilled(*args):
    raise NotImplementedError("fill in this cell (test)")


# --- exercise 01: router -------------------------------------------------------------------------

def router_ok(x, w_router, k):
    return moe.topk_softmax(x @ w_router, k)


def router_not_renormalised(x, w_router, k):
    probs = (x @ w_router).softmax(-1)
    return probs.topk(k, dim=-1)


def router_softmax_of_probabilities(x, w_router, k):  # softmax applied twice
    top, experts = (x @ w_router).softmax(-1).topk(k, dim=-1)
    return top.softmax(-1), experts


def router_smallest(x, w_router, k):  # picks the least likely experts
    top, experts = (-(x @ w_router)).topk(k, dim=-1)
    return (-top).softmax(-1), experts


def router_uniform_weights(x, w_router, k):
    _, experts = (x @ w_router).topk(k, dim=-1)
    return torch.full(experts.shape, 1.0 / k, device=x.device), experts


def test_router_grader(capsys):
    must_pass(ex01.grade_router, router_ok, capsys)
    # any order within a row is accepted
    must_pass(ex01.grade_router, lambda x, w, k: tuple(t.flip(-1) for t in router_ok(x, w, k)), capsys)
    must_fail(ex01.grade_router, router_not_renormalised, "must sum to 1")
    must_fail(ex01.grade_router, router_softmax_of_probabilities, "weights, each row sorted")
    must_fail(ex01.grade_router, router_smallest, "experts, each row sorted by id")
    must_fail(ex01.grade_router, router_uniform_weights, "weights, each row sorted")
    must_fail(ex01.grade_router, lambda x, w, k: router_ok(x, w, 1), r"expected shape \(16, 2\)")
    must_fail(ex01.grade_router, lambda x, w, k: None, "got None")
    must_fail(ex01.grade_router, lambda x, w, k: router_ok(x, w, k)[0], "expected a pair")
    must_fail(ex01.grade_router, unfilled, "Exercise 01 · router: not implemented yet")


# --- exercise 01: assignment ---------------------------------------------------------------------

def assign_ok(experts, num_experts):
    d = moe.dispatch(experts, num_experts)
    return d.order, d.counts, d.offsets


def assign_unstable(experts, num_experts):  # right groups, but reversed within each expert
    order, counts, offsets = assign_ok(experts, num_experts)
    flat = experts.flatten()
    key = flat * flat.numel() + (flat.numel() - 1 - torch.arange(flat.numel(), device=flat.device))
    return key.argsort(), counts, offsets


def assign_no_leading_zero(experts, num_experts):
    order, counts, offsets = assign_ok(experts, num_experts)
    return order, counts, offsets[1:]


def assign_bincount_without_minlength(experts, num_experts):  # loses trailing empty experts
    order, _, _ = assign_ok(experts, num_experts)
    counts = torch.bincount(experts.flatten())
    return order, counts, torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def assign_tokens_not_pairs(experts, num_experts):  # sorts, then returns token ids instead of pairs
    order, counts, offsets = assign_ok(experts, num_experts)
    return order // experts.shape[1], counts, offsets


def test_assignment_grader(capsys):
    must_pass(ex01.grade_assignment, assign_ok, capsys)
    must_fail(ex01.grade_assignment, assign_unstable, "stable sort")
    must_fail(ex01.grade_assignment, assign_no_leading_zero, "offsets, E\\+1 entries")
    must_fail(ex01.grade_assignment, assign_bincount_without_minlength, "counts")
    must_fail(ex01.grade_assignment, assign_tokens_not_pairs, "every pair index")
    must_fail(ex01.grade_assignment, lambda e, n: None, "got None")
    must_fail(ex01.grade_assignment, unfilled, "not implemented yet")


# --- exercise 01: aggregation --------------------------------------------------------------------

def aggregate_ok(y_sorted, order, weights):
    T, k = weights.shape
    y = torch.empty_like(y_sorted)
    y[order] = y_sorted
    return (weights.unsqueeze(-1) * y.view(T, k, -1)).sum(1)


def aggregate_permutes_twice(y_sorted, order, weights):  # y_sorted[order] is not the way back
    T, k = weights.shape
    return (weights.unsqueeze(-1) * y_sorted[order].view(T, k, -1)).sum(1)


def aggregate_unweighted(y_sorted, order, weights):
    T, k = weights.shape
    y = torch.empty_like(y_sorted)
    y[order] = y_sorted
    return y.view(T, k, -1).sum(1)


def aggregate_weights_on_sorted_rows(y_sorted, order, weights):  # weight r applied to sorted row r
    T, k = weights.shape
    y = torch.empty_like(y_sorted)
    y[order] = y_sorted * weights.reshape(-1, 1)
    return y.view(T, k, -1).sum(1)


def aggregate_mean(y_sorted, order, weights):
    T, k = weights.shape
    y = torch.empty_like(y_sorted)
    y[order] = y_sorted
    return y.view(T, k, -1).mean(1)


def test_aggregation_grader(capsys):
    must_pass(ex01.grade_aggregation, aggregate_ok, capsys)
    for wrong in (aggregate_permutes_twice, aggregate_unweighted, aggregate_weights_on_sorted_rows, aggregate_mean):
        must_fail(ex01.grade_aggregation, wrong, r"output \(T=.*values differ")
    must_fail(ex01.grade_aggregation, lambda *a: None, "got None")
    must_fail(ex01.grade_aggregation, unfilled, "not implemented yet")


def test_whole_layer_grader(capsys):
    must_pass(ex01.grade_simple_moe, lambda x, w, k: moe.moe_forward(x, w, k).y, capsys)
    must_fail(ex01.grade_simple_moe, lambda x, w, k: moe.moe_forward(x, w, k, router="softmax_topk").y,
              "MoE output")
    must_fail(ex01.grade_simple_moe, lambda x, w, k: moe.moe_forward(x, w, max(1, k - 1)).y, "MoE output")


# --- exercise 02: auxiliary losses ---------------------------------------------------------------

def switch_soft_fraction(probs, experts):  # f_e from probabilities instead of counts
    E = probs.shape[1]
    return E * (probs.mean(0) * probs.mean(0)).sum()


def switch_divided_by_tokens(probs, experts):  # f_e over T, not T*K: K times too large
    E = probs.shape[1]
    f = torch.bincount(experts.flatten(), minlength=E).float() / experts.shape[0]
    return E * (f * probs.mean(0)).sum()


def switch_without_E(probs, experts):
    return moe.switch_aux_loss(probs, experts) / probs.shape[1]


def switch_detached(probs, experts):
    return moe.switch_aux_loss(probs.detach(), experts)


def test_switch_aux_loss_grader(capsys):
    must_pass(ex02.grade_switch_aux_loss, moe.switch_aux_loss, capsys)
    must_fail(ex02.grade_switch_aux_loss, switch_soft_fraction, "Switch auxiliary loss")
    must_fail(ex02.grade_switch_aux_loss, switch_divided_by_tokens, "values differ")
    must_fail(ex02.grade_switch_aux_loss, switch_without_E, "values differ")
    must_fail(ex02.grade_switch_aux_loss, switch_detached, "differentiable")
    must_fail(ex02.grade_switch_aux_loss, moe.gshard_aux_loss, "values differ")  # first choices only
    must_fail(ex02.grade_switch_aux_loss, lambda p, e: moe.switch_aux_loss(p, e).item(), "one-number torch tensor")
    must_fail(ex02.grade_switch_aux_loss, lambda p, e: None, "got None")
    must_fail(ex02.grade_switch_aux_loss, unfilled, "Exercise 02 · Switch auxiliary loss: not implemented yet")


def test_gshard_aux_loss_grader(capsys):
    must_pass(ex02.grade_gshard_aux_loss, moe.gshard_aux_loss, capsys)
    must_fail(ex02.grade_gshard_aux_loss, moe.switch_aux_loss, "values differ")  # counts every choice
    must_fail(ex02.grade_gshard_aux_loss, lambda p, e: moe.gshard_aux_loss(p, e.flip(-1)), "values differ")
    must_fail(ex02.grade_gshard_aux_loss, unfilled, "not implemented yet")


# --- exercise 02: capacity -----------------------------------------------------------------------

def test_capacity_grader(capsys):
    ex02.grade_expert_capacity(moe.expert_capacity)
    ex02.grade_expert_capacity(lambda T, E, k, cf: math.ceil(cf * T * k / E))  # the plain formula passes
    assert "PASS" in capsys.readouterr().out
    wrong = {
        "floor": lambda T, E, k, cf: math.floor(cf * T * k / E),
        "off by one": lambda T, E, k, cf: math.ceil(cf * T * k / E) + 1,
        "int() truncates": lambda T, E, k, cf: int(cf * T * k / E),
        "k forgotten": lambda T, E, k, cf: math.ceil(cf * T / E),
        "factor forgotten": lambda T, E, k, cf: math.ceil(T * k / E),
        "not whole": lambda T, E, k, cf: cf * T * k / E,
    }
    for fn in wrong.values():
        with pytest.raises(CheckFailed, match="capacity"):
            ex02.grade_expert_capacity(fn)
    with pytest.raises(CheckFailed, match="not implemented yet"):
        ex02.grade_expert_capacity(unfilled)


# --- exercise 02: token dropping -----------------------------------------------------------------

def drop_ok(experts, num_experts, capacity):
    r = moe.drop_tokens(experts, num_experts, capacity)
    return r.keep, r.dropped_fraction


def _queue_positions(queue, num_experts):
    one_hot = F.one_hot(queue, num_experts)
    return (one_hot.cumsum(0) * one_hot).sum(1) - 1


def drop_off_by_one(experts, num_experts, capacity):  # keeps capacity + 1 per expert
    r = moe.drop_tokens(experts, num_experts, capacity)
    keep = r.position <= capacity
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


def test_drop_tokens_grader(capsys):
    must_pass(ex02.grade_drop_tokens, drop_ok, capsys)
    must_fail(ex02.grade_drop_tokens, drop_off_by_one, "more than its capacity")
    must_fail(ex02.grade_drop_tokens, drop_token_major, "not the right ones")
    must_fail(ex02.grade_drop_tokens, drop_keeps_the_last, "not the right ones")
    must_fail(ex02.grade_drop_tokens, drop_fraction_of_tokens, "dropped_fraction")
    must_fail(ex02.grade_drop_tokens, drop_reports_kept_fraction, "dropped_fraction")
    must_fail(ex02.grade_drop_tokens, lambda e, n, c: (torch.ones_like(e, dtype=torch.bool), 0.0),
              "more than its capacity")
    must_fail(ex02.grade_drop_tokens, lambda e, n, c: None, "got None")
    must_fail(ex02.grade_drop_tokens, unfilled, "not implemented yet")


# --- the unfilled exercise notebooks, through nbval as `make grade` runs them ---------------------

@pytest.mark.parametrize("notebook", ["01_simple_moe.ipynb", "02_load_balancing.ipynb"])
def test_unfilled_exercises_fail_saying_not_implemented(notebook):
    path = ROOT / "exercises" / notebook
    assert path.exists(), f"{path} is missing: run `make exercises`"
    env = {**os.environ, "MPLBACKEND": "agg"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
                          "--nbval-current-env", str(path)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    out = re.sub(r"\x1b\[[0-9;]*m", "", run.stdout + run.stderr)  # no terminal colours
    assert run.returncode != 0, out
    failed = int(re.search(r"(\d+) failed", out)[1])
    graded = len(re.findall(r"not implemented yet \(fill in this cell", out))
    assert graded >= 4, out  # every grading cell says so
    # every other failing cell stopped at a NotImplementedError of an unfilled cell, nothing else
    raw = len(re.findall(r"NotImplementedError: fill in this cell", out))
    assert graded + raw >= failed, out
    for unclear in ("NameError", "TypeError", "AttributeError", "IndexError", "RuntimeError"):
        assert unclear not in out, out
