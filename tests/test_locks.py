"""The locks in requirements/locks/: current (made from today's inputs), inside the ranges, and
resolved by uv for every platform each set is for (resolved.json, written by `make locks`, which
resolves again with uv's --python-platform). These tests read the committed files: no network."""

import pytest

from moe_course import ROOT
from tools_modules import make_locks, setup_env

T = setup_env.TARGETS
REQUIRED = [(v, t, p) for v, targets in setup_env.VARIANT_TARGETS.items() for t in targets for p in ("3.11", "3.12")]


def pins_on(variant: str, target: str, python: str = "3.12", lock=None) -> dict[str, str]:
    env = T[target].environment(python)
    return {p.name: p.version for p in setup_env.read_lock(lock or setup_env.lock_file(variant)) if p.applies(env)}


def cuda_packages(pins: dict[str, str]) -> list[str]:
    return sorted(n for n in pins if n.startswith(("cupy", "cuda-", "nvidia-", "triton")))


def test_locks_are_current():
    assert make_locks.stale() == [], "a lock does not match its inputs: run `make locks`"


def test_a_changed_input_makes_the_locks_stale(monkeypatch):
    """The check can fail: every input's text is in the digest, and so is the Python floor."""
    assert {p.name for p in make_locks.inputs("cpu")} == {"cpu.in", "base.txt", "cuda13.txt", "lab.txt"}
    monkeypatch.setattr(make_locks, "PYTHON_FLOOR", "3.10")
    assert make_locks.stale() == list(setup_env.VARIANTS)


@pytest.mark.parametrize("variant", setup_env.VARIANTS)
def test_lock_inputs_are_what_set_up_installs(variant):
    """<variant>.in includes exactly the files tools/setup_env.py installs for that set."""
    assert make_locks.inputs(variant)[1:] == setup_env.requirement_files(variant, lab=True)


@pytest.mark.parametrize("variant, target, python", REQUIRED)
def test_every_platform_was_resolved(variant, target, python):
    entry = setup_env.checked(variant, T[target], python)
    assert entry, f"`make locks` did not resolve the {variant} set on {target}, Python {python}"
    pins = pins_on(variant, target, python)
    unsized = [n for n, size in entry["sizes"].items() if size is None]
    assert entry["packages"] == len(pins) - len(entry["not_checked"]) and not unsized
    assert all(note.startswith("torch ") for note in entry["not_checked"])  # only torch's CPU build may be unchecked


@pytest.mark.parametrize("variant, target, python", REQUIRED)
def test_locks_stay_inside_the_ranges(variant, target, python):
    pins = setup_env.read_lock(setup_env.lock_file(variant))
    assert make_locks.outside_ranges(variant, pins, T[target].environment(python)) == []


def test_a_pin_outside_its_range_is_caught():
    pins = setup_env.read_lock(setup_env.lock_file("cpu"))
    wrong = [setup_env.Pin("numpy", "1.20.0", None) if p.name == "numpy" else p for p in pins]
    missing = [p for p in pins if p.name != "nbval"]
    env = T["linux-x86_64"].environment("3.11")
    assert make_locks.outside_ranges("cpu", wrong, env) == ["numpy>=1.26 (locked: numpy==1.20.0)"]
    assert make_locks.outside_ranges("cpu", missing, env) == ["nbval>=0.11 (locked: nothing)"]


@pytest.mark.parametrize("python", ["3.11", "3.12"])
def test_a_mac_gets_no_cuda_package(python):
    pins = pins_on("cpu", "macos-arm64", python)
    assert cuda_packages(pins) == [] and pins["torch"] == "2.13.0"


def test_the_mac_check_catches_an_unmarked_cuda_package(tmp_path):
    """NVIDIA publishes no macOS wheels of these: a line without its marker would break macOS."""
    lock = tmp_path / "cpu.txt"
    lock.write_text(setup_env.lock_file("cpu").read_text().replace(
        "cupy-cuda13x==14.2.0 ; sys_platform == 'linux'", "cupy-cuda13x==14.2.0"))
    assert cuda_packages(pins_on("cpu", "macos-arm64", lock=lock)) == ["cupy-cuda13x"]


@pytest.mark.parametrize("target", ["linux-x86_64", "linux-aarch64"])
def test_linux_without_a_driver_gets_the_cpu_torch(target):
    """No CUDA torch (several GB) where it cannot run; NVRTC and CuPy for CUDA 13 stay."""
    pins = pins_on("cpu", target)
    assert pins["torch"].endswith("+cpu")
    assert cuda_packages(pins) == ["cuda-bindings", "cuda-pathfinder", "cupy-cuda13x",
                                   "nvidia-cuda-nvrtc", "nvidia-cuda-runtime"]


def test_windows_compiles_kernels_but_has_no_cupy():
    pins = pins_on("cpu", "windows-x86_64")
    assert pins["torch"] == "2.13.0" and "cupy-cuda13x" not in pins
    assert {"cuda-bindings", "nvidia-cuda-nvrtc", "nvidia-cuda-runtime"} <= set(pins)


@pytest.mark.parametrize("target", ["linux-x86_64", "linux-aarch64"])
def test_cuda13_set_is_the_measured_torch_on_cuda_13(target):
    pins = pins_on("cuda13", target)
    assert pins["torch"] == "2.11.0" and pins["cupy-cuda13x"].startswith("14.")
    assert pins["nvidia-cuda-runtime"].startswith("13.") and "nvidia-cublas" in pins  # torch's CUDA build
    assert not [n for n in pins if n.endswith("-cu12") or n == "cupy-cuda12x"]


def test_cuda12_set_is_cuda_12_throughout():
    pins = pins_on("cuda12", "linux-x86_64")
    assert pins["torch"] == "2.10.0" and pins["nvidia-cuda-runtime-cu12"].startswith("12.")
    assert pins["cuda-bindings"].startswith("12.") and "cupy-cuda12x" in pins
    assert not [n for n in pins if n in ("cupy-cuda13x", "nvidia-cuda-runtime", "nvidia-cublas")]


def test_lock_headers_say_what_they_are_for():
    for variant in setup_env.VARIANTS:
        text = setup_env.lock_file(variant).read_text()
        assert "#    make locks\n" in text and f"# For Python >= {make_locks.PYTHON_FLOOR}" in text
        assert make_locks.recorded_digest(setup_env.lock_file(variant)) == make_locks.inputs_digest(variant)


def test_read_lock_keeps_who_needs_what():
    pins = {p.name: p for p in setup_env.read_lock(setup_env.lock_file("cuda13"))}
    assert pins["cuda-toolkit"].via == ["torch"] and pins["cuda-toolkit"].marker == "sys_platform == 'linux'"
    assert "cuda-toolkit" in pins["nvidia-cublas"].via
    assert pins["jupyterlab"].via == []  # asked for by requirements/lab.txt only
    env = T["linux-x86_64"].environment("3.12")
    with_torch = {p.name for p in setup_env.needed(list(pins.values()), {"torch"}, env)}
    assert {"torch", "nvidia-cublas", "filelock", "triton"} <= with_torch and "numpy" not in with_torch


def test_the_locks_are_the_files_set_up_reads():
    assert setup_env.RESOLVED == ROOT / "requirements" / "locks" / "resolved.json"
    for variant in setup_env.VARIANTS:
        assert setup_env.lock_file(variant).exists() and (setup_env.LOCKS / f"{variant}.in").exists()
