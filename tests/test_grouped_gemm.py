"""Every step of the grouped GEMM ladder against a float32 reference, at awkward sizes:
experts with no rows, counts that are not a multiple of the tile, one expert holding every row,
the smallest K and N a kernel takes. The output is poisoned with NaN first, so a tile a kernel
forgets to write fails the check. Shapes a kernel cannot take are refused before launch."""

import pytest
import torch

from moe_course import grouped_gemm as gg
from moe_course import launch
from moe_course.checking import CheckFailed, check_close

COUNT_CASES = {
    "zeros-and-ragged": [0, 1, 130, 0, 257],
    "one-expert-has-all": [0, 0, 300, 0],
    "single-row": [1],
    "many-experts": [7, 0, 128, 129, 3, 0, 0, 64, 255, 1, 17, 40],
}


def assert_matches_reference(y, p, label):
    ref = gg.reference(p.x, p.w, p.offs)
    # bf16 output: one rounding of a ~N(0,1) value is below 0.4% relative; allow accumulation order too
    check_close(label, y.float(), ref, rtol=2e-2, atol=2e-2)


def smallest_shape(step):
    s = launch.STEPS[step]
    return max(s.k_multiple, 16), max(s.block_n, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("step", list(launch.STEPS))
@pytest.mark.parametrize("case", list(COUNT_CASES))
def test_step_matches_reference(step, case):
    k, n = smallest_shape(step)
    for d_in, d_out in ((k, n), (k * 5, n * 2)):  # the smallest shape, and one with several K slices
        p = gg.make_problem(COUNT_CASES[case], d_in, d_out, seed=hash((step, case, d_in)) % 2**31)
        y = torch.full((p.x.shape[0], d_out), float("nan"), device="cuda", dtype=torch.bfloat16)
        launch.grouped_gemm(p.x, p.w, p.offs, step=step, out=y)
        assert_matches_reference(y, p, f"{step} {case} K={d_in} N={d_out}")


@pytest.mark.gpu
@pytest.mark.parametrize("step", list(launch.STEPS))
def test_step_on_a_routed_problem(step):
    counts = gg.expert_counts(tokens=1000, experts=16, top_k=2, skew=0.7, seed=3)
    p = gg.make_problem(counts, 256, 512, seed=11)
    y = torch.full((p.x.shape[0], 512), float("nan"), device="cuda", dtype=torch.bfloat16)
    assert_matches_reference(launch.grouped_gemm(p.x, p.w, p.offs, step=step, out=y), p, step)


@pytest.mark.gpu
def test_no_rows_at_all():
    p = gg.make_problem([0, 0, 0], 64, 256)
    for step in launch.STEPS:
        assert launch.grouped_gemm(p.x, p.w, p.offs, step=step).shape == (0, 256)


@pytest.mark.gpu
def test_bad_offsets_are_refused():
    p = gg.make_problem([4, 4], 64, 256)
    with pytest.raises(ValueError, match="non-decreasing"):
        launch.grouped_gemm(p.x, p.w, torch.tensor([6, 4], device="cuda", dtype=torch.int32))
    with pytest.raises(ValueError, match=r"the last == the row count 8; got \[4, 7\]"):
        launch.grouped_gemm(p.x, p.w, torch.tensor([4, 7], device="cuda", dtype=torch.int32))


def cpu_problem(counts=(3, 5), k=64, n=256):
    return gg.make_problem(list(counts), k, n, device="cpu")


def test_refuses_shapes_a_step_cannot_take():
    p = cpu_problem(k=64, n=96)
    with pytest.raises(ValueError, match="N % 128 == 0"):
        launch.grouped_gemm(p.x, p.w, p.offs, step="02_5_wgmma")
    p = cpu_problem(k=48, n=128)
    with pytest.raises(ValueError, match="K % 64 == 0"):
        launch.grouped_gemm(p.x, p.w, p.offs, step="02_6_persistent")


def test_refuses_wrong_dtypes_layouts_and_devices():
    p = cpu_problem()
    with pytest.raises(TypeError, match="x must be torch.bfloat16, got torch.float32"):
        launch.grouped_gemm(p.x.float(), p.w, p.offs)
    with pytest.raises(TypeError, match="offs must be torch.int32"):
        launch.grouped_gemm(p.x, p.w, p.offs.long())
    with pytest.raises(ValueError, match="K differs"):
        launch.grouped_gemm(p.x, p.w.transpose(1, 2).contiguous(), p.offs)
    with pytest.raises(ValueError, match="one end row per expert"):
        launch.grouped_gemm(p.x, p.w, p.offs[:1])
    with pytest.raises(ValueError, match="x is on cpu"):
        launch.grouped_gemm(p.x, p.w, p.offs)
    with pytest.raises(KeyError, match="unknown step"):
        launch.grouped_gemm(p.x, p.w, p.offs, step="99_magic")


def test_a_forgotten_tile_fails_the_check():
    """The check the GPU tests use must catch a kernel that skips a tile."""
    p = cpu_problem(counts=(130, 70), k=64, n=256)
    y = gg.reference(p.x, p.w, p.offs).bfloat16()
    y[128:130, 128:256] = float("nan")  # the last rows of expert 0, second N tile: never written
    with pytest.raises(CheckFailed, match="values differ"):
        assert_matches_reference(y, p, "skipped tile")
    y[128:130, 128:256] = 0.0  # a tile written with zeros instead of the product
    with pytest.raises(CheckFailed):
        assert_matches_reference(y, p, "zero tile")


def test_reference_matches_a_dense_computation():
    p = cpu_problem(counts=(2, 0, 3), k=16, n=8)
    ref = gg.reference(p.x, p.w, p.offs)
    dense = torch.stack([p.x[i].float() @ p.w[e].float().T for i, e in enumerate([0, 0, 2, 2, 2])])
    torch.testing.assert_close(ref, dense)


def test_expert_counts():
    c = gg.expert_counts(tokens=500, experts=8, top_k=2, seed=1)
    assert c.sum() == 1000 and c.numel() == 8
    skewed = gg.expert_counts(tokens=500, experts=8, top_k=2, skew=2.0, seed=1)
    assert skewed[0] > skewed[-1] and skewed.max() > c.max()


def test_check_then_time_helpers_on_the_cpu():
    """The check-then-time pieces every benchmark of the course uses: a wrong result is
    reported and never timed; a right one gets its error and its time."""
    p = cpu_problem(counts=(40, 0, 24), k=64, n=256)
    ref = gg.reference(p.x, p.w, p.offs)
    loop = gg.implementation("torch loop")
    ok = gg.check_result(loop, p.x, p.w, p.offs, ref)
    assert "error" not in ok and ok["rel_err"] < gg.MAX_REL_ERR
    wrong = gg.check_result(lambda x, w, o: loop(x, w, o) * 1.1, p.x, p.w, p.offs, ref)
    assert wrong["error"].startswith("wrong result: relative error")
    timed = gg.time_result(loop, p.x, p.w, p.offs, flops=p.flops, name="loop", reps=3, warmup=1)
    assert timed["reps"] == 3 and timed["ms"] > 0 and timed["tflops"] > 0
    assert gg.implementation("02_5_wgmma") is not loop
