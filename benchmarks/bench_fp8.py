"""Chapter 07 measured: the block-scaled FP8 grouped GEMM against bf16 and against torch's FP8.

On the four shapes of chapter 02 (uniform top-K routing, rows sorted by expert), up-projection
(N = 2n, K = d) and down-projection (N = d, K = n), in one run on one GPU, contenders in turns:

- ``07_1+07_2``: the course's quantisation of X (1 x 128 scales) then its FP8 GEMM (128 x 128
  weight blocks, promoted every 128 of K; 128 x 256 tiles where N divides by 256): what an FP8
  layer pays per call (the weights are quantised once, offline);
- ``07_2``: the GEMM alone, on X already quantised; ``07_2 at 128x128``: its narrower build, the
  same bytes (checked), where the default is the wide one; ``07_1``: the quantisation alone;
- ``07_3`` (up-projections): the same GEMM with SwiGLU and the activation's quantisation in its
  epilogue, what the FP8 layer runs in place of 07_2 + SwiGLU + 07_1 (same FLOPs counted);
- ``07_1+07_4`` (up-projections): the layer's T tokens quantised once, then 07_3 with those rows
  gathered in its load (T k rows, as the others'): what the FP8 layer runs;
- ``03_2 bf16``: the course's bf16 kernel (chapter 03), and ``torch._grouped_mm`` (bf16, CUTLASS);
- ``torch._scaled_grouped_mm``: torch's FP8 grouped GEMM, row-wise scales (the finest it takes),
  on inputs already quantised (its quantisation is not charged to it).

Not a contender: DeepGEMM's m-grouped FP8 GEMM. ``deep-gemm`` on PyPI (1.0.0, the only
release) is a 19 KB source archive without the CUDA headers its JIT compiles (deep_gemm/include
and CUTLASS's cute are not in it), so it cannot run; DeepGEMM from its repository compiles each
kernel with nvcc at run time (kernels/NOTES.md, session 13).

Every FP8 result is checked first against the float32 product of the dequantised operands (and
its distance from the bf16 product reported: the quantisation error); a wrong one is reported,
never timed. Dense rates measured in the same run (8192^3: ``torch._scaled_mm`` e4m3 row-wise,
bf16 ``torch.mm``) are the ceilings each result is shown against. Without a GPU it prints the
recorded results.

A kernel experiment is tried with ``--try``: 07_2, 07_3 and 07_4 built again with the given
#defines added to each default build's, their bytes checked equal to the default's first,
then timed in the same turns; the record keeps them under ``tried`` (the tables show the
defaults), and a line after each row says how they did.

    python benchmarks/bench_fp8.py
    python benchmarks/bench_fp8.py --shapes mixtral-8x7b --no-save
    python benchmarks/bench_fp8.py --no-layer --try ISSUE_IN_TURN=1
"""

from __future__ import annotations

import argparse
import sys

from moe_course import configs, fp8, records
from moe_course.checks import argument_type, defines_argument, defines_label, run_command
from moe_course.machine import info

KIND = "fp8_grouped_gemm"  # benchmarks/results/fp8_grouped_gemm__<gpu>.json (fp8.GEMM_KIND)


def dense_rates() -> dict:
    """TFLOP/s of dense 8192^3 products on this GPU: e4m3 with row-wise scales, and bf16."""
    import torch

    from moe_course.bench import interleaved

    n = 8192
    a = torch.randn(n, n, device="cuda")
    b = torch.randn(n, n, device="cuda")
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    sa, sb = torch.ones(n, 1, device="cuda"), torch.ones(1, n, device="cuda")
    a16, b16 = a.bfloat16(), b.bfloat16()
    m = interleaved({"fp8": lambda: torch._scaled_mm(a8, b8.T, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16),
                     "bf16": lambda: a16 @ b16}, rounds=5, reps=10, flops=2.0 * n**3)
    return {name: r.tflops for name, r in m.items()}


def _reference(x_q, x_scales, w_q, w_scales, offs, rows):
    """float32 product of the dequantised operands for the experts owning ``rows`` (a sample)."""
    M = x_q.shape[0]
    out, start = {}, 0
    for e, end in enumerate(offs.tolist()):
        if end > start and e in rows:
            x = x_q[start:end].float() * x_scales[:, start:end].T.repeat_interleave(128, dim=1)
            w = w_q[e].float() * w_scales[e].repeat_interleave(128, 0).repeat_interleave(128, 1)
            out[e] = (start, end, x @ w.T)
        start = end
    assert start == M
    return out


