"""Grader of exercise 08, FP8 quantisation per token group (chapter 07's maths, in torch).

The learner writes (as :mod:`moe_course.fp8` does):

- ``to_e4m3(x) -> float8_e4m3fn``: clamp to ``±448``, then cast (a saturating cast)
- ``quantize_groups(x (M, K) float32, group_size) -> (q (M, K) float8_e4m3fn, scales (M, K / group_size) float32)``:
  one scale per row and ``group_size`` columns along K, ``scale = amax / 448``, ``q = to_e4m3(x / scale)``;
  an all-zero group gets any positive scale (the course: 1)
- ``dequantize_groups(q, scales, group_size) -> (M, K) float32``: ``q · scale``, each scale over its group

**Casts as older torch does.** From torch 2.12 on, ``x.to(torch.float8_e4m3fn)`` saturates by
itself; earlier torch (the course's CUDA set runs 2.11) gives NaN beyond 464 (half-way to 480,
the value e4m3fn gives to NaN). While the learner's code runs, the grader casts the older way
(:class:`moe_course.fp8.CastsAsOlderTorch`), so an answer that forgets the clamp fails on every torch, not
only on the ones that do not saturate for it.

Every case is built so that something can go wrong: one row, rows and groups of zeros, values
at and beyond e4m3's largest, groups whose largest magnitude is negative, ``K = group_size``,
many groups, a square matrix (groups along M would have the right shape there). Each known
mistake is named when it is what the answer returned (:data:`SCALE_MISTAKES` and friends).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor

from .. import fp8
from ..checking import CheckFailed, check_shape, grading
from . import as_graded, as_outputs, check_close_or_explain, fresh_seed

TITLE = "Exercise 08"

#: The course's answers to this exercise: a learner's function that calls one is refused.
REFERENCES = (fp8.saturate, fp8.quantize, fp8.quantize_groups, fp8.quantize_scheme, fp8.scales_from_amax,
              fp8.dequantize, fp8.dequantize_groups, fp8.Quantized.dequantize)

E4M3_MAX = fp8.E4M3_MAX


def _graded(fn: Callable) -> Callable:
    """The learner's function through :func:`as_graded`, with casts as older torch does, and
    torch's refusal to compute on FP8 tensors explained."""
    graded = as_graded(fn, REFERENCES)

    def call(*args):
        try:
            with fp8.CastsAsOlderTorch():
                return graded(*args)
        except RuntimeError as exc:
            if "Float8" in str(exc) or "float8" in str(exc):
                raise CheckFailed(f"{fn.__name__}: torch cannot compute with an FP8 tensor ({str(exc).splitlines()[0]}): "
                                  f"convert it first, q.float(), and do the arithmetic in float32") from None
            raise

    return call


def _same(got: Tensor, want: Tensor) -> Tensor:
    """Equal values, NaN equal to NaN (a cast is exact: no tolerance)."""
    got, want = got.float(), want.float()
    return (got == want) | (torch.isnan(got) & torch.isnan(want))


def _check_fp8(name: str, got, shape) -> Tensor:
    if not isinstance(got, Tensor):
        raise CheckFailed(f"{name}: expected a torch tensor of dtype torch.float8_e4m3fn, got {type(got).__name__}")
    if got.dtype != torch.float8_e4m3fn:
        hint = (" (e5m2 has more range but one mantissa bit less: the spec asks for e4m3)" if got.dtype == torch.float8_e5m2
                else " (the values must be cast: .to(torch.float8_e4m3fn))")
        raise CheckFailed(f"{name}: expected dtype torch.float8_e4m3fn, got {got.dtype}{hint}")
    check_shape(name, got, shape)
    return got


# --------------------------------------------------------------------------------------------
# 1. The saturating cast


def edge_values() -> Tensor:
    """Values where a cast to e4m3 can go wrong: zeros, the subnormals and their rounding, a tie,
    just below and beyond 240 (e4m3fnuz's largest) and 448, the NaN boundary 464/465, values past
    e5m2's largest (57344) and near float32's, each with both signs."""
    positive = [0.0, 2.0**-10, 2.0**-9, 3 * 2.0**-11, 2.0**-6, 1.0, 1.0625, 1.1875, 17.0, 239.0, 240.0, 241.0, 256.0,
                300.0, 447.0, 448.0, 449.0, 463.9, 464.0, 465.0, 479.0, 480.0, 500.0, 1000.0, 57344.0, 60000.0,
                1e6, 3e38]
    values = torch.tensor(positive, dtype=torch.float32)
    return torch.cat([values, -values])


