"""Models of two consumer warpgroups taking turns, explored exhaustively, each warp its own
actor: the ping-pong schedule (``kernels/warp_specialized.cuh``, ``warp_specialized_pingpong``)
and, at the end, the cooperative consumers issuing their multiplies in turn (``ISSUE_IN_TURN``).

In the ping-pong, consumer warpgroup 0 takes a block's tiles 0, 2, 4, ... and warpgroup 1 the
tiles 1, 3, 5, ...; their mainloops take turns through two mbarriers (``turn[c]``: warpgroup
``c`` may start its next tile), and each finds its tile's slices in the ring by counting. After
the block's last tile the producer lays a job with no rows (the end) in the slot where the next
tile would begin; the warpgroup whose turn it is meets it, raises a flag and passes the turn,
and the other, after its own turn wait, sees the flag and stops.

The model checks who waits for what, as :mod:`moe_course.ring_model` does for chapter 03's ring,
with one difference that matters here: **the four warps of a warpgroup are separate actors**.
They wait, arrive and read flags at different moments; a barrier counts one arrival per warp.
(The producer is one actor: how its copies fill a slot is chapter 03's ring, modelled there.)
A model with one actor per warpgroup (sessions 23-24's) never deadlocks; this one shows, with a
shortest trace, why one flag shared by both warpgroups hangs (a slow warp of the warpgroup that
met the end reads its own warpgroup's flag and leaves without its turn arrival), and that a
flag per warpgroup (``done[c]``, read by the other) does not::

    from moe_course import pingpong_model
    print(pingpong_model.explore(tiles=1, num_k=1, stages=2, shared_flag=True))  # the deadlock
    print(pingpong_model.explore(tiles=3, num_k=2, stages=3))                    # ok

Chapter 06 (section 4) shows both.

:func:`explore_issue_turns` models a lighter kind of turn, the ``ISSUE_IN_TURN`` experiment
(warp_specialized.cuh's ``TensorTurn``, in chapter 03's cooperative kernels, 06_3 and chapter
07's FP8 GEMM): both warpgroups work on every tile, and take turns only to *issue* each batch of
multiplies, through two named barriers, so that what one warpgroup does between its batches
(waiting, freeing the slot, FP8's promotion) runs while the other's batch does. It checks that every warp ends, that no barrier is left
half-arrived, and that on every SM sub-core the batches queue in turn::

    print(pingpong_model.explore_issue_turns(batches=3, warps=2))                 # ok
    print(pingpong_model.explore_issue_turns(batches=2, warps=2, finish=False))   # left half-arrived
"""

from __future__ import annotations

import functools
from collections import deque
from typing import NamedTuple

from .ring_model import Barrier, Verdict, _complete  # chapter 03's ring model: its mbarrier and its verdict

END = -1  # the job with no rows


def _arrive(bar: Barrier, expected: int) -> Barrier:
    """One arrival (no bytes: every barrier here counts arrivals only)."""
    return _complete(bar._replace(arrived=bar.arrived + 1), expected)


def _passed(bar: Barrier, parity: int) -> bool:
    """mbarrier.try_wait.parity: the phase of this parity has completed."""
    return (bar.phase & 1) != parity


class Warp(NamedTuple):
    pc: str = "top"
    tile: int = 0
    kt: int = 0
    turn_parity: int = 0


def _set_warp(warps: tuple, i: int, **registers) -> tuple:
    """The warps, warp i's registers changed."""
    return warps[:i] + (warps[i]._replace(**registers),) + warps[i + 1:]


class _Search:
    """Breadth-first over every state reachable from ``start``, so that the first failure found
    comes with a shortest trace: ``run(expand)``, where ``expand(state)`` gives the moves out of
    it, ``[(what happened, next state)]`` (``what`` empty: a step too small to print), or a failed
    :class:`Verdict` (made by :meth:`fail`)."""

    def __init__(self, start):
        self.parent: dict = {start: None}
        self.queue = deque([start])

    @property
    def states(self) -> int:
        return len(self.parent)

    def fail(self, st, kind: str, message: str) -> Verdict:
        steps = []
        while self.parent[st] is not None:
            st, what = self.parent[st]
            steps.append(what)
        return Verdict(False, kind, message, [s for s in steps[::-1] if s], self.states)

    def run(self, expand, max_states: int, fewer: str) -> Verdict | None:
        """None once every state is explored; the first failed Verdict otherwise."""
        while self.queue:
            st = self.queue.popleft()
            moves = expand(st)
            if isinstance(moves, Verdict):
                return moves
            for what, nxt in moves:
                if nxt not in self.parent:
                    self.parent[nxt] = (st, what)
                    self.queue.append(nxt)
            if self.states > max_states:
                raise RuntimeError(f"more than {max_states} states: try {fewer}")
        return None


