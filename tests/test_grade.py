"""tools/grade.py (`make grade`): which cells are graded parts and under which heading, what a
cell's outputs say (PASS / not yet / FAILED / not checked), and a real run on scratch copies of
exercise 01: an unfilled one, and one with a right, an unfilled and a wrong part."""

import io
import subprocess
import sys

import nbformat
import pytest
from benchmark_scripts import load

from moe_course import ROOT

grade = load("grade", folder="tools")
make_exercises = load("make_exercises", folder="tools")
SOLUTION_01 = ROOT / "solutions" / "01_simple_moe.ipynb"


def notebook(*cells: tuple[str, str]):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
                for kind, src in cells]
    return nb


def test_graded_cells_are_the_cells_that_call_a_grader_titled_by_the_heading_above():
    nb = notebook(
        ("md", "# Exercise 09 · demo\n\nIntro."),
        ("code", "import torch\nfrom moe_course import moe\nfrom moe_course.graders import ex01_simple_moe as grader"),
        ("md", "## 1 · The router\n\nSpec: `router(x)`.\n\n### Notes\n\nNo heading below this line."),
        ("code", "def router(x):\n    return moe.topk_softmax(x, 2)"),
        ("code", "grader.grade_router(router)"),
        ("md", "Plain text, no heading."),
        ("code", "%matplotlib inline\ngrader.grade_assignment(assign)"),  # an IPython magic: not Python
        ("md", "## 2 · Broken by an edit"),
        ("code", "grader.grade_aggregation(aggregate"),  # a syntax error: still found
        ("md", "## 3 · Not graded"),
        ("code", "# grader.grade_router(router) in a comment\nprint(moe.topk_softmax)"),
    )
    assert grade.graded_cells(nb) == {4: "Notes", 6: "Notes", 8: "2 · Broken by an edit"}
    assert grade.notebook_title(nb, SOLUTION_01) == "Exercise 09 · demo"


@pytest.mark.parametrize("imports, call", [
    ("import moe_course.graders.ex03_naive_grouped_gemm as ex03", "ex03.grade(src)"),
    ("import moe_course.graders.ex03_naive_grouped_gemm", "moe_course.graders.ex03_naive_grouped_gemm.grade(src)"),
    ("from moe_course import graders", "graders.ex03_naive_grouped_gemm.grade(src)"),
    ("from moe_course.graders.ex01_simple_moe import grade_router", "grade_router(router)"),
])
def test_every_way_of_importing_a_grader_is_recognised(imports, call):
    nb = notebook(("code", imports), ("code", call), ("code", "import moe_course.moe\nmoe_course.moe.device()"))
    assert list(grade.graded_cells(nb)) == [1]


def test_a_notebook_without_graders_has_no_graded_parts():
    nb = notebook(("code", "from moe_course import moe, checking"), ("code", "checking.check_true('x', True, '')"))
    assert grade.graded_cells(nb) == {}


def stream(text):
    return {"output_type": "stream", "name": "stdout", "text": text}


def error(ename, evalue):
    return {"output_type": "error", "ename": ename, "evalue": evalue,
            "traceback": ["Traceback (most recent call last)", f"{ename}: {evalue}"]}


