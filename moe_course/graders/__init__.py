"""Graders for the exercises in ``exercises/``: one module per exercise notebook.

Each ``grade_*`` function takes the learner's function, runs it on fresh random inputs at
several shapes (always including ``k = 1`` and an expert that receives no tokens), and checks
the answer against :mod:`moe_course.moe` with :mod:`moe_course.checking`. A pass prints one
line; a failure raises :class:`~moe_course.checking.CheckFailed` saying which case, what was
expected and what came back; an unfilled cell says "not implemented yet".

The inputs are random on every call (a solution cannot be fitted to them); the seed is part of
every failure message, and ``seed=...`` replays a failing case.

Every grader calls the learner's function through :func:`as_graded`, which

- refuses an answer that calls the course's own answer (the function the grader compares
  against, or one built on it), however it was reached: ``moe.topk_softmax(...)``,
  ``from moe_course.moe import topk_softmax``, or from inside a helper the learner wrote;
- fills the memory of every ``torch.empty`` (``empty_like``, ``new_empty``, ``empty_strided``)
  with garbage (NaN for floats), so a result left partly unwritten fails on any machine, not
  only where the allocator happens to hand back dirty memory.
"""

from __future__ import annotations

import functools
import inspect
import secrets
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch.overrides import TorchFunctionMode

from ..checking import CheckFailed, check_close
from ..moe import device as _device

_PACKAGE_DIR = str(Path(__file__).resolve().parent.parent)


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


def router_inputs(case: Case, gen: torch.Generator, dtype=torch.float32):
    """Tokens ``x (T, d)`` and router weights ``(d, E)``: the first feature of every token is a
    constant 1, through which ``case.empty`` gets a logit about -100, so that expert never makes
    anyone's top k. The other logits are of order one, so no weight is close to 0 or 1 (a
    missing renormalisation shows)."""
    x = torch.randn(case.T, case.d, generator=gen, device=gen.device, dtype=dtype)
    x[:, 0] = 1.0
    w_router = torch.randn(case.d, case.E, generator=gen, device=gen.device, dtype=dtype) / case.d**0.5
    if case.empty is not None:
        w_router[0, case.empty] = -100.0
    return x, w_router


def as_outputs(name: str, result, count: int, where: str) -> tuple:
    """The learner's function must return ``count`` things; say so plainly if it did not."""
    if result is None:
        raise CheckFailed(f"{name} ({where}): got None (did the function forget to return its result?)")
    if count == 1:
        return (result,)
    if not isinstance(result, (tuple, list)) or len(result) != count:
        what = f"a tuple of {len(result)}" if isinstance(result, (tuple, list)) else type(result).__name__
        raise CheckFailed(f"{name} ({where}): expected {'a pair (two values)' if count == 2 else f'{count} values'}, "
                          f"got {what}")
    return tuple(result)


def check_close_or_explain(name: str, got, want, mistakes: dict[str, Callable[[], object]], *,
                           rtol: float, atol: float) -> None:
    """:func:`check_close`; on a failure, name the first of ``mistakes`` (why -> a function
    giving what that mistake returns) that ``got`` equals, so the message says what went wrong."""
    try:
        check_close(name, got, want, rtol=rtol, atol=atol)
    except CheckFailed as exc:
        for why, wrong in mistakes.items():
            try:
                check_close(name, got, wrong(), rtol=rtol, atol=atol)
            except CheckFailed:
                continue
            raise CheckFailed(f"{exc}\n  it is what you get if {why}") from None
        raise


# --------------------------------------------------------------------------------------------
# Calling the learner's function: no shortcut through the course's own answer, no luck with
# uninitialised memory


def _qualified_name(code, module: str) -> str:
    return f"{module}.{getattr(code, 'co_qualname', code.co_name)}"  # co_qualname: Python 3.11+


def _code_of(fn) -> object:
    fn = inspect.unwrap(getattr(fn, "__func__", fn))  # bound methods, functools.wraps
    return fn.__code__


