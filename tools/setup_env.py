#!/usr/bin/env python3
"""Make (or update) the course's Python environment. Called by the Makefile; idempotent.

    python3 tools/setup_env.py                      # .venv with base + CUDA requirements
    python3 tools/setup_env.py --lab                # ... plus JupyterLab
    python3 tools/setup_env.py --current-python     # install into this Python instead of a venv
    python3 tools/setup_env.py --wheelhouse DIR     # install from DIR alone (no internet)
    python3 tools/setup_env.py --download DIR ...   # fill DIR with wheels for another machine

The CuPy, cuda-bindings and NVRTC builds must match the CUDA the driver supports: the major
version is read from `nvidia-smi` (CUDA 12 or 13), or taken from CUDA_MAJOR; with no GPU the
CUDA 13 builds are used (NVRTC still compiles kernels for sm_90a; nothing needs a driver).
A stamp file in the environment records what was installed, so a second run with nothing
changed returns at once.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQ = ROOT / "requirements"
SUPPORTED_CUDA = (12, 13)


def cuda_major() -> tuple[int, str]:
    """(major, why): from CUDA_MAJOR, else nvidia-smi's 'CUDA Version', else 13."""
    if os.environ.get("CUDA_MAJOR"):
        if os.environ["CUDA_MAJOR"] not in {str(m) for m in SUPPORTED_CUDA}:
            sys.exit(f"CUDA_MAJOR={os.environ['CUDA_MAJOR']}: the course has CuPy builds for CUDA "
                     f"{' and '.join(map(str, SUPPORTED_CUDA))} only")
        return int(os.environ["CUDA_MAJOR"]), "CUDA_MAJOR is set"
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
    return 13, "no NVIDIA driver found: CUDA 13 builds (compile-only)"


def requirement_files(major: int, lab: bool) -> list[Path]:
    files = [REQ / "base.txt", REQ / f"cuda{major}.txt"]
    return files + ([REQ / "lab.txt"] if lab else [])


def pip(python: str, *args: str) -> None:
    cmd = [python, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def source_args(wheelhouse: str | None) -> list[str]:
    return ["--no-index", "--find-links", str(Path(wheelhouse).resolve())] if wheelhouse else []


def install(args) -> None:
    major, why = cuda_major()
    files = requirement_files(major, args.lab)
    if args.current_python:
        python, stamp_dir = sys.executable, ROOT / ".setup"
    else:
        env = Path(args.venv)
        python = str(env / "bin" / "python")
        if not Path(python).exists():
            print(f"creating the environment {env} ({sys.executable}, Python {sys.version.split()[0]})")
            venv.EnvBuilder(with_pip=True).create(env)
        stamp_dir = env
    digest = hashlib.sha256()
    for f in files + [ROOT / "pyproject.toml", Path(__file__)]:
        digest.update(f.read_bytes())
    digest.update(f"{python} {major} {args.wheelhouse}".encode())
    stamp = stamp_dir / f".course-setup-{'lab' if args.lab else 'base'}"
    if stamp.exists() and stamp.read_text() == digest.hexdigest():
        print(f"environment up to date ({python}; CuPy for CUDA {major}: {why})")
        return
    print(f"installing for CUDA {major} ({why})")
    req_args = [a for f in files for a in ("-r", str(f))]
    pip(python, "install", "--disable-pip-version-check", "-q", *source_args(args.wheelhouse), *req_args)
    # The course's own package, editable: notebooks import it, and edits show up at once.
    pip(python, "install", "--disable-pip-version-check", "-q", "--no-deps", "--no-build-isolation",
        "-e", str(ROOT))
    stamp_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(digest.hexdigest())
    print(f"environment ready: {python}")


def download(args) -> None:
    """Wheels for a machine with no internet (a GPU compute node): copy DIR there, then
    `make test WHEELHOUSE=DIR` (add USE_CURRENT_PYTHON=1 where torch and CuPy are installed)."""
    major = args.cuda or cuda_major()[0]
    skip = {s.lower() for s in args.skip}
    reqs = []
    for f in requirement_files(major, args.lab):
        for line in f.read_text().splitlines():
            line = line.split("#")[0].strip()
            name = re.split(r"[<>=!~\[; ]", line)[0].lower() if line else ""
            if line and name not in skip:
                reqs.append(line)
    out = Path(args.download)
    out.mkdir(parents=True, exist_ok=True)
    platform = [a for p in args.platform for a in ("--platform", p)]
    pip(sys.executable, "download", "--disable-pip-version-check", "-q", "--only-binary=:all:",
        "--python-version", args.python_version, "--implementation", "cp", *platform,
        "-d", str(out), *reqs)
    total = sum(p.stat().st_size for p in out.glob("*.whl"))
    print(f"{len(list(out.glob('*.whl')))} wheels, {total / 2**20:.0f} MiB in {out}"
          + (f" (left out: {', '.join(sorted(skip))})" if skip else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", default=".venv", help="where to make the environment (default .venv)")
    ap.add_argument("--lab", action="store_true", help="also install JupyterLab")
    ap.add_argument("--current-python", action="store_true",
                    help="install into the Python running this script instead of making a venv")
    ap.add_argument("--wheelhouse", help="install from this folder of wheels alone (no index)")
    ap.add_argument("--download", metavar="DIR", help="download wheels into DIR instead of installing")
    ap.add_argument("--python-version", default="3.12", help="with --download: target Python (default 3.12)")
    ap.add_argument("--platform", action="append",
                    default=None, help="with --download: target platform tags (repeatable)")
    ap.add_argument("--cuda", type=int, choices=SUPPORTED_CUDA, help="with --download: target CUDA major")
    ap.add_argument("--skip", nargs="*", default=[],
                    help="with --download: requirements the target already has (e.g. torch cupy-cuda13x)")
    args = ap.parse_args()
    args.platform = args.platform or ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
                                      "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any"]
    download(args) if args.download else install(args)


if __name__ == "__main__":
    main()
