"""A model of chapter 03's mbarrier ring (``kernels/03_1_tma.cu``), explored exhaustively.

The ring's correctness does not depend on the numbers a GEMM computes but on who waits for
what. This module models exactly that, with the hardware's rules for an mbarrier:

- a barrier counts arrivals; when the expected number has arrived (and, for ``full``, the bytes
  of the copy have landed) its current phase completes and the next one begins;
- a wait names only a **parity**: ``wait(bar, p)`` returns as soon as the barrier's current
  phase has a parity other than ``p`` (the phase of parity ``p`` completed). A fresh barrier is
  in phase 0, so a wait for parity 1 returns at once and a wait for parity 0 blocks.

The actors are 03_1's: ``warps`` consumer warps (each waits ``full[slot]``, reads the slice,
arrives on ``empty[slot]``), warp 0's thread 0 also being the producer (it loads the first
``stages`` slices, then, after consuming slice ``kt``, loads slice ``kt + stages``), and the copy
engine, whose loads land whenever they land. :func:`explore` tries **every** interleaving of
them (breadth first, so the trace it reports is a shortest one) and reports the first thing
that goes wrong: a warp that reads a slot holding another slice (a wait that returned too
early), a slot overwritten while a warp still reads it, or a deadlock (everyone waits for a
phase that nobody will complete).

The bookkeeping under test is a :class:`Ring`: which slot slice ``kt`` uses, which parity the
consumers wait on, whether and for which parity the producer waits before loading slice ``kt``
(exercise 07 asks the learner for these, in CUDA C; :data:`CORRECT` is 03_1's).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class Ring:
    """The bookkeeping, tabulated for slices ``0 .. n-1`` (what a learner's functions return)."""

    stages: int
    slot: tuple[int, ...]
    full_parity: tuple[int, ...]
    producer_waits: tuple[bool, ...]
    empty_parity: tuple[int, ...]

    @classmethod
    def from_functions(cls, stages: int, n: int, slot, full_parity, producer_waits, empty_parity) -> Ring:
        return cls(stages, tuple(slot(k) for k in range(n)), tuple(full_parity(k) for k in range(n)),
                   tuple(bool(producer_waits(k)) for k in range(n)), tuple(empty_parity(k) for k in range(n)))


def correct_ring(stages: int, n: int) -> Ring:
    """03_1's bookkeeping."""
    return Ring.from_functions(stages, n, lambda k: k % stages, lambda k: (k // stages) & 1,
                               lambda k: k >= stages, lambda k: (k // stages - 1) & 1)


class Barrier(NamedTuple):
    phase: int = 0  # phases completed so far; the current one has parity phase & 1
    arrived: int = 0
    bytes_pending: int = 0


class Slot(NamedTuple):
    slice: int = -1  # which slice the slot holds (-1: nothing yet)
    landed: bool = True


# The program of each warp: a list of operations, derived from the ring.
#   ("wait", kind, slot, parity, kt)     kind "full" or "empty"; kt: the slice it is for
#   ("load", slot, kt)                   arrive.expect_tx on full[slot], the copy starts
#   ("read", slot, kt), ("done", slot, kt)   the warp reads the slot (from read to done)
#   ("arrive", slot, kt)                 arrive on empty[slot]
def programs(ring: Ring, n: int, warps: int) -> list[list[tuple]]:
    def load(kt):
        s = ring.slot[kt]
        wait = [("wait", "empty", s, ring.empty_parity[kt], kt)] if ring.producer_waits[kt] else []
        return wait + [("load", s, kt)]

    progs = []
    for w in range(warps):
        prog = [op for kt in range(min(ring.stages, n)) for op in load(kt)] if w == 0 else []
        for kt in range(n):
            s = ring.slot[kt]
            prog += [("wait", "full", s, ring.full_parity[kt], kt), ("read", s, kt), ("done", s, kt), ("arrive", s, kt)]
            if w == 0 and kt + ring.stages < n:
                prog += load(kt + ring.stages)
        progs.append(prog)
    return progs


class State(NamedTuple):
    pcs: tuple[int, ...]
    full: tuple[Barrier, ...]
    empty: tuple[Barrier, ...]
    slots: tuple[Slot, ...]
    reading: frozenset  # (warp, slot) pairs between read and done


@dataclass
class Verdict:
    ok: bool
    kind: str  # "ok", "stale", "overwritten", "deadlock", "bad slot"
    message: str
    trace: list[str]
    states: int

    def __str__(self) -> str:
        if self.ok or not self.trace:
            return self.message
        steps = self.trace[-10:]
        first = len(self.trace) - len(steps) + 1
        shown = "\n".join(f"  {first + i:3d}. {s}" for i, s in enumerate(steps))
        count = f"{len(self.trace)} step{'s' if len(self.trace) > 1 else ''}"
        last = f"; the last {len(steps)}" if len(steps) < len(self.trace) else ""
        return f"{self.message}\nThe shortest way there ({count}{last}):\n{shown}"


def _complete(bar: Barrier, expected: int) -> Barrier:
    if bar.arrived >= expected and bar.bytes_pending == 0:
        return Barrier(bar.phase + 1, bar.arrived - expected, 0)
    return bar


def explore(ring: Ring, n: int, warps: int = 2, max_states: int = 500_000) -> Verdict:
    """Every interleaving of ``warps`` consumer warps (warp 0 also loads) and the copy engine,
    over ``n`` slices. The first failure found (on a shortest trace), or ok."""
    stages = ring.stages
    for kt in range(n):
        if not 0 <= ring.slot[kt] < stages:
            return Verdict(False, "bad slot", f"slice {kt} goes to slot {ring.slot[kt]}, but the ring has slots "
                                              f"0 to {stages - 1} (STAGES = {stages})", [], 0)
    progs = programs(ring, n, warps)
    start = State(tuple(0 for _ in progs), tuple(Barrier() for _ in range(stages)),
                  tuple(Barrier() for _ in range(stages)), tuple(Slot() for _ in range(stages)), frozenset())
    parent: dict[State, tuple[State, str] | None] = {start: None}
    queue = deque([start])

    def trace_to(state: State, last: str) -> list[str]:
        steps = [last]
        while parent[state] is not None:
            state, what = parent[state]
            steps.append(what)
        return steps[::-1]

    def who(w: int) -> str:
        return "warp 0 (also the producer)" if w == 0 and warps > 1 else f"warp {w}"

    while queue:
        st = queue.popleft()
        moves = []  # (description, next state) or a failure
        for w, prog in enumerate(progs):
            pc = st.pcs[w]
            if pc == len(prog):
                continue
            op = prog[pc]
            pcs = st.pcs[:w] + (pc + 1,) + st.pcs[w + 1:]
            if op[0] == "wait":
                _, kind, s, parity, kt = op
                bar = (st.full if kind == "full" else st.empty)[s]
                if (bar.phase & 1) != parity:
                    moves.append((f"{who(w)} waits {kind}[{s}] for parity {parity} (slice {kt}): {kind}[{s}] is in "
                                  f"phase {bar.phase} (parity {bar.phase & 1}), so the wait returns",
                                  st._replace(pcs=pcs)))
            elif op[0] == "load":
                _, s, kt = op
                if any(slot == s for _, slot in st.reading):
                    readers = sorted(ww for ww, slot in st.reading if slot == s)
                    fail = (f"slot {s} is overwritten with slice {kt} while {who(readers[0])} is still reading slice "
                            f"{st.slots[s].slice} from it: the producer's wait before loading slice {kt} did not wait "
                            f"for every warp to be done with the slot")
                    return Verdict(False, "overwritten", fail, trace_to(st, f"{who(w)} loads slice {kt} into slot {s}"),
                                   len(parent))
                full = list(st.full)
                full[s] = _complete(full[s]._replace(arrived=full[s].arrived + 1, bytes_pending=full[s].bytes_pending + 1), 1)
                slots = list(st.slots)
                slots[s] = Slot(kt, False)
                moves.append((f"{who(w)} loads slice {kt} into slot {s} (arrive.expect_tx on full[{s}]; the copy starts)",
                              st._replace(pcs=pcs, full=tuple(full), slots=tuple(slots))))
            elif op[0] == "read":
                _, s, kt = op
                slot = st.slots[s]
                if slot.slice > kt:  # the producer got there first
                    load_kt = slot.slice
                    fail = (f"{who(w)} reads slot {s} for slice {kt}, but the producer has already loaded slice "
                            f"{load_kt} into it: its wait before loading slice {load_kt} "
                            + (f"on empty[{s}] for parity {ring.empty_parity[load_kt]} returned before every warp "
                               f"was done with slice {kt}" if ring.producer_waits[load_kt] else "was skipped")
                            + f" (slice {load_kt} is use {load_kt // stages} of slot {s}: it must wait until use "
                              f"{load_kt // stages - 1} is consumed)")
                    return Verdict(False, "overwritten", fail, trace_to(st, f"{who(w)} reads slot {s}"), len(parent))
                if slot.slice != kt or not slot.landed:
                    held = ("nothing yet" if slot.slice < 0 else f"slice {slot.slice}" if slot.landed
                            else f"slice {slot.slice}, still being copied")
                    fail = (f"{who(w)} reads slot {s} for slice {kt}, but the slot holds {held}: its wait on full[{s}] "
                            f"for parity {ring.full_parity[kt]} returned before slice {kt} had landed (slice {kt} is "
                            f"use {kt // stages} of slot {s}: which phase of full[{s}] completes when it lands?)")
                    return Verdict(False, "stale", fail, trace_to(st, f"{who(w)} reads slot {s}"), len(parent))
                moves.append((f"{who(w)} reads slice {kt} from slot {s}",
                              st._replace(pcs=pcs, reading=st.reading | {(w, s)})))
            elif op[0] == "done":
                _, s, kt = op
                moves.append((f"{who(w)} has done its multiplications on slice {kt}",
                              st._replace(pcs=pcs, reading=st.reading - {(w, s)})))
            elif op[0] == "arrive":
                _, s, kt = op
                empty = list(st.empty)
                empty[s] = _complete(empty[s]._replace(arrived=empty[s].arrived + 1), warps)
                moves.append((f"{who(w)} arrives on empty[{s}] (done with slice {kt})",
                              st._replace(pcs=pcs, empty=tuple(empty))))
        for s, slot in enumerate(st.slots):  # the copy engine: an in-flight copy lands
            if not slot.landed:
                full = list(st.full)
                full[s] = _complete(full[s]._replace(bytes_pending=full[s].bytes_pending - 1), 1)
                slots = list(st.slots)
                slots[s] = slot._replace(landed=True)
                moves.append((f"the copy of slice {slot.slice} lands in slot {s} (full[{s}] completes phase "
                              f"{st.full[s].phase})", st._replace(full=tuple(full), slots=tuple(slots))))
        done = all(pc == len(p) for pc, p in zip(st.pcs, progs))
        if not moves and not done:
            waiting = []
            for w, prog in enumerate(progs):
                if st.pcs[w] < len(prog):
                    _, kind, s, parity, kt = prog[st.pcs[w]]
                    bar = (st.full if kind == "full" else st.empty)[s]
                    waiting.append(f"{who(w)} waits {kind}[{s}] for parity {parity} (slice {kt}), but {kind}[{s}] is "
                                   f"in phase {bar.phase} (parity {bar.phase & 1}) and nobody will complete it")
            return Verdict(False, "deadlock", "deadlock: " + "; ".join(waiting), trace_to(st, "nothing can move"),
                           len(parent))
        for what, nxt in moves:
            if nxt not in parent:
                parent[nxt] = (st, what)
                queue.append(nxt)
        if len(parent) > max_states:
            raise RuntimeError(f"more than {max_states} states: use fewer slices or warps")
    return Verdict(True, "ok", f"every interleaving of {warps} warps and the copy engine over {n} slices with "
                               f"{stages} slots is correct ({len(parent)} states)", [], len(parent))
