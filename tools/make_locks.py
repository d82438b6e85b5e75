#!/usr/bin/env python3
"""Regenerate the locks in requirements/locks/ with uv (`make locks`; needs internet, ~1 minute).

Each requirements/locks/<variant>.in (the ranges of requirements/*.txt plus the torch build of
that set) becomes <variant>.txt through `uv pip compile --universal`: one lock for every
platform and for Python >= 3.11, its lines behind environment markers. Then every platform and
Python the set is meant for is resolved again from the lock alone, with uv's --python-platform
(which, unlike pip's --platform, evaluates the markers for the target) and --only-binary (a
package with no wheel for the target fails it). The lock must come back unchanged: nothing
missing, nothing different. What came back, with the size of each wheel, goes into
resolved.json: the proof that each platform installs, and the sizes set-up prints first.

    python tools/make_locks.py                                  # all three locks, then every platform
    python tools/make_locks.py --check                          # are the locks current? (no network)
    python tools/make_locks.py --torch-cpu-wheels /opt/wheels   # where download.pytorch.org is out of reach

torch's CPU build comes from --torch-cpu-wheels (default: PyTorch's CPU index page for torch).
A folder holding only some of its wheels still makes the lock (uv reads the metadata of one);
the platforms it has no wheel for are then resolved without torch and say so ("not_checked").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from urllib.parse import unquote, urlparse

# tools/ is on the path when this file runs as a script: setup_env holds the one definition of
# the sets, the platforms and how a lock is read.
import setup_env
from setup_env import LOCKS, RESOLVED, ROOT, TARGETS, VARIANT_TARGETS, VARIANTS, Target

PYTHON_FLOOR = "3.11"  # torch 2.13 publishes no wheels for Python 3.10
PYTHONS = ("3.11", "3.12", "3.13")  # resolved per platform; set-up installs the ranges elsewhere
TORCH_CPU_WHEELS = "https://download.pytorch.org/whl/cpu/torch/"
DIGEST = "# inputs sha256: "


def inputs(variant: str) -> list[Path]:
    """<variant>.in and every file it includes (`-r`), in order."""
    found, todo = [], [LOCKS / f"{variant}.in"]
    while todo:
        path = todo.pop(0).resolve()
        if path not in found:
            found.append(path)
            todo += [path.parent / m[1] for m in re.finditer(r"^-r\s+(\S+)", path.read_text(), re.M)]
    return found


def inputs_digest(variant: str) -> str:
    """What the lock was made from: every input's path and text, and the Python floor."""
    digest = hashlib.sha256(f"python>={PYTHON_FLOOR}\n".encode())
    for path in inputs(variant):
        digest.update(f"{path.relative_to(ROOT).as_posix()}\n".encode() + path.read_bytes())
    return digest.hexdigest()


def recorded_digest(lock: Path) -> str | None:
    for line in lock.read_text().splitlines() if lock.exists() else []:
        if line.startswith(DIGEST):
            return line[len(DIGEST):].split()[0]
    return None


def stale() -> list[str]:
    """The locks (and resolutions) that no longer match their inputs: `make locks` remakes them."""
    made = json.loads(RESOLVED.read_text())["inputs"] if RESOLVED.exists() else {}
    return [v for v in VARIANTS
            if recorded_digest(setup_env.lock_file(v)) != inputs_digest(v) or made.get(v) != inputs_digest(v)]


def uv(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "uv", *args]
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "UV_PYTHON_DOWNLOADS": "never", **(env or {})})
    except FileNotFoundError:
        sys.exit(f"{sys.executable} cannot run uv: `make locks` installs it (pip install uv)")


def failure(result: subprocess.CompletedProcess) -> str:
    """uv's reason, in one line."""
    if "No module named uv" in result.stderr:
        sys.exit(f"uv is not installed in {sys.executable}: `make locks` installs it (pip install uv)")
    causes = [line.strip() for line in result.stderr.splitlines() if line.strip().startswith(("cause:", "error:"))]
    return (causes[-1] if causes else result.stderr.strip().splitlines()[-1]).removeprefix("cause: ")


def compile_lock(variant: str, torch_cpu_wheels: str) -> None:
    lock = setup_env.lock_file(variant)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / lock.name
        extra = ["--find-links", torch_cpu_wheels] if variant == "cpu" else []
        result = uv("pip", "compile", "--universal", "--python-version", PYTHON_FLOOR,
                    "--custom-compile-command", "make locks", *extra,
                    str((LOCKS / f"{variant}.in").relative_to(ROOT)), "-o", str(out))
        if result.returncode:
            sys.exit(f"uv could not resolve {variant}.in: {failure(result)}")
        text = out.read_text()
    header, _, body = text.partition("\n#    make locks\n")
    lock.write_text(f"{header}\n#    make locks\n{DIGEST}{inputs_digest(variant)} (of {variant}.in and the files it "
                    f"includes)\n# For Python >= {PYTHON_FLOOR}; every platform it was resolved for: resolved.json\n{body}")
    print(f"{lock.relative_to(ROOT)}: {len(setup_env.read_lock(lock))} pins")


def outside_ranges(variant: str, pins: list[setup_env.Pin], env: dict) -> list[str]:
    """Every range of the set's requirement files that the lock's pins break on a machine with
    these marker values (a range with no pin at all breaks too)."""
    here = {p.name: p for p in pins if p.applies(env)}
    broken = []
    for req in setup_env.ranges(setup_env.requirement_files(variant, lab=True), env):
        pin = here.get(setup_env.canonical(req.name))
        if pin is None or not req.specifier.contains(pin.version, prereleases=True):
            broken.append(f"{req} (locked: {pin or 'nothing'})")
    return broken


