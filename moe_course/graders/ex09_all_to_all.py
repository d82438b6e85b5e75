"""Grader of exercise 09, expert parallelism's exchange by hand (chapter 08, in torch, one process
standing in for every rank).

The learner writes (as :mod:`moe_course.expert_parallel` does with ``torch.distributed``):

- ``send_counts(expert_ids (R,) int64, experts_per_rank, world) -> (world,) int64``: how many of a
  rank's rows go to each rank, rank ``r`` holding experts ``r * experts_per_rank ..``;
- ``all_to_all(sent, counts) -> received``: ``sent[i]`` is rank ``i``'s rows, grouped by the rank
  they go to (``counts[i, j]`` rows for rank ``j``, in rank order); ``received[j]`` is what rank
  ``j`` gets: rank 0's block for it, then rank 1's, and so on (what ``all_to_all_single`` does);
- ``send_back(received, counts) -> returned``: each row back to the rank it came from, in the
  order it left (the combine, and the backward of the dispatch: the same exchange, the counts
  transposed).

The rows are numbered (each row holds its source rank and its place there), so a row that went
to the wrong rank, or in the wrong order, is named. Cases: one rank, two, four and five ranks,
a rank that sends nothing, a rank that receives nothing, a rank that keeps every row, counts
that are not symmetric (a mistake that swaps sender and receiver shows).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .. import expert_parallel as ep
from ..checking import CheckFailed, grading
from . import as_graded, as_outputs, fresh_seed

TITLE = "Exercise 09"

#: The course's answers: a learner's function that calls one is refused.
REFERENCES = (ep.send_counts, ep.owner, ep.exchange_counts, ep.traffic)


# --------------------------------------------------------------------------------------------
# 1. send_counts


def count_cases(seed: int) -> list[tuple[str, Tensor, int, int]]:
    """(name, expert_ids sorted, experts_per_rank, world)."""
    g = torch.Generator().manual_seed(seed)

    def ids(n, high, low=0):
        return torch.randint(low, high, (n,), generator=g).sort().values

    return [
        ("4 ranks of 2 experts", ids(30, 8), 2, 4),
        ("the last two ranks get nothing", ids(17, 6), 3, 4),  # experts 0..5 of 12
        ("the first rank gets nothing", ids(12, 9, low=3), 3, 3),
        ("one rank", ids(9, 5), 5, 1),
        ("5 ranks of 4 experts", ids(41, 20), 4, 5),
        ("no rows at all", ids(0, 8), 2, 4),
    ]


#: What the usual mistakes return: ``{why: function (expert_ids, experts_per_rank, world) -> counts}``
COUNT_MISTAKES: dict[str, Callable[[Tensor, int, int], Tensor]] = {
    "each rank holds every world-th expert (expert % world): the experts are dealt in blocks, rank r holds "
    "r * experts_per_rank .. (r + 1) * experts_per_rank - 1, so the owner is expert // experts_per_rank":
        lambda e, per, w: torch.bincount(e % w, minlength=w),
    "the counts are per expert, not per rank: add up each rank's experts (or count expert // experts_per_rank)":
        lambda e, per, w: torch.bincount(e, minlength=per * w),
}


def grade_send_counts(send_counts, seed: int | None = None) -> None:
    """``send_counts(expert_ids, experts_per_rank, world) -> (world,) int64``."""
    seed = fresh_seed(seed)
    send_counts = as_graded(send_counts, REFERENCES)
    with grading(f"{TITLE} · send_counts"):
        for name, expert_ids, per, world in count_cases(seed):
            where = f"{name}, seed {seed}"
            (got,) = as_outputs("send_counts", send_counts(expert_ids.clone(), per, world), 1, where)
            want = torch.bincount(expert_ids // per, minlength=world)
            _check_counts(got, want, where, expert_ids, per, world)


def _check_counts(got, want: Tensor, where: str, expert_ids, per, world) -> None:
    if not isinstance(got, Tensor):
        raise CheckFailed(f"send_counts ({where}): expected a torch tensor of {world} counts, got {type(got).__name__}")
    if got.dtype.is_floating_point:
        raise CheckFailed(f"send_counts ({where}): expected integer counts (int64), got {got.dtype}: "
                          f"all_to_all_single takes whole numbers of rows")
    if tuple(got.shape) != (world,):
        hint = ""
        if got.dim() == 1 and got.numel() < world:
            hint = ("\n  it is what torch.bincount gives without minlength=world: the ranks past the last one that "
                    "gets a row must still be counted, with 0")
        for why, mistake in COUNT_MISTAKES.items():
            wrong = mistake(expert_ids, per, world)
            if wrong.shape == got.shape and torch.equal(got.long(), wrong):
                hint = f"\n  it is what you get if {why}"
        raise CheckFailed(f"send_counts ({where}): expected shape ({world},), one count per rank, got "
                          f"{tuple(got.shape)}{hint}")
    if not torch.equal(got.long(), want):
        message = f"send_counts ({where}): expected {want.tolist()}, got {got.tolist()}"
        for why, mistake in COUNT_MISTAKES.items():
            if torch.equal(got.long(), mistake(expert_ids, per, world)):
                raise CheckFailed(f"{message}\n  it is what you get if {why}")
        raise CheckFailed(message)


# --------------------------------------------------------------------------------------------
# 2-3. The exchange and the way back


def exchange_cases(seed: int) -> list[tuple[str, Tensor]]:
    """(name, counts (world, world)): ``counts[i, j]`` rows rank i sends rank j."""
    g = torch.Generator().manual_seed(seed)

    def random_counts(world, high=5):
        return torch.randint(0, high, (world, world), generator=g)

    not_symmetric = random_counts(4)
    not_symmetric[0, 3], not_symmetric[3, 0] = 6, 1  # so that sender and receiver cannot be swapped unseen
    sends_nothing = random_counts(4, 6)
    sends_nothing[2] = 0
    receives_nothing = random_counts(4, 6)
    receives_nothing[:, 1] = 0
    keeps_all = torch.zeros(3, 3, dtype=torch.long)
    keeps_all[0, 0], keeps_all[1, 0], keeps_all[2, 2] = 5, 3, 4
    ring = torch.roll(torch.eye(3, dtype=torch.long), 1, dims=1) * 4  # each rank sends all to the next
    ring[0, 0] = 2
    ring[1, 1] = 2
    ring[2, 2] = 2
    return [
        ("3 ranks in a ring (each sends 4 rows to the next, keeps 2)", ring),
        ("4 ranks, counts not symmetric", not_symmetric),
        ("one rank", torch.tensor([[7]])),
        ("2 ranks", random_counts(2, 6) + 1),
        ("rank 2 sends nothing", sends_nothing),
        ("rank 1 receives nothing", receives_nothing),
        ("rank 0 receives from itself and rank 1; rank 2 keeps its rows", keeps_all),
        ("5 ranks", random_counts(5)),
    ]


def numbered_rows(counts: Tensor, width: int = 3) -> list[Tensor]:
    """Each rank's rows, grouped by destination: row ``r`` of rank ``i`` is ``[i, r, j]`` (its
    source, its place there, its destination) and more copies, so any misplaced row says which."""
    world = counts.shape[0]
    out = []
    for i in range(world):
        dest = torch.arange(world).repeat_interleave(counts[i])
        rows = torch.stack([torch.full_like(dest, i), torch.arange(dest.numel()), dest], dim=1).float()
        out.append(rows.repeat(1, width))
    return out


def exchanged(rows_per_rank: list[Tensor], split_by: Tensor, reverse: bool = False) -> list[Tensor] | None:
    """Rank ``i``'s rows split into blocks of ``split_by[i]``; rank ``j`` gets every rank's block
    ``j``, in source order (``reverse``: the other way round). The right exchange with the counts
    themselves; with other counts, one of the usual mistakes, or None where they do not add up
    to the rows (that mistake raises instead)."""
    try:
        blocks = [rows.split(split_by[i].tolist()) for i, rows in enumerate(rows_per_rank)]
    except RuntimeError:
        return None
    sources = list(range(len(blocks)))[::-1 if reverse else 1]
    return [torch.cat([blocks[i][j] for i in sources]) for j in range(len(blocks))]


#: What the usual mistakes return: ``{why: function (sent, counts) -> received}``
EXCHANGE_MISTAKES: dict[str, Callable[[list[Tensor], Tensor], list[Tensor]]] = {
    "the counts are read transposed: counts[i, j] is what rank i SENDS rank j, so rank i's rows split at "
    "counts[i] (its row), and rank j receives counts[:, j] (a column)":
        lambda s, c: exchanged(s, c.T),
    "the blocks a rank receives are in reverse order: rank j gets rank 0's block first, then rank 1's, ...":
        lambda s, c: exchanged(s, c, reverse=True),
    "every rank kept its own rows: nothing was exchanged":
        lambda s, c: [rows.clone() for rows in s],
    "each block is sliced from the start of the rank's rows (rows[:counts[i, j]]): rank i's block for rank j "
    "starts after its blocks for ranks 0 .. j-1, at counts[i, :j].sum()":
        lambda s, c: [torch.cat([rows[:int(c[i, j])] for i, rows in enumerate(s)]) for j in range(c.shape[0])],
}


def _describe_row(row: Tensor) -> str:
    source, place, dest = (int(v) for v in row[:3].tolist())
    return f"rank {source}'s row {place} (for rank {dest})"


def _check_received(name: str, got, want: list[Tensor], where: str, mistakes: dict, args) -> None:
    world = len(want)
    if not isinstance(got, (list, tuple)) or len(got) != world:
        what = f"{len(got)} tensors" if isinstance(got, (list, tuple)) else type(got).__name__
        raise CheckFailed(f"{name} ({where}): expected a list of {world} tensors, one per rank, got {what}")
    for j, (g_j, w_j) in enumerate(zip(got, want, strict=True)):
        if not isinstance(g_j, Tensor):
            raise CheckFailed(f"{name} ({where}): rank {j}: expected a tensor, got {type(g_j).__name__}")
        ok = tuple(g_j.shape) == tuple(w_j.shape) and torch.equal(g_j.float(), w_j)
        if ok:
            continue
        if tuple(g_j.shape) != tuple(w_j.shape):
            message = (f"{name} ({where}): rank {j} should have {w_j.shape[0]} rows of width {w_j.shape[1]}, "
                       f"got shape {tuple(g_j.shape)}")
        else:
            r = int((g_j.float() != w_j).any(dim=1).nonzero()[0])
            message = (f"{name} ({where}): rank {j}, row {r}: expected {_describe_row(w_j[r])}, "
                       f"got {_describe_row(g_j[r].float())}")
        for why, mistake in mistakes.items():
            wrong = mistake(*args)
            if wrong is not None and all(tuple(a.shape) == tuple(b.shape) and torch.equal(a.float(), b)
                                         for a, b in zip(got, wrong, strict=True)):
                raise CheckFailed(f"{message}\n  it is what you get if {why}")
        raise CheckFailed(message)


def _call(fn, name: str, where: str, rows: list[Tensor], counts: Tensor):
    """The learner's exchange; rows split by sizes that do not add up get a message, not a traceback."""
    try:
        return fn(rows, counts)
    except RuntimeError as exc:
        if "split" not in str(exc):
            raise
        raise CheckFailed(f"{name} ({where}): {str(exc).splitlines()[0]}\n  a rank's rows split by what it sends: on "
                          f"the way there rank i's by counts[i] (a row of counts); on the way back rank j sends what it "
                          f"received, counts[:, j] (a column): the counts transposed") from None


