#!/usr/bin/env python3
"""Chapter 03's measurements: what the pipeline overlaps, and what the fused gather saves.

    python benchmarks/bench_io_overlap.py                      # all parts, the four chapter 02 shapes
    python benchmarks/bench_io_overlap.py --parts pipeline --shapes qwen3-30b-a3b
    python benchmarks/bench_io_overlap.py --parts stalls       # needs Nsight Compute (ncu) and its counters

Parts:
  pipeline  03_1 with a ring of 1, 2, 3, 4 slots and 03_2 (warp-specialised), same tile: TFLOP/s,
            and from a traced run (clock64 stamps in block 0) the share of time the math waited
            for a slice that had not landed.
  gather    the same kernel on pre-permuted rows, with the gather fused into its load, and
            permute-then-GEMM (course kernel and torch); the SwiGLU epilogue against a separate
            activation pass.
  stalls    Nsight Compute's warp-stall breakdown of 03_1 with 1 slot and with 4 (Qwen3 up).

Every result is checked against a float32 reference before it is timed (exit code 1 on a wrong
result). Records benchmarks/results/io_overlap__<gpu>.json (parts measured now replace the
recorded ones; the rest are kept). Without a GPU it prints the recorded tables.
"""

import argparse
import json
import re
import shutil
import subprocess
import sys

import torch

from moe_course import configs, io_overlap, launch, machine, records
from moe_course import grouped_gemm as gg
from moe_course.checks import positive_int, run_command

KIND = "io_overlap"
SHAPES = {c.name: tuple(c.shape) for c in configs.CHAPTER02}
PARTS = ("pipeline", "gather", "stalls")
STALL_SHAPE = "qwen3-30b-a3b"
STALL_VARIANTS = {"1 slot (no overlap)": 1, "4 slots": 4}


def pipeline_table(rows) -> str:
    out = [f"{'shape':<15}{'proj':<5}{'implementation':<26}{'ms':>8}{'TFLOP/s':>9}{'math waits':>12}"]
    for r in rows:
        if "error" in r:
            out.append(f"{r['shape']:<15}{r['proj']:<5}{r['impl']:<26}  {r['error']}")
            continue
        share = r.get("trace_wait_share")  # None: too few slices traced
        waits = f"{100 * share:>11.0f}%" if share is not None else f"{'-':>12}"
        out.append(f"{r['shape']:<15}{r['proj']:<5}{r['impl']:<26}{r['ms']:>8.3f}{r['tflops']:>9.0f}{waits}")
    return "\n".join(out)


def gather_table(rows) -> str:
    out = [f"{'shape':<15}{'implementation':<40}{'ms':>8}{'TFLOP/s':>9}{'x pre-permuted':>16}"]
    base = {r["shape"]: r.get("ms") for r in rows if r["impl"] == "03_2 on pre-permuted rows"}
    for r in rows:
        if "error" in r:
            out.append(f"{r['shape']:<15}{r['impl']:<40}  {r['error']}")
            continue
        b = base.get(r["shape"])
        out.append(f"{r['shape']:<15}{r['impl']:<40}{r['ms']:>8.3f}{r['tflops']:>9.0f}"
                   f"{b / r['ms'] if b else float('nan'):>16.2f}")
    return "\n".join(out)


def stalls_table(data) -> str:
    if "skipped" in data:
        return f"warp stalls: skipped ({data['skipped']})"
    reasons = sorted({k for v in data["variants"].values() for k in v}, key=lambda k: -max(
        v.get(k, 0) for v in data["variants"].values()))
    head = f"{'stall reason (cycles per issued instruction)':<46}" + "".join(f"{k:>22}" for k in data["variants"])
    out = [head]
    for k in reasons[:12]:
        out.append(f"{k:<46}" + "".join(f"{v.get(k, 0):>22.2f}" for v in data["variants"].values()))
    return "\n".join(out)


# ----------------------------------------------------------------------------- warp stalls (ncu)