class State(NamedTuple):
    producer: int  # the next slice the producer lays (tiles * num_k: the end; one more: finished)
    slots: tuple  # what each slot holds: a slice number, END, or None
    full: tuple
    empty: tuple
    turn: tuple
    flags: tuple  # (done[0], done[1]); with shared_flag only flags[0] is used
    warps: tuple  # (warpgroup 0's warps..., warpgroup 1's warps...)


def explore(tiles: int, num_k: int, stages: int, warps: int = 2, shared_flag: bool = False,
            max_states: int = 2_000_000) -> Verdict:
    """Every interleaving of the producer and ``warps`` warps per consumer warpgroup, for a
    block that takes ``tiles`` tiles of ``num_k`` slices through a ring of ``stages`` slots.
    ``shared_flag``: one end flag for both warpgroups (the hang) instead of ``done[c]``."""
    slices = tiles * num_k
    search = _Search(State(0, (None,) * stages, (Barrier(),) * stages, (Barrier(),) * stages, (Barrier(),) * 2,
                           (0, 0), tuple(Warp(tile=c) for c in (0, 1) for _ in range(warps))))

    def name(i: int) -> str:
        return f"warpgroup {i // warps} warp {i % warps}"

    def expand(st: State):
        moves = []
        j = st.producer  # ---------------------------------------------------- the producer
        if j <= slices:
            s, use = j % stages, j // stages
            if use == 0 or _passed(st.empty[s], (use - 1) & 1):
                slots = st.slots[:s] + ((j if j < slices else END),) + st.slots[s + 1:]
                full = st.full[:s] + (_arrive(st.full[s], 1),) + st.full[s + 1:]
                what = f"slice {j} (tile {j // num_k})" if j < slices else "the end"
                moves.append((f"the producer lays {what} in slot {s}",
                              st._replace(producer=j + 1, slots=slots, full=full)))
        for i, w in enumerate(st.warps):  # ------------------------------------- the consumer warps
            c, other = i // warps, 1 - i // warps
            first = w.tile * num_k
            put = functools.partial(_set_warp, st.warps, i)
            if w.pc == "top":
                moves.append((None, st._replace(warps=put(pc="turn" if w.tile > 0 else "first"))))
            elif w.pc == "turn" and _passed(st.turn[c], w.turn_parity):
                moves.append((f"{name(i)} passes its turn wait (tile {w.tile})",
                              st._replace(warps=put(pc="flag", turn_parity=w.turn_parity ^ 1))))
            elif w.pc == "flag":
                raised = st.flags[0] if shared_flag else st.flags[other]
                flag = "the flag" if shared_flag else f"done[{other}]"
                moves.append((f"{name(i)} reads {flag} = {raised}" + (": it stops" if raised else ""),
                              st._replace(warps=put(pc="exit" if raised else "first"))))
            elif w.pc in ("first", "full"):
                s, use = (first + w.kt) % stages, (first + w.kt) // stages
                if _passed(st.full[s], use & 1):
                    held = st.slots[s]
                    if w.pc == "first" and held == END:
                        moves.append((f"{name(i)} finds the end in slot {s}", st._replace(warps=put(pc="raise"))))
                        continue
                    if held != first + w.kt:
                        return search.fail(st, "stale", f"{name(i)} reads slot {s} for slice {first + w.kt} "
                                                        f"(tile {w.tile}) but it holds {held}")
                    last = w.kt == num_k - 1
                    moves.append((f"{name(i)} multiplies slice {first + w.kt} (tile {w.tile}) from slot {s}",
                                  st._replace(warps=put(pc="pass" if last else "free"))))
            elif w.pc == "pass":
                turn = st.turn[:other] + (_arrive(st.turn[other], warps),) + st.turn[other + 1:]
                moves.append((f"{name(i)} arrives on turn[{other}] (its tile's last multiply is issued)",
                              st._replace(turn=turn, warps=put(pc="free"))))
            elif w.pc == "free":
                s = (first + w.kt) % stages
                empty = st.empty[:s] + (_arrive(st.empty[s], warps),) + st.empty[s + 1:]
                done = w.kt == num_k - 1
                moves.append((f"{name(i)} arrives on empty[{s}]",
                              st._replace(empty=empty, warps=put(pc="top", tile=w.tile + 2, kt=0) if done
                                          else put(pc="full", kt=w.kt + 1))))
            elif w.pc == "raise":
                flags = (1, st.flags[1]) if shared_flag else tuple(1 if k == c else f for k, f in enumerate(st.flags))
                moves.append((f"{name(i)} raises " + ("the flag" if shared_flag else f"done[{c}]"),
                              st._replace(flags=flags, warps=put(pc="end"))))
            elif w.pc == "end":
                turn = st.turn[:other] + (_arrive(st.turn[other], warps),) + st.turn[other + 1:]
                moves.append((f"{name(i)} arrives on turn[{other}] and stops",
                              st._replace(turn=turn, warps=put(pc="exit"))))
        finished = st.producer > slices and all(w.pc == "exit" for w in st.warps)
        if not moves and not finished:
            stuck = [f"{name(i)} waits on " + (f"turn[{i // warps}]" if w.pc == "turn" else "full[]")
                     for i, w in enumerate(st.warps) if w.pc != "exit"]
            gone = [name(i) for i, w in enumerate(st.warps) if w.pc == "exit"]
            msg = (f"deadlock: {', '.join(stuck)}; " + (f"{', '.join(gone)} stopped. " if gone else "")
                   + "Every barrier waited on needs an arrival that will never come.")
            return search.fail(st, "deadlock", msg)
        return moves

    failed = search.run(expand, max_states, "fewer tiles, slices or warps")
    return failed or Verdict(True, "ok", f"ok: every interleaving of {tiles} tile(s) x {num_k} slice(s), {stages} "
                                         f"slots, {warps} warps a warpgroup ends with every warp stopped "
                                         f"({search.states} states)", [], search.states)


