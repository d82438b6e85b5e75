"""Chapter 06's kernels one by one: each product of the layer's forward and backward on the course's
kernel against the same product on torch._grouped_mm (with the torch around it that the product
needs: the gather, the elementwise SwiGLU and its backward), on the four shapes of chapter 02.
Every result is checked against the library's first; only then are both timed, in turns (CUDA
events, median). bench_moe_layer.py times the whole layer; this says which kernel wins or loses
where. Without a GPU it prints the recorded results.

    python benchmarks/bench_layer_kernels.py
    python benchmarks/bench_layer_kernels.py --shapes deepseek-v3 --no-save
    python benchmarks/bench_layer_kernels.py --try ISSUE_IN_TURN=1

``--try KEY=VAL[,KEY=VAL]``: the course's GEMMs built again with those #defines too (an
experiment), each product checked for the default build's bytes, then timed in the same turns;
the record keeps them under ``tried`` and a table after the run says how each did.
"""

from __future__ import annotations

import argparse
import sys

from moe_course import configs, layer_measurements, records
from moe_course.checks import argument_type, defines_argument, defines_label, run_command
from moe_course.machine import info

KIND = "layer_kernels"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", type=argument_type(configs.by_name), default=list(configs.CHAPTER02),
                    metavar="NAME", help=f"MoE configurations (default: the four of chapter 02): {', '.join(configs.names())}")
    ap.add_argument("--no-save", action="store_true", help="do not write the record")
    ap.add_argument("--try", dest="tried", action="append", default=[], type=argument_type(defines_argument),
                    metavar="KEY=VAL[,KEY=VAL]", help="an experiment: the GEMMs built with these #defines too, "
                    "checked against the defaults' bytes, timed beside them (repeatable)")
    args = ap.parse_args(argv)
    if not info().has_gpu:
        rec = records.recorded_instead(KIND)
        if rec is not None:
            print(layer_measurements.ops_table(rec.data))
        return 0
    import torch

    from moe_course.layer import kernel_ops, kernels_unavailable

    tried = {defines_label(defines): kernel_ops(**defines) for defines in args.tried}
    data = {"shapes": {}}
    for cfg in args.shapes:
        name, shape = cfg.name, tuple(cfg.shape)
        probe = torch.empty(1, shape[1], device="cuda", dtype=torch.bfloat16)
        why = kernels_unavailable(probe, shape[1], shape[2])
        if why:
            print(f"skipped: the course's kernels cannot run here ({why})")
            return 0
        print(f"--- {name} {shape}", flush=True)
        data["shapes"][name] = layer_measurements.measure_ops(shape, progress=lambda s: print("  ", s, flush=True),
                                                              tried=tried)
        if not args.no_save:  # after every shape: a run cut short keeps what it measured
            records.save(KIND, data)
        torch.cuda.empty_cache()
    print(layer_measurements.ops_table(data))
    if tried:
        print(layer_measurements.tried_table(data))
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