def tried_summary(row: dict) -> list[str]:
    """One line a tried build: each kernel's default ms over its own (>1: the experiment is faster)."""
    out = []
    for label, kernels in row.get("tried", {}).items():
        if "error" in kernels:
            out.append(f"{'':<22}tried {label}: {kernels['error']}")
            continue
        parts = [f"{name} x{row[name]['ms'] / r['ms']:.3f} ({r['ms']:.3f} ms, {r['tflops']:.0f} TFLOP/s)"
                 for name, r in kernels.items() if name in row]
        out.append(f"{'':<22}tried {label} over the default: " + ", ".join(parts))
    return out


def measure_one(cfg, proj: str, dense: dict, tried: tuple[dict, ...] = ()) -> dict:
    import torch

    from moe_course import launch
    from moe_course.bench import interleaved
    from moe_course.checking import relative_error, same_bytes
    from moe_course.grouped_gemm import expert_counts, make_problem

    d_in, d_out = (cfg.d, 2 * cfg.n) if proj == "up" else (cfg.n, cfg.d)
    counts = expert_counts(cfg.T, cfg.E, cfg.K)
    p = make_problem(counts, d_in, d_out)
    x, w, offs = p.x, p.w, p.offs
    w_q, w_scales = fp8.quantize_experts(fp8.quantize_blocks, w)  # offline: once per weight
    w_rows_q, w_rows_scales = fp8.quantize_experts(fp8.quantize_per_row, w)  # torch's finest: a scale per output channel
    x_q, x_scales = launch.quantize_1x128(x)
    x_rows_q, x_rows_scales = fp8.quantize_per_row(x)
    M = x.shape[0]
    row = {"shape": cfg.name, "proj": proj, "M": M, "N": d_out, "K": d_in, "E": cfg.E, "flops": p.flops}

    # checked first, on a sample of experts (the first, the largest, the last with rows)
    y = launch.fp8_grouped_gemm(x_q, x_scales, w_q, w_scales, offs)
    owners = [int(counts.argmax()), int((counts > 0).nonzero()[0]), int((counts > 0).nonzero()[-1])]
    ref = _reference(x_q, x_scales, w_q, w_scales, offs, set(owners))
    row["rel_err"] = max(relative_error(y[s:e].float(), r) for s, e, r in ref.values())
    row["quantisation_err"] = max(relative_error(y[s:e].float(), x[s:e].float() @ w[k].float().T)
                                  for k, (s, e, _) in ref.items())
    if not row["rel_err"] < 1e-2:
        row["error"] = f"07_2 is wrong: relative error {row['rel_err']:.3g} against the dequantised product"
        return row
    if proj == "up":  # the layer's T tokens, whose rows 07_4 gathers (T k rows, as x's)
        tokens = torch.randn(cfg.T, d_in, device="cuda").bfloat16()
        gather_idx = torch.randint(0, cfg.T, (M,), device="cuda", dtype=torch.int32)
    if proj == "up":  # 07_3's activation, dequantised, against SwiGLU of 07_2's sums (in float32)
        a_q, a_scales = launch.fp8_swiglu_quantize(x_q, x_scales, w_q, w_scales, offs)
        a = a_q.float() * a_scales[:, :M].T.repeat_interleave(128, dim=1)
        row["swiglu_rel_err"] = max(relative_error(a[s:e], torch.nn.functional.silu(r[:, 0::2]) * r[:, 1::2])
                                    for s, e, r in ref.values())
        if not row["swiglu_rel_err"] < 5e-2:
            row["error"] = f"07_3 is wrong: relative error {row['swiglu_rel_err']:.3g} against SwiGLU of the product"
            return row

    narrow = launch.FP8_GEMM  # 07_2 at 128 x 128, where the default is 128 x 256: the same bytes expected
    has_narrow = launch.fp8_gemm_step(d_out) is not narrow
    if has_narrow:
        y_narrow = launch.fp8_grouped_gemm(x_q, x_scales, w_q, w_scales, offs, step=narrow)
        row["narrow_equals_07_2"] = bool(torch.equal(y_narrow, y))
        if not row["narrow_equals_07_2"]:
            row["error"] = "07_2 at 128 x 128 and at 128 x 256 give different bytes"
            return row

    # --try: the same kernels with more #defines; the same bytes first (the order of the sums is unchanged)
    tried_fns, row["tried"] = {}, {}
    for defines in tried:
        label = defines_label(defines)
        gemm, swiglu, gather = (step.with_defines(**defines) for step in
                                (launch.fp8_gemm_step(d_out), launch.FP8_SWIGLU, launch.FP8_GATHER))
        gemms = (gemm, narrow.with_defines(**defines)) if has_narrow else (gemm,)
        same = all(same_bytes(launch.fp8_grouped_gemm(x_q, x_scales, w_q, w_scales, offs, step=s), y) for s in gemms)
        if same and proj == "up":
            tokens_q = launch.quantize_1x128(tokens)
            pairs = [(launch.fp8_swiglu_quantize(x_q, x_scales, w_q, w_scales, offs, step=swiglu), (a_q, a_scales)),
                     (launch.fp8_gather_swiglu_quantize(*tokens_q, gather_idx, w_q, w_scales, offs, step=gather),
                      launch.fp8_gather_swiglu_quantize(*tokens_q, gather_idx, w_q, w_scales, offs))]
            same = all(same_bytes(mine, theirs) for got, default in pairs for mine, theirs in zip(got, default))
        if not same:
            row["tried"][label] = {"error": "not the default's bytes: not timed"}
            continue
        row["tried"][label] = {}
        tried_fns[(label, "07_2")] = lambda s=gemm: launch.fp8_grouped_gemm(x_q, x_scales, w_q, w_scales, offs,
                                                                            validate=False, step=s)
        if has_narrow:  # the experiment may change which width is faster
            tried_fns[(label, "07_2 at 128x128")] = lambda s=gemms[1]: launch.fp8_grouped_gemm(
                x_q, x_scales, w_q, w_scales, offs, validate=False, step=s)
        if proj == "up":
            tried_fns[(label, "07_3")] = lambda s=swiglu: launch.fp8_swiglu_quantize(x_q, x_scales, w_q, w_scales,
                                                                                     offs, validate=False, step=s)
            tried_fns[(label, "07_1+07_4")] = lambda s=gather: launch.fp8_gather_swiglu_quantize(
                *launch.quantize_1x128(tokens, validate=False), gather_idx, w_q, w_scales, offs, validate=False, step=s)

    def scaled_grouped_mm():
        return torch._scaled_grouped_mm(x_rows_q, w_rows_q.transpose(1, 2), x_rows_scales.view(-1),
                                        w_rows_scales.view(cfg.E, -1), offs=offs, out_dtype=torch.bfloat16,
                                        use_fast_accum=True)

    fns = {"07_1+07_2": lambda: launch.fp8_grouped_gemm(*launch.quantize_1x128(x, validate=False), w_q, w_scales,
                                                          offs, validate=False),
           "07_2": lambda: launch.fp8_grouped_gemm(x_q, x_scales, w_q, w_scales, offs, validate=False),
           "07_1": lambda: launch.quantize_1x128(x, validate=False),
           **({"07_2 at 128x128": lambda: launch.fp8_grouped_gemm(x_q, x_scales, w_q, w_scales, offs,
                                                                 validate=False, step=narrow)}
              if has_narrow else {}),
           **({"07_3": lambda: launch.fp8_swiglu_quantize(x_q, x_scales, w_q, w_scales, offs, validate=False),
               "07_1+07_4": lambda: launch.fp8_gather_swiglu_quantize(*launch.quantize_1x128(tokens, validate=False),
                                                                      gather_idx, w_q, w_scales, offs, validate=False)}
              if proj == "up" else {}),
           "03_2 bf16": lambda: launch.grouped_gemm(x, w, offs, validate=False),
           "torch._grouped_mm": lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=offs)}
    try:
        theirs = scaled_grouped_mm()
        sample = ref[owners[0]]
        row["torch_fp8_rel_err"] = relative_error(theirs[sample[0]:sample[1]].float(),
                                                  x[sample[0]:sample[1]].float() @ w[owners[0]].float().T)
        fns["torch._scaled_grouped_mm"] = scaled_grouped_mm
    except Exception as exc:  # say what torch refused, time the rest
        row["torch._scaled_grouped_mm"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    fns |= {f"{kernel} [{label}]": fn for (label, kernel), fn in tried_fns.items()}
    flops = {name: (0.0 if name == "07_1" else p.flops) for name in fns}
    nbytes = {name: (3.0 * x.numel() + 4.0 * x_scales.numel() if name == "07_1" else 0.0) for name in fns}
    m = interleaved(fns, rounds=5, reps=10, flops=flops, bytes=nbytes)
    for name, r in m.items():
        result = {**r.timing(), "tflops": r.tflops, "of_dense_fp8": r.tflops / dense["fp8"]}
        if name == "07_1":
            result["tbps"] = r.tbps
        kernel, _, label = name.partition(" [")
        if label:
            row["tried"][label.removesuffix("]")][kernel] = result
        else:
            row[name] = result
    if not row["tried"]:
        del row["tried"]
    return row


def measure_layer(cfg) -> dict:
    """The whole layer's forward (routing, up with SwiGLU, down, combine) in bf16 (chapter 06's
    kernels, ``layer.forward``) and with FP8 experts (``layer.forward_fp8``), on the same tokens
    and weights: ms of each, and how far the FP8 output is from the bf16 one."""
    import torch

    from moe_course import layer, moe
    from moe_course.bench import interleaved
    from moe_course.checking import relative_error

    g = torch.Generator(device="cuda").manual_seed(0)
    w = moe.MoEWeights(*(torch.randn(*shape, device="cuda", generator=g).bfloat16() / shape[-2]**0.5
                         for shape in ((cfg.d, cfg.E), (cfg.E, cfg.d, cfg.n), (cfg.E, cfg.d, cfg.n), (cfg.E, cfg.n, cfg.d))))
    kw = layer.prepare(w)
    del w
    fw = layer.prepare_fp8(kw)
    x = torch.randn(cfg.T, cfg.d, device="cuda", generator=g).bfloat16()
    bf16 = layer.forward(x, kw, cfg.K)
    row = {"shape": cfg.name, "T": cfg.T, "fp8_up": "07_4" if layer.gathers_in_kernel(fw) else "07_3"}
    row["fp8_vs_bf16"] = max(relative_error(layer.forward_fp8(x, fw, cfg.K, gather=g).float(), bf16.float())
                             for g in fp8.LAYER_WAYS.values())
    flops = 2.0 * cfg.T * cfg.K * 3 * cfg.d * cfg.n
    m = interleaved({"bf16": lambda: layer.forward(x, kw, cfg.K),
                     **{name: (lambda g=g: layer.forward_fp8(x, fw, cfg.K, gather=g))
                        for name, g in fp8.LAYER_WAYS.items()}},
                    rounds=5, reps=10, flops=flops)
    for name, r in m.items():
        row[name] = {**r.timing(), "tflops": r.tflops}
    row["FP8"] = row[f"FP8 via {row['fp8_up']}"]  # what layer.forward_fp8 chooses
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", type=argument_type(configs.by_name), default=list(configs.CHAPTER02),
                    metavar="NAME", help=f"MoE configurations (default: the four of chapter 02): {', '.join(configs.names())}")
    ap.add_argument("--proj", nargs="+", choices=("up", "down"), default=["up", "down"])
    ap.add_argument("--no-layer", action="store_true", help="only the GEMMs, not the whole layer's forward")
    ap.add_argument("--no-save", action="store_true", help="do not write the record")
    ap.add_argument("--try", dest="tried", action="append", default=[], type=argument_type(defines_argument),
                    metavar="KEY=VAL[,KEY=VAL]", help="an experiment: 07_2, 07_3 and 07_4 built with these #defines "
                    "too, checked against the defaults' bytes, timed beside them (repeatable)")
    args = ap.parse_args(argv)
    if not info().has_gpu:
        rec = records.recorded_instead(KIND)
        if rec is not None:
            print(fp8.gemm_table(rec.data))
        return 0
    import torch

    data = {"dense_tflops": dense_rates(), "rows": [], "layers": []}
    print(fp8.gemm_table({**data, "rows": []}).splitlines()[0], flush=True)
    for cfg in args.shapes:
        for proj in args.proj:
            data["rows"].append(measure_one(cfg, proj, data["dense_tflops"], tuple(args.tried)))
            torch.cuda.empty_cache()  # the last shape's operands, freed on return
            print("\n".join(fp8.gemm_table({**data, "rows": data["rows"][-1:]}).splitlines()[2:]
                            + tried_summary(data["rows"][-1])), flush=True)
        if not args.no_layer:
            data["layers"].append(measure_layer(cfg))
            torch.cuda.empty_cache()
            print(fp8.gemm_table({**data, "rows": []}).splitlines()[-1], flush=True)
        if not args.no_save:  # after every shape: a run cut short keeps what it measured
            records.save(KIND, data)
    print(fp8.gemm_table(data))
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