def test_judge_reads_the_cells_outputs():
    passed = grade.judge("1 · Router", [stream("compiled\nPASS  Exercise 01 · router\n")])
    assert (passed.status, passed.message) == (grade.PASS, "")
    unfilled = grade.judge("1 · Router", [error("CheckFailed", "Exercise 01 · router: not implemented yet (fill in)")])
    assert (unfilled.status, unfilled.message) == (grade.NOT_YET, "not implemented yet (fill in)")
    wrong = grade.judge("1 · Router", [error("CheckFailed", "Exercise 01 · router: FAILED\nweights: 3 of 8 differ\n"
                                                            "  at [0, 1]: expected 0.5, got 0.25")])
    assert (wrong.status, wrong.message, wrong.details) == (grade.FAILED, "weights: 3 of 8 differ",
                                                             ["  at [0, 1]: expected 0.5, got 0.25"])
    assert "Traceback" in wrong.traceback
    crashed = grade.judge("1 · Router", [stream("PASS  printed before the crash\n"),
                                         error("NameError", "name 'router' is not defined")])
    assert (crashed.status, crashed.message) == (grade.FAILED, "NameError: name 'router' is not defined")
    raw = grade.judge("1 · Router", [error("NotImplementedError", "fill in this cell")])
    assert raw.status == grade.NOT_YET
    quiet = grade.judge("Grade", [stream("compiled for sm_90a; running it needs a GPU\n")])
    assert (quiet.status, quiet.message) == (grade.NOT_CHECKED, "compiled for sm_90a; running it needs a GPU")
    died = grade.judge("Grade", [], failure="Kernel dead on test start")
    assert (died.status, died.message) == (grade.FAILED, "Kernel dead on test start")


def test_the_table_shows_tracebacks_only_when_asked():
    ex = grade.Exercise(ROOT / "exercises" / "09_demo.ipynb", "Exercise 09 · demo", {3: "1 · Router", 5: "2 · Mask"})
    ex.parts = {3: grade.judge("1 · Router", [stream("PASS  router\n")]),
                5: grade.judge("2 · Mask", [error("CheckFailed", "mask: FAILED\nmask: 2 of 4 differ\n  at [1]")])}
    ex.notes = [grade.judge("Setup", [error("SyntaxError", "invalid syntax (line 3)")])]
    quiet, loud = io.StringIO(), io.StringIO()
    grade.Grading(out=quiet).print(ex)
    grade.Grading(verbose=True, out=loud).print(ex)
    text = quiet.getvalue()
    assert "Exercise 09 · demo  (exercises/09_demo.ipynb)" in text
    assert [line.split() for line in text.splitlines()[2:4]] == [["1", "·", "Router", "PASS"],
                                                                  ["2", "·", "Mask", "FAILED", "mask:", "2", "of", "4", "differ"]]
    assert "at [1]" in text and "graded parts passed: 1 / 2" in text
    assert 'note: the cell under "Setup" (not graded) raised SyntaxError: invalid syntax (line 3)' in text
    assert "Traceback" not in text
    assert loud.getvalue().count("Traceback (most recent call last)") == 2  # the FAILED part and the note


def test_summary_and_exit_status():
    def exercise(*statuses):
        ex = grade.Exercise(ROOT / "ex.ipynb", "Ex", {i: f"part {i}" for i in range(len(statuses))})
        ex.parts = {i: grade.Part(f"part {i}", s) for i, s in enumerate(statuses)}
        return ex

    text, status = grade.summary([exercise(grade.NOT_YET, grade.NOT_YET), exercise(grade.PASS)])
    assert status == 0 and "Graded parts: 1 of 3 pass, 2 not yet." in text and "Nothing you attempted failed" in text
    text, status = grade.summary([exercise(grade.PASS, grade.FAILED)])
    assert status == 1 and "FAILED (exit status 1): Ex: part 1" in text
    assert grade.summary([exercise(grade.PASS)])[0].endswith("Every graded part passes (exit status 0).")
    broken = grade.Exercise(ROOT / "bad.ipynb", "bad", {}, error="not a notebook")
    assert grade.summary([exercise(grade.PASS), broken])[1] == 2


def test_exercises_are_chosen_by_number_name_or_path(tmp_path, monkeypatch):
    for name in ("01_simple_moe", "03_naive_grouped_gemm"):
        (tmp_path / f"{name}.ipynb").write_text("{}")
    monkeypatch.setattr(grade, "EXERCISES", tmp_path)
    assert [p.name for p in grade.select([])] == ["01_simple_moe.ipynb", "03_naive_grouped_gemm.ipynb"]
    assert [p.name for p in grade.select(["3"])] == ["03_naive_grouped_gemm.ipynb"]
    assert [p.name for p in grade.select(["03_naive", "01"])] == ["03_naive_grouped_gemm.ipynb", "01_simple_moe.ipynb"]
    assert grade.select([str(SOLUTION_01)]) == [SOLUTION_01]
    with pytest.raises(ValueError, match=r"no exercise matches '07' \(exercises/ has: 01_simple_moe, 03_naive"):
        grade.select(["07"])
    with pytest.raises(SystemExit) as exit:
        grade.main(["07"])
    assert exit.value.code == 2  # a wrong EX is no failed exercise


