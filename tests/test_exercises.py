"""exercises/ is generated from solutions/, stays in step with it, and never loses a learner's work."""

import nbformat
import pytest
from benchmark_scripts import load
from gittools import git, needs_git

from moe_course import ROOT

make_exercises = load("make_exercises", folder="tools")


def test_exercises_are_exactly_what_solutions_generate():
    """The course's exercises, that is: one with changes git has not committed is the learner's
    work (`make test` checks the course, not the learner) and is left out. A clean clone (CI)
    has none, so there every exercise is compared."""
    yours = make_exercises.learners_work()
    if yours is None:
        pytest.skip("not a git clone: the course's exercises cannot be told from yours")
    assert make_exercises.stale(yours) == [], "run `make exercises` (and commit what it writes)"
    if yours:
        pytest.skip("the others are what solutions/ generates; not compared, as they hold your uncommitted "
                    "changes: " + ", ".join(str(p.relative_to(ROOT)) for p in sorted(yours)))


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
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # git looks no higher
    return tmp_path


def test_generate_then_check(course, capsys):
    assert make_exercises.stale() == ["exercises/01_demo.ipynb is missing", "exercises/.generated.json is out of date"]
    assert make_exercises.generate() == 0
    text = (course / "exercises" / "01_demo.ipynb").read_text()
    assert "return 42" not in text and "NotImplementedError" in text
    assert make_exercises.stale() == []
    capsys.readouterr()
    assert make_exercises.generate() == 0  # idempotent
    assert capsys.readouterr().out == "exercises/ is up to date with solutions/\n"


@needs_git
def test_the_check_leaves_out_the_learners_uncommitted_work_only(course, capsys):
    git(course, "init", "-q")
    make_exercises.generate()
    git(course, "add", "-A")
    git(course, "commit", "-qm", "course")
    path = course / "exercises" / "01_demo.ipynb"
    assert make_exercises.learners_work() == set() and make_exercises.check() == 0
    # The learner fills in the exercise and adds a notebook of their own: theirs, not compared.
    path.write_text(path.read_text().replace("raise NotImplementedError", "return 42  #"))
    (course / "exercises" / "my_notes.ipynb").write_text("{}")
    yours = make_exercises.learners_work()
    assert yours == {path, course / "exercises" / "my_notes.ipynb"}
    assert make_exercises.stale(yours) == [] and make_exercises.check() == 0
    assert "not compared: exercises/01_demo.ipynb has changes of yours" in capsys.readouterr().out
    # The same change committed is the course's: a hand-edited exercise, which the check catches.
    git(course, "add", "-A")
    git(course, "commit", "-qm", "edited by hand")
    assert make_exercises.learners_work() == set()
    assert make_exercises.stale() == ["exercises/01_demo.ipynb differs from what solutions/01_demo.ipynb generates",
                                      "exercises/my_notes.ipynb has no solution in solutions/"]
    assert make_exercises.check() == 1


def test_the_check_needs_git_to_tell_the_learners_work(course, capsys):
    make_exercises.generate()
    assert make_exercises.learners_work() is None  # the scratch course is no git clone
    assert make_exercises.check() == 0
    assert "not a git clone" in capsys.readouterr().out


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
    assert make_exercises.generate() == 0  # keeping the learner's work is no error
    assert path.read_text() == mine
    assert "kept: exercises/01_demo.ipynb has your changes" in capsys.readouterr().out


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
