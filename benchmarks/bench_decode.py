"""Chapter 09 measured: a decode step's expert GEMMs, where each active expert gets a handful of
tokens and the time is reading its weights. On the four shapes of chapter 02 at 1, 8, 64, 256
and 512 tokens (uniform random top-K routing), up-projection (``[gate; up]``, N = 2n) and
down-projection (N = d):

- ``09_1``: the course's decode kernel on the masked layout (kernels/09_1_decode_swap_ab.cu: the
  token slots as wgmma's N, idle experts never read, no host sync);
- ``09_2``: 09_1 loading and multiplying only the chunks of 32 slots that hold a token
  (kernels/09_2_decode_slot_chunks.cu); ``09_2/64``: the same file built with chunks of 64 slots,
  at 128 and 256 slots (fewer, wider wgmma chains: what the layer runs for full experts);
- ``09_3``: 09_2's chunks split over blocks of 64 slots (kernels/09_3_decode_slot_split.cu), at
  128 and 256 slots: two blocks an SM where 09_2 fits one (what the layer runs for sparse experts);
- ``grouped_mm``: ``torch._grouped_mm`` on the pairs sorted by expert (CUTLASS);
- ``copy`` (not a contender): a device copy of the step's bytes, half read and half written,
  timed the same way: what memory gives at this size, its launch and ramp included (a few µs
  weigh on a 40 µs step; the device copy the fractions are of is measured over far more bytes).

Each is timed replayed from a CUDA graph (``, graph``: how a serving engine runs a step, the
host's launch cost paid once at capture), and 09_2 and grouped_mm eager too, where each call
pays the host's launch cost (a course launch ~80 µs, torch's ~23 µs, H200 session 14: below
those, an eager time measures the host).

The serving library issue 20 asks for: vLLM's fused MoE (``moe_course.vllm_moe``: its Triton
``fused_moe_kernel`` with its tuned block sizes, its CUDA alignment of the pairs), where vLLM 0.26
is installed or its files are unpacked at ``$MOE_COURSE_VLLM_SITE`` (``tools/vllm_bundle.sh``: the
GPU machine has no package registry). ``vLLM, graph``: one launch of its kernel on the same rows
and weights, the pairs aligned beforehand (as the course's slots and torch's sorted rows are);
``vLLM layer, graph``: its ``fused_experts`` behind the same router. SGLang's kernels come in
sgl-kernel (510 MiB), FlashInfer 0.7 compiles its sources with nvcc at first use: not run.

Each result is checked against float32 first; then both are timed in turns (CUDA events, median)
and shown as TB/s over the bytes a step must move (the tokens, every active expert's weights
once, the outputs) and as a fraction of the measured device copy. Without a GPU it prints the
recorded results.

    python benchmarks/bench_decode.py
    python benchmarks/bench_decode.py --shapes mixtral-8x7b --tokens 64 512 --no-save
"""

from __future__ import annotations

import argparse
import sys

from moe_course import configs, records
from moe_course.checks import argument_type, positive_int, run_command
from moe_course.machine import info

KIND = "decode_gemm"  # benchmarks/results/decode_gemm__<gpu>.json (decode.GEMM_KIND)


