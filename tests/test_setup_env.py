"""tools/setup_env.py: which set a machine gets (platform, driver), how torch's CPU build is
found, and what a wheelhouse for another machine holds."""

import os
import stat

import pytest

from moe_course import ROOT
from tools_modules import setup_env

LINUX, AARCH64, MAC, WINDOWS = (setup_env.TARGETS[n] for n in
                                ("linux-x86_64", "linux-aarch64", "macos-arm64", "windows-x86_64"))


def fake_nvidia_smi(tmp_path, monkeypatch, cuda_version: str | None):
    """Put an nvidia-smi on PATH that prints what a driver supporting ``cuda_version`` prints."""
    script = tmp_path / "nvidia-smi"
    line = f"| NVIDIA-SMI 580.00   Driver Version: 580.00   CUDA Version: {cuda_version}  |" if cuda_version else ""
    script.write_text(f"#!/bin/sh\necho '{line}'\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}/usr/bin:/bin")
    monkeypatch.delenv("CUDA_MAJOR", raising=False)


@pytest.mark.parametrize("version, variant", [("12.4", "cuda12"), ("13.0", "cuda13"), ("13.2", "cuda13"), ("14.1", "cuda13")])
def test_linux_driver_picks_the_cuda_set(tmp_path, monkeypatch, version, variant):
    fake_nvidia_smi(tmp_path, monkeypatch, version)
    got, why = setup_env.choose_variant(LINUX)
    assert got == variant and version in why
    assert (ROOT / "requirements" / f"{variant}.txt") in setup_env.requirement_files(got, lab=False)


