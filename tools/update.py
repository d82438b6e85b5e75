#!/usr/bin/env python3
"""``make update``: take the course's new version (a ``git pull`` of your clone) and lose nothing.

A plain ``git pull`` stops as soon as a file it must change has changes of yours, and running a
notebook is such a change (its outputs are saved in it). This takes the new version file by
file instead, for every file the new version changes:

- a file you have not changed: the new version;
- a notebook you only ran (its cells' text is the course's, only outputs differ): its outputs
  are dropped and it becomes the new version;
- a notebook you edited: kept as it is, and the new version is written beside it as
  ``NAME.course-<commit>.ipynb``;
- your exercises (``exercises/*.ipynb``): never touched. ``make exercises`` says how to get a
  fresh copy of one;
- any other file you changed (a kernel, a helper): nothing is done, and it says which, so that
  you can move your version aside first.

Files the new version does not change keep your changes as they are. Then your branch points
at the new version (a fast-forward, as ``git pull`` would do). It refuses, changing nothing,
when your branch has commits of its own, or changes staged with ``git add``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # make_exercises.py, the sibling script
from make_exercises import fingerprint  # what a learner can change in a notebook: its cells' text

ROOT = Path(__file__).resolve().parent.parent


class Refused(Exception):
    """Nothing was changed; the message says why and what to do."""


def git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True)
    if check and done.returncode != 0:
        raise Refused(f"git {' '.join(args)} failed: {done.stderr.decode(errors='replace').strip()}")
    return done


def git_text(repo: Path, *args: str) -> str:
    return git(repo, *args).stdout.decode().strip()


def is_exercise(path: str) -> bool:
    return path.startswith("exercises/") and path.endswith(".ipynb")


def beside(path: str, commit: str) -> str:
    """Where the course's new version of an edited notebook goes: next to it, named by commit."""
    p = Path(path)
    return str(p.with_name(f"{p.stem}.course-{commit[:7]}{p.suffix}"))


@dataclass
class Plan:
    """What to do with each path the new version changes (paths relative to the clone)."""
    take: list[str]        # write the new version (or remove the file, where the course removed it)
    reset: list[str]       # notebooks only run: outputs dropped, then the new version
    keep_beside: list[str]  # notebooks edited: kept, the new version written beside
    keep: list[str]        # exercises (and edited notebooks the course removed): kept as they are
    blocked: list[str]     # other files changed on both sides: the update is refused


def local_changes(repo: Path) -> dict[str, str]:
    """``{path: git status code}`` of every uncommitted change (`` M``, `` D``, ``??`` ...)."""
    out = git(repo, "status", "--porcelain=v1", "-z", "--untracked-files=all").stdout.decode()
    entries = [e for e in out.split("\0") if e]
    return {e[3:]: e[:2] for e in entries}


def blob(repo: Path, commit: str, path: str) -> bytes:
    return git(repo, "show", f"{commit}:{path}").stdout


def same_cells(mine: bytes, course: bytes) -> bool:
    """Whether a notebook was only run: its cells' text is the course's (outputs, execution
    counts and metadata aside). A file that is no longer a readable notebook counts as edited."""
    try:
        return fingerprint(mine.decode()) == fingerprint(course.decode())
    except Exception:  # not UTF-8, not JSON, not a valid notebook: whatever makes it unreadable
        return False


def plan(repo: Path, head: str, new: str) -> Plan:
    fields = git(repo, "diff", "--name-status", "--no-renames", "-z", head, new).stdout.decode().split("\0")
    changed = zip(fields[0:-1:2], fields[1::2])  # (status, path) pairs: "M", "A" or "D"
    mine = local_changes(repo)
    p = Plan([], [], [], [], [])
    for status, path in changed:
        removed_upstream = status == "D"
        local = mine.get(path)
        file = repo / path
        if local is None or (local.strip() == "D" and not is_exercise(path)):
            p.take.append(path)  # untouched, or deleted by you: nothing of yours to lose
        elif is_exercise(path):
            p.keep.append(path)
        elif local == "??" and not removed_upstream and file.read_bytes() == blob(repo, new, path):
            p.take.append(path)  # yours and the course's new file are the same
        elif not path.endswith(".ipynb"):
            p.blocked.append(path)
        elif local != "??" and same_cells(file.read_bytes(), blob(repo, head, path)):
            p.reset.append(path)
        elif removed_upstream:
            p.keep.append(path)
        else:
            p.keep_beside.append(path)
    return p


