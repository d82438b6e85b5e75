"""moe_course.decode, chapter 09's decode maths and its masked layer: the active-expert formula
against random routings, bytes and FLOPs counted by hand, the bound against the recorded H200
ceilings, the masked layout of a worked example, the layer against chapter 01's at the awkward
steps (1, 2, 7, 64, 511 tokens, idle experts, every token on one expert, a capacity that
overflows), no host read (named calls, the meta device; on a GPU: sync debug mode and a CUDA
graph replayed against an eager run), and a layer that forgets the capacity mask caught."""

import math

import pytest
import torch

from moe_course import ceilings, configs, decode, launch, moe
from moe_course.checking import CheckFailed, relative_error

CASE_IDS = [c.name for c in decode.CHECK_CASES]


# --- active experts ------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens, E, K", [(1, 16, 2), (3, 8, 2), (7, 8, 2), (64, 256, 8), (512, 128, 8)])
def test_expected_active_experts_matches_random_routings(tokens, E, K):
    g = torch.Generator().manual_seed(tokens * E + K)
    counted = decode.simulated_active_experts(tokens, E, K, trials=400, generator=g).double()
    expected = decode.expected_active_experts(tokens, E, K)
    spread = counted.std().item() / math.sqrt(counted.numel())  # the mean's standard error
    assert abs(counted.mean().item() - expected) <= 4 * spread + 0.01, (counted.mean().item(), expected)
    assert K <= counted.min() <= counted.max() <= E


def test_the_formula_at_its_ends():
    assert decode.expected_active_experts(0, 8, 2) == 0
    assert decode.expected_active_experts(1, 256, 8) == pytest.approx(8)  # one token wakes its K experts
    assert decode.expected_active_experts(512, 8, 2) == pytest.approx(8)  # many tokens wake them all
    assert decode.expected_active_experts(5, 4, 4) == 4  # K = E: every expert, always
    assert decode.rows_per_active_expert(64, 8, 2) == pytest.approx(64 * 2 / decode.expected_active_experts(64, 8, 2))


def test_active_experts_counts_a_routing_on_the_device():
    experts = torch.tensor([[0, 3], [3, 5], [0, 5]])
    assert int(decode.active_experts(experts, 8)) == 3
    batch = torch.stack([experts, torch.tensor([[1, 2], [1, 2], [1, 2]])])
    assert decode.active_experts(batch, 8).tolist() == [3, 2]


# --- bytes, FLOPs, the bound -----------------------------------------------------------------------

def test_bytes_and_flops_by_hand():
    shape = configs.MoEShape(T=99, d=4, n=3, E=5, K=2)  # its own T is not used
    up = decode.decode_step(shape, 3, "up", active=4)
    # rows in 6 x 4, weights 4 experts x 4 x 6, rows out 6 x 6, two bytes each; 2 * 6 * 4 * 6 FLOPs
    assert up.traffic == {"rows in (T*K x d)": 48, "active experts' W_gate, W_up (d x 2n each)": 192,
                          "rows out (T*K x 2n)": 72}
    assert (up.bytes, up.flops) == (312, 288)
    down = decode.decode_step(shape, 3, "down", active=4)
    assert (down.bytes, down.flops) == (36 + 96 + 48, 2 * 6 * 3 * 4)
    layer = decode.decode_step(shape, 3, "layer", active=4)
    # x 3 x 4, router 4 x 5, weights 4 experts x 3 x 4 x 3, y 3 x 4; router FLOPs 2 * 3 * 4 * 5
    assert (layer.bytes, layer.flops) == (24 + 40 + 288 + 24, 120 + 288 + 144)
    assert layer.intensity == pytest.approx(552 / 376)
    fp8 = decode.decode_step(shape, 3, "layer", active=4, weight_bytes=1)
    assert fp8.bytes == 24 + 40 + 144 + 24  # FP8 weights: half the weight bytes
    assert decode.decode_step(shape, 3, "up").active == pytest.approx(decode.expected_active_experts(3, 5, 2))


