"""Grader of exercise 04, tile-aware token rounding (the rounding step of Algorithm 4).

The learner writes (shapes and rules as in :mod:`moe_course.token_rounding`):

- ``round_counts(counts (E,), tile, mode, num_tokens) -> (E,)``: each count rounded to a
  multiple of ``tile`` (``"nearest"``, an exact half going up; ``"up"``; ``"down"``), capped at
  ``num_tokens``
- ``select_tokens(scores (T, E), topk (T, K), rounded (E,)) -> (token_ids (R,), counts (E,))``:
  each expert keeps the first ``rounded[e]`` of its candidates ranked top-K first, then by
  score, equal scores by the lower token id; rows grouped by expert (expert 0 first), any order
  within an expert
- ``token_rounding(scores, k, tile, mode) -> (token_ids, counts)``: the two together, after top-K

Every case is built so that something can go wrong: an expert with no tokens, experts already on
a tile multiple, exactly half a tile, scores that tie everywhere, one expert taking every token
(its rounded count capped at T), and a random router. Scores are multiples of 1/64 in [0, 1],
so "score minus one" is exact in float32 and a tie is a true tie.
"""

from __future__ import annotations

import torch

from .. import token_rounding as tr
from ..checking import CheckFailed, check_shape, check_true, grading, to_numpy
from . import as_tensor_pair, fresh_seed

TITLE = "Exercise 04"

#: (f, tile, mode, num_tokens): zero, exact multiples, one above and below, exact halves (even and
#: odd multiples), odd tiles, a tile of one, and counts capped at the number of tokens.
ROUND_CASES = [(f, tile, mode, cap) for mode in tr.MODES for f, tile, cap in (
    (0, 128, 1000), (128, 128, 1000), (129, 128, 1000), (127, 128, 1000), (64, 128, 1000),
    (63, 128, 1000), (192, 128, 1000), (320, 128, 1000), (5, 3, 100), (4, 3, 100), (7, 1, 100),
    (90, 64, 100), (100, 64, 100), (33, 64, 40))]


def _explain_round(f: int, tile: int, mode: str, cap: int, want: int) -> str:
    why = {"nearest": "the nearest multiple; an exact half goes up", "up": "the multiple at or above",
           "down": "the multiple at or below"}[mode]
    capped = f" (then capped at num_tokens={cap})" if want == cap and want % tile else ""
    return f"round_counts(f={f}, tile={tile}, {mode!r}, num_tokens={cap}): expected {want}, {why}{capped}"


def grade_round_counts(round_counts) -> None:
    """``round_counts(counts (E,) int64, tile, mode, num_tokens) -> (E,)``."""
    with grading(f"{TITLE} · rounding the counts"):
        for f, tile, mode, cap in ROUND_CASES:
            counts = torch.tensor([f, f], dtype=torch.long)  # a tensor of counts, one per expert
            want = tr.round_counts(counts, tile, mode, num_tokens=cap)
            got = round_counts(counts.clone(), tile, mode, cap)
            if got is None:
                raise CheckFailed("round_counts: got None (did the function forget to return its result?)")
            check_shape(f"round_counts(f={f}, tile={tile}, {mode!r})", got, (2,))
            got = torch.as_tensor(to_numpy(got))
            check_true(f"round_counts(f={f}, tile={tile}, {mode!r})", not got.is_floating_point()
                       or bool((got == got.round()).all()), f"expected whole numbers of rows, got {got.tolist()}")
            if int(got[0]) != int(want[0]):
                raise CheckFailed(_explain_round(f, tile, mode, cap, int(want[0])) + f"; got {int(got[0])}")


