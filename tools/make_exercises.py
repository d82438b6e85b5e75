#!/usr/bin/env python3
"""Generate ``exercises/`` from ``solutions/``: the only way exercises are made.

In a solution notebook, the code a learner must write sits between two marker lines::

    def router(x, w, k):
        # BEGIN SOLUTION
        ...the answer...
        # END SOLUTION

The exercise keeps everything else and puts, at the same indentation::

        # YOUR CODE HERE
        raise NotImplementedError("router")

In CUDA C held in a Python string, the markers are ``// BEGIN SOLUTION`` and ``// END SOLUTION``
and the exercise keeps an empty body with ``// YOUR CODE HERE``. Outputs are dropped.
``exercises/.generated.json`` remembers what was generated, so a notebook the learner has changed
(any code or text cell) is never overwritten: it is kept, said so, and that is no error.
``--check`` says whether ``exercises/`` is exactly what this script would write, leaving out the
exercises that hold the learner's work (changes git has not committed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS, EXERCISES = ROOT / "solutions", ROOT / "exercises"
MANIFEST = EXERCISES / ".generated.json"
BEGIN = re.compile(r"^(\s*)(#|//) BEGIN SOLUTION\s*$")  # '//' inside CUDA C held in a string
END = re.compile(r"^\s*(#|//) END SOLUTION\s*$")


def strip_solution(source: str, hint: str) -> str:
    out, inside = [], False
    for line in source.splitlines():
        if m := BEGIN.match(line):
            if inside:
                raise ValueError(f"nested BEGIN SOLUTION in cell:\n{source}")
            inside = True
            if m[2] == "#":
                out += [f"{m[1]}# YOUR CODE HERE", f"{m[1]}raise NotImplementedError({hint!r})"]
            else:  # CUDA C: an empty body compiles, and its unwritten output fails the grader
                out += [f"{m[1]}// YOUR CODE HERE"]
        elif END.match(line):
            if not inside:
                raise ValueError(f"END SOLUTION without BEGIN in cell:\n{source}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"BEGIN SOLUTION without END in cell:\n{source}")
    return "\n".join(out)


def exercise_from(solution: Path) -> str:
    nb = nbformat.read(solution, as_version=4)
    hint = f"fill in this cell ({solution.stem})"
    for cell in nb.cells:  # cell ids are kept: the same as the solution's, so reproducible
        if cell.cell_type == "code":
            cell.source = strip_solution(cell.source, hint)
            cell.outputs, cell.execution_count = [], None
    nb.metadata.pop("widgets", None)
    return nbformat.writes(nb, version=4) + "\n"


def fingerprint(notebook_text: str) -> str:
    """What the learner can change: the cells' text. Outputs and metadata do not count, so a
    notebook that was only run and saved still counts as unchanged."""
    nb = nbformat.reads(notebook_text, as_version=4)
    cells = [[c.cell_type, c.source] for c in nb.cells]
    return hashlib.sha256(json.dumps(cells).encode()).hexdigest()


def plan() -> dict[Path, str]:
    return {EXERCISES / s.name: exercise_from(s) for s in sorted(SOLUTIONS.glob("*.ipynb"))}


def learners_work() -> set[Path] | None:
    """The exercises with changes git has not committed, or that git does not know: the
    learner's work, which is theirs to change. ``None`` outside a git clone (no way to tell)."""
    done = subprocess.run(["git", "ls-files", "--modified", "--others", "--exclude-standard", "-z", "--",
                           str(EXERCISES)], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        return None
    return {ROOT / name for name in done.stdout.split("\0") if name}


def stale(leave_out: set[Path] = frozenset()) -> list[str]:
    """How ``exercises/`` differs from what ``solutions/`` generates, the paths in ``leave_out``
    not compared."""
    problems = []
    wanted = plan()
    for path, text in wanted.items():
        if path in leave_out:
            continue
        if not path.exists():
            problems.append(f"{path.relative_to(ROOT)} is missing")
        elif path.read_text() != text:
            problems.append(f"{path.relative_to(ROOT)} differs from what solutions/{path.name} generates")
    for path in EXERCISES.glob("*.ipynb"):
        if path not in wanted and path not in leave_out:
            problems.append(f"{path.relative_to(ROOT)} has no solution in solutions/")
    manifest = json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {}
    generated = {p.name: fingerprint(t) for p, t in wanted.items() if p not in leave_out}
    recorded = {name: v for name, v in manifest.items() if EXERCISES / name not in leave_out}
    if MANIFEST not in leave_out and recorded != generated:
        problems.append(f"{MANIFEST.relative_to(ROOT)} is out of date")
    return problems


def check() -> int:
    yours = learners_work()
    if yours is None:
        print("not a git clone: cannot tell your changes from the course's, so nothing is compared")
        return 0
    for path in sorted(yours):
        print(f"not compared: {path.relative_to(ROOT)} has changes of yours")
    problems = stale(yours)
    for p in problems:
        print("exercises/ is stale:", p)
    if problems:
        print("run `make exercises`")
    return 1 if problems else 0


def generate() -> int:
    EXERCISES.mkdir(exist_ok=True)
    manifest = json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {}
    written, refused = [], []
    for path, text in plan().items():
        if path.exists():
            current = path.read_text()
            unchanged = manifest.get(path.name) == fingerprint(current)
            if current == text:
                manifest[path.name] = fingerprint(text)
                continue
            if not unchanged:
                refused.append(path)
                continue
        path.write_text(text)
        manifest[path.name] = fingerprint(text)
        written.append(path)
        print(f"wrote {path.relative_to(ROOT)}")
    MANIFEST.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    if not written and not refused:
        print(f"{EXERCISES.relative_to(ROOT)}/ is up to date with solutions/")
    for path in refused:
        print(f"kept: {path.relative_to(ROOT)} has your changes, so it is not regenerated. To get a "
              f"fresh copy, rename or delete it and run `make exercises` again.")
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only say whether exercises/ is up to date")
    sys.exit(check() if ap.parse_args().check else generate())


if __name__ == "__main__":
    main()