def launch_once(stages: int) -> None:
    """What ncu profiles: 03_1 with ``stages`` slots on the Qwen3 up-projection, once."""
    T, d, n, E, K = SHAPES[STALL_SHAPE]
    p = gg.make_problem(gg.expert_counts(T, E, K), d, 2 * n)
    launch.run_step(launch.pipeline_step(stages), p.x, p.w, p.offs, validate=False)
    torch.cuda.synchronize()


def measure_stalls() -> dict:
    ncu = shutil.which("ncu")
    if ncu is None:
        return {"skipped": "Nsight Compute (ncu) is not installed"}
    variants = {}
    for label, stages in STALL_VARIANTS.items():
        cmd = [ncu, "--section", "WarpStateStats", "--csv", "--page", "raw", "-k", "regex:tma_grouped_gemm",
               "-c", "1", sys.executable, __file__, "--launch-once", str(stages)]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        text = run.stdout
        if "ERR_NVGPUCTRPERM" in text + run.stderr:
            return {"skipped": "this machine does not let users read the GPU's performance counters (ERR_NVGPUCTRPERM)"}
        lines = [ln for ln in text.splitlines() if ln.startswith('"')]
        if len(lines) < 3:
            return {"skipped": f"ncu gave no metrics (exit {run.returncode}): {(run.stderr or text)[-300:]}"}
        import csv

        header, _units, values = list(csv.reader(lines[:3]))
        stalls = {}
        for name, value in zip(header, values):
            m = re.fullmatch(r"smsp__average_warps?_issue_stalled_(\w+)_per_issue_active\.ratio", name)
            if m:
                try:
                    stalls[m[1]] = float(value.replace(",", ""))
                except ValueError:
                    pass
        if not stalls:
            return {"skipped": "ncu's output had no warp-stall metrics", "columns": header[:40]}
        variants[label] = stalls
    return {"shape": STALL_SHAPE, "proj": "up", "kernel": "03_1_tma", "variants": variants,
            "metric": "smsp__average_warps_issue_stalled_<reason>_per_issue_active.ratio (ncu WarpStateStats)"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                    help="what to measure (default: all three; see above)")
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES), metavar="SHAPE",
                    help="MoE shapes for the pipeline and gather parts (default: the four of chapter 02: "
                         f"{', '.join(SHAPES)})")
    ap.add_argument("--rounds", type=positive_int, default=5,
                    help="rounds of interleaved timing (10 calls of each implementation per round; median reported)")
    ap.add_argument("--json", action="store_true", help="print the record's data as JSON instead of tables")
    ap.add_argument("--no-save", action="store_true", help="do not write the record")
    ap.add_argument("--launch-once", type=positive_int, metavar="STAGES", help=argparse.SUPPRESS)  # ncu's target
    args = ap.parse_args(argv)
    if args.launch_once:
        launch_once(args.launch_once)
        return 0

    if not machine.has_gpu():
        if (rec := records.recorded_instead(KIND)) is None:
            return 1
        data = rec.data
    else:
        old = records.load(KIND, gpu=machine.info().gpu)
        data = dict(old.data) if old else {}
        shapes = {s: SHAPES[s] for s in args.shapes}
        if "pipeline" in args.parts:
            data["pipeline"] = io_overlap.measure_pipeline(shapes, rounds=args.rounds)
        if "gather" in args.parts:
            data["gather"] = io_overlap.measure_gather(shapes, rounds=args.rounds)
        if "stalls" in args.parts:
            data["stalls"] = measure_stalls()
        data["method"] = ("checked against a float32 reference first; then CUDA-event timings, the "
                          "implementations of one problem interleaved (rounds of 10 calls each), median; "
                          "timelines from clock64 stamps of block 0 (kernels/tma.cuh, TRACE)")
        if not args.no_save:
            print(f"recorded in {records.save(KIND, data).path}", file=sys.stderr)
    if args.json:
        print(json.dumps(data, indent=1))
    else:
        for part, table in (("pipeline", pipeline_table), ("gather", gather_table), ("stalls", stalls_table)):
            if part in data:
                print(table(data[part]), end="\n\n")
    wrong = [r for part in ("pipeline", "gather") for r in data.get(part, []) if "wrong result" in r.get("error", "")]
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(run_command(main))