# ----------------------------------------------------------------------------------------------
# The cooperative consumers issuing in turn (ISSUE_IN_TURN, kernels/warp_specialized.cuh's TensorTurn).
# Both warpgroups multiply every batch (a slice, or half a slice); warpgroup c waits for its turn
# on named barrier B(c) (bar.sync), issues, and gives the other its turn (bar.arrive on B(1 - c)).
# A named barrier, unlike an mbarrier, has no phase to wait for: it counts arrivals (one a warp,
# of the 2 x warps expected) and releases the warps waiting at it once the count is reached,
# starting again from zero. So nothing may arrive for turn j + 1 before turn j has completed,
# and at the end no arrival may be left over.


class NamedBarrier(NamedTuple):
    arrived: int = 0
    completed: int = 0  # how many times the count was reached (what a waiting warp watches)
    turn: int | None = None  # the batch this round of arrivals is for (its first arrival's)


class TurnWarp(NamedTuple):
    pc: str = "take"  # give (warpgroup 1's start), take, wait, issue, pass, finish, finishing, exit
    batch: int = 0
    waits_for: int = 0  # the barrier's `completed` count to wait beyond


def explore_issue_turns(batches: int, warps: int = 2, first_turn_given: bool = True, finish: bool = True,
                        pass_first: bool = False, max_states: int = 2_000_000) -> Verdict:
    """Every interleaving of two consumer warpgroups of ``warps`` warps issuing ``batches``
    batches each in turn, as ISSUE_IN_TURN does; ok when every warp ends, no barrier is left
    half-arrived, no round of arrivals mixes two turns, and each warpgroup's batch j is issued
    by all of its warps before any warp of the other issues the batch after it (0's j, then 1's
    j, then 0's j + 1: on every SM sub-core the batches queue in turn). ``first_turn_given``:
    warpgroup 1 starts by giving 0 its first turn (False: nobody does); ``finish``: warpgroup 0
    ends by taking the turn warpgroup 1 gave last;
    ``pass_first``: the turn passed before the batch is issued (a wrong kernel: the order is lost)."""
    expected = 2 * warps
    search = _Search((tuple(TurnWarp(pc="give" if i >= warps and first_turn_given else "take")
                            for i in range(expected)), (NamedBarrier(), NamedBarrier()), (0,) * expected))
    fail = search.fail

    def name(i: int) -> str:
        return f"warpgroup {i // warps} warp {i % warps}"

    def arrive(bars: tuple, b: int, turn: int):
        """One warp's arrival on barrier b for ``turn``: the barriers after, or None if that round
        of arrivals was for another turn."""
        bar = bars[b]
        if bar.arrived and bar.turn != turn:
            return None
        bar = NamedBarrier(bar.arrived + 1, bar.completed, turn)
        if bar.arrived == expected:
            bar = NamedBarrier(0, bar.completed + 1, None)
        return bars[:b] + (bar,) + bars[b + 1:]

    def expand(st):
        ws, bars, issued = st
        moves = []
        for i, w in enumerate(ws):
            c = i // warps
            put = functools.partial(_set_warp, ws, i)
            if w.pc == "give":  # warpgroup 1's first act: warpgroup 0's first turn
                moves.append((f"{name(i)} gives warpgroup 0 its first turn (B(0))",
                              (put(pc="take"), arrive(bars, 0, 0), issued)))
            elif w.pc == "take":
                if w.batch == batches:
                    moves.append(("", (put(pc="finish"), bars, issued)))
                else:
                    after = arrive(bars, c, w.batch)
                    if after is None:
                        return fail(st, "mixed", f"{name(i)} arrives on B({c}) for batch {w.batch} while it "
                                                 f"counts arrivals for batch {bars[c].turn}")
                    moves.append((f"{name(i)} waits on B({c}) for its turn (batch {w.batch})",
                                  (put(pc="wait", waits_for=bars[c].completed), after, issued)))
            elif w.pc == "wait" and bars[c].completed > w.waits_for:
                moves.append((f"{name(i)} may issue batch {w.batch}",
                              (put(pc="pass" if pass_first else "issue"), bars, issued)))
            elif w.pc == "issue":
                other = range((1 - c) * warps, (2 - c) * warps)
                need = w.batch + 1 if c == 1 else w.batch  # the other's batches issued before this one
                if any(issued[k] < need for k in other):
                    late = next(k for k in other if issued[k] < need)
                    return fail(st, "order", f"{name(i)} issues batch {w.batch} before {name(late)} issued "
                                             f"{'its batch ' + str(need - 1) if need else 'anything'}")
                moves.append((f"{name(i)} issues batch {w.batch}",
                              (put(pc="take" if pass_first else "pass", batch=w.batch + pass_first), bars,
                               issued[:i] + (issued[i] + 1,) + issued[i + 1:])))
            elif w.pc == "pass":
                turn = w.batch if c == 0 else w.batch + 1  # the other's batch this turn lets it issue
                after = arrive(bars, 1 - c, turn)
                if after is None:
                    return fail(st, "mixed", f"{name(i)} arrives on B({1 - c}) for batch {turn} while it "
                                             f"counts arrivals for batch {bars[1 - c].turn}")
                moves.append((f"{name(i)} passes the turn (B({1 - c}))",
                              (put(pc="issue") if pass_first else put(pc="take", batch=w.batch + 1), after, issued)))
            elif w.pc == "finish":
                if c == 0 and finish:
                    moves.append((f"{name(i)} takes the last turn back (B(0))",
                                  (put(pc="finishing", waits_for=bars[0].completed), arrive(bars, 0, batches),
                                   issued)))
                else:
                    moves.append((f"{name(i)} ends", (put(pc="exit"), bars, issued)))
            elif w.pc == "finishing" and bars[0].completed > w.waits_for:
                moves.append((f"{name(i)} ends", (put(pc="exit"), bars, issued)))
        if not moves:
            if all(w.pc == "exit" for w in ws):
                left = [f"B({b}) holds {bar.arrived} arrival(s)" for b, bar in enumerate(bars) if bar.arrived]
                if left:
                    return fail(st, "left over", "every warp ended, but " + ", ".join(left) + ": a barrier left "
                                                 "half-arrived (the next kernel on this SM may count them)")
                return []
            stuck = [f"{name(i)} waits on B({i // warps})" for i, w in enumerate(ws) if w.pc in ("wait", "finishing")]
            return fail(st, "deadlock", f"deadlock: {', '.join(stuck)}")
        return moves

    failed = search.run(expand, max_states, "fewer batches or warps")
    return failed or Verdict(True, "ok", f"ok: every interleaving of {batches} batch(es), {warps} warps a warpgroup: "
                                         f"the batches queue in turn and every warp ends ({search.states} states)",
                             [], search.states)