def update(repo: Path = ROOT, say=print) -> Plan | None:
    """Fetch and take the new version as :class:`Plan` says; ``None`` when already up to date.
    Raises :class:`Refused` (nothing changed) when it cannot."""
    top = git(repo, "rev-parse", "--show-toplevel", check=False)
    if top.returncode != 0:
        raise Refused(f"{repo} is not a git clone: download the course's new version instead")
    repo = Path(top.stdout.decode().strip())  # git names files from the top of the clone
    if git(repo, "rev-parse", "--abbrev-ref", "--symbolic-full-name", "@{u}", check=False).returncode != 0:
        raise Refused("this branch follows no branch of the course (git branch --set-upstream-to=origin/main)")
    if git(repo, "diff", "--cached", "--quiet", check=False).returncode != 0:
        raise Refused("you have changes staged with `git add`: commit them, or unstage them "
                      "(git restore --staged .), then run make update again")
    git(repo, "fetch", "--quiet")
    head, new = git_text(repo, "rev-parse", "HEAD"), git_text(repo, "rev-parse", "@{u}")
    if git(repo, "merge-base", "--is-ancestor", new, head, check=False).returncode == 0:
        say(f"Already up to date ({head[:7]}).")
        return None
    if git(repo, "merge-base", "--is-ancestor", head, new, check=False).returncode != 0:
        ahead = git_text(repo, "rev-list", "--count", f"{new}..{head}")
        raise Refused(f"your branch has {ahead} commit(s) of its own, and the course has moved on: "
                      "make update only takes the new version over uncommitted work. Merge it "
                      "yourself (git pull), or move your commits to a branch of their own")

    p = plan(repo, head, new)
    if p.blocked:
        raise Refused("the new version changes files that you changed too:\n"
                      + "".join(f"  {path}\n" for path in p.blocked)
                      + "Copy your version somewhere else, undo your change (git restore FILE), "
                        "then run make update again")

    # The files first, the branch last: stopped half-way, nothing of yours is lost, and running
    # again sees the files already written as changes of yours (kept, or refused).
    for path in p.take + p.reset:
        if git(repo, "cat-file", "-e", f"{new}:{path}", check=False).returncode == 0:
            git(repo, "checkout", new, "--", path)
        else:
            (repo / path).unlink(missing_ok=True)
    written = {}
    for path in p.keep_beside:
        target = repo / beside(path, new)
        if not target.exists():
            target.write_bytes(blob(repo, new, path))
        written[path] = beside(path, new)
    git(repo, "reset", "--quiet", "--mixed", new)  # HEAD and index to the new version; files as above

    count = git_text(repo, "rev-list", "--count", f"{head}..{new}")
    say(f"Updated the course: {head[:7]} -> {new[:7]} ({count} commit(s)).")
    for path in p.reset:
        say(f"  {path}: you had only run it: its outputs are dropped, it is the new version")
    for path, new_copy in written.items():
        say(f"  {path}: has your edits, kept as it is; the course's new version is beside it: {new_copy}")
    for path in p.keep:
        if is_exercise(path):
            say(f"  {path}: your exercise, kept as it is. The course changed it too: to get the new one, "
                "rename yours and run make exercises")
        else:
            say(f"  {path}: has your edits, kept; the course removed it from its new version")
    say(f"  {len(p.take)} other file(s) updated.")
    return p


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, default=ROOT, help="the clone to update (default: this course)")
    args = ap.parse_args(argv)
    if not args.repo.is_dir():  # (stdlib only here, like the rest of this tool: no moe_course.checks)
        ap.error(f"argument --repo: no folder {str(args.repo)!r}")
    try:
        update(args.repo.resolve())
    except Refused as why:
        print(f"make update: nothing was changed: {why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
