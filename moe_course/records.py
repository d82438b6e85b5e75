"""Benchmark results saved as JSON under ``benchmarks/results/``, with where and when.

A record is ``{"kind", "environment", "data"}``: the environment says which GPU, driver, CUDA,
CuPy, torch and date produced the data, so a chart drawn from it on another machine can say so.
One file per kind and GPU (``<kind>__<gpu>.json``): measuring again replaces it, and git keeps
the history.

A record file can be cut short (a run killed while writing), edited by hand, or written by an
older version of the course. :func:`read` checks each file it reads: JSON, the three keys, finite
numbers, and what the course reads of its kind (:mod:`moe_course.record_layouts`). Anything else
is a :class:`RecordError` naming the file and what is wrong, never a ``KeyError`` from deep
inside a chart. :func:`save` writes only what reads back the same.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import RESULTS_DIR, ROOT
from .checks import RecordError, require  # RecordError: the checks' own error type, named here too
from .machine import info
from .record_layouts import LAYOUTS, problem, step


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


def check_kind(kind) -> str:
    """A kind names its file, ``<kind>__<gpu>.json``, inside the results folder: letters, digits,
    ``_`` and ``-`` only (so no ``/`` or ``..`` takes it elsewhere), and no ``__`` (the separator
    before the GPU)."""
    require(isinstance(kind, str) and re.fullmatch(r"[A-Za-z0-9_-]+", kind) is not None,
            lambda: f"a record kind is made of letters, digits, '_' and '-' (it names a file in the results "
                    f"folder), got {kind!r}")
    require("__" not in kind, lambda: f"a record kind cannot hold '__' (it separates the kind from the GPU "
                                      f"in the file name), got {kind!r}")
    return kind


def shown(path: Path) -> str:
    """A file's name for a message: relative to the course's folder when inside it."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(ROOT.resolve()))
    except ValueError:
        return str(path)


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

    def need(self, *keys, layout=None):
        """``data[keys[0]][keys[1]]...`` (a key, or a list index), and that it matches ``layout``
        (:mod:`moe_course.record_layouts`' notation, e.g. ``float``): for a reader that needs a
        value its kind's layout does not promise. Else a RecordError naming the file and the place."""
        value, where = self.data, "data"
        for key in keys:
            if isinstance(value, list) and isinstance(key, int) and -len(value) <= key < len(value):
                value, where = value[key], f"{where}[{key}]"
            elif isinstance(value, dict) and key in value:
                value, where = value[key], where + step(key)
            else:
                missing = f"no item [{key}]" if isinstance(key, int) else f"no key {key!r}"
                keys_here = f" (keys: {', '.join(value)})" if isinstance(value, dict) else ""
                raise RecordError(f"{self.where()}: {where} has {missing}{keys_here}")
        wrong = None if layout is None else problem(value, layout, where)
        require(wrong is None, lambda: f"{self.where()}: {wrong}", RecordError)
        return value

    def where(self) -> str:
        """The record's file, as messages name it."""
        return shown(self.path) if self.path else f"the {self.kind!r} record (not from a file)"


# --------------------------------------------------------------------------------------------
# Saving: what reads back the same


def as_json(value, where: str = "data"):
    """``value`` as JSON keeps it: dicts with string keys, lists (from tuples too), strings,
    booleans, None and finite numbers; a NumPy scalar (``np.float32(1.5)``, ``np.int64(3)``)
    becomes the Python number it holds. NaN, infinity, a tensor, an array or any other object is a
    RecordError naming where it is (``data.rows[3].ms``): write None for "not measured", and
    ``t.item()`` or ``t.tolist()`` for a tensor or an array."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        require(math.isfinite(value), lambda: f"{where} is {'NaN' if value != value else 'infinite'}: a record "
                                              f"holds finite numbers (None where nothing was measured)", RecordError)
        return value
    if isinstance(value, np.generic):
        return as_json(value.item(), where)
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        require(not bad, lambda: f"{where} has a key {bad[0]!r} that is not a string: JSON keys are strings "
                                 f"(it would read back as {str(bad[0])!r})", RecordError)
        return {k: as_json(v, where + step(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    kind = f"{type(value).__module__}.{type(value).__qualname__}".removeprefix("builtins.")
    raise RecordError(f"{where} is a {kind}, which a JSON record cannot hold: save numbers, strings, lists "
                      f"and dicts (a tensor or an array: .item() for one number, .tolist() for a list)")


def finite_or_none(x: float) -> float | None:
    """``x``, or None where it is NaN or infinite (a relative error of a broken result, say): a
    record holds finite numbers."""
    return x if math.isfinite(x) else None


def save(kind: str, data: dict, results_dir: Path | None = None) -> Record:
    """Save ``data`` as this machine's record of ``kind``; returns the record with its path.
    ``data`` is checked first (:func:`as_json`), and the file is replaced in one step, so that a
    run killed while saving leaves the previous record, never half a file."""
    check_kind(kind)
    require(isinstance(data, dict), lambda: f"a record's data is a dict, got {type(data).__name__}", RecordError)
    data = as_json(data)
    env = environment()
    folder = Path(results_dir or RESULTS_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{kind}__{_slug(env['gpu'])}.json"
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({"kind": kind, "environment": env, "data": data}, indent=1, allow_nan=False) + "\n")
    os.replace(partial, path)
    return Record(kind, env, data, path)


# --------------------------------------------------------------------------------------------
# Reading: checked, with the file named


def read(path: Path, kind: str | None = None) -> Record:
    """The record in the file ``path``, checked: JSON, an object with ``kind`` (``kind``; by
    default the one its name says, ``<kind>__<gpu>.json``), ``environment`` and ``data``, finite
    numbers only, and its kind's layout (:data:`moe_course.record_layouts.LAYOUTS`). Else a
    RecordError naming the file."""
    path = Path(path)
    if kind is None and "__" in path.stem:
        kind = path.stem.split("__")[0]
    raw, wrong = _parse(path.read_bytes())
    if wrong is None:
        wrong = _envelope_problem(raw, kind)
    if wrong is None:
        try:
            raw = as_json(raw, "")
        except RecordError as exc:
            wrong = str(exc).removeprefix(".")
    if wrong is None and raw["kind"] in LAYOUTS:
        wrong = problem(raw["data"], LAYOUTS[raw["kind"]])
    if wrong is not None:
        if raw is None:  # not a record at all: say how to get one back
            inside = not Path(shown(path)).is_absolute()
            wrong += ": measure again" + (f", or restore it (git checkout -- {shown(path)})" if inside else "")
        raise RecordError(f"{shown(path)}: {wrong}")
    return Record(raw["kind"], raw["environment"], raw["data"], path)


def _parse(content: bytes) -> tuple[object, str | None]:
    """The JSON in a file's bytes, or ``(None, what is wrong)``."""
    try:
        text = content.decode()
    except UnicodeDecodeError:
        return None, "is not text (not UTF-8)"
    if not text.strip():
        return None, "is empty"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        if exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string"):
            return None, f"is cut short (its JSON stops in the middle, at line {text.rstrip().count(chr(10)) + 1})"
        return None, f"is not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno})"


