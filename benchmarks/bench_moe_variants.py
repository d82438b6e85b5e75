#!/usr/bin/env python3
"""Every implementation of the MoE layer the course has, on the same configurations: each one
checked against a float32 reference first, then timed.

    python benchmarks/bench_moe_variants.py            # GPU: the four chapter-02 shapes, under a minute
    python benchmarks/bench_moe_variants.py --quick    # any machine, a CPU too: tiny shapes, seconds
    python benchmarks/bench_moe_variants.py --configs qwen3-30b-a3b --variants layer-loop layer-grouped-mm
    python benchmarks/bench_moe_variants.py --list     # the implementations, and whether each runs here

The implementations (the registry in moe_course/variants.py; a later chapter adds one entry):
  layer-loop        chapter 01's layer: router, sort by expert, a torch.mm loop over experts, combine
  layer-grouped-mm  the same layer, its expert step as three torch._grouped_mm calls
  layer-course      the same layer, its expert step the course's kernels (chapter 03: gathered
                    up-projection with SwiGLU fused, warp-specialised down-projection; Hopper)
  sonicmoe          SonicMoE's layer, given the same weights (where `import sonicmoe` works)
  gemm-ladder       the expert GEMMs alone, every step of the chapter 02-03 kernel ladder beside a
                    per-expert torch.mm loop and torch._grouped_mm (GPU only)
An implementation that cannot run here is skipped with one line saying why.

Layers run forward only (inference), in bf16, and are checked against a float32 reference of
the same routing (relative error below 2e-2); the GEMM steps against a float32 per-expert
product (below 1e-2). A result that fails its check is reported and never timed. Rates count
the expert GEMMs' FLOPs only (a layer: 6 T K d n), so a layer's routing and sorting show as a
lower rate than its GEMMs alone reach.

Prints a table (ms, TFLOP/s, % of this GPU's recorded dense bf16 rate, speed-up over the torch
loop of the same scope), records benchmarks/results/moe_variants__<gpu>.json (--quick:
benchmarks/scratch/moe_variants_quick__<gpu or cpu>.json, never beside the recorded results) and
draws a bar chart next to it (.png).
Without a GPU and without --quick it prints what was recorded on a GPU, labelled with the GPU
and the date, or says that nothing is recorded.

Exit code: 0; 1 if an implementation gave a wrong result or failed while being checked;
2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # a script: the chart goes to a file, never to a window

from tqdm import tqdm

from moe_course import RESULTS_DIR, SCRATCH_DIR, ceilings, configs, machine, records
from moe_course import variants as registry
from moe_course.checks import argument_type, nonnegative_int, positive_int, run_command

KIND = "moe_variants"
QUICK_KIND = "moe_variants_quick"
#: --quick: tiny layers, seconds on a CPU. d a multiple of 64 and 2n, d multiples of 256, so that
#: every step of chapter 02's ladder takes them too when --quick runs on a GPU.
QUICK_SHAPES = {
    "tiny-8x2": configs.MoEShape(T=256, d=256, n=128, E=8, K=2),
    "tiny-32x4": configs.MoEShape(T=512, d=512, n=128, E=32, K=4),
}
REPS, QUICK_REPS = 20, 5
FAILED = ("wrong", "error")


# ----------------------------------------------------------------------------------------------
# The table and the chart
# ----------------------------------------------------------------------------------------------

def table(rows: list[dict], matmul_tflops: float | None = None) -> str:
    """Rows grouped by configuration; a failed or refused row says why instead of a time."""
    loops = {(r["config"], r["scope"]): r["tflops"] for r in rows
             if r["impl"] == "torch loop" and r.get("status") == "ok"}
    head = (f"  {'scope':<15}{'implementation':<26}{'ms':>10}{'TFLOP/s':>9}{'% dense':>9}"
            f"{'vs loop':>9}{'rel err':>9}")
    blocks = []
    for r in rows:
        if not blocks or r["config"] != blocks[-1][0]:
            blocks.append((r["config"], [f"{r['config']} (T={r['T']}, d={r['d']}, n={r['n']}, E={r['E']}, "
                                         f"K={r['K']})", head]))
        lead = f"  {r['scope']:<15}{r['impl']:<26}"
        if r.get("status") != "ok":
            blocks[-1][1].append((lead + f"{r.get('status', '?').upper()}: {r.get('note', '')}")[:140])
            continue
        dense = f"{100 * r['tflops'] / matmul_tflops:>8.0f}%" if matmul_tflops else f"{'-':>9}"
        loop = loops.get((r["config"], r["scope"]))
        blocks[-1][1].append(lead + f"{r['ms']:>10.3f}{r['tflops']:>9.3g}{dense}"
                             + (f"{r['tflops'] / loop:>9.2f}" if loop else f"{'-':>9}")
                             + f"{r.get('rel_err', float('nan')):>9.1e}")
    notes = ("vs loop: TFLOP/s over those of the torch loop of the same scope (the layer's, or the GEMM's).\n"
             "% dense: of this GPU's recorded dense bf16 matmul rate (benchmarks/ceilings.py, chapter 00).")
    return "\n\n".join(["\n".join(lines) for _, lines in blocks] + [notes])


def plot(record: records.Record, live: bool, path: Path) -> Path:
    """TFLOP/s (GFLOP/s when tiny) of every implementation that passed, per configuration."""
    import matplotlib.pyplot as plt

    from moe_course import plotting

    rows = [r for r in record.data["rows"] if r.get("status") == "ok"]
    cats = list(dict.fromkeys(r["config"] for r in record.data["rows"]))
    series = list(dict.fromkeys((r["scope"], r["impl"]) for r in rows))
    giga = max((r["tflops"] for r in rows), default=0) < 1  # a CPU's tiny shapes
    value = {(r["config"], r["scope"], r["impl"]): r["tflops"] * (1e3 if giga else 1) for r in rows}
    fig, ax = plt.subplots(figsize=(max(7.0, 0.32 * len(series) * len(cats) + 3), 4.5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # a dozen series: tab10 would repeat colours
    plotting.grouped_bars(
        cats, {f"{scope}: {impl}": [value.get((c, scope, impl), math.nan) for c in cats] for scope, impl in series},
        ylabel=f"{'GFLOP/s' if giga else 'TFLOP/s'} (expert GEMM FLOPs / time)", record=record, live=live,
        ceiling=None if giga else record.data.get("matmul_tflops"), ceiling_label="dense bf16 matmul (measured)",
        title="MoE implementations, checked then timed (bf16; layers: forward pass)", ax=ax)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench_moe_variants.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", type=argument_type(configs.by_name), metavar="NAME",
                    help="MoE configurations to measure (moe_course/configs.py): "
                         f"{', '.join(configs.names())}; default: the four of chapter 02 "
                         f"({', '.join(c.name for c in configs.CHAPTER02)})")
    ap.add_argument("--tokens", type=positive_int, metavar="T",
                    help="tokens per batch instead of each configuration's own (e.g. fewer, for a smaller GPU)")
    ap.add_argument("--variants", nargs="+", choices=list(registry.REGISTRY), metavar="NAME",
                    help=f"implementations to run, in table order (default: all): {', '.join(registry.REGISTRY)}")
    ap.add_argument("--proj", nargs="+", choices=["up", "down"], default=["up"],
                    help="for gemm-ladder: which expert GEMMs to time, the up-projection X[T*K, d] x W1[d, 2n] "
                         "and/or the down-projection A[T*K, n] x W2[n, d] (default: up)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny shapes (" + "; ".join(f"{k} {v}" for k, v in QUICK_SHAPES.items())
                         + f") and {QUICK_REPS} timed calls: runs in seconds, on a CPU too; recorded as "
                           f"'{QUICK_KIND}', never mistaken for full-size results")
    ap.add_argument("--reps", type=positive_int,
                    help=f"timed calls per layer, after warm-up; the median is reported (default {REPS}, "
                         f"--quick {QUICK_REPS}; the GEMM ladder picks its own, about 200 ms of calls each)")
    ap.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the random tokens and weights (default 0)")
    ap.add_argument("--results-dir", type=Path, metavar="DIR",
                    help="where the JSON record (and the chart) go, and where recorded results are read "
                         "from (default: benchmarks/results; --quick: benchmarks/scratch)")
    ap.add_argument("--no-save", action="store_true", help="do not write the JSON record")
    ap.add_argument("--plot", type=Path, metavar="PATH",
                    help="write the chart here (default: next to the record, same name, .png)")
    ap.add_argument("--no-plot", action="store_true", help="draw no chart")
    ap.add_argument("--json", action="store_true",
                    help="print the record (environment and rows) as JSON on stdout instead of the table; "
                         "the one-line notes go to stderr")
    ap.add_argument("--list", action="store_true",
                    help="list the implementations and whether each can run on this machine, then exit")
    return ap


def _list(say) -> int:
    device = "cuda" if machine.has_gpu() else "cpu"
    for name, v in registry.REGISTRY.items():
        why = v.unavailable(device)
        say(f"{name:<18} {v.title}\n{'':<18} {'runs here' if why is None else 'skipped here: ' + why}")
    return 0


def _show_recorded(args, say) -> int:
    """No GPU and no --quick: the record of a GPU run, if there is one, labelled."""
    say(f"{machine.skip_reason()} (timing the full-size configurations needs a GPU; --quick runs tiny ones here)")
    rec = records.load(KIND, results_dir=args.results_dir)
    if rec is None:
        say(f"No '{KIND}' results are recorded in {args.results_dir}: run this on a GPU to record them.")
        if records.load("grouped_gemm", results_dir=args.results_dir) is not None:
            say("(chapter 02's GEMM ladder alone is recorded: python benchmarks/bench_grouped_gemm.py shows it)")
        return 0
    if args.json:
        print(json.dumps({"kind": rec.kind, "environment": rec.environment, "data": rec.data,
                          "path": str(rec.path), "live": False}, indent=1))
    else:
        print(f"Recorded on {rec.label()}:")
        for name, why in rec.data.get("skipped", {}).items():
            print(f"{name}: skipped there: {why}")
        print(table(rec.data["rows"], rec.data.get("matmul_tflops")))
        if rec.data.get("note"):
            print("Note:", rec.data["note"])
    if args.plot:
        say(f"chart: {plot(rec, False, args.plot)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    args.results_dir = args.results_dir or (SCRATCH_DIR if args.quick else RESULTS_DIR)
    if args.quick and (args.configs or args.tokens):
        ap.error("--quick measures its own tiny shapes: leave out --configs and --tokens, or --quick")
    say = (lambda text: print(text, file=sys.stderr)) if args.json else print

    if args.list:
        return _list(say)
    if not args.quick and not machine.has_gpu():
        return _show_recorded(args, say)

    device = "cuda" if machine.has_gpu() else "cpu"
    if args.quick:
        shapes = dict(QUICK_SHAPES)
    else:
        chosen = args.configs or list(configs.CHAPTER02)
        shapes = {c.name: (c.with_tokens(args.tokens) if args.tokens else c).shape for c in chosen}
    reps = args.reps or (QUICK_REPS if args.quick else REPS)
    cases = [registry.Case(name, shape, device=device, reps=reps, warmup=1 if args.quick else 3,
                           projections=tuple(args.proj), seed=args.seed) for name, shape in shapes.items()]

    wanted = [registry.REGISTRY[n] for n in (args.variants or registry.REGISTRY)]
    skipped = {v.name: why for v in wanted if (why := v.unavailable(device)) is not None}
    for name, why in skipped.items():
        say(f"{name}: skipped: {why}")
    running = [v for v in wanted if v.name not in skipped]

    bar = tqdm(total=sum(v.count(c) for c in cases for v in running), desc="MoE variants", unit="run",
               file=sys.stderr, disable=None, leave=False)
    rows = []
    for case in cases:
        for v in running:
            done = bar.n

            def progress(label: str) -> None:
                bar.set_postfix_str(label[:60])
                bar.update()

            rows += v.run(case, progress)
            bar.update(max(0, done + v.count(case) - bar.n))  # entries may skip some of their steps
        case.release()
    bar.close()

    roof = ceilings.recorded(gpu=machine.info().gpu) if device == "cuda" else None
    data = {"rows": rows, "skipped": skipped, "quick": args.quick, "dtype": "bfloat16", "device": device,
            "configs": {name: shape.as_dict() for name, shape in shapes.items()},
            "matmul_tflops": roof.matmul_tflops if roof else None,
            "method": ("median of timed calls after warm-up (CUDA events on a GPU, perf_counter on a CPU); "
                       "each implementation checked against a float32 reference before timing; layers: "
                       "forward pass, no autograd; rates count the expert GEMMs' FLOPs only")}
    kind = QUICK_KIND if args.quick else KIND
    rec = (records.Record(kind, records.environment(), data) if args.no_save
           else records.save(kind, data, results_dir=args.results_dir))

    if args.json:
        print(json.dumps({"kind": rec.kind, "environment": rec.environment, "data": rec.data,
                          "path": str(rec.path) if rec.path else None, "live": True}, indent=1))
    else:
        print(f"Measured on {rec.label()}" + (" (--quick: tiny shapes)" if args.quick else ""))
        print(table(rows, data["matmul_tflops"]))
    if rec.path:
        say(f"recorded in {rec.path}")
    chart = args.plot or (rec.path.with_suffix(".png") if rec.path else None)
    if chart and not args.no_plot and rows:
        say(f"chart: {plot(rec, True, chart)}")

    failed = [r for r in rows if r.get("status") in FAILED]
    for r in failed:
        print(f"bench_moe_variants.py: {r['variant']} ({r['impl']}, {r['scope']}) on {r['config']}: "
              f"{r.get('note', r['status'])}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_command(main))
