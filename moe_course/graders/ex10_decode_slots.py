"""Grader of exercise 10, a decode step's slots with no host sync (chapter 09, in torch).

The learner writes what :func:`moe_course.moe.expert_queues` and
:func:`moe_course.decode.masked_layout` do:

- ``queue_positions(experts (T, K) int64, num_experts) -> (position (T, K) int64, counts (E,)
  int64)``: each (token, expert) pair's place in its expert's queue, GShard's order (every
  token's first choice in token order, then every second choice, ...), and the pairs per expert;
- ``slot_table(experts, num_experts, capacity) -> (pair_slot (T, K), slot_token (E, C), valid
  (E, C) bool)``: each pair's slot ``e*C + position`` (the spare slot ``E*C`` past the capacity),
  each slot's token (``0`` in an empty one) and which slots hold a pair.

Both are checked twice: their values at awkward steps (one token, an idle expert, every token's
first choice on one expert, a capacity that overflows, one larger than the step, ``K = 1``), and
what a CUDA graph needs: they must run on torch's meta device (tensors with shapes and no
values) and call nothing that reads a value back to the host (:func:`moe_course.decode.host_reads`).
A right answer that counts with ``bincount`` fails, naming the call.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .. import decode, moe
from ..checking import CheckFailed, grading
from . import Case, as_graded, as_outputs, fresh_seed, random_experts

TITLE = "Exercise 10"

#: The course's answers: a learner's function that calls one is refused.
REFERENCES = (moe.expert_queues, decode.masked_layout, decode.slots_of_pairs, moe.drop_tokens)


class Step(NamedTuple):
    name: str
    experts: Tensor  # (T, K) int64
    num_experts: int
    capacity: int


def steps(seed: int) -> list[Step]:
    """The awkward steps, each routing drawn fresh from ``seed``."""
    g = torch.Generator().manual_seed(seed)

    def routed(T, E, K, empty=None, skew=0.0):
        return random_experts(Case(T=T, d=1, E=E, K=K, empty=empty), g, skew=skew)

    one_expert = routed(20, 8, 2, empty=5)
    one_expert[:, 0] = 5  # every token's first choice: expert 5 (no token's second, as the K are distinct)
    return [
        Step("1 token", routed(1, 8, 2), 8, 1),
        Step("7 tokens, expert 3 idle", routed(7, 8, 2, empty=3), 8, 7),
        Step("64 tokens, 16 experts, k=4", routed(64, 16, 4), 16, 64),
        Step("every token's first choice on expert 5", one_expert, 8, 20),
        Step("24 tokens, capacity 3: pairs dropped", routed(24, 4, 2, skew=1.0), 4, 3),
        Step("5 tokens, capacity 16 (larger than the step)", routed(5, 8, 2), 8, 16),
        Step("33 tokens, k=1, expert 0 idle", routed(33, 8, 1, empty=0), 8, 33),
    ]


def _token_major_positions(experts: Tensor, num_experts: int) -> Tensor:
    """Positions counted with the pairs in token order (t*K + j), not GShard's column order."""
    flat = experts.reshape(-1)
    one_hot = torch.nn.functional.one_hot(flat, num_experts)
    return ((one_hot.cumsum(0) - one_hot) * one_hot).sum(1).view_as(experts)


#: What the usual mistakes return: ``{why: function (experts, num_experts) -> position}``
POSITION_MISTAKES: dict[str, Callable[[Tensor, int], Tensor]] = {
    "the pairs are numbered token by token (pair t*K + j, experts.reshape(-1)): the queue is GShard's, every "
    "token's first choice (column 0) in token order, then every second choice (column 1), and so on: "
    "experts.t().reshape(-1)":
        _token_major_positions,
    "each position counts the pair itself: it is the number of pairs BEFORE this one with the same expert, so "
    "the first pair of an expert is at 0 (a running sum includes the current pair: subtract one)":
        lambda e, n: moe.expert_queues(e, n).position + 1,
}

COUNT_MISTAKES: dict[str, Callable[[Tensor, int], Tensor]] = {
    "only each token's first choice (column 0) is counted: count every pair, all K columns":
        lambda e, n: torch.nn.functional.one_hot(e[:, 0], n).sum(0),
}


