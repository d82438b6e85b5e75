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
(its rounded count capped at T), strong tokens that did not pick an expert against weak ones
that did, and a random router. Scores are multiples of 1/64 in [0, 1], so "score minus one" is
exact in float32 and a tie is a true tie. Counts and token ids must be int64, as the spec says.
"""

from __future__ import annotations

import torch

from .. import token_rounding as tr
from ..checking import CheckFailed, check_shape, check_true, grading
from . import as_graded, as_outputs, fresh_seed

TITLE = "Exercise 04"

#: The course's answers to this exercise: a learner's function that calls one (or
#: ``tr.topk_routing``, ``tr.route`` ..., which rank with ``rank_candidates``) is refused.
REFERENCES = (tr.round_counts, tr.rank_candidates, tr.token_rounding, tr.route_cuda)

#: (tile, num_tokens, counts): zero, exact multiples, one above and below, exact halves (even
#: and odd multiples), odd tiles, a tile of one, and counts capped at the number of tokens. Each
#: row is one call (a count per expert), in every mode.
ROUND_CASES = ((128, 1000, (0, 128, 129, 127, 64, 63, 192, 320)), (3, 100, (5, 4, 6, 0)), (1, 100, (7, 0)),
               (64, 100, (90, 100, 96, 32)), (64, 40, (33, 31)))


def _explain_round(f: int, tile: int, mode: str, cap: int, want: int) -> str:
    why = {"nearest": "the nearest multiple; an exact half goes up", "up": "the multiple at or above",
           "down": "the multiple at or below"}[mode]
    capped = f" (then capped at num_tokens={cap})" if want == cap and want % tile else ""
    return f"round_counts(f={f}, tile={tile}, {mode!r}, num_tokens={cap}): expected {want}, {why}{capped}"


def _check_int64(name: str, got, what: str) -> torch.Tensor:
    """A torch tensor of int64, as the spec says: a float count cannot size or index a tensor."""
    check_true(name, isinstance(got, torch.Tensor), f"expected a torch tensor of {what}, got {type(got).__name__}")
    if got.dtype != torch.int64:
        hint = (" (a division `/` gives floats even where the result is whole: use integer arithmetic, `//`, "
                "or convert with .long())") if got.is_floating_point() else ""
        raise CheckFailed(f"{name}: expected {what} as int64, as the spec says; got {got.dtype}{hint}")
    return got.cpu()


def grade_round_counts(round_counts, seed: int | None = None) -> None:
    """``round_counts(counts (E,) int64, tile, mode, num_tokens) -> (E,) int64``."""
    seed = fresh_seed(seed)
    g = torch.Generator().manual_seed(seed)
    tile = int(torch.randint(2, 130, (1,), generator=g))
    drawn = (tile, 4 * tile, tuple(torch.randint(0, 5 * tile, (16,), generator=g).tolist()))  # capped at 4 tiles
    round_counts = as_graded(round_counts, REFERENCES)
    with grading(f"{TITLE} · rounding the counts"):
        for tile, cap, fs in ROUND_CASES + (drawn,):
            for mode in tr.MODES:
                counts = torch.tensor(fs, dtype=torch.long)  # one count per expert
                want = tr.round_counts(counts, tile, mode, num_tokens=cap)
                name = f"round_counts(counts={list(fs)}, tile={tile}, {mode!r}, num_tokens={cap})"
                (got,) = as_outputs("round_counts", round_counts(counts.clone(), tile, mode, cap), 1, name)
                got = _check_int64(name, got, "counts (whole rows)")
                check_shape(name, got, want.shape)
                bad = (got != want).nonzero().flatten()
                if bad.numel():
                    e = int(bad[0])
                    raise CheckFailed(_explain_round(fs[e], tile, mode, cap, int(want[e])) +
                                      f"; got {int(got[e])} (expert {e} of {name}, seed {seed})")


def strong_meets_weak(seed: int, k: int, tile: int = 8) -> torch.Tensor:
    """Scores ``(T, k + 3)`` where a strong token that did not pick an expert meets weak ones
    that did. Each of the experts ``k, k+1, k+2`` gets between one and two tiles of top-K tokens,
    every one weak: it picked the expert with a score of 1/64 (its other scores are 0). At least
    a tile of the other tokens are strong there: they score 1 for it and picked experts
    ``0 .. k-1`` instead (a tie at 1, lost to the lower expert id); the rest score 56/64 to 1.
    Ranking by score alone, or with a penalty below 63/64 (the widest gap scores in [0, 1] on a
    1/64 grid allow) for not being top-K, puts a strong token ahead of a weak top-K one, and it
    shows in every rounding mode."""
    g = torch.Generator().manual_seed(seed)
    targets = 3
    f = torch.randint(tile, 2 * tile, (targets,), generator=g)  # < 2 tiles: any two can hold the third (k = 2)
    if int(f.sum()) % k:
        f[0] += k - int(f.sum()) % k
    num_weak, num_strong = int(f.sum()) // k, tile + int(torch.randint(0, tile + 1, (1,), generator=g))
    weak = torch.zeros(num_weak, k + targets)
    weak[:, k:] = (tr.scores_with_counts(f.tolist(), num_weak, k, seed=seed, ties=True) == 0.75) / 64
    strong = torch.ones(num_strong, k + targets)
    strong[tile:, k:] = torch.randint(56, 65, (num_strong - tile, targets), generator=g) / 64
    scores = torch.cat([weak, strong])
    return scores[torch.randperm(scores.shape[0], generator=g)]


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
        ("a strong non-top-K token meets weak top-K ones", strong_meets_weak(seed + 5, k=1), 1, 8),
        ("a strong non-top-K token meets weak top-K ones", strong_meets_weak(seed + 6, k=2), 2, 8),
        ("a random router", rand, 2, 8),
    ]


def _check_selection(name: str, result, scores: torch.Tensor, topk: torch.Tensor, rounded: torch.Tensor,
                     where: str) -> None:
    """The learner's (token_ids, counts) against the reference ranking, explained."""
    num_tokens, num_experts = scores.shape
    token_ids, counts = as_outputs(name, result, 2, where)
    counts = _check_int64(f"counts ({where})", counts, "row counts")
    check_shape(f"counts ({where})", counts, (num_experts,))
    token_ids = _check_int64(f"token_ids ({where})", token_ids, "token ids").reshape(-1)
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
            u, t = max(extra_others, key=lambda u: float(scores[u, e])), missing_topk[0]
            su, st = float(scores[u, e]), float(scores[t, e])
            why = (f"A score of {su:g} without top-K must still rank below {st:g} with it: a penalty (or a top-K "
                   f"bonus) of less than one, or none, is too small for scores in [0, 1]; subtract one from "
                   f"the scores of the tokens that did not pick the expert"
                   if su > st else "Top-K tokens always come first: rank the others by score minus one")
            raise CheckFailed(f"{name} ({where_e}): keeps token {u}, which did not pick this expert (score "
                              f"{su:g}), but drops token {t}, one of its top-K tokens (score {st:g}). {why}.")
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
    select_tokens = as_graded(select_tokens, REFERENCES)
    with grading(f"{TITLE} · selecting each expert's tokens"):
        for scores, topk, rounded, _, _, _, where in _selection_cases(seed):
            result = select_tokens(scores.clone(), topk.clone(), rounded.clone())
            _check_selection("select_tokens", result, scores, topk, rounded, where)


def grade_token_rounding(token_rounding, seed: int | None = None) -> None:
    """``token_rounding(scores (T, E), k, tile, mode) -> (token_ids, counts)``."""
    seed = fresh_seed(seed)
    token_rounding = as_graded(token_rounding, REFERENCES)
    with grading(f"{TITLE} · token rounding, the whole step"):
        for scores, topk, rounded, k, tile, mode, where in _selection_cases(seed):
            _check_selection("token_rounding", token_rounding(scores.clone(), k, tile, mode), scores, topk,
                             rounded, where)
