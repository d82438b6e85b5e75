"""Exercise 10's grader passes right answers, written here without the course's reference (a
one-hot scan, a stable sort, a loop over the K columns), and FAILS known wrong answers, each on
several seeds and with the message that names its mistake: pairs queued token by token, positions
from 1, counts of the first choices only, counts by bincount or a loop that reads values back
(right values, but the host waits), float positions; slots without the spare slot, slots numbered
position-major, valid taken from slot_token != 0, empty slots left unwritten, the course's own
layout called. The unfilled cells say "not implemented yet"."""

import torch
import torch.nn.functional as F

from moe_course import decode
from moe_course.graders import ex10_decode_slots as ex10

from grader_checks import must_fail, must_pass, unfilled


# --- 1. queue_positions --------------------------------------------------------------------------

def positions_ok(experts, E):
    T, K = experts.shape
    queue = experts.t().reshape(-1)
    one_hot = F.one_hot(queue, E)  # (K T, E): down the columns this time
    before = (one_hot.cumsum(0) - one_hot).gather(1, queue[:, None]).squeeze(1)
    return before.view(K, T).t(), one_hot.sum(0)


def positions_by_sort(experts, E):  # another right answer: a stable sort by expert
    T, K = experts.shape
    queue = experts.t().reshape(-1)
    order = torch.argsort(queue, stable=True)
    counts = F.one_hot(queue, E).sum(0)
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(queue)
    rank[order] = torch.arange(queue.numel(), device=queue.device) - starts[queue[order]]
    return rank.view(K, T).t(), counts


def token_major(experts, E):
    return ex10._token_major_positions(experts, E), F.one_hot(experts.reshape(-1), E).sum(0)


def counted_by_bincount(experts, E):
    return positions_ok(experts, E)[0], torch.bincount(experts.reshape(-1), minlength=E)


def counted_in_a_loop(experts, E):  # right values, one host read per expert
    position = positions_ok(experts, E)[0]
    return position, torch.tensor([int((experts == e).sum()) for e in range(E)])


def test_the_queue_positions_grader():
    must_pass(ex10.grade_queue_positions, positions_ok)
    must_pass(ex10.grade_queue_positions, positions_by_sort)
    must_fail(ex10.grade_queue_positions, token_major, "numbered token by token")
    must_fail(ex10.grade_queue_positions, lambda e, n: (positions_ok(e, n)[0] + 1, positions_ok(e, n)[1]),
              "counts the pair itself")
    must_fail(ex10.grade_queue_positions, lambda e, n: (positions_ok(e, n)[0], F.one_hot(e[:, 0], n).sum(0)),
              "only each token's first choice")
    must_fail(ex10.grade_queue_positions, counted_by_bincount, "torch.bincount")
    must_fail(ex10.grade_queue_positions, counted_in_a_loop, "host wait")
    must_fail(ex10.grade_queue_positions, lambda e, n: (positions_ok(e, n)[0].float(), positions_ok(e, n)[1]),
              "as integers")
    must_fail(ex10.grade_queue_positions, lambda e, n: positions_ok(e, n)[0], "expected a pair")
    must_fail(ex10.grade_queue_positions, lambda e, n: None, "got None")
    must_fail(ex10.grade_queue_positions, lambda e, n: (decode.masked_layout(e, n).pair_slot, None),
              "course's own")
    must_fail(ex10.grade_queue_positions, unfilled, "not implemented yet")


# --- 2. slot_table -------------------------------------------------------------------------------

def table_ok(experts, E, C, *, spare=True, position_major=False, empty=0, valid_from_tokens=False):
    T, K = experts.shape
    position, counts = positions_ok(experts, E)
    slot = position * E + experts if position_major else experts * C + position
    pair_slot = torch.where(position < C, slot, E * C) if spare else slot
    on = dict(device=experts.device)
    table = torch.full((E * C + T * K,), empty, dtype=torch.long, **on)  # room for unmasked slots too
    table.scatter_(0, pair_slot.reshape(-1), torch.arange(T, **on)[:, None].expand(T, K).reshape(-1))
    slot_token = table[:E * C].view(E, C)
    valid = slot_token != 0 if valid_from_tokens else torch.arange(C, **on) < counts[:, None]
    return pair_slot, slot_token, valid


def table_with_a_loop(experts, E, C):  # another right answer: column by column, no one-hot table
    T, K = experts.shape
    position, counts = positions_ok(experts, E)
    pair_slot = torch.where(position < C, experts * C + position, E * C)
    on = dict(device=experts.device)
    slot_token = torch.zeros(E * C + 1, dtype=torch.long, **on)
    for j in range(K):  # a loop over a shape, not over values: fine
        slot_token.index_copy_(0, pair_slot[:, j], torch.arange(T, **on))
    valid = torch.arange(C, **on)[None, :] < counts.clamp(max=C)[:, None]
    return pair_slot, slot_token[:E * C].view(E, C), valid


def table_left_unwritten(experts, E, C):
    pair_slot, slot_token, valid = table_ok(experts, E, C)
    out = torch.empty(E, C, dtype=torch.long, device=experts.device)  # the grader fills it with garbage
    out[valid] = slot_token[valid]
    return pair_slot, out, valid


def table_made_on_the_cpu(experts, E, C):  # right values here; on a GPU (or meta) the devices clash
    T, K = experts.shape
    position, counts = positions_ok(experts, E)
    pair_slot = torch.where(position < C, experts * C + position, E * C)
    slot_token = torch.zeros(E * C + 1, dtype=torch.long)
    slot_token.scatter_(0, pair_slot.reshape(-1), torch.arange(T)[:, None].expand(T, K).reshape(-1))
    return pair_slot, slot_token[:E * C].view(E, C), torch.arange(C) < counts[:, None]


def test_the_slot_table_grader():
    must_pass(ex10.grade_slot_table, table_ok)
    must_pass(ex10.grade_slot_table, table_with_a_loop)
    must_fail(ex10.grade_slot_table, lambda e, n, c: table_ok(e, n, c, spare=False), "spare slot")
    must_fail(ex10.grade_slot_table, lambda e, n, c: table_ok(e, n, c, position_major=True), "position-major")
    must_fail(ex10.grade_slot_table, lambda e, n, c: table_ok(e, n, c, valid_from_tokens=True), "token 0 is a real")
    must_fail(ex10.grade_slot_table, lambda e, n, c: table_ok(e, n, c, empty=-1), "must still name a real row")
    must_fail(ex10.grade_slot_table, table_left_unwritten, "host|must still name a real row")
    must_fail(ex10.grade_slot_table, table_made_on_the_cpu, "device=experts.device")
    must_fail(ex10.grade_slot_table, lambda e, n, c: table_ok(e, n, c)[:2], "expected 3 values")
    must_fail(ex10.grade_slot_table, lambda e, n, c: tuple(decode.masked_layout(e, n, c))[:3][::-1],
              "course's own")
    must_fail(ex10.grade_slot_table, unfilled, "not implemented yet")