def _envelope_problem(raw, kind: str | None) -> str | None:
    """What is wrong with the outside of a record: ``{"kind": str, "environment": {}, "data": {}}``."""
    if not isinstance(raw, dict):
        return f"holds {_json_kind(raw)}, not a record (an object with keys kind, environment, data)"
    for key, want in (("kind", str), ("environment", dict), ("data", dict)):
        if key not in raw:
            return f"has no key {key!r} (keys: {', '.join(raw) or 'none'}): a record holds kind, environment, data"
        if not isinstance(raw[key], want):
            return f"{key} must be {_json_kind(want())}, got {_json_kind(raw[key])}"
    if kind is not None and raw["kind"] != kind:
        return f"holds a record of kind {raw['kind']!r}, but its name says {kind!r}"
    return None


def _json_kind(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


REFERENCE_GPU = "NVIDIA H200"  # the card the course's anchors were measured on


def load_all(kind: str, results_dir: Path | None = None) -> list[Record]:
    """Every record of ``kind`` in the results folder (one per GPU), each checked (:func:`read`)."""
    check_kind(kind)
    folder = Path(results_dir or RESULTS_DIR)
    return [read(path, kind) for path in sorted(folder.glob(f"{kind}__*.json"))]


def load(kind: str, gpu: str | None = None, results_dir: Path | None = None) -> Record | None:
    """The record of ``kind`` for ``gpu`` (default: this machine's GPU if it has one recorded,
    else the most recent record from any GPU). ``None`` if there is none; a RecordError if a
    record of ``kind`` cannot be read."""
    records = load_all(kind, results_dir)
    if gpu is None and info().gpu:
        mine = [r for r in records if r.environment.get("gpu") == info().gpu]
        records = mine or records
    elif gpu is not None:
        records = [r for r in records if r.environment.get("gpu") == gpu]
    # the newest; of two from one day, the course's reference card's (COURSE.md's anchors: an H200)
    return max(records, key=lambda r: (str(r.environment.get("date", "")), r.environment.get("gpu") == REFERENCE_GPU),
               default=None)


def keep_unmeasured(data: dict, earlier: Record | None, key: str, measuring, *,
                    alongside: tuple[str, ...] = ()) -> list[str]:
    """Merge one run into the record before it, for benchmarks that measure one shape or model
    per run (a GPU call's time is short): ``data[key]`` (entries by name) gains the entries of
    ``earlier.data[key]`` this run did not measure, with their entries in the ``alongside`` dicts
    (keyed the same way), and ``data["measured_on"]`` gives each entry's date: today for those in
    ``measuring``, the earlier record's for those kept. Returns the names kept (none without an
    earlier record)."""
    data["measured_on"] = {name: environment()["date"] for name in measuring}
    if earlier is None:
        return []
    kept = [name for name in earlier.data[key] if name not in measuring]
    before = earlier.data.get("measured_on", {})
    for name in kept:
        data[key][name] = earlier.data[key][name]
        for other in alongside:
            if name in earlier.data.get(other, {}):
                data.setdefault(other, {})[name] = earlier.data[other][name]
        data["measured_on"][name] = before.get(name, earlier.environment.get("date", "?"))
    return kept


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
