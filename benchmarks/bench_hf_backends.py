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
a GPU it prints the recorded results. A model that fits the card only with a narrower vocabulary
(DeepSeek-V3 on an 80 GB H100) is built so, and the record says so; one that cannot fit is skipped,
saying so.

    python benchmarks/bench_hf_backends.py
    python benchmarks/bench_hf_backends.py --models qwen3_moe mixtral --no-save
    python benchmarks/bench_hf_backends.py --models olmoe --merge   # one model per run, one record
    python benchmarks/bench_hf_backends.py --models deepseek_v3 --merge --eager-untimed

``--merge`` keeps the other models of this GPU's record (measured at the same sizes) and replaces
those measured now: a run too long for one sitting (SonicMoE compiles for each shape) goes model
by model into one record, which names the date each model was measured. ``--eager-untimed``:
eager is still what the others are checked against, but not timed (DeepSeek-V3's eager takes about
6 s a forward + backward, and the timing runs it 30 times: most of a GPU call); the tables show
"-" for it.
"""

from __future__ import annotations

import argparse
import sys
import time

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
    ap.add_argument("--merge", action="store_true",
                    help="keep the other models of this GPU's record (same sizes), replace those measured now")
    ap.add_argument("--eager-untimed", action="store_true",
                    help="check the backends against eager, but do not time eager (it is slow: DeepSeek-V3)")
    args = ap.parse_args(argv)
    if not info().has_gpu:
        rec = records.recorded_instead(hm.KIND)
        if rec is not None:
            print(hm.timing_table(rec.data))
        return 0
    sizes = hm.sizes_here()
    why_no_sonicmoe = hm.sonicmoe_here()
    backends = hm.backends_here()
    timed_backends = tuple(b for b in backends if not (args.eager_untimed and b == hm.REFERENCE))
    print(f"SonicMoE (transformers' \"sonicmoe\" backend): {why_no_sonicmoe or 'runs, on the installed sonic-moe'}")

    def checked_then_timed(model, ids):
        results = hm.compare(model, ids, backends=backends,  # how long each took: SonicMoE compiles here
                             report=lambda b, seconds: print(f"  {b} run in {seconds:.0f} s", flush=True))
        problems = hm.disagreements(results, sizes.dtype)
        if problems:
            raise SystemExit(f"{model.config.model_type}: the course's backend disagrees with eager: {problems}")
        if hm.SONICMOE in results:  # reported beside the course's, not held to a tolerance here
            print(f"  SonicMoE against eager: logits {results[hm.SONICMOE]['logits']:.1e} (the course's "
                  f"{results[hf.NAME]['logits']:.1e}, grouped_mm's {results['grouped_mm']['logits']:.1e})")
        print(f"  {hm.describe(model)}: checked, timing", flush=True)
        start = time.perf_counter()
        timed = hm.time_backends(model, ids, timed_backends), hm.time_experts(model, ids, timed_backends)
        print(f"  timed in {time.perf_counter() - start:.0f} s", flush=True)
        return timed

    data = hm.measure(sizes, tuple(args.models), work=checked_then_timed)
    data["sonicmoe"] = why_no_sonicmoe or "ran"
    if args.merge:
        data = merged(data, records.load(hm.KIND, gpu=info().gpu))
    if not args.no_save:
        records.save(hm.KIND, data)
    print(hm.timing_table(data))
    return 0


def merged(data: dict, earlier) -> dict:
    """``data`` with the models of ``earlier`` (this GPU's record) it did not measure, where both
    were measured at the same sizes; ``measured_on`` says which date each model's numbers are from
    (the record's own date is the newest run's), ``sonicmoe`` which models SonicMoE ran on."""
    ran_now = set(data["models"]) if data["sonicmoe"] == "ran" else set()
    if earlier is not None and earlier.data.get("sizes") != data["sizes"]:
        earlier = None  # measured at other sizes: not comparable
    kept = records.keep_unmeasured(data, earlier, "models", list(data["models"]), alongside=("experts",))
    if earlier is None:
        print("--merge: no record of this GPU at these sizes; writing these models alone")
        data["sonicmoe_models"] = sorted(ran_now)
        return data
    ran_before = set(earlier.data.get("sonicmoe_models", earlier.data["models"] if earlier.data.get("sonicmoe") == "ran"
                                      else ()))
    data["sonicmoe_models"] = sorted(ran_now | (ran_before & set(kept)))
    narrowed = {arch: note for arch, note in earlier.data.get("narrowed", {}).items() if arch in kept}
    if narrowed or "narrowed" in data:  # a kept model built with a narrower vocabulary keeps its note
        data["narrowed"] = {**narrowed, **data.get("narrowed", {})}
    print(f"--merge: kept {', '.join(kept) or 'no other model'} from {earlier.where()}")
    return data


if __name__ == "__main__":
    sys.exit(run_command(main))
