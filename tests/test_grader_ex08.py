"""Exercise 08's grader passes right answers, written here without the course's reference, and
FAILS known wrong answers, each on several seeds and each with the message that names its
mistake: no clamp, or one at e5m2's 57344 (NaN beyond 464 on the grader's casts, whatever this
torch does), the clamp at e4m3fnuz's 240 or on one side only; a scale per row, per tensor or down the
columns instead of per group, amax / 240, amax, 448 / amax, amax without abs, an all-zero group
giving NaN or inf; q = x · scale or x uncast; dequantisation without the scale, dividing by it,
or tiling the scales; FP8 arithmetic that torch refuses. An answer that calls the course's own
functions is refused; the unfilled cells say "not implemented yet"."""

import torch

from moe_course import fp8
from moe_course.graders import ex08_fp8_quantization as ex08

from grader_checks import must_fail, must_pass, unfilled

E4M3 = torch.float8_e4m3fn


# --- 1. the saturating cast ----------------------------------------------------------------------

def cast_ok(x):
    return x.clamp(-448, 448).to(E4M3)


def cast_by_where(x):  # another right answer: torch.where instead of clamp
    return torch.where(x.abs() > 448, torch.sign(x) * 448, x).to(E4M3)


def test_the_cast_grader():
    must_pass(ex08.grade_to_e4m3, cast_ok)
    must_pass(ex08.grade_to_e4m3, cast_by_where)
    must_fail(ex08.grade_to_e4m3, lambda x: x.to(E4M3), r"at x = 465 expected 448, got nan\n  it is what you get if "
                                                         r"there is no clamp before the cast")
    must_fail(ex08.grade_to_e4m3, lambda x: x.clamp(-240, 240).to(E4M3), "the clamp is at ±240, the largest value of "
                                                                        "float8_e4m3fnuz")
    must_fail(ex08.grade_to_e4m3, lambda x: x.clamp(-57344, 57344).to(E4M3), "no clamp before the cast \\(or one at "
                                                                            "e5m2's ±57344")
    must_fail(ex08.grade_to_e4m3, lambda x: x.clamp(max=448).to(E4M3), "only the top is clamped")
    must_fail(ex08.grade_to_e4m3, lambda x: x.clamp(-448, 448).to(torch.float8_e5m2),
              "expected dtype torch.float8_e4m3fn, got torch.float8_e5m2 \\(e5m2 has more range")
    must_fail(ex08.grade_to_e4m3, lambda x: x.clamp(-448, 448), r"got torch.float32 \(the values must be cast")
    must_fail(ex08.grade_to_e4m3, lambda x: None, "got None")
    must_fail(ex08.grade_to_e4m3, unfilled, "not implemented yet")


# --- 2. quantising per group ---------------------------------------------------------------------

def group_amax(x, g):
    return x.abs().view(x.shape[0], -1, g).amax(-1)


def quantize_ok(x, g):
    amax = group_amax(x, g)
    scales = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
    return cast_ok(x / scales.repeat_interleave(g, dim=1)), scales


def quantize_with(scales_of, divide=True, zero_scale=1.0):
    """A quantiser whose scales come from ``scales_of(x, g)`` (zero groups given ``zero_scale``)."""
    def quantize(x, g):
        scales = scales_of(x, g)
        scales = torch.where(group_amax(x, g) > 0, scales, torch.full_like(scales, zero_scale))
        spread = scales.repeat_interleave(g, dim=1)
        return cast_ok(x / spread if divide else x * spread), scales
    return quantize


def quantize_eps_scale(x, g):  # any positive scale for a zero group is right: here a tiny one
    return quantize_with(lambda x, g: group_amax(x, g) / 448, zero_scale=1e-12)(x, g)


def quantize_by_reciprocal(x, g):  # x * (448 / amax): the same up to float32 rounding at a tie
    amax = group_amax(x, g)
    inverse = torch.where(amax > 0, 448 / amax, torch.ones_like(amax))
    return cast_ok(x * inverse.repeat_interleave(g, dim=1)), 1 / inverse