def _grade_exchange(fn, name: str, seed: int | None, given_and_wanted, mistakes: dict) -> None:
    """Grade ``fn(rows_per_rank, counts)`` on every case: ``given_and_wanted(sent, counts)`` gives
    what it is handed and what it must return."""
    seed = fresh_seed(seed)
    fn = as_graded(fn, REFERENCES)
    with grading(f"{TITLE} · {name}"):
        for case, counts in exchange_cases(seed):
            given, want = given_and_wanted(numbered_rows(counts), counts)
            where = f"{case}, seed {seed}"
            (got,) = as_outputs(name, _call(fn, name, where, [r.clone() for r in given], counts.clone()), 1, where)
            _check_received(name, got, want, where, mistakes, (given, counts))


def grade_all_to_all(all_to_all, seed: int | None = None) -> None:
    """``all_to_all(sent: list of (rows_i, width), counts (world, world)) -> list of (received_j, width)``."""
    _grade_exchange(all_to_all, "all_to_all", seed, lambda sent, counts: (sent, exchanged(sent, counts)),
                    EXCHANGE_MISTAKES)


#: What the usual mistakes of the way back return: ``{why: function (received, counts) -> returned}``
BACK_MISTAKES: dict[str, Callable[[list[Tensor], Tensor], list[Tensor]]] = {
    "the way back uses the counts of the way there: rank j now sends counts[:, j] rows (what it received) and "
    "rank i gets counts[i, :] back: the same exchange with the counts transposed, all_to_all(received, counts.T)":
        lambda r, c: exchanged(r, c),
    "nothing was sent back: each rank kept the rows it had received":
        lambda r, c: [rows.clone() for rows in r],
}


def grade_send_back(send_back, seed: int | None = None) -> None:
    """``send_back(received, counts) -> returned``: every row back where it came from, in order."""
    _grade_exchange(send_back, "send_back", seed, lambda sent, counts: (exchanged(sent, counts), sent), BACK_MISTAKES)
