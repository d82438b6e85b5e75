"""Chapter 07's kernels: 07_1 quantises bit for bit as moe_course.fp8 does (awkward row counts,
gathered rows, indices outside x, all-zero groups), 07_2 equals the float64 product of the
dequantised operands at the awkward expert counts (empty experts, counts off the tile, one expert
with every row; outputs NaN-poisoned first, so a skipped tile fails), and both refuse bad inputs
with a message that names the problem (these checks run before any launch: on a CPU too)."""

import pytest
import torch
from kernel_checks import COUNT_CASES, poison, rel

from moe_course import fp8, launch
from moe_course.checking import same_bytes

E4M3 = torch.float8_e4m3fn


def _quantize_reference(x, gather_idx=None):
    """fp8.quantize_groups on the CPU, returned to the GPU. (Torch on a GPU divides by a scalar as
    a product with its reciprocal, so its amax / 448 can be an ulp off IEEE division; on an H100
    its scales of a 7 x 384 input differed from these, and 1 of 2688 values rounded the other way.)"""
    rows = x.float() if gather_idx is None else _gathered(x, gather_idx).float()
    q, scales = fp8.quantize_groups(rows.cpu())
    return q.to(x.device), scales.to(x.device)


def _gathered(x, gather_idx):
    """x's rows gather_idx, a zero row where an index is outside x (as the kernels read it)."""
    inside = (gather_idx >= 0) & (gather_idx < x.shape[0])
    rows = x[gather_idx.clamp(0, x.shape[0] - 1).long()]
    return torch.where(inside[:, None], rows, torch.zeros_like(rows))


