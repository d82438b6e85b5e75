"""tools/setup_env.py picks the CuPy/NVRTC build from the driver's CUDA version."""

import importlib.util
import os
import stat

import pytest

from moe_course import ROOT

spec = importlib.util.spec_from_file_location("setup_env", ROOT / "tools" / "setup_env.py")
setup_env = importlib.util.module_from_spec(spec)
spec.loader.exec_module(setup_env)


def fake_nvidia_smi(tmp_path, monkeypatch, cuda_version: str | None):
    """Put an nvidia-smi on PATH that prints what a driver supporting ``cuda_version`` prints."""
    script = tmp_path / "nvidia-smi"
    line = f"| NVIDIA-SMI 580.00   Driver Version: 580.00   CUDA Version: {cuda_version}  |" if cuda_version else ""
    script.write_text(f"#!/bin/sh\necho '{line}'\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}/usr/bin:/bin")
    monkeypatch.delenv("CUDA_MAJOR", raising=False)


@pytest.mark.parametrize("version, major", [("12.4", 12), ("13.0", 13), ("13.2", 13), ("14.1", 13)])
def test_cuda_major_from_nvidia_smi(tmp_path, monkeypatch, version, major):
    fake_nvidia_smi(tmp_path, monkeypatch, version)
    got, why = setup_env.cuda_major()
    assert got == major and version in why
    assert (ROOT / "requirements" / f"cuda{got}.txt") in setup_env.requirement_files(got, lab=False)


def test_no_driver_means_cuda_13_compile_only(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi at all
    monkeypatch.delenv("CUDA_MAJOR", raising=False)
    assert setup_env.cuda_major() == (13, "no NVIDIA driver found: CUDA 13 builds (compile-only)")


def test_too_old_driver_is_refused(tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path, monkeypatch, "11.8")
    with pytest.raises(SystemExit, match="CUDA 12 or newer"):
        setup_env.cuda_major()


def test_cuda_major_override(monkeypatch):
    monkeypatch.setenv("CUDA_MAJOR", "12")
    assert setup_env.cuda_major() == (12, "CUDA_MAJOR is set")
    monkeypatch.setenv("CUDA_MAJOR", "11")
    with pytest.raises(SystemExit, match="CUDA 12 and 13 only"):
        setup_env.cuda_major()


def test_lab_requirements_only_when_asked():
    assert ROOT / "requirements" / "lab.txt" not in setup_env.requirement_files(13, lab=False)
    assert ROOT / "requirements" / "lab.txt" in setup_env.requirement_files(13, lab=True)
