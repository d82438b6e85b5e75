"""Exercises 03 and 06 (a grouped GEMM kernel in CUDA C): each grader passes its solution and
fails every plausible wrong kernel with a message that names the mistake, on the CPU (the
kernel run by moe_course.cuda_on_cpu) and on a GPU (32-bit index overflow, speed)."""

import json
import re

import pytest
import torch

from moe_course import ROOT, cuda_on_cpu
from moe_course import grouped_gemm as gg
from moe_course.checking import CheckFailed
from moe_course.graders import ex03_naive_grouped_gemm as ex03
from moe_course.graders import ex06_tiled_grouped_gemm as ex06
from moe_course.graders import kernel_exercise

needs_compiler = pytest.mark.skipif(cuda_on_cpu.compiler() is None, reason="no C++ compiler on this machine")

NAIVE = (ROOT / "kernels" / "02_2_naive_grouped.cu").read_text().replace("naive_grouped_gemm(", "my_grouped_gemm(")


def solution_kernel(notebook: str) -> str:
    """The kernel of a solution notebook, its solution markers removed."""
    cells = json.loads((ROOT / "solutions" / notebook).read_text())["cells"]
    code = next("".join(c["source"]) for c in cells if "MY_KERNEL = " in "".join(c["source"]))
    namespace: dict = {}
    exec(code, namespace)
    return re.sub(r"\n *// (BEGIN|END) SOLUTION", "", namespace["MY_KERNEL"])


TILED = solution_kernel("06_tiled_grouped_gemm.ipynb")
# The tiled kernel is a valid answer to exercise 03 too (same launch): its barrier mistakes are 03's.
TILED_AS_03 = TILED.replace("my_tiled_grouped_gemm(", "my_grouped_gemm(")


def mutate(source: str, pattern: str, replacement: str) -> str:
    out, n = re.subn(pattern, replacement, source)
    assert n, f"mutation {pattern!r} did not apply"
    return out


@needs_compiler
@pytest.mark.parametrize("grader,source", [(ex03, NAIVE), (ex03, TILED_AS_03), (ex06, TILED)],
                         ids=["03 naive", "03 tiled", "06 tiled"])
def test_solutions_pass(grader, source, capsys):
    grader.grade(source)
    out = capsys.readouterr().out
    assert "PASS" in out and "on the CPU (every thread, two orders, bounds checked)" in out


def test_unfilled_kernel_says_not_implemented():
    stub = NAIVE.split("{", 1)[0] + "{\n    // YOUR CODE HERE\n}\n"
    with pytest.raises(CheckFailed, match="not implemented yet"):
        ex03.grade(stub)


def test_compile_error_quotes_the_line():
    with pytest.raises(CheckFailed, match=r"line \d+.*undefined"):
        ex03.grade(mutate(NAIVE, r"acc \+= ", "acc += undefined_thing + "))


def test_wrong_kernel_name():
    with pytest.raises(CheckFailed, match="no __global__ function named my_grouped_gemm"):
        ex03.grade(NAIVE.replace("my_grouped_gemm(", "other_name("))


def test_including_the_course_kernel_is_refused():
    with pytest.raises(CheckFailed, match=r'#includes "02_2_naive_grouped.cu", a kernel of the course'):
        ex03.grade('#include "02_2_naive_grouped.cu"\n' + NAIVE)


