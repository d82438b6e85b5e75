"""Chapter 01's measurements of the torch MoE layer (:func:`moe_course.moe.moe_forward`): its
time on real model shapes, the share of it each of its four steps takes (router, dispatch,
experts, combine), and its activation memory: counted on any machine, measured on a GPU.

:func:`measure_layer` times the whole layer with :func:`moe_course.bench.benchmark` (median of
many calls after a warm-up; on a GPU with CUDA events and inputs rotated past the L2 cache),
and its steps inside the same kind of calls: ``moe_forward(..., on_step=...)`` marks the end of
each step (:class:`StepClock`: a CUDA event on a GPU, which adds no synchronisation, a clock
reading on the CPU). Notebook 01 prints its rows (:func:`print_rows`) and draws them
(:func:`draw_steps`); on a GPU it records them as ``moe_layer_torch``.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from . import configs, moe
from .bench import benchmark, rotate

#: moe_forward's steps, in order (the names its ``on_step`` is called with)
STEPS = ("router", "dispatch", "experts", "combine")


def scaled(shape: configs.MoEShape, factor: int) -> configs.MoEShape:
    """``shape`` with T, d and n divided by ``factor``; E and K kept, so that the routing work
    per token is the real one (the CPU runs of notebook 01)."""
    T, d, n, E, K = shape
    return configs.MoEShape(T // factor, d // factor, n // factor, E, K)


class StepClock:
    """Time stamps at the ends of moe_forward's steps: CUDA events on a GPU (recorded in stream
    order, no extra synchronisation), time.perf_counter on the CPU."""

    def __init__(self, device: str):
        self.device = device
        self.marks = [("start", self.now())]

    def now(self):
        if self.device == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def mark(self, step: str) -> None:
        self.marks.append((step, self.now()))

    def ms(self) -> dict[str, float]:
        pairs = zip(self.marks, self.marks[1:])
        if self.device == "cuda":
            self.marks[-1][1].synchronize()
            return {step: a.elapsed_time(b) for (_, a), (step, b) in pairs}
        return {step: (b - a) * 1e3 for (_, a), (step, b) in pairs}


def time_steps(sets: list, w: moe.MoEWeights, k: int, device: str, reps: int, warmup: int = 2):
    """Median over calls of each step's time and of its share of that call's total."""
    calls = []
    for i in range(warmup + reps):
        clock = StepClock(device)
        moe.moe_forward(sets[i % len(sets)][0], w, k, on_step=clock.mark)
        if i >= warmup:
            calls.append(clock.ms())
    ms = {s: statistics.median(c[s] for c in calls) for s in STEPS}
    share = {s: statistics.median(c[s] / sum(c.values()) for c in calls) for s in STEPS}
    return ms, share


def measure_layer(title: str, shape: configs.MoEShape, device: str, dtype: torch.dtype, reps: int) -> dict:
    """Time the layer and its steps; count (CPU) or measure (GPU) its activation memory."""
    T, d, n, E, K = shape
    torch.manual_seed(0)
    w = moe.random_weights(d, n, E, dtype=dtype, device=device)
    sets = rotate(lambda: (torch.randn(T, d, device=device, dtype=dtype),), set_bytes=T * d * dtype.itemsize)
    flops = configs.expert_gemm_flops(T, d, n, K)["fwd"]
    with torch.no_grad():
        whole = benchmark(lambda x: moe.moe_forward(x, w, K), sets, name=title, flops=flops,
                          reps=reps, warmup=2, device=device, params=shape.as_dict())
        ms, share = time_steps(sets, w, K, device, reps)
    row = {"model": title, "shape": shape.as_dict(), "device": device, "dtype": str(dtype).removeprefix("torch."),
           "whole": whole.as_dict(), "step_ms": ms, "step_share": share,
           "outside_experts_share": 1 - share["experts"],
           "expert_tflops": flops / (ms["experts"] * 1e-3) / 1e12,
           "analytic_activation_bytes": sum(moe.activation_bytes(shape, dtype.itemsize).values())}
    if device == "cuda":
        row.update(training_forward_bytes(sets[0][0], w, K))
    return row


def training_forward_bytes(x: torch.Tensor, w: moe.MoEWeights, k: int) -> dict:
    """GPU bytes a training forward pass leaves allocated (saved for backward, and the output),
    and its peak, both above what was allocated before."""
    trainable = moe.MoEWeights(*(t.detach().requires_grad_() for t in w))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = moe.moe_forward(x, trainable, k)
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return {"measured_kept_bytes": kept, "measured_peak_bytes": peak}


def print_rows(rows: list[dict]) -> None:
    """:func:`measure_layer`'s rows as a table: the layer's time, each step's share, the share
    outside the expert FFNs, the experts' rate, and the activation memory."""
    gib = 2**30
    print(f"{'model':<15} {'T, d, n, E, K':<24} {'layer ms':>9} " + " ".join(f"{s:>9}" for s in STEPS)
          + f" {'outside':>8} {'expert TFLOP/s':>14}  activations GiB")
    for r in rows:
        s = r["shape"]
        mem = (f"{r['measured_kept_bytes'] / gib:.2f} measured ({r['analytic_activation_bytes'] / gib:.2f} counted)"
               if "measured_kept_bytes" in r else f"{r['analytic_activation_bytes'] / gib:.3f} counted")
        print(f"{r['model']:<15} {', '.join(str(s[k]) for k in 'TdnEK'):<24} {r['whole']['ms']:>9.2f} "
              + " ".join(f"{r['step_share'][st]:>9.0%}" for st in STEPS)
              + f" {r['outside_experts_share']:>8.0%} {r['expert_tflops']:>14.3g}  {mem}")


def draw_steps(rows: list[dict], ax, title: str) -> None:
    """Each step's share of the layer's time, one bar per model."""
    names = [r["model"] for r in rows]
    left = np.zeros(len(rows))
    for step in STEPS:
        share = np.array([r["step_share"][step] for r in rows])
        ax.barh(names, share, left=left, label=step, color="#bbbbbb" if step == "experts" else None)
        left += share
    for i, r in enumerate(rows):
        ax.text(1.02, i, f"{r['whole']['ms']:.3g} ms;\n{r['outside_experts_share']:.0%} outside the experts",
                va="center", fontsize=8)
    ax.set_xlim(0, 1.45)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_ylim(len(rows) - 0.5, -1.0)  # first model on top, with room for the source label
    ax.set_xlabel("share of the layer's time (median over calls)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=4)
