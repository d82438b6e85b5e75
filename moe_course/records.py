"""Benchmark results saved as JSON under ``benchmarks/results/``, with where and when.

A record is ``{"kind", "environment", "data"}``: the environment says which GPU, driver, CUDA,
CuPy, torch and date produced the data, so a chart drawn from it on another machine can say so.
One file per kind and GPU (``<kind>__<gpu>.json``): measuring again replaces it, and git keeps
the history.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from dataclasses import dataclass
from pathlib import Path

from . import RESULTS_DIR
from .machine import info


def environment() -> dict:
    m = info()
    return {
        "gpu": m.gpu,
        "compute_capability": m.as_dict()["compute_capability"],
        "sm_count": m.sm_count,
        "cuda_driver": m.cuda_driver,
        "cuda_runtime": m.cuda_runtime,
        "nvrtc": m.nvrtc,
        "cupy": m.cupy,
        "torch": m.torch,
        "python": m.python,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
    }


def _slug(text: str | None) -> str:
    return re.sub(r"[^a-z0-9]+", "-", (text or "cpu").lower()).strip("-")


@dataclass(frozen=True)
class Record:
    kind: str
    environment: dict
    data: dict
    path: Path | None = None

    @property
    def gpu(self) -> str:
        return self.environment.get("gpu") or "CPU"

    def label(self) -> str:
        """One line for a chart: where, when and with what this was measured."""
        e = self.environment
        versions = ", ".join(f"{k} {e[k]}" for k in ("torch", "cupy") if e.get(k))
        cuda = f", CUDA {e['cuda_runtime']}" if e.get("cuda_runtime") and e.get("gpu") else ""
        return f"{self.gpu}, {e.get('date', '?')} ({versions}{cuda})"

    def is_from_this_machine(self) -> bool:
        return self.environment.get("gpu") == info().gpu and info().gpu is not None


def save(kind: str, data: dict, results_dir: Path | None = None) -> Record:
    """Save ``data`` as this machine's record of ``kind``; returns the record with its path."""
    env = environment()
    folder = Path(results_dir or RESULTS_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{kind}__{_slug(env['gpu'])}.json"
    path.write_text(json.dumps({"kind": kind, "environment": env, "data": data}, indent=1) + "\n")
    return Record(kind, env, data, path)


def load(kind: str, gpu: str | None = None, results_dir: Path | None = None) -> Record | None:
    """The record of ``kind`` for ``gpu`` (default: this machine's GPU if it has one recorded,
    else the most recent record from any GPU). ``None`` if there is none."""
    folder = Path(results_dir or RESULTS_DIR)
    records = []
    for path in sorted(folder.glob(f"{kind}__*.json")):
        raw = json.loads(path.read_text())
        records.append(Record(raw["kind"], raw["environment"], raw["data"], path))
    if gpu is None and info().gpu:
        mine = [r for r in records if r.environment.get("gpu") == info().gpu]
        records = mine or records
    elif gpu is not None:
        records = [r for r in records if r.environment.get("gpu") == gpu]
    return max(records, key=lambda r: r.environment.get("date", ""), default=None)


def recorded_instead(kind: str) -> Record | None:
    """For a benchmark script on a machine without a GPU: say why nothing is timed, then return
    the recorded results (after a line saying where and when they were measured), or ``None``
    after a line saying there are none."""
    from .machine import skip_reason

    print(skip_reason(), "(timing); the recorded results follow")
    rec = load(kind)
    print("no recorded results either" if rec is None else f"recorded on {rec.label()}")
    return rec


def live_or_recorded(kind: str, measure, *, save_live: bool = True) -> tuple[Record, bool]:
    """Run ``measure()`` (returning a dict) on a GPU and record it; without a GPU, load the
    recorded result instead and say so in one line. Returns ``(record, live)``."""
    if info().has_gpu:
        data = measure()
        rec = save(kind, data) if save_live else Record(kind, environment(), data)
        return rec, True
    rec = load(kind)
    if rec is None:
        raise RuntimeError(f"no GPU here ({info().why_no_gpu}) and no recorded '{kind}' "
                           f"results in {RESULTS_DIR}")
    print(f"No GPU here ({info().why_no_gpu}): showing '{kind}' as recorded on {rec.label()}.")
    return rec, False
