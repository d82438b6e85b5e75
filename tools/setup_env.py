#!/usr/bin/env python3
"""Make (or update) the course's Python environment. Called by the Makefile; idempotent.

    python3 tools/setup_env.py                      # .venv with the set this machine needs
    python3 tools/setup_env.py --lab                # ... plus JupyterLab
    python3 tools/setup_env.py --current-python     # install into this Python instead of a venv
    python3 tools/setup_env.py --wheelhouse DIR     # install from DIR alone (no internet)
    python3 tools/setup_env.py --download DIR ...   # fill DIR with wheels for another machine

Three sets ("variants"), each locked in requirements/locks/<variant>.txt (`make locks` makes them):

- cpu: no NVIDIA driver (any Linux laptop, macOS on Apple silicon, Windows): torch's CPU build;
  on Linux and Windows the CUDA 13 NVRTC, so kernels still compile for sm_90a (no GPU needed).
- cuda13 / cuda12: Linux with an NVIDIA driver for CUDA 13 / 12 (read from `nvidia-smi`, or
  CUDA_MAJOR=12|13|none): torch's CUDA build, and the CuPy, cuda-bindings and NVRTC builds
  that match the driver.

A fresh environment installs the ranges in requirements/*.txt pinned by the lock (pip's
constraints), so every machine gets the versions the course was checked with. The lock is used
where `make locks` resolved it for this platform and Python (requirements/locks/resolved.json);
elsewhere (an older Python, an unchecked platform) the ranges alone are installed, and set-up
says so. --current-python keeps what that Python already has where the ranges accept it (a GPU
image's torch and CuPy are built for its driver): it installs from the ranges too.

A stamp file in the environment records what was installed, so a second run with nothing
changed returns at once. This file needs nothing beyond the Python standard library and pip.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import venv
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQ = ROOT / "requirements"
LOCKS = REQ / "locks"
RESOLVED = LOCKS / "resolved.json"  # what `make locks` checked, per platform and Python
SUPPORTED_CUDA = (12, 13)
VARIANTS = ("cpu", "cuda12", "cuda13")
# PyPI's Linux torch is a CUDA build of several GB; the CPU build is on PyTorch's own index.
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


@dataclass(frozen=True)
class Target:
    """A platform the course installs on: how uv names it, the wheel platform tags it accepts
    (best first), and the values its environment markers see."""

    name: str
    uv_platform: str
    wheel_platforms: tuple[str, ...]
    markers: dict = field(hash=False)
    uv_env: dict = field(default_factory=dict, hash=False)  # settings uv needs to resolve for it

    def environment(self, python: str) -> dict:
        """Marker values for this platform with Python ``python`` ("3.12" or "3.12.4")."""
        full = python if python.count(".") == 2 else f"{python}.0"
        return {**self.markers, "python_version": ".".join(full.split(".")[:2]),
                "python_full_version": full, "implementation_name": "cpython",
                "platform_python_implementation": "CPython"}


def _manylinux(arch: str) -> tuple[str, ...]:
    # glibc 2.28 (Debian 10, Ubuntu 20.04, RHEL 8) and newer: torch's Linux wheels need 2.28
    legacy = (f"manylinux2014_{arch}", f"manylinux2010_{arch}", f"manylinux1_{arch}")
    return tuple(f"manylinux_2_{minor}_{arch}" for minor in range(28, 4, -1)) + legacy


def _macos_arm64() -> tuple[str, ...]:
    # macOS 14 (Sonoma) and newer: torch 2.13's macOS wheels are built for 14.0
    return (tuple(f"macosx_{major}_0_{arch}" for major in range(14, 10, -1) for arch in ("arm64", "universal2"))
            + tuple(f"macosx_10_{minor}_universal2" for minor in range(16, 3, -1)))


TARGETS = {
    t.name: t for t in (
        Target("linux-x86_64", "x86_64-manylinux_2_28", _manylinux("x86_64"),
               {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix"}),
        Target("linux-aarch64", "aarch64-manylinux_2_28", _manylinux("aarch64"),
               {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "aarch64", "os_name": "posix"}),
        Target("macos-arm64", "aarch64-apple-darwin", _macos_arm64(),
               {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64", "os_name": "posix"},
               {"MACOSX_DEPLOYMENT_TARGET": "14.0"}),
        Target("windows-x86_64", "x86_64-pc-windows-msvc", ("win_amd64",),
               {"sys_platform": "win32", "platform_system": "Windows", "platform_machine": "AMD64", "os_name": "nt"}),
    )
}
# Where each set is meant to run (PyPI's torch 2.10 for aarch64 is a CPU build: no cuda12 there).
VARIANT_TARGETS = {"cpu": tuple(TARGETS), "cuda13": ("linux-x86_64", "linux-aarch64"), "cuda12": ("linux-x86_64",)}


def this_target(system: str = sys.platform, machine: str = platform.machine()) -> Target:
    """This machine's platform, or a clear refusal where the course has no install for it."""
    machine = machine.lower()
    if system == "darwin":
        if machine != "arm64":
            sys.exit("this is an Intel Mac: torch publishes no builds for Intel Macs since 2.3 (the course "
                     "needs 2.4 or newer). Use a Linux machine, or a Mac with Apple silicon.")
        return TARGETS["macos-arm64"]
    if system == "win32" and machine in ("amd64", "x86_64"):
        return TARGETS["windows-x86_64"]
    if system.startswith("linux") and machine in ("x86_64", "amd64"):
        return TARGETS["linux-x86_64"]
    if system.startswith("linux") and machine in ("aarch64", "arm64"):
        return TARGETS["linux-aarch64"]
    sys.exit(f"no install for {system} on {machine}: the course supports Linux (x86-64, aarch64), "
             "macOS on Apple silicon and Windows (x86-64)")


