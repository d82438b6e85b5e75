"""Charts of live or recorded results. Every chart carries a visible label saying where and
when its numbers were measured, so a recorded H200 result is never mistaken for this machine's.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import matplotlib.pyplot as plt
import numpy as np

LIVE_COLOR = "#1a7f37"
RECORDED_COLOR = "#9a6700"


def source_text(record, live: bool) -> str:
    return (f"LIVE on {record.label()}" if live
            else f"RECORDED on {record.label()} (no GPU here)")


def stamp(ax, record, live: bool) -> None:
    """Write the source of the numbers inside the axes, top left, in a coloured box."""
    ax.text(0.01, 0.99, source_text(record, live), transform=ax.transAxes, va="top", ha="left",
            fontsize=8, color="white",
            bbox={"facecolor": LIVE_COLOR if live else RECORDED_COLOR, "alpha": 0.85,
                  "edgecolor": "none", "boxstyle": "round,pad=0.3"})


def roofline(ceilings, points: Iterable[tuple[str, float, float]] = (), ax=None, live: bool | None = None,
             series: dict[str, Sequence[tuple[str, float, float]]] | None = None):
    """The roofline of a machine: attainable TFLOP/s against FLOPs per byte, with ``points``
    ``(label, intensity, tflops)`` placed on it. Later chapters add their kernels here.
    ``series``: name -> points, each drawn as one line whose points carry their labels (one
    shape at several token counts, say)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4.2))
    ridge = ceilings.ridge_intensity
    x = np.logspace(-1, 4, 200)
    ax.loglog(x, np.minimum(ceilings.matmul_tflops, ceilings.copy_tbps * x), color="black", lw=2,
              label=f"roof: {ceilings.copy_tbps:.2f} TB/s x intensity, capped at {ceilings.matmul_tflops:.0f} TFLOP/s")
    ax.axvline(ridge, color="grey", ls=":", lw=1)
    ax.annotate(f"ridge {ridge:.0f} FLOP/B", (ridge, ceilings.matmul_tflops * 0.05), rotation=90,
                fontsize=8, color="grey", ha="right")
    for label, intensity, tflops in points:
        ax.loglog([intensity], [tflops], "o", ms=8, label=f"{label}: {tflops:.3g} TFLOP/s")
    for i, (name, line) in enumerate((series or {}).items()):
        labels, intensities, rates = zip(*line)
        # a marker and a label row of its own per line: lines that coincide stay readable
        ax.loglog(intensities, rates, "osD^v"[i % 5] + "-", ms=8 - i % 5, lw=1, label=name)
        for label, intensity, rate in line:
            ax.annotate(label, (intensity, rate), textcoords="offset points", xytext=(4, -11 - 8 * i),
                        fontsize=7, color=f"C{i}")
    ax.set_xlabel("arithmetic intensity (FLOP per byte of device memory traffic)")
    ax.set_ylabel("TFLOP/s")
    ax.set_ylim(1e-2, ceilings.matmul_tflops * 3)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="lower right")
    if ceilings.record is not None:
        stamp(ax, ceilings.record, ceilings.live if live is None else live)
    return ax


