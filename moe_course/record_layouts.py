"""What each kind of record in ``benchmarks/results/`` holds, as far as the course reads it.

:func:`moe_course.records.read` checks every record against its kind's layout as it reads the
file, so a record that lost a key, or holds a string where a number belongs, is refused once,
with the file and the place named (``... data.rows[3] has no key 'ms' (keys: shape, ...)``),
instead of failing later inside a table, a chart or a notebook cell. A layout lists only what the
course's tables, charts, notebooks and README read; a record may hold more.

The notation, checked by :func:`problem`:

- ``str``, ``int``, ``bool``, ``list``, ``dict``: a value of that JSON type; ``float``: any
  number; ``None``: null.
- ``(a, b)``: either, told apart by the JSON type (a number or null: ``(float, None)``).
- ``{"key": layout, "key?": layout}``: an object with these keys (``?``: it may be missing), and
  maybe others.
- ``[layout]``: a list, each item matching.
- ``Each(layout)``: an object of named entries (shapes, contenders, methods), each matching.
- ``Outcome(always, measured, failed, is_failed)``: a benchmark row that was either measured or
  failed (and says why instead of a time).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Each:
    """An object of named entries (``{"qwen3-30b-a3b": {...}, ...}``), each value matching ``layout``."""

    layout: object


def has_error(row: dict) -> bool:
    return "error" in row


@dataclass(frozen=True)
class Outcome:
    """A row that was measured, or failed: ``is_failed(row)`` says which. Either way it holds
    ``always``; a measured row holds ``measured`` too, a failed one ``failed``."""

    always: dict
    measured: dict
    failed: dict = field(default_factory=lambda: {"error": str})
    is_failed: Callable[[dict], bool] = has_error


def status_not_ok(row: dict) -> bool:
    return row.get("status") != "ok"


def not_timed(contender: dict) -> bool:
    """A layer that failed its check, or was skipped, has no forward + backward time."""
    return "forward+backward" not in contender


def skipped(part: dict) -> bool:
    return "skipped" in part


# --------------------------------------------------------------------------------------------
# The layouts, one per kind (the benchmark that records each is named beside it)

SHAPE = {"T": int, "d": int, "n": int, "E": int, "K": int}  # an MoE shape (moe_course.configs.MoEShape)
TIMING = {"ms": float, "tflops": float}  # moe_course.bench.Measurement.timing()

LADDER_ROW = Outcome({"shape": str, "proj": str, "routing": str, "impl": str, "flops": float, "bytes": float,
                      **SHAPE}, TIMING)

MEMORY_MEASURED = Outcome({}, {"saved_bytes": int, "held_after_forward_bytes": int, "peak_fwd_bwd_bytes": int,
                                "gradient_bytes": int})

LAYER = {  # bench_moe_layer.py: the whole layer, forward and forward + backward
    "shapes": Each({
        "shape": [int],
        "contenders": Each(Outcome(
            {}, {"forward": TIMING, "forward+backward": TIMING, "held_after_forward_bytes": int,
                 "peak_fwd_bwd_bytes": int, "agreement_with_torch._grouped_mm?": (Each((float, None)), None)},
            failed={}, is_failed=not_timed)),
        "skipped": Each(str),
    }),
    "train?": (None, {"config": {"steps": int}, "losses": Each([float])}),
    "command?": str,
    "versions?": Each((str, None)),
}

LAYOUTS: dict[str, object] = {
    "ceilings": {"matmul_tflops": float, "copy_tbps": float,  # benchmarks/ceilings.py
                 "measurements?": [{"name": str, **TIMING, "tbps": float}]},
    "first_kernel": {**TIMING, "tbps": float, "flops": float, "bytes": float},  # notebook 00
    "moe_layer_torch": {"rows": [{  # notebook 01 (moe_course.moe_measurements)
        "model": str, "shape": SHAPE, "whole": TIMING, "step_ms": Each(float), "step_share": Each(float),
        "outside_experts_share": float, "expert_tflops": float, "analytic_activation_bytes": int,
        "measured_kept_bytes": int}]},
    "grouped_gemm": {"rows": [LADDER_ROW], "matmul_tflops": float,  # bench_grouped_gemm.py
                     "copy_tbps?": float, "method?": str},
    "io_overlap": {  # bench_io_overlap.py
        "pipeline?": [Outcome({"shape": str, "proj": str, "impl": str},
                              {**TIMING, "trace_wait_share?": (float, None)})],
        "gather?": [Outcome({"shape": str, "impl": str}, TIMING)],
        "stalls?": Outcome({}, {"shape": str, "proj": str, "variants": Each(Each(float))},
                           failed={"skipped": str}, is_failed=skipped),
    },
    "token_rounding_speed": {  # bench_token_rounding.py (moe_course.token_rounding.speed_record)
        "rows": [Outcome({"shape": str, "proj": str, "method": str, "impl": str, "rows": int, "tiles": int,
                          "changed": float, **SHAPE}, {"ms": float, "tflops?": float})],
        "speedups": [{"shape": str, "impl": str, "method": str, "tile_ratio": float,
                      "up": (float, None), "down": (float, None), "up+down": (float, None)}],
        "tile": int, "paper_speedup": float,
    },
    "token_rounding_quality": {  # token_rounding_quality.py (moe_course.rounding_quality.record_data)
        "setup": {"steps": int, "tile": int},
        "runs": [{"method": str, "seed": int, "val_loss": float}],
        "summary": Each({"seeds": int, "val_loss_mean": float, "val_loss_std": float,
                         "rel_diff_mean": (float, None), "rel_diff_std": float, "changed_mean": float}),
    },
    "moe_layer_training": LAYER,
    "moe_layer_sonicmoe": LAYER,  # chapter 05's comparison, and its rerun
    "moe_layer_sonicmoe_run": LAYER,
    "layer_kernels": {"shapes": Each([Outcome(  # bench_layer_kernels.py
        {"product": str, "kernel": str, "status": str},
        {"flops": float, "course": {**TIMING, "tbps": float}, "torch._grouped_mm": TIMING},
        failed={"note": str}, is_failed=status_not_ok)])},
    "moe_variants": {  # bench_moe_variants.py
        "rows": [Outcome({"config": str, "variant": str, "scope": str, "impl": str, **SHAPE},
                         {**TIMING, "rel_err?": float}, failed={"note?": str}, is_failed=status_not_ok)],
        "skipped?": Each(str), "matmul_tflops?": (float, None), "note?": str,
    },
    "memory_analysis": {"configs": Each({  # memory_analysis.py
        "shape": SHAPE,
        "formula?": Each({"total_bytes": int}),
        "measured?": (str, {  # on a GPU; else why not
            "torch-loop?": MEMORY_MEASURED, "grouped-mm?": MEMORY_MEASURED,
            "agreement?": {"relative_error": (float, None), "ok": bool}}),
    })},
    "sanitize": {"sanitizer": str, "tools": [str], "kernels": str, "errors": Each(int),  # tools/sanitize.py
                 "seconds": Each(float), "passed": bool},
}


# --------------------------------------------------------------------------------------------
# The check


def problem(value, layout, where: str = "data") -> str | None:
    """What is wrong with ``value`` for ``layout`` (the first thing found), or ``None`` if it
    matches. ``where`` names the value in the message (``data.rows[3].ms``)."""
    if isinstance(layout, tuple):  # the option of the value's JSON type
        layout = next((option for option in layout if _is_json_type(value, option)), layout)
    if not _is_json_type(value, layout):
        return f"{where} must be {_expected(layout)}, got {_shown(value)}"
    if isinstance(layout, list):
        return _first(problem(item, layout[0], f"{where}[{i}]") for i, item in enumerate(value))
    if isinstance(layout, Each):
        return _first(problem(item, layout.layout, where + step(key)) for key, item in value.items())
    if isinstance(layout, Outcome):
        return problem(value, {**layout.always, **(layout.failed if layout.is_failed(value) else layout.measured)},
                       where)
    if isinstance(layout, dict):
        for key, inner in layout.items():
            name = key.removesuffix("?")
            if name not in value:
                if key.endswith("?"):
                    continue
                return f"{where} has no key {name!r} (keys: {_keys(value)})"
            found = problem(value[name], inner, where + step(name))
            if found:
                return found
    return None


def step(key) -> str:
    """How a key extends a place's name: ``.rows`` for a plain word, ``["forward+backward"]`` else."""
    return f".{key}" if re.fullmatch(r"[A-Za-z_]\w*", str(key)) else f"[{json.dumps(key)}]"


