"""Tile-aware token rounding (moe_course/token_rounding.py): the paper's properties, checked by
hypothesis on random routings with many ties; the layout a grouped GEMM reads; the comparison
routings (plain top-K, padding); clear errors; and, on a GPU, the CUDA kernels of
kernels/04_1_token_rounding.cu against the torch version, field by field, bit for bit."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from moe_course import grouped_gemm as gg
from moe_course import kernels, launch, moe
from moe_course import token_rounding as tr

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw, max_tokens: int = 40, max_experts: int = 10):
    """(scores (T, E), k, tile): scores on a few levels, so equal scores are everywhere."""
    num_tokens = draw(st.integers(1, max_tokens))
    num_experts = draw(st.integers(1, max_experts))
    k = draw(st.integers(1, min(num_experts, 4)))
    tile = draw(st.integers(1, 12))
    levels = draw(st.sampled_from([1, 3, 8, 1000]))
    values = draw(hnp.arrays(np.int64, (num_tokens, num_experts), elements=st.integers(0, levels)))
    return torch.tensor(values, dtype=torch.float32) / levels, k, tile


@st.composite
def large_problems(draw):
    """(scores (T, E), k, tile) of up to 3000 tokens and 200 experts, from a drawn seed (drawing
    every value would exceed what hypothesis draws per example): several 512-token chunks and
    several experts per lane in the kernels."""
    num_tokens, num_experts = draw(st.integers(1, 3000)), draw(st.integers(1, 200))
    k, tile = draw(st.integers(1, min(num_experts, 8))), draw(st.sampled_from([1, 3, 16, 64, 128]))
    levels, seed = draw(st.sampled_from([2, 16, 2**20])), draw(st.integers(0, 2**31 - 1))
    values = torch.randint(0, levels + 1, (num_tokens, num_experts), generator=torch.Generator().manual_seed(seed))
    return values.float() / levels, k, tile


def ranked_before(scores, a: int, b: int, e: int) -> bool:
    """Within one group of expert e's candidates: higher score first, then the lower token id."""
    return bool(scores[a, e] > scores[b, e]) or (bool(scores[a, e] == scores[b, e]) and a < b)


def check_layout(r: tr.Routing, scores, k: int) -> None:
    """What every routing must be, whatever the method: the metadata a grouped GEMM reads."""
    T, E = scores.shape
    assert r.topk.shape == (T, k) and r.counts.shape == (E,) and r.offsets.shape == (E + 1,)
    assert r.offsets[0] == 0 and torch.equal(r.offsets[1:], r.counts.cumsum(0))
    assert r.num_rows == int(r.counts.sum())
    assert torch.equal(r.expert_ids, torch.arange(E).repeat_interleave(r.counts))  # grouped by expert
    assert torch.equal(r.topk_counts, torch.bincount(r.topk.flatten(), minlength=E))
    real = r.token_ids >= 0
    t, e = r.token_ids[real], r.expert_ids[real]
    pairs = t * E + e
    assert pairs.unique().numel() == pairs.numel(), "a (token, expert) pair is selected twice"
    for x in range(E):  # each expert's real rows in ascending token order
        rows = r.token_ids[r.offsets[x]:r.offsets[x + 1]]
        rows = rows[rows >= 0]
        assert bool((rows[1:] > rows[:-1]).all())
    assert torch.equal(r.weights[real], scores[t, e])
    assert torch.equal(r.from_topk[real], tr.topk_mask(r.topk, E)[t, e])
    assert r.num_rows <= tr.max_rows(T, E, k, r.tile, r.method), "more rows than the GPU buffers hold"


