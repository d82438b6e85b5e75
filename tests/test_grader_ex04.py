"""Exercise 04's grader passes the reference and FAILS known wrong answers (rounds the wrong way,
drops top-K tokens before the others, selects a pair twice, breaks ties the other way, keeps the
lowest scores, returns nothing), each on several seeds and each with a message saying what went
wrong."""

import pytest
import torch

from moe_course import token_rounding as tr
from moe_course.checking import CheckFailed
from moe_course.graders import ex04_token_rounding as ex04

SEEDS = (0, 1, 2)


def must_fail(grade, fn, match, seeds=SEEDS):
    for seed in seeds:
        with pytest.raises(CheckFailed, match=match):
            grade(fn) if seed is None else grade(fn, seed=seed)


def unfilled(*args):
    raise NotImplementedError("fill in this cell (test)")


# --- rounding the counts -------------------------------------------------------------------------

def round_ok(counts, tile, mode, num_tokens):
    return tr.round_counts(counts, tile, mode, num_tokens)


def round_half_to_even(counts, tile, mode, num_tokens):  # torch.round: 0.5 -> 0, 2.5 -> 2
    if mode != "nearest":
        return round_ok(counts, tile, mode, num_tokens)
    return (torch.round(counts / tile) * tile).long().clamp(max=num_tokens)


def round_nearest_as_floor(counts, tile, mode, num_tokens):  # rounds the wrong way
    return round_ok(counts, tile, "down" if mode == "nearest" else mode, num_tokens)


def round_up_and_down_swapped(counts, tile, mode, num_tokens):
    return round_ok(counts, tile, {"up": "down", "down": "up"}.get(mode, mode), num_tokens)


def round_not_capped(counts, tile, mode, num_tokens):
    return tr.round_counts(counts, tile, mode)


def test_round_counts_grader(capsys):
    ex04.grade_round_counts(round_ok)
    assert "PASS" in capsys.readouterr().out
    must_fail(ex04.grade_round_counts, round_half_to_even, "an exact half goes up; got 0", seeds=(None,))
    must_fail(ex04.grade_round_counts, round_nearest_as_floor, "f=127.*expected 128, the nearest multiple.*got 0",
              seeds=(None,))
    must_fail(ex04.grade_round_counts, round_up_and_down_swapped, "expected 256, the multiple at or above; got 128",
              seeds=(None,))
    must_fail(ex04.grade_round_counts, round_not_capped, "capped at num_tokens=100", seeds=(None,))
    must_fail(ex04.grade_round_counts, lambda c, t, m, n: None, "got None", seeds=(None,))
    must_fail(ex04.grade_round_counts, lambda c, t, m, n: int(c[0]), r"expected shape \(2,\)", seeds=(None,))
    must_fail(ex04.grade_round_counts, unfilled, "not implemented yet", seeds=(None,))


# --- selecting the tokens ------------------------------------------------------------------------

def ranked_selection(scores, topk, rounded, key):
    """Each expert keeps the first rounded[e] tokens of a stable descending sort by key(e)."""
    rows = []
    for e in range(scores.shape[1]):
        order = torch.sort(key(e), descending=True, stable=True).indices
        rows.append(order[: int(rounded[e])])
    return torch.cat(rows), rounded.clone()


def select_ok(scores, topk, rounded):  # the paper's way: non-top-K scores minus one
    picked = tr.topk_mask(topk, scores.shape[1])
    return ranked_selection(scores, topk, rounded, lambda e: torch.where(picked[:, e], scores[:, e], scores[:, e] - 1))


def select_by_raw_score(scores, topk, rounded):  # forgets that top-K tokens come first
    return ranked_selection(scores, topk, rounded, lambda e: scores[:, e])


def select_pair_twice(scores, topk, rounded):  # rounding up: top-K, then the best of *all* tokens again
    picked = tr.topk_mask(topk, scores.shape[1])
    rows = []
    for e in range(scores.shape[1]):
        top = picked[:, e].nonzero().flatten()
        top = top[torch.sort(scores[top, e], descending=True, stable=True).indices]
        best = torch.sort(scores[:, e], descending=True, stable=True).indices
        extra = max(0, int(rounded[e]) - top.numel())
        rows.append(torch.cat([top[: int(rounded[e])], best[:extra]]))
    return torch.cat(rows), rounded.clone()