def test_the_bound_is_the_slower_of_bytes_and_flops():
    shape = configs.MoEShape(T=1, d=4, n=3, E=5, K=2)
    step = decode.decode_step(shape, 3, "up", active=4)  # 312 bytes, 288 FLOPs
    memory_bound = ceilings.Ceilings(matmul_tflops=1e-9, copy_tbps=1e-12)  # 1 kFLOP/s, 1 byte/s
    assert step.bound_ms(memory_bound) == pytest.approx(312e3) and step.limit(memory_bound) == "memory"
    compute_bound = ceilings.Ceilings(matmul_tflops=1e-12, copy_tbps=1e-9)
    assert step.bound_ms(compute_bound) == pytest.approx(288e3) and step.limit(compute_bound) == "compute"
    assert step.attainable_tflops(memory_bound) == pytest.approx(288 / 312e0 * 1e-12)
    assert step.tbps(1.0) == pytest.approx(312 / 1e-3 / 1e12)


def test_every_decode_step_is_memory_bound_on_the_recorded_h200():
    roof = ceilings.recorded(gpu="NVIDIA H200")
    assert roof is not None and roof.ridge_intensity == pytest.approx(796.4 / 4.264, rel=1e-3)
    for cfg in configs.CHAPTER02:
        for tokens in decode.DECODE_TOKENS:
            for part in decode.PARTS:
                step = decode.decode_step(cfg, tokens, part)
                assert step.limit(roof) == "memory", (cfg.name, tokens, part)
                assert step.bound_ms(roof) == pytest.approx(step.bytes / (roof.copy_tbps * 1e9))
                # in bf16 an expert's intensity is about its rows
                if part == "up":
                    assert step.intensity == pytest.approx(decode.rows_per_active_expert(tokens, cfg.E, cfg.K), rel=0.1)


# --- the masked layout -------------------------------------------------------------------------------

def test_the_layout_of_a_worked_example():
    experts = torch.tensor([[2, 0], [0, 1], [2, 3], [0, 2]])  # 4 tokens, top-2, E = 4
    layout = decode.masked_layout(experts, 4)
    # queues in GShard's order, every first choice before any second: expert 0 serves tokens 1 and 3
    # (their first choices), then token 0 (its second)
    assert layout.capacity == 4 and layout.counts.tolist() == [3, 1, 3, 1]
    assert layout.slot_token.tolist() == [[1, 3, 0, 0], [1, 0, 0, 0], [0, 2, 3, 0], [2, 0, 0, 0]]
    assert layout.valid.tolist() == [[True, True, True, False], [True, False, False, False],
                                     [True, True, True, False], [True, False, False, False]]
    assert layout.pair_slot.tolist() == [[8, 2], [0, 4], [9, 12], [1, 10]]  # expert e, place p: slot 4e + p
    assert int(layout.dropped) == 0


def test_a_capacity_of_t_never_overflows():
    case = decode.Case("all on one", 33, 8, 4, 6, 3, "one expert")
    x, w = decode.case_inputs(case)
    layout = decode.masked_moe_forward(x, w, case.K).layout
    assert layout.capacity == 33 and int(layout.counts[decode.HOT_EXPERT]) == 33  # full, not over
    assert int(layout.dropped) == 0
    decode.check_no_overflow(layout)  # passes


def test_an_overflow_is_counted_on_the_device_and_refused_outside():
    case = decode.Case("overflow", 64, 8, 4, 8, 2, "one expert", capacity=16)
    x, w = decode.case_inputs(case)
    layout = decode.masked_moe_forward(x, w, case.K, capacity=16).layout
    over = (layout.counts - 16).clamp(min=0)
    assert int(over[decode.HOT_EXPERT]) == 48 and isinstance(layout.dropped, torch.Tensor)
    assert int(layout.dropped) == int(over.sum())  # the hot expert's 48, and second choices past 16
    assert int((layout.pair_slot == 8 * 16).sum()) == int(over.sum())  # each dropped pair: the spare slot
    with pytest.raises(ValueError, match=r"capacity 16 is too small.*expert 1 got 64 tokens.*pairs were dropped"):
        decode.check_no_overflow(layout)


def test_empty_slots_compute_zeros():
    x, w = decode.case_inputs(decode.CHECK_CASES[0])
    out = decode.masked_moe_forward(x, w, 2)
    y_slots = decode.masked_experts(x, out.layout, w.w_gate, w.w_up, w.w_down)
    assert y_slots[~out.layout.valid].abs().max() == 0 and y_slots[out.layout.valid].abs().min() > 0


# --- the layer against chapter 01's -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", decode.CHECK_CASES, ids=CASE_IDS)
def test_the_masked_layer_matches_chapter_01(case, dtype):
    assert decode.check_against_chapter01(case, dtype=dtype) <= decode.TOLERANCE[dtype]


