#!/usr/bin/env python3
"""The workload `make sanitize` runs under compute-sanitizer: every kernel in kernels/ launched
at least once, at the sizes where kernels go wrong if they are going to.

- experts with no rows, counts that are not a multiple of the tile, one expert with every row,
  and more tiles than the GPU has SMs (the persistent kernels' loop over tiles);
- every step of chapters 02 and 03 (03_1 with one slot and with four), the gather and SwiGLU
  steps, the token-rounding kernels with every routing, and chapter 06's layer forward and
  backward with top-K and with rounding (06_1 to 06_4), its output and every gradient against
  the same maths in float32; chapter 09's decode kernel at every width and its layer;
- the outputs are checked too (a kernel that is clean but wrong is no better).

It records which kernels were launched and fails if one in kernels/ was not: a kernel added
later without a line here is caught. Run alone it is a quick check of every kernel
(`python tools/sanitize_workload.py`); tools/sanitize.py runs it under each tool.
"""

from __future__ import annotations

import argparse
import sys

from moe_course import kernels, machine

COUNTS = {  # rows per expert
    "empty experts, counts off the tile": [0, 1, 130, 0, 257],
    "one expert with every row": [300],
    "more tiles than SMs": [0, 17000, 3, 129],
}


class Tracked:
    """A CuPy module that notes the name of every kernel fetched from it (to launch it)."""

    launched: set[str] = set()

    def __init__(self, module):
        self._module = module

    def get_function(self, name):
        Tracked.launched.add(name)
        return self._module.get_function(name)

    def __getattr__(self, name):
        return getattr(self._module, name)


def track_launches() -> None:
    original = kernels._load

    def load(*args, **kwargs):
        return Tracked(original(*args, **kwargs))

    kernels._load = load


VERBOSE = False  # --verbose: a line after each case, so a tool's report falls between two of them


def say(text: str) -> None:
    if VERBOSE:
        print(f"[workload] {text}", flush=True)


def check(name: str, got, expected, tol: float = 2e-2) -> None:
    from moe_course.checking import relative_error

    err = relative_error(got, expected)
    if not err <= tol:
        raise SystemExit(f"{name}: relative error {err:.3g} (more than {tol}): a wrong result")
    say(f"checked {name}")


def grouped_gemms() -> None:
    import torch

    from moe_course import grouped_gemm as gg
    from moe_course import io_overlap, launch

    for name, step in launch.STEPS.items():  # 03_1 with one slot and with four among them
        if (machine.info().compute_capability or (0, 0)) < step.min_cc:
            continue
        for what, counts in COUNTS.items():
            if step.block_m == 0 and what == "more tiles than SMs":
                continue  # the per-expert launches of step 1: nothing persistent to exercise
            p = gg.make_problem(counts, 2 * max(step.k_multiple, 64), 2 * step.block_n if step.block_n > 1 else 48)
            y = torch.full((p.x.shape[0], p.w.shape[1]), float("nan"), device="cuda", dtype=torch.bfloat16)
            launch.run_step(step, p.x, p.w, p.offs, out=y)
            check(f"{name}, {what}", y, gg.reference(p.x, p.w, p.offs))
    for what, counts in COUNTS.items():  # 03_3 and 03_4: rows gathered inside the load
        E, T = len(counts), 400
        gather_idx = torch.randint(0, T, (sum(counts),), device="cuda", dtype=torch.int32)
        offs = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
        x = torch.randn(T, 128, device="cuda").to(torch.bfloat16)
        w = (torch.randn(E, 512, 128, device="cuda") / 12).to(torch.bfloat16)
        check(f"03_3, {what}", launch.gather_grouped_gemm(x, gather_idx, w, offs),
              io_overlap.gather_reference(x, gather_idx, w, offs))
        a, h = launch.swiglu_grouped_gemm(x, gather_idx, w, offs)
        check(f"03_4, {what}", h, io_overlap.gather_reference(x, gather_idx, w, offs))
        check(f"03_4 (SwiGLU), {what}", a, io_overlap.swiglu_of(h))
        a_hf, h_hf = launch.hf_swiglu_grouped_gemm(x, gather_idx, w, offs)  # w read as HF's [gate; up]
        check(f"10_1, {what}", h_hf, io_overlap.gather_reference(x, gather_idx, io_overlap.interleave_gate_up(w), offs))
        check(f"10_1 (SwiGLU), {what}", a_hf, io_overlap.swiglu_of(h_hf))


def token_rounding() -> None:
    import torch

    from moe_course import token_rounding as tr

    for counts, T, k in (([5, 0, 17, 90, 0, 88], 100, 2), ([300, 0, 0], 300, 1)):
        scores = tr.scores_with_counts(counts, T, k, seed=1).cuda()
        for method in tr.ROUTINGS:
            got = tr.route_cuda(scores, k, 16, method)
            want = tr.route(scores.cpu(), k, 16, method)
            if not torch.equal(got.counts.cpu().long(), want.counts.long()):
                raise SystemExit(f"04_1 {method}: counts differ from torch's")
            say(f"checked 04_1 {method}, counts {counts}")


