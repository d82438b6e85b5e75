"""Chapter 06's kernels (moe_course/launch.py) one by one, against the same maths in
float32 (moe_course.layer.TORCH_OPS), at awkward expert counts: experts with no rows, counts
that are not multiples of the tile, one expert with every row, more tiles than a GPU has blocks
(kernel_checks.LAYER_COUNT_CASES, shared with chapter 10's backward). Outputs are poisoned
first (the memory the kernel will write held NaN just before), so a tile the kernel skips fails
the check. The refusals run without a GPU."""

import pytest
import torch

from kernel_checks import LAYER_COUNT_CASES, SCHEDULES, poison, randn, rel, routing

from moe_course import launch, layer


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(LAYER_COUNT_CASES))
@pytest.mark.parametrize("K,N", [(192, 256), (512, 512)])
def test_transposed_b_matches_float32(case, K, N):
    counts = LAYER_COUNT_CASES[case]
    offs, _ = routing(counts, 1)
    M, E = sum(counts), len(counts)
    x, w = randn(M, K), randn(E, K, N, scale=K ** -0.5)
    poison(((M, N), torch.bfloat16))
    got = launch.transposed_b_grouped_gemm(x, w, offs)
    assert rel(got, layer.TORCH_OPS.times_w(x.float(), w.float(), offs)) < 1e-2


