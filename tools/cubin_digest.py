#!/usr/bin/env python3
"""Fingerprints of every kernel build the course compiles: proof that a change to ``kernels/``
that should not change the compiled code (a refactor, a comment) left it byte for byte the same.

    python tools/cubin_digest.py                 # compare with the record; exit 1 on any difference
    python tools/cubin_digest.py --write         # record this tree's fingerprints (installed NVRTC)
    python tools/cubin_digest.py --against DIR   # compare with another kernels/ folder instead
    python tools/cubin_digest.py --dump DIR      # also write each build's PTX and cubin into DIR

A build is one ``kernels/*.cu`` file with the ``-D`` defines a launcher passes (``BUILDS``).
Each is compiled twice with NVRTC for ``sm_90a``, no GPU needed, with the options the course
itself uses:

- ``report``: those of ``moe_course.kernels.compile_report`` (what a laptop reads), without
  ``-lineinfo``: line info records each instruction's source line and the absolute path of
  ``kernels/``, so a line moved in a comment, or another checkout, would change the bytes;
- ``gpu``: those of ``moe_course.kernels.load`` plus what CuPy's ``RawModule`` adds on a Hopper
  GPU (``CUPY_ADDS``): the code that runs.

The record (``kernels/cubin_digest.json``) keeps, per NVRTC version, CUDA headers and
architecture, each build's cubin sha256 and size, its PTX sha256, and its ``extern "C"`` entry
points with their parameter types (read from the PTX). A cubin is the same when its sha256 is.
A deliberate change to a kernel's code is recorded again with ``--write`` in the same commit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout: the course's own package

from moe_course import KERNELS_DIR, kernels, machine  # noqa: E402
from moe_course.checks import existing_dir  # noqa: E402

RECORD = KERNELS_DIR / "cubin_digest.json"
ARCH = kernels.DEFAULT_ARCH
# Launcher defines beyond "as the file stands": moe_course.launch's Step.defines (02_6's tile and ring),
# launch.pipeline_step (03_1 with 1-4 slots) and io_overlap.trace_timeline (TRACE = 256
# slices, on 03_1's pipeline steps and 03_2). tests/test_cubin_digest.py checks that every Step
# of moe_course is covered.
TRACE_SLICES = 256
VARIANTS: dict[str, list[dict]] = {
    "02_6_persistent": [{"BN": 256}, {"STAGES": 6}],
    "03_1_tma": [{"STAGES": s} for s in (1, 2, 3, 4)] + [{"STAGES": s, "TRACE": TRACE_SLICES} for s in (1, 2, 3, 4)],
    "03_2_warp_specialized": [{"TRACE": TRACE_SLICES}],
    "07_2_fp8_grouped_gemm": [{"BN": 256}],  # launch.FP8_GEMM_WIDE, 128 x 256 tiles
    "09_1_decode_swap_ab": [{"SLOTS": c} for c in (8, 16, 32, 128, 256)],  # the file's own: 64
    "09_2_decode_slot_chunks": [{"SLOTS": c} for c in (8, 16, 32, 128, 256)]  # the file's own: 64
    + [{"SLOTS": c, "CHUNK": 64} for c in (128, 256)],  # launch.DECODE_WIDE_CHUNK_STEPS
    "09_3_decode_slot_split": [{"CAPACITY": 128}],  # launch.DECODE_SPLIT_STEPS; the file's own: 256
}
CUPY_ADDS = ("-ftz=true", "--device-as-default-execution-space")  # cupy.cuda.compiler, NVRTC path
# (CuPy also appends -arch=sm_90 after the course's -arch=sm_90a; NVRTC keeps the first: same bytes.)
OPTION_SETS = {"report": ("-Xptxas=-v",), "gpu": CUPY_ADDS}


def build_name(source: str, defines: dict) -> str:
    """``"02_6_persistent.cu[BN=256]"``: the file and its defines, as ``Step.name`` writes them."""
    return source + "".join(f"[{k}={v}]" for k, v in sorted(defines.items()))


def builds(kernels_dir: Path = KERNELS_DIR) -> dict[str, tuple[str, dict]]:
    """Every build: each ``.cu`` file as it stands, then the defines its launchers pass."""
    files = sorted(p.name for p in kernels_dir.glob("*.cu"))
    if not files:
        raise FileNotFoundError(f"no .cu file in {kernels_dir}")
    out = {}
    for name in files:
        for defines in [{}] + VARIANTS.get(name.removesuffix(".cu"), []):
            out[build_name(name, defines)] = (name, defines)
    return out


def options(kernels_dir: Path, defines: dict, option_set: str) -> tuple[str, ...]:
    """The course's own options (``kernels.nvrtc_options``), with ``-I`` pointed at ``kernels_dir``."""
    course = kernels.nvrtc_options(ARCH, defines, OPTION_SETS[option_set])
    return tuple(f"-I{kernels_dir}" if o == f"-I{KERNELS_DIR}" else o for o in course)


