#!/usr/bin/env python3
"""Tokens per day and cost per token of training and serving an MoE model, from first principles.

    python benchmarks/throughput.py --config deepseek-v3 --hardware h100 --num-gpus 8
    python benchmarks/throughput.py --config qwen3-30b-a3b --hardware h200 --mfu 0.45 --json
    python benchmarks/throughput.py --config sonicmoe-7b --hardware h200 --mfu-from-record ceilings
    python benchmarks/throughput.py --list

The formula (printed with every answer):

    FLOPs per token, training  = 6 x N + 6 x L x S x (qk + v)
    FLOPs per token, inference = 2 x N + 2 x L x S x (qk + v)
        N      active parameters that take part in a matmul (all active ones but the input
               embedding, a table look-up): attention, dense FFNs, the K routed and the shared
               experts, routers, output head. 2 FLOPs per parameter forward, 4 more backward.
        L x S x (qk + v)  attention scores and their weighted sum over S keys in each of the L
               blocks (qk, v: query heads times head dims); PaLM's convention, no causal halving.
               --seq-len 0 leaves them out: the plain "6 x active parameters".
    tokens per second = GPUs x peak FLOP/s x MFU / FLOPs per token
    cost per token    = GPUs x price per GPU-hour / (tokens per second x 3600)

The efficiency (MFU, model FLOPs utilisation: useful FLOP/s over the peak) is either assumed
(--mfu, default 0.35: about what DeepSeek-V3's report implies, see DEFAULT_MFU) or taken from a
recorded benchmark of the course's kernels (--mfu-from-record KIND): that record's TFLOP/s for
this model's MoE shape, over the peak of the GPU it was measured on. A kernel's efficiency is an
upper bound for a whole training step, which also runs attention, communication and the
optimizer. Everything else assumed is printed too.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from moe_course import RESULTS_DIR, configs, hardware, records
from moe_course.checks import (argument_type, existing_dir, fraction, nonnegative_int, positive_float, positive_int,
                               run_command)

#: DeepSeek-V3's report (arXiv 2412.19437): 14.8T pre-training tokens in 2.664M H800 GPU-hours.
#: With 6 x 37B FLOPs per token that is 3.29e24 FLOPs / 9.59e9 GPU-seconds = 343 TFLOP/s per GPU,
#: 35% of the H800's 989 TFLOP/s dense bf16 peak (it trained largely in FP8, so this is a
#: bf16-equivalent figure). Tests check that this round trip holds.
DEFAULT_MFU = 0.35
#: Keys each token attends to, for the attention-score FLOPs: DeepSeek-V3, OLMoE and the first
#: stages of Qwen3 pre-train with 4K-token sequences.
DEFAULT_SEQ_LEN = 4096
SECONDS_PER_DAY = 86_400
#: Bytes per parameter that training keeps on the GPUs: bf16 weights and gradients (2 + 2), an
#: fp32 master copy and Adam's two moments (4 + 4 + 4). Activations come on top.
TRAIN_BYTES_PER_PARAM = 16
#: Bytes per parameter of bf16 weights for serving (KV cache and activations come on top).
SERVE_BYTES_PER_PARAM = 2


# ----------------------------------------------------------------------------------------------
# Efficiency: assumed, or from a record
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Efficiency:
    mfu: float
    source: str  # one line: where the number comes from


@dataclass(frozen=True)
class _Entry:
    implementation: str
    shape: tuple | None  # (T, d, n, E, K), or None when the entry names no MoE shape
    tflops: float


def _shape_of(entry: dict) -> tuple | None:
    """``(T, d, n, E, K)`` from keys T, d, n, E, K or a 5-list ``shape``, in the entry itself or
    in its ``params``; ``None`` if it names no MoE shape."""
    params = entry.get("params") if isinstance(entry.get("params"), dict) else {}
    for holder in (entry, params, entry.get("shape"), params.get("shape")):
        if isinstance(holder, dict) and all(k in holder for k in "TdnEK"):
            return tuple(int(holder[k]) for k in "TdnEK")
        if isinstance(holder, (list, tuple)) and len(holder) == 5:
            return tuple(int(v) for v in holder)
    return None


#: Fields that tell apart several measurements of one implementation on one shape.
_QUALIFIERS = ("proj", "routing", "pass")


def _tflops_entries(obj) -> list[_Entry]:
    """Every TFLOP/s figure in a record's data, with the implementation and MoE shape it belongs
    to. Understood anywhere in the data: rows with a ``tflops`` key, named by ``impl``,
    ``implementation`` or ``name`` (``moe_course.bench.Measurement`` dicts, the rows of
    ``benchmarks/bench_grouped_gemm.py``) and rows with one ``<implementation>_tflops`` key per
    implementation. The shape is read from keys T, d, n, E, K (or ``params``); ``proj``,
    ``routing`` and ``pass`` are added to the implementation's name."""
    found = []
    if isinstance(obj, list):
        for item in obj:
            found += _tflops_entries(item)
    elif isinstance(obj, dict):
        shape = _shape_of(obj)
        qualifiers = [str(obj[k]) for k in _QUALIFIERS if isinstance(obj.get(k), str)]
        for key, value in obj.items():
            if key.endswith("tflops") and isinstance(value, (int, float)) and not isinstance(value, bool):
                impl = key[: -len("tflops")].rstrip("_") or str(
                    obj.get("impl") or obj.get("implementation") or obj.get("name") or "?")
                found.append(_Entry(" ".join([impl] + qualifiers), shape, float(value)))
            elif isinstance(value, (dict, list)) and key != "params":
                found += _tflops_entries(value)
    return found