def cuda_major() -> tuple[int | None, str]:
    """(major, why): from CUDA_MAJOR (12, 13 or none), else nvidia-smi's 'CUDA Version', else None."""
    forced = os.environ.get("CUDA_MAJOR", "").strip().lower()
    if forced:
        if forced == "none":
            return None, "CUDA_MAJOR=none"
        if forced not in {str(m) for m in SUPPORTED_CUDA}:
            sys.exit(f"CUDA_MAJOR={forced}: the course has CuPy builds for CUDA "
                     f"{' and '.join(map(str, SUPPORTED_CUDA))} only (or CUDA_MAJOR=none for the CPU set)")
        return int(forced), "CUDA_MAJOR is set"
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi], capture_output=True, text=True, timeout=30).stdout
            if m := re.search(r"CUDA Version:\s*(\d+)\.(\d+)", out):
                major = int(m[1])
                if major < 12:
                    sys.exit(f"this driver supports CUDA {m[1]}.{m[2]}; the course needs a driver for CUDA 12 or newer")
                return min(major, max(SUPPORTED_CUDA)), f"nvidia-smi reports CUDA {m[1]}.{m[2]}"
        except (OSError, subprocess.SubprocessError):
            pass
    return None, "no NVIDIA driver found"


def choose_variant(target: Target) -> tuple[str, str]:
    """(variant, why) for this machine: a CUDA set only on Linux with an NVIDIA driver."""
    if target.markers["sys_platform"] != "linux":
        if os.environ.get("CUDA_MAJOR", "none").strip().lower() not in ("", "none"):
            sys.exit(f"CUDA_MAJOR={os.environ['CUDA_MAJOR']} on {target.name}: the course's CUDA sets are for "
                     "Linux only (NVIDIA publishes no CuPy for macOS; on Windows, use WSL2)")
        if target.name.startswith("macos"):
            return "cpu", "macOS: torch's CPU build; NVIDIA publishes no CUDA packages for macOS"
        return "cpu", "Windows: torch's CPU build, kernels compiled but not run (for the GPU chapters, use WSL2)"
    major, why = cuda_major()
    if major is None:
        return "cpu", f"{why}: torch's CPU build, kernels compiled for sm_90a but not run"
    return f"cuda{major}", why


