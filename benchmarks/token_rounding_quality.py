#!/usr/bin/env python3
"""Does tile-aware token rounding cost model quality? A small MoE trained with plain top-K and
with each rounding mode, evaluated with plain top-K (as the SonicMoE paper does), over many seeds.

    python benchmarks/token_rounding_quality.py                   # 16 seeds x 4 routings, ~6 min on one core
    python benchmarks/token_rounding_quality.py --seeds 4 --methods top-K nearest

Runs on the CPU (one thread; the model is small: moe_course/rounding_quality.py says what it
is). Prints validation loss per routing (mean and spread over seeds) and the difference to top-K
on the same seed, beside the course seed's "<0.1% quality loss" claim, and records it as
benchmarks/results/token_rounding_quality__<gpu or cpu>.json; a run with other settings than
the defaults (fewer seeds, say) is a scratch run, recorded in benchmarks/scratch/ instead.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

from moe_course import RESULTS_DIR, SCRATCH_DIR, records
from moe_course import rounding_quality as rq
from moe_course import token_rounding as tr
from moe_course.checks import positive_int, run_command

KIND = rq.KIND
METHODS = ["top-K", "nearest", "up", "down"]
SEEDS = 16


def main(argv=None) -> int:
    defaults = rq.Setup()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=positive_int, default=SEEDS, help=f"seeds 0 .. N-1 (default {SEEDS})")
    ap.add_argument("--methods", nargs="+", choices=[m for m in tr.ROUTINGS if m != "padded"], default=METHODS,
                    help="routings to train with (top-K, the baseline, is always trained)")
    ap.add_argument("--steps", type=positive_int, default=defaults.steps, help=f"training steps (default {defaults.steps})")
    ap.add_argument("--tile", type=positive_int, default=defaults.tile,
                    help=f"rounding tile (default {defaults.tile}: two tiles per expert on average, as in the "
                         "paper's shapes; smaller tiles change less of the routing)")
    ap.add_argument("--results-dir", type=Path, default=None,
                    help="where to record (default benchmarks/results; with other settings than the defaults, "
                         "benchmarks/scratch)")
    ap.add_argument("--no-save", action="store_true", help="do not write the record")
    args = ap.parse_args(argv)
    methods = ["top-K"] + [m for m in args.methods if m != "top-K"]  # the baseline of the differences
    setup = dataclasses.replace(defaults, steps=args.steps, tile=args.tile)

    def progress(label):
        print(f"training: {label}", file=sys.stderr, flush=True)

    runs = rq.compare(methods, range(args.seeds), setup, progress=progress)
    data = rq.record_data(runs, setup)
    print(rq.summary_table(data["summary"]))
    print("claim (the course's seed, not the paper): '<0.1% quality loss'")
    if not args.no_save:
        recorded_run = (args.seeds, sorted(methods), setup) == (SEEDS, sorted(METHODS), defaults)
        rec = records.save(KIND, data, results_dir=args.results_dir or (RESULTS_DIR if recorded_run else SCRATCH_DIR))
        print(f"recorded in {rec.path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
