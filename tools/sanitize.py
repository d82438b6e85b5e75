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

`make sanitize EX=03` (or 06) runs the same four tools over the learner's own kernel of exercise
03 (or 06), read from their notebook, at the grader's awkward sizes (the 32-bit index cases and
the speed, hours under the tools, are left out); nothing is recorded.

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
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from moe_course import kernels, machine, records
from moe_course.checking import CheckFailed
from moe_course.checks import positive_float, require, run_command
from moe_course.graders import ex03_naive_grouped_gemm, ex06_tiled_grouped_gemm, kernel_exercise

ROOT = Path(__file__).resolve().parent.parent
WORKLOAD = ROOT / "tools" / "sanitize_workload.py"
#: The exercises whose kernel the learner writes in CUDA C: number -> its grader's exercise
EXERCISES = {"03": ex03_naive_grouped_gemm.EXERCISE, "06": ex06_tiled_grouped_gemm.EXERCISE}
TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
EXTRA = {  # per tool: what it reports beyond the defaults
    "memcheck": ["--check-device-heap", "yes"],
    "racecheck": ["--racecheck-report", "all"],
    # initcheck does not see what cuBLAS's Hopper GEMMs write: a copy of a torch matmul's product
    # is reported as a read of uninitialised memory (3303 reports for one 4096 x 64 product), where
    # a copy of 06_3's dW (TMA stores, every value checked) is not (H100, kernels/NOTES.md, session
    # 9). The layer's router products are cuBLAS's and autograd copies them: 32 896 such reports.
    # So copies (cudaMemcpy) are not checked; every kernel's reads still are.
    "initcheck": ["--check-api-memory-access", "no"],
}
#: Notices that are no error of the course's kernels, matched exactly (a line of the tool's output):
#: cuda-bindings probes the driver for entry points it may not have (seen 34 times per run, H200).
IGNORED: tuple[str, ...] = (
    '========= Program hit CUDA_ERROR_INVALID_VALUE (error 1) due to "invalid argument" on CUDA API call '
    'to cuGetProcAddress_v2.',
)
SUMMARY = re.compile(r"========= (?:ERROR|RACECHECK) SUMMARY: (\d+) (?:errors|hazards displayed \((\d+) errors, (\d+) warnings\))")


def sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and Path(root, "bin", "compute-sanitizer").exists():
            return str(Path(root, "bin", "compute-sanitizer"))
    return None


def reports(lines: list[str]) -> list[list[str]]:
    """The tool's reports, one list of lines each: a report starts at an unindented line after
    the ========= prefix (an error, a hazard, an API notice) and runs until the next one."""
    out: list[list[str]] = []
    for line in lines:
        if not line.startswith("========= ") or "SUMMARY" in line or line.startswith("========= COMPUTE-SANITIZER"):
            continue
        if line[len("========= "):][:1].strip():
            out.append([line])
        elif out:
            out[-1].append(line)
    return out


def kernel_of(report: list[str]) -> str | None:
    """The kernel a report is about ("at NAME+0x..." in its lines), or None (an API notice). A
    C++ kernel is named by its qualified name without template arguments or parameters (torch's
    "void at::native::unrolled_elementwise_kernel<...>(int, ...)+0x830": its copy kernel)."""
    for line in report:
        if m := re.search(r"\b(?:at|in) (.+?)\+0x[0-9a-f]+", line):
            return re.split(r"[<(]", m[1].removeprefix("void ").strip(), maxsplit=1)[0]
    return None


PYTHON_FRAME = re.compile(r"Host Frame: (\w+) in ([\w.]+\.py:\d+)")


def python_frames(report: list[str], most: int = 3) -> list[str]:
    """Where in Python the reported kernel was launched: its backtrace's innermost Python frames,
    e.g. "router_logits in layer.py:89" (compute-sanitizer lists them among the host frames)."""
    return [f"{m[1]} in {m[2]}" for line in report if (m := PYTHON_FRAME.search(line))][:most]


