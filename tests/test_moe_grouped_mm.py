"""moe.experts_forward_grouped_mm, the expert step as three torch._grouped_mm calls, against
chapter 01's loop over experts: alone, inside the whole layer, and on bad input. On a CPU this
needs torch's CPU fallback of torch._grouped_mm (torch 2.13 has one); without it the tests are
skipped with the reason."""

import pytest
import torch

from moe_course import moe, variants
from moe_course.checking import check_close

CPU_REASON = variants.grouped_mm_unavailable("cpu")
needs_grouped_mm_on_cpu = pytest.mark.skipif(CPU_REASON is not None, reason=f"skipped: {CPU_REASON}")

COUNTS = {"ragged-with-empty-experts": [5, 0, 17, 1, 0, 9], "one-expert-has-all": [0, 0, 32, 0],
          "single-expert": [3]}


def _problem(counts, d, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = moe.random_weights(d, n, len(counts), dtype=dtype, generator=g)
    offsets = torch.zeros(len(counts) + 1, dtype=torch.long)
    offsets[1:] = torch.tensor(counts).cumsum(0)
    x = torch.randn(sum(counts), d, generator=g).to(dtype)
    return x, offsets, w


@needs_grouped_mm_on_cpu
@pytest.mark.parametrize("counts", list(COUNTS.values()), ids=list(COUNTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_expert_step_equals_the_loop(counts, dtype):
    x, offsets, w = _problem(counts, d=16, n=24, dtype=dtype)
    got = moe.experts_forward_grouped_mm(x, offsets, w.w_gate, w.w_up, w.w_down)
    want = moe.experts_forward(x, offsets, w.w_gate, w.w_up, w.w_down)
    assert got.dtype == dtype and got.shape == want.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: each GEMM output rounded, maybe in another order
    check_close(f"grouped_mm expert step {dtype}", got.float(), want.float(), rtol=tol, atol=tol)


@needs_grouped_mm_on_cpu
def test_no_rows_at_all():
    x, offsets, w = _problem([0, 0, 0], d=8, n=8, dtype=torch.float32)
    assert moe.experts_forward_grouped_mm(x, offsets, w.w_gate, w.w_up, w.w_down).shape == (0, 8)


@needs_grouped_mm_on_cpu
@pytest.mark.parametrize("router,capacity_factor", [("topk_softmax", None), ("softmax_topk", None),
                                                    ("topk_softmax", 0.8), ("expert_choice", 1.0)])
def test_the_layer_with_grouped_mm_equals_the_layer_with_the_loop(router, capacity_factor):
    g = torch.Generator().manual_seed(3)
    w = moe.random_weights(32, 16, 8, generator=g)
    x = torch.randn(100, 32, generator=g)
    want = moe.moe_forward(x, w, 2, router=router, capacity_factor=capacity_factor)
    got = moe.moe_forward(x, w, 2, router=router, capacity_factor=capacity_factor, expert_step="grouped_mm")
    check_close(f"layer, {router}, capacity {capacity_factor}", got.y, want.y, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.counts, want.counts)


def test_an_expert_step_can_be_any_function():
    g = torch.Generator().manual_seed(4)
    w = moe.random_weights(8, 8, 4, generator=g)
    x = torch.randn(10, 8, generator=g)
    seen = []

    def spy(*args):
        seen.append(args[0].shape)
        return moe.experts_forward(*args)

    got = moe.moe_forward(x, w, 2, expert_step=spy)
    assert seen == [(20, 8)]
    check_close("layer through a spy", got.y, moe.moe_forward(x, w, 2).y)


def test_bad_input_is_refused_with_a_clear_message():
    w = moe.random_weights(8, 8, 4)
    with pytest.raises(ValueError, match=r"unknown expert step 'fast'; choose one of \['grouped_mm', 'loop'\]"):
        moe.moe_forward(torch.randn(4, 8), w, 2, expert_step="fast")
    x, offsets, w6 = _problem([2, 2], d=6, n=8, dtype=torch.float32)
    with pytest.raises(ValueError, match="multiple of 16 bytes: d and n multiples of 4 in float32; got d=6, n=8"):
        moe.experts_forward_grouped_mm(x, offsets, w6.w_gate, w6.w_up, w6.w_down)
    x, offsets, w8 = _problem([2, 2], d=8, n=8, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"offsets must have shape \(E\+1,\) = \(3,\)"):
        moe.experts_forward_grouped_mm(x, offsets[1:], w8.w_gate, w8.w_up, w8.w_down)
    with pytest.raises(ValueError, match=r"offsets must be the E\+1 boundaries .* the last == the row count 4; got \[0, 1, 3\]"):
        moe.experts_forward_grouped_mm(x, torch.tensor([0, 1, 3]), w8.w_gate, w8.w_up, w8.w_down)


@pytest.mark.gpu
def test_on_the_gpu_in_bf16():
    if (why := variants.grouped_mm_unavailable("cuda")) is not None:
        pytest.skip(why)
    g = torch.Generator(device="cuda").manual_seed(5)
    T, d, n, E, K = 2048, 1536, 256, 128, 8  # the SonicMoE 7B layer, fewer tokens
    w = moe.random_weights(d, n, E, dtype=torch.bfloat16, device="cuda", generator=g)
    x = torch.randn(T, d, device="cuda", generator=g).to(torch.bfloat16)
    want = variants.reference_forward(x, w, K)
    for step in ("loop", "grouped_mm"):
        got = moe.moe_forward(x, w, K, expert_step=step).y
        err = float((got.float() - want).norm() / want.norm())
        assert err < variants.LAYER_MAX_REL_ERR, (step, err)