def _recorded_kinds(folder: Path) -> list[str]:
    return sorted({p.name.split("__")[0] for p in folder.glob("*__*.json")})


def efficiency_from_record(kind: str, config: configs.MoEConfig, *, implementation: str | None = None,
                           peak_source: str = "datasheet", results_dir: Path | None = None) -> Efficiency:
    """The efficiency of the course's own kernels on this model's MoE shape, from a record in
    ``benchmarks/results/``: its TFLOP/s over the peak of the GPU it was measured on. A
    ``ceilings`` record gives the dense matmul's efficiency, an upper bound for any MoE kernel."""
    folder = Path(results_dir or RESULTS_DIR)
    rec = records.load(kind, results_dir=folder)
    if rec is None:
        kinds = ", ".join(_recorded_kinds(folder)) or "none"
        raise LookupError(f"no recorded '{kind}' results in {folder} (recorded kinds there: {kinds}). "
                          f"Record them on a GPU first, or assume an efficiency with --mfu.")
    gpu = hardware.for_gpu_name(rec.gpu)
    if gpu is None:
        raise LookupError(f"the '{kind}' record was measured on {rec.gpu!r}, which matches none of the "
                          f"hardware profiles ({', '.join(hardware.names())}); pass --mfu instead")
    peak = gpu.rates(peak_source, results_dir=folder)
    entries = _tflops_entries(rec.data)
    shaped = [e for e in entries if e.shape is not None]
    if not shaped:
        if "matmul_tflops" not in rec.data:
            raise LookupError(f"the '{kind}' record ({rec.label()}) holds no measurement of an MoE "
                              f"shape (T, d, n, E, K), so it says nothing about an MoE layer's efficiency")
        tflops, what = rec.need("matmul_tflops", layout=float), "dense bf16 matmul (an upper bound for any MoE kernel)"
    else:
        mine = [e for e in shaped if e.shape == tuple(config.shape)]
        if implementation:  # an exact name, or else every word of it found in the name
            want = implementation.lower()
            exact = [e for e in mine if e.implementation.lower() == want]
            mine = exact or [e for e in mine if all(w in e.implementation.lower() for w in want.split())]
        if not mine:
            have = sorted({f"{e.shape} {e.implementation}" for e in shaped})
            raise LookupError(f"the '{kind}' record ({rec.label()}) has no measurement of "
                              f"{config.name} {config.shape}"
                              + (f" by an implementation called {implementation!r}" if implementation else "")
                              + "; it has: " + "; ".join(have))
        if len(mine) > 1:
            options = ", ".join(f"{e.implementation} ({e.tflops:.0f} TFLOP/s)" for e in mine)
            raise LookupError(f"the '{kind}' record has several measurements of {config.name}: {options}; "
                              f"choose one with --implementation")
        tflops, what = mine[0].tflops, f"{mine[0].implementation} on {config.name} {config.shape}"
    mfu = tflops / peak.matmul_tflops
    return Efficiency(mfu, f"from the '{kind}' record: {what}, {tflops:.0f} TFLOP/s on {rec.label()}, "
                           f"over its peak of {peak.matmul_tflops:.0f} TFLOP/s ({peak.label})")


# ----------------------------------------------------------------------------------------------
# The estimate
# ----------------------------------------------------------------------------------------------