NAIVE_MISTAKES = {  # name: (mutation, what the message must say)
    "empty body": ((r"(?s)(my_grouped_gemm\([^{]*\{).*\n\}", r"\1\n}"), "never written .* is the body empty"),
    "wrong weight offset": ((r"\(\(size_t\)expert \* N", "((size_t)0 * N"), "expert 0's weight: the weight offset"),
    "weight read as [K, N]": ((r"(?s)\(\(size_t\)expert \* N \+ col\) \* K;(.*)w\[k\]",
                               r"(size_t)expert * N * K + col;\1w[(size_t)k * N]"), r"read as \[K, N\]"),
    "X row taken inside the tile": ((r"X\[\(size_t\)row \* K", "X[(size_t)threadIdx.y * K"),
                         r"is X row \d+ times expert \d+'s weight: the row is wrong"),
    "missing row bound": ((r"row >= row_end \|\| ", ""), "past the end of X .* at cell.cu line"),
    "missing column bound": ((r" \|\| col >= N", ""), "past the end of W .* at cell.cu line"),
    "skipped partial tile": ((r"if \(row >= row_end", "if (row_end - row0 < 16 || row >= row_end"),
                             "never written: they are in partial tiles"),
    "sum stops short": ((r"k < K; \+\+k", "k < K - 1; ++k"), "values are wrong"),
}
TILED_MISTAKES = {
    "missing second __syncthreads()": ((r"(ws\[tx\]\[kk\];\n) +__syncthreads\(\);", r"\1"),
                                       "results differ between thread orders.*missing __syncthreads"),
    "missing first __syncthreads()": ((r"__syncthreads\(\);\n( +for \(int kk)", r"\n\1"),
                                      "results differ between thread orders"),
    "early return before a barrier": ((r"float acc = 0.0f;", "if (row >= row_end || col >= N) return;\n    float acc = 0.0f;"),
                                      r"barrier divergence: .* have returned"),
    "rows past the expert not zeroed": ((r"row < row_end && k < K \?", "k < K ?"), "past the end of X"),
    "K not bounded": ((r"(row < row_end|w_row < N) && k < K \?", r"\1 ?"), "past the end of"),
    "W tile transposed in shared memory": ((r"ws\[tx\]\[kk\]", "ws[kk][tx]"), "values are wrong"),
    "W tile loaded by column": ((r"w_row = blockIdx.x \* 16 \+ ty", "w_row = blockIdx.x * 16 + tx"), "values are wrong"),
}


@needs_compiler
@pytest.mark.parametrize("mistake", list(NAIVE_MISTAKES))
def test_wrong_naive_kernels_fail_with_a_targeted_message(mistake):
    (pattern, replacement), message = NAIVE_MISTAKES[mistake]
    for seed in (0, 1):
        with pytest.raises(CheckFailed, match=f"(?s){message}"):
            ex03.grade(mutate(NAIVE, pattern, replacement), seed=seed)


@needs_compiler
@pytest.mark.parametrize("grader,source", [(ex03, TILED_AS_03), (ex06, TILED)], ids=["03", "06"])
@pytest.mark.parametrize("mistake", list(TILED_MISTAKES))
def test_wrong_tiled_kernels_fail_with_a_targeted_message(grader, source, mistake):
    (pattern, replacement), message = TILED_MISTAKES[mistake]
    with pytest.raises(CheckFailed, match=f"(?s){message}"):
        grader.grade(mutate(source, pattern, replacement), seed=7)


def test_nothing_passes_where_nothing_can_run_it(monkeypatch):
    monkeypatch.setattr(cuda_on_cpu, "compiler", lambda: None)
    monkeypatch.setattr("moe_course.machine.has_gpu", lambda: False)
    with pytest.raises(CheckFailed, match="nothing here can run your kernel, so it is not checked"):
        ex03.grade(NAIVE)


INDEX_OVERFLOW = {
    "rows * K in int": (r"X\[\(size_t\)row \* K \+ k\]", "X[row * K + k]"),
    "(expert * N + col) * K in int": (r"\(\(size_t\)expert \* N \+ col\) \* K", "(expert * N + col) * K"),
}


@pytest.mark.gpu
@pytest.mark.parametrize("mistake", list(INDEX_OVERFLOW))
def test_32_bit_indices_fail_on_a_gpu(mistake):
    with pytest.raises(CheckFailed, match=r"2\*\*31|illegal memory access"):
        ex03.grade(mutate(NAIVE, *INDEX_OVERFLOW[mistake]))


@pytest.mark.gpu
def test_the_tiled_kernel_is_timed_against_the_naive_one(capsys):
    ex06.grade(TILED)
    assert re.search(r"your kernel [\d.]+ TFLOP/s, 02_2_naive_grouped [\d.]+ TFLOP/s: [\d.]+x", capsys.readouterr().out)


def test_rows_written_by_the_tile_before_are_a_missing_row_bound():
    """On a GPU the tile that runs past its expert's last row races with the next expert's tile
    (the CPU run stops at the out-of-bounds read first): the rows it won hold X times the previous
    expert's weight, which is a missing row bound, not a wrong weight offset."""
    p = gg.make_problem([0, 1, 17, 0, 40], 16, 16, device="cpu", seed=0)
    y = gg.reference(p.x, p.w, p.offs)
    y[1:16] = p.x[1:16].float() @ p.w[1].float().T  # expert 1's tile (rows 0-15) past its one row
    with pytest.raises(CheckFailed, match=r"(?s)expert 1's weight, and it lies in expert 1's last tile .*"
                                          r"keep the threads whose row < row_end"):
        kernel_exercise.check_result(y.to(torch.bfloat16), p, "the case")
