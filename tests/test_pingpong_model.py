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


# --- the consumers issuing in turn (ISSUE_IN_TURN): named barriers, each warp its own actor ------

@pytest.mark.parametrize("batches", [0, 1, 2, 5])
@pytest.mark.parametrize("warps", [1, 2, 3])
def test_the_issue_turns_queue_each_batch_in_turn_and_end_clean(batches, warps):
    verdict = pingpong_model.explore_issue_turns(batches, warps)
    assert verdict.ok, str(verdict)


def test_without_the_last_take_a_barrier_is_left_half_arrived():
    verdict = pingpong_model.explore_issue_turns(2, 2, finish=False)
    assert verdict.kind == "left over" and "B(0) holds 2 arrival(s)" in verdict.message


def test_if_nobody_gives_warpgroup_0_its_first_turn_nobody_starts():
    verdict = pingpong_model.explore_issue_turns(1, 2, first_turn_given=False)
    assert verdict.kind == "deadlock" and len(verdict.trace) == 4


@pytest.mark.parametrize("warps", [1, 2])
def test_passing_the_turn_before_issuing_loses_the_order(warps):
    """The check can fail: a kernel that arrives before its wgmma lets the other warpgroup's batch
    queue first."""
    verdict = pingpong_model.explore_issue_turns(2, warps, pass_first=True)
    assert verdict.kind == "order" and "before warpgroup 0" in verdict.message


def test_the_kernels_take_and_pass_their_turns_as_the_model_does():
    """TensorTurn as the model has it, and each main loop passing its turn between issuing its
    batch and waiting for it (07_2's two loops, the skeleton's cooperative loop, 06_3's)."""
    from moe_course import KERNELS_DIR

    source = (KERNELS_DIR / "warp_specialized.cuh").read_text()
    turn = source[source.index("struct TensorTurn"):source.index("#else  // the default")]
    assert 'if (c == 1) asm volatile("bar.arrive 5, 256;' in turn  # 1 gives 0 its first turn
    assert 'asm volatile("bar.sync %0, 256;\\n" :: "r"(5 + c)' in turn  # each turn waited for
    assert 'bar.arrive %0, 256;\\n" :: "r"(6 - c)' in turn  # and passed to the other's barrier
    assert 'if (c == 0) asm volatile("bar.sync 5, 256;' in turn  # the last turn taken back
    fp8 = (KERNELS_DIR / "07_2_fp8_grouped_gemm.cu").read_text()
    loops = [(fp8, "void fp8_mainloop(", "wgmma_slice_fp8("), (fp8, "void fp8_mainloop_wide(", "wgmma_slice_fp8("),
             (source, "void warp_specialized_grouped_gemm(", "Producer::multiply("),
             ((KERNELS_DIR / "06_3_weight_grad.cu").read_text(), "void weight_grad(", "wgmma_commit();")]
    for text, name, issue in loops:
        body = text[text.index(name):]
        take, issued, passed, waited = (body.index(s) for s in ("turn.take();", issue, "turn.pass();", "wgmma_wait<0>"))
        assert take < issued < passed < waited, name
        assert "turn.finish();" in body or name.startswith("void fp8_mainloop"), name
