"""moe_course.fp8, chapter 07's FP8 maths: the formats' facts, what torch does with FP8 on this
CPU (as the module's docstring says), quantisation round trips within e4m3's bound at every
granularity, exact scales, zero blocks, saturation, the grouped reference against a per-expert
loop at awkward counts, the accumulation model, bad inputs refused by name, and a wrong
quantiser caught by the round-trip check."""

import math

import pytest
import torch
from packaging.version import Version

from moe_course import fp8, moe
from moe_course.checking import relative_error

E4M3 = torch.float8_e4m3fn
#: torch 2.12 and later saturate a cast to e4m3 beyond ±448 (pytorch/pytorch#178817); earlier ones give NaN
SATURATES = Version(torch.__version__.split("+")[0]) >= Version("2.12")


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# --- formats, and torch's FP8 on this CPU --------------------------------------------------------

def test_the_formats_facts():
    assert (fp8.E4M3.max, fp8.E4M3.smallest_normal, fp8.E4M3.smallest_subnormal) == (448.0, 2.0**-6, 2.0**-9)
    assert (fp8.E4M3.exponent_bits, fp8.E4M3.mantissa_bits, fp8.E4M3.has_infinity) == (4, 3, False)
    assert (fp8.E5M2.max, fp8.E5M2.smallest_normal, fp8.E5M2.smallest_subnormal) == (57344.0, 2.0**-14, 2.0**-16)
    assert (fp8.E5M2.exponent_bits, fp8.E5M2.mantissa_bits, fp8.E5M2.has_infinity) == (5, 2, True)
    values = fp8.representable_values(E4M3)
    assert values.numel() == 253 and values.max() == 448 and torch.equal(values, -values.flip(0))  # 254 codes, one zero
    positive = values[values > 0]
    assert positive[0] == 2.0**-9 and positive.numel() == 126
    normal = positive[positive >= 2.0**-6]
    assert ((normal[1:] - normal[:-1]) / normal[:-1]).max() == fp8.E4M3.relative_step == 0.125


def test_what_torch_does_with_fp8_on_this_cpu():
    """The module docstring's claims; a torch that changes them fails here, and the docstring
    (and chapter 07) must say the new behaviour."""
    q = torch.tensor([1.0, -2.0, 0.5]).to(E4M3)
    assert q.float().tolist() == [1.0, -2.0, 0.5] and q.to(torch.bfloat16).dtype == torch.bfloat16
    for refused in (lambda: q + q, lambda: q * 2, lambda: q.amax(), lambda: q.clamp(-1, 1),
                    lambda: q * torch.ones(3)):
        with pytest.raises((NotImplementedError, RuntimeError)):
            refused()
    a, b = randn(8, 64).to(E4M3), randn(16, 64, seed=1).to(E4M3)
    assert (a @ b.T).dtype == E4M3  # runs, but rounds the result to FP8
    one = torch.tensor(1.0)
    exact = a.float() @ b.float().T
    assert torch.allclose(torch._scaled_mm(a, b.T, scale_a=one, scale_b=one, out_dtype=torch.float32), exact)
    refused = (ValueError, RuntimeError)  # torch 2.11: an internal assert; 2.12 and later, a ValueError
    with pytest.raises(refused, match="Invalid scaling configuration|only supports per-tensor scaling"):  # block-wise
        torch._scaled_mm(randn(128, 256).to(E4M3), randn(256, 256).to(E4M3).T, scale_a=torch.ones(128, 2),
                         scale_b=torch.ones(2, 2), out_dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="CPU"):
        torch._scaled_grouped_mm(a, b.unsqueeze(0).transpose(1, 2), scale_a=torch.ones(8), scale_b=torch.ones(1, 16),
                                 offs=torch.tensor([8], dtype=torch.int32), out_dtype=torch.bfloat16)
    beyond = torch.tensor([465.0, -1e6, float("inf")]).to(E4M3).float()
    if SATURATES:
        assert beyond.tolist() == [448.0, -448.0, 448.0]  # pytorch/pytorch#178817: saturates


def test_the_scale_convention_is_torchs():
    """x ≈ q · scale, as torch._scaled_mm takes its scales: the reference and torch agree."""
    x, w = randn(32, 64, scale=3.0), randn(16, 64, seed=1)
    (xq, xs), (wq, ws) = fp8.quantize_per_tensor(x), fp8.quantize_per_tensor(w)
    ours = fp8.dequantize_per_tensor(xq, xs) @ fp8.dequantize_per_tensor(wq, ws).T
    torch_says = torch._scaled_mm(xq, wq.T, scale_a=xs, scale_b=ws, out_dtype=torch.float32)
    assert relative_error(torch_says, ours) < 1e-6