def _replace(nb, starts_with: str, source: str) -> None:
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith(starts_with)]
    cell.source = source


def test_grading_real_notebooks_end_to_end(tmp_path):
    """An unfilled exercise 01 (as generated) reports four parts not yet and fails nothing; a copy
    with the router right, the assignment unfilled and the aggregation wrong (weights forgotten)
    reports PASS / not yet / FAILED with the grader's message, and exits 1; no traceback."""
    unfilled = tmp_path / "01_simple_moe.ipynb"
    unfilled.write_text(make_exercises.exercise_from(SOLUTION_01))
    mixed = nbformat.read(SOLUTION_01, as_version=4)
    exercise = nbformat.reads(unfilled.read_text(), as_version=4)
    _replace(mixed, "def assign", next(c.source for c in exercise.cells if c.source.startswith("def assign")))
    _replace(mixed, "def aggregate", "def aggregate(y_sorted, order, weights):\n"
                                     "    y = torch.empty_like(y_sorted)\n    y[order] = y_sorted\n"
                                     "    return y.view(*weights.shape, -1).sum(dim=1)  # the weights forgotten")
    mixed.cells.append(nbformat.v4.new_code_cell("x = (1,"))  # not graded, broken: a note
    nbformat.write(mixed, tmp_path / "01_mixed.ipynb")

    done = subprocess.run([sys.executable, str(ROOT / "tools" / "grade.py"), str(unfilled), str(tmp_path / "01_mixed.ipynb")],
                          capture_output=True, text=True, timeout=600)
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    first, second = out.split("Exercise 01 · A simple MoE forward pass")[1:3]
    assert sum(" not yet " in line for line in first.splitlines()) == 4
    assert "graded parts passed: 0 / 4" in first
    headings = ["1 · The router", "2 · The expert assignment", "3 · The output aggregation", "4 · The whole layer"]
    rows = {h: next(line for line in second.splitlines() if line.startswith(f"  {h} ")) for h in headings}
    assert " PASS" in rows["1 · The router"]
    assert " not yet " in rows["2 · The expert assignment"] and " not yet " in rows["4 · The whole layer"]
    assert " FAILED " in rows["3 · The output aggregation"] and "differ" in rows["3 · The output aggregation"]
    assert "graded parts passed: 1 / 4" in second
    assert "raised SyntaxError" in second
    assert "Graded parts: 1 of 8 pass, 6 not yet, 1 FAILED." in out
    assert "FAILED (exit status 1): Exercise 01 · A simple MoE forward pass: 3 · The output aggregation" in out
    assert "Traceback" not in out and "Traceback" not in done.stderr


def test_a_notebook_that_cannot_be_read_is_reported_in_one_line_and_the_others_still_run(tmp_path):
    broken, unfilled = tmp_path / "01_broken.ipynb", tmp_path / "04_token_rounding.ipynb"
    broken.write_text('{"cells": [')  # a half-saved file
    unfilled.write_text(make_exercises.exercise_from(ROOT / "solutions" / unfilled.name))
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "grade.py"), str(broken), str(unfilled)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stdout + done.stderr
    (reason,) = [line for line in done.stdout.splitlines() if "could not be run:" in line]
    assert reason == "  could not be run: NotJSONError: Notebook does not appear to be JSON: '{\"cells\": ['"
    assert "graded parts passed: 0 / 3" in done.stdout  # exercise 04 ran all the same
    assert "Could not run (exit status 2): 01_broken.ipynb" in done.stdout
    assert "Traceback" not in done.stdout
