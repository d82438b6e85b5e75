"""Fixtures of the browser test: one JupyterLab (started by `make lab`) and one headless
Chromium for the whole run, both stopped at the end, on failure and on SIGTERM too."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from moe_course import ROOT

OUT = ROOT / ".browser-test"            # screenshots, server log, the test's settings (git-ignored)
SCRATCH = Path(__file__).parent / "scratch"  # the self-tests' notebooks (JupyterLab hides dot-folders)

# Never collected, by nbval in `make test` either: scratch notebooks fail on purpose.
collect_ignore = ["scratch"]


_SUMMARY: list[str] = []


@pytest.fixture
def summary_line():
    """Add a line to the summary printed at the end of the run (what ran, how long it took)."""
    return _SUMMARY.append


def pytest_terminal_summary(terminalreporter):
    if _SUMMARY:
        terminalreporter.section("the course in a browser")
        for line in _SUMMARY:
            terminalreporter.write_line(line)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")  # pytest then runs the fixtures' teardown


@pytest.fixture(scope="session")
def lab_server():
    from jupyterlab_driver import LabServer

    OUT.mkdir(exist_ok=True)
    server = LabServer(ROOT, OUT)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a CI time-out still stops the server
    try:
        server.start()
        yield server
    finally:
        problems = server.stop()
        signal.signal(signal.SIGTERM, previous)
    if problems:
        pytest.fail("stopping `make lab`: " + "; ".join(problems))


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    from jupyterlab_driver import launch_chromium

    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright, os.environ.get("CHROMIUM", "/usr/bin/chromium"))
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def out_dir():
    """Where screenshots go."""
    OUT.mkdir(exist_ok=True)
    return OUT


@pytest.fixture(scope="session")
def scratch():
    """A folder for notebooks written by the test, inside the server's root; removed after."""
    SCRATCH.mkdir(exist_ok=True)
    yield SCRATCH
    shutil.rmtree(SCRATCH, ignore_errors=True)
