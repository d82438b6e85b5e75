"""Where one forward + backward of an MoE layer spends its GPU time, kernel by kernel.

bench_moe_layer.py says how long each layer takes; this says why. Each contender (one at a time:
DeepSeek-V3's weights and gradients are 45 GiB a contender) runs its forward + backward a few
times under torch.profiler, which sees every kernel of the process (CuPy's launches too). Per
iteration: each kernel's GPU time, its share, and, for the expert GEMMs we can name, TFLOP/s;
and the iteration's time with CUDA events, so that "GPU idle" (host overhead, waits) shows.

    python benchmarks/profile_moe_layer.py --shapes deepseek-v3
    python benchmarks/profile_moe_layer.py --shapes qwen3-30b-a3b --contenders course --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe_course import configs, moe, training  # noqa: E402
from moe_course.machine import info  # noqa: E402


def profile(shape, name: str, iters: int = 3, seed: int = 0) -> dict:
    """``{"ms_per_iter": .., "kernels": {kernel name: (ms per iteration, calls per iteration)}}``."""
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    T, d, n, E, k = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = moe.random_weights(d, n, E, dtype=torch.bfloat16, device="cuda", generator=g)
    x = torch.randn(T, d, device="cuda", generator=g).bfloat16()
    dout = torch.randn(T, d, device="cuda", generator=g).bfloat16()
    found, skipped = training.contenders(x, w, k, (name,))
    del w
    if name not in found:
        return {"skipped": skipped.get(name, "not available")}
    c = found[name]

    def step():
        for t in c.params:
            t.grad = None
        c.forward().backward(dout)

    for _ in range(2):  # compile, autotune, allocator warm
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / iters
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    per = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name][0] += ev.device_time / 1e3 / iters  # us -> ms
            per[ev.name][1] += 1
    kernels = {nm: (round(t, 4), cnt / iters) for nm, (t, cnt) in sorted(per.items(), key=lambda kv: -kv[1][0])}
    return {"ms_per_iter": round(ms, 4), "kernels": kernels}


def show(shape_name: str, name: str, res: dict, width: int = 70) -> None:
    print(f"\n=== {shape_name} / {name}")
    if "skipped" in res:
        print("   skipped:", res["skipped"])
        return
    busy = sum(t for t, _ in res["kernels"].values())
    print(f"   {res['ms_per_iter']:.3f} ms per forward+backward (CUDA events); kernels {busy:.3f} ms; "
          f"GPU idle {res['ms_per_iter'] - busy:.3f} ms")
    for nm, (t, cnt) in res["kernels"].items():
        if t < 0.01 * busy:
            continue
        print(f"   {t:8.3f} ms {100 * t / res['ms_per_iter']:5.1f}%  x{cnt:<4g} {nm[:width]}")


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
            res = profile(shape, name, args.iters)
            show(shape_name, name, res)
            out.setdefault(shape_name, {})[name] = res
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