def cases(seed: int) -> list[tuple[str, torch.Tensor, int, int]]:
    """(name, scores (T, E), k, tile): the awkward cases, drawn afresh from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    rand = torch.randint(0, 65, (100, 8), generator=g) / 64
    return [
        ("experts with no tokens", tr.scores_with_counts([0, 40, 0, 56, 24, 0, 40, 0], 80, 2, seed=seed), 2, 16),
        ("experts on a tile multiple", tr.scores_with_counts([32, 0, 64, 16, 16, 32], 80, 2, seed=seed + 1), 2, 16),
        ("exactly half a tile", tr.scores_with_counts([8, 24, 40, 8], 40, 2, seed=seed + 2), 2, 16),
        ("scores tie everywhere", tr.scores_with_counts([30, 10, 50, 30], 60, 2, seed=seed + 3, ties=True), 2, 16),
        ("one expert takes every token", tr.scores_with_counts([21, 0, 0], 21, 1, seed=seed + 4), 1, 4),
        ("a random router", rand, 2, 8),
    ]


def _check_selection(name: str, result, scores: torch.Tensor, topk: torch.Tensor, rounded: torch.Tensor,
                     where: str) -> None:
    """The learner's (token_ids, counts) against the reference ranking, explained."""
    num_tokens, num_experts = scores.shape
    token_ids, counts = as_tensor_pair(name, result, where)
    check_shape(f"counts ({where})", counts, (num_experts,))
    token_ids = torch.as_tensor(to_numpy(token_ids)).long().reshape(-1)
    counts = torch.as_tensor(to_numpy(counts)).long()
    check_true(f"counts ({where})", int(counts.sum()) == token_ids.numel(),
               f"counts add up to {int(counts.sum())} rows but token_ids has {token_ids.numel()}")
    bad = (token_ids < 0) | (token_ids >= num_tokens)
    check_true(f"token_ids ({where})", not bool(bad.any()),
               f"token ids must be in [0, {num_tokens}); got {token_ids[bad][:3].tolist()}")
    ranked = tr.rank_candidates(scores, topk)
    picked = tr.topk_mask(topk, num_experts)
    start = 0
    for e in range(num_experts):
        rows = token_ids[start:start + int(counts[e])].tolist()
        start += int(counts[e])
        where_e = f"{where}, expert {e}"
        f_e = int(picked[:, e].sum())
        if int(counts[e]) != int(rounded[e]):
            raise CheckFailed(f"{name} ({where_e}): expected {int(rounded[e])} rows (its top-K count "
                              f"{f_e} rounded), got {int(counts[e])}")
        twice = sorted({t for t in rows if rows.count(t) > 1})
        check_true(f"{name} ({where_e})", not twice,
                   f"token {twice[0] if twice else ''} is selected twice for this expert: a (token, expert) "
                   f"pair is one row at most (rounding up adds tokens that are not already in top-K)")
        want = set(ranked[e, :int(rounded[e])].tolist())
        extra, missing = set(rows) - want, want - set(rows)
        if not extra:
            continue
        missing_topk = sorted(t for t in missing if bool(picked[t, e]))
        extra_others = sorted(u for u in extra if not bool(picked[u, e]))
        if missing_topk and extra_others:
            u, t = extra_others[0], missing_topk[0]
            raise CheckFailed(f"{name} ({where_e}): keeps token {u}, which did not pick this expert (score "
                              f"{float(scores[u, e]):g}), but drops token {t}, one of its top-K tokens (score "
                              f"{float(scores[t, e]):g}). Top-K tokens always come first: rank the others by "
                              f"score minus one.")
        u, t = min(extra), min(missing)  # now in the same group: both top-K, or both not
        su, st = float(scores[u, e]), float(scores[t, e])
        if su == st:
            raise CheckFailed(f"{name} ({where_e}): tokens {u} and {t} have the same score {su:g}; equal scores "
                              f"go to the lower token id ({t}), but {u} was kept (a stable sort keeps that order)")
        raise CheckFailed(f"{name} ({where_e}): keeps token {u} (score {su:g}) but drops token {t} (score "
                          f"{st:g}) of the same group: keep the highest scores, drop the lowest first")


def _selection_cases(seed: int):
    """Every case x rounding mode, with the top-K choice and the rounded counts of the reference."""
    for name, scores, k, tile in cases(seed):
        topk = tr.topk_experts(scores, k)
        for mode in tr.MODES:
            rounded = tr.round_counts(tr.expert_counts(topk, scores.shape[1]), tile, mode,
                                      num_tokens=scores.shape[0])
            where = f"{name}, T={scores.shape[0]}, E={scores.shape[1]}, k={k}, tile={tile}, {mode}, seed {seed}"
            yield scores, topk, rounded, k, tile, mode, where


def grade_select_tokens(select_tokens, seed: int | None = None) -> None:
    """``select_tokens(scores (T, E), topk (T, K), rounded (E,)) -> (token_ids, counts)``."""
    seed = fresh_seed(seed)
    with grading(f"{TITLE} · selecting each expert's tokens"):
        for scores, topk, rounded, _, _, _, where in _selection_cases(seed):
            result = select_tokens(scores.clone(), topk.clone(), rounded.clone())
            _check_selection("select_tokens", result, scores, topk, rounded, where)


def grade_token_rounding(token_rounding, seed: int | None = None) -> None:
    """``token_rounding(scores (T, E), k, tile, mode) -> (token_ids, counts)``."""
    seed = fresh_seed(seed)
    with grading(f"{TITLE} · token rounding, the whole step"):
        for scores, topk, rounded, k, tile, mode, where in _selection_cases(seed):
            _check_selection("token_rounding", token_rounding(scores.clone(), k, tile, mode), scores, topk,
                             rounded, where)