def requirement_files(variant: str, lab: bool) -> list[Path]:
    """The ranges a set installs: the CPU set takes the CUDA 13 NVRTC to compile kernels."""
    cuda = "cuda12" if variant == "cuda12" else "cuda13"
    files = [REQ / "base.txt", REQ / f"{cuda}.txt"]
    return files + ([REQ / "lab.txt"] if lab else [])


def lock_file(variant: str) -> Path:
    return LOCKS / f"{variant}.txt"


def resolved_targets() -> list[dict]:
    """What `make locks` resolved: one entry per (variant, target, python)."""
    return json.loads(RESOLVED.read_text())["targets"] if RESOLVED.exists() else []


def checked(variant: str, target: Target, python: str) -> dict | None:
    """The lock's resolution for this platform and Python (e.g. "3.12"), if `make locks` made one."""
    for entry in resolved_targets():
        if (entry["variant"], entry["target"], entry["python"]) == (variant, target.name, python) and entry["ok"]:
            return entry
    return None


# ----------------------------------------------------------------------------- reading the lock

def _markers():
    try:
        from packaging import markers, requirements
    except ImportError:  # a bare Python: pip's own copy of `packaging` (set-up needs pip anyway)
        from pip._vendor.packaging import markers, requirements
    return markers, requirements


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class Pin:
    """One line of a lock: name==version ; marker, and the packages that need it (uv's `# via`)."""

    name: str
    version: str
    marker: str | None
    via: list[str] = field(default_factory=list)

    def applies(self, env: dict) -> bool:
        return self.marker is None or _markers()[0].Marker(self.marker).evaluate(env)

    def __str__(self) -> str:
        return f"{self.name}=={self.version}"


def read_lock(path: Path) -> list[Pin]:
    """The pins of a `uv pip compile` lock, with who needs each (its `# via` comments)."""
    pins: list[Pin] = []
    for line in path.read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            spec, _, marker = line.partition(";")
            name, _, version = spec.strip().partition("==")
            pins.append(Pin(canonical(name), version.strip(), marker.strip() or None))
        elif pins and (m := re.match(r"\s+#\s+(?:via\s+)?([A-Za-z0-9][\w.-]*)\s*$", line)) and m[1] != "via":
            pins[-1].via.append(canonical(m[1]))
    return pins


def ranges(files: list[Path], env: dict) -> list:
    """The requirements (packaging ``Requirement``) of these files that apply on a machine
    with these marker values."""
    _, requirements = _markers()
    reqs = [requirements.Requirement(line) for f in files for line in
            (raw.split("#")[0].strip() for raw in f.read_text().splitlines()) if line]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(env)]


def top_level(files: list[Path], env: dict) -> set[str]:
    return {canonical(r.name) for r in ranges(files, env)}


def needed(pins: list[Pin], roots: set[str], env: dict) -> list[Pin]:
    """The pins that ``roots`` need on a machine with these marker values: the roots and, through
    the lock's `# via` graph, everything they depend on (so a skipped torch takes its CUDA
    libraries with it)."""
    here = {p.name: p for p in pins if p.applies(env)}
    deps: dict[str, set[str]] = {}
    for pin in here.values():
        for parent in pin.via:
            deps.setdefault(parent, set()).add(pin.name)
    seen: set[str] = set()
    todo = [r for r in roots if r in here]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(deps.get(name, ()))
    return [here[n] for n in sorted(seen)]


# ----------------------------------------------------------------------------- installing

def pip(python: str, *args: str, quiet: bool = False) -> subprocess.CompletedProcess:
    cmd = [python, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=not quiet, capture_output=quiet, text=True)


def source_args(wheelhouse: str | None) -> list[str]:
    return ["--no-index", "--find-links", str(Path(wheelhouse).resolve())] if wheelhouse else []