def _positive(name: str, value, *, integer: bool = False, allow_zero: bool = False, at_most=None):
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or value < 0 or (value == 0 and not allow_zero) \
            or (at_most is not None and value > at_most) or value != value:
        kind = "an integer" if integer else "a number"
        limits = f"{'>= 0' if allow_zero else '> 0'}" + (f" and <= {at_most}" if at_most is not None else "")
        raise ValueError(f"{name} must be {kind} {limits}, got {value!r}")
    return value


def _rates(flops_per_token: float, num_gpus: int, flops_per_gpu: float, price: float) -> dict:
    tokens_per_s = num_gpus * flops_per_gpu / flops_per_token
    usd_per_token = num_gpus * price / (tokens_per_s * 3600)
    return {"flops_per_token": flops_per_token,
            "tokens_per_second": tokens_per_s,
            "tokens_per_day": tokens_per_s * SECONDS_PER_DAY,
            "gpu_hours_per_billion_tokens": num_gpus * 1e9 / tokens_per_s / 3600,
            "usd_per_million_tokens": usd_per_token * 1e6,
            "usd_per_billion_tokens": usd_per_token * 1e9}


def estimate(config="deepseek-v3", hw="h100", *, num_gpus: int = 8, mfu: float | None = None,
             mfu_from_record: str | None = None, implementation: str | None = None,
             price_per_gpu_hour: float | None = None, peak_tflops: float | None = None,
             measured_peak: bool = False, seq_len: int = DEFAULT_SEQ_LEN,
             results_dir: Path | None = None) -> dict:
    """Tokens per day and cost of training and inference; returns a JSON-ready dict holding the
    inputs, both results, the formula and every assumption. ``config`` and ``hw`` are names or
    ``configs.MoEConfig`` / ``hardware.Hardware`` objects."""
    cfg = configs.by_name(config) if isinstance(config, str) else config
    gpu = hardware.by_name(hw) if isinstance(hw, str) else hw
    _positive("num_gpus", num_gpus, integer=True)
    _positive("seq_len", seq_len, integer=True, allow_zero=True)
    if mfu is not None and mfu_from_record is not None:
        raise ValueError("give either mfu or mfu_from_record, not both")
    if implementation and not mfu_from_record:
        raise ValueError("implementation chooses a measurement of a record: it needs mfu_from_record")
    if peak_tflops is not None and measured_peak:
        raise ValueError("give either peak_tflops or measured_peak, not both")

    # The peak the MFU is a fraction of.
    if peak_tflops is not None:
        peak, peak_label = _positive("peak_tflops", peak_tflops), "given (--peak-tflops)"
    else:
        rates = gpu.rates("measured" if measured_peak else "datasheet", results_dir=results_dir)
        peak, peak_label = rates.matmul_tflops, rates.label
    if mfu_from_record:
        eff = efficiency_from_record(mfu_from_record, cfg, implementation=implementation,
                                     peak_source="measured" if measured_peak else "datasheet",
                                     results_dir=results_dir)
    elif mfu is not None:
        eff = Efficiency(_positive("mfu", mfu, at_most=1), "assumed (--mfu)")
    else:
        eff = Efficiency(DEFAULT_MFU, "assumed (the default: about what DeepSeek-V3's reported "
                                      "GPU-hours imply against the bf16 peak)")
    if price_per_gpu_hour is not None:
        price, price_label = _positive("price_per_gpu_hour", price_per_gpu_hour), "given (--price-per-gpu-hour)"
    else:
        price, price_label = gpu.price_per_gpu_hour, gpu.price_note

    n_matmul = cfg.active_matmul_params
    attn_fwd = cfg.layers * cfg.attention_score_flops(seq_len)  # per token, forward
    flops_per_gpu = peak * 1e12 * eff.mfu
    training = {**_rates(6 * n_matmul + 3 * attn_fwd, num_gpus, flops_per_gpu, price),
                "flops_parts": {"6N": 6 * n_matmul, "attention": 3 * attn_fwd}}
    inference = {**_rates(2 * n_matmul + attn_fwd, num_gpus, flops_per_gpu, price),
                 "flops_parts": {"2N": 2 * n_matmul, "attention": attn_fwd}}

    gpus_gb = num_gpus * gpu.memory_gb
    train_gb = cfg.total_params * TRAIN_BYTES_PER_PARAM / 1e9
    serve_gb = cfg.total_params * SERVE_BYTES_PER_PARAM / 1e9
    memory = {"gpus_gb": gpus_gb, "training_state_gb": train_gb, "inference_weights_gb": serve_gb,
              "training_fits": train_gb <= gpus_gb, "inference_fits": serve_gb <= gpus_gb}

    assumptions = [
        f"efficiency (MFU) {eff.mfu:.3f}: {eff.source}",
        f"peak {peak:.0f} TFLOP/s dense bf16 per GPU: {peak_label}",
        f"price ${price:.2f} per GPU-hour: {price_label}",
        f"the same MFU for training and inference; inference is counted compute-bound (large "
        f"batches, prefill-like): small-batch decoding is limited by memory bandwidth instead "
        f"({gpu.hbm_tbps:g} TB/s per GPU), which this does not model",
        f"{num_gpus} GPUs scale perfectly: tokens per day grow with the GPU count and the cost per "
        f"token does not depend on it (communication between GPUs is not modelled)",
        f"attention over S = {seq_len} keys per token" + (" (left out: --seq-len 0)" if seq_len == 0 else
                                                          ", no causal halving (PaLM's convention)"),
        "FLOPs of norms, activations, softmax and routing are left out (well under 1%)",
    ]
    if cfg.assumed:
        assumptions.append(f"{cfg.title}: {', '.join(cfg.assumed)} are the course's assumptions, "
                           f"not from a source ({cfg.source})")
    if eff.source.startswith("from the"):
        assumptions.append("a kernel's efficiency carried over to a whole training step, and to this "
                           "GPU: an upper bound (a step also runs attention, communication, the optimizer)")
    warnings = []
    if not memory["training_fits"]:
        warnings.append(f"training state ({TRAIN_BYTES_PER_PARAM} bytes/parameter: {train_gb:,.0f} GB) "
                        f"does not fit in {num_gpus} x {gpu.memory_gb:g} GB = {gpus_gb:,.0f} GB: "
                        f"needs at least {int(-(-train_gb // gpu.memory_gb))} GPUs before activations")
    if not memory["inference_fits"]:
        warnings.append(f"bf16 weights ({serve_gb:,.0f} GB) do not fit in {gpus_gb:,.0f} GB of GPU memory")

    formula = [
        "FLOPs/token, training  = 6 x N + 3 x L x 2 x S x (qk + v)",
        "FLOPs/token, inference = 2 x N +     L x 2 x S x (qk + v)",
        f"  N  = {n_matmul:,} active matmul parameters (active {cfg.active_params:,} minus the "
        f"input embedding, a look-up)",
        f"  L  = {cfg.layers} blocks, S = {seq_len} keys, qk = {cfg.attn_qk_dim}, v = {cfg.attn_v_dim}",
        f"tokens/s = GPUs x peak x MFU / FLOPs per token = {num_gpus} x {peak:.0f}e12 x {eff.mfu:.3f} / FLOPs per token",
        "tokens/day = tokens/s x 86400",
        f"$/token = GPUs x $/GPU-hour / (tokens/s x 3600) = {num_gpus} x {price:.2f} / (tokens/s x 3600)",
    ]
    return {
        "config": {"name": cfg.name, "title": cfg.title, **cfg.shape.as_dict(),
                   "total_params": cfg.total_params, "active_params": cfg.active_params,
                   "active_matmul_params": n_matmul, "reported_total": cfg.reported_total,
                   "reported_active": cfg.reported_active, "source": cfg.source},
        "hardware": {"name": gpu.name, "title": gpu.title, "peak_tflops": peak, "peak_source": peak_label,
                     "price_per_gpu_hour": price, "price_source": price_label, "memory_gb": gpu.memory_gb,
                     "hbm_tbps": gpu.hbm_tbps},
        "num_gpus": num_gpus, "mfu": eff.mfu, "mfu_source": eff.source, "seq_len": seq_len,
        "training": training, "inference": inference, "memory": memory,
        "formula": formula, "assumptions": assumptions, "warnings": warnings,
    }