def _in_course(code) -> bool:
    return code.co_filename.startswith(_PACKAGE_DIR)


class _ShortcutWatch:
    """A profile hook (:func:`sys.setprofile`: it sees every Python call, however the callee was
    named) that notes the first call of a reference while the learner's function runs."""

    def __init__(self, references: dict[int, str], previous):
        self.references, self.previous = references, previous  # id(code) -> name: cheap to look up
        self.found: str | None = None

    def __call__(self, frame, event, arg):
        if event == "call" and self.found is None and id(frame.f_code) in self.references:
            self.found = self._describe(frame)
        if self.previous is not None:  # a debugger or profiler that was there first keeps working
            self.previous(frame, event, arg)

    def _describe(self, frame) -> str:
        """Which reference, and the learner's line that led to it (through course code, if any)."""
        reference = self.references[id(frame.f_code)]
        entry, caller = frame, frame.f_back
        while caller is not None and _in_course(caller.f_code) and caller.f_code is not _CALL_CODE:
            entry, caller = caller, caller.f_back
        via = "" if entry is frame else (
            f" (through {_qualified_name(entry.f_code, entry.f_globals.get('__name__', '?'))}, which uses it)")
        if caller is None or caller.f_code is _CALL_CODE:
            return f"the function given is the course's own {reference}{via}"
        return f"{caller.f_code.co_name}, line {caller.f_lineno}, calls the course's own {reference}{via}"


class _GarbageEmpty(TorchFunctionMode):
    """``torch.empty`` and friends hand back memory filled with garbage: NaN for floating
    point, the most negative value for signed integers (an index or a size that fails loudly),
    the largest for unsigned ones, True for bool. Real left-over memory holds anything, often
    zeros on a CPU, which would let an unwritten result pass by luck."""

    FACTORIES = frozenset({torch.empty, torch.empty_like, torch.empty_strided, torch.Tensor.new_empty})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.FACTORIES and isinstance(out, torch.Tensor):
            out.fill_(_garbage(out.dtype))
        return out


def _garbage(dtype: torch.dtype):
    if dtype.is_floating_point or dtype.is_complex:
        return float("nan")
    if dtype == torch.bool:
        return True
    info = torch.iinfo(dtype)
    return info.min if info.min < 0 else info.max


def as_graded(fn: Callable, references) -> Callable:
    """``fn`` as a grader calls it. A call of any of ``references`` (functions: the course's
    answers) while ``fn`` runs fails the grade with a message naming it and the learner's line
    that called it; the check runs after ``fn`` returns (or raises), so a ``try``/``except`` in
    the learner's code cannot hide it. Every ``torch.empty`` inside ``fn`` comes back filled
    with garbage (:class:`_GarbageEmpty`)."""
    codes = {id(_code_of(r)): _qualified_name(_code_of(r), r.__module__) for r in references}

    @functools.wraps(fn)
    def call(*args, **kwargs):
        watch = _ShortcutWatch(codes, sys.getprofile())
        sys.setprofile(watch)
        try:
            with _GarbageEmpty():
                result = _call(fn, args, kwargs)
        except Exception:
            if watch.found is None:
                raise
        finally:
            sys.setprofile(watch.previous)
        if watch.found is not None:  # also when fn raised afterwards: the shortcut is the news
            raise CheckFailed(f"{watch.found}: the grader compares your answer with that function, so "
                              f"calling it proves nothing. Write this part yourself (torch operations "
                              f"are fine).")
        return result

    return call


def _call(fn, args, kwargs):
    """The one frame between the grader and the learner's function (the watch stops there)."""
    return fn(*args, **kwargs)


_CALL_CODE = _call.__code__

__all__ = ["Case", "CASES", "fresh_seed", "generator", "random_experts", "router_inputs", "as_outputs",
           "check_close_or_explain", "as_graded"]