def _printable(opts: tuple[str, ...], kernels_dir: Path) -> list[str]:
    """Options without this machine's paths, for the record."""
    where = {f"-I{kernels_dir}": "-I<kernels>", f"-I{kernels.cuda_include_dir()}": "-I<cuda headers>"}
    return [where.get(o, o) for o in opts]


def compile_nvrtc(code: str, name: str, opts: tuple[str, ...]) -> tuple[bytes, bytes]:
    """(cubin, PTX) of one source; a compile error is raised with NVRTC's log."""
    out = kernels.nvrtc_compile(kernels.Source(name, code), opts)
    if not out.ok:
        raise kernels.CompileError(f"{name} does not compile:\n{out.log}")
    return out.cubin, out.ptx.encode()


_ENTRY = re.compile(r"\.entry\s+(\w+)\s*\(([^)]*)\)")
_PARAM = re.compile(r"\.param\s+(.*?)\s+\w+(\[\d+\])?\s*$")


def entry_points(ptx: str) -> list[str]:
    """Each kernel's name and parameter types, from the PTX: ``k(.u64, .align 64 .b8[128])``."""
    out = []
    for name, params in _ENTRY.findall(ptx):
        types = ["".join(filter(None, _PARAM.match(p.strip()).groups())) for p in params.split(",") if p.strip()]
        out.append(f"{name}({', '.join(types)})")
    return sorted(out)


def fingerprint(build: str, source: str, defines: dict, kernels_dir: Path, dump: Path | None = None) -> dict:
    """One build's fingerprint under each option set."""
    code = (kernels_dir / source).read_text()
    result: dict = {}
    for option_set in OPTION_SETS:
        cubin, ptx = compile_nvrtc(code, source, options(kernels_dir, defines, option_set))
        result[option_set] = {"cubin_sha256": hashlib.sha256(cubin).hexdigest(), "cubin_bytes": len(cubin),
                              "ptx_sha256": hashlib.sha256(ptx).hexdigest()}
        result["entries"] = entry_points(ptx.decode())
        if dump:
            (dump / f"{build}.{option_set}.ptx").write_bytes(ptx)
            (dump / f"{build}.{option_set}.cubin").write_bytes(cubin)
    return result


def record_key() -> str:
    """What the bytes depend on besides the sources: the compiler, its headers, the target."""
    nvrtc = machine.nvrtc_version()
    if nvrtc is None:
        raise RuntimeError("no NVRTC here (cuda-bindings and nvidia-cuda-nvrtc): run `make setup`")
    return f"NVRTC {nvrtc}, CUDA headers {cuda_headers_version()}, {ARCH}"


def cuda_headers_version() -> str:
    """CUDART_VERSION of the cuda_runtime_api.h the kernels are compiled against (13000: 13.0)."""
    inc = kernels.cuda_include_dir()
    if inc is None:
        raise RuntimeError("no CUDA headers found (nvidia-cuda-runtime or a CUDA toolkit): run `make setup`")
    m = re.search(r"#define\s+CUDART_VERSION\s+(\d+)", Path(inc, "cuda_runtime_api.h").read_text())
    return m.group(1) if m else "unknown"


