"""What every grader shares (moe_course.graders): the learner's function is called through
``as_graded``, which refuses the course's own answer however it is reached and hands out
garbage-filled ``torch.empty`` memory; and the unfilled exercise notebooks, run through nbval as
`make grade` runs them, fail every graded cell saying "not implemented yet". The graders
themselves are tested in tests/test_grader_ex0*.py."""

import os
import re
import subprocess
import sys

import pytest
import torch

from moe_course import ROOT, moe
from moe_course import token_rounding as tr
from moe_course.checking import CheckFailed
from moe_course.graders import as_graded, as_outputs
from moe_course.moe import topk_softmax as imported_by_name

REFERENCES = (moe.topk_softmax, tr.rank_candidates)


def through_a_helper(logits, k):
    return imported_by_name(logits, k)


def via_a_course_function(scores, k):  # topk_routing runs rank_candidates inside
    return tr.topk_routing(scores, k).token_ids


def hidden_in_try(logits, k):  # an except in the learner's code cannot hide the call
    try:
        moe.topk_softmax(logits, k)
        raise ValueError("then something else goes wrong")
    except ValueError:
        return None


@pytest.mark.parametrize("fn, message", [
    (lambda logits, k: moe.topk_softmax(logits, k), r"<lambda>, line \d+, calls the course's own moe_course.moe.topk_softmax"),
    (lambda logits, k: imported_by_name(logits, k), "calls the course's own moe_course.moe.topk_softmax"),
    (through_a_helper, r"through_a_helper, line \d+, calls the course's own moe_course.moe.topk_softmax"),
    (hidden_in_try, "hidden_in_try, line .* moe_course.moe.topk_softmax"),
    (moe.topk_softmax, "the function given is the course's own moe_course.moe.topk_softmax"),
    (lambda logits, k: moe.moe_forward(torch.randn(4, 8), moe.random_weights(8, 4, 4), k),
     "calls the course's own moe_course.moe.topk_softmax \\(through moe_course.moe.moe_forward, which uses it\\)"),
])
def test_a_reference_is_refused_however_it_is_reached(fn, message):
    with pytest.raises(CheckFailed, match=message + ": the grader compares your answer with that function"):
        as_graded(fn, REFERENCES)(torch.randn(4, 4), 2)


def test_a_reference_reached_through_other_course_code_names_both():
    with pytest.raises(CheckFailed, match=r"via_a_course_function, line \d+, calls the course's own "
                                          r"moe_course.token_rounding.rank_candidates \(through "
                                          r"moe_course.token_rounding.topk_routing"):
        as_graded(via_a_course_function, REFERENCES)(torch.rand(8, 4), 2)


def test_other_course_code_and_torch_are_allowed():
    def router(logits, k):
        top, experts = moe.router_probs(logits).topk(k, dim=-1)  # not a reference
        return top / top.sum(-1, keepdim=True), tr.topk_experts(logits, k)
    logits = torch.randn(5, 4)
    weights, experts = as_graded(router, REFERENCES)(logits, 2)
    assert torch.allclose(weights, moe.topk_softmax(logits, 2).weights) and experts.shape == (5, 2)


def test_the_previous_profiler_keeps_working_and_is_restored():
    calls = []

    def profiler(frame, event, arg):
        if event == "call" and frame.f_code is through_a_helper.__code__:
            calls.append(frame.f_code.co_name)

    sys.setprofile(profiler)
    try:
        with pytest.raises(CheckFailed):
            as_graded(lambda logits, k: through_a_helper(logits, k), REFERENCES)(torch.randn(3, 4), 1)
        assert sys.getprofile() is profiler
    finally:
        sys.setprofile(None)
    assert calls == ["through_a_helper"]


def test_errors_of_the_learners_code_pass_through_and_nothing_is_left_behind():
    def broken(logits, k):
        raise NotImplementedError("fill in this cell")
    with pytest.raises(NotImplementedError):
        as_graded(broken, REFERENCES)(torch.randn(3, 4), 1)
    assert sys.getprofile() is None
    assert torch._C._len_torch_function_stack() == 0  # the garbage mode ended with the call


