"""Chapter 07: FP8 maths in torch, readable top to bottom.

An FP8 matrix product stores each operand as 8-bit floats plus **scales** (float32), and
computes ``x ≈ q · scale``. What this file holds, in the order of the chapter:

1. **Formats** (:data:`E4M3`, :data:`E5M2`): range and precision, read from ``torch.finfo``
   where torch has them; every representable value (:func:`representable_values`).
2. **Quantisation** at four granularities, each a block of ``x`` that shares one scale
   (:data:`SCHEMES`): per tensor; per row (per token); DeepSeek-V3's fine-grained scheme,
   ``1 x 128`` groups along K for activations and ``128 x 128`` blocks for weights.
   ``scale = amax / 448`` (the block's largest magnitude lands on e4m3's largest value), the
   values divided by the scale, clamped to ``±448`` and cast. Dequantisation multiplies back.
3. **Matrix products**: the reference for an FP8 GEMM (dequantise, then a float32 matmul), one
   matrix (:func:`block_scaled_matmul`) and grouped over experts (:func:`grouped_block_scaled_matmul`,
   rows sorted by expert, ``offs[e]`` expert ``e``'s end row as in :mod:`moe_course.grouped_gemm`).
4. **Accumulation**: a *model* of the Hopper tensor cores' limited FP8 accumulation and of
   DeepSeek-V3's promotion to float32 every 128 of K (:func:`simulated_fp8_matmul`).
5. **Errors**: synthetic activations with outlier channels, each scheme's error, and the MoE
   layer of :mod:`moe_course.moe` with FP8 experts (:func:`fp8_expert_step`).

**How scales are rounded.** ``scale = amax / 448`` computed in float32 and kept as it is (the
released DeepSeek-V3 inference code, ``inference/kernel.py``, does this for its ``1x128`` and
``128x128`` blocks). ``pow2_scales=True`` rounds it *up* to a power of two instead,
``2^ceil(log2(amax / 448))``: the DeepSeek-V3 report (arXiv 2412.19437, §3.3.3) uses such
scales for the activations it sends to the MoE up-projection in FP8 and for those it re-tiles
from ``1x128`` to ``128x1`` in the backward pass, because multiplying by a power of two only
changes the exponent (no rounding error, and a re-tiling can re-scale exactly); DeepGEMM and
later DeepSeek releases store them as 8-bit exponents (UE8M0). Rounding up keeps
``amax / scale <= 448``; the price is that the block's largest value lands anywhere in
``(224, 448]``, up to one binade of range unused.

**An all-zero block** has ``amax = 0``, and ``0 / 448 = 0`` cannot be divided by (``0 / 0`` is
NaN). Any positive scale quantises zeros to 0 and dequantises them to exactly 0; the course
uses **scale 1** (also where ``amax / 448`` underflows float32 to 0, below about ``6e-43``).

**What torch does with FP8 on a CPU** (torch 2.13, checked by ``tests/test_fp8.py``): casts to
and from ``float8_e4m3fn`` / ``float8_e5m2`` work; arithmetic does not (``+``, ``*``,
``amax``, ``clamp`` on FP8 tensors raise; ``fp8 * float32`` refuses to promote), and
``fp8 @ fp8`` runs but rounds its *result* to FP8. So every product here dequantises to float32
first. ``torch._scaled_mm`` runs on the CPU with tensor-wise and row-wise scales, not with
block-wise ones; ``torch._scaled_grouped_mm`` has no CPU kernel.

**Saturation.** ``x.to(torch.float8_e4m3fn)`` saturates values beyond 448 to ``±448`` from
torch 2.12 on (pytorch/pytorch#178817, April 2026); earlier torch, and ``ml_dtypes``, give NaN
(e4m3fn has no infinity). The GPU's conversion (PTX ``cvt.rn.satfinite.e4m3x2.f32``, what
CUDA's ``__nv_fp8_e4m3`` uses) saturates. The course clamps explicitly, so its answer is the same
on every torch; :class:`CastsAsOlderTorch` casts the older way, to check that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from . import grouped_gemm, moe
from .checking import relative_error
from .checks import check_choice, check_finite, check_int, check_positive, require

# --------------------------------------------------------------------------------------------
# 1. Formats


@dataclass(frozen=True)
class Fp8Format:
    """One 8-bit float format: 1 sign bit, ``exponent_bits``, ``mantissa_bits``."""
    name: str
    dtype: torch.dtype
    exponent_bits: int
    mantissa_bits: int
    max: float               # largest finite value
    smallest_normal: float   # 2^(1 - bias)
    smallest_subnormal: float  # smallest_normal * 2^-mantissa_bits
    has_infinity: bool

    @property
    def relative_step(self) -> float:
        """The gap between neighbouring normal values, relative to the smaller one, at most:
        ``2^-mantissa_bits`` (rounding to nearest errs by at most half of it)."""
        return 2.0 ** -self.mantissa_bits


def format_of(dtype: torch.dtype) -> Fp8Format:
    """The facts of an FP8 dtype, from ``torch.finfo`` (the exponent bits are what is left of
    the 7 bits after the sign and the mantissa)."""
    info = torch.finfo(dtype)
    mantissa_bits = round(-math.log2(info.eps))
    name = str(dtype).removeprefix("torch.float8_")
    return Fp8Format(name=name, dtype=dtype, exponent_bits=info.bits - 1 - mantissa_bits, mantissa_bits=mantissa_bits,
                     max=info.max, smallest_normal=info.smallest_normal,
                     smallest_subnormal=info.smallest_normal * info.eps,
                     has_infinity=bool(torch.isinf(_all_codes(dtype)).any()))


def _all_codes(dtype: torch.dtype) -> Tensor:
    """The 256 bit patterns of an 8-bit dtype, as float32 (NaN and infinities included)."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()


