"""Exercise 04's grader passes right answers, written here without the course's reference, and
FAILS known wrong answers (rounds the wrong way, float counts, drops top-K tokens before the
others, a penalty for not being top-K that is too small, selects a pair twice, breaks ties the
other way, keeps the lowest scores, returns nothing), each on several seeds and each with a
message saying what went wrong; an answer that calls the reference is refused."""

import pytest
import torch

from moe_course import token_rounding as tr
from moe_course.graders import ex04_token_rounding as ex04
from moe_course.token_rounding import rank_candidates

from grader_checks import must_fail, must_pass, unfilled

# --- rounding the counts -------------------------------------------------------------------------

def round_ok(counts, tile, mode, num_tokens):
    if mode == "up":
        rounded = (counts + tile - 1) // tile * tile
    elif mode == "down":
        rounded = counts // tile * tile
    else:
        rounded = (2 * counts + tile) // (2 * tile) * tile
    return rounded.clamp(max=num_tokens)


def round_half_to_even(counts, tile, mode, num_tokens):  # torch.round: 0.5 -> 0, 2.5 -> 2
    if mode != "nearest":
        return round_ok(counts, tile, mode, num_tokens)
    return (torch.round(counts / tile) * tile).long().clamp(max=num_tokens)


def round_nearest_as_floor(counts, tile, mode, num_tokens):  # rounds the wrong way
    return round_ok(counts, tile, "down" if mode == "nearest" else mode, num_tokens)


def round_up_and_down_swapped(counts, tile, mode, num_tokens):
    return round_ok(counts, tile, {"up": "down", "down": "up"}.get(mode, mode), num_tokens)


def round_not_capped(counts, tile, mode, num_tokens):
    return round_ok(counts, tile, mode, 10**9)


def round_only_the_first(counts, tile, mode, num_tokens):  # every expert gets the first one's count
    return round_ok(counts[:1], tile, mode, num_tokens).expand(counts.shape).clone()


def test_round_counts_grader():
    must_pass(ex04.grade_round_counts, round_ok)
    must_fail(ex04.grade_round_counts, round_half_to_even, "an exact half goes up; got 0")
    must_fail(ex04.grade_round_counts, round_nearest_as_floor, "f=127.*expected 128, the nearest multiple.*got 0")
    must_fail(ex04.grade_round_counts, round_up_and_down_swapped, "expected 256, the multiple at or above; got 128")
    must_fail(ex04.grade_round_counts, round_not_capped, "capped at num_tokens=100")
    must_fail(ex04.grade_round_counts, round_only_the_first, r"f=128, tile=128, 'nearest'.*expected 128.*got 0")
    must_fail(ex04.grade_round_counts, lambda c, t, m, n: None, "got None")
    must_fail(ex04.grade_round_counts, lambda c, t, m, n: int(c[0]), "expected a torch tensor of counts")
    must_fail(ex04.grade_round_counts, lambda c, t, m, n: round_ok(c, t, m, n)[:-1], r"expected shape \(8,\)")
    must_fail(ex04.grade_round_counts, unfilled, "not implemented yet")


@pytest.mark.parametrize("counts_of", [
    lambda c, t, m, n: round_ok(c, t, m, n).float(),
    lambda c, t, m, n: round_ok(c, t, m, n).double(),
    lambda c, t, m, n: (torch.ceil(c / t) * t).clamp(max=n) if m == "up" else round_ok(c, t, m, n) * 1.0,
    lambda c, t, m, n: round_ok(c, t, m, n).int(),
])
def test_counts_of_the_wrong_dtype_fail(counts_of):
    must_fail(ex04.grade_round_counts, counts_of, r"expected counts \(whole rows\) as int64, as the spec says; got torch")
    must_fail(ex04.grade_round_counts, lambda c, t, m, n: round_ok(c, t, m, n).tolist(),
              "expected a torch tensor of counts", seeds=(0,))


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
    picked = tr.topk_mask(topk, scores.shape[1])
    return picked.t().nonzero()[:, 1], picked.sum(0)


def select_with_penalty(size):
    """The non-top-K scores lowered by ``size`` (the paper: 1)."""
    def select(scores, topk, rounded):
        picked = tr.topk_mask(topk, scores.shape[1])
        return ranked_selection(scores, topk, rounded,
                                lambda e: torch.where(picked[:, e], scores[:, e], scores[:, e] - size))
    return select


def select_with_topk_bonus(size):
    """The top-K scores raised by ``size``: the same ranking as a penalty of that size."""
    def select(scores, topk, rounded):
        picked = tr.topk_mask(topk, scores.shape[1])
        return ranked_selection(scores, topk, rounded, lambda e: scores[:, e] + size * picked[:, e])
    return select


def select_halving_the_others(scores, topk, rounded):  # a penalty that scales: 1 -> 0.5 still beats 1/64
    picked = tr.topk_mask(topk, scores.shape[1])
    return ranked_selection(scores, topk, rounded, lambda e: torch.where(picked[:, e], scores[:, e], scores[:, e] / 2))