def _host_read(fn, args, name: str, where: str) -> None:
    """Fail if ``fn(*args)`` reads a value back to the host or cannot run without values."""
    with decode.host_reads() as found:
        fn(*args)
    if found:
        raise CheckFailed(f"{name} ({where}): the values are right, but it calls {', '.join(dict.fromkeys(found))}, "
                          f"which makes the host wait for the device (it reads a value back, or makes a tensor whose "
                          f"size depends on the values): a CUDA graph cannot capture that. Use fixed-shape operations: "
                          f"a one-hot comparison, a running sum (cumsum), gather, scatter, where")
    why_not = decode.runs_on_meta(fn, *args)
    if why_not is not None and "device" in why_not:
        raise CheckFailed(f"{name} ({where}): the values are right, but run on tensors of another device (torch's "
                          f"meta device) it fails: {why_not}\n  a tensor it makes stays on the CPU: give torch.arange, "
                          f"torch.zeros, ... device=experts.device, or the step fails on a GPU too")
    if why_not is not None:
        raise CheckFailed(f"{name} ({where}): the values are right, but it does not run on torch's meta device "
                          f"(tensors with shapes and no values): {why_not}\n  something in it needs the values on "
                          f"the host; a CUDA-graph-captured step has none to give")


def _check_integers(name: str, got, shape: tuple, where: str, what: str) -> Tensor:
    if not isinstance(got, Tensor):
        raise CheckFailed(f"{name} ({where}): expected {what}, a torch tensor, got {type(got).__name__}")
    if got.dtype.is_floating_point:
        raise CheckFailed(f"{name} ({where}): expected {what} as integers (int64), got {got.dtype}")
    if tuple(got.shape) != shape:
        raise CheckFailed(f"{name} ({where}): expected {what} shaped {shape}, got {tuple(got.shape)}")
    return got.long().cpu()


def _explain(message: str, got: Tensor, mistakes: dict, args) -> CheckFailed:
    for why, mistake in mistakes.items():
        wrong = mistake(*args)
        if wrong.shape == got.shape and torch.equal(got, wrong.long()):
            return CheckFailed(f"{message}\n  it is what you get if {why}")
    return CheckFailed(message)


def _first_difference(got: Tensor, want: Tensor) -> tuple:
    return tuple(int(i) for i in (got != want).nonzero()[0])


def grade_queue_positions(queue_positions, seed: int | None = None) -> None:
    """``queue_positions(experts (T, K), num_experts) -> (position (T, K), counts (E,))``."""
    seed = fresh_seed(seed)
    queue_positions = as_graded(queue_positions, REFERENCES)
    with grading(f"{TITLE} · queue_positions"):
        for step in steps(seed):
            where = f"{step.name}, seed {seed}"
            experts, E = step.experts, step.num_experts
            T, K = experts.shape
            want = moe.expert_queues(experts, E)
            got_position, got_counts = as_outputs("queue_positions", queue_positions(experts.clone(), E), 2, where)
            got_counts = _check_integers("queue_positions", got_counts, (E,), where, "counts, one per expert,")
            if not torch.equal(got_counts, want.counts):
                raise _explain(f"queue_positions ({where}): counts expected {want.counts.tolist()}, got "
                               f"{got_counts.tolist()}", got_counts, COUNT_MISTAKES, (experts, E))
            got_position = _check_integers("queue_positions", got_position, (T, K), where, "positions, one per pair,")
            if not torch.equal(got_position, want.position):
                t, j = _first_difference(got_position, want.position)
                raise _explain(f"queue_positions ({where}): token {t}'s choice {j} (expert {int(experts[t, j])}) is at "
                               f"place {int(want.position[t, j])} of its expert's queue, got "
                               f"{int(got_position[t, j])}", got_position, POSITION_MISTAKES, (experts, E))
            _host_read(queue_positions, (experts.clone(), E), "queue_positions", where)


def _slots_unmasked(experts: Tensor, num_experts: int, capacity: int) -> Tensor:
    return experts * capacity + moe.expert_queues(experts, num_experts).position