def representable_values(dtype: torch.dtype = torch.float8_e4m3fn) -> Tensor:
    """Every finite value of an FP8 dtype, sorted, each once (float32)."""
    codes = _all_codes(dtype)
    return torch.unique(codes[torch.isfinite(codes)])  # +0 and -0 are one value


E4M3 = format_of(torch.float8_e4m3fn)   # max 448: the format of every FP8 tensor here
E5M2 = format_of(torch.float8_e5m2)     # max 57344: more range, one mantissa bit less
E4M3_MAX = E4M3.max
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


# --------------------------------------------------------------------------------------------
# 2. Quantisation: blocks of x that share one scale


class Quantized(NamedTuple):
    """An FP8 tensor and its scales: ``x ≈ data · scales``, one scale per ``block`` of ``data``.

    - ``data``: ``(..., M, K)`` FP8
    - ``scales``: ``(..., ceil(M / rows), K / cols)`` float32
    - ``block``: ``(rows, cols)``, the block one scale covers (the last one along M may be short)
    """
    data: Tensor
    scales: Tensor
    block: tuple[int, int]

    def dequantize(self) -> Tensor:
        """float32 ``data · scales``, each scale spread over its block."""
        return self.data.float() * _spread(self.scales, self.block, self.data.shape[-2])


#: name -> the block one scale covers, for an ``(M, K)`` tensor
SCHEMES: dict[str, Callable[[int, int], tuple[int, int]]] = {
    "per tensor": lambda m, k: (m, k),
    "per row": lambda m, k: (1, k),        # per token for activations, per output channel for weights
    "1x128": lambda m, k: (1, 128),        # DeepSeek-V3's activations: per token, per 128 channels of K
    "128x128": lambda m, k: (128, 128),    # DeepSeek-V3's weights: 128 output x 128 input channels
}


def saturate(x: Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> Tensor:
    """Clamp to the format's range, then cast (rounding to nearest, ties to even): a value
    beyond the largest becomes the largest, never NaN or inf, on every torch."""
    largest = torch.finfo(dtype).max
    return x.clamp(-largest, largest).to(dtype)


#: Beyond this a cast to e4m3 that does not saturate gives NaN: rounding to nearest, 464 is the
#: tie between 448 and 480 (the value e4m3fn gives to NaN) and goes to 448, the even mantissa
NO_SATURATION_LIMIT = 464.0


class CastsAsOlderTorch(TorchFunctionMode):
    """Inside ``with CastsAsOlderTorch():``, casts to ``float8_e4m3fn`` (``.to``, ``.type``,
    ``.copy_``) of values beyond ±464 give NaN, as torch before 2.12 and ``ml_dtypes`` do. Torch
    2.12 and later saturate them to ±448 by themselves, which hides a missing clamp: exercise 08's grader
    and the tests cast this way, so an answer is right on every torch."""

    CASTS = frozenset({Tensor.to, Tensor.type, Tensor.copy_})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.CASTS and isinstance(out, Tensor) and out.dtype == torch.float8_e4m3fn:
            source = args[1] if func is Tensor.copy_ else args[0]
            if isinstance(source, Tensor) and source.is_floating_point() and source.dtype != torch.float8_e4m3fn:
                beyond = (source.detach().abs().float() > NO_SATURATION_LIMIT).expand_as(out)
                bits = out.view(torch.uint8)
                bits[beyond] = bits[beyond] | 0x7F  # S.1111.111: e4m3fn's NaN, the sign kept
        return out


def scales_from_amax(amax: Tensor, dtype: torch.dtype = torch.float8_e4m3fn, pow2_scales: bool = False) -> Tensor:
    """``amax / max`` (float32), or with ``pow2_scales`` that rounded up to a power of two;
    1 where it is 0 (an all-zero block)."""
    scales = amax.float() / torch.finfo(dtype).max
    if pow2_scales:
        mantissa, exponent = torch.frexp(scales)  # scales = mantissa * 2^exponent, mantissa in [0.5, 1)
        exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)  # already a power of two: kept
        scales = torch.ldexp(torch.ones_like(scales), exponent)
    return torch.where(scales > 0, scales, torch.ones_like(scales))


def _check_blocks(x: Tensor, block: tuple[int, int], name: str) -> None:
    rows, cols = block
    check_int(rows, f"{name}'s block rows", 1)
    check_int(cols, f"{name}'s group size along K", 1)
    k = x.shape[-1]
    require(k % cols == 0, lambda: f"{name} has K={k} columns, not a multiple of the group size {cols} along K: "
                                   f"a group must not straddle two (pad K, or choose a group size that divides it)")


