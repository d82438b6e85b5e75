#!/usr/bin/env python3
"""`make sanitize`: every kernel of the course under NVIDIA's compute-sanitizer, each tool in turn.

    memcheck   out-of-bounds and misaligned accesses to global and shared memory
    racecheck  shared-memory hazards: two threads touch the same word with no ordering between
    synccheck  barriers used wrongly (a __syncthreads() not every thread reaches, bad masks)
    initcheck  reads of device memory nothing has written

The workload (tools/sanitize_workload.py) launches every kernel in kernels/ at awkward sizes
and checks its results. Any error or hazard fails the run, and the result is recorded in
benchmarks/results/sanitize__<gpu>.json (tools, kernels launched, counts, GPU, versions).
Without a GPU or without compute-sanitizer it says so and exits 0: there is nothing to check.

Filtered, by exact message only: notices that are not errors of the course's kernels (see
IGNORED). Everything else the tools print counts.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from moe_course import machine, records

ROOT = Path(__file__).resolve().parent.parent
WORKLOAD = ROOT / "tools" / "sanitize_workload.py"
TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
EXTRA = {  # per tool: what it reports beyond the defaults
    "memcheck": ["--check-device-heap", "yes"],
    "racecheck": ["--racecheck-report", "all"],
    "initcheck": ["--track-unused-memory", "no"],
}
#: Notices that are no error of the course's kernels, matched exactly (a line of the tool's output).
IGNORED: tuple[str, ...] = ()
SUMMARY = re.compile(r"========= (?:ERROR|RACECHECK) SUMMARY: (\d+) (?:errors|hazards displayed \((\d+) errors, (\d+) warnings\))")


def sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and Path(root, "bin", "compute-sanitizer").exists():
            return str(Path(root, "bin", "compute-sanitizer"))
    return None


def run_tool(exe: str, tool: str, timeout: float) -> dict:
    cmd = [exe, "--tool", tool, "--error-exitcode", "99", "--print-limit", "50", *EXTRA.get(tool, []),
           sys.executable, str(WORKLOAD)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    lines = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.strip() not in IGNORED]
    reports = [ln for ln in lines if ln.startswith("========= ") and "SUMMARY" not in ln
               and not ln.startswith("========= COMPUTE-SANITIZER")]
    summary = next((m for ln in lines if (m := SUMMARY.search(ln))), None)
    errors = int(summary[1]) if summary else None
    launched = next((ln for ln in lines if "kernels launched" in ln), "")
    return {"tool": tool, "exit_code": done.returncode, "errors": errors, "seconds": round(seconds, 1),
            "launched": launched, "report": reports[:200],
            "workload_failed": done.returncode not in (0, 99),
            "tail": "\n".join(lines[-30:])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS), help="which tools (default: all four)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per tool (default 900)")
    ap.add_argument("--no-save", action="store_true", help="do not record the result")
    args = ap.parse_args()
    if not machine.has_gpu():
        print(f"make sanitize needs an NVIDIA GPU ({machine.info().why_no_gpu}): nothing to check here.")
        return 0
    exe = sanitizer()
    if exe is None:
        print("make sanitize needs compute-sanitizer (part of the CUDA toolkit) on the PATH or in $CUDA_HOME/bin. "
              "Nothing checked.")
        return 0
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    results, failed = [], False
    for tool in args.tools:
        print(f"compute-sanitizer --tool {tool} ...", flush=True)
        r = run_tool(exe, tool, args.timeout)
        results.append(r)
        bad = r["errors"] != 0 or r["exit_code"] != 0
        failed |= bad
        print(f"  {tool}: {r['errors'] if r['errors'] is not None else '?'} errors, {r['seconds']} s; "
              f"{r['launched'] or 'workload did not finish'}")
        if bad:
            print("\n".join(r["report"][:40]) or r["tail"])
    if not args.no_save:
        kernels = next((r["launched"] for r in results if r["launched"]), "")
        record = records.save("sanitize", {
            "sanitizer": version, "tools": [r["tool"] for r in results], "kernels": kernels,
            "errors": {r["tool"]: r["errors"] for r in results},
            "seconds": {r["tool"]: r["seconds"] for r in results},
            "passed": not failed, "reports": {r["tool"]: r["report"] for r in results if r["report"]},
        })
        print(f"recorded: {record.label()}")
    print("make sanitize: " + ("FAILED" if failed else f"clean: {', '.join(args.tools)} report nothing"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