def first_kernel() -> None:
    import torch

    from moe_course import launch

    x = torch.randn(1000 * 8 + 3, device="cuda").to(torch.bfloat16)
    check("00_scale", launch.scale(x, 1.5), x.float() * 1.5)


def layer() -> None:
    import torch

    from moe_course import layer as lay
    from moe_course import layer_measurements as lm

    # the trainable layer as a learner calls it: CourseMoE on the kernels, forward and backward
    model = lay.CourseMoE(256, 256, 16, 2, device="cuda")
    x = torch.randn(40, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    model(x).float().square().mean().backward()
    if model.backend != "kernels":
        raise SystemExit(f"the layer ran on torch ({model.why_torch}): its kernels were not exercised")
    say("CourseMoE forward and backward, T=40")
    # output and every gradient against the same maths in float32 (router logits exact in both, so
    # both pick the same experts): a kernel that leaves part of its output unwritten fails here
    cases = {"experts with no rows": (40, 16, 2, 0.0, "top-K"), "more tiles than SMs": (9000, 8, 2, 0.0, "top-K"),
             "one expert with every token": (200, 4, 1, 100.0, "top-K"), "token rounding": (300, 8, 2, 0.0, "nearest")}
    for what, (T, E, k, bias, routing) in cases.items():
        inputs = lm.integer_router_inputs(T, 256, 256, E, bias, seed=T)
        for label, (got, want) in lm.kernels_and_torch(*inputs, k, routing, 64).items():
            if want.norm() == 0:  # k = 1: the one weight is always 1, so the router gets no gradient
                if got.norm() != 0:
                    raise SystemExit(f"layer, {what}: {label} should be zero")
                continue
            check(f"layer, {routing}, {what}: {label}", got, want)


def hf_experts() -> None:
    import torch

    from moe_course import hf
    from moe_course import layer as lay

    # chapter 10: transformers' experts call on the kernels (10_1 to 10_5 with 03_2 and 06_4),
    # output and every gradient against the torch maths on the same weights, in float32
    E, H, I = 6, 256, 256
    gate_up = (torch.randn(E, 2 * I, H, device="cuda") / 16).to(torch.bfloat16)
    down = (torch.randn(E, H, I, device="cuda") / 16).to(torch.bfloat16)
    cases = {"experts with no rows": torch.tensor([[4, 1], [1, 4]]), "one expert with every token": torch.full((300, 1), 3),
             "pairs routed to no expert": torch.tensor([[6, 2], [6, 6], [0, 6], [2, 2], [1, 0]]),
             "more tiles than SMs": torch.randint(0, E, (9000, 2))}
    for what, ids in cases.items():
        T, K = ids.shape
        ids = ids.cuda()
        x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
        w = torch.rand(T, K, device="cuda")
        g = torch.randn(T, H, device="cuda")
        results = []
        for run in ("kernels", "torch"):
            leaves = [t.detach().clone().requires_grad_() for t in (x, w, gate_up, down)]
            if run == "kernels":
                out = hf.KernelExperts.apply(leaves[0], ids, leaves[1], leaves[2], leaves[3])
            else:
                xf, wf, gf, df = (t.float() for t in leaves)
                out = hf.experts_torch(xf, ids, wf, gf, df, lay.TORCH_OPS)
            (out.float() * g).sum().backward()
            results.append([out, *(t.grad for t in leaves)])
        for label, got, want in zip(("out", "dx", "dweights", "dgate_up", "ddown"), *results):
            check(f"hf experts, {what}: {label}", got, want)


def decode_step() -> None:
    import torch

    from moe_course import decode, launch, moe

    # chapter 09: 09_1, 09_2 and 09_3 at every width they are built for, 09_2 in chunks of 64 too (idle
    # experts, a full one, partial ones, counts either side of a chunk), then the decode layer at 1,
    # 64 and 511 tokens, against chapter 01's layer
    for slots in launch.DECODE_SLOTS:
        counts = torch.tensor([0, 1, slots, slots // 2 + 1, 0, 3] + [c for c in (31, 33, 63, 65, 129) if c <= slots],
                              device="cuda", dtype=torch.int32)
        x = torch.randn(len(counts), slots, 192, device="cuda").to(torch.bfloat16)
        w = (torch.randn(len(counts), 256, 192, device="cuda") / 14).to(torch.bfloat16)
        want = torch.einsum("eck,enk->ecn", x.float(), w.float())
        builds = {f"09_{step}": {"step": step} for step, built in launch.DECODE_GEMMS.items() if slots in built}
        if slots in launch.DECODE_WIDE_CHUNK_STEPS:
            builds["09_2/64"] = {"chunk": launch.DECODE_WIDE_CHUNK}
        for name, how in builds.items():
            y = launch.decode_grouped_gemm(x, w, counts, **how)
            for e, c in enumerate(counts.tolist()):
                if c:
                    check(f"{name}, {slots} slots, expert {e} ({c} tokens)", y[e, :c], want[e, :c])
    for tokens in (1, 64, 511):
        g = torch.Generator().manual_seed(tokens)
        w = moe.random_weights(256, 256, 16, generator=g)
        w = moe.MoEWeights(*(t.bfloat16().float() for t in w))
        x = torch.randn(tokens, 256, generator=g).bfloat16().float()
        got = decode.masked_moe_forward_kernel(x.cuda().bfloat16(), decode.prepare(moe.MoEWeights(*(t.cuda() for t in w))), 4).y
        check(f"decode layer, {tokens} tokens", got.float().cpu(), moe.moe_forward(x, w, 4).y)


def fp8_kernels() -> None:
    import torch

    from moe_course import fp8, launch

    # chapter 07: 07_1 (gathered, with an index outside x) against the torch maths, then 07_2 on
    # its output at the awkward counts, against the float32 product of the dequantised operands, and
    # 07_3 (the same product, SwiGLU, quantised) against SwiGLU of that product
    x = torch.randn(300, 256, device="cuda").to(torch.bfloat16)
    gather_idx = torch.randint(0, 300, (333,), device="cuda", dtype=torch.int32)
    gather_idx[7] = 300
    q, scales = launch.quantize_1x128(x, gather_idx, validate=False)
    rows = torch.where((gather_idx < 300)[:, None], x[gather_idx.clamp(max=299).long()], 0).float()
    q_ref, scales_ref = (t.cuda() for t in fp8.quantize_groups(rows.cpu()))  # IEEE division, as 07_1
    check("07_1 (gathered)", fp8.dequantize_groups(q, scales[:, :333].T.contiguous()),
          fp8.dequantize_groups(q_ref, scales_ref), tol=0.0)
    for what, counts in COUNTS.items():
        E = len(counts)
        offs = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
        x = torch.randn(sum(counts), 384, device="cuda").to(torch.bfloat16)
        w = (torch.randn(E, 256, 384, device="cuda") / 20).to(torch.bfloat16)
        x_q, x_scales = launch.quantize_1x128(x)
        w_q, w_scales = fp8.quantize_blocks(w)
        y = torch.full((x.shape[0], 256), float("nan"), device="cuda", dtype=torch.bfloat16)
        launch.fp8_grouped_gemm(x_q, x_scales, w_q, w_scales, offs, out=y)
        want = fp8.grouped_block_scaled_matmul(x_q, x_scales[:, :x.shape[0]].T.contiguous(), w_q, w_scales, offs)
        check(f"07_2, {what}", y, want, tol=1e-2)
        a_q, a_scales = launch.fp8_swiglu_quantize(x_q, x_scales, w_q, w_scales, offs)  # w's rows as (gate, up)
        check(f"07_3, {what}", fp8.dequantize_groups(a_q, a_scales[:, :x.shape[0]].T.contiguous()),
              torch.nn.functional.silu(want[:, 0::2].float()) * want[:, 1::2].float(), tol=5e-2)
        tokens = torch.randn(max(1, x.shape[0] // 2), 384, device="cuda").to(torch.bfloat16)
        gather_idx = torch.randint(0, tokens.shape[0], (x.shape[0],), device="cuda", dtype=torch.int32)
        t_q, t_scales = launch.quantize_1x128(tokens)
        got = launch.fp8_gather_swiglu_quantize(t_q, t_scales, gather_idx, w_q, w_scales, offs)
        want_q, _ = launch.fp8_swiglu_quantize(*launch.quantize_1x128(tokens, gather_idx), w_q, w_scales, offs)
        check(f"07_4, {what}", got[0].float(), want_q.float(), tol=0.0)  # the same bytes as 07_3 on gathered rows


PARTS = {part.__name__: part for part in (first_kernel, grouped_gemms, token_rounding, layer, hf_experts,
                                          decode_step, fp8_kernels)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS),
                    help="run only these parts (to find which one a report comes from); default: all")
    ap.add_argument("--verbose", action="store_true", help="a line after each case (where a report comes from)")
    args = ap.parse_args(argv)
    global VERBOSE
    VERBOSE = args.verbose
    if not machine.has_gpu():
        print(f"nothing to run: {machine.info().why_no_gpu}")
        return 0
    track_launches()
    for name in args.parts:
        PARTS[name]()
        print(f"{name}: done", flush=True)
    missing = kernels.entry_points() - Tracked.launched
    print(f"{len(Tracked.launched & kernels.entry_points())} of {len(kernels.entry_points())} kernels launched")
    if missing and args.parts == list(PARTS):
        print(f"not launched by this workload: {', '.join(sorted(missing))}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