def tag_rank(target: Target, python: str):
    """A wheel's rank for this platform and Python (lower is what pip would pick first)."""
    from packaging import tags
    from packaging.utils import parse_wheel_filename

    version = tuple(int(x) for x in python.split("."))
    interpreter = f"cp{version[0]}{version[1]}"
    order = [*tags.cpython_tags(version, [interpreter], target.wheel_platforms),
             *tags.compatible_tags(version, interpreter, target.wheel_platforms)]
    rank = {tag: i for i, tag in enumerate(order)}
    return lambda filename: min((rank.get(t, len(rank)) for t in parse_wheel_filename(filename)[3]), default=len(rank))


def wheel_size(wheel: dict) -> int | None:
    if "size" in wheel:
        return wheel["size"]
    url = urlparse(wheel.get("url", ""))
    return Path(unquote(url.path)).stat().st_size if url.scheme == "file" else None


def resolve(variant: str, target: Target, python: str, torch_cpu_wheels: str) -> dict:
    """The lock resolved again for one platform and Python; fails loudly if it is incomplete."""
    lock = setup_env.lock_file(variant)
    env = target.environment(python)
    expected = {p.name: p.version for p in setup_env.read_lock(lock) if p.applies(env)}
    entry = {"variant": variant, "target": target.name, "python": python}
    local_cpu_torch = variant == "cpu" and target.markers["sys_platform"] == "linux"
    with tempfile.TemporaryDirectory() as tmp:
        source, not_checked = lock, []
        for attempt in range(2):
            extra = ["--find-links", torch_cpu_wheels] if local_cpu_torch else []
            result = uv("pip", "compile", str(source), "--python-platform", target.uv_platform,
                        "--python-version", python, "--only-binary", ":all:", "--no-header", *extra,
                        "--format", "pylock.toml", "-o", str(Path(tmp) / "pylock.toml"), env=target.uv_env)
            if result.returncode == 0:
                break
            reason = failure(result)
            if attempt or not local_cpu_torch or torch_cpu_wheels == TORCH_CPU_WHEELS or "torch" not in reason:
                return {**entry, "ok": False, "reason": reason}
            # A folder with some of torch's CPU wheels: check everything else, and say so.
            not_checked = [f"torch {expected.pop('torch')}: no wheel for {target.name}, Python {python} in {torch_cpu_wheels}"]
            source = Path(tmp) / "without-torch.txt"
            source.write_text("".join(f"{p}\n" for p in setup_env.read_lock(lock) if p.name != "torch" and p.applies(env)))
        packages = tomllib.loads((Path(tmp) / "pylock.toml").read_text())["packages"]
    rank = tag_rank(target, python)
    got, sizes = {}, {}
    for pkg in packages:
        name = setup_env.canonical(pkg["name"])
        got[name] = pkg["version"]
        best = min(pkg.get("wheels", []), key=lambda w: rank(Path(urlparse(w["url"]).path).name), default=None)
        sizes[name] = wheel_size(best) if best else None
    if broken := outside_ranges(variant, setup_env.read_lock(lock), env):
        sys.exit(f"{lock.name} breaks the ranges on {target.name}, Python {python}: {'; '.join(broken)}")
    if got != expected:
        missing = sorted(set(got) - set(expected))
        differ = sorted(n for n in set(got) & set(expected) if got[n] != expected[n])
        sys.exit(f"{lock.name} is not complete for {target.name}, Python {python}: uv also needs {missing}, "
                 f"and picks other versions of {differ}. Is an input marker wrong?")
    total = sum(s or 0 for s in sizes.values())
    return {**entry, "ok": True, "packages": len(got), "download_bytes": total,
            "sizes": dict(sorted(sizes.items())), "not_checked": not_checked}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only say whether the locks match their inputs")
    ap.add_argument("--torch-cpu-wheels", default=TORCH_CPU_WHEELS,
                    help=f"where torch's CPU build is: a page or folder of wheels (default {TORCH_CPU_WHEELS})")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                    help=f"which sets to lock (default all): {', '.join(VARIANTS)}")
    args = ap.parse_args(argv)
    if args.check:
        old = stale()
        print("locks are current" if not old else f"stale: {', '.join(old)} (run `make locks`)")
        sys.exit(1 if old else 0)
    for variant in args.variants:
        compile_lock(variant, args.torch_cpu_wheels)
    record = json.loads(RESOLVED.read_text()) if RESOLVED.exists() else {"targets": []}
    targets = [t for t in record["targets"] if t["variant"] not in args.variants]
    for variant in args.variants:
        for name in VARIANT_TARGETS[variant]:
            for python in PYTHONS:
                entry = resolve(variant, TARGETS[name], python, args.torch_cpu_wheels)
                targets.append(entry)
                print(f"{variant:<7} {name:<15} Python {python}: " + (
                    f"{entry['packages']} packages, {setup_env.mib(entry['download_bytes'])}"
                    + (f" (not checked: {'; '.join(entry['not_checked'])})" if entry["not_checked"] else "")
                    if entry["ok"] else f"FAILED: {entry['reason']}"), flush=True)
    inputs_made = {**record.get("inputs", {}), **{v: inputs_digest(v) for v in args.variants}}
    RESOLVED.write_text(json.dumps({
        "about": "written by `make locks` (tools/make_locks.py): each lock resolved again for each platform and Python "
                 "with uv --python-platform --only-binary; sizes are of the wheel pip would pick there",
        "inputs": dict(sorted(inputs_made.items())),
        "targets": sorted(targets, key=lambda t: (t["variant"], t["target"], t["python"])),
    }, indent=1) + "\n")
    print(f"{RESOLVED.relative_to(ROOT)} written")


if __name__ == "__main__":
    main()
