"""Exercise 03's grader passes the solution and fails wrong kernels (on a GPU) and unfilled,
broken or misnamed ones (anywhere)."""

import re

import pytest

from moe_course import ROOT
from moe_course.checking import CheckFailed
from moe_course.graders import ex03_naive_grouped_gemm as ex03

SOLUTION = (ROOT / "kernels" / "02_2_naive_grouped.cu").read_text().replace(
    "naive_grouped_gemm(", "my_grouped_gemm(")


def mutate(pattern: str, replacement: str) -> str:
    src, n = re.subn(pattern, replacement, SOLUTION)
    assert n, f"mutation {pattern!r} did not apply"
    return src


def test_solution_passes(capsys):
    ex03.grade(SOLUTION)
    assert "PASS" in capsys.readouterr().out


def test_unfilled_kernel_says_not_implemented():
    stub = SOLUTION.split("{", 1)[0] + "{\n    // YOUR CODE HERE\n}\n"
    with pytest.raises(CheckFailed, match="not implemented yet"):
        ex03.grade(stub)


def test_compile_error_quotes_the_line():
    with pytest.raises(CheckFailed, match=r"line \d+.*undefined"):
        ex03.grade(mutate(r"acc \+= ", "acc += undefined_thing + "))


def test_wrong_kernel_name():
    with pytest.raises(CheckFailed, match="no __global__ function named my_grouped_gemm"):
        ex03.grade(SOLUTION.replace("my_grouped_gemm(", "other_name("))


WRONG = {
    "skips the last row of each tile": (r"if \(row >= row_end", "if (threadIdx.y == 15 || row >= row_end"),
    "uses expert 0's weight for everyone": (r"\(\(size_t\)expert \* N", "((size_t)0 * N"),
    "drops the last column block": (r"col >= N\)", "col >= N - 16)"),
}


@pytest.mark.gpu
@pytest.mark.parametrize("mistake", list(WRONG))
def test_wrong_kernels_fail(mistake):
    with pytest.raises(CheckFailed, match="values differ"):
        ex03.grade(mutate(*WRONG[mistake]))