@FAST
@given(problems(), st.sampled_from(tr.MODES))
def test_rounded_counts_are_tile_multiples_and_within_a_tile(problem, mode):
    scores, k, tile = problem
    T = scores.shape[0]
    r = tr.token_rounding(scores, k, tile, mode)
    check_layout(r, scores, k)
    for f, c in zip(r.topk_counts.tolist(), r.counts.tolist()):
        unclamped = {"up": -(-f // tile), "down": f // tile, "nearest": (2 * f + tile) // (2 * tile)}[mode] * tile
        # a tile multiple, unless the expert has fewer candidates (T) than that multiple
        assert c % tile == 0 or (c == T and unclamped > T), (f, c, tile, T)
        assert abs(c - f) < tile, "an expert moved by a whole tile or more"
        if mode == "up":
            assert c >= f
        elif mode == "down":
            assert c <= f
        else:
            assert 2 * abs(c - f) <= tile and (2 * abs(c - f) < tile or c > f), "not the nearest (a half goes up)"


@FAST
@given(problems(), st.sampled_from(tr.MODES))
def test_top_k_tokens_first_and_lowest_scores_dropped_first(problem, mode):
    scores, k, tile = problem
    T, E = scores.shape
    r = tr.token_rounding(scores, k, tile, mode)
    picked = tr.topk_mask(r.topk, E)
    for e in range(E):
        kept = set(r.token_ids[r.offsets[e]:r.offsets[e + 1]].tolist())
        top = [t for t in range(T) if picked[t, e]]
        others = [t for t in range(T) if not picked[t, e]]
        if r.counts[e] <= r.topk_counts[e]:
            assert kept <= set(top), f"expert {e} keeps a non-top-K token while dropping top-K ones"
        else:
            assert set(top) <= kept, f"expert {e} adds tokens but leaves out some of its top-K tokens"
        for group in (top, others):  # in each group, what is kept ranks before what is left out
            for a in (t for t in group if t in kept):
                for b in (t for t in group if t not in kept):
                    assert ranked_before(scores, a, b, e), f"expert {e}: token {a} kept over {b}"


@FAST
@given(problems())
def test_top_k_routing_is_chapter_01s_dispatch(problem):
    scores, k, tile = problem
    E = scores.shape[1]
    r = tr.topk_routing(scores, k, tile)
    check_layout(r, scores, k)
    d = moe.dispatch(r.topk, E)
    assert torch.equal(r.token_ids, d.token_of) and torch.equal(r.counts, d.counts)
    assert bool(r.from_topk.all())
    assert tr.stats(r)["changed"] == 0


@FAST
@given(problems())
def test_padding_keeps_the_routing_and_pads_with_empty_rows(problem):
    scores, k, tile = problem
    plain, padded = tr.topk_routing(scores, k, tile), tr.padded_routing(scores, k, tile)
    check_layout(padded, scores, k)
    assert bool((padded.counts % tile == 0).all()) and bool((padded.counts - plain.counts).lt(tile).all())
    real = padded.token_ids >= 0
    assert torch.equal(padded.token_ids[real], plain.token_ids)
    assert bool((padded.weights[~real] == 0).all()) and not bool(padded.from_topk[~real].any())
    for e in range(scores.shape[1]):  # the empty rows come after the expert's real rows
        rows = padded.token_ids[padded.offsets[e]:padded.offsets[e + 1]]
        assert bool((rows[: plain.counts[e]] >= 0).all()) and bool((rows[plain.counts[e]:] < 0).all())
    s_plain, s_pad = tr.stats(plain), tr.stats(padded)
    assert s_pad["tiles"] == s_plain["tiles"] and s_pad["wasted_rows"] == s_plain["wasted_rows"]


@FAST
@given(problems(), st.sampled_from(tr.MODES))
def test_stats_add_up(problem, mode):
    scores, k, tile = problem
    r = tr.token_rounding(scores, k, tile, mode)
    s = tr.stats(r)
    assert s["rows"] == r.num_rows == scores.shape[0] * k - s["dropped"] + s["added"]
    assert s["tiles"] * tile - s["rows"] == s["wasted_rows"]
    if bool(((r.counts % tile) == 0).all()):
        assert s["wasted_rows"] == 0  # whole tiles: nothing computed for nothing
    assert (s["added"] == 0 or mode != "down") and (s["dropped"] == 0 or mode != "up")


@FAST
@given(problems(), st.sampled_from(tr.ROUTINGS))
def test_tile_map_lists_every_tile_of_every_expert(problem, method):
    scores, k, tile = problem
    r = tr.route(scores, k, tile, method)
    want = [(e, int(r.offsets[e]) + j * tile) for e in range(r.num_experts)
            for j in range(-(-int(r.counts[e]) // tile))]
    assert tr.tile_map(r.counts, tile).tolist() == [list(x) for x in want]


def test_top_k_ties_go_to_the_lower_expert():
    scores = torch.tensor([[0.5, 0.5, 0.5], [0.1, 0.9, 0.9], [-0.0, 0.0, -1.0]])
    assert tr.topk_experts(scores, 2).tolist() == [[0, 1], [1, 2], [0, 1]]


def test_a_small_example_by_hand():
    # 6 tokens, 2 experts, k = 1, tile 4. Expert 0 gets tokens 0, 1, 2, 4 (f = 4: on a multiple);
    # expert 1 gets 3 and 5 (f = 2: exactly half a tile, so it rounds up to 4 and takes the two
    # best of the other tokens: 2 (0.4) and then 0 or 1 (0.3 each: the lower id, 0).
    scores = torch.tensor([[0.7, 0.3], [0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.9, 0.1], [0.1, 0.9]])
    r = tr.token_rounding(scores, 1, tile=4)
    assert r.topk_counts.tolist() == [4, 2] and r.counts.tolist() == [4, 4]
    assert r.token_ids.tolist() == [0, 1, 2, 4, 0, 2, 3, 5]
    assert r.from_topk.tolist() == [True] * 4 + [False, False, True, True]
    down = tr.token_rounding(scores, 1, tile=4, mode="down")
    assert down.token_ids.tolist() == [0, 1, 2, 4]  # expert 1 rounds down to nothing
    up = tr.token_rounding(scores, 1, tile=3, mode="up")  # 4 -> 6: every token; 2 -> 3: + token 2
    assert up.token_ids.tolist() == [0, 1, 2, 3, 4, 5, 2, 3, 5]


@pytest.mark.parametrize("f, tile, mode, want", [
    (0, 128, "nearest", 0), (63, 128, "nearest", 0), (64, 128, "nearest", 128), (192, 128, "nearest", 256),
    (128, 128, "nearest", 128), (129, 128, "up", 256), (255, 128, "down", 128), (256, 128, "up", 256),
    (1, 3, "nearest", 0), (2, 3, "nearest", 3), (5, 1, "down", 5)])
def test_round_counts_examples(f, tile, mode, want):
    assert tr.round_counts(torch.tensor([f]), tile, mode).tolist() == [want]


def test_rounded_counts_are_capped_at_the_number_of_tokens():
    assert tr.round_counts(torch.tensor([90, 10]), 64, "up", num_tokens=100).tolist() == [100, 64]


def test_rounding_with_tile_one_is_top_k():
    scores = tr.synthetic_scores(100, 8, skew=0.5)
    assert torch.equal(tr.token_rounding(scores, 2, tile=1).token_ids, tr.topk_routing(scores, 2).token_ids)


def test_weights_carry_the_routers_gradient():
    logits = torch.randn(50, 6, requires_grad=True)
    r = tr.token_rounding(logits.softmax(-1), 2, tile=8)
    r.weights.sum().backward()
    assert logits.grad is not None and bool(logits.grad.abs().sum() > 0)


def test_layer_output_matches_chapter_01_for_top_k_and_padding():
    g = torch.Generator().manual_seed(0)
    w = moe.random_weights(16, 24, 6, generator=g)
    x = torch.randn(40, 16, generator=g)
    probs = moe.router_probs(x @ w.w_router)
    want = moe.moe_forward(x, w, 2, router="softmax_topk").y  # weights: the probabilities, as here
    torch.testing.assert_close(tr.moe_forward(x, w, tr.topk_routing(probs, 2, 8)), want)
    torch.testing.assert_close(tr.moe_forward(x, w, tr.padded_routing(probs, 2, 8)), want)
    rounded = tr.moe_forward(x, w, tr.token_rounding(probs, 2, 8))
    assert rounded.shape == want.shape and not torch.allclose(rounded, want)  # the routing changed


def test_scores_with_counts_gives_those_counts():
    for ties in (False, True):
        s = tr.scores_with_counts([0, 16, 5, 40, 19], 40, 2, seed=3, ties=ties)
        assert tr.topk_routing(s, 2).topk_counts.tolist() == [0, 16, 5, 40, 19]
    with pytest.raises(ValueError, match="add up to T\\*k = 80"):
        tr.scores_with_counts([1, 2], 40, 2)


@pytest.mark.parametrize("call, message", [
    (lambda: tr.token_rounding([[0.5]], 1), "scores must be a torch.Tensor"),
    (lambda: tr.token_rounding(torch.rand(5), 1), r"shape \(T, E\)"),
    (lambda: tr.token_rounding(torch.ones(4, 3, dtype=torch.long), 1), "floating point"),
    (lambda: tr.token_rounding(torch.rand(3, 0), 1), "at least one expert"),
    (lambda: tr.token_rounding(torch.tensor([[0.1, float("nan")]]), 1), "NaN .* token 0, expert 1"),
    (lambda: tr.token_rounding(torch.rand(4, 3), 0), "between 1 and 3"),
    (lambda: tr.token_rounding(torch.rand(4, 3), 4), "between 1 and 3"),
    (lambda: tr.token_rounding(torch.rand(4, 3), 1.0), "k .* must be an int"),
    (lambda: tr.token_rounding(torch.rand(4, 3), 1, tile=0), "tile must be >= 1"),
    (lambda: tr.token_rounding(torch.rand(4, 3), 1, mode="sideways"), "mode must be one of nearest, up, down"),
    (lambda: tr.route(torch.rand(4, 3), 1, method="random"), "method must be one of top-K, padded"),
    (lambda: tr.round_counts(torch.tensor([1.5]), 4), "1-D integer tensor"),
    (lambda: tr.round_counts(torch.tensor([-1]), 4), "counts must be >= 0"),
])
def test_bad_input_is_refused_by_name(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_the_gpu_version_refuses_what_it_cannot_take():
    with pytest.raises(ValueError, match="are on cpu"):
        tr.route_cuda(torch.rand(4, 3), 1)
    with pytest.raises(ValueError, match="must be float32"):
        tr.route_cuda(torch.rand(4, 3, dtype=torch.float64), 1)
    with pytest.raises(ValueError, match="at most 1024 experts"):
        tr.route_cuda(torch.rand(2, 1025).to("meta"), 1)


def test_max_rows_bounds_the_awkward_cases():
    for name, (scores, k, tile) in tr.awkward_cases().items():
        for method in tr.ROUTINGS:
            r = tr.route(scores, k, tile, method)
            assert r.num_rows <= tr.max_rows(*scores.shape, k, tile, method), (name, method)


@pytest.mark.nvrtc
def test_kernel_source_compiles_with_every_kernel():
    report = kernels.compile_report(tr.KERNEL_SOURCE)
    assert {"route_topk", "round_counts", "build_tile_map", "select_tokens"} <= set(report.resources)


# --------------------------------------------------------------------------------------------- GPU

CASES = tr.awkward_cases()


@pytest.mark.gpu
@pytest.mark.parametrize("method", tr.ROUTINGS)
@pytest.mark.parametrize("case", list(CASES))
def test_kernels_match_torch(case, method):
    scores, k, tile = CASES[case]
    tr.check_kernel(scores.cuda(), k, tile, method, label=case)


@pytest.mark.gpu
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(problems(), large_problems()), st.sampled_from(tr.ROUTINGS))
def test_kernels_match_torch_on_random_routings(problem, method):
    scores, k, tile = problem
    tr.check_kernel(scores.cuda(), k, tile, method)


@pytest.mark.gpu
def test_kernels_need_no_host_synchronisation():
    scores = tr.synthetic_scores(4096, 64, seed=1, device="cuda")
    tr.route_cuda(scores, 4, 128, "nearest")  # compile and warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host wait now raises
    try:
        tr.route_cuda(scores, 4, 128, "nearest", validate=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_rounded_routing_runs_on_the_grouped_gemm():
    scores = tr.synthetic_scores(2048, 16, skew=0.5, seed=2, device="cuda")
    dev = tr.route_cuda(scores, 2, 128, "nearest")
    r = dev.to_routing()
    x = torch.randn(r.num_rows, 128, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(16, 256, 128, device="cuda", dtype=torch.bfloat16) / 128**0.5
    y = launch.grouped_gemm(x, w, r.ends())
    torch.testing.assert_close(y.float(), gg.reference(x, w, r.ends()), rtol=2e-2, atol=2e-2)