# --- quantisation --------------------------------------------------------------------------------

def assert_within_e4m3_bound(x, q: fp8.Quantized):
    """Rounding to nearest: within half a step, 2^-4 relative for normal values, 2^-10 · scale
    absolute in the subnormals (plus float32's own rounding of x / scale)."""
    spread = fp8._spread(q.scales, q.block, x.shape[-2])
    error = (q.dequantize() - x.float()).abs()
    bound = 2.0**-4 * x.abs() + 2.0**-10 * spread
    assert bool((error <= bound * (1 + 1e-6)).all()), f"largest excess {float((error - bound).max()):g}"


OUTLIERS = fp8.activations_with_outliers(40, 384, outlier_channels=3, outlier_scale=1e3)


@pytest.mark.parametrize("scheme", list(fp8.SCHEMES))
@pytest.mark.parametrize("pow2", [False, True])
def test_round_trips_within_the_bound(scheme, pow2):
    for x in (randn(37, 256, scale=5.0), OUTLIERS, randn(1, 128) * 1e-3, randn(130, 256, seed=2)):
        q = fp8.quantize_scheme(x, scheme, pow2_scales=pow2)
        assert q.data.dtype == E4M3 and q.scales.dtype == torch.float32
        assert_within_e4m3_bound(x, q)


def test_weights_of_experts_in_blocks_with_a_short_last_block():
    w = randn(3, 200, 256, scale=0.1)  # N = 200: blocks of 128 and 72 rows
    q, scales = fp8.quantize_blocks(w)
    assert scales.shape == (3, 2, 2)
    assert_within_e4m3_bound(w, fp8.Quantized(q, scales, (128, 128)))
    for e in range(3):  # blocks never cross experts
        assert torch.equal(scales[e], fp8.quantize_blocks(w[e])[1])
    assert torch.equal(fp8.dequantize_blocks(q, scales), fp8.Quantized(q, scales, (128, 128)).dequantize())


def test_e5m2_trades_precision_for_range():
    x = randn(64, 256)
    e4m3, e5m2 = (fp8.quantization_error(x, "1x128", dtype=d) for d in (E4M3, torch.float8_e5m2))
    assert 1.5 < e5m2 / e4m3 < 2.5  # one mantissa bit less: about twice the error


def test_scales_are_exact():
    x = randn(9, 256, scale=7.0)
    groups = x.abs().view(9, 2, 128).amax(-1)
    _, scales = fp8.quantize_groups(x)
    assert torch.equal(scales, groups / 448)
    assert torch.equal(fp8.quantize_per_row(x)[1], x.abs().amax(1, keepdim=True) / 448)
    assert torch.equal(fp8.quantize_per_tensor(x)[1], x.abs().amax() / 448) and fp8.quantize_per_tensor(x)[1].dim() == 0
    q, _ = fp8.quantize_groups(x)
    assert (q.float().abs().view(9, 2, 128).amax(-1) == 448).all()  # each group's largest lands on 448
    _, pow2 = fp8.quantize_groups(x, pow2_scales=True)
    exponents = torch.log2(pow2)
    assert torch.equal(exponents, exponents.round()) and (pow2 >= scales).all() and (pow2 < 2 * scales).all()
    assert torch.equal(fp8.scales_from_amax(torch.tensor([448.0, 896.0, 500.0]), pow2_scales=True),
                       torch.tensor([1.0, 2.0, 2.0]))  # a power of two stays; anything else rounds up


def test_zero_blocks_get_scale_one_and_come_back_exactly_zero():
    x = randn(4, 256)
    x[1] = 0.0
    x[2, 128:] = 0.0
    x[3, :128] = 1e-44  # amax / 448 underflows float32 to 0: scale 1 too, the values round to 0
    for scheme in fp8.SCHEMES:
        q = fp8.quantize_scheme(x, scheme)
        assert torch.isfinite(q.dequantize()).all()
    q, scales = fp8.quantize_groups(x)
    assert scales[1].tolist() == [1.0, 1.0] and scales[2, 1] == 1.0 and scales[3, 0] == 1.0
    back = fp8.dequantize_groups(q, scales)
    assert (back[1] == 0).all() and (back[2, 128:] == 0).all() and (back[3, :128] == 0).all()
    q, scales = fp8.quantize_per_tensor(torch.zeros(3, 5))
    assert scales == 1.0 and (q.float() == 0).all()


