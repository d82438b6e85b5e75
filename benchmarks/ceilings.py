#!/usr/bin/env python3
"""Measure this GPU's two ceilings and record them in benchmarks/results/ceilings__<gpu>.json.

    python benchmarks/ceilings.py            # measure (GPU) or show the recorded ones (no GPU)
    python benchmarks/ceilings.py --json     # the record as JSON

Dense bf16 matmul rate (cuBLAS through torch.matmul, 8192^3, random inputs) and device copy
bandwidth (2 GiB, bytes read + written): the median of many CUDA-event timings after warm-up.
Every chart of the course is drawn against these two numbers.
"""

import argparse
import json
import sys

from moe_course import ceilings, machine
from moe_course.checks import positive_float, positive_int, run_command


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print the record as JSON")
    ap.add_argument("--n", type=positive_int, default=8192, help="matmul size n for n x n x n (default 8192)")
    ap.add_argument("--copy-gib", type=positive_float, default=2.0, help="bytes copied per run, GiB (default 2)")
    ap.add_argument("--no-save", action="store_true", help="measure, but do not write the record")
    args = ap.parse_args(argv)
    print(machine.info().summary(), file=sys.stderr)
    if machine.has_gpu():
        roof = ceilings.measure(n=args.n, copy_gib=args.copy_gib, save=not args.no_save)
        if not args.no_save:
            print(f"recorded in {roof.record.path}", file=sys.stderr)
    else:
        print(machine.skip_reason(), "(measuring); the recorded ceilings follow", file=sys.stderr)
        roof = ceilings.recorded()
        if roof is None:
            print("no recorded ceilings either", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps({"environment": roof.record.environment, **roof.record.data}, indent=1))
    else:
        print(roof)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