def _fp8_problem(counts, N, K, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    M, E = sum(counts), len(counts)
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    w = (torch.randn(E, N, K, device="cuda", generator=g) / K**0.5).bfloat16()
    offs = torch.tensor(counts, device="cuda").cumsum(0).int()
    return x, w, offs


def _reference(x_q, x_scales, w_q, w_scales, offs):
    """float64 product of the dequantised operands, expert by expert."""
    M = x_q.shape[0]
    x = x_q.double() * x_scales[:, :M].T.double().repeat_interleave(128, dim=1)
    y = torch.zeros(M, w_q.shape[1], device=x_q.device, dtype=torch.float64)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            w = w_q[e].double() * w_scales[e].double().repeat_interleave(128, 0).repeat_interleave(128, 1)
            y[start:end] = x[start:end] @ w.T
        start = end
    return y


# --- 07_1: quantisation ---------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("rows, K", [(1, 128), (7, 384), (130, 256), (1000, 1024)])
def test_quantize_matches_the_torch_maths_bit_for_bit(rows, K):
    x = (torch.randn(rows, K, device="cuda") * torch.logspace(-3, 3, K, device="cuda")).bfloat16()
    x[0, :128] = 0  # an all-zero group: scale 1, zeros
    q, scales = launch.quantize_1x128(x)
    q_ref, scales_ref = _quantize_reference(x)
    assert scales.shape == (K // 128, launch.fp8_scales_width(rows))
    assert torch.equal(scales[:, :rows].T, scales_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert float(scales[0, 0]) == 1.0


@pytest.mark.gpu
def test_quantize_gathers_rows_and_reads_a_zero_row_outside_x():
    x = torch.randn(50, 256, device="cuda").bfloat16()
    gather_idx = torch.tensor([3, 3, 49, 0, 17, 50, -1, 8], device="cuda", dtype=torch.int32)
    q, scales = launch.quantize_1x128(x, gather_idx, validate=False)
    q_ref, scales_ref = _quantize_reference(x, gather_idx)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(scales[:, :8].T, scales_ref)
    assert (q[5:7].float() == 0).all() and (scales[:, 5:7] == 1).all()
    with pytest.raises(ValueError, match="gather_idx"):
        launch.quantize_1x128(x, gather_idx)  # validated: the indices outside x are named


@pytest.mark.gpu
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_quantize_names_the_row_with_an_inf_or_nan(bad):
    x = torch.randn(20, 256, device="cuda").bfloat16()
    x[13, 200] = bad
    with pytest.raises(ValueError, match="row 13"):
        launch.quantize_1x128(x)
    gather_idx = torch.tensor([0, 13, 2], device="cuda", dtype=torch.int32)
    with pytest.raises(ValueError, match=r"row 13 \(sorted row 1\)"):
        launch.quantize_1x128(x, gather_idx)


# --- 07_2: the block-scaled grouped GEMM ----------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("case", list(COUNT_CASES), ids=list(COUNT_CASES))
@pytest.mark.parametrize("N, K", [(128, 128), (256, 640)])
def test_fp8_gemm_matches_the_dequantised_product(case, N, K):
    counts = COUNT_CASES[case]
    x, w, offs = _fp8_problem(counts, N, K, seed=len(counts) + N + K)
    x_q, x_scales = launch.quantize_1x128(x)
    w_q, w_scales = fp8.quantize_blocks(w.float())
    M = x.shape[0]
    poison(((M, N), torch.bfloat16))
    y = launch.fp8_grouped_gemm(x_q, x_scales, w_q, w_scales, offs)
    ref = _reference(x_q, x_scales, w_q, w_scales, offs)
    # bf16 output (2^-9 relative a value) and the tensor core's ~14-bit sums over 128 products
    assert rel(y, ref) < 4e-3
    quantisation = rel(y, x.double() @ w[0].double().T) if len(counts) == 1 else None
    if quantisation is not None:  # one expert: the FP8 error against the bf16 inputs, e4m3-sized
        assert 1e-3 < quantisation < 0.1


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(COUNT_CASES), ids=list(COUNT_CASES))
def test_07_2s_wide_tiles_give_its_narrow_tiles_bytes(case):
    """FP8_GEMM_WIDE (128 x 256 tiles, two halves through one accumulator, the default where N
    divides by 256): the same wgmma on the same slices, promoted in the same order, so the
    128 x 128 build's result bit for bit, unwritten rows aside."""
    counts = COUNT_CASES[case]
    x, w, offs = _fp8_problem(counts, 512, 640, seed=len(counts) + 7)
    x_q, x_scales = launch.quantize_1x128(x)
    w_q, w_scales = fp8.quantize_blocks(w.float())
    poison(((x.shape[0], 512), torch.bfloat16))
    wide = launch.fp8_grouped_gemm(x_q, x_scales, w_q, w_scales, offs, step=launch.FP8_GEMM_WIDE)
    assert torch.equal(wide, launch.fp8_grouped_gemm(x_q, x_scales, w_q, w_scales, offs, step=launch.FP8_GEMM))


def test_07_2_takes_wide_tiles_where_n_divides_by_256():
    assert launch.fp8_gemm_step(512) is launch.FP8_GEMM_WIDE
    assert launch.fp8_gemm_step(384) is launch.FP8_GEMM
    assert launch.fp8_gemm_step(128) is launch.FP8_GEMM


@pytest.mark.gpu
def test_fp8_gemm_accumulates_long_k_in_float32():
    """Same-sign terms over K = 8192: one FP8 accumulator would be ~5% off (chapter 07's probe);
    promoted every 128, the error stays at the bf16 output's rounding."""
    M, N, K = 256, 128, 8192
    x = torch.rand(M, K, device="cuda").bfloat16()
    w = torch.rand(1, N, K, device="cuda").bfloat16()
    offs = torch.tensor([M], device="cuda", dtype=torch.int32)
    x_q, x_scales = launch.quantize_1x128(x)
    w_q, w_scales = fp8.quantize_blocks(w.float())
    y = launch.fp8_grouped_gemm(x_q, x_scales, w_q, w_scales, offs)
    assert rel(y, _reference(x_q, x_scales, w_q, w_scales, offs)) < 4e-3


@pytest.mark.gpu
def test_fp8_gemm_refuses_a_zero_scale_and_bad_offsets():
    x, w, offs = _fp8_problem([100, 28], 128, 256)
    x_q, x_scales = launch.quantize_1x128(x)
    w_q, w_scales = fp8.quantize_blocks(w.float())
    zero = w_scales.clone()
    zero[1, 0, 1] = 0
    with pytest.raises(ValueError, match="w_scales must all be positive"):
        launch.fp8_grouped_gemm(x_q, x_scales, w_q, zero, offs)
    with pytest.raises(ValueError, match="offs"):
        launch.fp8_grouped_gemm(x_q, x_scales, w_q, w_scales, torch.tensor([100, 99], device="cuda").int())


# --- 07_3: the up-projection with SwiGLU, its output quantised in the epilogue ---------------------

def _swiglu_reference(x_q, x_scales, w_q, w_scales, offs):
    """float64 SwiGLU of the dequantised product (gate and up rows interleaved)."""
    h = _reference(x_q, x_scales, w_q, w_scales, offs)
    return torch.nn.functional.silu(h[:, 0::2]) * h[:, 1::2]


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(COUNT_CASES), ids=list(COUNT_CASES))
@pytest.mark.parametrize("n, K", [(128, 128), (384, 640)])
def test_fp8_swiglu_writes_the_activation_quantised_as_07_1_would(case, n, K):
    counts = COUNT_CASES[case]
    x, w, offs = _fp8_problem(counts, 2 * n, K, seed=len(counts) + n + K)
    x_q, x_scales = launch.quantize_1x128(x)
    w_q, w_scales = fp8.quantize_blocks(w.float())
    M = x.shape[0]
    poison(((M, n), E4M3), ((n // 128, launch.fp8_scales_width(M)), torch.float32))
    a_q, a_scales = launch.fp8_swiglu_quantize(x_q, x_scales, w_q, w_scales, offs)
    a = _swiglu_reference(x_q, x_scales, w_q, w_scales, offs)
    q_ref, scales_ref = fp8.quantize_groups(a.float().cpu())
    assert a_q.shape == (M, n) and a_scales.shape == (n // 128, launch.fp8_scales_width(M))
    assert (a_scales[:, M:] == 1).all()
    # each scale is amax / 448 of its row's 128 outputs: the tensor cores' sums of 128 products
    # (~14 bits kept, section 3 of the notebook) against float64 ones
    assert torch.allclose(a_scales[:, :M].T.cpu(), scales_ref, rtol=2e-3, atol=0)
    # the values: as 07_1 would round them, but for the few that sit on a rounding boundary
    same = (a_q.view(torch.uint8).cpu() == q_ref.view(torch.uint8)).float().mean()
    assert same > 0.98
    dequantised = a_q.float() * a_scales[:, :M].T.repeat_interleave(128, dim=1)
    assert rel(dequantised, a) < 4e-2  # e4m3's rounding, 3 bits of mantissa


@pytest.mark.gpu
def test_fp8_swiglu_then_fp8_gemm_is_the_fp8_expert_ffn():
    """07_3 then 07_2: the experts' FFN with both GEMMs in FP8 equals the float64 maths of the
    dequantised operands within the activation's e4m3 rounding."""
    counts, d, n = [0, 200, 57, 0, 300], 256, 384
    x, w1, offs = _fp8_problem(counts, 2 * n, d, seed=7)
    w2 = (torch.randn(len(counts), d, n, device="cuda") / n**0.5).bfloat16()
    x_q, x_scales = launch.quantize_1x128(x)
    w1_q, w1_scales = fp8.quantize_blocks(w1.float())
    w2_q, w2_scales = fp8.quantize_blocks(w2.float())
    y = launch.fp8_grouped_gemm(*launch.fp8_swiglu_quantize(x_q, x_scales, w1_q, w1_scales, offs), w2_q, w2_scales,
                                offs)
    a = _swiglu_reference(x_q, x_scales, w1_q, w1_scales, offs)
    start, ref = 0, torch.zeros(x.shape[0], d, device="cuda", dtype=torch.float64)
    for e, end in enumerate(offs.tolist()):
        w = w2_q[e].double() * w2_scales[e].double().repeat_interleave(128, 0).repeat_interleave(128, 1)
        ref[start:end] = a[start:end] @ w.T
        start = end
    assert rel(y, ref) < 4e-2


# --- 07_4: 07_3 with the token rows gathered in the load ------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("case", list(COUNT_CASES), ids=list(COUNT_CASES))
def test_fp8_gather_equals_07_3_on_the_gathered_rows_bit_for_bit(case):
    counts, n, K = COUNT_CASES[case], 384, 640
    M = sum(counts)
    g = torch.Generator(device="cuda").manual_seed(M)
    tokens = max(1, M // 3)
    x = torch.randn(tokens, K, device="cuda", generator=g).bfloat16()
    gather_idx = torch.randint(0, tokens, (M,), device="cuda", generator=g, dtype=torch.int32)
    if M > 5:
        gather_idx[5] = tokens  # outside x: a zero row, as 07_1's gather reads it
    w = (torch.randn(len(counts), 2 * n, K, device="cuda", generator=g) / K**0.5).bfloat16()
    offs = torch.tensor(counts, device="cuda").cumsum(0).int()
    w_q, w_scales = fp8.quantize_blocks(w.float())
    x_q, x_scales = launch.quantize_1x128(x)  # the tokens' rows, once
    poison(((M, n), E4M3))
    got_q, got_scales = launch.fp8_gather_swiglu_quantize(x_q, x_scales, gather_idx, w_q, w_scales, offs,
                                                          validate=False)
    want_q, want_scales = launch.fp8_swiglu_quantize(*launch.quantize_1x128(x, gather_idx, validate=False), w_q,
                                                     w_scales, offs)
    assert torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(got_scales, want_scales)


@pytest.mark.gpu
def test_fp8_gather_names_an_index_outside_x():
    x_q, x_scales = launch.quantize_1x128(torch.randn(10, 256, device="cuda").bfloat16())
    w_q, w_scales = fp8.quantize_blocks(torch.randn(2, 256, 256, device="cuda"))
    offs = torch.tensor([3, 6], device="cuda", dtype=torch.int32)
    gather_idx = torch.tensor([0, 1, 2, 9, 10, 4], device="cuda", dtype=torch.int32)
    with pytest.raises(ValueError, match="gather_idx"):
        launch.fp8_gather_swiglu_quantize(x_q, x_scales, gather_idx, w_q, w_scales, offs)


def test_fp8_gather_refuses_bad_inputs_with_a_clear_message():
    x_q, x_scales, w_q, w_scales, offs = _cpu_operands()
    with pytest.raises(TypeError, match="gather_idx must be torch.int32"):
        launch.fp8_gather_swiglu_quantize(x_q, x_scales, torch.zeros(8, dtype=torch.int64), w_q, w_scales, offs)
    with pytest.raises(ValueError, match="is on cpu"):
        launch.fp8_gather_swiglu_quantize(x_q, x_scales, torch.zeros(8, dtype=torch.int32), w_q, w_scales, offs)


# --- bad inputs, refused before any launch (on a CPU too) -----------------------------------------

def _cpu_operands(M=8, N=256, K=256, E=2):
    x_q = torch.zeros(M, K).to(E4M3)
    x_scales = torch.ones(K // 128, launch.fp8_scales_width(M))
    w_q = torch.zeros(E, N, K).to(E4M3)
    w_scales = torch.ones(E, N // 128, K // 128)
    offs = torch.tensor([M // 2, M], dtype=torch.int32)
    return x_q, x_scales, w_q, w_scales, offs


@pytest.mark.parametrize("change, error, message", [
    (lambda a: a.update(x_q=a["x_q"].float()), TypeError, "x_q must be torch.float8_e4m3fn"),
    (lambda a: a.update(w_q=a["w_q"].to(torch.float8_e5m2)), TypeError, "w_q must be torch.float8_e4m3fn"),
    (lambda a: a.update(x_scales=a["x_scales"].double()), TypeError, "x_scales must be torch.float32"),
    (lambda a: a.update(w_q=torch.zeros(2, 192, 256).to(E4M3)), ValueError, r"N % (128|256) == 0"),
    (lambda a: a.update(x_q=torch.zeros(8, 320).to(E4M3), w_q=torch.zeros(2, 128, 320).to(E4M3)),
     ValueError, "K % 128 == 0"),
    (lambda a: a.update(x_scales=torch.ones(2, 8)[:, :6]), ValueError, "x_scales must be"),
    (lambda a: a.update(x_scales=torch.ones(2, 8).T.contiguous()), ValueError, "transposed"),
    (lambda a: a.update(w_scales=torch.ones(2, 2, 1)), ValueError, r"w_scales must be \[E, N / 128, K / 128\]"),
    (lambda a: a.update(offs=torch.tensor([8], dtype=torch.int32)), ValueError, "one end row per expert"),
    (lambda a: None, ValueError, "is on cpu"),
])
@pytest.mark.parametrize("gemm", [launch.fp8_grouped_gemm, launch.fp8_swiglu_quantize])
def test_fp8_gemm_refuses_bad_inputs_with_a_clear_message(gemm, change, error, message):
    args = dict(zip(("x_q", "x_scales", "w_q", "w_scales", "offs"), _cpu_operands()))
    change(args)
    with pytest.raises(error, match=message):
        gemm(**args)


def test_fp8_swiglu_refuses_a_width_that_is_not_whole_groups_of_outputs():
    args = dict(zip(("x_q", "x_scales", "w_q", "w_scales", "offs"), _cpu_operands(N=384)))
    with pytest.raises(ValueError, match="N % 256 == 0"):
        launch.fp8_swiglu_quantize(**args)


@pytest.mark.parametrize("x, gather_idx, error, message", [
    (torch.zeros(4, 256), None, TypeError, "x must be torch.bfloat16"),
    (torch.zeros(4, 200, dtype=torch.bfloat16), None, ValueError, "is on cpu"),
    (torch.zeros(4, 256, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.int64), TypeError,
     "gather_idx must be torch.int32"),
])
def test_quantize_refuses_bad_inputs_with_a_clear_message(x, gather_idx, error, message):
    with pytest.raises(error, match=message):
        launch.quantize_1x128(x, gather_idx)


# --- the layer's forward with FP8 experts ---------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("gather", [False, True], ids=["07_3", "07_4"])
@pytest.mark.parametrize("T", [1, 77, 600])
def test_the_fp8_layer_forward_matches_its_maths_on_the_same_fp8_weights(T, gather):
    from moe_course import layer, moe, variants

    g = torch.Generator(device="cuda").manual_seed(T)
    w = moe.random_weights(256, 256, 8, dtype=torch.bfloat16, device="cuda", generator=g)
    x = torch.randn(T, 256, device="cuda", generator=g).bfloat16()
    fw = layer.prepare_fp8(layer.prepare(w))
    got = layer.forward_fp8(x, fw, 2, gather=gather)

    def fp8_experts(x_sorted, offsets, *_):  # the kernels' maths in float32, on fw's quantised weights
        ends = offsets[1:]
        h = fp8.grouped_block_scaled_matmul(*fp8.quantize_groups(x_sorted.float()), fw.gate_up, fw.gate_up_scales, ends)
        a = torch.nn.functional.silu(h[:, 0::2]) * h[:, 1::2]  # gate and up rows interleaved
        return fp8.grouped_block_scaled_matmul(*fp8.quantize_groups(a), fw.down, fw.down_scales, ends).to(x.dtype)

    # the same routing (chapter 01's, on the same bf16 router); the kernels' tensor cores keep
    # ~14 bits of each slice's sum, and a few activations round to the other e4m3 neighbour
    assert rel(got, moe.moe_forward(x, w, 2, expert_step=fp8_experts).y) < 1e-2
    # FP8 is several percent from float32 (a bf16 forward by mistake: ~2e-3)
    assert rel(got, variants.reference_forward(x, w, 2)) > 2e-2


# --- ISSUE_IN_TURN, an experiment: the consumers issue their multiplies in turn (kernels/NOTES.md) --

def _in_turn(step):
    return step.with_defines(ISSUE_IN_TURN=1)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(COUNT_CASES), ids=list(COUNT_CASES))
def test_the_consumers_in_turn_give_the_default_builds_bytes(case):
    """ISSUE_IN_TURN changes when the tensor cores run each consumer's batch, not what it sums: 07_2
    (both widths), 07_3 and 07_4 give their default builds' bytes, across tiles too
    (more-tiles-than-sms: two or more a block, so the turns carry from tile to tile) and with an
    empty half (rows past the expert's end: that consumer still takes its turns)."""
    counts, n, K = COUNT_CASES[case], 256, 640
    x, w, offs = _fp8_problem(counts, 2 * n, K, seed=len(counts) + 11)
    x_q, x_scales = launch.quantize_1x128(x)
    w_q, w_scales = fp8.quantize_blocks(w.float())
    M = x.shape[0]
    for step in (launch.FP8_GEMM, launch.FP8_GEMM_WIDE):
        poison(((M, 2 * n), torch.bfloat16))
        ordered = launch.fp8_grouped_gemm(x_q, x_scales, w_q, w_scales, offs, step=_in_turn(step))
        assert same_bytes(ordered, launch.fp8_grouped_gemm(x_q, x_scales, w_q, w_scales, offs, step=step)), step.name
    got = launch.fp8_swiglu_quantize(x_q, x_scales, w_q, w_scales, offs, step=_in_turn(launch.FP8_SWIGLU))
    want = launch.fp8_swiglu_quantize(x_q, x_scales, w_q, w_scales, offs)
    assert all(same_bytes(a, b) for a, b in zip(got, want)), "07_3"
    gather_idx = torch.randint(0, M, (M,), device="cuda", dtype=torch.int32)
    got = launch.fp8_gather_swiglu_quantize(x_q, x_scales, gather_idx, w_q, w_scales, offs,
                                            step=_in_turn(launch.FP8_GATHER))
    want = launch.fp8_gather_swiglu_quantize(x_q, x_scales, gather_idx, w_q, w_scales, offs)
    assert all(same_bytes(a, b) for a, b in zip(got, want)), "07_4"
