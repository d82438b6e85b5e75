"""Chapter 10 measured: the four models of chapter 10 (real widths, expert counts and top-K,
two blocks, random weights) run by transformers' experts backends, "eager", "grouped_mm", the
course's "moe_course" and, where the ``sonic-moe`` package is installed, transformers' own
"sonicmoe" on it (its hub download cannot happen offline: ``hf_models.sonicmoe_here`` says why
not, or hands it the installed package), on one GPU, the backends timed in turns (CUDA events,
median):

- the whole model, forward (no_grad) and forward + backward;
- the experts' share alone: the first MoE block's experts call on the inputs the model hands
  it, forward and forward + backward, and what each backend keeps allocated for its backward.

Before any timing, chapter 10's checks (hf_models.compare: logits, loss, every gradient) must
hold for the course's backend against eager, as close as transformers' own grouped_mm. Without
a GPU it prints the recorded results. A model that cannot fit the card is skipped, saying so.

    python benchmarks/bench_hf_backends.py
    python benchmarks/bench_hf_backends.py --models qwen3_moe mixtral --no-save
"""

from __future__ import annotations

import argparse
import sys

from moe_course import records
from moe_course.checks import run_command
from moe_course.machine import info


def main(argv=None) -> int:
    from moe_course import hf
    from moe_course import hf_models as hm

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=list(hm.ARCHITECTURES), default=list(hm.ARCHITECTURES),
                    help="which architectures (default: all four)")
    ap.add_argument("--no-save", action="store_true", help="do not write the record")
    args = ap.parse_args(argv)
    if not info().has_gpu:
        rec = records.recorded_instead(hm.KIND)
        if rec is not None:
            print(hm.timing_table(rec.data))
        return 0
    sizes = hm.sizes_here()
    why_no_sonicmoe = hm.sonicmoe_here()
    backends = hm.backends_here()
    print(f"SonicMoE (transformers' \"sonicmoe\" backend): {why_no_sonicmoe or 'runs, on the installed sonic-moe'}")

    def checked_then_timed(model, ids):
        results = hm.compare(model, ids, backends=backends)
        problems = hm.disagreements(results, sizes.dtype)
        if problems:
            raise SystemExit(f"{model.config.model_type}: the course's backend disagrees with eager: {problems}")
        if hm.SONICMOE in results:  # reported beside the course's, not held to a tolerance here
            print(f"  SonicMoE against eager: logits {results[hm.SONICMOE]['logits']:.1e} (the course's "
                  f"{results[hf.NAME]['logits']:.1e}, grouped_mm's {results['grouped_mm']['logits']:.1e})")
        print(f"  {hm.describe(model)}: checked, timing", flush=True)
        return hm.time_backends(model, ids, backends), hm.time_experts(model, ids, backends)

    data = hm.measure(sizes, tuple(args.models), work=checked_then_timed)
    data["sonicmoe"] = why_no_sonicmoe or "ran"
    if not args.no_save:
        records.save(hm.KIND, data)
    print(hm.timing_table(data))
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
