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
from moe_course.machine import info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=[c.name for c in configs.CHAPTER02])
    ap.add_argument("--contenders", nargs="*", default=["torch._grouped_mm", "course"])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    if not info().has_gpu:
        print(f"profiling needs a GPU ({info().why_no_gpu}); nothing to do")
        return 0
    import torch

    out = {}
    for shape_name in args.shapes:
        shape = tuple(configs.by_name(shape_name).shape)
        for name in args.contenders:
            res = layer_measurements.kernel_profile(shape, name, args.iters)
            print(layer_measurements.profile_table(f"{shape_name} / {name}", res))
            out.setdefault(shape_name, {})[name] = res
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
