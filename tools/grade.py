#!/usr/bin/env python3
"""``make grade``: run your exercise notebooks and say, part by part, what passes.

    make grade              every notebook in exercises/
    make grade EX=03        one exercise (the number, a name's start, or a notebook's path)
    make grade VERBOSE=1    with the traceback of every failure

A *graded part* is a code cell that calls a grader from ``moe_course.graders`` (for example
``grader.grade_router(router)``); its title is the nearest markdown heading above it. Each part
is one of:

- ``PASS``         the grader checked your code and printed its PASS line;
- ``not yet``      the cell marked YOUR CODE HERE is still to be written;
- ``FAILED``       your code ran and the grader found it wrong (its message says where), or the
                   cell raised an error;
- ``not checked``  the grader ran without error but did not say PASS (e.g. it needs a GPU).

The notebooks are run as saved on disk (save them in JupyterLab first) and are never written.
The exit status is 1 only when a part you attempted FAILED, 2 when a notebook could not be run
at all, else 0: parts not yet written are not failures.

The engine is nbval, the pytest plugin that runs the course's notebooks in ``make test``, so
a cell runs here exactly as it does there (same kernel, folder and time limit). A small plugin
(:class:`Grading`) reads each cell's outputs off nbval's test item: the kernel's own error name
and message, not a parsed traceback, and pytest's report is switched off.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXERCISES = ROOT / "exercises"
GRADERS = "moe_course.graders"
#: As ``make test`` runs notebooks (its NBVAL flags): errors only, no output comparison.
NBVAL_ARGS = ["--nbval-lax", "--nbval-current-env", "--nbval-cell-timeout=900"]

PASS, NOT_YET, FAILED, NOT_CHECKED = "PASS", "not yet", "FAILED", "not checked"
HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$")
IPYTHON_LINE = re.compile(r"^\s*[%!]")  # line magics and shell escapes: not Python to ast


# ----------------------------------------------------------------------------------------------
# Which cells are graded, and under which heading


def _parse(source: str) -> ast.Module | None:
    try:
        return ast.parse("\n".join("" if IPYTHON_LINE.match(line) else line for line in source.splitlines()))
    except SyntaxError:
        return None


def grader_names(cells) -> set[str]:
    """The (dotted) names a notebook binds to graders: ``grader`` for ``from moe_course.graders
    import ex01_simple_moe as grader``, ``moe_course.graders.ex01_simple_moe`` for a plain
    ``import``, ``graders`` for ``from moe_course import graders``, a grading function imported
    by its name."""
    package, module = GRADERS.rsplit(".", 1)
    names = set()
    for cell in cells:
        tree = _parse(cell.source) if cell.cell_type == "code" else None
        for node in ast.walk(tree) if tree else ():
            if isinstance(node, ast.Import):
                names |= {a.asname or a.name for a in node.names
                          if a.name == GRADERS or a.name.startswith(GRADERS + ".")}
            elif isinstance(node, ast.ImportFrom) and node.module == package:
                names |= {a.asname or a.name for a in node.names if a.name == module}
            elif isinstance(node, ast.ImportFrom) and node.module and (node.module + ".").startswith(GRADERS + "."):
                names |= {a.asname or a.name for a in node.names}
    return names


def _dotted(node: ast.expr) -> str | None:
    """``a.b.c`` for the expression ``a.b.c``; None for anything else (a call, a subscript)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (base := _dotted(node.value)):
        return f"{base}.{node.attr}"
    return None