def test_saturate_clamps_on_every_torch():
    x = torch.tensor([1.0, 448.0, 465.0, 1e6, -480.0, -3e38])
    want = [1.0, 448.0, 448.0, 448.0, -448.0, -448.0]
    assert fp8.saturate(x).float().tolist() == want
    with fp8.CastsAsOlderTorch():  # a cast that does not saturate, as torch < 2.12 and ml_dtypes
        assert torch.isnan(x.to(E4M3).float()[2:]).all()
        assert fp8.saturate(x).float().tolist() == want
    assert fp8.saturate(torch.tensor([1e6]), torch.float8_e5m2).float().item() == 57344.0  # not inf


@pytest.mark.parametrize("cast", [
    lambda x: x.to(E4M3),
    lambda x: x.to(dtype=E4M3),
    lambda x: x.to("cpu", E4M3),
    lambda x: x.type(E4M3),
    lambda x: torch.empty(x.shape, dtype=E4M3).copy_(x),
])
def test_every_way_of_casting_is_cast_as_older_torch(cast):
    """Without a clamp, each way of casting gives NaN beyond 464 inside the mode (torch 2.12 and
    later saturate by themselves: exercise 08's check of the clamp can fail only through the mode)."""
    x = torch.tensor([448.0, 464.0, 465.0, -1e6, 1.0])

    def assert_older_torchs(got):
        assert got[[0, 1, 4]].tolist() == [448.0, 448.0, 1.0] and torch.isnan(got[[2, 3]]).all()
        assert (got[3].view(torch.int32) < 0).item(), "the sign is kept"

    if SATURATES:
        assert cast(x).float().tolist() == [448.0, 448.0, 448.0, -448.0, 1.0]
    else:  # torch 2.11 (the GPU machine's): the mode changes nothing
        assert_older_torchs(cast(x).float())
    with fp8.CastsAsOlderTorch():
        assert_older_torchs(cast(x).float())


def test_a_wrong_quantiser_is_caught():
    """The round-trip check can fail: scales rounded *down* to a power of two put each block's
    largest value beyond 448, where the clamp cuts it (errors up to a half)."""
    x = randn(16, 256, scale=3.0)

    def rounded_down(x):
        amax = x.abs().view(16, 2, 128).amax(-1)
        scales = torch.exp2(torch.floor(torch.log2(amax / 448)))
        return fp8.Quantized(fp8.saturate(x / scales.repeat_interleave(128, 1)), scales, (1, 128))
    with pytest.raises(AssertionError, match="largest excess"):
        assert_within_e4m3_bound(x, rounded_down(x))


# --- matrix products -----------------------------------------------------------------------------

@pytest.mark.parametrize("counts", [[0, 5, 0, 130, 1], [0, 0, 37, 0], [64], [3, 0, 0, 0, 0, 0]])
@pytest.mark.parametrize("offs_dtype", [torch.int32, torch.int64])
def test_grouped_reference_against_a_per_expert_loop(counts, offs_dtype):
    e, n, k = len(counts), 136, 256  # N = 136: a short last 128 x 128 block
    x, w = randn(sum(counts), k, scale=2.0), randn(e, n, k, seed=1, scale=0.1)
    xq, xs = fp8.quantize_groups(x)
    wq, ws = fp8.quantize_blocks(w)
    offs = torch.tensor(counts).cumsum(0).to(offs_dtype)
    got = fp8.grouped_block_scaled_matmul(xq, xs, wq, ws, offs)
    assert got.shape == (sum(counts), n) and got.dtype == torch.float32
    unquantized = torch.empty_like(got)
    for expert, rows in enumerate(torch.arange(sum(counts)).split(counts)):
        want = fp8.block_scaled_matmul(xq[rows], xs[rows], wq[expert], ws[expert])
        assert torch.allclose(got[rows], want, rtol=1e-5, atol=1e-5), f"expert {expert}"
        unquantized[rows] = x[rows] @ w[expert].T
    assert relative_error(got, unquantized) < 0.06  # FP8's error of the float32 product, no more


def test_the_layer_with_fp8_experts():
    g = torch.Generator().manual_seed(0)
    weights = moe.random_weights(256, 128, 4, generator=g)
    x = fp8.activations_with_outliers(64, 256, outlier_channels=2, outlier_scale=20.0)
    errors = fp8.layer_errors(x, weights, 2)
    assert set(errors) == {"FP8 per tensor", "FP8 per row", "FP8 DeepSeek-V3", "bf16"}
    assert errors["bf16"] < 0.02 and all(0.01 < errors[f"FP8 {s}"] < 0.15 for s in fp8.LAYER_SCHEMES), errors