#: What the usual saturation mistakes return, on the grader's casts (older torch's: NaN beyond 464)
SATURATE_MISTAKES: dict[str, Callable[[Tensor], Tensor]] = {
    "there is no clamp before the cast (or one at e5m2's ±57344, which leaves the same values beyond "
    "464): e4m3fn has no infinity, so a cast that does not saturate (torch before 2.12, ml_dtypes, the "
    "grader) gives NaN beyond 464; torch 2.12 and later saturate by themselves, older ones and other libraries do not. "
    "Clamp to ±448 first: x.clamp(-448, 448)":
        lambda x: _older_cast(x),
    "the clamp is at ±240, the largest value of float8_e4m3fnuz (AMD's variant); float8_e4m3fn's is 448 "
    "(torch.finfo(torch.float8_e4m3fn).max)":
        lambda x: x.clamp(-240, 240).to(torch.float8_e4m3fn),
    "only the top is clamped (x.clamp(max=448)): negative values beyond -464 overflow too; clamp both sides":
        lambda x: _older_cast(x.clamp(max=E4M3_MAX)),
}


def _older_cast(x: Tensor) -> Tensor:
    with fp8.CastsAsOlderTorch():
        return x.to(torch.float8_e4m3fn)


def grade_to_e4m3(to_e4m3, seed: int | None = None) -> None:
    """``to_e4m3(x float32) -> float8_e4m3fn``, clamped to ±448 first."""
    seed = fresh_seed(seed)
    g = torch.Generator().manual_seed(seed)
    to_e4m3 = _graded(to_e4m3)
    with grading(f"{TITLE} · the saturating cast"):
        spread = torch.randn(64, generator=g) * 10 ** (6 * torch.rand(64, generator=g) - 3)  # 1e-3 .. 1e3
        for name, x in (("edge values", edge_values()), ("random values, 1e-3 to 1e3", spread),
                        ("a 2-D tensor", spread[:60].view(6, 10) * 10)):
            where = f"{name}, seed {seed}"
            (got,) = as_outputs("to_e4m3", to_e4m3(x.clone()), 1, where)
            got = _check_fp8(f"to_e4m3 ({where})", got, x.shape)
            want = fp8.saturate(x)
            wrong = ~_same(got, want)
            if bool(wrong.any()):
                i = tuple(int(v) for v in wrong.nonzero()[0])
                message = (f"to_e4m3 ({where}): {int(wrong.sum())} of {x.numel()} values differ; at x = {float(x[i]):g} "
                           f"expected {float(want[i].float()):g}, got {float(got[i].float()):g}")
                for why, mistake in SATURATE_MISTAKES.items():
                    if bool(_same(got, mistake(x)).all()):
                        raise CheckFailed(f"{message}\n  it is what you get if {why}")
                raise CheckFailed(message)


# --------------------------------------------------------------------------------------------
# 2. Quantising per group


def cases(seed: int) -> list[tuple[str, Tensor, int]]:
    """(name, x (M, K) float32, group_size), drawn afresh from ``seed``. The first has M a
    multiple of the group size and M != K, so that a scale of the wrong shape says which."""
    g = torch.Generator().manual_seed(seed)

    def randn(m, k, scale=1.0):
        return torch.randn(m, k, generator=g) * scale

    zeros = randn(6, 16, scale=3.0)
    zeros[[1, 4]] = 0.0          # two rows of zeros
    zeros[2, 4:8] = 0.0          # and one zero group inside a row
    big = randn(4, 12, scale=100.0)
    big[0, 1], big[1, 5], big[2, 10], big[3, 0] = E4M3_MAX, -1000.0, 1e6, -E4M3_MAX  # at and beyond 448
    negative = randn(5, 8).abs() * 0.5
    negative[:, [1, 6]] = -torch.rand(5, 2, generator=g) - 2.0  # each group's largest magnitude is negative
    per_group = randn(3, 64) * 10 ** torch.randint(-4, 5, (3, 16), generator=g).repeat_interleave(4, dim=1).float()
    return [
        ("a random matrix", randn(8, 16, scale=2.0), 4),
        ("one row", randn(1, 24), 8),
        ("rows and a group of zeros", zeros, 4),
        ("values at and beyond 448", big, 4),
        ("groups whose largest magnitude is negative", negative, 4),
        ("K = group_size (one group per row)", randn(5, 8), 8),
        ("many groups, of very different sizes (1e-4 to 1e4)", per_group, 4),
        ("a square matrix", randn(16, 16, scale=5.0), 4),
        ("group_size 128, as DeepSeek-V3", randn(3, 384), 128),
    ]