def _slots_position_major(experts: Tensor, num_experts: int, capacity: int) -> Tensor:
    position = moe.expert_queues(experts, num_experts).position
    return torch.where(position < capacity, position * num_experts + experts, num_experts * capacity)


#: ``{why: function (experts, num_experts, capacity) -> pair_slot}``
SLOT_MISTAKES: dict[str, Callable[[Tensor, int, int], Tensor]] = {
    "a pair past the capacity is not sent to the spare slot E*C: at position >= C it lands in the next "
    "expert's first slots":
        _slots_unmasked,
    "the slots are numbered position-major (position * E + expert): expert e's C slots are consecutive, "
    "e*C .. e*C + C - 1":
        _slots_position_major,
}


def grade_slot_table(slot_table, seed: int | None = None) -> None:
    """``slot_table(experts (T, K), num_experts, capacity) -> (pair_slot (T, K), slot_token (E, C),
    valid (E, C) bool)``."""
    seed = fresh_seed(seed)
    slot_table = as_graded(slot_table, REFERENCES)
    with grading(f"{TITLE} · slot_table"):
        for step in steps(seed):
            where = f"{step.name}, seed {seed}"
            experts, E, C = step.experts, step.num_experts, step.capacity
            T, K = experts.shape
            want = decode.masked_layout(experts, E, C)
            pair_slot, slot_token, valid = as_outputs("slot_table", slot_table(experts.clone(), E, C), 3, where)
            pair_slot = _check_integers("slot_table", pair_slot, (T, K), where, "pair_slot, one slot per pair,")
            if not torch.equal(pair_slot, want.pair_slot):
                t, j = _first_difference(pair_slot, want.pair_slot)
                raise _explain(f"slot_table ({where}): token {t}'s choice {j} (expert {int(experts[t, j])}) belongs "
                               f"in slot {int(want.pair_slot[t, j])} (E*C = {E * C}: the spare slot of the dropped), "
                               f"got {int(pair_slot[t, j])}", pair_slot, SLOT_MISTAKES, (experts, E, C))
            if not isinstance(valid, Tensor) or valid.dtype != torch.bool or tuple(valid.shape) != (E, C):
                what = (f"{valid.dtype} {tuple(valid.shape)}" if isinstance(valid, Tensor) else type(valid).__name__)
                raise CheckFailed(f"slot_table ({where}): expected valid as a bool tensor shaped ({E}, {C}), got {what}")
            valid = valid.cpu()
            if not torch.equal(valid, want.valid):
                e, c = _first_difference(valid, want.valid)
                message = (f"slot_table ({where}): slot {c} of expert {e} {'holds' if want.valid[e, c] else 'holds no'} "
                           f"pair (expert {e} got {int(want.counts[e])}, capacity {C}), but valid says "
                           f"{bool(valid[e, c])}")
                if torch.equal(valid, want.slot_token != 0):
                    message += "\n  it is what you get if valid is slot_token != 0: token 0 is a real token"
                raise CheckFailed(message)
            slot_token = _check_integers("slot_table", slot_token, (E, C), where, "slot_token, one token per slot,")
            if not torch.equal(slot_token[valid], want.slot_token[valid]):
                e, c = _first_difference(torch.where(valid, slot_token, -1), torch.where(valid, want.slot_token, -1))
                raise CheckFailed(f"slot_table ({where}): slot {c} of expert {e} holds token "
                                  f"{int(want.slot_token[e, c])}, got {int(slot_token[e, c])}")
            if not ((slot_token >= 0) & (slot_token < max(T, 1))).all():
                e, c = _first_difference((slot_token >= 0) & (slot_token < max(T, 1)), torch.ones_like(valid))
                raise CheckFailed(f"slot_table ({where}): the empty slot {c} of expert {e} holds {int(slot_token[e, c])}, "
                                  f"not a token: an empty slot must still name a real row (0), because the "
                                  f"kernel gathers every slot's row before the mask drops it")
            _host_read(slot_table, (experts.clone(), E, C), "slot_table", where)
