"""Exercise 09's grader passes right answers, written here without the course's reference, and
FAILS known wrong answers, each on several seeds and with the message that names its mistake:
experts dealt round-robin, counts per expert, bincount without minlength, float counts; the
exchange reading the counts transposed, the blocks in reverse order, nothing exchanged, every
block sliced from the start; the way back with the counts of the way there, or nothing sent back.
The unfilled cells say "not implemented yet"."""

import torch

from moe_course.graders import ex09_all_to_all as ex09

from grader_checks import must_fail, must_pass, unfilled


# --- 1. send_counts ------------------------------------------------------------------------------

def counts_ok(expert_ids, per, world):
    return torch.bincount(expert_ids // per, minlength=world)


def counts_by_loop(expert_ids, per, world):  # another right answer
    return torch.stack([((expert_ids >= r * per) & (expert_ids < (r + 1) * per)).sum() for r in range(world)])


def test_the_send_counts_grader():
    must_pass(ex09.grade_send_counts, counts_ok)
    must_pass(ex09.grade_send_counts, counts_by_loop)
    must_fail(ex09.grade_send_counts, lambda e, per, w: torch.bincount(e % w, minlength=w), "dealt in blocks")
    must_fail(ex09.grade_send_counts, lambda e, per, w: torch.bincount(e // per),
              "without minlength=world")
    must_fail(ex09.grade_send_counts, lambda e, per, w: torch.bincount(e, minlength=per * w), "per expert, not per rank")
    must_fail(ex09.grade_send_counts, lambda e, per, w: counts_ok(e, per, w).float(), "expected integer counts")
    must_fail(ex09.grade_send_counts, lambda e, per, w: None, "got None")
    must_fail(ex09.grade_send_counts, unfilled, "not implemented yet")


# --- 2. the exchange -----------------------------------------------------------------------------

def all_to_all_ok(sent, counts):
    world = counts.shape[0]
    blocks = [rows.split(counts[i].tolist()) for i, rows in enumerate(sent)]
    return [torch.cat([blocks[i][j] for i in range(world)]) for j in range(world)]


def all_to_all_by_offsets(sent, counts):  # another right answer: explicit offsets
    world = counts.shape[0]
    starts = torch.cumsum(counts, dim=1) - counts
    return [torch.cat([sent[i][starts[i, j]:starts[i, j] + counts[i, j]] for i in range(world)])
            for j in range(world)]


def transposed(sent, counts):
    return all_to_all_ok(sent, counts.T)


def reversed_blocks(sent, counts):
    world = counts.shape[0]
    blocks = [rows.split(counts[i].tolist()) for i, rows in enumerate(sent)]
    return [torch.cat([blocks[i][j] for i in reversed(range(world))]) for j in range(world)]


def sliced_from_the_start(sent, counts):  # forgets the offset of each block
    world = counts.shape[0]
    return [torch.cat([sent[i][:counts[i, j]] for i in range(world)]) for j in range(world)]


def test_the_all_to_all_grader():
    must_pass(ex09.grade_all_to_all, all_to_all_ok)
    must_pass(ex09.grade_all_to_all, all_to_all_by_offsets)
    must_fail(ex09.grade_all_to_all, transposed, "counts are read transposed|a rank's rows split by what it sends")
    must_fail(ex09.grade_all_to_all, reversed_blocks, "in reverse order")
    must_fail(ex09.grade_all_to_all, lambda s, c: [r.clone() for r in s], "nothing was exchanged")
    must_fail(ex09.grade_all_to_all, sliced_from_the_start, r"rank \d+, row \d+: expected rank \d+'s row \d+(.|\n)*"
                                                             r"sliced from the start")
    must_fail(ex09.grade_all_to_all, lambda s, c: s[:-1], "expected a list of")
    must_fail(ex09.grade_all_to_all, unfilled, "not implemented yet")


def test_the_transposed_exchange_is_named_where_its_sizes_add_up():
    """On the ring case the transposed counts split without error: the mistake is named there."""
    must_fail(ex09.grade_all_to_all, transposed, "counts are read transposed|a rank's rows split by what it sends")
    ring = ex09.exchange_cases(0)[0][1]
    sent = ex09.numbered_rows(ring)
    assert transposed(sent, ring) is not None  # sizes add up: a wrong answer, not an error


# --- 3. the way back -----------------------------------------------------------------------------

def test_the_send_back_grader():
    must_pass(ex09.grade_send_back, lambda received, counts: all_to_all_ok(received, counts.T))
    must_fail(ex09.grade_send_back, lambda received, counts: all_to_all_ok(received, counts),
              "uses the counts of the way there|the counts transposed")
    must_fail(ex09.grade_send_back, lambda received, counts: [r.clone() for r in received], "nothing was sent back")
    must_fail(ex09.grade_send_back, unfilled, "not implemented yet")
