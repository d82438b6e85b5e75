"""tools/update.py (`make update`) on scratch clones: a course upstream (a local bare repository),
a learner's clone that ran notebook 00 and edited notebook 01 and exercise 01, and a new version
of the course that changes all three. A plain `git pull` refuses there; the update takes the new
00, keeps the learner's 01 with the new one beside it, and never touches the exercise."""

import nbformat
import pytest
from benchmark_scripts import load
from gittools import git, needs_git

from moe_course import ROOT

update = load("update", folder="tools")
make_exercises = load("make_exercises", folder="tools")
pytestmark = needs_git

NB00, NB01, EX01, KERNEL = ("notebooks/00_setup.ipynb", "notebooks/01_moe_basics.ipynb",
                            "exercises/01_simple_moe.ipynb", "kernels/00_scale.cu")


def edit(path, change) -> None:
    nb = nbformat.read(path, as_version=4)
    change(nb)
    nbformat.write(nb, path)


def first_code(nb):
    return next(c for c in nb.cells if c.cell_type == "code")


def run_all(nb) -> None:
    """What running a notebook and saving it leaves: outputs and execution counts."""
    for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        cell.execution_count = i + 1
        cell.outputs = [nbformat.v4.new_output("stream", text=f"ran cell {i}\n")]


@pytest.fixture
def course(tmp_path, monkeypatch):
    """``(upstream work tree, learner's clone)``; the upstream is pushed to ``course.git``."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # git looks no higher
    up, bare, learner = tmp_path / "upstream", tmp_path / "course.git", tmp_path / "learner"
    for rel in (NB00, NB01, KERNEL):
        (up / rel).parent.mkdir(parents=True, exist_ok=True)
        (up / rel).write_bytes((ROOT / rel).read_bytes())
    (up / "exercises").mkdir()
    (up / EX01).write_text(make_exercises.exercise_from(ROOT / "solutions" / "01_simple_moe.ipynb"))
    (up / "README.md").write_text("# The course\n")
    git(tmp_path, "init", "-q", str(up))
    git(up, "add", "-A")
    git(up, "commit", "-qm", "the course")
    git(tmp_path, "clone", "-q", "--bare", str(up), str(bare))
    git(up, "remote", "add", "origin", str(bare))
    git(tmp_path, "clone", "-q", str(bare), str(learner))
    return up, learner


def publish(up, message: str = "new version") -> str:
    git(up, "add", "-A")
    git(up, "commit", "-qm", message)
    git(up, "push", "-q", "origin", "HEAD:main")
    return git(up, "rev-parse", "HEAD").stdout.strip()


def reword_first_cell(nb) -> None:
    nb.cells[0].source += "\n\nAdded in the new version."


def head(repo) -> str:
    return git(repo, "rev-parse", "HEAD").stdout.strip()


def test_update_takes_the_new_version_and_keeps_the_learners_work(course):
    up, learner = course
    # The learner runs 00, edits a code cell of 01 (and runs it), fills in the exercise.
    edit(learner / NB00, run_all)
    edit(learner / NB01, lambda nb: (setattr(first_code(nb), "source", first_code(nb).source + "\n# my note"),
                                     run_all(nb)))
    edit(learner / EX01, lambda nb: setattr(nb.cells[3], "source", "def router(x, w, k):\n    return 'mine'"))
    mine01, mine_ex = (learner / NB01).read_bytes(), (learner / EX01).read_bytes()
    # The course changes all three (and the README).
    for rel in (NB00, NB01, EX01):
        edit(up / rel, reword_first_cell)
    (up / "README.md").write_text("# The course, new version\n")
    new = publish(up)

    pulled = git(learner, "pull", "--ff-only", check=False)  # the problem this solves
    assert pulled.returncode != 0 and "would be overwritten" in pulled.stderr

    said = []
    plan = update.update(learner, say=said.append)
    assert head(learner) == new
    for rel in (NB00, "README.md"):  # only run, or untouched: now exactly the new version
        assert (learner / rel).read_bytes() == (up / rel).read_bytes(), rel
    assert (learner / NB01).read_bytes() == mine01
    beside = learner / "notebooks" / f"01_moe_basics.course-{new[:7]}.ipynb"
    assert beside.read_bytes() == (up / NB01).read_bytes()
    assert (learner / EX01).read_bytes() == mine_ex
    assert plan.reset == [NB00] and plan.keep_beside == [NB01] and plan.keep == [EX01] and plan.blocked == []
    status = git(learner, "status", "--porcelain").stdout.splitlines()
    assert sorted(status) == sorted([f" M {EX01}", f" M {NB01}", f"?? {beside.relative_to(learner)}"])
    text = "\n".join(said)
    assert f"{NB00}: you had only run it" in text
    assert f"{NB01}: has your edits, kept as it is; the course's new version is beside it: " \
           f"{beside.relative_to(learner)}" in text
    assert f"{EX01}: your exercise, kept as it is" in text

    said.clear()
    assert update.update(learner, say=said.append) is None  # a second run has nothing to do
    assert said == [f"Already up to date ({new[:7]})."] and (learner / NB01).read_bytes() == mine01


def test_files_the_course_did_not_change_keep_the_learners_changes(course):
    up, learner = course
    edit(learner / NB01, run_all)
    edit(learner / EX01, run_all)
    (up / "README.md").write_text("# The course, new version\n")
    (up / "café notes.md").write_text("a name git would quote\n")
    new = publish(up)
    plan = update.update(learner, say=lambda _: None)
    assert head(learner) == new and sorted(plan.take) == ["README.md", "café notes.md"]
    assert (learner / "café notes.md").read_text() == "a name git would quote\n"
    assert "ran cell 0" in (learner / NB01).read_text() and "ran cell 0" in (learner / EX01).read_text()


def test_a_file_changed_on_both_sides_that_is_no_notebook_refuses_and_changes_nothing(course):
    up, learner = course
    (learner / KERNEL).write_text("// my experiment\n")
    (up / KERNEL).write_text("// the course's new kernel\n")
    edit(up / NB00, reword_first_cell)
    old = head(learner)
    publish(up)
    with pytest.raises(update.Refused, match=r"changes files that you changed too:\n  kernels/00_scale.cu"):
        update.update(learner, say=lambda _: None)
    assert head(learner) == old and (learner / KERNEL).read_text() == "// my experiment\n"
    assert (learner / NB00).read_bytes() == (ROOT / NB00).read_bytes()  # not taken either


def test_a_learners_new_notebook_where_the_course_adds_one_is_kept(course):
    up, learner = course
    new_nb = "notebooks/07_extra.ipynb"
    (learner / new_nb).write_text((ROOT / NB00).read_text().replace("setup", "my own"))
    mine = (learner / new_nb).read_bytes()
    (up / new_nb).write_bytes((ROOT / NB01).read_bytes())
    new = publish(up)
    plan = update.update(learner, say=lambda _: None)
    assert plan.keep_beside == [new_nb] and (learner / new_nb).read_bytes() == mine
    assert (learner / f"notebooks/07_extra.course-{new[:7]}.ipynb").read_bytes() == (ROOT / NB01).read_bytes()


def test_commits_of_the_learners_own_or_staged_changes_are_refused(course):
    up, learner = course
    (learner / "README.md").write_text("my readme\n")
    git(learner, "add", "README.md")
    with pytest.raises(update.Refused, match="staged"):
        update.update(learner, say=lambda _: None)
    git(learner, "commit", "-qm", "mine")
    edit(up / NB00, reword_first_cell)
    publish(up)
    mine = head(learner)
    with pytest.raises(update.Refused, match="1 commit"):
        update.update(learner, say=lambda _: None)
    assert head(learner) == mine


def test_the_command_line_says_why_it_refused(course, tmp_path, capsys):
    assert update.main(["--repo", str(tmp_path)]) == 1  # tmp_path holds clones, is none
    assert "nothing was changed" in capsys.readouterr().err
    assert update.main(["--repo", str(course[1])]) == 0
    assert "Already up to date" in capsys.readouterr().out


def test_only_run_means_the_same_cells_and_an_unreadable_notebook_counts_as_edited():
    course = (ROOT / NB00).read_bytes()
    nb = nbformat.reads(course.decode(), as_version=4)
    run_all(nb)
    nb.metadata["widgets"] = {"state": {}}
    assert update.same_cells(nbformat.writes(nb).encode(), course)
    first_code(nb).source += "\n# mine"
    assert not update.same_cells(nbformat.writes(nb).encode(), course)
    assert not update.same_cells(b'{"cells": [', course)  # half-saved: kept, never reset
