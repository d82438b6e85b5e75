"""06_2 and 10_2 (the backward's first product with the SwiGLU backward in its epilogue) under
warp_specialized.cuh's two consumer schedules, side by side: the cooperative one (both consumer
warpgroups on every 128 x 256 tile, so both run the epilogue at once while the tensor cores wait)
and the ping-pong (each warpgroup a whole 128 x 128 tile, the two in turns, one multiplying while
the other runs its epilogue), with rings of 6 and 5 slots.

The ping-pong builds run with --pingpong. (Until session 25 they hung where a persistent block
takes two tiles or more: one end flag shared by both warpgroups, kernels/NOTES.md; a timeout of
your own around a first run on a new build is still wise.)

Every build is checked first on awkward expert counts (no rows, counts off the tile, one expert
with every row, more tiles than blocks) against the float32 maths, and each ping-pong build
against the cooperative one on the same inputs; a wrong result ends the run before any timing.
Then the four shapes of chapter 02, on a real routing, timed in turns (CUDA events, median).
Without a GPU it prints the recorded results.

    python benchmarks/bench_dswiglu_schedules.py
    python benchmarks/bench_dswiglu_schedules.py --shapes mixtral-8x7b --no-save
    timeout 300 python benchmarks/bench_dswiglu_schedules.py --pingpong
"""

from __future__ import annotations

import argparse
import sys

from moe_course import configs, layer_measurements, records
from moe_course.checks import argument_type, positive_int, run_command
from moe_course.machine import info

KIND = "dswiglu_schedules"
CHECK_COUNTS = {  # rows per expert: each is a way a tile or a block's share of them can go wrong
    "zeros-and-ragged": [0, 1, 130, 0, 257],
    "one-expert-has-all": [0, 0, 3000, 0],
    "single-row": [1],
    "two-tiles-a-block": [1500] * 16,   # ~190 M-tiles x N-tiles on ~132 blocks: the turns and the end
    "many-tiles-a-block": [700, 0, 1333, 129, 2000, 65, 900, 1100, 3000, 256, 1, 777] * 3,
}


def builds(pingpong: bool) -> dict:
    """name -> (which product, its Step): the default builds, and (``pingpong``) their ping-pong
    variants."""
    from moe_course import launch

    out = {"06_2 cooperative": ("06_2", launch.DSWIGLU), "10_2 cooperative": ("10_2", launch.HF_DSWIGLU)}
    if pingpong:
        out |= {"06_2 ping-pong, 6 slots": ("06_2", launch.pingpong_step(launch.DSWIGLU, 6)),
                "06_2 ping-pong, 5 slots": ("06_2", launch.pingpong_step(launch.DSWIGLU, 5)),
                "10_2 ping-pong, 6 slots": ("10_2", launch.pingpong_step(launch.HF_DSWIGLU, 6))}
    return out


def run(product: str, step, dout, idx, w_down, down_proj, h, s, offs):
    from moe_course import launch

    if product == "06_2":
        return launch.dswiglu_grouped_gemm(dout, idx, w_down, h, s, offs, validate=False, step=step)
    return launch.hf_dswiglu_grouped_gemm(dout, idx, down_proj, h, s, offs, validate=False, step=step)