def _block_amax(x: Tensor, block: tuple[int, int]) -> Tensor:
    """The largest magnitude of each block: ``(..., M, K) -> (..., ceil(M / rows), K / cols)``."""
    rows, cols = block
    *lead, m, k = x.shape
    magnitude = x.abs().float()
    short = -m % rows  # the last block along M is short: pad it with zeros (they change no amax)
    if short:
        magnitude = torch.cat([magnitude, magnitude.new_zeros(*lead, short, k)], dim=-2)
    return magnitude.view(*lead, (m + short) // rows, rows, k // cols, cols).amax(dim=(-3, -1))


def _spread(scales: Tensor, block: tuple[int, int], m: int) -> Tensor:
    """Each scale repeated over its block: ``(..., M/rows, K/cols) -> (..., M, K)``."""
    rows, cols = block
    return scales.repeat_interleave(rows, dim=-2)[..., :m, :].repeat_interleave(cols, dim=-1)


def _check_input(x, name: str) -> None:
    require(isinstance(x, Tensor), lambda: f"{name} must be a torch.Tensor, got {type(x).__name__}", TypeError)
    require(x.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64),
            lambda: f"{name} must be float32, bfloat16, float16 or float64 to quantise, got {x.dtype}"
                    + (" (already FP8: dequantise it first)" if x.dtype in _FP8_DTYPES else ""), TypeError)
    require(x.dim() in (2, 3), lambda: f"{name} must be (M, K), or (E, N, K) for experts' weights; "
                                       f"got shape {tuple(x.shape)}")
    check_finite(x, name)  # an inf makes amax inf and every other value of its block 0; a NaN spreads



def quantize(x: Tensor, block: tuple[int, int], *, dtype: torch.dtype = torch.float8_e4m3fn,
             pow2_scales: bool = False, name: str = "x") -> Quantized:
    """Quantise ``x (..., M, K)`` with one scale per ``block = (rows, cols)``: the block's
    ``amax``, ``scale = amax / max`` (:func:`scales_from_amax`), ``saturate(x / scale)``."""
    _check_input(x, name)
    require(dtype in _FP8_DTYPES, lambda: f"dtype must be one of {_FP8_DTYPES}, got {dtype}", TypeError)
    _check_blocks(x, block, name)
    scales = scales_from_amax(_block_amax(x, block), dtype, pow2_scales)
    return Quantized(saturate(x.float() / _spread(scales, block, x.shape[-2]), dtype), scales, tuple(block))


def quantize_scheme(x: Tensor, scheme: str, **options) -> Quantized:
    """:func:`quantize` with a block from :data:`SCHEMES` by name."""
    check_choice(scheme, "scheme", SCHEMES)
    return quantize(x, SCHEMES[scheme](*x.shape[-2:]), **options)


def quantize_per_tensor(x: Tensor, **options) -> tuple[Tensor, Tensor]:
    """One scale for the whole of ``x (M, K)``: ``(q (M, K), scale ())``."""
    q = quantize_scheme(x, "per tensor", **options)
    return q.data, q.scales.reshape(q.scales.shape[:-2])


def quantize_per_row(x: Tensor, **options) -> tuple[Tensor, Tensor]:
    """One scale per row (per token): ``(q (M, K), scales (M, 1))``."""
    q = quantize_scheme(x, "per row", **options)
    return q.data, q.scales


def quantize_groups(x: Tensor, group_size: int = 128, **options) -> tuple[Tensor, Tensor]:
    """One scale per row and ``group_size`` columns (DeepSeek-V3's activations, ``1 x 128``):
    ``(q (M, K), scales (M, K / group_size))``."""
    q = quantize(x, (1, group_size), **options)
    return q.data, q.scales


def quantize_blocks(w: Tensor, block_size: int = 128, **options) -> tuple[Tensor, Tensor]:
    """One scale per ``block_size x block_size`` block (DeepSeek-V3's weights, ``128 x 128``):
    ``w (N, K)`` or ``(E, N, K)`` -> ``(q, scales (..., ceil(N / block_size), K / block_size))``."""
    q = quantize(w, (block_size, block_size), name="w", **options)
    return q.data, q.scales


def quantize_experts(quantize: Callable[[Tensor], tuple[Tensor, Tensor]], w: Tensor) -> tuple[Tensor, Tensor]:
    """``quantize`` (one of the functions above, of one ``(N, K)`` weight) applied to ``w (E, N, K)``
    an expert at a time, stacked: the float32 temporaries of a whole DeepSeek-V3 layer's experts
    at once would not fit in a GPU's memory."""
    first_q, first_scales = quantize(w[0])
    q = torch.empty(w.shape, device=w.device, dtype=first_q.dtype)
    scales = torch.empty((w.shape[0], *first_scales.shape), device=w.device, dtype=first_scales.dtype)
    q[0], scales[0] = first_q, first_scales
    for e in range(1, w.shape[0]):
        q[e], scales[e] = quantize(w[e])
    return q, scales


def _check_fp8(q, name: str) -> None:
    require(isinstance(q, Tensor) and q.dtype in _FP8_DTYPES,
            lambda: f"{name} must be an FP8 tensor ({', '.join(map(str, _FP8_DTYPES))}), got "
                    f"{getattr(q, 'dtype', type(q).__name__)}", TypeError)


