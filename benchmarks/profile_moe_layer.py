"""Where one forward + backward of an MoE layer spends its GPU time, kernel by kernel.

bench_moe_layer.py says how long each layer takes; this says why. Each contender (one at a time:
DeepSeek-V3's weights and gradients are 45 GiB a contender) runs its forward + backward a few
times under torch.profiler, which sees every kernel of the process (CuPy's launches too). Per
iteration: each kernel's GPU time and share, and the iteration's time with CUDA events, so that
"GPU idle" (host overhead, waits) shows (moe_course.layer_measurements.kernel_profile, profile_table).

    python benchmarks/profile_moe_layer.py --shapes deepseek-v3
    python benchmarks/profile_moe_layer.py --shapes qwen3-30b-a3b --contenders course --json out.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moe_course import configs, layer_measurements
from moe_course.checks import argument_type, positive_int
from moe_course.machine import info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", type=argument_type(configs.by_name), default=list(configs.CHAPTER02),
                    metavar="NAME", help=f"MoE configurations (default: the four of chapter 02): {', '.join(configs.names())}")
    ap.add_argument("--contenders", nargs="+", choices=layer_measurements.CONTENDERS,
                    default=["torch._grouped_mm", "course"], metavar="NAME",
                    help=f"the layers to profile (default torch._grouped_mm course): "
                         f"{', '.join(layer_measurements.CONTENDERS)}")
    ap.add_argument("--iters", type=positive_int, default=3, help="profiled steps per contender (default 3)")
    ap.add_argument("--json", type=Path, metavar="FILE", help="also write the results to this file")
    args = ap.parse_args(argv)
    if not info().has_gpu:
        print(f"profiling needs a GPU ({info().why_no_gpu}); nothing to do")
        return 0
    import torch

    out = {}
    for cfg in args.shapes:
        shape_name, shape = cfg.name, tuple(cfg.shape)
        for name in args.contenders:
            res = layer_measurements.kernel_profile(shape, name, args.iters)
            print(layer_measurements.profile_table(f"{shape_name} / {name}", res))
            out.setdefault(shape_name, {})[name] = res
            torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