# ----------------------------------------------------------------------------------------------
# Printing
# ----------------------------------------------------------------------------------------------

def _si(x: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g} {unit}"
    return f"{x:.3g}"


def report(r: dict) -> str:
    c, h = r["config"], r["hardware"]
    reported = ""
    if c["reported_total"]:
        reported = (f" (reported: {c['reported_total'] / 1e9:g}B"
                    + (f", {c['reported_active'] / 1e9:g}B active" if c["reported_active"] else "") + ")")
    lines = [
        f"{c['title']} on {r['num_gpus']} x {h['title']}",
        "",
        f"model      {c['total_params'] / 1e9:.1f}B parameters, {c['active_params'] / 1e9:.2f}B active per token{reported}",
        f"           MoE layer (T={c['T']}, d={c['d']}, n={c['n']}, E={c['E']}, K={c['K']})",
        f"hardware   {h['peak_tflops']:.0f} TFLOP/s dense bf16 per GPU, ${h['price_per_gpu_hour']:.2f} per GPU-hour",
        f"efficiency MFU {r['mfu']:.3f}",
        "",
        f"{'':<10} {'FLOPs/token':>12} {'tokens/s':>10} {'tokens/day':>11} {'GPU-h per B tok':>16} "
        f"{'$ per M tok':>12} {'$ per B tok':>12}",
    ]
    for mode in ("training", "inference"):
        m = r[mode]
        lines.append(f"{mode:<10} {m['flops_per_token']:>12.3e} {_si(m['tokens_per_second']):>10} "
                     f"{_si(m['tokens_per_day']):>11} {m['gpu_hours_per_billion_tokens']:>16,.1f} "
                     f"{m['usd_per_million_tokens']:>12,.3f} {m['usd_per_billion_tokens']:>12,.0f}")
    lines += ["", "formula"] + [f"  {f}" for f in r["formula"]]
    lines += ["", "assumptions"] + [f"  - {a}" for a in r["assumptions"]]
    if r["warnings"]:
        lines += ["", "warnings"] + [f"  ! {w}" for w in r["warnings"]]
    return "\n".join(lines)