def select_ties_reversed(scores, topk, rounded):  # equal scores to the *higher* token id
    picked = tr.topk_mask(topk, scores.shape[1])
    flip = torch.arange(scores.shape[0] - 1, -1, -1)
    rows = []
    for e in range(scores.shape[1]):
        key = torch.where(picked[:, e], scores[:, e], scores[:, e] - 1)[flip]
        rows.append(flip[torch.sort(key, descending=True, stable=True).indices][: int(rounded[e])])
    return torch.cat(rows), rounded.clone()


def select_lowest_first(scores, topk, rounded):  # drops the best instead of the worst
    picked = tr.topk_mask(topk, scores.shape[1])
    return ranked_selection(scores, topk, rounded,
                            lambda e: torch.where(picked[:, e], 2 - scores[:, e], 1 - scores[:, e]))


def select_topk_only(scores, topk, rounded):  # never rounds: plain top-K rows
    r = tr.topk_routing(scores, topk.shape[1])
    return r.token_ids, r.counts


def select_empty(scores, topk, rounded):
    return torch.empty(0, dtype=torch.long), torch.zeros_like(rounded)


def test_select_tokens_grader(capsys):
    for seed in SEEDS + (None,):
        ex04.grade_select_tokens(select_ok, seed=seed)
    assert "PASS" in capsys.readouterr().out
    # any order within an expert is accepted
    ex04.grade_select_tokens(lambda s, t, r: (lambda ids, c: (torch.cat([x.flip(0) for x in ids.split(c.tolist())]),
                                                              c))(*select_ok(s, t, r)), seed=0)
    must_fail(ex04.grade_select_tokens, select_by_raw_score, "drops token .*, one of its top-K tokens")
    must_fail(ex04.grade_select_tokens, select_pair_twice, "selected twice")
    must_fail(ex04.grade_select_tokens, select_ties_reversed, "equal scores go to the lower token id")
    must_fail(ex04.grade_select_tokens, select_lowest_first, "keep the highest scores, drop the lowest first")
    must_fail(ex04.grade_select_tokens, select_topk_only, r"expected \d+ rows \(its top-K count")
    must_fail(ex04.grade_select_tokens, select_empty, r"expected \d+ rows")
    must_fail(ex04.grade_select_tokens, lambda s, t, r: None, "got None")
    must_fail(ex04.grade_select_tokens, lambda s, t, r: select_ok(s, t, r)[0], "expected a pair")
    must_fail(ex04.grade_select_tokens, lambda s, t, r: (select_ok(s, t, r)[0], r[:-1]), r"expected shape")
    must_fail(ex04.grade_select_tokens, unfilled, "not implemented yet")


def test_whole_step_grader(capsys):
    def whole_ok(scores, k, tile, mode):
        r = tr.token_rounding(scores, k, tile, mode)
        return r.token_ids, r.counts

    for seed in SEEDS:
        ex04.grade_token_rounding(whole_ok, seed=seed)
    assert "PASS" in capsys.readouterr().out
    must_fail(ex04.grade_token_rounding, lambda s, k, t, m: whole_ok(s, k, t, "up" if m == "nearest" else m),
              r"expected \d+ rows")
    must_fail(ex04.grade_token_rounding, lambda s, k, t, m: whole_ok(s, k, t, "down" if m == "up" else m),
              r"expected \d+ rows")
    must_fail(ex04.grade_token_rounding, lambda s, k, t, m: select_empty(s, None, torch.zeros(s.shape[1])),
              r"expected \d+ rows")
    must_fail(ex04.grade_token_rounding, unfilled, "not implemented yet")


def test_every_case_is_what_its_name_says():
    for name, scores, k, tile in ex04.cases(seed=7):
        f = tr.expert_counts(tr.topk_experts(scores, k), scores.shape[1])
        if "no tokens" in name:
            assert (f == 0).any()
        if "tile multiple" in name:
            assert ((f % tile == 0) & (f > 0)).any()
        if "half a tile" in name:
            assert ((f % tile) * 2 == tile).any()
        if "tie" in name:
            assert scores.unique().numel() == 2
        if "every token" in name:
            assert f.max() == scores.shape[0] and scores.shape[0] % tile
        assert bool(((scores * 64) == (scores * 64).round()).all())  # multiples of 1/64: s - 1 is exact