def test_the_one_expert_cases_route_as_they_say():
    for case in decode.CHECK_CASES:
        if case.routing == "one expert":
            x, w = decode.case_inputs(case)
            experts = decode.masked_moe_forward(x, w, case.K).experts
            assert (experts[:, 0] == decode.HOT_EXPERT).all(), case.name


def test_a_layer_that_forgets_the_capacity_mask_is_caught(monkeypatch):
    """The check can fail: without the mask, a pair past its expert's C slots takes a slot of the
    next expert, silently."""
    def unmasked(experts, position, capacity, num_experts):
        return experts * capacity + position, torch.ones_like(position, dtype=torch.bool)

    overflowing = next(c for c in decode.CHECK_CASES if c.capacity is not None and c.capacity < c.tokens)
    decode.check_against_chapter01(overflowing)
    monkeypatch.setattr(decode, "slots_of_pairs", unmasked)
    with pytest.raises(CheckFailed, match="values differ"):
        decode.check_against_chapter01(overflowing)


# --- no host synchronisation --------------------------------------------------------------------------

def test_the_layer_reads_nothing_back_and_runs_without_values():
    case = decode.CHECK_CASES[3]
    x, w = decode.case_inputs(case, dtype=torch.float32)
    with decode.host_reads() as found:
        decode.masked_moe_forward(x, w, case.K)
    assert found == []
    assert decode.runs_on_meta(decode.masked_moe_forward, x, w, case.K) is None
    meta = decode.masked_moe_forward(*(decode._to_meta(a) for a in (x, w)), case.K)
    assert meta.y.shape == x.shape and meta.y.device.type == "meta"


UNCAPPED = [c for c in decode.CHECK_CASES if c.capacity is None]


@pytest.mark.parametrize("case", UNCAPPED, ids=[c.name for c in UNCAPPED])
def test_the_grouped_mm_layer_matches_chapter_01_and_reads_nothing_back(case):
    """The torch._grouped_mm layer chapter 09 times 09_1's layer against: right, and as free of
    host reads as the course's (else a CUDA graph could not hold it, and the race would be unfair)."""
    x, w = decode.case_inputs(case, dtype=torch.float32)
    with decode.host_reads() as found:
        got = decode.grouped_mm_forward(x, decode.prepare(w, torch.float32), case.K)
    assert found == []
    assert relative_error(got, decode.reference_forward(x, w, case.K)) < 1e-5


def test_the_detectors_catch_chapter_01s_layer():
    """They can fail: chapter 01's layer reads its counts back (bincount, tolist) and checks values."""
    case = decode.CHECK_CASES[3]
    x, w = decode.case_inputs(case, dtype=torch.float32)
    with decode.host_reads() as found:
        moe.moe_forward(x, w, case.K)
    assert {"torch.bincount", "Tensor.tolist", "bool(tensor)"} <= set(found)
    assert "item" in decode.runs_on_meta(moe.moe_forward, x, w, case.K)
    with decode.host_reads() as found:
        torch.arange(5)[torch.arange(5) > 2]
    assert found == ["a boolean mask as an index"]


def test_host_reads_names_each_kind_of_wait():
    t = torch.arange(6)
    with decode.host_reads() as found:
        t.sum().item(), t.tolist(), t.numpy(), bool(t.any()), int(t[0]), float(t[1]), [0, 1, 2][t[1]]
        torch.unique(t), t.nonzero(), t.repeat_interleave(t), torch.masked_select(t, t > 1), torch.where(t > 2)
        t.bincount(), t + 1, t.cumsum(0), torch.where(t > 2, t, 0)  # the last three wait for nothing
    assert found == ["Tensor.item", "Tensor.tolist", "Tensor.numpy", "bool(tensor)", "int(tensor)", "float(tensor)",
                     "a tensor used as a Python index", "torch.unique", "Tensor.nonzero", "Tensor.repeat_interleave",
                     "torch.masked_select", "torch.where(condition) (nonzero)", "Tensor.bincount"]


@pytest.mark.gpu
def test_the_layer_never_waits_for_the_gpu():
    x, w = decode.case_inputs(decode.CHECK_CASES[4], dtype=torch.float32)
    x, w = x.cuda(), moe.MoEWeights(*(t.cuda() for t in w))
    decode.masked_moe_forward(x, w, 4)  # first calls allocate and pick algorithms
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host wait now raises
    try:
        decode.masked_moe_forward(x, w, 4)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