def venv_python(env: Path) -> Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def mib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def describe_download(pins: list[Pin], sizes: dict[str, int | None]) -> str:
    """What a new environment downloads: the total and the largest packages, from the lock's
    resolution for this platform (pip then shows each download as it comes)."""
    known = sorted(((sizes.get(p.name) or 0, p) for p in pins), key=lambda s: -s[0])
    largest = ", ".join(f"{p.name} {mib(s)}" for s, p in known[:4] if s)
    unknown = [p.name for p in pins if sizes.get(p.name) is None]
    return (f"{len(pins)} packages, {mib(sum(s for s, _ in known))} for a new environment (largest: {largest})"
            + (f"; size not recorded for {', '.join(unknown)}" if unknown else ""))


def cpu_torch(python: str, pip_args: list[str], requirement: str, pinned: bool) -> None:
    """`pip <pip_args> <requirement>` for torch's CPU build on Linux (install, or download for a
    wheelhouse), with no dependencies: the lock or the ranges bring them. A pinned `+cpu` build
    is looked for first where pip is configured to look (a local mirror or wheel folder: no
    download), then on PyTorch's CPU index; a range goes to that index at once (PyPI would
    answer it with the CUDA build)."""
    args = [*pip_args, "--no-deps", requirement]
    if pinned and pip(python, *args, "-q", quiet=True).returncode == 0:
        return
    if pinned:
        print(f"{requirement} is not among pip's configured sources: taking it from {TORCH_CPU_INDEX}")
    pip(python, *args, "--index-url", TORCH_CPU_INDEX)


def install(args) -> None:
    target = this_target()
    variant, why = choose_variant(target)
    files = requirement_files(variant, args.lab)
    if args.current_python:
        python, stamp_dir, fresh = sys.executable, ROOT / ".setup", False
    else:
        env = Path(args.venv)
        python = str(venv_python(env))
        fresh = not Path(python).exists()
        stamp_dir = env
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    # Locked where `make locks` resolved this platform and Python; an existing Python keeps its own.
    resolution = None if args.current_python else checked(variant, target, py)
    lock = lock_file(variant) if resolution else None
    digest = hashlib.sha256()
    for f in files + [ROOT / "pyproject.toml", Path(__file__)] + ([lock] if lock else []):
        digest.update(f.read_bytes())
    digest.update(f"{python} {variant} {args.wheelhouse}".encode())
    stamp = stamp_dir / f".course-setup-{'lab' if args.lab else 'base'}"
    if stamp.exists() and stamp.read_text() == digest.hexdigest():
        print(f"environment up to date ({python}; the {variant} set: {why})")
        return
    if fresh:
        print(f"creating the environment {env} ({sys.executable}, Python {sys.version.split()[0]})")
        venv.EnvBuilder(with_pip=True).create(env)
    print(f"installing the {variant} set for {target.name}, Python {py} ({why})")
    env_markers = target.environment(platform.python_version())
    pins = needed(read_lock(lock), top_level(files, env_markers), env_markers) if lock else []
    if lock:
        print(f"versions from {lock.relative_to(ROOT)}: {describe_download(pins, resolution['sizes'])}")
    elif args.current_python:
        print("into this Python: what it has is kept where requirements/*.txt accept it (no lock)")
    else:
        print(f"no lock was resolved for the {variant} set on {target.name} with Python {py} (see "
              f"{RESOLVED.relative_to(ROOT)}): installing the ranges in requirements/ instead; versions "
              "may differ from those the course was checked with")
    if variant == "cpu" and target.markers["sys_platform"] == "linux" and not args.wheelhouse:
        locked = [str(p) for p in pins if p.name == "torch"]
        in_range = [f"torch{r.specifier}" for r in ranges(files, env_markers) if canonical(r.name) == "torch"]
        cpu_torch(python, ["install", "--disable-pip-version-check"], (locked or in_range)[0], pinned=bool(locked))
    req_args = [a for f in files for a in ("-r", str(f))] + (["-c", str(lock)] if lock else [])
    pip(python, "install", "--disable-pip-version-check", *source_args(args.wheelhouse), *req_args)
    # The course's own package, editable: notebooks import it, and edits show up at once.
    pip(python, "install", "--disable-pip-version-check", "-q", "--no-deps", "--no-build-isolation",
        "-e", str(ROOT))
    stamp_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(digest.hexdigest())
    print(f"environment ready: {python}")


