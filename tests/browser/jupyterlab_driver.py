"""JupyterLab in headless Chromium, for tests/browser.

`LabServer` starts the server with `make lab` itself (so the test runs what a learner runs) and
stops it with SIGTERM, as a supervisor or CI would. `check_notebook` opens a notebook, runs all
its cells from the Run menu and checks what a learner would see:

- no cell failed: JupyterLab marks a cell with an error output "[!]" in the notebook minimap
  (turned on in the test's own settings), and a cell after a failure never runs;
- at least so many plots appeared: <img> outputs that loaded;
- a control (ipywidgets) rendered, and moving it with the keyboard, as a learner would, changes
  its value and redraws the plot of its cell (the image changes).

It reads the page, never the kernel; and it never writes the notebook (autosave is off in the
test's settings, and the file is compared before and after).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

# What works headless in a container with no GPU and no outside network. Playwright adds
# --headless and a new, empty profile (--user-data-dir) of its own at each launch.
CHROMIUM_FLAGS = (
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",  # containers often have a 64 MB /dev/shm
)

# The test's own JupyterLab settings: a learner's settings never change what it sees.
TEST_SETTINGS = {
    # the minimap shows each cell's state ([3], [*], [!] for an error output) from the model
    "@jupyterlab/notebook-extension/tracker": {"showMinimap": True},
    # never write the outputs into the course's notebooks
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    # no news pop-up over the screenshot, no requests to the outside
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
}


class NotebookCheckFailed(AssertionError):
    """A notebook did not work in the browser; the message lists every problem found."""


@dataclass(frozen=True)
class Control:
    """An ipywidgets control that must render and, when moved, redraw the plot in its cell.

    kind: "slider" (IntSlider, FloatSlider, SelectionSlider) or "dropdown".
    label: its description as shown (e.g. "router skew"); None takes the first of its kind.
    redraw_timeout_s: how long the new plot may take to appear after the move.
    """

    kind: str = "slider"
    label: str | None = None
    redraw_timeout_s: float = 30

    def __post_init__(self):
        if self.kind not in CONTROL_SELECTORS:
            raise ValueError(f"control kind {self.kind!r}: use one of {sorted(CONTROL_SELECTORS)}")


CONTROL_SELECTORS = {"slider": ".widget-slider", "dropdown": ".widget-dropdown"}


@dataclass(frozen=True)
class Expect:
    """What a notebook must show after Run All Cells."""

    notebook: str              # path from the course root, e.g. "notebooks/01_moe_basics.ipynb"
    plots: int = 1             # at least this many images
    control: Control | None = None
    timeout_s: float = 300     # for running every cell


@dataclass
class Report:
    notebook: str
    code_cells: int = 0
    plots: int = 0
    control: str = ""
    seconds: dict = field(default_factory=dict)
    screenshot: Path | None = None
    browser_errors: list = field(default_factory=list)

    def summary(self) -> str:
        times = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        errors = f"; {len(self.browser_errors)} uncaught page errors" if self.browser_errors else ""
        return (f"{self.notebook}: {self.code_cells} code cells ran, {self.plots} plots"
                f"{', ' + self.control if self.control else ''}; {times}{errors}; screenshot {self.screenshot}")


# ---------------------------------------------------------------------------------- the server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


class LabServer:
    """`make lab` on a free loopback port with a token known in advance (JUPYTER_TOKEN), the
    test's settings and workspace in `workdir`, its output in `workdir/server.log`."""

    def __init__(self, root: Path, workdir: Path):
        self.root, self.workdir = Path(root), Path(workdir)
        self.port = free_port()
        self.token = os.urandom(16).hex()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.workdir / "server.log"
        self.proc: subprocess.Popen | None = None
        self.pages = 0

    def start(self, timeout: float = 300) -> None:
        make = shutil.which("make")
        if make is None:
            raise RuntimeError("the browser test starts JupyterLab with `make lab`, and there is no `make` here")
        settings = self.workdir / "settings"
        for plugin, values in TEST_SETTINGS.items():
            path = settings / f"{plugin}.jupyterlab-settings"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        env = {**os.environ, "JUPYTER_TOKEN": self.token,
               "JUPYTERLAB_SETTINGS_DIR": str(settings),
               "JUPYTERLAB_WORKSPACES_DIR": str(self.workdir / "workspaces")}
        log = self.log_path.open("w")
        # Its own session, so that stop() can end the whole group; and on Linux a SIGTERM if
        # this process dies without stopping it (killed, say), so no server outlives the test.
        self.proc = subprocess.Popen(
            [make, "--no-print-directory", "-C", str(self.root), "lab",
             f"LAB_PORT={self.port}", "LAB_IP=127.0.0.1"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True, preexec_fn=_terminate_with_parent if sys.platform == "linux" else None)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"`make lab` exited ({self.proc.returncode}) before serving:\n{self.log_tail()}")
            try:
                self.api("status")
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"`make lab` did not answer on port {self.port} within {timeout:.0f} s:\n{self.log_tail()}")

    def api(self, path: str, method: str = "GET"):
        request = urllib.request.Request(f"{self.base_url}/api/{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def url(self, path: str) -> str:
        """The notebook in a workspace of its own: JupyterLab restores a workspace's open tabs
        (and starts their kernels), so a shared one would reopen every notebook opened before."""
        self.pages += 1
        workspace = f"test-{self.pages}-{Path(path).stem}"
        return f"{self.base_url}/lab/workspaces/{workspace}/tree/{path}?token={self.token}"

    def shut_down_kernels_of(self, notebook: str) -> None:
        """End the kernel a notebook page started, so chapters do not pile up in memory."""
        for session in self.api("sessions"):
            if session.get("path") == notebook:
                self.api(f"sessions/{session['id']}", method="DELETE")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def stop(self, timeout: float = 30) -> list[str]:
        """SIGTERM to `make lab` (make passes it on; Jupyter shuts its kernels down). Anything
        still alive after `timeout` is killed; what had to be killed is returned as problems."""
        if self.proc is None or self.proc.returncode is not None:
            return []  # never started, or already stopped
        problems = []
        try:
            kernel_ids = [k["id"] for k in self.api("kernels")]
        except (urllib.error.URLError, OSError):
            kernel_ids = []
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            problems.append(f"`make lab` was still running {timeout:.0f} s after SIGTERM; killed")
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        leftover = kernel_processes(kernel_ids)
        if leftover:
            problems.append(f"kernels still running after the server stopped: pids {leftover}; killed")
            for pid in leftover:
                os.kill(pid, signal.SIGKILL)
        if port_open(self.port):
            problems.append(f"port {self.port} still open after the server stopped")
        return problems


def _terminate_with_parent() -> None:
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def kernel_processes(kernel_ids: list[str]) -> list[int]:
    """Pids of the kernel processes with these ids (their command line names kernel-<id>.json)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if any(f"kernel-{kid}.json" in cmdline for kid in kernel_ids):
            pids.append(int(proc.name))
    return pids


# ------------------------------------------------------------------------------- the browser

def launch_chromium(playwright, executable: str):
    if not Path(executable).exists():
        raise RuntimeError(f"no browser at {executable}: run `make test-browser` (it installs chromium), "
                           "or set CHROMIUM to a Chromium or Chrome executable")
    return playwright.chromium.launch(executable_path=executable, headless=True, args=list(CHROMIUM_FLAGS))


def code_cell_ids(notebook: Path) -> list[str]:
    cells = json.loads(notebook.read_text())["cells"]
    return [c.get("id", f"#{i}") for i, c in enumerate(cells) if c["cell_type"] == "code"]


PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the notebook on show

# Each cell's state from the minimap, in order: "" for markdown, "[ ]", "[*]", "[12]" or "[!]".
CELL_STATES_JS = """() => {
  const bar = document.querySelector('PANEL .jp-WindowedPanel-scrollbar');
  if (!bar) return null;
  return [...bar.querySelectorAll('li')].map(
      li => (li.querySelector('.jp-scrollbarItem-executionIndicator') || {}).textContent || '');
}""".replace("PANEL", PANEL)

# The images in the outputs of a cell (or of the whole notebook), each with its source and whether it has loaded.
IMAGES_JS = """cell => [...cell.querySelectorAll('.jp-OutputArea-output img')].map(
    img => ({src: img.src, loaded: img.complete && img.naturalWidth > 0}))"""


def kernel_status(page) -> str:
    """The kernel's state as the status bar shows it ("Idle", "Busy", "Starting", "Dead", ...)."""
    text = " ".join(page.locator(".jp-StatusBar-TextItem").all_text_contents())
    match = re.search(r"\|\s*(\w+)", text)
    return match[1] if match else ""


def wait_for(condition, timeout: float, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def check_notebook(browser, server: LabServer, expect: Expect, screenshot: Path) -> Report:
    """Open `expect.notebook`, run all its cells, and check it; raise NotebookCheckFailed with
    every problem found. A screenshot is saved in any case (with the control moved, if any)."""
    path = server.root / expect.notebook
    if not path.exists():
        raise FileNotFoundError(f"no notebook {expect.notebook} under {server.root}")
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    checkpoint = path.parent / ".ipynb_checkpoints" / f"{path.stem}-checkpoint.ipynb"
    had_checkpoint = checkpoint.exists()
    cell_ids = code_cell_ids(path)
    report = Report(expect.notebook, screenshot=screenshot)
    problems: list[str] = []
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.on("pageerror", lambda err: report.browser_errors.append(str(err)))
    t0 = time.monotonic()
    try:
        page.goto(server.url(expect.notebook))
        page.locator(f"{PANEL} .jp-Notebook .jp-Cell").first.wait_for(timeout=120_000)
        if not wait_for(lambda: kernel_status(page) == "Idle", timeout=120):
            raise NotebookCheckFailed(f"{expect.notebook}: the kernel never became idle "
                                      f"(status bar: {kernel_status(page)!r})")
        report.seconds["open"] = time.monotonic() - t0

        t1 = time.monotonic()
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        states = run_to_the_end(page, len(cell_ids), expect.timeout_s)
        report.seconds["run all"] = time.monotonic() - t1
        code_states = [s for s in states if s]
        report.code_cells = sum(bool(re.fullmatch(r"\[\d+\]", s)) for s in code_states)
        problems += cell_problems(page, states, cell_ids)

        cells = page.locator(f"{PANEL} .jp-Notebook .jp-Cell")
        outputs = page.locator(f"{PANEL} .jp-OutputArea-output")
        broken = outputs.filter(has_text="Error displaying widget").count()
        if broken:
            problems.append(f"{broken} widget(s) show 'Error displaying widget' (the widget manager failed)")
        images = page.locator(f"{PANEL} .jp-Notebook").evaluate(IMAGES_JS)
        report.plots = sum(img["loaded"] for img in images)
        if report.plots < expect.plots:
            problems.append(f"{report.plots} plot image(s) loaded, {expect.plots} expected"
                            f" ({len(images)} <img> in the outputs)")

        if expect.control is not None:
            t2 = time.monotonic()
            report.control, control_problems = move_control(page, cells, expect.control)
            problems += control_problems
            report.seconds["redraw"] = time.monotonic() - t2
        elif report.plots:
            page.locator(f"{PANEL} .jp-OutputArea-output img").last.scroll_into_view_if_needed()
    finally:
        try:  # never hide the error that brought us here
            page.screenshot(path=str(screenshot))
            page.close()
            server.shut_down_kernels_of(expect.notebook)
        except Exception as err:
            problems.append(f"cleaning up after the page: {err!r}")
        if not had_checkpoint and checkpoint.exists():  # made by opening the notebook; not ours to leave
            checkpoint.unlink()
            if not any(checkpoint.parent.iterdir()):
                checkpoint.parent.rmdir()
    if hashlib.sha256(path.read_bytes()).hexdigest() != before:
        problems.append(f"{expect.notebook} changed on disk while the test ran (it must never be saved)")
    if problems:
        raise NotebookCheckFailed(f"{expect.notebook} in JupyterLab:\n- " + "\n- ".join(problems)
                                  + (f"\nuncaught errors in the page: {report.browser_errors}"
                                     if report.browser_errors else "")
                                  + f"\nscreenshot: {screenshot}")
    return report


MISCOUNT_GRACE_S = 20


def run_to_the_end(page, n_code: int, timeout: float) -> list[str]:
    """Wait until every code cell has run, or one failed (Run All stops there), and the kernel
    is idle again. Returns each cell's state from the minimap."""
    deadline = time.monotonic() + timeout
    states, miscounted_since = None, None
    while time.monotonic() < deadline:
        states = page.evaluate(CELL_STATES_JS)
        if states is None:
            raise NotebookCheckFailed("no notebook minimap: the test's JupyterLab settings were not "
                                      "applied (JUPYTERLAB_SETTINGS_DIR)")
        code = [s for s in states if s]
        if len(code) != n_code:
            # The minimap is redrawn while Run All starts: once in four CI runs it showed no
            # cells for a moment. A count that stays wrong for MISCOUNT_GRACE_S is a failure.
            miscounted_since = miscounted_since or time.monotonic()
            if time.monotonic() - miscounted_since > MISCOUNT_GRACE_S:
                raise NotebookCheckFailed(f"the page shows {len(code)} code cells, the file has {n_code}")
            time.sleep(0.5)
            continue
        miscounted_since = None
        status = kernel_status(page)
        if status in ("Dead", "Unknown", "Disconnected"):
            raise NotebookCheckFailed(f"the kernel is {status} (states: {code})")
        finished = all(re.fullmatch(r"\[\d+\]", s) for s in code) or "[!]" in code
        if finished and "[*]" not in code and status == "Idle":
            return states
        time.sleep(0.5)
    raise NotebookCheckFailed(f"Run All Cells did not finish within {timeout:.0f} s "
                              f"(cell states: {[s for s in (states or []) if s]})")


def cell_problems(page, states: list[str], cell_ids: list[str]) -> list[str]:
    problems, code_index = [], -1
    cells = page.locator(f"{PANEL} .jp-Notebook .jp-Cell")
    never_ran = []
    for i, state in enumerate(states):
        if not state:
            continue
        code_index += 1
        if state == "[!]":
            text = cells.nth(i).locator(".jp-OutputArea-output").all_inner_texts()
            tail = "\n".join(text)[-600:].strip()
            problems.append(f"cell {cell_ids[code_index]} failed:\n{tail}")
        elif not re.fullmatch(r"\[\d+\]", state):
            never_ran.append(cell_ids[code_index])
    if never_ran:
        problems.append(f"cells that never ran: {', '.join(never_ran)}")
    return problems


def move_control(page, cells, control: Control) -> tuple[str, list[str]]:
    """Find the control, move it one step with the keyboard, and wait for its cell's plot to
    change. Returns a description of what moved, and the problems found."""
    found = page.locator(CONTROL_SELECTORS[control.kind])
    if control.label is not None:
        found = found.filter(has=page.locator(".widget-label", has_text=re.compile(
            rf"^\s*{re.escape(control.label)}\s*$")))
    name = f"{control.kind} {control.label!r}" if control.label else f"the first {control.kind}"
    holders = cells.filter(has=found)
    if holders.count() == 0:
        return "", [f"no {name} rendered (ipywidgets)"]
    cell = holders.first
    widget = cell.locator(found).first
    widget.scroll_into_view_if_needed()
    images_before = [img["src"] for img in cell.evaluate(IMAGES_JS)]
    if not images_before:
        return "", [f"the {name} has no plot in its cell to redraw"]

    if control.kind == "slider":
        handle = widget.locator(".noUi-handle").first
        at_max = handle.get_attribute("aria-valuenow") == handle.get_attribute("aria-valuemax")
        value_before = widget.locator(".widget-readout").inner_text()
        handle.focus()
        page.keyboard.press("ArrowLeft" if at_max else "ArrowRight")
        read_value = lambda: widget.locator(".widget-readout").inner_text()
    else:
        select = widget.locator("select")
        value_before = select.input_value()
        options = select.locator("option").evaluate_all("os => os.map(o => o.value)")
        if len(options) < 2:
            return "", [f"the {name} has fewer than two options"]
        select.select_option(options[1] if options[0] == value_before else options[0])
        read_value = select.input_value
    value_after = wait_for(lambda: (v := read_value()) != value_before and v, timeout=10)
    if not value_after:
        return "", [f"the {name} did not move (value stays {value_before})"]
    moved = f"{name} moved {value_before} -> {value_after}"

    def redrawn():
        images = cell.evaluate(IMAGES_JS)
        return (images and all(img["loaded"] for img in images)
                and [img["src"] for img in images] != images_before)
    if not wait_for(redrawn, timeout=control.redraw_timeout_s):
        return moved, [f"the plot did not change within {control.redraw_timeout_s:g} s after the {name} moved "
                       f"({value_before} -> {value_after})"]
    widget.scroll_into_view_if_needed()
    return moved + ", plot redrawn", []
