"""What the course commits stays clean: source notebooks carry no outputs, and quick or scratch
benchmark runs record outside benchmarks/results/ (the committed measurements)."""

import json

import nbformat
import pytest
from benchmark_scripts import load
from gittools import git, needs_git

from moe_course import RESULTS_DIR, ROOT

#: The one folder whose committed notebooks carry outputs: the rendered course's executed copies.
EXECUTED_COPIES = load("book", folder="tools").EXECUTED_DIR.relative_to(ROOT).as_posix() + "/"


def must_be_output_free(path: str) -> bool:
    return path.endswith(".ipynb") and not path.startswith(EXECUTED_COPIES)


def leftovers(nb) -> list[str]:
    """What a run leaves in a notebook: outputs, execution counts, saved widget state."""
    found = [f"cell {i + 1} has {what}" for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
             for what, there in (("outputs", cell.outputs), ("an execution count", cell.execution_count)) if there]
    return found + (["saved widget state (metadata.widgets)"] if "widgets" in nb.metadata else [])


def test_leftovers_are_found():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# A"), nbformat.v4.new_code_cell("print(1)")]
    assert leftovers(nb) == []
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", text="1\n")]
    nb.cells[1].execution_count = 3
    nb.metadata["widgets"] = {}
    assert leftovers(nb) == ["cell 2 has outputs", "cell 2 has an execution count",
                             "saved widget state (metadata.widgets)"]


def test_only_the_executed_copies_are_exempt():
    assert EXECUTED_COPIES == "book/executed/"
    assert not must_be_output_free("book/executed/00_setup.ipynb")
    for path in ("notebooks/00_setup.ipynb", "solutions/01_simple_moe.ipynb", "book/00_setup.ipynb",
                 "book/executed-old/00_setup.ipynb", "tests/browser/scratch/x.ipynb", "00_setup.ipynb"):
        assert must_be_output_free(path), path


@needs_git
def test_committed_source_notebooks_carry_no_outputs():
    """What git will commit (the index), not the working copies: a learner's run notebooks are
    theirs. Outputs in a committed notebook would show as changes on every run and block
    `git pull`; the rendered course's executed copies (book/executed/) are where they belong."""
    listed = git(ROOT, "ls-files", "-z", check=False)
    if listed.returncode != 0:
        pytest.skip("not a git clone")
    paths = [p for p in listed.stdout.split("\0") if must_be_output_free(p)]
    assert len(paths) >= 10, paths  # the chapters, solutions and exercises are all there
    dirty = {p: found for p in paths if (found := leftovers(nbformat.reads(git(ROOT, "show", f":{p}").stdout, 4)))}
    assert dirty == {}


def _results():
    return {p.name: p.stat().st_mtime_ns for p in RESULTS_DIR.iterdir()}


def test_quick_moe_variants_run_records_in_scratch(tmp_path, monkeypatch):
    bmv = load("bench_moe_variants")
    monkeypatch.setattr(bmv, "SCRATCH_DIR", tmp_path)
    before = _results()
    assert bmv.main(["--quick", "--variants", "layer-loop", "--no-plot"]) == 0
    (path,) = tmp_path.glob(f"{bmv.QUICK_KIND}__*.json")
    assert json.loads(path.read_text())["data"]["quick"] is True
    assert _results() == before


def test_a_smaller_quality_run_records_in_scratch(tmp_path, monkeypatch):
    script = load("token_rounding_quality")
    monkeypatch.setattr(script, "SCRATCH_DIR", tmp_path)
    before = _results()
    assert script.main(["--seeds", "1", "--steps", "3", "--methods", "nearest"]) == 0
    (path,) = tmp_path.glob(f"{script.KIND}__*.json")
    assert json.loads(path.read_text())["data"]["setup"]["steps"] == 3
    assert _results() == before