# --- the accumulation model ----------------------------------------------------------------------

def test_truncation_keeps_the_leading_bits():
    v = torch.tensor([1 + 2.0**-13 + 2.0**-14, -(1 + 2.0**-13 + 2.0**-14), 0.0], dtype=torch.float64)
    assert fp8.truncate_bits(v, 14).tolist() == [1 + 2.0**-13, -(1 + 2.0**-13), 0.0]  # toward zero
    assert fp8.truncate_bits(v, 14, exponent=torch.tensor(3)).tolist() == [1.0, -1.0, 0.0]  # aligned to 2^3


def test_an_accumulator_of_53_bits_is_exact():
    a, b = randn(8, 256).to(E4M3).float(), randn(4, 256, seed=1).to(E4M3).float()
    exact = a.double() @ b.double().T
    assert torch.allclose(fp8.limited_accumulate(a, b, bits=53), exact, rtol=1e-12, atol=0)


def test_promotion_every_128_bounds_the_error_that_grows_with_k():
    errors = {}
    for k in (256, 4096):
        x = fp8.quantize_scheme(randn(16, k), "per tensor")
        w = fp8.quantize_scheme(randn(16, k, seed=1), "per tensor")
        exact = x.dequantize().double() @ w.dequantize().double().T
        errors[k] = {p: relative_error(fp8.simulated_fp8_matmul(x, w, promote_every=p), exact) for p in (None, 128)}
    assert errors[4096][None] > 8 * errors[256][None]  # grows about linearly with K (truncation's bias)
    assert errors[4096][None] > 10 * errors[4096][128]
    assert errors[4096][128] < 2 * errors[256][128] < 1e-3


def test_fine_grained_scales_are_applied_at_each_promotion():
    x = fp8.quantize(randn(8, 512, scale=4.0), (1, 128))
    w = fp8.quantize(randn(24, 512, seed=1), (128, 128))
    reference = fp8.block_scaled_matmul(x.data, x.scales, w.data, w.scales)
    assert relative_error(fp8.simulated_fp8_matmul(x, w), reference) < 1e-3
    assert relative_error(fp8.simulated_fp8_matmul(x, w, bits=53), reference) < 1e-6
    with pytest.raises(ValueError, match="the scales change every 128 of K: without promotion"):
        fp8.simulated_fp8_matmul(x, w, promote_every=None)
    with pytest.raises(ValueError, match=r"promote_every=256 must divide the scales' group along K \(128\)"):
        fp8.simulated_fp8_matmul(x, w, promote_every=256)
    with pytest.raises(ValueError, match="promote_every=48 must be a multiple of the 32 products"):
        fp8.simulated_fp8_matmul(x, w, promote_every=48)


# --- bad input, refused by name ------------------------------------------------------------------