def digest(kernels_dir: Path = KERNELS_DIR, only: list[str] | None = None, dump: Path | None = None,
           workers: int | None = None) -> dict:
    """Every build's fingerprint (``only``: those builds), compiled side by side (NVRTC runs
    without holding Python's GIL, so threads are enough)."""
    every = builds(kernels_dir)
    unknown = sorted(set(only or []) - set(every))
    if unknown:
        raise ValueError(f"no build named {', '.join(unknown)}; the builds are: {', '.join(every)}")
    chosen = {b: every[b] for b in (only or every)}
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
    workers = workers or min(len(chosen), os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        jobs = {b: pool.submit(fingerprint, b, src, defs, kernels_dir, dump) for b, (src, defs) in chosen.items()}
        return {b: job.result() for b, job in jobs.items()}


def compare(recorded: dict, now: dict) -> list[str]:
    """One line per build that differs from the record (empty: all byte-identical)."""
    lines = []
    for build in sorted(set(recorded) | set(now)):
        if build not in now:
            lines.append(f"{build}: recorded, but not built now (file or variant gone)")
            continue
        if build not in recorded:
            lines.append(f"{build}: built now, not in the record")
            continue
        old, new = recorded[build], now[build]
        for option_set in OPTION_SETS:
            a, b = old[option_set], new[option_set]
            if a["cubin_sha256"] != b["cubin_sha256"]:
                ptx = "PTX the same" if a["ptx_sha256"] == b["ptx_sha256"] else "PTX differs"
                lines.append(f"{build} ({option_set}): cubin differs, {a['cubin_bytes']} -> {b['cubin_bytes']} "
                             f"bytes, {ptx}")
        if old["entries"] != new["entries"]:
            lines.append(f"{build}: entry points differ: {old['entries']} -> {new['entries']}")
    return lines


def load_record(path: Path = RECORD) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _commit() -> str:
    """The commit the sources are at, '+changes' when the kernels differ from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short=12", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--", "kernels/*.cu", "kernels/*.cuh") else "")


def write(path: Path = RECORD) -> dict:
    """Record this tree's fingerprints under this machine's NVRTC (other NVRTCs' records kept)."""
    record = load_record(path)
    key = record_key()
    record[key] = {
        "made_at": _commit(),
        "options": {s: _printable(options(KERNELS_DIR, {}, s), KERNELS_DIR) for s in OPTION_SETS},
        "builds": digest(),
    }
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record[key]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="record this tree's fingerprints for the installed NVRTC")
    ap.add_argument("--kernels", type=existing_dir, default=KERNELS_DIR, metavar="DIR",
                    help="compile the sources of another kernels/ folder")
    ap.add_argument("--only", nargs="+", metavar="BUILD", help="these builds only (e.g. 03_3_gather.cu)")
    ap.add_argument("--dump", type=Path, metavar="DIR", help="write each build's PTX and cubin into DIR")
    ap.add_argument("--against", type=existing_dir, metavar="DIR", help="compare with the sources of another kernels/ folder "
                    "compiled now (e.g. a checkout of the commit before a change) instead of the record")
    args = ap.parse_args(argv)
    try:
        known = builds(args.kernels)
    except FileNotFoundError as exc:
        ap.error(f"argument --kernels: {exc}")
    if unknown := [b for b in args.only or [] if b not in known]:
        ap.error(f"argument --only: no build named {', '.join(unknown)}; the builds are: {', '.join(known)}")
    if args.write:
        if args.kernels != KERNELS_DIR or args.only or args.against:
            ap.error("--write records all of this checkout's kernels/: no --kernels, --only or --against")
        made = write()
        print(f"recorded {len(made['builds'])} builds under '{record_key()}' in {RECORD.relative_to(ROOT)}")
        return 0
    key = record_key()
    if args.against:
        baseline, what = digest(args.against.resolve(), args.only), f"the sources in {args.against}"
    else:
        recorded = load_record().get(key)
        if recorded is None:
            print(f"no record for '{key}' in {RECORD.relative_to(ROOT)}: nothing to compare with (record one "
                  "from an unchanged tree with --write, or compare two trees with --against)")
            return 2
        baseline = {b: v for b, v in recorded["builds"].items() if not args.only or b in args.only}
        what = f"the record made at {recorded['made_at']}"
    now = digest(args.kernels.resolve(), args.only, args.dump)
    diffs = compare(baseline, now)
    print(f"{len(now)} builds x {len(OPTION_SETS)} option sets ({', '.join(OPTION_SETS)}), {key}, against {what}:")
    for build in now:
        bad = [d for d in diffs if d.startswith(build + ":") or d.startswith(build + " (")]
        sizes = "/".join(str(now[build][s]["cubin_bytes"]) for s in OPTION_SETS)
        print(f"  {build:<44} {'DIFFERENT' if bad else 'identical':<10} cubin {sizes} B  "
              f"{now[build]['report']['cubin_sha256'][:12]}")
    for line in diffs:
        print("  " + line)
    print("all byte-identical" if not diffs else f"{len(diffs)} difference(s)")
    return 1 if diffs else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, RuntimeError) as exc:  # bad input, no NVRTC: one clear line
        sys.exit(f"cubin_digest: {exc}")