def test_the_graph_replayed_layer_equals_the_eager_one(dtype):
    T, d, n, E, K = 64, 256, 128, 16, 4
    g = torch.Generator().manual_seed(0)
    w = moe.MoEWeights(*(t.cuda() for t in moe.random_weights(d, n, E, dtype=dtype, generator=g)))
    static_x = torch.randn(T, d, generator=g).to(dtype).cuda()
    graph, y = decode.graphed(lambda: decode.masked_moe_forward(static_x, w, K).y)
    for seed in (1, 2):  # new tokens in the same buffer, replayed
        fresh = torch.randn(T, d, generator=torch.Generator().manual_seed(seed)).to(dtype).cuda()
        static_x.copy_(fresh)
        graph.replay()
        assert torch.equal(y, decode.masked_moe_forward(fresh, w, K).y), f"replay {seed} differs from eager"


# --------------------------------------------------------------------------------------------
# The step on 09_1 (kernels/09_1_decode_swap_ab.cu)


def kernel_stand_in(x_slots, w, count, out=None, step=2, chunk=None):
    """09_1's, 09_2's and 09_3's contract in torch: the filled slots' products; every other row of
    ``out`` left as it was, or, without ``out``, NaN, as the kernel leaves them unwritten (a layer
    that read one would turn NaN). A busy expert's every input row must have been written: 09_1
    reads them all, 09_2 and 09_3 whole chunks (NaN here: memory nothing wrote, see nan_empty)."""
    busy = count > 0
    assert not torch.isnan(x_slots[busy]).any(), "a kernel would read an input row nothing wrote"
    y = torch.einsum("eck,enk->ecn", x_slots.double(), w.double()).to(x_slots.dtype)
    filled = torch.arange(x_slots.shape[1], device=x_slots.device) < count[:, None].long()
    if out is None:
        return torch.where(filled[..., None], y, float("nan"))
    out[filled] = y[filled]
    return out


REAL_EMPTY = torch.empty


def nan_empty(*size, **kwargs):
    """torch.empty whose floating-point memory reads NaN: a read of a row nothing wrote shows."""
    t = REAL_EMPTY(*size, **kwargs)
    return t.fill_(float("nan")) if t.is_floating_point() else t


@pytest.mark.parametrize("case", decode.CHECK_CASES, ids=CASE_IDS)
def test_the_kernel_layers_glue_matches_chapter_01(case, monkeypatch):
    """The step around the kernels (layout, slots, counts, SwiGLU, combine) with torch standing in
    for each launch, in float64: chapter 01's layer to 1e-10, and no unwritten row ever read (empty
    memory reads NaN)."""
    from moe_course import launch

    monkeypatch.setattr(launch, "decode_grouped_gemm", kernel_stand_in)
    monkeypatch.setattr(torch, "empty", nan_empty)
    decode.check_against_chapter01(case, lambda x, w, k, capacity: decode.masked_moe_forward_kernel(
        x, decode.prepare(w, x.dtype), k, capacity=capacity))


def test_the_kernel_capacity_holds_the_step():
    assert [decode.kernel_capacity(t) for t in (0, 1, 8, 9, 64, 65, 256, 511)] == [8, 8, 8, 16, 64, 128, 256, 256]