def _check_scales(scales, name: str, shape: tuple) -> None:
    require(isinstance(scales, Tensor) and scales.dtype == torch.float32,
            lambda: f"{name}'s scales must be a float32 tensor, got {getattr(scales, 'dtype', type(scales).__name__)}",
            TypeError)
    require(tuple(scales.shape) == shape, lambda: f"{name}'s scales must have shape {shape}, got {tuple(scales.shape)}")
    check_positive(scales, f"{name}'s scales")  # a scale 0 would dequantise its block to 0, NaN or inf


def dequantize(q: Tensor, scales: Tensor, block: tuple[int, int], name: str = "q") -> Tensor:
    """float32 ``q · scales`` with one scale per ``block``, the inputs checked first."""
    _check_fp8(q, name)
    _check_blocks(q, block, name)
    rows, cols = block
    _check_scales(scales, name, (*q.shape[:-2], -(-q.shape[-2] // rows), q.shape[-1] // cols))
    return Quantized(q, scales, tuple(block)).dequantize()


def dequantize_per_tensor(q: Tensor, scale: Tensor) -> Tensor:
    """The way back from :func:`quantize_per_tensor`: ``q (M, K)``, ``scale ()`` -> float32."""
    _check_fp8(q, "q")
    return dequantize(q, scale.reshape(1, 1) if isinstance(scale, Tensor) and scale.dim() == 0 else scale,
                      tuple(q.shape[-2:]))


def dequantize_per_row(q: Tensor, scales: Tensor) -> Tensor:
    """The way back from :func:`quantize_per_row`: ``q (M, K)``, ``scales (M, 1)`` -> float32."""
    _check_fp8(q, "q")
    return dequantize(q, scales, (1, q.shape[-1]))


def dequantize_groups(q: Tensor, scales: Tensor, group_size: int = 128) -> Tensor:
    """The way back from :func:`quantize_groups`: ``scales (M, K / group_size)`` -> float32 ``(M, K)``."""
    return dequantize(q, scales, (1, group_size))


def dequantize_blocks(q: Tensor, scales: Tensor, block_size: int = 128) -> Tensor:
    """The way back from :func:`quantize_blocks`: ``q (..., N, K)`` -> float32."""
    return dequantize(q, scales, (block_size, block_size), name="w")


# --------------------------------------------------------------------------------------------
# 3. Matrix products: dequantise, then float32


def block_scaled_matmul(x_q: Tensor, x_scales: Tensor, w_q: Tensor, w_scales: Tensor, block: int = 128) -> Tensor:
    """The reference of DeepSeek-V3's FP8 GEMM (DeepGEMM's ``D = A · Bᵀ``): ``x (M, K)`` in
    ``1 x block`` groups, ``w (N, K)`` in ``block x block`` blocks -> float32 ``(M, N)``."""
    x = dequantize(x_q, x_scales, (1, block), "x_q")
    w = dequantize(w_q, w_scales, (block, block), "w_q")
    require(x.dim() == 2 and w.dim() == 2 and x.shape[1] == w.shape[1],
            lambda: f"x_q (M, K) and w_q (N, K) must share K; got {tuple(x_q.shape)} and {tuple(w_q.shape)}")
    return x @ w.T


def grouped_block_scaled_matmul(x_q: Tensor, x_scales: Tensor, w_q: Tensor, w_scales: Tensor, offs: Tensor,
                                block: int = 128) -> Tensor:
    """The same over experts: ``x (M, K)`` rows sorted by expert, ``w (E, N, K)``, ``offs (E,)``
    each expert's end row -> float32 ``(M, N)``, rows of expert ``e`` times ``w[e]ᵀ``."""
    x = dequantize(x_q, x_scales, (1, block), "x_q")
    w = dequantize(w_q, w_scales, (block, block), "w_q")
    return _grouped_matmul_dequantized(x, w, offs)


def grouped_matmul(x: Quantized, w: Quantized, offs: Tensor) -> Tensor:
    """:func:`grouped_block_scaled_matmul` for any blocks: ``x`` ``(M, K)``, ``w`` ``(E, N, K)``."""
    return _grouped_matmul_dequantized(x.dequantize(), w.dequantize(), offs)


def _grouped_matmul_dequantized(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    """float32 ``x (M, K)`` rows of expert ``e`` times ``w[e]ᵀ`` (``w (E, N, K)``): chapter 02's
    reference, after the shapes and the offsets' dtype are checked (it checks the offsets)."""
    require(x.dim() == 2 and w.dim() == 3 and x.shape[1] == w.shape[2],
            lambda: f"x must be (M, K) and w (E, N, K) with one K; got {tuple(x.shape)} and {tuple(w.shape)}")
    require(isinstance(offs, Tensor) and not offs.is_floating_point(),
            lambda: f"offs must be an integer tensor of end rows, got {getattr(offs, 'dtype', type(offs).__name__)}",
            TypeError)
    return grouped_gemm.reference(x, w, offs)  # the offsets checked there; one float32 matmul per expert


# --------------------------------------------------------------------------------------------
# 4. Accumulation: a model of Hopper's FP8 tensor cores, and promotion to float32
#
# The DeepSeek-V3 report says (§3.3.2) that "the accumulation precision of FP8 GEMM on NVIDIA
# H800 GPUs is limited to retaining around 14 bits", and (§3.5.2) how: "After aligning 32
# mantissa products by right-shifting based on the maximum exponent, the Tensor Core only uses
# the highest 14 bits of each mantissa product for addition, and truncates bits exceeding this
# range. The accumulation of addition results into registers also employs 14-bit precision."
# Its fix: every N_C = 128 elements of K (4 wgmma instructions of k = 32), copy the partial sums
# to float32 registers, multiply by the scales there and add (promotion to CUDA cores).
#
# The model below takes those two sentences literally. It is a model, not the hardware:
# NVIDIA does not publish the rounding, the order of the additions, or how the accumulator is
# aligned with the 32 products; the measured errors are the model's, not an H800's.

#: The model's defaults, from the report: 14 bits, 32 products per addition, promotion every 128
ACCUMULATOR_BITS = 14
PRODUCTS_PER_ADD = 32
PROMOTE_EVERY = 128


def truncate_bits(v: Tensor, bits: int, exponent: Tensor | None = None) -> Tensor:
    """``v`` truncated toward zero to ``bits`` significant bits, counted from the leading bit of
    ``2^exponent`` (``frexp``'s exponent: ``|v| < 2^exponent``; default: ``v``'s own)."""
    if exponent is None:
        exponent = torch.frexp(v)[1]
    quantum = torch.ldexp(torch.ones_like(v), exponent - bits)
    return torch.trunc(v / quantum) * quantum


def limited_accumulate(a: Tensor, b: Tensor, *, bits: int = ACCUMULATOR_BITS,
                       per_add: int = PRODUCTS_PER_ADD, slice_k: int = 1024) -> Tensor:
    """``a (M, K) · b (N, K)ᵀ`` summed as the model's tensor core does, in float64 (exact apart
    from the model's truncations). ``a`` and ``b`` hold FP8 values (as floats, no scales):
    each of their products is exact in 8 significant bits.

    Per ``per_add`` products along K: align them to the largest one's exponent and keep ``bits``
    bits of each (truncating), add them; the running sum keeps ``bits`` bits too. (``slice_k``
    of K at a time: the products of one slice are ``M · N · slice_k`` float64 values.)"""
    m, k = a.shape
    require(k % per_add == 0, lambda: f"K={k} must be a multiple of the {per_add} products added at once")
    a, b = a.double(), b.double()
    total = a.new_zeros(m, b.shape[0])
    for start in range(0, k, slice_k):
        products = a[:, None, start:start + slice_k] * b[None, :, start:start + slice_k]  # (M, N, slice)
        groups = products.view(m, b.shape[0], -1, per_add)
        largest = torch.frexp(groups.abs().amax(dim=-1, keepdim=True))[1]  # each group's shared exponent
        for aligned in truncate_bits(groups, bits, largest).sum(dim=-1).unbind(-1):  # in order along K
            total = truncate_bits(total + aligned, bits)
    return total


def simulated_fp8_matmul(x: Quantized, w: Quantized, *, promote_every: int | None = PROMOTE_EVERY,
                         bits: int = ACCUMULATOR_BITS) -> Tensor:
    """``x (M, K) · w (N, K)ᵀ`` as a Hopper FP8 GEMM would compute it under the model above ->
    float32 ``(M, N)``.

    ``promote_every``: every that many of K, the limited sum is multiplied by the two scales and
    added to a float32 sum (DeepSeek-V3: 128); ``None``: the whole of K in the limited
    accumulator, scaled at the end (only possible where the scales do not change along K: per
    tensor or per row)."""
    k = x.data.shape[-1]
    require(w.data.shape[-1] == k and x.data.dim() == 2 and w.data.dim() == 2,
            lambda: f"x (M, K) and w (N, K) must share K; got {tuple(x.data.shape)} and {tuple(w.data.shape)}")
    step = min(x.block[1], w.block[1])  # the scales stay constant over this much of K
    if promote_every is None:
        require(step == k, lambda: f"the scales change every {step} of K: without promotion they cannot be "
                                   f"applied (use per-tensor or per-row scales, or promote_every <= {step})")
        promote_every = k
    check_int(promote_every, "promote_every", PRODUCTS_PER_ADD)
    require(promote_every % PRODUCTS_PER_ADD == 0,
            lambda: f"promote_every={promote_every} must be a multiple of the {PRODUCTS_PER_ADD} products the "
                    f"tensor core adds at once")
    require(step == k or step % promote_every == 0,  # a partial sum must not mix two groups' scales
            lambda: f"promote_every={promote_every} must divide the scales' group along K ({step})")
    xs = _spread(x.scales, x.block, x.data.shape[0])  # (M, K): each scale over its block
    ws = _spread(w.scales, w.block, w.data.shape[0])  # (N, K)
    out = torch.zeros(x.data.shape[0], w.data.shape[0])
    for start in range(0, k, promote_every):
        part = limited_accumulate(x.data[:, start:start + promote_every].float(),
                                  w.data[:, start:start + promote_every].float(), bits=bits)
        out += (part.float() * xs[:, start, None] * ws[None, :, start])  # float32, on the "CUDA cores"
    return out


# --------------------------------------------------------------------------------------------
# 5. Errors: activations with outliers, each scheme, the MoE layer with FP8 experts


def activations_with_outliers(tokens: int, width: int, *, outlier_channels: int = 4, outlier_scale: float = 50.0,
                              seed: int = 0) -> Tensor:
    """**Synthetic** activations ``(tokens, width)``: standard normal, except ``outlier_channels``
    channels (spread over the width) scaled by ``outlier_scale``. Real LLM activations have a few
    such channels (Dettmers et al., LLM.int8(), arXiv 2208.07339); their size varies by model and
    layer, so the chapter sweeps ``outlier_scale`` rather than picking one."""
    check_int(tokens, "tokens", 1)
    check_int(width, "width", 1)
    check_int(outlier_channels, "outlier_channels", 0, width)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=g)
    x[:, outlier_channels_of(width, outlier_channels)] *= outlier_scale
    return x


def outlier_channels_of(width: int, count: int) -> Tensor:
    """Which channels :func:`activations_with_outliers` scales: ``count`` of them, evenly spread."""
    return torch.arange(count) * (width // max(count, 1)) + width // (2 * max(count, 1))


def quantization_error(x: Tensor, scheme: str, **options) -> float:
    """‖dequantise(quantise(x)) − x‖ / ‖x‖ for one scheme of :data:`SCHEMES`."""
    return relative_error(quantize_scheme(x, scheme, **options).dequantize(), x.float())


#: The MoE layer's FP8 schemes: name -> (activations' scheme, weights' scheme)
LAYER_SCHEMES = {
    "per tensor": ("per tensor", "per tensor"),  # one scale for the activations, one per expert matrix
    "per row": ("per row", "per row"),           # per token, per output channel
    "DeepSeek-V3": ("1x128", "128x128"),
}


def fake_quantize(x: Tensor, scheme: str, **options) -> Tensor:
    """``x`` quantised with ``scheme`` and dequantised, in ``x``'s dtype, with the gradient
    passed **straight through** (the straight-through estimator: the rounding counts as the
    identity in the backward pass). What training with an FP8 forward needs: the forward sees
    the FP8 values, the weights keep their full-precision copy and receive the whole gradient."""
    return _straight_through(x, quantize_scheme(x.detach(), scheme, **options).dequantize().to(x.dtype))


def _straight_through(x: Tensor, rounded: Tensor) -> Tensor:
    """``rounded``'s values with ``x``'s gradient: the straight-through estimator."""
    return x + (rounded - x).detach()


def fp8_expert_step(scheme: str = "DeepSeek-V3", straight_through: bool = False, **options) -> Callable[..., Tensor]:
    """An expert step for :func:`moe_course.moe.moe_forward` (``expert_step=``) whose three
    projections run on FP8 operands, simulated: activations and weights quantised with the
    scheme of :data:`LAYER_SCHEMES`, each product float32 (:func:`grouped_matmul`), SwiGLU in
    float32, its output quantised again before the down-projection. ``straight_through``: the
    step is differentiable (:func:`fake_quantize`), for training with an FP8 forward."""
    check_choice(scheme, "scheme", LAYER_SCHEMES)
    act_scheme, weight_scheme = LAYER_SCHEMES[scheme]

    def project(rows: Tensor, w: Tensor, ends: Tensor) -> Tensor:  # w (E, K, N), as moe stores it
        w_nk = w.transpose(1, 2)  # (E, N, K): K-major, as an FP8 GEMM reads it
        if straight_through:
            return _grouped_matmul_dequantized(fake_quantize(rows, act_scheme, **options),
                                               fake_quantize(w_nk, weight_scheme, name="w", **options), ends)
        return grouped_matmul(quantize_scheme(rows, act_scheme, **options),
                              quantize_scheme(w_nk, weight_scheme, name="w", **options), ends)

    def step(x_sorted: Tensor, offsets: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
        ends = offsets[1:]
        hidden = F.silu(project(x_sorted, w_gate, ends)) * project(x_sorted, w_up, ends)
        return project(hidden, w_down, ends).to(x_sorted.dtype)

    return step


def layer_errors(x: Tensor, weights: moe.MoEWeights, k: int, schemes=tuple(LAYER_SCHEMES), **options) -> dict:
    """The MoE layer's output with FP8 experts (each scheme) and in bf16, each against the float32
    layer: ``{name: relative error}``. The router stays float32 in all of them (DeepSeek-V3 keeps
    its gating in higher precision too), so all route the tokens alike."""
    reference = moe.moe_forward(x.float(), weights, k).y
    errors = {f"FP8 {s}": relative_error(moe.moe_forward(x.float(), weights, k, expert_step=fp8_expert_step(s, **options)).y,
                                         reference) for s in schemes}

    def bf16_step(x_sorted, offsets, w_gate, w_up, w_down):
        bf16 = [t.bfloat16() for t in (x_sorted, w_gate, w_up, w_down)]
        return moe.experts_forward(bf16[0], offsets, *bf16[1:], validate=False).float()

    errors["bf16"] = relative_error(moe.moe_forward(x.float(), weights, k, expert_step=bf16_step).y, reference)
    return errors


def bf16_expert_step(x_sorted: Tensor, offsets: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """The expert step with bf16 operands (rounded, the gradient straight through), products in
    float32: what a bf16 GEMM with float32 accumulation computes, differentiable."""
    bf16 = lambda t: _straight_through(t, t.detach().bfloat16().to(t.dtype))
    ends = offsets[1:]
    project = lambda rows, w: _grouped_matmul_dequantized(bf16(rows), bf16(w.transpose(1, 2)), ends)
    return project(F.silu(project(x_sorted, w_gate)) * project(x_sorted, w_up), w_down).to(x_sorted.dtype)


#: The forward passes chapter 07 trains with: name -> expert step (None: chapter 01's float32)
TRAINING_VARIANTS = {
    "float32": None,
    "bf16": bf16_expert_step,
    "FP8, DeepSeek-V3 scales": fp8_expert_step("DeepSeek-V3", straight_through=True),
    "FP8, per tensor": fp8_expert_step("per tensor", straight_through=True),
}


def training_curves(variants=tuple(TRAINING_VARIANTS), *, d: int = 256, n: int = 256, experts: int = 8,
                    batch: int = 256, steps: int = 120, seed: int = 0,
                    eval_every: int = 10) -> dict[str, list[tuple[int, float]]]:
    """A small MoE layer trained from one start on one stream of batches, once per forward pass
    of :data:`TRAINING_VARIANTS` (the backward in float32 through the rounding, straight through),
    on chapter 04's clustered regression task: ``{variant: [(step, validation loss), ...]}``, the
    validation loss computed with the variant's own forward. Widths of 256, so that ``1 x 128``
    groups and ``128 x 128`` blocks are smaller than a row and a matrix."""
    from . import rounding_quality as rq
    from .machine import one_thread

    for name in variants:
        check_choice(name, "variant", TRAINING_VARIANTS)
    setup = rq.Setup(d=d, n=n, experts=experts, batch=batch, steps=steps)
    task = rq.Task(setup, seed)
    start = rq.TinyMoE(setup, seed)
    draw = torch.Generator().manual_seed(20_000 + seed)
    batches = [_sample(task, batch, draw) for _ in range(steps)]  # the same batches for every variant
    x_val, y_val = _sample(task, 1024, torch.Generator().manual_seed(30_000 + seed))
    curves = {}
    for name in variants:
        step_fn = TRAINING_VARIANTS[name] or "loop"
        params = [torch.nn.Parameter(p.detach().clone()) for p in (start.w_router, start.w_gate, start.w_up, start.w_down)]
        forward = lambda x, params=params, step_fn=step_fn: moe.moe_forward(
            x, moe.MoEWeights(*params), setup.k, expert_step=step_fn).y
        opt = torch.optim.Adam(params, lr=setup.lr)
        with one_thread():
            curves[name] = _train(forward, opt, batches, x_val, y_val, eval_every)
    return curves


def _sample(task, tokens: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """What ``rounding_quality.Task.sample`` draws, its targets one matmul per cluster (its
    per-token gather of a d x d map is slow at d = 256)."""
    c = torch.randint(task.setup.clusters, (tokens,), generator=generator)
    x = task.centers[c] + 0.5 * torch.randn(tokens, task.setup.d, generator=generator)
    y = torch.empty_like(x)
    for cluster in c.unique().tolist():
        rows = c == cluster
        y[rows] = torch.tanh(x[rows] @ task.maps[cluster])
    return x, y


def _train(forward, opt, batches, x_val, y_val, eval_every: int) -> list[tuple[int, float]]:
    curve = []
    for step, (x, y) in enumerate(batches):
        loss = ((forward(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % eval_every == 0 or step + 1 == len(batches):
            with torch.no_grad():
                curve.append((step + 1, float(((forward(x_val) - y_val) ** 2).mean())))
    return curve


# --------------------------------------------------------------------------------------------
# 6. The kernels' measurements (benchmarks/bench_fp8.py records them; the notebook draws them)

GEMM_KIND = "fp8_grouped_gemm"  # benchmarks/results/fp8_grouped_gemm__<gpu>.json
#: What bench_fp8 times, in table order: the course's FP8 with its quantisation of X, the GEMM
#: alone, the quantisation alone, the up-projection with SwiGLU and quantisation in its epilogue,
#: the tokens quantised once and that up-projection gathering their rows (07_4), the course's bf16
#: kernel, torch's bf16 and FP8 grouped GEMMs
GEMM_CONTENDERS = ("07_1+07_2", "07_2", "07_2 at 128x128", "07_1", "07_3", "07_1+07_4", "03_2 bf16", "torch._grouped_mm",
                   "torch._scaled_grouped_mm")
#: The FP8 layer's two up-projections (``layer.forward_fp8(..., gather=)``) as bench_fp8 times
#: them: the record's name of each, and whether it gathers the token rows in its load
LAYER_WAYS = {"FP8 via 07_3": False, "FP8 via 07_4": True}
MIN_OVER_BF16 = 1.4  # issue 21's minimum: the course's FP8 (with its quantisation) over its bf16 kernel
MIN_OVER_TORCH_FP8 = 1.1  # ... and over torch._scaled_grouped_mm, or 85% of the dense FP8 rate if lower
MIN_OF_DENSE_FP8 = 0.85


def charged_contender(row: dict) -> str:
    """What the minimum charges the course's FP8 with: the up-projection quantises the layer's
    input first, and the faster of the course's two ways counts (07_1 on the gathered T k rows
    then 07_2, or 07_1 on the T token rows then 07_4 gathering them in its load); the
    down-projection's input comes quantised out of the up-projection's epilogue, so it is 07_2
    alone."""
    if row.get("proj") == "down":
        return "07_2"
    ways = [name for name in ("07_1+07_2", "07_1+07_4") if row.get(name, {}).get("ms")]
    return min(ways, key=lambda name: row[name]["ms"]) if ways else "07_1+07_2"


def gemm_verdict(row: dict, dense: dict) -> dict:
    """The minimum of issue 21 for one row: over bf16 03_2, and over torch's FP8 or of dense FP8."""
    ours = row.get(charged_contender(row), {}).get("tflops")
    bf16 = row.get("03_2 bf16", {}).get("tflops")
    torch_fp8 = row.get("torch._scaled_grouped_mm", {}).get("tflops")
    if not ours or not bf16:
        return {}
    need = MIN_OF_DENSE_FP8 * dense["fp8"]
    if torch_fp8:
        need = min(need, MIN_OVER_TORCH_FP8 * torch_fp8)
    return {"over_bf16": ours / bf16, "over_torch_fp8": ours / torch_fp8 if torch_fp8 else None,
            "of_dense_fp8": ours / dense["fp8"], "met": ours >= MIN_OVER_BF16 * bf16 and ours >= need}


def gemm_table(data: dict) -> str:
    dense = data["dense_tflops"]
    out = [f"dense 8192^3: FP8 e4m3 (row-wise) {dense['fp8']:.0f} TFLOP/s, bf16 {dense['bf16']:.0f} TFLOP/s",
           f"{'shape':<16}{'proj':<6}{'contender':<26}{'ms':>9}{'TFLOP/s':>9}{'% FP8':>7}"]
    for row in data["rows"]:
        if "error" in row:
            out.append(f"{row['shape']:<16}{row['proj']:<6}{row['error']}")
            continue
        for name in GEMM_CONTENDERS:
            r = row.get(name)
            if r is None:
                continue
            if "error" in r:
                out.append(f"{row['shape']:<16}{row['proj']:<6}{name:<26}  {r['error'][:80]}")
                continue
            rate = f"{r['tflops']:>9.0f}{100 * r['of_dense_fp8']:>6.0f}%" if r.get("tflops") else \
                f"{r.get('tbps', 0):>7.2f} TB/s"
            out.append(f"{row['shape']:<16}{row['proj']:<6}{name:<26}{r['ms']:>9.3f}{rate}")
        v = gemm_verdict(row, dense)
        if v:
            torch_part = f", x{v['over_torch_fp8']:.2f} torch FP8" if v["over_torch_fp8"] else ""
            out.append(f"{'':<22}{charged_contender(row)}: x{v['over_bf16']:.2f} bf16 03_2{torch_part}, "
                       f"{100 * v['of_dense_fp8']:.0f}% of dense FP8: minimum {'met' if v['met'] else 'NOT met'}"
                       f" (error {row['rel_err']:.1e} vs dequantised, {row['quantisation_err']:.1e} vs bf16)")
    for layer in data.get("layers", []):
        ratio = layer["bf16"]["ms"] / layer["FP8"]["ms"]
        paths = ", ".join(f"{name.removeprefix('FP8 ')} {layer[name]['ms']:.3f}" for name in LAYER_WAYS
                          if name in layer)
        chosen = f" (up-projection {layer['fp8_up']}; {paths})" if "fp8_up" in layer else ""
        out.append(f"{layer['shape']:<16}layer forward, T={layer['T']}: bf16 {layer['bf16']['ms']:.3f} ms, FP8 "
                   f"{layer['FP8']['ms']:.3f} ms (x{ratio:.2f}){chosen}; FP8 output {layer['fp8_vs_bf16']:.1e} "
                   "from bf16's")
    return "\n".join(out)


def quantisation_share(data: dict) -> str:
    """Where an FP8 layer's time goes, from a "fp8_grouped_gemm" record: per shape, the
    up-projection's quantisation of X (07_1) against its FP8 GEMM (07_2) and the bf16 GEMM it
    replaces (03_2), and the whole layer's forward in FP8 over bf16."""
    layers = {layer["shape"]: layer for layer in data.get("layers", [])}
    out = [f"{'shape':<16}{'07_1 ms':>9}{'07_2 ms':>9}{'03_2 bf16 ms':>14}{'07_1 share':>12}{'layer FP8 over bf16':>21}"]
    for row in data["rows"]:
        if row.get("proj") != "up" or "error" in row:
            continue
        quantise, gemm, bf16 = (row[name]["ms"] for name in ("07_1", "07_2", "03_2 bf16"))
        layer = layers.get(row["shape"])
        ratio = f"{layer['bf16']['ms'] / layer['FP8']['ms']:>20.2f}x" if layer else f"{'-':>21}"
        out.append(f"{row['shape']:<16}{quantise:>9.3f}{gemm:>9.3f}{bf16:>14.3f}{quantise / (quantise + gemm):>12.0%}{ratio}")
    return "\n".join(out)

