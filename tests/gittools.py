"""git for the tests: scratch repositories for the tools that work on a learner's clone
(exercises, `make update`), and what the course has committed. A fixed identity, no global or
system config, no prompts."""

import os
import shutil
import subprocess

import pytest

GIT_ENV = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0",
           "GIT_AUTHOR_NAME": "Course", "GIT_AUTHOR_EMAIL": "course@example.org",
           "GIT_COMMITTER_NAME": "Course", "GIT_COMMITTER_EMAIL": "course@example.org"}

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs git on PATH")


def git(cwd, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-c", "init.defaultBranch=main", *args], cwd=cwd, env=GIT_ENV,
                          capture_output=True, text=True, check=check)