def download(args) -> None:
    """Wheels for a machine with no internet (a GPU compute node): copy DIR there, then
    `make test WHEELHOUSE=DIR` (add USE_CURRENT_PYTHON=1 where torch and CuPy are installed).
    Markers are evaluated here for the target (pip's --platform does not), and the lock's
    versions are taken where it was resolved for that target and Python."""
    target = TARGETS[args.target]
    files = requirement_files(args.variant, args.lab)
    env = target.environment(args.python_version)
    skip = {canonical(s) for s in args.skip}
    if checked(args.variant, target, args.python_version):
        lock = lock_file(args.variant)
        reqs = [str(p) for p in needed(read_lock(lock), top_level(files, env) - skip, env)]
        print(f"the {args.variant} set for {target.name}, Python {args.python_version}, from {lock.relative_to(ROOT)}")
        deps = ["--no-deps"]  # the lock is closed under dependencies: `make locks` checked it for this target
    else:
        print(f"no lock resolved for the {args.variant} set on {target.name}, Python {args.python_version}: the ranges")
        reqs = [f"{r.name}{r.specifier}" for r in ranges(files, env) if canonical(r.name) not in skip]
        deps = []
    out = Path(args.download)
    out.mkdir(parents=True, exist_ok=True)
    platforms = [a for p in target.wheel_platforms + ("any",) for a in ("--platform", p)]
    common = ["download", "--disable-pip-version-check", "--only-binary=:all:", "--python-version",
              args.python_version, "--implementation", "cp", *platforms, "-d", str(out)]
    for cpu_build in [r for r in reqs if "+cpu" in r]:  # not on PyPI: on PyTorch's index
        cpu_torch(sys.executable, common, cpu_build, pinned=True)
    pip(sys.executable, *common, *deps, *[r for r in reqs if "+cpu" not in r])
    total = sum(p.stat().st_size for p in out.glob("*.whl"))
    print(f"{len(list(out.glob('*.whl')))} wheels, {total / 2**20:.0f} MiB in {out}"
          + (f" (left out: {', '.join(sorted(skip))})" if skip else ""))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", default=".venv", help="where to make the environment (default .venv)")
    ap.add_argument("--lab", action="store_true", help="also install JupyterLab")
    ap.add_argument("--current-python", action="store_true",
                    help="install into the Python running this script instead of making a venv")
    ap.add_argument("--wheelhouse", help="install from this folder of wheels alone (no index)")
    ap.add_argument("--download", metavar="DIR", help="download wheels into DIR instead of installing")
    ap.add_argument("--python-version", default="3.12", help="with --download: target Python (default 3.12)")
    ap.add_argument("--target", choices=TARGETS, default="linux-x86_64",
                    help="with --download: target platform (default linux-x86_64)")
    ap.add_argument("--variant", choices=VARIANTS, default="cuda13",
                    help="with --download: which set (default cuda13, a GPU machine's)")
    ap.add_argument("--skip", nargs="*", default=[],
                    help="with --download: requirements the target already has (e.g. torch cupy-cuda13x)")
    args = ap.parse_args(argv)
    # Checked here, with the standard library alone: this runs before the course's environment exists.
    if not re.fullmatch(r"3\.\d+", args.python_version):
        ap.error(f"argument --python-version: expected a version such as 3.12, got {args.python_version!r}")
    if args.wheelhouse and not Path(args.wheelhouse).is_dir():
        ap.error(f"argument --wheelhouse: no folder {args.wheelhouse!r}")
    download(args) if args.download else install(args)


if __name__ == "__main__":
    main()
