"""What every grader test does: a right answer passes on several seeds (and a fresh random one),
a wrong one FAILS on every seed with the message that names its mistake (a grader that lets a
wrong answer through by luck is a broken grader)."""

import contextlib
import io

import pytest

from moe_course.checking import CheckFailed

SEEDS = (0, 1, 2)


def _grade(grade, fn, seed):
    return grade(fn) if seed is None else grade(fn, seed=seed)


def must_pass(grade, fn, seeds=SEEDS + (None,)):  # None: a fresh random seed (or no seed argument)
    for seed in seeds:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            _grade(grade, fn, seed)
        assert out.getvalue().splitlines()[-1].startswith("PASS"), out.getvalue()


def must_fail(grade, fn, match: str, seeds=SEEDS):
    for seed in seeds:
        with pytest.raises(CheckFailed, match=match):
            _grade(grade, fn, seed)


def unfilled(*args):
    raise NotImplementedError("fill in this cell (test)")
