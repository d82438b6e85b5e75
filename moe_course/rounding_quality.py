"""Does token rounding cost model quality? Measured on a small MoE a CPU trains in seconds.

The experiment of chapter 04 (and of ``benchmarks/token_rounding_quality.py``, which runs it
over more seeds and records the result): the same small MoE model is trained from the same
start on the same batches, once with plain top-K routing and once with tile-aware token
rounding; both are then **evaluated with plain top-K routing**, as the SonicMoE paper does
(rounding is a training-time device to make the grouped GEMMs tile-aligned; inference routes
normally). The difference in validation loss is the quality cost.

The task: tokens ``x`` (width ``d``) come from one of ``clusters`` Gaussian clusters, and each
cluster has its own target map, ``y = tanh(x @ A_c)``. An expert that specialises in a few
clusters does well, so routing matters. The proportions copy the paper's setting: ``T*K/E``
= 64 tokens per expert on average with 32-row tiles is two tiles per expert, as 256 tokens with
128-row tiles is in the paper's shapes (T=16384, E=256, K=4), so rounding changes a similar
share of the routing.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import moe
from . import token_rounding as tr
from .machine import one_thread


KIND = "token_rounding_quality"  # the record: benchmarks/results/token_rounding_quality__<gpu or cpu>.json
CLAIM = 0.001  # the course seed's "<0.1% quality loss" (not from the paper), as a relative difference


@dataclass(frozen=True)
class Setup:
    """The model, the task and the training run (defaults: about 5 s per run on one CPU core)."""
    d: int = 32  # model width
    n: int = 64  # expert hidden width
    experts: int = 16
    k: int = 2
    tile: int = 32  # 512 * 2 / 16 = 64 tokens per expert: two tiles
    batch: int = 512  # tokens per step (T)
    steps: int = 1000
    lr: float = 3e-3
    clusters: int = 32
    aux_weight: float = 0.01  # Switch load-balancing loss, as MoE training runs use
    val_tokens: int = 8192

    def __post_init__(self):
        for name in ("d", "n", "experts", "k", "tile", "batch", "steps", "clusters", "val_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Setup.{name} must be a positive int, got {value!r}")
        if self.k > self.experts:
            raise ValueError(f"Setup.k ({self.k}) cannot exceed Setup.experts ({self.experts})")


class Task:
    """Clustered regression: ``x = center_c + 0.5 * noise``, ``y = tanh(x @ A_c)`` (centers and
    maps scaled so that ``x @ A_c`` is of order one: tanh is neither linear nor saturated)."""

    def __init__(self, setup: Setup, seed: int):
        g = torch.Generator().manual_seed(10_000 + seed)
        self.setup = setup
        self.centers = torch.randn(setup.clusters, setup.d, generator=g)
        self.maps = torch.randn(setup.clusters, setup.d, setup.d, generator=g) / math.sqrt(setup.d)

    def sample(self, num_tokens: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        c = torch.randint(self.setup.clusters, (num_tokens,), generator=generator)
        x = self.centers[c] + 0.5 * torch.randn(num_tokens, self.setup.d, generator=generator)
        return x, torch.tanh(torch.einsum("td,tde->te", x, self.maps[c]))


class TinyMoE(nn.Module):
    """One MoE layer (SwiGLU experts) whose routing is chosen per call: any of
    :data:`moe_course.token_rounding.ROUTINGS`. The router's softmax probabilities rank the
    tokens and are the combine weights (gradients reach the router through them)."""

    def __init__(self, setup: Setup, seed: int):
        super().__init__()
        self.setup = setup
        w = moe.random_weights(setup.d, setup.n, setup.experts, generator=torch.Generator().manual_seed(seed))
        self.w_router, self.w_gate, self.w_up, self.w_down = (nn.Parameter(t) for t in w)
        with torch.no_grad():
            self.w_router.mul_(0.1)  # a router starts close to uniform

    def forward(self, x: torch.Tensor, method: str = "top-K"):
        """``x (T, d) -> (y (T, d), probs (T, E), routing)``."""
        probs = moe.router_probs(x @ self.w_router)
        routing = tr.route(probs, self.setup.k, self.setup.tile, method)
        return tr.moe_forward(x, moe.MoEWeights(self.w_router, self.w_gate, self.w_up, self.w_down), routing), probs, routing


def train(method: str, seed: int, setup: Setup = Setup(), eval_every: int = 50) -> dict:
    """Train with ``method`` routing, evaluate with plain top-K. Same ``seed``: same initial
    weights, task, batches and validation set, whatever the method."""
    if method not in tr.ROUTINGS:
        raise ValueError(f"method must be one of {', '.join(tr.ROUTINGS)}; got {method!r}")
    task = Task(setup, seed)
    model = TinyMoE(setup, seed)
    batches = torch.Generator().manual_seed(20_000 + seed)
    x_val, y_val = task.sample(setup.val_tokens, torch.Generator().manual_seed(30_000 + seed))
    opt = torch.optim.Adam(model.parameters(), lr=setup.lr)
    # cosine decay to zero, so that the end point is a settled model and not one noisy step
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / setup.steps)))

    def val_loss() -> float:
        with torch.no_grad():
            return float(((model(x_val, "top-K")[0] - y_val) ** 2).mean())

    curve, changed = [], []
    start = time.perf_counter()
    with one_thread():
        for step in range(setup.steps):
            x, y = task.sample(setup.batch, batches)
            pred, probs, routing = model(x, method)
            loss = ((pred - y) ** 2).mean() + setup.aux_weight * moe.switch_aux_loss(probs, routing.topk)
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
            changed.append(tr.stats(routing)["changed"])
            if (step + 1) % eval_every == 0 or step + 1 == setup.steps:
                curve.append((step + 1, val_loss()))
    return {"method": method, "seed": seed, "val_loss": curve[-1][1], "curve": curve,
            "changed": statistics.fmean(changed), "seconds": time.perf_counter() - start}


def compare(methods=("top-K", "nearest"), seeds=(0, 1), setup: Setup = Setup(), progress=None) -> list[dict]:
    """:func:`train` for every method and seed."""
    runs = []
    for seed in seeds:
        for method in methods:
            if progress:
                progress(f"seed {seed}, {method}")
            runs.append(train(method, seed, setup))
    return runs


def summarize(runs: list[dict], baseline: str = "top-K") -> dict:
    """Per method: validation loss (mean, standard deviation over seeds) and its relative
    difference to ``baseline`` trained on the same seed (mean, standard deviation, min, max):
    positive means worse than top-K."""
    by = {(r["method"], r["seed"]): r for r in runs}
    out = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        losses = [r["val_loss"] for r in runs if r["method"] == method]
        rel = [by[method, s]["val_loss"] / by[baseline, s]["val_loss"] - 1
               for (m, s) in by if m == method and (baseline, s) in by]
        out[method] = {
            "seeds": len(losses), "val_loss_mean": statistics.fmean(losses),
            "val_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            "rel_diff_mean": statistics.fmean(rel) if rel else None,
            "rel_diff_std": statistics.stdev(rel) if len(rel) > 1 else 0.0,
            "rel_diff_min": min(rel) if rel else None, "rel_diff_max": max(rel) if rel else None,
            "changed_mean": statistics.fmean(r["changed"] for r in runs if r["method"] == method)}
    return out


def summary_table(summary: dict) -> str:
    rows = [f"{'trained with':<14}{'seeds':>6}{'val loss (top-K eval)':>26}{'vs top-K, same seed':>30}"
            f"{'routing changed':>17}"]
    for method, s in summary.items():
        rel = ("(baseline)" if method == "top-K" or s["rel_diff_mean"] is None else
               f"{100 * s['rel_diff_mean']:+.2f}% ± {100 * s['rel_diff_std']:.2f}%")
        rows.append(f"{method:<14}{s['seeds']:>6}{s['val_loss_mean']:>17.5f} ± {s['val_loss_std']:.5f}"
                    f"{rel:>30}{100 * s['changed_mean']:>16.1f}%")
    return "\n".join(rows)


def record_data(runs: list[dict], setup: Setup) -> dict:
    """What ``benchmarks/token_rounding_quality.py`` records."""
    return {"setup": asdict(setup), "runs": runs, "summary": summarize(runs),
            "protocol": "same initial weights, task, batches and validation set per seed; trained with "
                        "the method's routing, evaluated with plain top-K routing (validation MSE)",
            "claim": "seed of the course: '<0.1% quality loss' (not from the paper)"}