def _calls_one_of(source: str, names: set[str]) -> bool:
    tree = _parse(source)
    if tree is None:  # a cell broken by an edit: fall back to its text
        return any(re.search(rf"(?<![\w.]){re.escape(n)}\b[\w.]*\s*\(", source) for n in names)
    called = {_dotted(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    return any(c == n or c.startswith(n + ".") for c in called if c for n in names)


def heading_above(cells, index: int) -> str | None:
    """The last heading line of the nearest markdown cell above ``cells[index]`` that has one."""
    for cell in reversed(cells[:index]):
        if cell.cell_type == "markdown":
            found = [m[1] for line in cell.source.splitlines() if (m := HEADING.match(line))]
            if found:
                return found[-1]
    return None


def graded_cells(nb) -> dict[int, str]:
    """``{cell index: title}`` of every graded part of a notebook, in order."""
    names = grader_names(nb.cells)
    return {i: heading_above(nb.cells, i) or f"cell {i + 1}" for i, cell in enumerate(nb.cells)
            if cell.cell_type == "code" and names and _calls_one_of(cell.source, names)}


def notebook_title(nb, path: Path) -> str:
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if m := HEADING.match(line):
                    return m[1]
    return path.stem


# ----------------------------------------------------------------------------------------------
# What a cell's outputs say


@dataclass
class Part:
    title: str
    status: str
    message: str = ""
    details: list[str] = field(default_factory=list)  # the rest of a grader's message
    traceback: str = ""


def _printed(outputs) -> list[str]:
    return [line for o in outputs if o.get("output_type") == "stream"
            for line in "".join(o.get("text", "")).splitlines()]


def judge(title: str, outputs, failure: str = "") -> Part:
    """A graded cell's result, from the outputs it left (``failure``: what nbval said when the
    cell failed without an error output, e.g. a kernel that died)."""
    error = next((o for o in outputs if o.get("output_type") == "error"), None)
    if error is None and failure:
        return Part(title, FAILED, failure.strip().splitlines()[0])
    if error is None:
        printed = [line for line in _printed(outputs) if line.strip()]
        if any(line.startswith("PASS") for line in printed):
            return Part(title, PASS)
        return Part(title, NOT_CHECKED, printed[-1].strip() if printed else "the grader printed no PASS line")
    ename, lines = error.get("ename", "Error"), str(error.get("evalue", "")).splitlines() or [""]
    traceback = "\n".join(error.get("traceback", []))
    if ename == "CheckFailed":
        if "not implemented yet" in lines[0]:  # "<part>: not implemented yet (hint)"
            return Part(title, NOT_YET, lines[0][lines[0].index("not implemented yet"):], lines[1:], traceback)
        if lines[0].endswith(": FAILED") and len(lines) > 1:  # checking.grading's "<part>: FAILED"
            lines = lines[1:]
        return Part(title, FAILED, lines[0], lines[1:], traceback)
    if ename == "NotImplementedError":
        return Part(title, NOT_YET, f"{ename}: {lines[0]}", lines[1:], traceback)
    if ename == "KeyboardInterrupt" and failure:  # nbval interrupts a cell past its time limit
        return Part(title, FAILED, failure.strip().splitlines()[0], [], traceback)
    return Part(title, FAILED, f"{ename}: {lines[0]}", lines[1:], traceback)


# ----------------------------------------------------------------------------------------------
# Running the notebooks (nbval) and printing one table per exercise


@dataclass
class Exercise:
    path: Path
    title: str
    graded: dict[int, str]
    parts: dict[int, Part] = field(default_factory=dict)
    notes: list[Part] = field(default_factory=list)  # errors of cells that are not graded
    error: str = ""  # why the notebook could not be run, in one line
    error_traceback: str = ""

    def count(self, status: str) -> int:
        return sum(p.status == status for p in self.parts.values())


class Grading:
    """The pytest plugin: one :class:`Exercise` per notebook, printed when its last cell is done."""

    def __init__(self, verbose: bool = False, out=sys.stdout):
        self.verbose, self.out = verbose, out
        self.exercises: dict[Path, Exercise] = {}

    @staticmethod
    @pytest.hookimpl(trylast=True)  # after pytest has registered its reporter
    def pytest_configure(config):
        """No pytest report: these tables are the report (nbval still runs every cell)."""
        config.pluginmanager.unregister(name="terminalreporter")

    def _exercise(self, item) -> Exercise:
        notebook = item.parent  # nbval's IPyNbFile: its .nb is the notebook it read
        path = Path(str(notebook.fspath))
        if path not in self.exercises:
            self.exercises[path] = Exercise(path, notebook_title(notebook.nb, path), graded_cells(notebook.nb))
        return self.exercises[path]

    def pytest_runtest_makereport(self, item, call):
        exercise = self._exercise(item)
        if call.when == "setup" and call.excinfo is not None and not exercise.error:  # e.g. no kernel started
            exercise.error = f"{call.excinfo.typename}: {str(call.excinfo.value).strip().splitlines()[0]}"
            exercise.error_traceback = str(call.excinfo.getrepr())
        if call.when != "call":
            return
        index = next(i for i, c in enumerate(item.parent.nb.cells) if c is item.cell)
        outputs = getattr(item, "test_outputs", None) or []
        failure = str(call.excinfo.value) if call.excinfo is not None else ""
        if index in exercise.graded:
            exercise.parts[index] = judge(exercise.graded[index], outputs, failure)
        elif call.excinfo is not None:
            part = judge(heading_above(item.parent.nb.cells, index) or f"cell {index + 1}", outputs, failure)
            if part.status == FAILED:  # an unfilled function called by a demo cell is no news
                exercise.notes.append(part)

    def pytest_runtest_teardown(self, item, nextitem):
        if nextitem is None or nextitem.parent is not item.parent:
            self.print(self._exercise(item))

    def print(self, ex: Exercise) -> None:
        def say(text: str = "") -> None:
            print(text, file=self.out, flush=True)

        try:
            where = ex.path.relative_to(ROOT)
        except ValueError:
            where = ex.path
        say(f"{ex.title}  ({where})")
        if ex.error:
            say(f"  could not be run: {ex.error}")
            if self.verbose:
                say(ex.error_traceback)
            say()
            return
        width = max([len(p.title) for p in ex.parts.values()] + [len("part")])
        say(f"  {'part':<{width}}  {'result':<11}  message")
        for part in ex.parts.values():
            say(f"  {part.title:<{width}}  {part.status:<11}  {part.message}".rstrip())
            for line in part.details:
                say(f"  {'':<{width}}  {'':<11}    {line}")
            if self.verbose and part.status == FAILED and part.traceback:
                say(part.traceback)
        for note in ex.notes:
            say(f"  note: the cell under \"{note.title}\" (not graded) raised {note.message}")
            if self.verbose and note.traceback:
                say(note.traceback)
        missing = len(ex.graded) - len(ex.parts)
        say(f"  graded parts passed: {ex.count(PASS)} / {len(ex.graded)}"
            + (f" ({missing} did not run)" if missing else ""))
        say()


def select(selectors: list[str]) -> list[Path]:
    """Notebooks to grade: all of exercises/, or those named by number ('03' or '3'), by the
    start of their name ('03_naive') or by path."""
    available = sorted(EXERCISES.glob("*.ipynb"))
    if not selectors:
        return available
    chosen = []
    for s in selectors:
        if s.endswith(".ipynb") and Path(s).is_file():
            chosen.append(Path(s).resolve())
            continue
        prefix = Path(s).name.removesuffix(".ipynb")
        prefix = prefix.zfill(2) if prefix.isdigit() else prefix
        found = [p for p in available if p.name.startswith(prefix)]
        if not found:
            names = ", ".join(p.stem for p in available) or "none"
            raise ValueError(f"no exercise matches {s!r} (exercises/ has: {names})")
        chosen += found
    return list(dict.fromkeys(chosen))


def summary(exercises: list[Exercise]) -> tuple[str, int]:
    """The closing lines, and the exit status: 1 if a part FAILED, 2 if a notebook did not run."""
    parts = [(ex, p) for ex in exercises for p in ex.parts.values()]
    total = sum(len(ex.graded) for ex in exercises)
    counts = {s: sum(p.status == s for _, p in parts) for s in (PASS, NOT_YET, FAILED, NOT_CHECKED)}
    lines = [f"Graded parts: {counts[PASS]} of {total} pass"
             + "".join(f", {counts[s]} {s}" for s in (NOT_YET, FAILED, NOT_CHECKED) if counts[s]) + "."]
    broken = [ex for ex in exercises if ex.error]
    failed = [f"{ex.title}: {p.title}" for ex, p in parts if p.status == FAILED]
    if failed:
        lines += ["FAILED (exit status 1): " + "; ".join(failed)]
    if broken:
        lines += ["Could not run (exit status 2): " + ", ".join(ex.path.name for ex in broken)]
    if not failed and not broken:
        lines += [("Nothing you attempted failed" if counts[PASS] < total else "Every graded part passes")
                  + (f"; {counts[NOT_YET]} not yet written (the cells marked YOUR CODE HERE)" if counts[NOT_YET] else "")
                  + " (exit status 0)."]
    return "\n".join(lines), 2 if broken else 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("exercises", nargs="*", metavar="EX",
                    help="which exercises: '03', '03_naive_grouped_gemm' or a notebook's path (default: all)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print the traceback of every failure")
    args = ap.parse_args(argv)
    try:
        notebooks = select(args.exercises)
    except ValueError as why:
        ap.error(f"argument EX: {why}")  # exit status 2
    if not notebooks:
        ap.error(f"no notebooks in {EXERCISES} (make exercises makes them)")

    print(f"Grading {len(notebooks)} notebook(s) as saved on disk; each runs top to bottom in a fresh kernel.\n",
          flush=True)
    plugin = Grading(verbose=args.verbose)
    unreadable = {}
    for path in notebooks:
        try:
            nbformat.read(path, as_version=4)
        except Exception as why:  # not JSON, not a notebook: a half-saved file, say
            unreadable[path] = Exercise(path, path.stem, {}, error=f"{type(why).__name__}: {str(why).splitlines()[0]}")
            plugin.print(unreadable[path])
    runnable = [p for p in notebooks if p not in unreadable]
    if runnable:
        pytest.main([*NBVAL_ARGS, "-p", "no:cacheprovider", "--capture=no", "--continue-on-collection-errors",
                     "--rootdir", str(ROOT), *map(str, runnable)], plugins=[plugin])
    exercises = [unreadable.get(p) or plugin.exercises.get(p.resolve())
                 or Exercise(p, p.stem, {}, error="nbval ran none of its cells") for p in notebooks]
    text, status = summary(exercises)
    print(text)
    return status


if __name__ == "__main__":
    sys.exit(main())