def test_bad_input_is_refused_by_name():
    x = randn(4, 256)
    q, scales = fp8.quantize_groups(x)
    with_inf = x.clone()
    with_inf[2, 7] = float("inf")
    cases = [
        (lambda: fp8.quantize_groups(with_inf), ValueError, r"x holds 1 NaN or infinite values \(the first at \(2, 7\)\)"),
        (lambda: fp8.quantize_groups(torch.full((2, 128), float("nan"))), ValueError, "x holds 256 NaN"),
        (lambda: fp8.quantize_groups(randn(3, 200)), ValueError, "x has K=200 columns, not a multiple of the group size 128"),
        (lambda: fp8.quantize_blocks(randn(2, 130, 100)), ValueError, "w has K=100 columns, not a multiple"),
        (lambda: fp8.quantize_groups(x, 0), ValueError, "group size along K must be >= 1, got 0"),
        (lambda: fp8.quantize_groups(torch.ones(2, 128, dtype=torch.int64)), TypeError, "x must be float32, bfloat16"),
        (lambda: fp8.quantize_groups(q), TypeError, "already FP8: dequantise it first"),
        (lambda: fp8.quantize_groups([[1.0]]), TypeError, "x must be a torch.Tensor, got list"),
        (lambda: fp8.quantize_scheme(x, "per column"), ValueError, "unknown scheme 'per column'; choose one of: per tensor"),
        (lambda: fp8.quantize(x, (1, 128), dtype=torch.bfloat16), TypeError, "dtype must be one of"),
        (lambda: fp8.dequantize_groups(q, torch.zeros_like(scales)), ValueError,
         r"q's scales must all be positive and finite; 8 are not \(the first, at \(0, 0\), is 0.0\)"),
        (lambda: fp8.dequantize_groups(q, -scales), ValueError, "q's scales must all be positive"),
        (lambda: fp8.dequantize_groups(x, scales), TypeError, "q must be an FP8 tensor"),
        (lambda: fp8.dequantize_groups(q, scales.double()), TypeError, "q's scales must be a float32 tensor, got torch.float64"),
        (lambda: fp8.dequantize_groups(q, scales[:, :1]), ValueError, r"q's scales must have shape \(4, 2\)"),
        (lambda: fp8.dequantize_groups(q, scales, 100), ValueError, "q has K=256 columns, not a multiple of the group size 100"),
        (lambda: fp8.block_scaled_matmul(q, scales, q, scales), ValueError, r"w_q's scales must have shape \(1, 2\)"),
        (lambda: fp8.grouped_block_scaled_matmul(q, scales, *fp8.quantize_blocks(randn(2, 8, 256)), torch.tensor([1, 3])),
         ValueError, r"offs must be each expert's end row.*== the row count 4; got \[1, 3\]"),
        (lambda: fp8.grouped_block_scaled_matmul(q, scales, *fp8.quantize_blocks(randn(2, 8, 256)), torch.tensor([1.0, 4.0])),
         TypeError, "offs must be an integer tensor"),
        (lambda: fp8.grouped_block_scaled_matmul(q, scales, *fp8.quantize_blocks(randn(2, 8, 128)), torch.tensor([1, 4])),
         ValueError, r"x must be \(M, K\) and w \(E, N, K\) with one K"),
        (lambda: fp8.activations_with_outliers(4, 8, outlier_channels=9), ValueError, "outlier_channels must be between 0 and 8"),
        (lambda: fp8.fp8_expert_step("per column"), ValueError, "unknown scheme 'per column'; choose one of: per tensor"),
    ]
    for call, kind, message in cases:
        with pytest.raises(kind, match=message):
            call()


def test_the_checks_on_finite_and_positive_values_can_fail_and_pass():
    from moe_course.checks import check_positive
    check_positive(torch.tensor([1e-30, 2.0]), "scales")
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=r"scales must all be positive and finite; 1 are not \(the first, at \(1,\)"):
            check_positive(torch.tensor([1.0, bad]), "scales")


def test_outlier_channels_are_what_they_say():
    x = fp8.activations_with_outliers(256, 512, outlier_channels=4, outlier_scale=100.0)
    channels = fp8.outlier_channels_of(512, 4)
    assert len(set(channels.tolist())) == 4 and int(channels.max()) < 512
    rms = x.square().mean(0).sqrt()
    assert (rms[channels] > 50).all() and (rms[~torch.isin(torch.arange(512), channels)] < 2).all()
    assert math.isclose(float(rms[channels].mean() / 100), 1.0, rel_tol=0.15)


# --- training with an FP8 forward ------------------------------------------------------------------

