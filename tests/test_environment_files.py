"""environment.yml makes the same environment as `make setup` (same files, same lock), and the
CUDA requirement files are built alike and kept off macOS by their markers."""

import re

from packaging.requirements import Requirement

from moe_course import ROOT
from tools_modules import setup_env


def requirements(name: str) -> list[Requirement]:
    lines = (line.split("#")[0].strip() for line in (ROOT / "requirements" / name).read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def test_environment_yml_uses_the_requirement_files_and_the_lock():
    text = (ROOT / "environment.yml").read_text()
    for name in ("base.txt", "cuda13.txt", "lab.txt"):
        assert f"-r requirements/{name}" in text
        assert (ROOT / "requirements" / name).exists()
    assert "-c requirements/locks/cuda13.txt" in text and "conda-forge" in text and "-e ." in text
    python = re.search(r"python=(\d+\.\d+)", text)[1]
    assert setup_env.checked("cuda13", setup_env.TARGETS["linux-x86_64"], python), \
        f"the cuda13 lock was not resolved for the Python {python} environment.yml asks for"


def test_cuda_requirement_files_differ_only_in_their_cuda_build():
    names = {major: [r.name for r in requirements(f"cuda{major}.txt")] for major in (12, 13)}
    assert [n.replace("cuda12x", "cuda13x").replace("-cu12", "") for n in names[12]] == names[13]


def test_no_cuda_requirement_applies_on_a_mac():
    """NVIDIA publishes no macOS wheels of CuPy, cuda-bindings or NVRTC: pip must skip them there."""
    mac = setup_env.TARGETS["macos-arm64"].environment("3.12")
    linux = setup_env.TARGETS["linux-x86_64"].environment("3.12")
    for name in ("cuda12.txt", "cuda13.txt"):
        reqs = requirements(name)
        assert [r.name for r in reqs if r.marker is None or r.marker.evaluate(mac)] == []
        assert [r.name for r in reqs if r.marker.evaluate(linux)] == [r.name for r in reqs]
