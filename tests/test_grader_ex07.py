"""Exercise 07 (the mbarrier ring's bookkeeping): the model explores every interleaving and
finds each kind of wrong ring; the grader passes 03_1's bookkeeping and CUTLASS's, and fails
each plausible mistake with a message that says what went wrong and where."""

import json
import re

import pytest

from moe_course import ROOT, cuda_on_cpu, ring_model
from moe_course.checking import CheckFailed
from moe_course.graders import ex07_mbarrier_ring as ex07

needs_compiler = pytest.mark.skipif(cuda_on_cpu.compiler() is None, reason="no C++ compiler on this machine")


def solution() -> str:
    cells = json.loads((ROOT / "solutions" / "07_mbarrier_ring.ipynb").read_text())["cells"]
    code = next("".join(c["source"]) for c in cells if "MY_RING = " in "".join(c["source"]))
    namespace: dict = {}
    exec(code, namespace)
    return re.sub(r"\n *// (BEGIN|END) SOLUTION", "", namespace["MY_RING"])


SOLUTION = solution()
CUTLASS_STYLE = SOLUTION.replace("return kt >= STAGES;", "return true;").replace(
    "return (kt / STAGES - 1) & 1;", "return ((kt / STAGES) & 1) ^ 1;")

MISTAKES = {  # name: (replace, by, what the message says)
    "consumers always wait for parity 0": ("return (kt / STAGES) & 1;", "return 0;",
                                           r"holds slice 0: its wait on full\[0\] for parity 0 returned before"),
    "the parity flips every slice": ("return (kt / STAGES) & 1;", "return kt & 1;", "holds nothing yet"),
    "consumers wait for the other parity": ("return (kt / STAGES) & 1;", "return ((kt / STAGES) & 1) ^ 1;",
                                            "returned before slice 0 had landed"),
    "the producer never waits": ("return kt >= STAGES;", "return false;", "its wait before loading slice 1 was skipped"),
    "the producer waits for the slice it replaces' own phase": (
        "return (kt / STAGES - 1) & 1;", "return (kt / STAGES) & 1;",
        r"on empty\[0\] for parity 1 returned before every warp was done"),
    "the producer waits always, wrong parity": ("return (kt / STAGES - 1) & 1;", "return (kt / STAGES) & 1;",
                                                "deadlock: .* nobody will complete it"),
    "a slot past the ring": ("return kt % STAGES;", "return (kt + 1) % (STAGES + 1);",
                             r"goes to slot 1, but the ring has slots 0 to 0"),
    "a parity that is not 0 or 1": ("return (kt / STAGES) & 1;", "return kt / STAGES;", "a parity is 0 or 1"),
    "one slot fewer (division by zero)": ("return kt % STAGES;", "return kt % (STAGES - 1);",
                                          "SIGFPE .*division by zero"),
}


def mistake(name: str) -> str:
    replace, by, _ = MISTAKES[name]
    source = SOLUTION.replace("return kt >= STAGES;", "return true;") if "waits always" in name else SOLUTION
    assert replace in source
    return source.replace(replace, by, 1)


def test_the_model_accepts_03_1s_ring_everywhere():
    for stages in ex07.STAGES:
        for n in ex07.slices_for(stages):
            verdict = ring_model.explore(ring_model.correct_ring(stages, n), n, warps=3 if n < 5 else 2)
            assert verdict.ok, verdict


def test_the_model_shows_a_shortest_trace():
    ring = ring_model.Ring.from_functions(2, 3, lambda k: k % 2, lambda k: 0, lambda k: k >= 2,
                                          lambda k: (k // 2 - 1) & 1)
    verdict = ring_model.explore(ring, 3)
    assert verdict.kind == "stale"
    assert re.search(r"The shortest way there \(\d+ steps; the last 10\):\n +\d+\. ", str(verdict))
    assert verdict.trace[-1] == "warp 1 reads slot 0"


@needs_compiler
@pytest.mark.parametrize("source", [SOLUTION, CUTLASS_STYLE], ids=["03_1's", "CUTLASS's"])
def test_correct_rings_pass(source, capsys):
    ex07.grade(source)
    assert "PASS" in capsys.readouterr().out


@needs_compiler
@pytest.mark.parametrize("name", list(MISTAKES))
def test_wrong_rings_fail_with_a_targeted_message(name):
    with pytest.raises(CheckFailed, match=f"(?s)Exercise 07 .*FAILED.*{MISTAKES[name][2]}"):
        ex07.grade(mistake(name))


def test_unfilled_and_missing_functions():
    with pytest.raises(CheckFailed, match="not implemented yet"):
        ex07.grade("// YOUR CODE HERE")
    with pytest.raises(CheckFailed, match="define ring_empty_parity"):
        ex07.grade(SOLUTION.replace("ring_empty_parity", "ring_other"))


@pytest.mark.gpu
def test_the_ring_runs_inside_03_1_on_a_gpu(capsys):
    ex07.grade(SOLUTION)
    assert "inside 03_1 on the GPU" in capsys.readouterr().out


@pytest.mark.gpu
def test_a_wrong_ring_fails_inside_03_1_on_a_gpu():
    source = mistake("consumers always wait for parity 0")
    with pytest.raises(CheckFailed, match="inside 03_1 on the GPU"):
        ex07.check_on_gpu(source, seed=0, timeout_s=60)