@pytest.mark.parametrize("dtype, garbage", [(torch.float32, "nan"), (torch.float64, "nan"), (torch.bfloat16, "nan"),
                                            (torch.int64, -2**63), (torch.int32, -2**31), (torch.uint8, 255),
                                            (torch.bool, True)])
def test_empty_memory_is_garbage_inside_a_graded_call(dtype, garbage):
    like = torch.zeros(3, dtype=dtype)

    def allocations(x):
        return (torch.empty(2, 3, dtype=dtype), torch.empty_like(like), like.new_empty(4),
                torch.empty_strided((2, 2), (2, 1), dtype=dtype))
    for t in as_graded(allocations, ())(like):
        if garbage == "nan":
            assert torch.isnan(t.float()).all()
        else:
            assert (t == garbage).all()


def test_a_result_left_unwritten_fails_even_where_memory_is_clean():
    """The mistake the garbage catches: an expert with no rows never written. Without
    as_graded, torch.empty on a CPU often gives zeros and the answer would pass."""
    def per_expert_sums(x, offsets):
        out = torch.empty(len(offsets) - 1, x.shape[1], dtype=x.dtype)
        for e, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
            if hi > lo:
                out[e] = x[lo:hi].sum(0)
        return out
    got = as_graded(per_expert_sums, ())(torch.ones(4, 3), [0, 2, 2, 4])
    assert torch.isnan(got[1]).all() and (got[[0, 2]] == 2).all()


def test_as_outputs_says_what_came_back():
    assert as_outputs("f", (1, 2), 2, "here") == (1, 2)
    assert as_outputs("f", 7, 1, "here") == (7,)
    with pytest.raises(CheckFailed, match=r"f \(here\): got None"):
        as_outputs("f", None, 2, "here")
    with pytest.raises(CheckFailed, match="expected a pair \\(two values\\), got Tensor"):
        as_outputs("f", torch.zeros(2), 2, "here")
    with pytest.raises(CheckFailed, match="expected 3 values, got a tuple of 2"):
        as_outputs("f", (1, 2), 3, "here")


# --- the unfilled exercise notebooks, through nbval as `make grade` runs them ---------------------

@pytest.mark.parametrize("notebook, graded", [("01_simple_moe.ipynb", 4), ("02_load_balancing.ipynb", 4),
                                              ("04_token_rounding.ipynb", 3), ("05_moe_backward.ipynb", 4),
                                              ("08_fp8_quantization.ipynb", 3), ("10_decode_slots.ipynb", 2),
                                              ("11_experts_backend.ipynb", 2)])
def test_unfilled_exercises_fail_saying_not_implemented(notebook, graded):
    path = ROOT / "exercises" / notebook
    assert path.exists(), f"{path} is missing: run `make exercises`"
    env = {**os.environ, "MPLBACKEND": "agg"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
                          "--nbval-current-env", str(path)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    out = re.sub(r"\x1b\[[0-9;]*m", "", run.stdout + run.stderr)  # no terminal colours
    assert run.returncode != 0, out
    # one block per failing cell: each says "not implemented yet" (a grading cell) or stopped at
    # the NotImplementedError of an unfilled cell, nothing else
    blocks = re.split(r"_{3,} \S+::(Cell \d+) _{3,}", out.split("= FAILURES =", 1)[-1].split("short test summary", 1)[0])
    verdicts = {cell: "said" if re.search(r"not implemented yet \(fill in this cell", text)
                else "raw" if "NotImplementedError: fill in this cell" in text else "unclear"
                for cell, text in zip(blocks[1::2], blocks[2::2])}
    failed = int(re.search(r"(\d+) failed", out)[1])
    assert len(verdicts) == failed and list(verdicts.values()).count("said") == graded \
        and "unclear" not in verdicts.values(), f"{verdicts}\n{out}"
    for unclear in ("NameError", "TypeError", "AttributeError", "IndexError", "RuntimeError"):
        assert unclear not in out, out
