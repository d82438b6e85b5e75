"""A machine without CuPy and cuda-bindings (a Mac: NVIDIA publishes neither for macOS): the
package imports, a kernel step says in one line what it needs, and every chapter runs top to
bottom (its kernel steps print that line instead). Each test runs a subprocess whose Python
finds neither package (tests/without_cuda/sitecustomize.py hides them, in notebook kernels too)."""

import os
import pkgutil
import subprocess
import sys

import pytest

import moe_course
from moe_course import ROOT

HIDE = ROOT / "tests" / "without_cuda"


def without_cuda(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    # An absolute path: notebook kernels start in the notebook's folder.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HIDE), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_packages_are_hidden():
    """The check can fail: CuPy and cuda-bindings are installed here, and the subprocess sees neither."""
    here = subprocess.run([sys.executable, "-c", "import cupy, cuda.bindings"], capture_output=True)
    if here.returncode != 0:
        pytest.skip("CuPy and cuda-bindings are not installed here (a Mac?): nothing to hide")
    hidden = without_cuda("-c", "import importlib.util as u; import torch, numpy;"
                                "print([u.find_spec(n) for n in ('cupy', 'cuda', 'nvidia')]); import cupy")
    assert "[None, None, None]" in hidden.stdout and "No module named 'cupy'" in hidden.stderr


def test_every_module_imports_and_kernel_steps_say_why_in_one_line():
    modules = sorted(m.name for m in pkgutil.walk_packages(moe_course.__path__, "moe_course."))
    code = f"""
import importlib
for name in {modules!r}:
    importlib.import_module(name)
from moe_course import kernels, machine
here = machine.info()
print("GPU:", machine.skip_reason())
print("NVRTC:", here.nvrtc, "|", machine.compile_skip_reason())
try:
    kernels.compile_report("00_scale")
except RuntimeError as exc:
    print("compile:", exc)
try:
    kernels.load("00_scale")
except RuntimeError as exc:
    print("load:", exc)
"""
    run = without_cuda("-c", code)
    assert run.returncode == 0, run.stderr
    lines = dict(line.split(": ", 1) for line in run.stdout.splitlines())
    assert lines["GPU"] == "skipped: CuPy is not installed"
    assert lines["NVRTC"].startswith("None | skipped: ") and "NVRTC" in lines["NVRTC"]
    assert "NVRTC" in lines["compile"] and "macOS" in lines["compile"]
    assert lines["load"].startswith("loading a kernel needs a GPU (CuPy is not installed)")
    assert len(lines) == 4  # each said in one line


def test_compiling_tests_skip_saying_why():
    """Where NVRTC is not installed, the tests that compile (marked nvrtc) are skipped with the
    reason, not failed: `make test` passes on a Mac."""
    run = without_cuda("-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_kernels.py",
                       "tests/test_token_rounding.py", "-k", "compile")
    assert run.returncode == 0, run.stdout[-3000:]
    assert "failed" not in run.stdout and "SKIPPED" in run.stdout and "NVRTC" in run.stdout, run.stdout[-3000:]


@pytest.mark.parametrize("notebook", sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb")))
def test_chapter_runs(notebook):
    run = without_cuda("-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax", "--nbval-current-env",
                       str(ROOT / "notebooks" / notebook), timeout=1800)
    assert run.returncode == 0, run.stdout[-3000:]