def decode_problem(counts, C, N, K, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    E = len(counts)
    x = torch.randn(E, C, K, device="cuda", generator=g).bfloat16()
    w = (torch.randn(E, N, K, device="cuda", generator=g) / math.sqrt(K)).bfloat16()
    return x, w, torch.tensor(counts, device="cuda", dtype=torch.int32)


DECODE_BUILDS = [(C, step) for step, built in launch.DECODE_GEMMS.items() for C in built]  # every width of each step


@pytest.mark.gpu
@pytest.mark.parametrize("C, step", DECODE_BUILDS, ids=[f"09_{step}-{C}" for C, step in DECODE_BUILDS])
def test_the_decode_gemm_computes_the_filled_slots_and_nothing_else(C, step):
    """09_1, 09_2 and 09_3: every filled slot right, nothing past an expert's count written. The
    counts straddle 09_2's chunks of 32 (31, 32, 33, C - 1) and 09_3's blocks of 64 slots (63, 64,
    65, 127, 129), so a chunk or a block skipped, or loaded from the wrong rows, shows."""
    from moe_course import launch

    # idle experts, one token, a full expert, partial ones, counts either side of a chunk's end
    counts = [0, 1, C, C // 2 + 1, 0, 3] + [c for c in (31, 32, 33, 63, 64, 65, 127, 129, C - 1) if c <= C]
    x, w, count = decode_problem(counts, C, 256, 192, seed=C)
    y = torch.full((len(counts), C, 256), float("nan"), device="cuda", dtype=torch.bfloat16)
    launch.decode_grouped_gemm(x, w, count, out=y, step=step)
    want = torch.einsum("eck,enk->ecn", x.float(), w.float())
    for e, c in enumerate(counts):
        assert torch.isfinite(y[e, :c]).all(), f"expert {e}: a filled slot was not written"
        if c:
            err = float((y[e, :c].float() - want[e, :c]).norm() / want[e, :c].norm())
            assert err < 1e-2, (e, err)
        assert torch.isnan(y[e, c:]).all(), f"expert {e}: a slot past its {c} tokens was written"


@pytest.mark.gpu
@pytest.mark.parametrize("C", [128, 256])
def test_09_2_in_chunks_of_64_computes_the_filled_slots_and_nothing_else(C):
    """09_2 built with chunks of 64 slots: the counts straddle its chunks (63, 64, 65, 127, 129)."""
    from moe_course import launch

    counts = [0, 1, C, 63, 64, 65, 0, 127] + ([129, 192, 193] if C > 128 else [])
    x, w, count = decode_problem(counts, C, 384, 192, seed=C + 1)
    y = torch.full((len(counts), C, 384), float("nan"), device="cuda", dtype=torch.bfloat16)
    launch.decode_grouped_gemm(x, w, count, out=y, chunk=launch.DECODE_WIDE_CHUNK)
    want = torch.einsum("eck,enk->ecn", x.float(), w.float())
    for e, c in enumerate(counts):
        if c:
            err = float((y[e, :c].float() - want[e, :c]).norm() / want[e, :c].norm())
            assert err < 1e-2, (e, err)
        assert torch.isnan(y[e, c:]).all(), f"expert {e}: a slot past its {c} tokens was written"


@pytest.mark.gpu
def test_the_decode_gemm_refuses_what_it_cannot_take():
    from moe_course import launch

    x, w, count = decode_problem([1, 2], 16, 256, 192)
    with pytest.raises(ValueError, match="step must be one of"):
        launch.decode_grouped_gemm(x, w, count, step=4)
    with pytest.raises(ValueError, match=r"09_3 \(step=3\) splits more token slots"):
        launch.decode_grouped_gemm(x, w, count, step=3)
    with pytest.raises(ValueError, match="chunk is 09_2's"):
        launch.decode_grouped_gemm(x, w, count, step=3, chunk=32)
    with pytest.raises(ValueError, match="chunks of 64 need more token slots"):
        launch.decode_grouped_gemm(x, w, count, chunk=64)
    with pytest.raises(ValueError, match="chunk is 09_2's"):
        launch.decode_grouped_gemm(x, w, count, step=1, chunk=32)
    shifted = torch.empty(2 * 16 * 256 + 1, device="cuda", dtype=torch.bfloat16)[1:].view(2, 16, 256)
    with pytest.raises(ValueError, match="16-byte boundary"):  # the epilogue writes 16-byte vectors
        launch.decode_grouped_gemm(x, w, count, out=shifted)
    x, w, count = decode_problem([1, 2], 24, 256, 192)  # 24 slots: not a width it is built for
    with pytest.raises(ValueError, match=r"token slots per expert \(C\) must be one of"):
        launch.decode_grouped_gemm(x, w, count)
    x, w, count = decode_problem([1, 2], 16, 200, 192)
    with pytest.raises(ValueError, match="N % 128 == 0"):
        launch.decode_grouped_gemm(x, w, count)


KERNEL_CASES = [decode.Case(c.name, c.tokens, 256, 256, c.E, c.K, c.routing, c.capacity) for c in decode.CHECK_CASES]


@pytest.mark.gpu
@pytest.mark.parametrize("step", [None, 1, 2, 3])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=CASE_IDS)
def test_the_kernel_layer_matches_chapter_01_on_the_gpu(case, step):
    """bf16 on 09_1, 09_2, 09_3 (at the capacities it is built for) or the kernels the layer picks
    (None) against chapter 01's layer in float32 on the same bf16-rounded inputs."""
    from moe_course import launch
    from moe_course.checking import relative_error

    if step == 3 and (case.capacity or decode.kernel_capacity(case.tokens)) not in launch.DECODE_SPLIT_STEPS:
        pytest.skip("09_3 is built for 128 and 256 token slots")

    x, w = decode.case_inputs(case, torch.float32)
    x, w = x.bfloat16().float(), moe.MoEWeights(*(t.bfloat16().float() for t in w))
    want = decode.reference_forward(x, w, case.K, case.capacity)
    got = decode.masked_moe_forward_kernel(x.cuda().bfloat16(), decode.prepare(moe.MoEWeights(*(t.cuda() for t in w))),
                                           case.K, capacity=case.capacity, step=step).y.float().cpu()
    assert torch.isfinite(got).all() and relative_error(got, want) < 1e-2, relative_error(got, want)


@pytest.mark.gpu
def test_the_graph_replayed_kernel_layer_equals_the_eager_one():
    T, d, n, E, K = 64, 256, 256, 16, 4
    g = torch.Generator().manual_seed(0)
    w = decode.prepare(moe.MoEWeights(*(t.cuda() for t in moe.random_weights(d, n, E, generator=g))))
    static_x = torch.randn(T, d, generator=g).bfloat16().cuda()
    step = lambda: decode.masked_moe_forward_kernel(static_x, w, K).y
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # the step reads nothing back
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph, y = decode.graphed(step)
    for seed in (1, 2):
        fresh = torch.randn(T, d, generator=torch.Generator().manual_seed(seed)).bfloat16().cuda()
        static_x.copy_(fresh)
        graph.replay()
        assert torch.equal(y, decode.masked_moe_forward_kernel(fresh, w, K).y), f"replay {seed} differs from eager"


def _timing(ms, tbps):
    return {"ms": ms, "ms_p10": ms, "ms_p90": ms, "reps": 20, "tflops": 1.0, "tbps": tbps, "of_copy": tbps / 3.3}


def test_the_decode_gemm_table_reads_a_record_of_session_14():
    row = {"shape": "mixtral-8x7b", "proj": "up", "tokens": 64, "active": 8, "09_1": _timing(0.6, 3.0),
           "grouped_mm": _timing(0.9, 2.0)}
    line = decode.gemm_table({"rows": [row]}).splitlines()[1]
    assert line.split()[:4] == ["mixtral-8x7b", "up", "64", "8"] and line.endswith("1.50x") and "91%" in line


def test_the_decode_gemm_table_sets_the_layers_kernel_against_torchs_graph():
    row = {"shape": "qwen3-30b-a3b", "proj": "down", "tokens": 512, "active": 128, "capacity": 256,
           "09_2, graph": _timing(0.2, 3.0), "09_1, graph": _timing(0.3, 2.0), "grouped_mm, graph": _timing(0.5, 1.2),
           "09_2": _timing(0.25, 2.4), "grouped_mm": _timing(0.45, 1.3)}
    assert decode.course_gemm(row) == "09_2, graph" and decode.torch_gemm(row) == "grouped_mm, graph"
    line = decode.gemm_table({"rows": [row]}).splitlines()[1]
    assert line.endswith("2.50x") and "09_2, graph" in line  # 0.5 / 0.2, torch's graph, not its eager 0.45
    row["09_1, graph"] = _timing(0.1, 6.0)  # the layer runs 09_2 here, so 09_2 is shown, not the faster 09_1
    assert decode.course_gemm(row) == "09_2, graph" and decode.gemm_table({"rows": [row]}).endswith("2.50x")
    mixtral = dict(row, shape="mixtral-8x7b", active=8)  # 512 x 2 / 8 = 128 rows an expert: full
    assert decode.course_gemm(mixtral) == "09_1, graph"  # a record from before chunks of 64: the layer ran 09_1
    mixtral["09_2/64, graph"] = _timing(0.15, 4.0)
    assert decode.course_gemm(mixtral) == "09_2/64, graph"


def test_the_copy_of_the_steps_bytes_is_a_column_not_a_contender():
    """"copy, graph" (a copy of the step's bytes, timed the same way) gets its column, and is
    neither the course's contender nor torch's, even when it is the fastest."""
    row = {"shape": "sonicmoe-7b", "proj": "down", "tokens": 64, "active": 125, "capacity": 64,
           "09_2, graph": _timing(0.04, 2.6), "grouped_mm, graph": _timing(0.06, 1.6), "copy, graph": _timing(0.03, 3.0)}
    assert decode.course_gemm(row) == "09_2, graph" and decode.torch_gemm(row) == "grouped_mm, graph"
    head, line = decode.gemm_table({"rows": [row]}).splitlines()
    assert "copy, graph µs" in head and "91%" in line and line.endswith("1.50x")  # 3.0 / 3.3 of the copy


def test_the_decode_tables_show_vllm_beside_the_course_and_torch():
    row = {"shape": "deepseek-v3", "proj": "up", "tokens": 64, "active": 222, "capacity": 64,
           "09_2, graph": _timing(4.0, 3.2), "grouped_mm, graph": _timing(4.4, 2.9), "vLLM, graph": _timing(3.9, 3.3)}
    head, line = decode.gemm_table({"rows": [row]}).splitlines()
    assert "vLLM, graph µs" in head and "3900.0" in line
    assert decode.course_gemm(row) == "09_2, graph" and line.endswith("1.10x")  # the course over torch, as before
    layer_row = {"shape": "deepseek-v3", "tokens": 64, "active": 222, "06 layer, graph": _timing(6.0, 3.2),
                 "grouped_mm layer, graph": _timing(6.6, 2.9), "vLLM layer, graph": _timing(6.1, 3.1)}
    head, line = decode.layer_table({"rows": [layer_row]}).splitlines()
    assert "vLLM layer, graph µs" in head and "6100.0" in line and line.endswith("1.10x")


def test_the_decode_chunk_follows_the_rows_per_expert():
    from moe_course import launch

    E, K = 8, 2  # Mixtral
    assert decode.gemm_chunk(512, 256, E, K) == 64  # 128 rows an expert: full, chunks of 64
    assert decode.gemm_chunk(256, 256, E, K) == 64  # 64 rows an expert
    assert decode.gemm_chunk(255, 256, E, K) == launch.DECODE_CHUNK  # just under
    assert decode.gemm_chunk(64, 64, E, K) == launch.DECODE_CHUNK  # 64 slots: no build of 64-slot chunks
    assert decode.gemm_chunk(1, 8, E, K) == launch.DECODE_CHUNK  # one chunk of 8: 09_1's maths
    assert decode.gemm_chunk(512, 256, 128, 8) == launch.DECODE_CHUNK  # 7B: 32 rows an expert
    assert decode.gemm_chunk(512, 256, 256, 8) == launch.DECODE_CHUNK  # DeepSeek-V3: 16


def test_the_decode_kernel_splits_the_slots_of_sparse_experts_only():
    """09_3 where the capacity holds more than one of its blocks and experts are sparse; 09_2
    where experts are full (09_3 would read their W once per block) or the capacity is small."""
    assert decode.gemm_step(512, 256, 128, 8) == 3  # 7B: 32 rows an expert, 256 slots
    assert decode.gemm_step(512, 256, 256, 8) == 3  # DeepSeek-V3: 16
    assert decode.gemm_step(100, 128, 128, 8) == 3  # 128 slots
    assert decode.gemm_step(512, 256, 8, 2) == 2  # Mixtral: 128 rows an expert, full
    assert decode.gemm_step(64, 64, 128, 8) == 2  # 64 slots: one block of 09_3's
    assert decode.gemm_step(1, 8, 128, 8) == 2
    for case in decode.CHECK_CASES:  # the layer's checks reach 09_3 with and without a full expert
        if "64 experts" in case.name:
            assert decode.gemm_step(case.tokens, decode.kernel_capacity(case.tokens), case.E, case.K) == 3, case.name


def test_the_decode_gemm_table_shows_09_3_where_the_layer_runs_it():
    row = {"shape": "sonicmoe-7b", "proj": "up", "tokens": 512, "active": 128, "capacity": 256,
           "09_2, graph": _timing(0.2, 3.0), "09_1, graph": _timing(0.3, 2.0), "grouped_mm, graph": _timing(0.5, 1.2)}
    assert decode.course_gemm(row) == "09_2, graph"  # a record from before 09_3: the layer ran 09_2
    row["09_3, graph"] = _timing(0.25, 2.4)  # shown because the layer runs it, though 09_2 is faster here
    assert decode.course_gemm(row) == "09_3, graph" and decode.gemm_table({"rows": [row]}).endswith("2.00x")
    assert decode.course_gemm(dict(row, tokens=64, capacity=64)) == "09_2, graph"