def _first(problems):
    return next((p for p in problems if p), None)


def _is_json_type(value, layout) -> bool:
    if layout is None:
        return value is None
    if layout is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if layout is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(layout, list):
        return isinstance(value, list)
    if isinstance(layout, (dict, Each, Outcome)):
        return isinstance(value, dict)
    if isinstance(layout, tuple):
        return any(_is_json_type(value, option) for option in layout)
    return isinstance(value, layout)  # str, bool, list, dict


def _expected(layout) -> str:
    names = {str: "a string", int: "a whole number", float: "a number", bool: "true or false",
             list: "a list", dict: "an object", None: "null"}
    if isinstance(layout, list):
        return "a list"
    if isinstance(layout, (dict, Each, Outcome)):
        return "an object"
    return names.get(layout, str(layout))


def _shown(value) -> str:
    kinds = {str: "a string", bool: "a boolean", int: "a number", float: "a number", list: "a list",
             dict: "an object", type(None): "null"}
    kind = kinds.get(type(value), type(value).__name__)
    if isinstance(value, (list, dict)) or value is None:
        return kind
    text = json.dumps(value) if isinstance(value, (str, int, float)) else repr(value)
    return f"{kind} {text[:40] + '...' if len(text) > 40 else text}"


def _keys(value: dict, most: int = 12) -> str:
    names = list(value)
    return ", ".join(map(str, names[:most])) + (", ..." if len(names) > most else "") if names else "none"