def listing() -> str:
    lines = ["configurations (--config):"]
    for c in configs.ALL:
        lines.append(f"  {c.name:<15} {c.title:<15} {c.total_params / 1e9:7.1f}B total, "
                     f"{c.active_params / 1e9:6.2f}B active  {c.shape}")
    lines.append("hardware (--hardware):")
    for g in hardware.ALL:
        lines.append(f"  {g.name:<10} {g}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="throughput.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=argument_type(configs.by_name), default="deepseek-v3", metavar="NAME",
                    help=f"the MoE model: {', '.join(configs.names())} (default deepseek-v3)")
    ap.add_argument("--hardware", type=argument_type(hardware.by_name), default="h100", metavar="NAME",
                    help=f"the GPU: {', '.join(hardware.names())} (default h100)")
    ap.add_argument("--num-gpus", type=positive_int, default=8, help="GPUs working together (default 8)")
    eff = ap.add_mutually_exclusive_group()
    eff.add_argument("--mfu", type=fraction, default=None,
                     help=f"assumed efficiency: useful FLOP/s over the peak, in (0, 1] (default {DEFAULT_MFU})")
    eff.add_argument("--mfu-from-record", type=argument_type(records.check_kind, "record kind"), metavar="KIND",
                     default=None,
                     help="take the efficiency from benchmarks/results/KIND__<gpu>.json: its TFLOP/s on "
                          "this model's MoE shape over the peak of the GPU it ran on ('ceilings': the "
                          "dense matmul's, an upper bound)")
    ap.add_argument("--implementation", default=None,
                    help="with --mfu-from-record: which measurement to use when the record has several "
                         "for this shape: its exact name, or words all found in it (e.g. 'wgmma up uniform')")
    ap.add_argument("--price-per-gpu-hour", type=positive_float, default=None,
                    help="US dollars per GPU-hour (default: the hardware profile's assumed price)")
    peak = ap.add_mutually_exclusive_group()
    peak.add_argument("--peak-tflops", type=positive_float, default=None,
                      help="dense bf16 TFLOP/s per GPU to plan with (default: the datasheet's)")
    peak.add_argument("--measured-peak", action="store_true",
                      help="use the matmul rate measured on this kind of GPU (benchmarks/results/"
                           "ceilings__<gpu>.json, from `make bench`) as the peak, not the datasheet's")
    ap.add_argument("--seq-len", type=nonnegative_int, default=DEFAULT_SEQ_LEN,
                    help=f"keys each token attends to, for the attention FLOPs; 0 leaves them out "
                         f"(default {DEFAULT_SEQ_LEN})")
    ap.add_argument("--results-dir", type=existing_dir, default=None,
                    help=f"where recorded results are read (default {RESULTS_DIR})")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--list", action="store_true", help="list the known configurations and hardware, then exit")
    args = ap.parse_args(argv)
    if args.list:
        print(listing())
        return 0
    try:
        result = estimate(args.config, args.hardware, num_gpus=args.num_gpus, mfu=args.mfu,
                          mfu_from_record=args.mfu_from_record, implementation=args.implementation,
                          price_per_gpu_hour=args.price_per_gpu_hour, peak_tflops=args.peak_tflops,
                          measured_peak=args.measured_peak, seq_len=args.seq_len,
                          results_dir=args.results_dir)
    except (ValueError, LookupError, TypeError) as exc:
        print(f"throughput.py: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=1) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
