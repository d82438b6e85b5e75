"""Graders for the exercises in ``exercises/``: one module per exercise notebook.

Each ``grade_*`` function takes the learner's function, runs it on fresh random inputs at
several shapes (always including ``k = 1`` and an expert that receives no tokens), and checks
the answer against :mod:`moe_course.moe` with :mod:`moe_course.checking`. A pass prints one
line; a failure raises :class:`~moe_course.checking.CheckFailed` saying which case, what was
expected and what came back; an unfilled cell says "not implemented yet".

The inputs are random on every call (a solution cannot be fitted to them); the seed is part of
every failure message, and ``seed=...`` replays a failing case.
"""

from __future__ import annotations

import secrets
from typing import NamedTuple

import torch

from ..checking import CheckFailed
from ..moe import device as _device


class Case(NamedTuple):
    """One set of sizes to grade at: ``T`` tokens, width ``d``, ``E`` experts, ``K`` per token,
    and the expert that must receive no tokens (``None``: no such constraint)."""
    T: int
    d: int
    E: int
    K: int
    empty: int | None = None

    def __str__(self) -> str:
        empty = "" if self.empty is None else f", expert {self.empty} gets no tokens"
        return f"T={self.T}, d={self.d}, E={self.E}, k={self.K}{empty}"


#: The sizes every token-choice grader runs: small, k = 1, empty experts at both ends and inside.
CASES = (
    Case(T=16, d=8, E=4, K=2),
    Case(T=33, d=16, E=8, K=1, empty=3),
    Case(T=64, d=32, E=8, K=2, empty=0),
    Case(T=50, d=24, E=6, K=3, empty=5),
    Case(T=128, d=16, E=16, K=4),
)


def fresh_seed(seed: int | None = None) -> int:
    return secrets.randbelow(2**31) if seed is None else int(seed)


def generator(seed: int, device: str | None = None) -> torch.Generator:
    return torch.Generator(device=device or _device()).manual_seed(seed)


def random_experts(case: Case, gen: torch.Generator, *, skew: float = 0.0) -> torch.Tensor:
    """``(T, K)`` int64 expert ids, distinct within each row, never ``case.empty``. With
    ``skew > 0`` the low-numbered experts are picked more often (so capacities overflow)."""
    pool = case.E - (case.empty is not None)
    scores = torch.rand(case.T, pool, generator=gen, device=gen.device).log()
    scores = scores - skew * torch.log1p(torch.arange(pool, device=gen.device, dtype=scores.dtype))
    ids = scores.topk(case.K, dim=-1).indices  # the K best of random scores: K distinct experts
    if case.empty is not None:  # make room for the empty expert: shift ids at or above it
        ids = ids + (ids >= case.empty).long()
    return ids


def as_tensor_pair(name: str, result, where: str) -> tuple:
    """The learner's function must return two things; say so plainly if it did not."""
    if result is None:
        raise CheckFailed(f"{name} ({where}): got None (did the function forget to return its result?)")
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise CheckFailed(f"{name} ({where}): expected a pair (two values), got {type(result).__name__}")
    return tuple(result)


__all__ = ["Case", "CASES", "fresh_seed", "generator", "random_experts", "as_tensor_pair"]