def test_fake_quantize_rounds_forward_and_passes_the_gradient_straight_through():
    x = torch.randn(4, 256, requires_grad=True)
    y = fp8.fake_quantize(x, "1x128")
    q = fp8.quantize_scheme(x.detach(), "1x128")
    assert torch.equal(y.detach(), q.dequantize())
    assert not torch.equal(y.detach(), x.detach())  # it did round
    (y * torch.arange(256.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(256.0).expand(4, 256))


def test_the_straight_through_expert_step_equals_the_fp8_one_and_trains_the_weights():
    g = torch.Generator().manual_seed(0)
    w = moe.random_weights(256, 256, 4, generator=g)
    x = torch.randn(64, 256, generator=g)
    plain = moe.moe_forward(x, w, 2, expert_step=fp8.fp8_expert_step("DeepSeek-V3")).y
    params = moe.MoEWeights(*(t.clone().requires_grad_() for t in w))
    trained = moe.moe_forward(x, params, 2, expert_step=fp8.fp8_expert_step("DeepSeek-V3", straight_through=True)).y
    assert torch.allclose(trained, plain, rtol=1e-5, atol=1e-6)
    trained.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_training_curves_start_alike_and_differ_by_the_rounding():
    curves = fp8.training_curves(("float32", "bf16", "FP8, DeepSeek-V3 scales"), steps=6, eval_every=3)
    assert [s for s, _ in curves["float32"]] == [3, 6]
    final = {name: curve[-1][1] for name, curve in curves.items()}
    assert final["float32"] != final["FP8, DeepSeek-V3 scales"]  # the FP8 forward is really taken
    assert abs(final["FP8, DeepSeek-V3 scales"] / final["float32"] - 1) < 0.05
    with pytest.raises(ValueError, match="variant"):
        fp8.training_curves(("fp4",))


def test_quantize_experts_equals_quantising_the_stack_at_once():
    w = torch.randn(3, 256, 384, generator=torch.Generator().manual_seed(0))
    for quantize in (fp8.quantize_blocks, fp8.quantize_per_row):
        q, scales = fp8.quantize_experts(quantize, w)
        q_all, scales_all = quantize(w)
        assert torch.equal(q.view(torch.uint8), q_all.view(torch.uint8)) and torch.equal(scales, scales_all)


def test_the_minimum_charges_the_faster_of_the_two_up_projection_paths():
    ms = lambda v: {"ms": v}
    assert fp8.charged_contender({"proj": "up", "07_1+07_2": ms(2.0), "07_1+07_4": ms(1.0)}) == "07_1+07_4"
    assert fp8.charged_contender({"proj": "up", "07_1+07_2": ms(1.0), "07_1+07_4": ms(2.0)}) == "07_1+07_2"
    assert fp8.charged_contender({"proj": "up", "07_1+07_2": ms(1.0)}) == "07_1+07_2"  # a record before 07_4
    assert fp8.charged_contender({"proj": "down", "07_1+07_2": ms(9.0), "07_2": ms(1.0)}) == "07_2"


def test_the_fp8_layer_gathers_in_its_up_projection_only_on_narrow_experts():
    from moe_course import layer

    def weights(two_n):
        return layer.Fp8Weights(None, torch.empty(4, two_n, 256), None, None, None)

    assert layer.gathers_in_kernel(weights(512)) and layer.gathers_in_kernel(weights(layer.FP8_GATHER_MAX_WIDTH))
    assert not layer.gathers_in_kernel(weights(4096))  # DeepSeek-V3: 07_4's slower loads cost more


def test_quantisation_share_reads_the_up_projections_and_the_layers_of_a_record():
    ms = lambda v: {"ms": v}
    data = {"rows": [{"shape": "a", "proj": "up", "07_1": ms(1.0), "07_2": ms(3.0), "03_2 bf16": ms(4.0)},
                     {"shape": "a", "proj": "down", "07_1": ms(9.0), "07_2": ms(9.0), "03_2 bf16": ms(9.0)},
                     {"shape": "b", "proj": "up", "error": "07_2 is wrong"}],
            "layers": [{"shape": "a", "bf16": ms(5.0), "FP8": ms(4.0)}]}
    lines = fp8.quantisation_share(data).splitlines()
    assert len(lines) == 2  # the header and shape a's up-projection: no down row, no failed row
    assert lines[1].split() == ["a", "1.000", "3.000", "4.000", "25%", "1.25x"]


# --- bench_fp8.py --try: an experimental build beside the defaults (its GPU part: on a GPU) -----

def test_try_parses_defines_and_refuses_a_bare_name():
    from moe_course.checks import defines_argument, defines_label

    assert defines_argument("ISSUE_IN_TURN=1,STAGES=3") == {"ISSUE_IN_TURN": "1", "STAGES": "3"}
    assert defines_label(defines_argument("ISSUE_IN_TURN=1,STAGES=3")) == "ISSUE_IN_TURN=1,STAGES=3"
    for bad in ("ISSUE_IN_TURN", "=1", "A B=1", ""):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            defines_argument(bad)


def test_bench_fp8_try_says_how_each_kernel_did_against_its_default():
    from benchmark_scripts import load

    bench = load("bench_fp8")
    row = {"07_2": {"ms": 1.0}, "07_3": {"ms": 2.0},
           "tried": {"ISSUE_IN_TURN=1": {"07_2": {"ms": 0.8, "tflops": 1100.0}, "07_3": {"ms": 2.5, "tflops": 700.0}},
                     "X=1": {"error": "not the default's bytes: not timed"}}}
    ordered, wrong = bench.tried_summary(row)
    assert "07_2 x1.250" in ordered and "07_3 x0.800" in ordered  # default ms over the experiment's
    assert "X=1" in wrong and "not the default's bytes" in wrong
    assert bench.tried_summary({"07_2": {"ms": 1.0}}) == []