def quantize_per_row(x, g):
    amax = x.abs().amax(1, keepdim=True)
    scales = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
    return cast_ok(x / scales), scales


def quantize_per_row_expanded(x, g):  # the right shape, one scale per row repeated
    q, scales = quantize_per_row(x, g)
    return q, scales.expand(-1, x.shape[1] // g).contiguous()


def quantize_per_tensor(x, g):
    scale = x.abs().amax() / 448
    return cast_ok(x / scale), scale


def quantize_along_m(x, g):  # groups of g rows down each column: scales (M / g, K)
    amax = x.abs().view(-1, g, x.shape[1]).amax(1)
    scales = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
    return cast_ok(x / scales.repeat_interleave(g, dim=0)), scales


def quantize_along_m_transposed(x, g):  # the same, scales handed back as (K, M / g)
    q, scales = quantize_along_m(x, g)
    return q, scales.T.contiguous()


def quantize_zero_nan(x, g):  # amax / 448 as it is: an all-zero group divides 0 by 0
    scales = group_amax(x, g) / 448
    return cast_ok(x / scales.repeat_interleave(g, dim=1)), scales


def quantize_zero_inf(x, g):  # multiplies by 448 / amax, inf for an all-zero group: 0 * inf = NaN
    amax = group_amax(x, g)
    return cast_ok(x * (448 / amax).repeat_interleave(g, dim=1)), amax / 448


def test_the_quantiser_grader():
    must_pass(ex08.grade_quantize_groups, quantize_ok)
    must_pass(ex08.grade_quantize_groups, quantize_eps_scale)
    must_pass(ex08.grade_quantize_groups, quantize_by_reciprocal)
    must_fail(ex08.grade_quantize_groups, quantize_per_row,
              r"a random matrix.*expected shape \(8, 4\) \(M, K / group_size\), got \(8, 1\): that is one scale per row")
    must_fail(ex08.grade_quantize_groups, quantize_per_row_expanded, "it is what you get if one scale per row, not per group")
    must_fail(ex08.grade_quantize_groups, quantize_per_tensor, r"got \(\): that is one scale for the whole tensor")
    must_fail(ex08.grade_quantize_groups, quantize_along_m, r"got \(2, 16\): that is groups along M")
    must_fail(ex08.grade_quantize_groups, quantize_along_m_transposed, r"got \(16, 2\): that is groups along M")
    must_fail(ex08.grade_quantize_groups, quantize_with(lambda x, g: group_amax(x, g) / 240), "scale = amax / 240")
    must_fail(ex08.grade_quantize_groups, quantize_with(lambda x, g: group_amax(x, g)), "scale = amax: the scale must map")
    must_fail(ex08.grade_quantize_groups, quantize_with(lambda x, g: 448 / group_amax(x, g), divide=False),
              "scale = 448 / amax, the inverse")
    must_fail(ex08.grade_quantize_groups, quantize_with(lambda x, g: x.view(x.shape[0], -1, g).amax(-1) / 448),
              "amax is the largest value, not the largest magnitude")
    must_fail(ex08.grade_quantize_groups, quantize_with(lambda x, g: group_amax(x, g) / 448, divide=False),
              r"q = x · scale: quantising divides")
    must_fail(ex08.grade_quantize_groups, lambda x, g: (cast_ok(x), quantize_ok(x, g)[1]), "cast without dividing")
    must_fail(ex08.grade_quantize_groups, quantize_zero_nan, r"rows and a group of zeros.*the all-zero group at row 1, "
                                                              r"group 0 has scale 0.0. Its amax is 0")
    must_fail(ex08.grade_quantize_groups, quantize_zero_inf, "the all-zero group at row 1, group 0 has scale 0.0")
    must_fail(ex08.grade_quantize_groups, lambda x, g: (quantize_ok(x, g)[0], quantize_ok(x, g)[1].double()),
              "expected float32 scales, got torch.float64")
    must_fail(ex08.grade_quantize_groups, lambda x, g: quantize_ok(x, g)[0], "expected a pair")
    must_fail(ex08.grade_quantize_groups, unfilled, "not implemented yet")


def test_a_missing_clamp_in_the_quantiser_is_harmless_and_passes():
    """With scale = amax / 448 the largest value lands on 448 (within float32 rounding, far below
    464): the clamp guards only scales that do not come from this amax. Part 1 grades it."""
    def no_clamp(x, g):
        q, scales = quantize_ok(x, g)
        return (x / scales.repeat_interleave(g, dim=1)).to(E4M3), scales
    must_pass(ex08.grade_quantize_groups, no_clamp)


def test_fp8_arithmetic_is_explained():
    def amax_of_q(x, g):
        q, scales = quantize_ok(x, g)
        q.abs().amax()  # torch has no amax for FP8 on the CPU
        return q, scales
    must_fail(ex08.grade_quantize_groups, amax_of_q, "torch cannot compute with an FP8 tensor.*convert it first, q.float()")
    must_fail(ex08.grade_dequantize_groups, lambda q, s, g: q * s.repeat_interleave(g, dim=1),
              r"torch cannot compute with an FP8 tensor \(Promotion for Float8 Types is not supported")


def test_every_case_is_what_its_name_says():
    for name, x, g in ex08.cases(seed=5):
        amax = group_amax(x, g)
        if "zeros" in name:
            assert (x == 0).all(1).sum() == 2 and (amax == 0).sum() > 2 * x.shape[1] // g
        if "448" in name:
            assert (x.abs() == 448).any() and (x.abs() > 464).any()
        if "negative" in name:
            largest = x.view(x.shape[0], -1, g).gather(-1, x.abs().view(x.shape[0], -1, g).argmax(-1, keepdim=True))
            assert (largest < 0).all()
        if "one group" in name:
            assert x.shape[1] == g
        if "square" in name:
            assert x.shape[0] == x.shape[1]
        if name == "a random matrix":
            assert x.shape[0] % g == 0 and x.shape[0] != x.shape[1]


# --- 3. dequantising -----------------------------------------------------------------------------

def dequantize_ok(q, scales, g):
    return q.float() * scales.repeat_interleave(g, dim=1)


def test_the_dequantiser_grader():
    must_pass(ex08.grade_dequantize_groups, dequantize_ok)
    must_pass(ex08.grade_dequantize_groups, lambda q, s, g: (q.float().view(q.shape[0], -1, g) * s[..., None]).view(q.shape))
    must_fail(ex08.grade_dequantize_groups, lambda q, s, g: q.float(), "the scales are left out")
    must_fail(ex08.grade_dequantize_groups, lambda q, s, g: q.float() / s.repeat_interleave(g, dim=1),
              "q is divided by the scale")
    must_fail(ex08.grade_dequantize_groups, lambda q, s, g: q.float() * s.repeat(1, g), r"the scales are tiled")
    must_fail(ex08.grade_dequantize_groups, lambda q, s, g: dequantize_ok(q, s, g).bfloat16(),
              "expected a float32 tensor, got torch.bfloat16")
    must_fail(ex08.grade_dequantize_groups, lambda q, s, g: dequantize_ok(q, s, g)[:, :-1], "expected shape")
    must_fail(ex08.grade_dequantize_groups, unfilled, "not implemented yet")


# --- shortcuts -----------------------------------------------------------------------------------

def test_shortcuts_are_refused():
    must_fail(ex08.grade_to_e4m3, fp8.saturate, "the function given is the course's own moe_course.fp8.saturate")
    must_fail(ex08.grade_quantize_groups, lambda x, g: fp8.quantize_groups(x, g),
              r"<lambda>, line \d+, calls the course's own moe_course.fp8.quantize_groups")
    must_fail(ex08.grade_quantize_groups, lambda x, g: fp8.quantize_scheme(x, "1x128")[:2],
              "calls the course's own moe_course.fp8.quantize_scheme")
    must_fail(ex08.grade_dequantize_groups, lambda q, s, g: fp8.Quantized(q, s, (1, g)).dequantize(),
              "calls the course's own moe_course.fp8.Quantized.dequantize")
