"""exercises/ is generated from solutions/, stays in step with it, and never loses a learner's work."""

import importlib.util

import nbformat
import pytest

from moe_course import ROOT

spec = importlib.util.spec_from_file_location("make_exercises", ROOT / "tools" / "make_exercises.py")
make_exercises = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_exercises)


def test_exercises_are_exactly_what_solutions_generate(capsys):
    assert make_exercises.check() == 0, capsys.readouterr().out


def test_strip_solution_keeps_indentation_and_the_rest():
    src = "def f(x):\n    y = 1\n    # BEGIN SOLUTION\n    return x + y\n    # END SOLUTION\n\nprint('kept')"
    out = make_exercises.strip_solution(src, "f")
    assert out == "def f(x):\n    y = 1\n    # YOUR CODE HERE\n    raise NotImplementedError('f')\n\nprint('kept')"
    cuda = 'src = r"""\n__global__ void k() {\n    // BEGIN SOLUTION\n    y[0] = 1;\n    // END SOLUTION\n}\n"""'
    assert make_exercises.strip_solution(cuda, "k") == 'src = r"""\n__global__ void k() {\n    // YOUR CODE HERE\n}\n"""'
    with pytest.raises(ValueError, match="without END"):
        make_exercises.strip_solution("# BEGIN SOLUTION\nx = 1", "f")


@pytest.fixture
def course(tmp_path, monkeypatch):
    """A scratch course with one solution notebook, so the real exercises/ is never touched."""
    sol, ex = tmp_path / "solutions", tmp_path / "exercises"
    sol.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Exercise"),
                nbformat.v4.new_code_cell("def f():\n    # BEGIN SOLUTION\n    return 42\n    # END SOLUTION")]
    nbformat.write(nb, sol / "01_demo.ipynb")
    monkeypatch.setattr(make_exercises, "ROOT", tmp_path)
    monkeypatch.setattr(make_exercises, "SOLUTIONS", sol)
    monkeypatch.setattr(make_exercises, "EXERCISES", ex)
    monkeypatch.setattr(make_exercises, "MANIFEST", ex / ".generated.json")
    return tmp_path


def test_generate_then_check(course):
    assert make_exercises.check() == 1  # nothing generated yet
    assert make_exercises.generate() == 0
    text = (course / "exercises" / "01_demo.ipynb").read_text()
    assert "return 42" not in text and "NotImplementedError" in text
    assert make_exercises.check() == 0
    assert make_exercises.generate() == 0  # idempotent


def test_a_learners_changes_are_never_overwritten(course, capsys):
    make_exercises.generate()
    path = course / "exercises" / "01_demo.ipynb"
    nb = nbformat.read(path, as_version=4)
    nb.cells[1].source = "def f():\n    return 41  # my attempt"
    nbformat.write(nb, path)
    mine = path.read_text()
    # the solution changes, so regenerating would rewrite the exercise
    sol = course / "solutions" / "01_demo.ipynb"
    snb = nbformat.read(sol, as_version=4)
    snb.cells[0].source = "# Exercise, reworded"
    nbformat.write(snb, sol)
    assert make_exercises.generate() == 1
    assert path.read_text() == mine
    assert "NOT overwritten: exercises/01_demo.ipynb has your changes" in capsys.readouterr().out


def test_a_notebook_only_run_and_saved_is_regenerated(course):
    make_exercises.generate()
    path = course / "exercises" / "01_demo.ipynb"
    nb = nbformat.read(path, as_version=4)
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", text="ran")]
    nb.cells[1].execution_count = 1
    nbformat.write(nb, path)
    sol = course / "solutions" / "01_demo.ipynb"
    snb = nbformat.read(sol, as_version=4)
    snb.cells[0].source = "# Exercise, reworded"
    nbformat.write(snb, sol)
    assert make_exercises.generate() == 0
    assert "reworded" in path.read_text()


def test_real_exercises_hold_no_solution():
    for path in (ROOT / "exercises").glob("*.ipynb"):
        assert "BEGIN SOLUTION" not in path.read_text(), path.name
