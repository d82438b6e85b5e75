"""Input checks: the one place where bad input is refused, with a message that names it.

Every entry point of the course (the torch maths of :mod:`moe_course.moe`, the kernel launchers
of :mod:`moe_course.launch`, :mod:`moe_course.records`, the command-line tools of
``benchmarks/`` and ``tools/``) refuses what it cannot take through these functions, so a
learner who passes a wrong dtype, a bad offset array or a cut-short record reads one line that
names the argument (or the file), what was expected and what came, never a traceback from
deep inside torch, json or the driver, and never a silently wrong answer.

- :func:`require`: the one helper every check goes through.
- Tensors: :func:`check_tensor_types`, :func:`check_same_dtype`, :func:`check_offsets`,
  :func:`check_ids_in_range`, :func:`check_finite`, :func:`check_positive`.
- Plain arguments: :func:`check_int`, :func:`check_choice`, :func:`check_device`.
- Command lines: :func:`positive_int`, :func:`nonnegative_int`, :func:`positive_float`,
  :func:`nonnegative_float`, :func:`fraction`, :func:`choices_list`, :func:`existing_dir`,
  :func:`existing_file` and :func:`argument_type` (argparse ``type=`` functions, so a bad argument
  is argparse's usage error, exit 2, naming the argument, before anything else runs); and
  :func:`run_command`, which turns a record that cannot be read into one line and exit 1.

The checks that only a kernel needs (a tile multiple, GPU memory, a Hopper) live beside the
launchers in :mod:`moe_course.launch` and are built on :func:`require`.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch


def require(ok: bool, message, kind: type[Exception] = ValueError) -> None:
    """Refuse bad input: raise ``kind(message)`` unless ``ok``. ``message`` is a string, or a
    function that makes one where formatting costs (a dtype, a device, a shape: about a
    microsecond each, and the layer's launches run ~100 checks a training step)."""
    if not ok:
        raise kind(message() if callable(message) else message)


# --------------------------------------------------------------------------------------------
# Tensors


def check_tensor_types(specs: dict) -> None:
    """``specs``: name -> (tensor, dtype, dimensions). Each a torch tensor of that dtype and rank
    (checked before where it lives: a wrong dtype is the likelier mistake)."""
    for name, (t, dtype, dim) in specs.items():
        if isinstance(t, torch.Tensor) and t.dtype == dtype and t.dim() == dim:
            continue  # the usual case, passed on one line; below, one of the three fails
        require(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
        require(t.dtype == dtype, f"{name} must be {dtype}, got {t.dtype}", TypeError)
        require(t.dim() == dim, f"{name} must have {dim} dimensions, got shape {tuple(t.shape)}")


def check_same_dtype(tensors: dict) -> None:
    """``tensors``: name -> tensor, all of one floating dtype (torch would refuse a mix deep inside
    a matmul, or quietly promote it)."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            require(False, f"{name} is {t.dtype} but {first_name} is {first.dtype}: "
                           f"give them one dtype (e.g. {name}.to({first_name}.dtype))", TypeError)


def check_same_device(tensors: dict) -> None:
    """``tensors``: name -> tensor, all on one device."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            require(False, f"{name} is on {t.device} but {first_name} is on {first.device}: move them to one device")


def check_offsets(offs, rows: int, name: str = "offs", starts_at_zero: bool = False) -> None:
    """Each expert's end row (as ``torch._grouped_mm`` takes them), or with ``starts_at_zero``
    the ``E + 1`` boundaries of chapter 01 (``0`` first): non-negative, non-decreasing, the last
    one ``rows``. Checked on the host (one small copy, a synchronisation on a GPU): malformed
    offsets would give rows to two experts or to none, silently."""
    o = offs.detach().cpu().long().reshape(-1)
    what = ("the E+1 boundaries of the experts' rows: 0 first, non-decreasing, the last" if starts_at_zero
            else "each expert's end row: non-negative, non-decreasing, the last")
    ok = o.numel() >= 1 and int(o.min()) >= 0 and not bool((o[1:] < o[:-1]).any()) and int(o[-1]) == rows
    ok = ok and (not starts_at_zero or int(o[0]) == 0)
    require(ok or (o.numel() == 0 and rows == 0),
            lambda: f"{name} must be {what} == the row count {rows}; got {o.tolist()[:16]}"
                    + ("..." if o.numel() > 16 else ""))


def check_ids_in_range(ids, high: int, name: str, what: str) -> None:
    """Every value of ``ids`` in ``0 .. high - 1`` (``what``: what the values index, e.g.
    "experts (0..E-1)"). One small copy to the host: an id outside would be dropped or wrap."""
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        require(0 <= lo and hi < high, lambda: f"{name} must index {what}: values 0..{high - 1}; got {lo}..{hi}")


def check_gather_range(gather_idx, tokens: int) -> None:
    """Every index a row of the token matrix (the kernels read a zero row for an index outside,
    only this says it was wrong)."""
    check_ids_in_range(gather_idx, tokens, "gather_idx", "rows of x")


def check_finite(t, name: str) -> None:
    """No NaN or infinity in ``t`` (one reduction and a synchronisation: for router logits and
    other small inputs whose NaN would spread silently into every weight)."""
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        require(False, f"{name} holds {int(bad.sum())} NaN or infinite values (the first at {where}): "
                       f"check what produced it")


def check_positive(t, name: str) -> None:
    """Every value of ``t`` positive and finite (scales: a scale of 0 turns its block into 0,
    or into NaN when divided by; one small reduction and a synchronisation)."""
    bad = ~(torch.isfinite(t) & (t > 0))
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        require(False, f"{name} must all be positive and finite; {int(bad.sum())} are not (the first, at {where}, "
                       f"is {float(t[where])})")


# --------------------------------------------------------------------------------------------
# Plain arguments


def check_int(value, name: str, low: int | None = None, high: int | None = None, what: str = "") -> int:
    """``value`` an int (not a bool) with ``low <= value <= high``; returns it."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    require(ok, lambda: f"{name}{what} must be an int, got {type(value).__name__} {value!r}", TypeError)
    bounds = (f">= {low}" if high is None else f"between {low} and {high}") if low is not None else f"<= {high}"
    require((low is None or value >= low) and (high is None or value <= high),
            lambda: f"{name}{what} must be {bounds}, got {value}")
    return value


def check_choice(value, name: str, choices: Iterable[str], kind: type[Exception] = ValueError) -> str:
    """``value`` one of ``choices`` (a KeyError would only echo the name back)."""
    choices = list(choices)
    require(value in choices, lambda: f"unknown {name} {value!r}; choose one of: {', '.join(map(str, choices))}", kind)
    return value


def check_device(device) -> None:
    """A device this machine has: ``"cuda"`` without a usable GPU is refused in words, before
    torch says "Found no NVIDIA driver" from deep inside an allocation. ``None`` is the default
    device, always fine."""
    if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        from .machine import info

        require(False, f"device={str(device)!r} asks for a GPU, but this machine has none that torch can use "
                       f"({info().why_no_gpu or 'this torch was built without CUDA'}): leave device out to work on the CPU", RuntimeError)


# --------------------------------------------------------------------------------------------
# Command lines: argparse ``type=`` functions (a bad value is a usage error, exit 2)


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def choices_list(choices: Iterable[str]):
    """argparse type: a comma-separated list, each item one of ``choices``."""
    choices = list(choices)

    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        unknown = [s for s in items if s not in choices]
        if not items or unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(map(repr, unknown)) or 'empty list'}; "
                                             f"choose from: {', '.join(choices)}")
        return items

    return parse


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _float_in(text, 0.0, low_open=True)


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _float_in(text, 0.0)


def fraction(text: str) -> float:
    """argparse type: a number in (0, 1] (an efficiency, a share)."""
    return _float_in(text, 0.0, 1.0, low_open=True)


def _float_in(text: str, low: float, high: float | None = None, low_open: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    if value < low or (low_open and value == low) or (high is not None and value > high):
        bounds = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
        raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
    return value


def existing_dir(text: str) -> Path:
    """argparse type: a folder that exists (one the command reads from)."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no folder {text!r}" + (" (it is a file)" if path.exists() else ""))
    return path


def existing_file(text: str) -> Path:
    """argparse type: a file that exists (one the command reads)."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no file {text!r}" + (" (it is a folder)" if path.exists() else ""))
    return path


def argument_type(parse: Callable[[str], object], name: str | None = None):
    """argparse type from a function that takes the text and raises ValueError on a bad one, such
    as ``configs.by_name`` or ``records.check_kind``: its message becomes the usage error (argparse
    would print only "invalid value")."""

    def parse_argument(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse_argument.__name__ = name or parse.__name__
    return parse_argument


def defines_argument(text: str) -> dict:
    """``KEY=VAL[,KEY=VAL]`` -> ``{KEY: VAL}``: the #defines of an experimental kernel build, as a
    benchmark's ``--try`` takes them (with :func:`argument_type`)."""
    pairs = [item.partition("=") for item in text.split(",") if item]
    if not pairs or any(not key.isidentifier() or not value for key, _, value in pairs):
        raise ValueError(f"{text!r}: expected KEY=VALUE[,KEY=VALUE] (#defines, e.g. ISSUE_IN_TURN=1)")
    return {key: value for key, _, value in pairs}


def defines_label(defines: dict) -> str:
    """How a record and a table name an experimental build: ``KEY=VAL,KEY=VAL``."""
    return ",".join(f"{k}={v}" for k, v in defines.items())


class RecordError(ValueError):
    """A record that cannot be read or saved (:mod:`moe_course.records` raises it): the message
    names the file (or the key) and what is wrong. :func:`run_command` prints it as one line."""


def run_command(main: Callable[[], int]) -> int:
    """Run a command line's ``main`` and return its exit status. A record it cannot read or save
    (:class:`RecordError`: the file is at fault, not the code) ends it with one line on stderr,
    ``<script>: error: <the file and what is wrong>``, and status 1, not a traceback."""
    try:
        return main()
    except RecordError as exc:
        print(f"{Path(sys.argv[0]).name}: error: {exc}", file=sys.stderr)
        return 1