def _group_amax(x: Tensor, group_size: int) -> Tensor:
    return x.abs().view(x.shape[0], -1, group_size).amax(-1)


#: What the usual scale mistakes return: ``{why: function (x, group_size) -> scales}``
SCALE_MISTAKES: dict[str, Callable[[Tensor, int], Tensor]] = {
    "one scale per row, not per group: each group of group_size values along K has its own amax":
        lambda x, g: (x.abs().amax(1, keepdim=True) / E4M3_MAX).expand(-1, x.shape[1] // g),
    "scale = amax / 240: 240 is float8_e4m3fnuz's largest value (AMD's variant); float8_e4m3fn's is 448":
        lambda x, g: _group_amax(x, g) / 240,
    "scale = amax: the scale must map amax onto e4m3's largest value, scale = amax / 448 (with scale = amax "
    "the largest value lands on 1: e4m3's range above 1, up to 448, goes unused, and small values fall into "
    "the subnormals sooner)":
        lambda x, g: _group_amax(x, g),
    "scale = 448 / amax, the inverse: the scale is what dequantises, x ≈ q · scale (as DeepSeek-V3 and "
    "torch._scaled_mm take it), so q = x / scale with scale = amax / 448":
        lambda x, g: E4M3_MAX / _group_amax(x, g),
    "amax is the largest value, not the largest magnitude: use x.abs() (a group whose largest magnitude is "
    "negative overflows)":
        lambda x, g: x.view(x.shape[0], -1, g).amax(-1) / E4M3_MAX,
    "the groups run along M (down the columns), not along K: a group is one row's group_size consecutive values":
        lambda x, g: _groups_along_m(x, g),
}


def _groups_along_m(x: Tensor, g: int) -> Tensor:
    """Scales of groups down the columns, ``(K, M / g)``: the shape of the right answer's where
    ``M = K`` (elsewhere nothing to compare, an empty tensor)."""
    if x.shape[0] % g:
        return x.new_empty(0)
    return _group_amax(x.T.contiguous(), g) / E4M3_MAX


def _explain_scale_shape(got_shape: tuple, x: Tensor, g: int) -> str:
    m, k = x.shape
    known = {(m, 1): "one scale per row (per token), not per group",
             (m,): "one scale per row (per token), not per group",
             (): "one scale for the whole tensor, not per group",
             (1,): "one scale for the whole tensor, not per group",
             (1, 1): "one scale for the whole tensor, not per group",
             (m // g, k): "groups along M (down the columns), not along K",
             (k, m // g): "groups along M (down the columns), not along K",
             (m, k): "one scale per value"}
    why = known.get(tuple(got_shape))
    return f": that is {why}; a group is one row's group_size consecutive values along K" if why else ""


def _zero_groups_as_right(mistake: Callable, x: Tensor, g: int, zero: Tensor, want: Tensor) -> Tensor:
    """The scales a mistake gives, its all-zero groups' replaced by the right ones (the answer's
    are compared that way too: any positive scale is right there)."""
    scales = mistake(x, g)
    return torch.where(zero, want, scales) if scales.shape == zero.shape else scales


def _bound(mistakes: dict, *args) -> dict:
    """``{why: f}`` -> ``{why: f(*args), computed when asked}``, as check_close_or_explain takes them."""
    return {why: functools.partial(f, *args) for why, f in mistakes.items()}


def _check_scales(scales, x: Tensor, g: int, where: str) -> Tensor:
    name = f"scales ({where})"
    if not isinstance(scales, Tensor):
        raise CheckFailed(f"{name}: expected a float32 torch tensor, got {type(scales).__name__}")
    want_shape = (x.shape[0], x.shape[1] // g)
    if tuple(scales.shape) != want_shape:
        raise CheckFailed(f"{name}: expected shape {want_shape} (M, K / group_size), got {tuple(scales.shape)}"
                          + _explain_scale_shape(tuple(scales.shape), x, g))
    if scales.dtype != torch.float32:
        raise CheckFailed(f"{name}: expected float32 scales, got {scales.dtype}")
    zero = _group_amax(x, g) == 0
    bad_zero = zero & ~(torch.isfinite(scales) & (scales > 0))
    if bool(bad_zero.any()):
        r, c = (int(v) for v in bad_zero.nonzero()[0])
        raise CheckFailed(
            f"{name}: the all-zero group at row {r}, group {c} has scale {float(scales[r, c])}. Its amax is 0, so "
            f"amax / 448 = 0, and dividing by it gives 0 / 0 = NaN. Give such a group any positive scale (the course "
            f"uses 1: torch.where(amax > 0, amax / 448, 1)); its values quantise to 0 and dequantise to exactly 0.")
    want = _group_amax(x, g) / E4M3_MAX
    # an all-zero group may have any positive scale: compared as if it had the right one
    mistakes = {why: functools.partial(_zero_groups_as_right, f, x, g, zero, want) for why, f in SCALE_MISTAKES.items()}
    check_close_or_explain(name, torch.where(zero, want, scales), want, mistakes, rtol=1e-6, atol=0.0)
    return scales


#: What the usual mistakes in q return, given the (right) scales spread over x
Q_MISTAKES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "q = x · scale: quantising divides by the scale (q = x / scale); dequantising multiplies (x ≈ q · scale)":
        lambda x, s: fp8.saturate(x * s),
    "x is cast without dividing by the scales: q = to_e4m3(x / scale)":
        lambda x, s: fp8.saturate(x),
}


def grade_quantize_groups(quantize_groups, seed: int | None = None) -> None:
    """``quantize_groups(x (M, K) float32, group_size) -> (q, scales)``."""
    seed = fresh_seed(seed)
    quantize_groups = _graded(quantize_groups)
    with grading(f"{TITLE} · quantising per group"):
        for name, x, g in cases(seed):
            m, k = x.shape
            where = f"{name}, M={m}, K={k}, group_size={g}, seed {seed}"
            q, scales = as_outputs("quantize_groups", quantize_groups(x.clone(), g), 2, where)
            q = _check_fp8(f"q ({where})", q, x.shape)
            scales = _check_scales(scales, x, g, where)
            spread = scales.repeat_interleave(g, dim=1)
            nan = torch.isnan(q.float())
            if bool(nan.any()):
                r, c = (int(v) for v in nan.nonzero()[0])
                raise CheckFailed(f"q ({where}): {int(nan.sum())} values are NaN (the first at [{r}, {c}], x = "
                                  f"{float(x[r, c]):g}, scale {float(spread[r, c]):g}): divided by a scale of 0, or cast "
                                  f"without the clamp? Use your to_e4m3.")
            want = fp8.saturate(x / spread)  # with the answer's own scales: a zero group's may be any positive one
            # one e4m3 step at most (2^-3 relative, 2^-9 below the normals): x / scale rounded differently in
            # float32 (x * (1 / scale), say) may round to the neighbouring e4m3 value at a tie
            check_close_or_explain(f"q ({where})", q, want, _bound(Q_MISTAKES, x, spread), rtol=2.0**-3, atol=2.0**-9)


# --------------------------------------------------------------------------------------------
# 3. Dequantising


#: What the usual dequantisation mistakes return: ``{why: function (q as float32, scales, group_size)}``
DEQUANT_MISTAKES: dict[str, Callable[[Tensor, Tensor, int], Tensor]] = {
    "the scales are left out: x ≈ q · scale, each group's q times its scale":
        lambda q, s, g: q,
    "q is divided by the scale: dequantising multiplies (x ≈ q · scale); it is quantising that divides":
        lambda q, s, g: q / s.repeat_interleave(g, dim=1),
    "the scales are tiled (scales.repeat(1, group_size): s0 s1 s0 s1 ...), not spread over their groups "
    "(scales.repeat_interleave(group_size, dim=1): s0 s0 s1 s1 ...)":
        lambda q, s, g: q * s.repeat(1, g),
}


def grade_dequantize_groups(dequantize_groups, seed: int | None = None) -> None:
    """``dequantize_groups(q (M, K) float8_e4m3fn, scales (M, K / group_size), group_size) -> (M, K) float32``."""
    seed = fresh_seed(seed)
    dequantize_groups = _graded(dequantize_groups)
    with grading(f"{TITLE} · dequantising"):
        for name, x, g in cases(seed):
            q, scales = fp8.quantize_groups(x, g)
            m, k = x.shape
            where = f"{name}, M={m}, K={k}, group_size={g}, seed {seed}"
            (got,) = as_outputs("dequantize_groups", dequantize_groups(q.clone(), scales.clone(), g), 1, where)
            if not isinstance(got, Tensor) or got.dtype != torch.float32:
                what = got.dtype if isinstance(got, Tensor) else type(got).__name__
                raise CheckFailed(f"dequantize_groups ({where}): expected a float32 tensor, got {what}")
            check_shape(f"dequantize_groups ({where})", got, x.shape)
            want = fp8.dequantize_groups(q, scales, g)
            check_close_or_explain(f"dequantize_groups ({where})", got, want, _bound(DEQUANT_MISTAKES, q.float(), scales, g),
                                   rtol=1e-6, atol=0.0)