def test_no_driver_means_the_cpu_set_with_cuda_13_nvrtc(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi at all
    monkeypatch.delenv("CUDA_MAJOR", raising=False)
    variant, why = setup_env.choose_variant(LINUX)
    assert variant == "cpu" and why.startswith("no NVIDIA driver found")
    assert [f.name for f in setup_env.requirement_files(variant, lab=False)] == ["base.txt", "cuda13.txt"]


@pytest.mark.parametrize("target", [MAC, WINDOWS])
def test_macos_and_windows_get_the_cpu_set_even_with_a_driver(tmp_path, monkeypatch, target):
    fake_nvidia_smi(tmp_path, monkeypatch, "13.0")  # Windows machines have nvidia-smi too
    assert setup_env.choose_variant(target)[0] == "cpu"
    monkeypatch.setenv("CUDA_MAJOR", "13")
    with pytest.raises(SystemExit, match="Linux only"):
        setup_env.choose_variant(target)


def test_too_old_driver_is_refused(tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path, monkeypatch, "11.8")
    with pytest.raises(SystemExit, match="CUDA 12 or newer"):
        setup_env.choose_variant(LINUX)


def test_cuda_major_override(tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path, monkeypatch, "13.0")
    monkeypatch.setenv("CUDA_MAJOR", "12")
    assert setup_env.choose_variant(LINUX) == ("cuda12", "CUDA_MAJOR is set")
    monkeypatch.setenv("CUDA_MAJOR", "none")
    assert setup_env.choose_variant(LINUX)[0] == "cpu"
    monkeypatch.setenv("CUDA_MAJOR", "11")
    with pytest.raises(SystemExit, match="CUDA 12 and 13 only"):
        setup_env.choose_variant(LINUX)


@pytest.mark.parametrize("system, machine, target", [
    ("linux", "x86_64", "linux-x86_64"), ("linux", "aarch64", "linux-aarch64"),
    ("darwin", "arm64", "macos-arm64"), ("win32", "AMD64", "windows-x86_64")])
def test_platforms(system, machine, target):
    assert setup_env.this_target(system, machine).name == target


@pytest.mark.parametrize("system, machine, why", [
    ("darwin", "x86_64", "Intel Mac"), ("linux", "ppc64le", "no install for linux on ppc64le")])
def test_platforms_without_an_install_are_refused(system, machine, why):
    with pytest.raises(SystemExit, match=why):
        setup_env.this_target(system, machine)


def test_lab_requirements_only_when_asked():
    assert ROOT / "requirements" / "lab.txt" not in setup_env.requirement_files("cpu", lab=False)
    assert ROOT / "requirements" / "lab.txt" in setup_env.requirement_files("cpu", lab=True)


def test_this_machine_installs_from_the_lock():
    """CI (Linux x86-64, Python 3.11, no GPU) is one of the resolved platforms: `make test` there
    installs the CPU lock, torch's CPU build included."""
    import platform
    import sys

    entry = setup_env.checked("cpu", setup_env.this_target(), f"{sys.version_info[0]}.{sys.version_info[1]}")
    if platform.machine() != "x86_64" or sys.platform != "linux" or sys.version_info[:2] != (3, 11):
        pytest.skip("the CI platform is Linux x86-64 with Python 3.11")
    assert entry and entry["sizes"]["torch"] > 100 * 2**20 and not entry["not_checked"]


class PipCalls:
    """Stands in for setup_env.pip: records each command; the first ``failures`` calls fail."""

    def __init__(self, failures: int = 0):
        self.calls, self.failures = [], failures

    def __call__(self, python, *args, quiet=False):
        self.calls.append(list(args))
        failed = len(self.calls) <= self.failures
        return type("Done", (), {"returncode": 1 if failed else 0})()


def test_pinned_cpu_torch_comes_from_pips_own_sources_when_there(monkeypatch):
    calls = PipCalls()
    monkeypatch.setattr(setup_env, "pip", calls)
    setup_env.cpu_torch("python", ["install"], "torch==2.13.0+cpu", pinned=True)
    assert len(calls.calls) == 1 and "--index-url" not in calls.calls[0]


def test_pinned_cpu_torch_falls_back_to_the_pytorch_index(monkeypatch):
    calls = PipCalls(failures=1)
    monkeypatch.setattr(setup_env, "pip", calls)
    setup_env.cpu_torch("python", ["install"], "torch==2.13.0+cpu", pinned=True)
    assert calls.calls[1][-2:] == ["--index-url", setup_env.TORCH_CPU_INDEX]
    assert "torch==2.13.0+cpu" in calls.calls[1] and "--no-deps" in calls.calls[1]


def test_a_torch_range_goes_straight_to_the_pytorch_index(monkeypatch):
    """PyPI would answer `torch>=2.4` on Linux with the CUDA build: never ask it."""
    calls = PipCalls()
    monkeypatch.setattr(setup_env, "pip", calls)
    setup_env.cpu_torch("python", ["install"], "torch>=2.4,<2.14", pinned=False)
    assert len(calls.calls) == 1 and calls.calls[0][-2:] == ["--index-url", setup_env.TORCH_CPU_INDEX]


def download_args(tmp_path, variant="cuda13", target="linux-x86_64", python="3.12", skip=()):
    return type("Args", (), {"download": str(tmp_path), "variant": variant, "target": target,
                             "python_version": python, "lab": True, "skip": list(skip)})()


def downloaded(monkeypatch, tmp_path, **kw) -> list[str]:
    calls = PipCalls()
    monkeypatch.setattr(setup_env, "pip", calls)
    setup_env.download(download_args(tmp_path, **kw))
    (cmd,) = calls.calls
    return cmd


def test_wheelhouse_takes_the_cpu_torch_apart(monkeypatch, tmp_path):
    """Only torch's CPU build may need PyTorch's index; the other packages never wait on it."""
    calls = PipCalls(failures=1)  # not among pip's own sources: then the index
    monkeypatch.setattr(setup_env, "pip", calls)
    setup_env.download(download_args(tmp_path, variant="cpu", python="3.11"))
    first, second, rest = calls.calls
    assert first[-3:] == ["--no-deps", "torch==2.13.0+cpu", "-q"] and "--index-url" not in first
    assert second[-3:] == ["torch==2.13.0+cpu", "--index-url", setup_env.TORCH_CPU_INDEX]
    assert "--index-url" not in rest and "numpy==2.4.6" in rest and not [a for a in rest if "torch" in a]


def test_wheelhouse_follows_the_lock_for_the_target(monkeypatch, tmp_path):
    cmd = downloaded(monkeypatch, tmp_path)
    assert "--no-deps" in cmd and cmd[cmd.index("--python-version") + 1] == "3.12"
    assert "manylinux_2_28_x86_64" in cmd
    lock = {str(p).split("==")[0]: str(p) for p in setup_env.read_lock(setup_env.lock_file("cuda13"))
            if p.applies(setup_env.TARGETS["linux-x86_64"].environment("3.12"))}
    assert lock["numpy"] in cmd and lock["torch"] in cmd and lock["nvidia-cublas"] in cmd
    # Markers are evaluated for Python 3.12, not for the Python running this test.
    assert not [a for a in cmd if a.startswith("numpy==") and a != lock["numpy"]]


def test_wheelhouse_leaves_out_what_only_skipped_packages_need(monkeypatch, tmp_path):
    """A GPU image has torch and CuPy: torch's CUDA libraries (GBs) stay out with torch."""
    cmd = downloaded(monkeypatch, tmp_path, skip=("torch", "cupy-cuda13x", "cuda-bindings",
                                                   "nvidia-cuda-nvrtc", "nvidia-cuda-runtime"))
    names = {a.split("==")[0] for a in cmd if "==" in a}
    assert not names & {"torch", "cupy-cuda13x", "nvidia-cublas", "nvidia-cudnn-cu13", "triton", "cuda-toolkit",
                        "sympy"}  # through torch only
    # filelock comes through torch and through huggingface-hub (transformers): it stays in
    assert {"numpy", "nbval", "jupyterlab", "matplotlib", "tqdm", "filelock"} <= names


def test_wheelhouse_for_a_mac_has_no_cuda_packages(monkeypatch, tmp_path):
    cmd = downloaded(monkeypatch, tmp_path, variant="cpu", target="macos-arm64")
    names = {a.split("==")[0] for a in cmd if "==" in a}
    assert "torch==2.13.0" in cmd and "macosx_14_0_arm64" in cmd
    assert not [n for n in names if n.startswith(("cupy", "cuda", "nvidia"))]


def test_wheelhouse_for_an_unresolved_python_takes_the_ranges(monkeypatch, tmp_path):
    cmd = downloaded(monkeypatch, tmp_path, python="3.10", skip=("torch",))
    assert "--no-deps" not in cmd and "numpy>=1.26" in cmd and not [a for a in cmd if a.startswith("torch")]


def test_download_sizes_are_said_before_installing():
    pins = [setup_env.Pin("torch", "2.13.0+cpu", None), setup_env.Pin("numpy", "2.4.6", None),
            setup_env.Pin("tqdm", "4.70.1", None)]
    text = setup_env.describe_download(pins, {"torch": 183 * 2**20, "numpy": 16 * 2**20})
    assert text.startswith("3 packages, 199 MiB") and "torch 183 MiB, numpy 16 MiB" in text
    assert text.endswith("size not recorded for tqdm")