def check(steps: dict, d: int = 256, n: int = 512, tokens: int = 1000) -> list[dict]:
    """Every build on :data:`CHECK_COUNTS` against float32 and against its cooperative build.
    Raises on a wrong result (or a build that hangs: the caller's timeout)."""
    import torch

    from moe_course import layer
    from moe_course.checking import relative_error

    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for case, counts in CHECK_COUNTS.items():
        E, R = len(counts), sum(counts)
        offs = torch.tensor(counts).cumsum(0).to(device="cuda", dtype=torch.int32)
        idx = torch.randint(0, tokens, (R,), device="cuda", dtype=torch.int32, generator=g)
        dout = torch.randn(tokens, d, device="cuda", generator=g).bfloat16()
        w_down = (torch.randn(E, n, d, device="cuda", generator=g) * d ** -0.5).bfloat16()
        down_proj = w_down.transpose(1, 2).contiguous()
        h = (torch.randn(R, 2 * n, device="cuda", generator=g) * 2).bfloat16()
        s = torch.rand(R, device="cuda", generator=g)
        want = layer.TORCH_OPS.dswiglu(dout.float(), idx, w_down.float(), h.float(), s, offs)
        base = {}
        for name, (product, step) in steps.items():
            got = run(product, step, dout, idx, w_down, down_proj, h, s, offs)
            torch.cuda.synchronize()
            errs = [relative_error(a, b) for a, b in zip(got, want)]
            same = None
            if product not in base:
                base[product] = got
            else:  # dH and s A from the same sums in the same order: the same bits
                same = all(torch.equal(a, b) for a, b in zip(got[:2], base[product][:2]))
            rows.append({"case": case, "build": name, "rel_err": max(errs), "same_bits_as_cooperative": same})
            print(f"  {case:<20} {name:<26} rel err {max(errs):.1e}"
                  + ("" if same is None else f", dH and sA {'equal' if same else 'DIFFER'}"), flush=True)
            if not max(errs) < 1e-2 or same is False:
                raise AssertionError(f"{name} on {case}: wrong result (rel err {max(errs):.2e}, same bits {same})")
    return rows


def time_shape(cfg, steps: dict, rounds: int, reps: int) -> dict:
    """Every build on the shape's real routing (layer.route), timed in turns."""
    import torch

    from moe_course import layer
    from moe_course.bench import interleaved

    T, d, n, E, k = cfg.shape
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, d, device="cuda", generator=g).bfloat16()
    dout = torch.randn(T, d, device="cuda", generator=g).bfloat16()
    w_router = (torch.randn(d, E, device="cuda", generator=g) * d ** -0.5).bfloat16()
    w_down = (torch.randn(E, n, d, device="cuda", generator=g) * n ** -0.5).bfloat16()
    down_proj = w_down.transpose(1, 2).contiguous()
    r = layer.route(x, w_router, k)
    idx, offs, s = r.gather_idx, r.offs, r.row_weights.float().contiguous()
    R = idx.numel()
    h = (torch.randn(R, 2 * n, device="cuda", generator=g) * 2).bfloat16()
    flops = 2.0 * R * d * n
    fns = {name: (lambda product=product, step=step: run(product, step, dout, idx, w_down, down_proj, h, s, offs))
           for name, (product, step) in steps.items()}
    res = interleaved(fns, rounds=rounds, reps=reps, warmup=3, flops=flops)
    return {"shape": cfg.shape.as_dict(), "flops": flops,
            "builds": {name: m.timing() for name, m in res.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", type=argument_type(configs.by_name), default=list(configs.CHAPTER02),
                    metavar="NAME", help=f"MoE configurations (default: the four of chapter 02): {', '.join(configs.names())}")
    ap.add_argument("--rounds", type=positive_int, default=7, help="rounds of turns (default 7)")
    ap.add_argument("--pingpong", action="store_true", help="the ping-pong builds too")
    ap.add_argument("--no-check", action="store_true", help="time without the checks first (not for a record)")
    ap.add_argument("--no-save", action="store_true", help="do not write the record")
    args = ap.parse_args(argv)
    if not info().has_gpu:
        rec = records.recorded_instead(KIND)
        if rec is not None:
            print(layer_measurements.schedules_table(rec.data))
        return 0
    import torch

    from moe_course.layer import kernels_unavailable

    probe = torch.empty(1, 256, device="cuda", dtype=torch.bfloat16)
    why = kernels_unavailable(probe, 256, 256)
    if why:
        print(f"skipped: the course's kernels cannot run here ({why})")
        return 0
    steps = builds(args.pingpong)
    data = {"checks": [] if args.no_check else check(steps), "shapes": {}}
    for cfg in args.shapes:
        print(f"--- {cfg.name} {tuple(cfg.shape)}", flush=True)
        data["shapes"][cfg.name] = time_shape(cfg, steps, args.rounds, reps=5)
        print(layer_measurements.schedules_table({"shapes": {cfg.name: data["shapes"][cfg.name]}}), flush=True)
        if not (args.no_save or args.no_check):
            records.save(KIND, data)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
