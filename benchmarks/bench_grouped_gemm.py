#!/usr/bin/env python3
"""Chapter 02's ladder on real MoE shapes: every step checked against a float32 reference,
then timed, beside a per-expert torch.mm loop and torch._grouped_mm (CUTLASS).

    python benchmarks/bench_grouped_gemm.py                   # all shapes, up + down, uniform + skewed
    python benchmarks/bench_grouped_gemm.py --shapes qwen3-30b-a3b --proj up --routing uniform
    python benchmarks/bench_grouped_gemm.py --impls 02_5_wgmma "torch._grouped_mm"

Prints a table (TFLOP/s, % of the measured dense bf16 rate, ratio to torch._grouped_mm and to
the loop) and records it as benchmarks/results/grouped_gemm__<gpu>.json. Exit code 1 if any
implementation gave a wrong result. Needs a GPU; without one it prints the recorded table.
"""

import argparse
import sys

from tqdm import tqdm

from moe_course import ceilings, configs, grouped_gemm, machine, records
from moe_course.checks import run_command

KIND = "grouped_gemm"
# (T tokens, d model, n expert hidden, E experts, K top-k): the shapes of COURSE.md's anchors
SHAPES = {c.name: tuple(c.shape) for c in configs.CHAPTER02}
ROUTINGS = {"uniform": 0.0, "skewed": 0.5}


def table_order(row) -> tuple:
    """Shapes as in SHAPES, then routing, projection and implementation in teaching order."""
    impls = grouped_gemm.IMPLEMENTATIONS
    return (list(SHAPES).index(row["shape"]) if row["shape"] in SHAPES else len(SHAPES),
            list(ROUTINGS).index(row["routing"]), ["up", "down"].index(row["proj"]),
            impls.index(row["impl"]) if row["impl"] in impls else len(impls))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES), metavar="SHAPE",
                    help=f"MoE shapes (default all): {', '.join(SHAPES)}")
    ap.add_argument("--proj", nargs="+", choices=["up", "down"], default=["up", "down"])
    ap.add_argument("--routing", nargs="+", choices=list(ROUTINGS), default=list(ROUTINGS),
                    help="uniform: random router logits; skewed: logits biased towards a few experts")
    ap.add_argument("--impls", nargs="+", choices=grouped_gemm.IMPLEMENTATIONS, default=None, metavar="IMPL",
                    help=f"implementations (default all): {', '.join(grouped_gemm.IMPLEMENTATIONS)}")
    ap.add_argument("--no-save", action="store_true", help="do not write the record")
    ap.add_argument("--merge", action="store_true",
                    help="keep this GPU's recorded rows for what this run does not measure (default: replace the record)")
    args = ap.parse_args(argv)

    if not machine.has_gpu():
        if (rec := records.recorded_instead(KIND)) is None:
            return 1
        print(grouped_gemm.ladder_table(rec.data["rows"], rec.data["matmul_tflops"]))
        return 0

    roof = ceilings.for_this_machine()
    shapes = {s: SHAPES[s] for s in args.shapes}
    n_runs = len(shapes) * len(args.proj) * len(args.routing) * len(
        args.impls or grouped_gemm.IMPLEMENTATIONS)
    bar = tqdm(total=n_runs, desc="grouped GEMM", file=sys.stderr)

    def progress(label):
        bar.set_postfix_str(label)
        bar.update()

    kept = []
    if args.merge and (old := records.load(KIND, gpu=machine.info().gpu)) is not None:
        kept = old.data["rows"]

    def record(rows):  # saved after every row, so an interrupted run keeps what it measured
        new = {(r["shape"], r["proj"], r["routing"], r["impl"]) for r in rows}
        rows = sorted([r for r in kept if (r["shape"], r["proj"], r["routing"], r["impl"]) not in new] + rows,
                      key=table_order)
        data = {"rows": rows, "matmul_tflops": roof.matmul_tflops, "copy_tbps": roof.copy_tbps,
                "routings": ROUTINGS, "method": "median of CUDA-event timings after warm-up; correctness "
                "checked against a float32 per-expert reference before timing"}
        return None if args.no_save else records.save(KIND, data)

    rows = grouped_gemm.measure_ladder(shapes, args.proj, [(r, ROUTINGS[r]) for r in args.routing],
                                       args.impls, progress=progress, on_row=record)
    bar.close()
    rec = record(rows)
    if rec:
        print(f"recorded in {rec.path}", file=sys.stderr)
        rows = rec.data["rows"]
    print(grouped_gemm.ladder_table(rows, roof.matmul_tflops))
    return 1 if any("wrong result" in r.get("error", "") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(run_command(main))
