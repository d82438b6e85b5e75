"""The course in a real browser. JupyterLab is started by `make lab` itself; headless Chromium
opens each chapter, runs every cell from the Run menu, and the test checks what a learner sees:
no failed cell, the plots, and a control that redraws its plot when moved. Screenshots go to
.browser-test/. Self-tests feed notebooks that fail in known ways and check that each is caught.

`make test-browser` runs it (it installs chromium and Playwright first); `make test` skips it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

if not os.environ.get("COURSE_BROWSER_TEST"):
    pytest.skip("the browser test runs with `make test-browser` (it installs chromium and playwright)",
                allow_module_level=True)

import nbformat

from jupyterlab_driver import Control, Expect, NotebookCheckFailed, check_notebook

CHAPTERS = [
    Expect("notebooks/00_setup.ipynb", plots=1),
    Expect("notebooks/01_moe_basics.ipynb", plots=2, control=Control("slider", "router skew")),
    Expect("notebooks/02_grouped_gemm.ipynb", plots=3),
    Expect("notebooks/03_io_overlap.ipynb", plots=5),
    Expect("notebooks/04_token_rounding.ipynb", plots=2, control=Control("slider", "router skew")),
    Expect("notebooks/05_sonicmoe.ipynb", plots=1),
    Expect("notebooks/06_full_moe_layer.ipynb", plots=3),
    Expect("notebooks/07_fp8.ipynb", plots=4),
    Expect("notebooks/08_expert_parallel.ipynb", plots=2),
    Expect("notebooks/09_moe_inference.ipynb", plots=3),
    Expect("notebooks/10_in_your_model.ipynb", plots=1),
]


@pytest.mark.parametrize("expect", CHAPTERS, ids=lambda e: Path(e.notebook).stem)
def test_chapter_runs_in_jupyterlab(browser, lab_server, out_dir, summary_line, expect):
    report = check_notebook(browser, lab_server, expect, out_dir / f"{Path(expect.notebook).stem}.png")
    summary_line(report.summary())
    assert report.code_cells > 0


def test_make_lab_prints_where_to_connect(lab_server):
    log = lab_server.log_path.read_text()
    port = lab_server.port
    assert f"JupyterLab is starting on http://127.0.0.1:{port}/lab" in log
    assert f"ssh -L {port}:127.0.0.1:{port}" in log
    assert re.search(rf"http://127\.0\.0\.1:{port}/lab\S*\?token=", log), "Jupyter's own address line"


def test_make_lab_refuses_a_busy_port(lab_server):
    """A second `make lab` on the same port must stop with an error, not move to another port
    than the one it printed (and that a learner forwarded over ssh)."""
    proc = subprocess.Popen(["make", "--no-print-directory", "-C", str(lab_server.root), "lab",
                             f"LAB_PORT={lab_server.port}", "LAB_IP=127.0.0.1"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate()
        pytest.fail(f"a second `make lab` on busy port {lab_server.port} kept running:\n{out[-2000:]}")
    assert proc.returncode != 0
    assert f"port {lab_server.port} is not available" in out


# ------------------------------------------------------- self-tests: each failure is caught

PLOT = "import matplotlib.pyplot as plt\nplt.figure(figsize=(4, 2.5)); plt.plot([1, 3, 2]); plt.show()"


def slider_plot(redraws: bool) -> str:
    heights = "[i % k for i in range(8)]" if redraws else "list(range(8))"  # the second ignores k
    return ("import ipywidgets as widgets\nimport matplotlib.pyplot as plt\n\n"
            "def draw(k):\n"
            f"    plt.figure(figsize=(4, 2.5)); plt.bar(range(8), {heights}); plt.show()\n\n"
            "widgets.interact(draw, k=widgets.IntSlider(value=3, min=1, max=8, description='k'));")


SELF_TESTS = {
    # (cells, what is expected, what the failure must say; None: it must pass)
    "passes": ([
        "import warnings\nwarnings.warn('only a warning: text on stderr is not a failure')",
        slider_plot(redraws=True)], dict(plots=1, control=Control("slider", "k")), None),
    "error_in_the_middle": ([PLOT, "1 / 0", "print('never runs')"], dict(plots=1),
                            r"cell \S+ failed:[\s\S]*ZeroDivisionError[\s\S]*cells that never ran: \S+"),
    "error_in_the_last_cell": ([PLOT, "raise ValueError('the last cell fails')"], dict(plots=1),
                               r"cell \S+ failed:[\s\S]*ValueError: the last cell fails"),
    "plot_not_redrawn": ([slider_plot(redraws=False)], dict(plots=1, control=Control("slider", "k", 5)),
                         r"the plot did not change .* after the slider 'k' moved \(3 -> 4\)"),
    "no_plot_no_control": (["print('no figure here')"], dict(plots=1, control=Control("slider", "skew")),
                           r"0 plot image\(s\) loaded, 1 expected[\s\S]*no slider 'skew' rendered"),
}


@pytest.mark.parametrize("name", SELF_TESTS)
def test_the_check_catches_failures(browser, lab_server, out_dir, scratch, name):
    cells, expected, failure = SELF_TESTS[name]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                       "language": "python"}
    path = scratch / f"selftest_{name}.ipynb"
    nbformat.write(notebook, path)
    expect = Expect(str(path.relative_to(lab_server.root)), **expected)
    screenshot = out_dir / f"selftest_{name}.png"
    if failure is None:
        report = check_notebook(browser, lab_server, expect, screenshot)
        assert report.control.endswith("plot redrawn")
    else:
        with pytest.raises(NotebookCheckFailed, match=failure):
            check_notebook(browser, lab_server, expect, screenshot)


def test_make_lab_stops_cleanly_on_sigterm(lab_server, summary_line):
    """Last, as it stops the server: SIGTERM to `make lab` ends JupyterLab and its kernels."""
    start = time.monotonic()
    assert lab_server.stop() == []
    summary_line(f"`make lab` stopped {time.monotonic() - start:.1f} s after SIGTERM; log {lab_server.log_path}")