# 06_2 as built by default, and with warp_specialized.cuh's ping-pong schedule (whose turns and
# end of work only show where a block takes two tiles or more: "more-tiles-than-sms")
@pytest.mark.gpu
@pytest.mark.parametrize("pingpong", SCHEDULES)
@pytest.mark.parametrize("case", list(LAYER_COUNT_CASES))
@pytest.mark.parametrize("d,n", [(192, 256), (256, 512)])  # n = 512: each row's ds in two shares
def test_dswiglu_matches_float32(case, d, n, pingpong):
    T, step = 333, launch.pingpong_step(launch.DSWIGLU) if pingpong else launch.DSWIGLU
    counts = LAYER_COUNT_CASES[case]
    offs, idx = routing(counts, T, seed=1)
    R, E = sum(counts), len(counts)
    dout, w_down, h = randn(T, d), randn(E, n, d, scale=d ** -0.5), randn(R, 2 * n, scale=2.0)
    s = torch.rand(R, device="cuda")
    poison(((R, 2 * n), torch.bfloat16), ((R, n), torch.bfloat16), ((n // step.block_n, R), torch.float32))
    dh, sa, ds = launch.dswiglu_grouped_gemm(dout, idx, w_down, h, s, offs, step=step)
    want = layer.TORCH_OPS.dswiglu(dout.float(), idx, w_down.float(), h.float(), s, offs)
    for name, got, ref in zip(("dh", "s*a", "ds"), (dh, sa, ds), want):
        assert rel(got, ref) < 1e-2, name


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(LAYER_COUNT_CASES))
@pytest.mark.parametrize("N,K,gathered", [(256, 128, False), (512, 384, True)])
def test_weight_grad_matches_float32(case, N, K, gathered):
    T = 333
    counts = LAYER_COUNT_CASES[case]
    offs, idx = routing(counts, T, seed=2)
    R, E = sum(counts), len(counts)
    dy = randn(R, N)
    x, idx = (randn(T, K), idx) if gathered else (randn(R, K), None)
    poison(((E, N, K), torch.bfloat16))
    got = launch.weight_grad(dy, x, idx, offs)
    want = layer.TORCH_OPS.weight_grad(dy.float(), x.float(), idx, offs)
    assert rel(got, want) < 1e-2
    for e, c in enumerate(counts):
        if c == 0:
            assert torch.all(got[e] == 0), f"expert {e} has no rows: its gradient must be zero"


@pytest.mark.gpu
@pytest.mark.parametrize("weighted", [True, False])
def test_combine_matches_float32_and_skips_dropped_pairs(weighted):
    T, k, d, R = 257, 3, 136, 700
    pos = torch.randint(0, R, (T, k), device="cuda", dtype=torch.int32)
    pos[5, 1] = R  # a dropped pair: adds nothing
    rows = randn(R, d)
    w = torch.rand(T, k, device="cuda") if weighted else None
    poison(((T, d), torch.bfloat16))
    got = launch.combine(rows, pos, w)
    padded = torch.cat([rows.float(), rows.new_zeros(1, d).float()])
    want = layer.TORCH_OPS.combine(padded, pos, w)
    assert rel(got, want) < 1e-2


@pytest.mark.gpu
def test_a_kernel_that_skips_a_tile_fails_the_check():
    """The poisoning works: leave the last 128 rows to the NaN the allocator hands back."""
    offs, _ = routing([300], 1)
    x, w = randn(300, 192), randn(1, 192, 256)
    poison(((300, 256), torch.bfloat16))
    skipped = launch.transposed_b_grouped_gemm(x, w, offs.clone().fill_(172), validate=False)  # rows 172.. unwritten
    with pytest.raises(AssertionError, match="NaN"):
        rel(skipped, layer.TORCH_OPS.times_w(x.float(), w.float(), offs))


def test_refusals_name_the_problem():
    x = torch.zeros(4, 64, dtype=torch.bfloat16)
    w = torch.zeros(2, 64, 256, dtype=torch.bfloat16)
    offs = torch.tensor([2, 4], dtype=torch.int32)
    with pytest.raises(TypeError, match="x must be torch.bfloat16"):
        launch.transposed_b_grouped_gemm(x.float(), w, offs)
    with pytest.raises(ValueError, match="is on cpu"):
        launch.transposed_b_grouped_gemm(x, w, offs)
    with pytest.raises(TypeError, match="offs must be torch.int32"):
        launch.weight_grad(x, x, None, offs.long())
    with pytest.raises(TypeError, match="pos must be torch.int32"):
        launch.combine(x, torch.zeros(4, 2, dtype=torch.int64), None)


@pytest.mark.gpu
def test_refusals_on_the_gpu():
    x = torch.zeros(4, 64, device="cuda", dtype=torch.bfloat16)
    offs = torch.tensor([2, 4], device="cuda", dtype=torch.int32)
    with pytest.raises(ValueError, match="N % 256 == 0"):
        launch.transposed_b_grouped_gemm(x, torch.zeros(2, 64, 100, device="cuda", dtype=torch.bfloat16), offs)
    with pytest.raises(ValueError, match="K differs"):
        launch.transposed_b_grouped_gemm(x, torch.zeros(2, 128, 256, device="cuda", dtype=torch.bfloat16), offs)
    with pytest.raises(ValueError, match=r"offs must be each expert's end row: .*non-decreasing.*; got \[4, 2\]"):
        launch.transposed_b_grouped_gemm(x, torch.zeros(2, 64, 256, device="cuda", dtype=torch.bfloat16), offs.flip(0))
    with pytest.raises(ValueError, match="N % 256 == 0 and K % 128 == 0"):
        launch.weight_grad(torch.zeros(4, 128, device="cuda", dtype=torch.bfloat16), x.repeat(1, 2), None, offs)
    with pytest.raises(ValueError, match="gather_idx must index"):
        launch.weight_grad(torch.zeros(4, 256, device="cuda", dtype=torch.bfloat16),
                       torch.zeros(3, 256, device="cuda", dtype=torch.bfloat16),
                       torch.tensor([0, 1, 2, 3], device="cuda", dtype=torch.int32), offs)


@pytest.mark.gpu
def test_tensor_maps_work_in_a_thread_with_no_cuda_call_yet():
    """autograd runs the backward in a thread of its own, where a tensor map can be the first
    CUDA call: the driver needs a current context there (moe_course/tma.py makes one current)."""
    import threading

    from moe_course import tma

    w = randn(3, 256, 64)  # a fresh address: not in the tensor map cache
    errors = []

    def encode():
        try:
            tma.tensor_map_2d(w, 64)
        except Exception as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=encode)
    thread.start()
    thread.join()
    assert not errors, errors


def test_the_pingpong_builds_compile_and_are_asked_for_by_name():
    """No GPU needed: the ping-pong builds of 06_2 and 10_2 compile for sm_90a within the
    registers and shared memory of an H100 (BN = 128, a 32 KB slot), and the schedule benchmark
    runs them only when asked (they are not the default)."""
    from benchmark_scripts import load

    from moe_course import kernels

    for step in (launch.pingpong_step(launch.DSWIGLU, 6), launch.pingpong_step(launch.HF_DSWIGLU, 5)):
        report = kernels.compile_report(step.source, defines=step.defines).resources[step.kernel]
        assert report.spill_stores == 0 and report.stack_bytes == 0, report
        assert step.block_n == 128 and step.smem_bytes <= 227 * 1024
    bench = load("bench_dswiglu_schedules")
    assert not any("ping-pong" in name for name in bench.builds(pingpong=False))
    assert sum("ping-pong" in name for name in bench.builds(pingpong=True)) == 3


# ISSUE_IN_TURN, an experiment (warp_specialized.cuh's TensorTurn, kernels/NOTES.md session 26):
# the two consumer warpgroups issue their batches of multiplies in turn
@pytest.mark.gpu
@pytest.mark.parametrize("case", list(LAYER_COUNT_CASES))
def test_the_consumers_in_turn_give_the_default_builds_bytes(case):
    """ISSUE_IN_TURN changes when the tensor cores run each consumer's batch, not what it sums:
    every product of the layer gives its default build's bytes ("more-tiles-than-sms": the turns
    carry from tile to tile; a warpgroup whose half of a tile is empty still takes its turns)."""
    T, d, n = 333, 256, 256
    counts = LAYER_COUNT_CASES[case]
    offs, idx = routing(counts, T, seed=3)
    R, E = sum(counts), len(counts)
    x, dout = randn(T, d), randn(T, d)
    w_up, w_down_t, w_down = randn(E, 2 * n, d, scale=d ** -0.5), randn(E, n, d), randn(E, n, d, scale=d ** -0.5)
    s = torch.rand(R, device="cuda")

    def both(launcher, step, *args, **kwargs):
        got = launcher(*args, **kwargs, step=step.with_defines(ISSUE_IN_TURN=1))
        want = launcher(*args, **kwargs, step=step)
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        for g, w in zip(got, want):
            if g is not None:
                assert torch.equal(g, w), step.name

    both(launch.swiglu_grouped_gemm, launch.SWIGLU, x, idx, w_up, offs)
    a, h = launch.swiglu_grouped_gemm(x, idx, w_up, offs)
    both(launch.transposed_b_grouped_gemm, launch.TRANSPOSED_B, a, w_down_t, offs)
    both(launch.dswiglu_grouped_gemm, launch.DSWIGLU, dout, idx, w_down, h, s, offs)
    both(launch.weight_grad, launch.WEIGHT_GRAD, h, x, idx, offs)
    both(launch.gather_grouped_gemm, launch.GATHER, x, idx, w_up, offs)