def measure_one(cfg, tokens: int, proj: str, roof) -> dict:
    import torch

    from moe_course import decode, launch, moe, vllm_moe
    from moe_course.bench import interleaved
    from moe_course.checking import relative_error

    g = torch.Generator(device="cuda").manual_seed(tokens)
    n_out, k_in = (2 * cfg.n, cfg.d) if proj == "up" else (cfg.d, cfg.n)
    w = (torch.randn(cfg.E, n_out, k_in, device="cuda", generator=g) / k_in**0.5).bfloat16()
    experts = moe.topk_softmax(torch.randn(tokens, cfg.E, device="cuda", generator=g), cfg.K).experts
    capacity = decode.kernel_capacity(tokens)
    layout = decode.masked_layout(experts, cfg.E, capacity)
    x = torch.randn(tokens, k_in, device="cuda", generator=g).bfloat16()
    x_slots = torch.where(layout.valid[..., None], x[layout.slot_token], 0)
    count = layout.counts.clamp(max=capacity).to(torch.int32)
    d = moe.dispatch(experts, cfg.E)
    x_sorted, offs = x[d.token_of], d.offsets[1:].to(torch.int32)
    eager = {"09_1": lambda: launch.decode_grouped_gemm(x_slots, w, count, step=1),
             "09_2": lambda: launch.decode_grouped_gemm(x_slots, w, count, step=2),
             "grouped_mm": lambda: torch._grouped_mm(x_sorted, w.transpose(1, 2), offs=offs)}
    if capacity in launch.DECODE_WIDE_CHUNK_STEPS:  # 09_2 in chunks of 64 slots (full experts)
        eager["09_2/64"] = lambda: launch.decode_grouped_gemm(x_slots, w, count, chunk=launch.DECODE_WIDE_CHUNK)
    if capacity in launch.DECODE_SPLIT_STEPS:  # 09_3: the slots split over blocks (sparse experts)
        eager["09_3"] = lambda: launch.decode_grouped_gemm(x_slots, w, count, step=3)
    want = torch.einsum("eck,enk->ecn", x_slots.float(), w.float())  # checked first, against float32
    filled = layout.valid & (torch.arange(capacity, device="cuda") < count[:, None])
    errors = {}
    for name in [n for n in eager if n.startswith("09_")]:
        errors[name] = relative_error(eager[name]()[filled].float(), want[filled])
        if not errors[name] < 1e-2:
            raise SystemExit(f"{name} is wrong on {cfg.name} {proj} at T={tokens}: relative error {errors[name]:.3g}")
    if vllm_moe.unavailable() is None:  # vLLM's kernel on the same rows, its pairs aligned beforehand
        block = vllm_moe.config(tokens, cfg.E, cfg.d, cfg.n, cfg.K)
        route = vllm_moe.routing(experts, cfg.E, block)
        out = torch.empty(tokens, cfg.K, n_out, device="cuda", dtype=torch.bfloat16)
        eager["vLLM"] = lambda: vllm_moe.grouped_gemm(x, w, experts, block, route, out=out)
        fitted = layout.pair_slot < cfg.E * capacity  # every pair, unless one was dropped past 256 slots
        errors["vLLM"] = relative_error(eager["vLLM"]()[fitted].float(), want.flatten(0, 1)[layout.pair_slot[fitted]])
        if not errors["vLLM"] < 1e-2:
            raise SystemExit(f"vLLM's fused_moe is wrong on {cfg.name} {proj} at T={tokens}: "
                             f"relative error {errors['vLLM']:.3g}")
    active = int(decode.active_experts(experts, cfg.E))
    nbytes = 2 * (tokens * k_in + active * n_out * k_in + tokens * cfg.K * n_out)
    # the reference at this size: a device copy reading and writing the step's bytes (half each),
    # replayed and timed as the kernels are, so its launch and ramp are in it too
    src = torch.randint(0, 255, (nbytes // 2,), device="cuda", dtype=torch.uint8, generator=g)
    dst = torch.empty_like(src)
    eager["copy"] = lambda: dst.copy_(src)
    graphs = {f"{name}, graph": decode.graphed(fn)[0].replay for name, fn in eager.items()}
    flops = 2 * tokens * cfg.K * n_out * k_in
    contenders = graphs | {name: eager[name] for name in ("09_2", "grouped_mm")}
    m = interleaved({name: contenders[name] for name in decode.GEMM_CONTENDERS if name in contenders},
                    rounds=5, reps=20, flops=flops, bytes=nbytes)
    return {"shape": cfg.name, "proj": proj, "tokens": tokens, "active": active, "capacity": capacity,
            "bytes": nbytes, "relative_error": errors["09_2"], "relative_error_09_1": errors["09_1"],
            **{f"relative_error_{name}": errors[name] for name in ("09_2/64", "09_3", "vLLM") if name in errors},
            **{name: {**r.timing(), "tbps": r.tbps, "of_copy": r.tbps / roof.copy_tbps} for name, r in m.items()}}


def measure_layer(cfg, tokens: int, roof) -> dict:
    """The whole decode layer (router, up with SwiGLU, down, combine) on chapter 09's kernels (as
    decode.gemm_step picks them) and on chapter 06's
    kernels (layer.forward), each captured in a CUDA graph, against the same layer on
    torch._grouped_mm (decode.grouped_mm_forward), graph-replayed and eager; checked against each
    other first."""
    import torch

    from moe_course import decode, layer, moe, vllm_moe
    from moe_course.bench import interleaved
    from moe_course.io_overlap import interleave_gate_up
    from moe_course.checking import relative_error

    g = torch.Generator(device="cuda").manual_seed(tokens)
    w = moe.MoEWeights(torch.randn(cfg.d, cfg.E, device="cuda", generator=g) / cfg.d**0.5,
                       *(torch.randn(cfg.E, a, b, device="cuda", generator=g).bfloat16() / a**0.5
                         for a, b in ((cfg.d, cfg.n), (cfg.d, cfg.n), (cfg.n, cfg.d))))
    wd = decode.prepare(w)
    del w
    # chapter 06's layout of the same weights: gate and up rows interleaved, the down weight [E, n, d]
    kw = layer.KernelWeights(wd.w_router, interleave_gate_up(wd.w_gate_up), wd.w_down.transpose(1, 2).contiguous())
    x = torch.randn(tokens, cfg.d, device="cuda", generator=g).bfloat16()
    ours_graph, ours_y = decode.graphed(lambda: decode.masked_moe_forward_kernel(x, wd, cfg.K).y)
    training_graph, training_y = decode.graphed(lambda: layer.forward(x, kw, cfg.K))
    theirs_graph, theirs_y = decode.graphed(lambda: decode.grouped_mm_forward(x, wd, cfg.K))
    for graph in (ours_graph, training_graph, theirs_graph):
        graph.replay()
    err = relative_error(ours_y.float(), theirs_y.float())
    # Chapter 06's router computes its logits in bf16, the decode layers' in float32: a token whose
    # k-th and (k+1)-th experts nearly tie may go elsewhere (7B at 256 tokens: 7% apart over all
    # tokens, H100). So 06's layer is checked on the tokens both routings send to the same experts.
    experts = decode.route(x, wd.w_router, cfg.K)[1]  # the decode layers' routing (both route alike)
    alike = (layer.route(x, kw.w_router, cfg.K).experts.sort(dim=1).values == experts.sort(dim=1).values).all(dim=1)
    err_06 = relative_error(training_y[alike].float(), theirs_y[alike].float())
    if not (err < 2e-2 and err_06 < 2e-2 and alike.float().mean() > 0.5):
        raise SystemExit(f"the decode layers disagree on {cfg.name} at T={tokens}: relative error {err:.3g} "
                         f"(09), {err_06:.3g} (06, on the {int(alike.sum())} tokens routed alike)")
    contenders = {"09 layer, graph": ours_graph.replay, "06 layer, graph": training_graph.replay,
                  "grouped_mm layer, graph": theirs_graph.replay,
                  "grouped_mm layer, eager": lambda: decode.grouped_mm_forward(x, wd, cfg.K)}
    errors = {}
    if vllm_moe.unavailable() is None:  # vLLM's fused_experts behind the same router
        vllm_graph, vllm_y = decode.graphed(lambda: vllm_moe.layer(x, wd, cfg.K))
        vllm_graph.replay()
        errors["relative_error_vllm"] = relative_error(vllm_y.float(), theirs_y.float())
        if not errors["relative_error_vllm"] < 2e-2:
            raise SystemExit(f"vLLM's layer disagrees on {cfg.name} at T={tokens}: relative error "
                             f"{errors['relative_error_vllm']:.3g}")
        contenders["vLLM layer, graph"] = vllm_graph.replay
    active = int(decode.active_experts(experts, cfg.E))
    step = decode.decode_step(cfg, tokens, "layer", active=active)
    m = interleaved({name: contenders[name] for name in decode.LAYER_CONTENDERS if name in contenders},
                    rounds=5, reps=20, bytes=step.bytes)
    return {"shape": cfg.name, "tokens": tokens, "active": active, "bytes": step.bytes, "relative_error": err,
            "relative_error_06": err_06, "routed_alike": float(alike.float().mean()), **errors,
            **{name: {**r.timing(), "tbps": r.tbps, "of_copy": r.tbps / roof.copy_tbps} for name, r in m.items()}}


def main(argv=None) -> int:
    from moe_course import decode

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", type=argument_type(configs.by_name), default=list(configs.CHAPTER02),
                    metavar="NAME", help=f"MoE configurations (default: the four of chapter 02): {', '.join(configs.names())}")
    ap.add_argument("--tokens", nargs="+", type=positive_int, default=list(decode.DECODE_TOKENS),
                    help="tokens per step (default: %(default)s)")
    ap.add_argument("--parts", nargs="+", choices=("gemm", "layer"), default=["gemm", "layer"],
                    help="the expert GEMMs, the whole layer graph-replayed (default: both)")
    ap.add_argument("--no-save", action="store_true", help="do not write the record")
    args = ap.parse_args(argv)
    if not info().has_gpu:
        for kind, table in ((KIND, decode.gemm_table), (decode.LAYER_KIND, decode.layer_table)):
            rec = records.recorded_instead(kind)
            if rec is not None:
                print(table(rec.data))
        return 0
    import torch

    from moe_course import ceilings, vllm_moe

    roof = ceilings.for_this_machine()
    why_no_vllm = vllm_moe.unavailable()
    print(f"vLLM's fused_moe: {why_no_vllm or vllm_moe.describe()}")
    serving = {"vllm": why_no_vllm or vllm_moe.describe()}
    data = {"copy_tbps": roof.copy_tbps, "rows": [], **serving}
    layers = {"copy_tbps": roof.copy_tbps, "rows": [], **serving}
    for cfg in args.shapes:
        for proj in ("up", "down") if "gemm" in args.parts else ():
            for tokens in args.tokens:
                data["rows"].append(measure_one(cfg, tokens, proj, roof))
                print(decode.gemm_table({"rows": data["rows"][-1:]}).splitlines()[-1], flush=True)
            torch.cuda.empty_cache()
        for tokens in args.tokens if "layer" in args.parts else ():
            layers["rows"].append(measure_layer(cfg, tokens, roof))
            print(decode.layer_table({"rows": layers["rows"][-1:]}).splitlines()[-1], flush=True)
            torch.cuda.empty_cache()
        if not args.no_save:  # after every shape: a run cut short keeps what it measured
            for kind, part in ((KIND, data), (decode.LAYER_KIND, layers)):
                if part["rows"]:
                    records.save(kind, part)
    for table, part in ((decode.gemm_table, data), (decode.layer_table, layers)):
        if part["rows"]:
            print(table(part))
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