def findings(lines: list[str], course_kernels: set[str]) -> tuple[list[list[str]], list[str]]:
    """(the reports that count: on a course kernel, or on no kernel (an API error); the other
    kernels reported on, e.g. cuBLAS's under torch's reference matmuls, each with where Python
    launched it: listed, not counted)."""
    ours, others = [], {}
    for r in reports([ln for ln in lines if ln.strip() not in IGNORED]):
        k = kernel_of(r)
        if k is None or k in course_kernels:
            ours.append(r)
        else:
            others.setdefault(k, set()).update(python_frames(r, most=1))
    return ours, sorted(k + (f" (from {', '.join(sorted(where))})" if where else "") for k, where in others.items())


def same_access_once(found: list[list[str]]) -> list[list[str]]:
    """One report per access: initcheck reports each uninitialised word of one copy separately (a
    copy of 8 KiB: 256 reports with the same first line); the first is kept, saying how many."""
    count = Counter(report[0] for report in found)
    kept: dict[str, list[str]] = {}
    for report in found:
        kept.setdefault(report[0], report)
    return [r + [f"========= ({count[first]} {SAME_ACCESS})"] * (count[first] > 1) for first, r in kept.items()]


SAME_ACCESS = "reports of this access"  # the line same_access_once adds, last in its report


def excerpt(report: list[str]) -> str:
    """What the record keeps of a report: its first lines, where Python launched the kernel, and
    how many reports of the same access it stands for."""
    count = report[-1:] if report[-1].endswith(f"{SAME_ACCESS})") else []
    return "\n".join(report[:5] + python_frames(report) + count)


def exercise_source(number: str) -> str:
    """The learner's kernel of exercise ``number``, read from ``exercises/NN_*.ipynb``."""
    notebook = next((ROOT / "exercises").glob(f"{number}_*.ipynb"), None)
    require(notebook is not None, f"exercises/{number}_*.ipynb is missing: `make exercises` makes it")
    source = kernel_exercise.source_in_notebook(notebook)
    require("YOUR CODE HERE" not in source, f"{notebook.name}: write your kernel first (it still says YOUR CODE HERE)")
    return source


def exercise_workload(number: str, source: str, folder: Path) -> tuple[list[str], set[str]]:
    """The command that runs exercise ``number``'s grader on ``source`` (its awkward cases, in the
    grader's own child process), and the kernels whose reports count: the learner's and the
    course's (its tile map)."""
    ex = EXERCISES[number]
    path = folder / f"{ex.kernel}.cu"
    path.write_text(source)
    cmd = [sys.executable, "-m", kernel_exercise.__name__, ex.module, str(path), "0", "--awkward-only"]
    return cmd, kernels.entry_points() | {ex.kernel}


def run_tool(exe: str, tool: str, timeout: float, workload: list[str], course_kernels: set[str]) -> dict:
    cmd = [exe, "--tool", tool, "--print-limit", "10000", *EXTRA.get(tool, []), *workload]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=timeout)
        output, code = (done.stdout + done.stderr).decode(errors="replace"), done.returncode
    except subprocess.TimeoutExpired as err:  # what it printed before it was stopped
        output, code = (err.stdout or b"").decode(errors="replace"), None
    seconds = time.perf_counter() - start
    lines = [ln for ln in output.splitlines() if ln.strip() not in IGNORED]
    ours, others = findings(lines, course_kernels)
    ours = same_access_once(ours)
    # the course's workload says how many kernels it launched; an exercise's grader, its verdict
    launched = next((ln for ln in lines if "kernels launched" in ln or ln.startswith('{"ok": true')), "")
    wrong = next((ln for ln in lines if ln.startswith('{"ok": false')), "")
    return {"tool": tool, "exit_code": code, "errors": len(ours) + bool(wrong), "seconds": round(seconds, 1),
            "launched": launched, "report": [wrong] * bool(wrong) + [excerpt(r) for r in ours[:50]],
            "not_the_course": others, "finished": code is not None and bool(launched or wrong),
            "tail": "\n".join(lines[-30:])}


