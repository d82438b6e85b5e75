"""Chapter 03's kernels that take an MoE layer's own inputs: the gather fused into the load
(03_3) and the SwiGLU epilogue (03_4), against float32 references at awkward sizes, with
outputs poisoned first so a skipped tile fails. Steps 03_1 and 03_2 are in launch.STEPS
and run through tests/test_grouped_gemm.py like every other step. The CPU tests check the host
side: refusals, the weight interleave, the routing order, the timeline summary, and that the
checks used here fail known-wrong answers."""

import math

import numpy as np
import pytest
import torch
from kernel_checks import COUNT_CASES

from moe_course import grouped_gemm as gg
from moe_course import launch
from moe_course import io_overlap as io
from moe_course.checking import CheckFailed, check_close


def routed_problem(counts, k, n, tokens, seed):
    """Random tokens x [tokens, k], weights w [E, n, k], and a gather index that repeats tokens
    (top-k routing reads each token several times) in a random order."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    counts = torch.tensor(counts)
    M = int(counts.sum())
    x = torch.randn(tokens, k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(len(counts), n, k, device="cuda", generator=g) / math.sqrt(k)).bfloat16()
    idx = torch.randint(0, tokens, (M,), device="cuda", generator=g, dtype=torch.int32)
    offs = torch.cumsum(counts, 0).to(device="cuda", dtype=torch.int32)
    return x, idx, w, offs


def poisoned(rows, cols):
    return torch.full((rows, cols), float("nan"), device="cuda", dtype=torch.bfloat16)


def assert_close_to(y, ref, label):
    check_close(label, y.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(COUNT_CASES))
@pytest.mark.parametrize("k,n", [(64, 256), (320, 512)])
def test_gather_matches_reference_and_the_pre_permuted_kernel(case, k, n):
    x, idx, w, offs = routed_problem(COUNT_CASES[case], k, n, tokens=997, seed=hash((case, k)) % 2**31)
    y = launch.gather_grouped_gemm(x, idx, w, offs, out=poisoned(idx.numel(), n))
    assert_close_to(y, io.gather_reference(x, idx, w, offs), f"gather {case} K={k} N={n}")
    # the same kernel body on a pre-permuted copy (X by TMA): the same sums in the same order
    y_perm = launch.grouped_gemm(x[idx.long()].contiguous(), w, offs, step=io.PLAIN)
    assert torch.equal(y, y_perm), "gathered and pre-permuted results differ"


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(COUNT_CASES))
def test_swiglu_epilogue_matches_reference(case):
    x, idx, w, offs = routed_problem(COUNT_CASES[case], 192, 512, tokens=611, seed=hash(case) % 2**31)
    a, h = launch.swiglu_grouped_gemm(x, idx, w, offs)
    ref_a, ref_h = io.swiglu_reference(x, idx, w, offs)
    assert a.shape == (idx.numel(), 256) and h.shape == (idx.numel(), 512)
    assert_close_to(h, ref_h, f"swiglu h {case}")
    assert_close_to(a, ref_a, f"swiglu a {case}")
    a_only, none = launch.swiglu_grouped_gemm(x, idx, w, offs, store_h=False)
    assert none is None and torch.equal(a_only, a)


@pytest.mark.gpu
def test_swiglu_layer_from_separate_gate_and_up_weights():
    """What chapter 06 does: interleave [gate; up] once, then one kernel gives silu(x Wg^T) * x Wu^T."""
    x, idx, w, offs = routed_problem([40, 0, 300, 17], 128, 512, tokens=200, seed=5)
    a, _ = launch.swiglu_grouped_gemm(x, idx, io.interleave_gate_up(w), offs)
    h = io.gather_reference(x, idx, w, offs)  # [gate | up] halves, not interleaved
    expected = torch.nn.functional.silu(h[:, :256]) * h[:, 256:]
    assert_close_to(a, expected, "swiglu from [gate; up]")


@pytest.mark.gpu
def test_bad_gather_indices_are_refused_or_read_as_zeros():
    x, idx, w, offs = routed_problem([10, 20], 64, 256, tokens=50, seed=1)
    bad = idx.clone()
    bad[3] = 50  # one past the last token
    with pytest.raises(ValueError, match="gather_idx must index rows of x"):
        launch.gather_grouped_gemm(x, bad, w, offs)
    y = launch.gather_grouped_gemm(x, bad, w, offs, validate=False)  # unchecked: a zero row, never a crash
    assert torch.all(y[3] == 0)
    assert_close_to(y[4:], io.gather_reference(x, idx, w, offs)[4:], "rows after the bad one")


@pytest.mark.gpu
def test_trace_timeline_is_ordered():
    p = gg.make_problem(gg.expert_counts(4000, 8, 2, seed=1), 1024, 512)
    for step in (launch.pipeline_step(1), launch.pipeline_step(4), launch.STEPS["03_2_warp_specialized"]):
        t = io.trace_timeline(step, p.x, p.w, p.offs, slices=64)
        landed, released = (np.array(t[key], dtype=float) for key in ("landed", "released"))  # None: nan
        ok = ~np.isnan(landed) & ~np.isnan(released)
        assert ok.sum() >= 16, step.name  # 16 slices per tile at K = 1024
        assert np.all(released[ok] >= landed[ok]), step.name
        assert io.timeline_summary(t)["busy_us"] > 0


# ----------------------------------------------------------------------------- CPU: the host side


def cpu_inputs(counts=(3, 5), k=64, n=256, tokens=6):
    x = torch.randn(tokens, k).bfloat16()
    w = torch.randn(len(counts), n, k).bfloat16()
    idx = torch.randint(0, tokens, (sum(counts),), dtype=torch.int32)
    offs = torch.cumsum(torch.tensor(counts), 0).int()
    return x, idx, w, offs


def test_gather_refuses_bad_inputs_with_a_clear_message():
    x, idx, w, offs = cpu_inputs()
    with pytest.raises(TypeError, match="gather_idx must be a 1-D torch.int32"):
        launch.gather_grouped_gemm(x, idx.long(), w, offs)
    with pytest.raises(TypeError, match="x must be torch.bfloat16"):
        launch.gather_grouped_gemm(x.float(), idx, w, offs)
    with pytest.raises(ValueError, match="N % 256 == 0"):
        launch.gather_grouped_gemm(x, idx, w[:, :128], offs)
    with pytest.raises(ValueError, match="x is on cpu"):
        launch.gather_grouped_gemm(x, idx, w, offs)
    with pytest.raises(ValueError, match="x is on cpu"):
        launch.swiglu_grouped_gemm(x, idx, w, offs)


def test_interleave_gate_up_puts_gate_and_up_rows_side_by_side():
    E, n, d = 2, 3, 4
    gate = torch.arange(E * n * d).reshape(E, n, d).float()
    up = -gate - 1
    w = io.interleave_gate_up(torch.cat([gate, up], dim=1))
    assert torch.equal(w[:, 0::2], gate) and torch.equal(w[:, 1::2], up)
    g2, u2 = io.deinterleave(w.transpose(1, 2))
    assert torch.equal(g2, gate.transpose(1, 2)) and torch.equal(u2, up.transpose(1, 2))
    with pytest.raises(ValueError, match="even number of rows"):
        io.interleave_gate_up(torch.zeros(1, 3, 4))


def test_routing_order_sorts_rows_by_expert_and_keeps_token_order():
    topk = torch.tensor([[2, 0], [0, 1], [2, 1]])  # token t chose these experts
    gather_idx, offs = io.routing_order(topk, num_experts=4)
    assert offs.tolist() == [2, 4, 6, 6]
    assert gather_idx.tolist() == [0, 1, 1, 2, 0, 2]  # expert 0: tokens 0, 1; 1: 1, 2; 2: 0, 2
    assert gather_idx.dtype == torch.int32


def test_gather_reference_is_the_reference_on_permuted_rows():
    x, idx, w, offs = cpu_inputs(counts=(2, 0, 3), k=16, n=8, tokens=4)
    ref = io.gather_reference(x, idx, w, offs)
    assert torch.equal(ref, gg.reference(x[idx.long()], w, offs))
    a, h = io.swiglu_reference(x, idx, w, offs)
    assert torch.allclose(a, torch.nn.functional.silu(h[:, 0::2]) * h[:, 1::2])


def test_the_checks_fail_known_wrong_answers():
    """What the GPU tests rely on: a forgotten tile, a swapped gate/up and a wrong row order fail."""
    x, idx, w, offs = cpu_inputs(counts=(130, 70), k=64, n=256, tokens=90)
    ref = io.gather_reference(x, idx, w, offs)
    skipped = ref.clone()
    skipped[128:130] = float("nan")
    with pytest.raises(CheckFailed):
        assert_close_to(skipped, ref, "skipped rows")
    unpermuted = gg.reference(x[torch.arange(idx.numel()) % x.shape[0]], w, offs)  # rows in token order
    with pytest.raises(CheckFailed):
        assert_close_to(unpermuted, ref, "rows not gathered")
    a, h = io.swiglu_reference(x, idx, w, offs)
    swapped = torch.nn.functional.silu(h[:, 1::2]) * h[:, 0::2]
    with pytest.raises(CheckFailed):
        assert_close_to(swapped, a, "gate and up swapped")


def test_timeline_summary_counts_the_waits():
    trace = {"landed": [0.0, 2.0, 5.0, float("nan")], "released": [1.0, 3.0, 6.0, float("nan")]}
    s = io.timeline_summary(trace)
    assert s["slices"] == 3 and s["busy_us"] == pytest.approx(3.0)
    assert s["wait_us"] == pytest.approx(1.0 + 2.0) and s["wait_share"] == pytest.approx(3.0 / 6.0)
    trace["stored"] = [4.0, float("nan")]  # a tile was stored between slices 1 and 2
    s = io.timeline_summary(trace)
    assert s["store_us"] == pytest.approx(1.0) and s["wait_us"] == pytest.approx(2.0)
    assert io.timeline_gaps(trace) == [(1.0, 1.0, 2.0), (3.0, 4.0, 5.0)]


def test_gather_bytes_saved():
    assert io.gather_bytes_saved(tokens=10, top_k=2, d=4) == 2 * 2 * 10 * 2 * 4


def test_group_m_for_follows_the_experts_and_the_l2():
    assert launch.group_m_for(M=131072, E=128, K=2048, block_m=128) == 8  # Qwen3: 1024 rows an expert = 8 tiles
    assert launch.group_m_for(M=65536, E=256, K=7168, block_m=128) == 4  # DeepSeek-V3: 2 tiles an expert, at least 4
    assert launch.group_m_for(M=16384, E=8, K=4096, block_m=128) == 16  # Mixtral: 16 tiles, 16 MB of X
    assert launch.group_m_for(M=16384, E=8, K=14336, block_m=128) == 4  # long K: fewer rows per group
    assert launch.group_m_for(M=10, E=1000, K=64, block_m=128) == 4
    assert launch.group_m_for(M=10 ** 6, E=8, K=65536, block_m=128) == 1  # 16 MB of X in one tile of rows already