def select_empty(scores, topk, rounded):
    return torch.empty(0, dtype=torch.long), torch.zeros_like(rounded)


def test_select_tokens_grader():
    must_pass(ex04.grade_select_tokens, select_ok)
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
    must_fail(ex04.grade_select_tokens, lambda s, t, r: (select_ok(s, t, r)[0], r.float()),
              r"counts .*: expected row counts as int64, as the spec says; got torch.float32")
    must_fail(ex04.grade_select_tokens, lambda s, t, r: (select_ok(s, t, r)[0].float(), r),
              r"token_ids .*: expected token ids as int64, as the spec says; got torch.float32")
    must_fail(ex04.grade_select_tokens, unfilled, "not implemented yet")


@pytest.mark.parametrize("size", [1, 1.5, 2, 10])
def test_a_penalty_of_one_or_more_passes(size):
    must_pass(ex04.grade_select_tokens, select_with_penalty(size))
    must_pass(ex04.grade_select_tokens, select_with_topk_bonus(size))


@pytest.mark.parametrize("wrong", [select_with_penalty(0.5), select_with_penalty(0.9), select_with_penalty(0.98),
                                   select_with_penalty(0.1), select_with_topk_bonus(0.5), select_with_topk_bonus(0.25),
                                   select_halving_the_others, select_by_raw_score])
def test_a_penalty_too_small_fails_saying_so(wrong):
    must_fail(ex04.grade_select_tokens, wrong,
              r"strong non-top-K token meets weak top-K ones.*keeps token \d+, which did not pick this expert \(score "
              r"[\d.]+\), but drops token \d+, one of its top-K tokens \(score 0.015625\)\. A score of [\d.]+ without "
              r"top-K must still rank below 0.015625 with it: a penalty \(or a top-K bonus\) of less than one, or none, "
              r"is too small")


def whole_ok(scores, k, tile, mode):
    topk = tr.topk_experts(scores, k)
    counts = torch.bincount(topk.reshape(-1), minlength=scores.shape[1])
    return select_ok(scores, topk, round_ok(counts, tile, mode, scores.shape[0]))


def test_whole_step_grader():
    must_pass(ex04.grade_token_rounding, whole_ok)
    must_fail(ex04.grade_token_rounding, lambda s, k, t, m: whole_ok(s, k, t, "up" if m == "nearest" else m),
              r"expected \d+ rows")
    must_fail(ex04.grade_token_rounding, lambda s, k, t, m: whole_ok(s, k, t, "down" if m == "up" else m),
              r"expected \d+ rows")
    must_fail(ex04.grade_token_rounding, lambda s, k, t, m: select_empty(s, None, torch.zeros(s.shape[1], dtype=torch.long)),
              r"expected \d+ rows")
    must_fail(ex04.grade_token_rounding, lambda s, k, t, m: [x.float() for x in whole_ok(s, k, t, m)],
              "as int64, as the spec says; got torch.float32")
    must_fail(ex04.grade_token_rounding, unfilled, "not implemented yet")


def test_shortcuts_are_refused():
    must_fail(ex04.grade_round_counts, tr.round_counts, "the function given is the course's own "
                                                        "moe_course.token_rounding.round_counts")

    def select_via_ranking(scores, topk, rounded):
        ranked = rank_candidates(scores, topk)  # imported by name
        return torch.cat([ranked[e, :int(r)] for e, r in enumerate(rounded)]), rounded.clone()
    must_fail(ex04.grade_select_tokens, select_via_ranking,
              r"select_via_ranking, line \d+, calls the course's own moe_course.token_rounding.rank_candidates")
    must_fail(ex04.grade_select_tokens, lambda s, t, r: (tr.topk_routing(s, t.shape[1]).token_ids, r),
              r"rank_candidates \(through moe_course.token_rounding.topk_routing, which uses it\)")

    def whole_via_course(scores, k, tile, mode):
        r = tr.token_rounding(scores, k, tile, mode)
        return r.token_ids, r.counts
    must_fail(ex04.grade_token_rounding, whole_via_course, "moe_course.token_rounding.token_rounding")


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


def test_strong_meets_weak_is_what_it_says():
    """Every target expert has only weak top-K tokens (1/64), a tile or more of non-top-K tokens
    scoring 1 (the widest gap the 1/64 grid allows), and keeps rows in every mode."""
    for seed in range(30):
        for k in (1, 2):
            scores = ex04.strong_meets_weak(seed, k)
            topk = tr.topk_experts(scores, k)
            picked = tr.topk_mask(topk, scores.shape[1])
            f = picked.sum(0)
            for e in range(k, scores.shape[1]):
                assert (scores[picked[:, e], e] == 1 / 64).all()
                assert int(((scores[:, e] == 1) & ~picked[:, e]).sum()) >= 8
                assert 8 <= int(f[e]) <= 16
                for mode in tr.MODES:
                    assert 1 <= int(tr.round_counts(f, 8, mode, scores.shape[0])[e])
