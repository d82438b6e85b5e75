#!/usr/bin/env python3
"""Chapter 04's kernel time: the grouped GEMM on plain top-K routing against tile-aware token
rounding, on the paper's shape (T=16384, d=4096, n=1024, E=256, K=4) and DeepSeek-V3's.

    python benchmarks/bench_token_rounding.py                       # everything (a minute or two)
    python benchmarks/bench_token_rounding.py --shapes sonicmoe-tr --methods top-K nearest
    python benchmarks/bench_token_rounding.py --impls "torch._grouped_mm" --skew 0.5

First the routing kernels (kernels/04_1_token_rounding.cu) are checked against the torch version
on the awkward cases, field by field (exit code 1 on any difference). Then, per shape, one
synthetic router is routed by each method on the GPU, and each projection's grouped GEMM
(chapter 02's best step and torch._grouped_mm) is checked against a float32 reference and timed
on that routing's rows; the routing's own time is timed too. Prints the table with the speed-ups
over top-K beside the paper's "up to 1.16x", and records it as
benchmarks/results/token_rounding_speed__<gpu>.json. Without a GPU it prints the recorded table.
"""

import argparse
import sys

from tqdm import tqdm

from moe_course import grouped_gemm, launch, machine, records
from moe_course import token_rounding as tr
from moe_course.checking import CheckFailed
from moe_course.checks import nonnegative_float, positive_int, run_command

KIND = tr.SPEED_KIND


def check_kernels() -> list[str]:
    """Every awkward case and routing method: kernels against torch. Returns the failures."""
    failures = []
    for name, (scores, k, tile) in tr.awkward_cases(device="cuda").items():
        for method in tr.ROUTINGS:
            try:
                tr.check_kernel(scores, k, tile, method, label=name)
            except CheckFailed as err:
                failures.append(str(err))
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", choices=list(tr.SPEED_SHAPES), default=list(tr.SPEED_SHAPES),
                    metavar="SHAPE", help=f"shapes (default both): {', '.join(tr.SPEED_SHAPES)}")
    ap.add_argument("--methods", nargs="+", choices=list(tr.SPEED_METHODS), default=list(tr.SPEED_METHODS),
                    help="routings to time (top-K is the baseline of the speed-ups)")
    ap.add_argument("--impls", nargs="+", choices=grouped_gemm.IMPLEMENTATIONS,
                    default=[launch.BEST, "torch._grouped_mm"], metavar="IMPL",
                    help=f"grouped GEMMs (default {launch.BEST} and torch._grouped_mm): any of "
                         f"{', '.join(grouped_gemm.IMPLEMENTATIONS)}")
    ap.add_argument("--proj", nargs="+", choices=["up", "down"], default=["up", "down"])
    ap.add_argument("--tile", type=positive_int, default=tr.DEFAULT_TILE,
                    help=f"rounding tile (default {tr.DEFAULT_TILE}: the kernels' M tile)")
    ap.add_argument("--skew", type=nonnegative_float, default=0.0,
                    help="router skew, >= 0 (0: random logits, as the paper)")
    ap.add_argument("--no-save", action="store_true", help="do not write the record")
    args = ap.parse_args(argv)

    if not machine.has_gpu():
        print(machine.skip_reason(), "(checking and timing the kernels)")
        rec = records.load(KIND)
        if rec is None:
            print(f"no recorded '{KIND}' results yet: run this on a GPU")
            return 0
        print(f"recorded on {rec.label()}")
        print(tr.speed_table(rec.data["rows"]))
        return 0

    failures = check_kernels()
    for f in failures:
        print("MISMATCH:", f, file=sys.stderr)
    if failures:
        print(f"{len(failures)} routing cases differ from the torch version: nothing timed", file=sys.stderr)
        return 1
    print(f"routing kernels identical to the torch version on {len(tr.awkward_cases())} awkward cases "
          f"x {len(tr.ROUTINGS)} methods", file=sys.stderr)
    bar = tqdm(desc="token rounding", file=sys.stderr)

    def progress(label):
        bar.set_postfix_str(label)
        bar.update()

    methods = ["top-K"] + [m for m in args.methods if m != "top-K"]  # the baseline is always measured
    rows = tr.measure_speed({s: tr.SPEED_SHAPES[s] for s in args.shapes}, methods, args.impls, args.proj,
                            tile=args.tile, skew=args.skew, progress=progress)
    bar.close()
    if not args.no_save:
        rec = records.save(KIND, tr.speed_record(rows, args.tile, args.skew))
        print(f"recorded in {rec.path}", file=sys.stderr)
    print(tr.speed_table(rows))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(run_command(main))