def grouped_bars(categories: Sequence[str], series: dict[str, Sequence[float]], *, ylabel: str,
                 record, live: bool, ceiling: float | None = None, ceiling_label: str = "",
                 title: str = "", ax=None, fmt: str = "%.0f"):
    """Bars of one value per (category, series), e.g. TFLOP/s per MoE shape and implementation;
    ``fmt`` labels each bar (``"%.2f"`` for ratios). A value of ``None`` (or NaN) was not
    measured: no bar is drawn there, and "not measured" is written in its place (never a 0)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(max(6, 1.6 * len(categories) + 2), 4))
    width = 0.8 / max(1, len(series))
    xs = np.arange(len(categories))
    for i, (name, values) in enumerate(series.items()):
        at = xs + (i - (len(series) - 1) / 2) * width
        measured = [v is not None and not np.isnan(v) for v in values]
        bars = ax.bar(at[measured], [v for v, m in zip(values, measured) if m], width, label=name,
                      color=f"C{i}")
        ax.bar_label(bars, fmt=fmt, fontsize=7)
        for x in at[~np.array(measured, dtype=bool)]:
            ax.text(x, 0, "not measured", rotation=90, ha="center", va="bottom", fontsize=6, color="#57606a")
    if ceiling:
        ax.axhline(ceiling, color="black", ls="--", lw=1, label=ceiling_label or f"ceiling {ceiling:.0f}")
    ax.set_xticks(xs, categories)
    if sum(len(max(c.split("\n"), key=len)) for c in categories) > 70:  # keep long labels apart
        ax.tick_params(axis="x", labelsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper right")
    ax.margins(y=0.2)
    stamp(ax, record, live)
    return ax


def expert_load(counts, ax=None, *, capacity: float | None = None, title: str = "",
                color: str | None = None, label: str | None = None):
    """Bars of tokens (token-expert pairs) per expert, with the perfectly balanced load as a
    dashed line and, if given, each expert's ``capacity`` as a red line (what lies above it is
    dropped). ``counts``: one number per expert (torch, NumPy or a list)."""
    counts = np.asarray(counts.tolist() if hasattr(counts, "tolist") else counts, dtype=float)
    if ax is None:
        _, ax = plt.subplots(figsize=(max(5, 0.25 * len(counts) + 2), 3))
    ax.bar(np.arange(len(counts)), counts, width=0.85, color=color, label=label)
    mean = counts.mean() if len(counts) else 0.0
    ax.axhline(mean, color="black", ls="--", lw=1, label=f"balanced: {mean:.0f}")
    if capacity is not None:
        ax.axhline(capacity, color="#cf222e", lw=1.5, label=f"capacity: {capacity:.0f}")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("expert")
    ax.set_ylabel("tokens")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    return ax


def timeline(trace: dict, ax=None, *, slices: int = 24, title: str = "", record=None, live: bool = False):
    """A traced main loop (moe_course.io_overlap.trace_timeline): per slice along K, the load
    in flight (issued -> landed; slice i on row i mod 4, so that loads in flight together stay
    apart: the rows are not ring slots) above the multiply (landed -> slot released); green: the
    consumers storing a finished tile; red: the math waiting for a slice that has not landed yet."""
    issued, landed, released = (np.asarray(trace[k], dtype=float)[:slices] for k in ("issued", "landed", "released"))
    if ax is None:
        _, ax = plt.subplots(figsize=(11, 2.2))
    lanes = 4
    for i in range(len(landed)):
        if np.isfinite(issued[i]) and np.isfinite(landed[i]):
            ax.broken_barh([(issued[i], landed[i] - issued[i])], (1.2 + (i % lanes) * 0.25, 0.2), color="#8c959f")
        if np.isfinite(landed[i]) and np.isfinite(released[i]):
            ax.broken_barh([(landed[i], released[i] - landed[i])], (0.1, 0.8), color="#1f6feb", edgecolor="white")
    from .io_overlap import timeline_gaps

    shown = {"landed": landed, "released": released, "stored": trace.get("stored", [])}
    for start, stored, end in timeline_gaps(shown):
        if stored > start:
            ax.broken_barh([(start, stored - start)], (0.1, 0.8), color="#1a7f37")
        ax.broken_barh([(stored, end - stored)], (0.1, 0.8), color="#cf222e")
    ax.set_yticks([0.5, 1.2 + lanes * 0.125], ["multiply", "loads in flight"])
    ax.set_ylim(0, 1.3 + lanes * 0.25)
    ax.set_xlabel("microseconds since the block's first load")
    ax.set_title(title, fontsize=9)
    if record is not None:
        stamp(ax, record, live)
    return ax
