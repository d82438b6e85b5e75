"""The ping-pong schedule's turns (moe_course.pingpong_model): with a flag per warpgroup every
interleaving of the warps ends; with one flag for both (sessions 23-24's kernel, which hung
where a block takes two tiles or more) the model finds the deadlock, and only when the warps of
a warpgroup are separate actors."""

import pytest

from moe_course import pingpong_model

SIZES = [(0, 1, 2), (1, 1, 2), (2, 1, 2), (2, 2, 2), (3, 1, 2), (3, 2, 3), (4, 1, 3), (2, 3, 2)]  # tiles, num_k, stages


@pytest.mark.parametrize("tiles,num_k,stages", SIZES)
def test_a_flag_per_warpgroup_never_deadlocks(tiles, num_k, stages):
    verdict = pingpong_model.explore(tiles, num_k, stages, warps=2)
    assert verdict.ok, str(verdict)


def test_three_warps_a_warpgroup_never_deadlock_either():
    assert pingpong_model.explore(3, 2, 3, warps=3).ok


@pytest.mark.parametrize("tiles,num_k,stages", [s for s in SIZES if s[0] >= 1])
def test_one_shared_flag_deadlocks_once_a_warpgroup_has_two_warps(tiles, num_k, stages):
    verdict = pingpong_model.explore(tiles, num_k, stages, warps=2, shared_flag=True)
    assert verdict.kind == "deadlock"
    assert "reads the flag = 1: it stops" in str(verdict)  # the late warp of the warpgroup that met the end
    assert pingpong_model.explore(tiles, num_k, stages, warps=1, shared_flag=True).ok  # one actor a warpgroup hides it


def test_the_deadlock_trace_is_a_shortest_one_and_says_who_waits():
    verdict = pingpong_model.explore(1, 1, 2, shared_flag=True)
    assert verdict.message.startswith("deadlock: warpgroup 0 warp 0 waits on turn[0]")
    assert len(verdict.trace) == 15, str(verdict)


def test_the_kernel_reads_the_other_warpgroups_flag():
    """What the model proves is what warp_specialized.cuh does: done[c] written by warpgroup c,
    read as done[other] after the turn wait."""
    from moe_course import KERNELS_DIR

    source = (KERNELS_DIR / "warp_specialized.cuh").read_text()
    body = source[source.index("void warp_specialized_pingpong"):]
    assert "if (done[other]) break;" in body and "done[c] = 1;" in body


# --- 07_2's consumers issuing in turn (FP8_ORDERED): named barriers, each warp its own actor ---

@pytest.mark.parametrize("batches", [0, 1, 2, 5])
@pytest.mark.parametrize("warps", [1, 2, 3])
def test_the_issue_turns_queue_each_batch_in_turn_and_end_clean(batches, warps):
    verdict = pingpong_model.explore_issue_turns(batches, warps)
    assert verdict.ok, str(verdict)


def test_without_the_last_take_a_barrier_is_left_half_arrived():
    verdict = pingpong_model.explore_issue_turns(2, 2, finish=False)
    assert verdict.kind == "left over" and "B(0) holds 2 arrival(s)" in verdict.message


def test_if_warpgroup_0_waits_for_its_first_turn_nobody_starts():
    verdict = pingpong_model.explore_issue_turns(1, 2, first_turn_free=False)
    assert verdict.kind == "deadlock" and len(verdict.trace) == 4


@pytest.mark.parametrize("warps", [1, 2])
def test_passing_the_turn_before_issuing_loses_the_order(warps):
    """The check can fail: a kernel that arrives before its wgmma lets the other warpgroup's batch
    queue first."""
    verdict = pingpong_model.explore_issue_turns(2, warps, pass_first=True)
    assert verdict.kind == "order" and "before warpgroup 0" in verdict.message


def test_the_kernel_takes_and_passes_its_turns_as_the_model_does():
    from moe_course import KERNELS_DIR

    source = (KERNELS_DIR / "07_2_fp8_grouped_gemm.cu").read_text()
    turn = source[source.index("struct TensorTurn"):source.index("#else  // the default")]
    assert 'if (c == 1 || started) asm volatile("bar.sync %0, 256;\\n" :: "r"(5 + c)' in turn  # 0's first turn free
    assert 'bar.arrive %0, 256;\\n" :: "r"(6 - c)' in turn  # to the other's barrier
    assert 'if (c == 0 && started) asm volatile("bar.sync 5, 256;' in turn  # the last turn taken back
    start = source.index("void fp8_mainloop(")
    mainloop = source[start:source.index("#if BN == 256", start)]
    assert mainloop.index("wgmma_slice_fp8(") < mainloop.index("turn.pass();") < mainloop.index("wgmma_wait<0>")