def run_tools(exe: str, tools: list[str], timeout: float, workload: list[str], course_kernels: set[str]):
    """Each tool over the workload, said as each finishes: (the results in the order asked, whether
    any failed). The tools run side by side, each in its own process: each slows the workload 10x
    to 100x on the CPU, where they do not contend, so the run takes as long as the slowest tool
    (initcheck) instead of the sum of all four."""
    results: dict[str, dict] = {}
    failed = False
    print(f"compute-sanitizer --tool {', '.join(tools)}, side by side (each at most {timeout:.0f} s) ...", flush=True)
    with ThreadPoolExecutor(max_workers=len(tools)) as pool:
        running = {pool.submit(run_tool, exe, tool, timeout, workload, course_kernels): tool for tool in tools}
        for done in as_completed(running):
            r = results[running[done]] = done.result()
            bad = r["errors"] != 0 or not r["finished"] or r["exit_code"] not in (0, None)
            failed |= bad
            print(f"  {r['tool']}: {r['errors']} reports, {r['seconds']} s; "
                  f"{r['launched'] or 'the workload did not finish'}"
                  + (f"; reports on other kernels, not counted: {', '.join(r['not_the_course'])}"
                     if r["not_the_course"] else ""), flush=True)
            if bad:  # what was found; where the workload stopped early, also how it ended
                shown = r["report"][:10] + [r["tail"]] * (not r["finished"])
                print("\n\n".join(shown), flush=True)
    return [results[t] for t in tools], failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS), help="which tools (default: all four)")
    ap.add_argument("--timeout", type=positive_float, default=900, help="seconds per tool (default 900)")
    ap.add_argument("--no-save", action="store_true", help="do not record the result")
    ap.add_argument("--exercise", choices=sorted(EXERCISES),
                    help="check your own kernel of this exercise instead of the course's (nothing recorded)")
    args = ap.parse_args(argv)
    if args.exercise:
        try:
            source = exercise_source(args.exercise)
        except (ValueError, CheckFailed) as exc:
            print(f"make sanitize EX={args.exercise}: {exc}")
            return 1
    if not machine.has_gpu():
        print(f"make sanitize needs an NVIDIA GPU ({machine.info().why_no_gpu}): nothing to check here."
              + (f" On the CPU, `make grade EX={args.exercise}` runs your kernel thread by thread, in two orders, "
                 "bounds checked." if args.exercise else ""))
        return 0
    exe = sanitizer()
    if exe is None:
        print("make sanitize needs compute-sanitizer (part of the CUDA toolkit) on the PATH or in $CUDA_HOME/bin. "
              "Nothing checked.")
        return 0
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    with tempfile.TemporaryDirectory() as tmp:
        if args.exercise:
            workload, course_kernels = exercise_workload(args.exercise, source, Path(tmp))
        else:
            workload, course_kernels = [sys.executable, str(WORKLOAD)], kernels.entry_points()
        results, failed = run_tools(exe, args.tools, args.timeout, workload, course_kernels)
    if args.exercise:
        print(f"make sanitize EX={args.exercise}: " + ("FAILED" if failed else
              f"your kernel is clean: {', '.join(args.tools)} report nothing at the grader's awkward sizes"))
        return 1 if failed else 0
    if not args.no_save:
        launched = next((r["launched"] for r in results if r["launched"]), "")
        record = records.save("sanitize", {
            "sanitizer": version, "tools": [r["tool"] for r in results], "kernels": launched,
            "options": {tool: EXTRA.get(tool, []) for tool in args.tools},
            "errors": {r["tool"]: r["errors"] for r in results},
            "seconds": {r["tool"]: r["seconds"] for r in results},
            "passed": not failed, "reports": {r["tool"]: r["report"] for r in results if r["report"]},
            "other_kernels_reported": {r["tool"]: r["not_the_course"] for r in results if r["not_the_course"]},
        })
        print(f"recorded: {record.label()}")
    print("make sanitize: " + ("FAILED" if failed else f"clean: {', '.join(args.tools)} report nothing"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_command(main))
