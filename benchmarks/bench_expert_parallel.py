#!/usr/bin/env python3
"""Chapter 08 measured: the expert-parallel layer (moe_course/expert_parallel.py) on several
GPUs of one machine, one process per GPU, torch.distributed with NCCL:

    torchrun --nproc-per-node 8 benchmarks/bench_expert_parallel.py              # 8 GPUs
    torchrun --nproc-per-node 2 benchmarks/bench_expert_parallel.py --shapes qwen3-30b-a3b
    torchrun --nproc-per-node 4 benchmarks/bench_expert_parallel.py --smoke      # a CPU, gloo

For each shape (chapter 02's tokens per rank, its experts spread over the ranks): the layer's
forward and forward + backward per rank; its two all-to-alls replayed alone on the same payloads
(``all_to_all_single`` with the same split sizes), with the bandwidth they reach (bytes that
leave the rank over the time); the forward with the tokens in 2 and 4 chunks, each chunk's
exchange in flight while the experts work on another (how much of the exchange that hides); and
how unevenly the rows land (the busiest rank's over the mean). Every number is the slowest
rank's median: the slowest rank sets the pace. Before any timing the layer is checked against
the single-process one on small inputs (moe_course.expert_parallel.check_rank).

Records ``benchmarks/results/expert_parallel__<gpu>.json``, one entry per number of GPUs (a run
with another number adds its entry). ``--smoke``: tiny sizes, gloo on the CPU, nothing recorded:
the script's own check on any machine. Without a GPU and without ``--smoke``: prints the record.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from moe_course import configs, moe, records
from moe_course import expert_parallel as ep
from moe_course.checks import positive_int, run_command

SHAPES = ("deepseek-v3", "qwen3-30b-a3b")


def timed(fn, reps: int, warmup: int = 2) -> float:
    """Median ms of ``fn()`` on this rank (CUDA events on a GPU), every rank starting together;
    then the slowest rank's median."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        dist.barrier()
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    slowest = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return float(slowest)


def measure_shape(cfg: configs.MoEConfig, tokens: int, shrink: int, reps: int, device, dtype) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    d, n = cfg.d // shrink, cfg.n // shrink
    g = torch.Generator().manual_seed(0)  # the same router and experts on every rank
    w = moe.random_weights(d, n, cfg.E, generator=g)
    gate_up, down = ep.hf_layout(w)
    torch.manual_seed(rank + 1)  # each rank its own tokens
    x = torch.randn(tokens, d).to(device, dtype)
    router = w.w_router.to(device, dtype)
    gu = ep.shard(gate_up, rank, world).to(device, dtype).requires_grad_()
    dn = ep.shard(down, rank, world).to(device, dtype).requires_grad_()
    grad = torch.randn(tokens, d).to(device, dtype)

    def forward():
        with torch.no_grad():
            ep.moe_forward(x, router, gu, dn, cfg.K)

    def forward_backward():
        ep.moe_forward(x.requires_grad_(), router, gu, dn, cfg.K).backward(grad)
        gu.grad = dn.grad = x.grad = None

    p = ep.plan(ep.route_rows(x, router, cfg.K), gu.shape[0])  # the layer's own exchange
    send, receive = p.send, p.receive
    payload = x[p.rows.token_ids]
    back = payload.new_empty((sum(receive), d))

    def exchanges():  # the layer's two all-to-alls alone, on its payloads
        dist.all_to_all_single(back, payload, receive, send)
        dist.all_to_all_single(payload, back, send, receive)

    received = torch.tensor([float(sum(receive))], dtype=torch.float64)
    busiest, total = received.clone(), received.clone()
    dist.all_reduce(busiest, op=dist.ReduceOp.MAX)
    dist.all_reduce(total)
    leaving = (sum(send) - send[rank]) * d * payload.element_size()  # bytes this rank sends away, each way
    result = {"tokens_per_rank": tokens, "d": d, "n": n, "E": cfg.E, "K": cfg.K, "world": world,
              "forward_ms": timed(forward, reps), "forward_backward_ms": timed(forward_backward, reps),
              "exchanges_ms": timed(exchanges, reps),
              "imbalance": float(busiest) / (float(total) / world)}
    for chunks in (2, 4):
        result[f"forward_{chunks}_chunks_ms"] = timed(
            lambda c=chunks: ep.moe_forward_overlapped(x, router, gu.detach(), dn.detach(), cfg.K, chunks=c), reps)
    slowest_bytes = torch.tensor([float(leaving)], dtype=torch.float64)
    dist.all_reduce(slowest_bytes, op=dist.ReduceOp.MAX)
    result["bytes_leaving_per_exchange"] = float(slowest_bytes)
    result["exchange_gbps"] = 2 * float(slowest_bytes) / (result["exchanges_ms"] * 1e-3) / 1e9 if world > 1 else None
    result["exchange_share_of_forward"] = result["exchanges_ms"] / result["forward_ms"]
    best = min(result["forward_2_chunks_ms"], result["forward_4_chunks_ms"])
    result["hidden_share_of_exchanges"] = max(0.0, (result["forward_ms"] - best) / result["exchanges_ms"])
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", choices=[c.name for c in configs.CHAPTER02], default=list(SHAPES))
    ap.add_argument("--reps", type=positive_int, default=10)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (gloo), nothing recorded")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    if "RANK" not in os.environ:  # not under torchrun
        if args.smoke:
            print("run it under torchrun: torchrun --nproc-per-node 4 benchmarks/bench_expert_parallel.py --smoke")
            return 1
        rec = records.load(ep.KIND)
        print(ep.table(rec.data) if rec else "no expert_parallel record yet: run this script under torchrun on "
                                          "a machine with several GPUs")
        return 0
    gpu = torch.cuda.is_available() and not args.smoke
    if gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        cpu_group = dist.new_group(backend="gloo")  # the check runs in float64 on the CPU, beside NCCL
        for case in ep.CASES:  # correct first, on small inputs
            if case.experts % world:
                raise SystemExit(f"the check's {case.experts} experts do not split over {world} ranks")
            worst = max(ep.check_rank(case, rank, world, group=cpu_group).values())
            if worst > 1e-10:
                raise SystemExit(f"rank {rank}: {case.name}: the sharded layer is off by {worst:.1e}")
        device = torch.device("cuda") if gpu else torch.device("cpu")
        dtype = torch.bfloat16 if gpu else torch.float32
        results = {}
        for name in args.shapes:
            cfg = configs.by_name(name)
            tokens, shrink = (cfg.T, 1) if gpu else (64, 64)
            results[name] = measure_shape(cfg, tokens, shrink, args.reps if gpu else 2, device, dtype)
        if rank == 0:
            data = {"runs": {str(world): results}}
            print(ep.table(data))
            if gpu and not args.no_save:
                old = records.load(ep.KIND, gpu=torch.cuda.get_device_name())
                if old is not None:
                    data["runs"] = {**old.data["runs"], **data["runs"]}
                print("recorded:", records.save(ep.KIND, data).label())
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
