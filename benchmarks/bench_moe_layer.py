"""Chapter 06's benchmark: the whole MoE layer, forward and forward + backward, on the four
shapes of chapter 02: the torch layer with a per-expert loop, the same layer on
torch._grouped_mm, the course's layer (moe_course/layer.py on kernels 03_4 and 06_1..06_4), and
SonicMoE where it runs. Time (median of interleaved runs, CUDA events), TFLOP/s of the expert
GEMMs, memory kept by the forward and the peak of forward + backward, and whether outputs and
gradients agree. Without a GPU it prints the recorded results.

    python benchmarks/bench_moe_layer.py                      # all four shapes, recorded
    python benchmarks/bench_moe_layer.py --shapes qwen3-30b-a3b --no-save
    python benchmarks/bench_moe_layer.py --train              # also the training run (loss curves)
    python benchmarks/bench_moe_layer.py --shapes sonicmoe-7b qwen3-30b-a3b \
        --contenders torch._grouped_mm course SonicMoE --record moe_layer_sonicmoe   # chapter 05
    python benchmarks/bench_moe_layer.py --shapes mixtral-8x7b --contenders torch._grouped_mm course \
        SonicMoE --record moe_layer_sonicmoe --merge     # one shape a run (SonicMoE compiles per shape)

``--merge`` keeps the other shapes of this GPU's record of that kind, each with the date it was
measured (``measured_on``): one shape a run, every shape in one record, each shape's contenders
still timed in turns within its own run.
"""

from __future__ import annotations

import argparse
import sys

from moe_course import configs, layer, layer_measurements, records
from moe_course.checks import argument_type, run_command
from moe_course.machine import info

KIND = "moe_layer_training"
TRAIN = dict(d=512, n=256, E=16, k=2, tokens=8192, steps=300, lr=1e-3)  # the recorded training run


# DeepSeek-V3's weights and their gradients are 45 GiB per contender; three at once (and the
# loop's autograd temporaries) do not fit in the H200's 141 GB, so its loop is left out there.
# (Its forward alone is in the moe_variants record: 30.4 ms.)
LEAVE_OUT = {"deepseek-v3": {"torch loop": "left out on this shape: three contenders' weights and gradients "
                                            "(45 GiB each) do not fit on one 141 GB GPU; its forward alone is in "
                                            "bench_moe_variants' record"}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", type=argument_type(configs.by_name), default=list(configs.CHAPTER02),
                    metavar="NAME", help=f"MoE configurations (default: the four of chapter 02): {', '.join(configs.names())}")
    ap.add_argument("--contenders", nargs="+", choices=layer_measurements.CONTENDERS,
                    default=list(layer_measurements.CONTENDERS), metavar="NAME",
                    help=f"the layers to compare (default all): {', '.join(layer_measurements.CONTENDERS)}")
    ap.add_argument("--train", action="store_true", help="also run the training comparison")
    ap.add_argument("--no-save", action="store_true", help="do not write the record")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other shapes of this GPU's record of that kind (one shape a run, one record)")
    ap.add_argument("--record", type=argument_type(records.check_kind, "record kind"), default=KIND,
                    help=f"the record's kind, its file's name (default {KIND}; the SonicMoE comparison of chapter 05 "
                         "is recorded as moe_layer_sonicmoe)")
    args = ap.parse_args(argv)
    if not info().has_gpu:
        rec = records.recorded_instead(args.record)
        if rec is not None:
            print(layer_measurements.table(rec.data))
        return 0
    data = {"shapes": {}, "train": None,
            "command": " ".join(["python", "benchmarks/bench_moe_layer.py", *(sys.argv[1:] if argv is None else argv)])}
    if "SonicMoE" in args.contenders:
        from moe_course.variants import sonicmoe_versions

        data["versions"] = sonicmoe_versions()
    if args.merge:
        data = merged(data, records.load(args.record, gpu=info().gpu), [cfg.name for cfg in args.shapes])
    for cfg in args.shapes:
        name = cfg.name
        print(f"--- {name} {tuple(cfg.shape)}", flush=True)
        left_out = LEAVE_OUT.get(name, {})
        res = layer_measurements.measure_layer(tuple(cfg.shape), [c for c in args.contenders if c not in left_out],
                                     progress=lambda s: print("  ", s, flush=True))
        res["skipped"] |= {c: why for c, why in left_out.items() if c in args.contenders}
        data["shapes"] = in_course_order(data["shapes"] | {name: res})
        if not args.no_save:  # after every shape: a long run cut short keeps what it measured
            records.save(args.record, data)
        import torch
        torch.cuda.empty_cache()
    print(layer_measurements.table(data))
    if args.train:
        import torch
        curves = {}
        for label, ops, dtype in (("course kernels, bf16", None, torch.bfloat16),
                                  ("torch reference, float32", layer.TORCH_OPS, torch.float32)):
            curves[label] = layer_measurements.teacher_student(**TRAIN, dtype=dtype, ops=ops)
            print(label, "loss: first", curves[label][0], "last", curves[label][-1], flush=True)
        data["train"] = {"config": TRAIN, "losses": curves}
    if not args.no_save:
        print("recorded:", records.save(args.record, data).path)
    return 0


def in_course_order(shapes: dict) -> dict:
    """The shapes of a record in the order of moe_course.configs (chapter 02's first)."""
    order = configs.names()
    return dict(sorted(shapes.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def merged(data: dict, earlier, measuring: list[str]) -> dict:
    """``data`` started with the shapes of ``earlier`` (this GPU's record of the same kind) that
    this run does not measure, and its training run if this one has none; ``measured_on`` says
    which date each shape's numbers are from (the record's own date is the newest run's)."""
    kept = records.keep_unmeasured(data, earlier, "shapes", measuring)
    if earlier is None:
        print("--merge: no record of this kind from this GPU yet; writing these shapes alone")
        return data
    data["shapes"] = in_course_order(data["shapes"])
    if data.get("train") is None and earlier.data.get("train") is not None:
        data["train"] = earlier.data["train"]
    if "versions" not in data and "versions" in earlier.data:
        data["versions"] = earlier.data["versions"]
    print(f"--merge: kept {', '.join(kept) or 'no other shape'} from {earlier.where()}")
    return data


if __name__ == "__main__":
    sys.exit(run_command(main))
