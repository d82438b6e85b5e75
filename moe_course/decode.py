"""Chapter 09: the MoE layer serving, in the decode regime, where a step brings 1 to 512 tokens.

A training batch gives every expert hundreds of rows, and its GEMMs wait on the tensor cores. A
decode step brings a few tokens: each active expert gets a handful of rows, yet all of its
weights must still come in from device memory. This module is the maths of that regime and the
torch reference of a layer built for it; the kernels come later (``kernels/09_*.cu``).

1. **Active experts** (:func:`expected_active_experts`, derived; :func:`simulated_active_experts`
   and :func:`active_experts`, counted): how many of the ``E`` experts a step of ``T`` tokens
   wakes, and so how many experts' weights it must read.
2. **Traffic, work and the bound** (:func:`decode_step`, :class:`DecodeStep`): the bytes a step
   must move (the tokens, each active expert's weights read once, the outputs) and its FLOPs,
   per projection and for the whole layer; its arithmetic intensity against the balance point of
   the ceilings (:class:`moe_course.ceilings.Ceilings`); the time no implementation can beat,
   ``max(bytes / copy bandwidth, FLOPs / matmul rate)``.
3. **The fixed-capacity "masked" layout** (:func:`masked_layout`): each expert owns ``C`` slots
   at fixed addresses, filled by a scatter whose positions come from a running sum, so that the
   whole layer (:func:`masked_moe_forward`: router, experts as batched matmuls, combine) runs
   with no host synchronisation, and a CUDA graph can capture it (:func:`graphed`).
4. **Telling whether code waits for the device**: :func:`host_reads` names the torch calls that
   would, :func:`runs_on_meta` runs the code on tensors that have shapes but no values.

Notation as in :mod:`moe_course.moe`: ``T`` tokens, ``d`` model width, ``n`` expert width, ``E``
experts, ``K`` experts per token, ``C`` slots (capacity) per expert.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from . import moe
from .checks import check_choice, check_int, check_same_device, check_same_dtype, require
from .configs import expert_gemm_flops

#: The token counts of a decode step the chapter looks at (issue #20).
DECODE_TOKENS = (1, 8, 64, 256, 512)

# --------------------------------------------------------------------------------------------
# 1. Active experts


def expected_active_experts(tokens: int, num_experts: int, k: int) -> float:
    """``E * (1 - (1 - K/E)**T)``: the expected number of experts that get at least one token
    when each of ``T`` tokens picks ``K`` distinct experts uniformly at random.

    Why: a token's ``K`` distinct picks leave out a given expert with probability ``1 - K/E``;
    tokens pick independently, so an expert stays idle with probability ``(1 - K/E)**T``; summed
    over the ``E`` experts (an expectation adds up even though the experts' idleness is not
    independent). One token wakes ``K`` experts; many tokens wake nearly all ``E``.
    """
    check_int(tokens, "tokens", 0)
    check_int(num_experts, "num_experts", 1)
    check_int(k, "k", 1, num_experts, " (experts per token)")
    return num_experts * (1 - (1 - k / num_experts) ** tokens)


def random_routing(tokens: int, num_experts: int, k: int, *, trials: int = 1,
                   generator: torch.Generator | None = None) -> Tensor:
    """``(trials, T, K)`` int64: each token's ``K`` distinct experts, uniformly at random (the
    ``K`` largest of ``E`` uniform numbers: every set of ``K`` experts equally likely)."""
    check_int(tokens, "tokens", 0)
    check_int(num_experts, "num_experts", 1)
    check_int(k, "k", 1, num_experts, " (experts per token)")
    check_int(trials, "trials", 1)
    return torch.rand(trials, tokens, num_experts, generator=generator).topk(k, dim=-1).indices


def active_experts(experts: Tensor, num_experts: int) -> Tensor:
    """The experts with at least one token in a routing ``experts (..., T, K)`` -> ``(...)``
    int64, counted on the device (a one-hot, "any" over the pairs): no host read."""
    require(isinstance(experts, Tensor) and experts.dim() >= 2 and not experts.is_floating_point(),
            lambda: f"experts must be an integer tensor of expert ids shaped (..., T, K), got "
                    f"{getattr(experts, 'dtype', type(experts).__name__)} {tuple(getattr(experts, 'shape', ()))}")
    hit = experts[..., None] == torch.arange(num_experts, device=experts.device)  # (..., T, K, E)
    return hit.flatten(-3, -2).any(dim=-2).sum(dim=-1)


def simulated_active_experts(tokens: int, num_experts: int, k: int, trials: int = 64,
                             generator: torch.Generator | None = None) -> Tensor:
    """``(trials,)`` int64: the active experts of ``trials`` random routings
    (:func:`random_routing`), to hold against :func:`expected_active_experts`."""
    return active_experts(random_routing(tokens, num_experts, k, trials=trials, generator=generator), num_experts)


def rows_per_active_expert(tokens: int, num_experts: int, k: int) -> float:
    """``T*K / (expected active experts)``: the rows an active expert gets on average. In bf16
    this is about the expert's arithmetic intensity (below), the number to hold against the
    balance point."""
    return tokens * k / expected_active_experts(tokens, num_experts, k) if tokens else 0.0


# --------------------------------------------------------------------------------------------
# 2. The bytes a step must move, its FLOPs, and the time no implementation can beat

#: What :func:`decode_step` counts: one projection (a grouped GEMM) or the whole layer.
PARTS = ("up", "down", "layer")


@dataclass(frozen=True)
class DecodeStep:
    """One decode step's traffic and work.

    ``part``: one of :data:`PARTS`; ``tokens``: ``T``; ``active``: the active experts counted
    (a float where it is an expectation); ``traffic``: bytes by what they hold; ``flops``: the
    step's FLOPs (2 per multiply-add).
    """
    part: str
    tokens: int
    active: float
    traffic: dict[str, float]
    flops: float

    @property
    def bytes(self) -> float:
        return sum(self.traffic.values())

    @property
    def intensity(self) -> float:
        """FLOPs per byte of device-memory traffic."""
        return self.flops / self.bytes

    def bound_ms(self, roof) -> float:
        """The time no implementation can beat on a machine with these ceilings
        (:class:`moe_course.ceilings.Ceilings`): the longer of moving the bytes at the copy
        bandwidth and doing the FLOPs at the matmul rate. A bound from (recorded or live)
        ceilings, not a measurement."""
        return 1e3 * max(self.bytes / (roof.copy_tbps * 1e12), self.flops / (roof.matmul_tflops * 1e12))

    def limit(self, roof) -> str:
        """``"memory"`` below the ceilings' balance point (their ridge), else ``"compute"``."""
        return "memory" if self.intensity < roof.ridge_intensity else "compute"

    def attainable_tflops(self, roof) -> float:
        """The FLOP rate at the bound: where this step sits on the roofline."""
        return self.flops / (self.bound_ms(roof) * 1e-3) / 1e12

    def tbps(self, ms: float) -> float:
        """The bandwidth a measured time ``ms`` stands for, these bytes over it (TB/s): the
        chapter's measure of a decode kernel, to set against the copy ceiling."""
        return self.bytes / (ms * 1e-3) / 1e12


def decode_step(shape, tokens: int, part: str, *, active: float | None = None,
                act_bytes: int = 2, weight_bytes: int = 2) -> DecodeStep:
    """The bytes and FLOPs of one decode step of ``tokens`` tokens on ``shape`` (anything with
    ``d``, ``n``, ``E``, ``K``: a :class:`moe_course.configs.MoEConfig` or ``MoEShape``; its own
    ``T`` is not used).

    ``part``:

    - ``"up"``: the grouped GEMM ``X (T*K, d) x [W_gate | W_up] (d, 2n)`` as chapter 02 poses it:
      its rows in, each active expert's ``d x 2n`` weights read once, its ``T*K x 2n`` rows out;
    - ``"down"``: ``A (T*K, n) x W_down (n, d)``, likewise;
    - ``"layer"``: what the whole layer must move at least: the tokens ``x`` once, the router's
      weights, each active expert's three matrices once, the output ``y``. The rows between the
      steps (``T*K x n`` and ``T*K x d``, a few MB at most in decode) fit in the L2 cache and are
      not counted: a bound counts what cannot be avoided.

    ``active``: the active experts to count weights for (default: the expectation under uniform
    routing, :func:`expected_active_experts`; ``shape.E`` for an implementation that reads every
    expert). ``act_bytes``, ``weight_bytes``: bytes per value of the activations and of the
    weights (2 for bf16; weights in FP8: 1).
    """
    check_choice(part, "part", PARTS)
    check_int(tokens, "tokens", 1)
    check_int(act_bytes, "act_bytes", 1)
    check_int(weight_bytes, "weight_bytes", 1)
    d, n, E, K = shape.d, shape.n, shape.E, shape.K
    if active is None:
        active = expected_active_experts(tokens, E, K)
    require(0 <= active <= E, lambda: f"active must be between 0 and the {E} experts, got {active}")
    rows = tokens * K
    gemm = expert_gemm_flops(tokens, d, n, K)
    if part == "up":
        traffic = {"rows in (T*K x d)": rows * d * act_bytes,
                   "active experts' W_gate, W_up (d x 2n each)": active * d * 2 * n * weight_bytes,
                   "rows out (T*K x 2n)": rows * 2 * n * act_bytes}
        flops = gemm["up_fwd"]
    elif part == "down":
        traffic = {"rows in (T*K x n)": rows * n * act_bytes,
                   "active experts' W_down (n x d each)": active * n * d * weight_bytes,
                   "rows out (T*K x d)": rows * d * act_bytes}
        flops = gemm["down_fwd"]
    else:
        traffic = {"tokens x (T x d)": tokens * d * act_bytes,
                   "router weights (d x E)": d * E * act_bytes,
                   "active experts' weights (3 d n each)": active * 3 * d * n * weight_bytes,
                   "output y (T x d)": tokens * d * act_bytes}
        flops = 2 * tokens * d * E + gemm["fwd"]
    return DecodeStep(part, tokens, float(active), traffic, float(flops))


# --------------------------------------------------------------------------------------------
# 3. The fixed-capacity "masked" layout, and the layer on it with no host synchronisation


class MaskedLayout(NamedTuple):
    """Each expert's ``C`` slots and what they hold (:func:`masked_layout`).

    - ``slot_token``: ``(E, C)`` int64, the token in each slot; 0 in an empty slot (any real row
      does: an empty slot's result is never read)
    - ``valid``: ``(E, C)`` bool, the slots that hold a pair: expert ``e``'s first
      ``min(counts[e], C)`` (the mask a kernel reads as one count per expert)
    - ``counts``: ``(E,)`` int64, the pairs routed to each expert (those past ``C`` are dropped)
    - ``pair_slot``: ``(T, K)`` int64, each (token, expert) pair's slot in the flattened
      ``E*C`` slots; ``E*C``, a spare slot past the last, for a pair that did not fit
    - ``dropped``: ``()`` int64, the pairs that did not fit (0 when ``C >= T``); a tensor on the
      device, read only outside the step (:func:`check_no_overflow`)
    """
    slot_token: Tensor
    valid: Tensor
    counts: Tensor
    pair_slot: Tensor
    dropped: Tensor

    @property
    def capacity(self) -> int:
        return self.slot_token.shape[1]


def slots_of_pairs(experts: Tensor, position: Tensor, capacity: int, num_experts: int) -> tuple[Tensor, Tensor]:
    """Where each pair goes: ``(pair_slot, kept)``, both ``(T, K)``. Pair ``(t, j)`` of expert
    ``e`` at place ``p`` in its queue takes slot ``e*C + p`` if ``p < C``; otherwise it is dropped
    and sent to the spare slot ``E*C``. That mask is the one line not to forget: without it a pair
    past ``C`` lands in the next expert's first slots."""
    kept = position < capacity
    return torch.where(kept, experts * capacity + position, num_experts * capacity), kept


def masked_layout(experts: Tensor, num_experts: int, capacity: int | None = None) -> MaskedLayout:
    """The masked layout of a routing ``experts (T, K)``: each expert gets ``C`` slots, ``C =
    capacity`` or, by default, ``T``.

    ``C = T`` can never overflow: a token's ``K`` experts are distinct, so an expert gets at most
    one pair per token (``T*K`` is the pairs of all experts together, never one expert's). Its
    price is memory, ``E*C`` slots for ``T*K`` pairs (``E/K`` times more); a smaller ``C`` drops the
    pairs past it (GShard's order, as :func:`moe_course.moe.drop_tokens`) and says how many in
    ``dropped``. ``C`` larger than ``T`` is fine: one graph captured at the largest batch serves
    every smaller one.

    Every step is a fixed-shape tensor operation: each pair's place in its expert's queue is a
    running sum over a one-hot (:func:`moe_course.moe.expert_queues`), the slots are filled by a
    scatter; no ``bincount``, no sort, no value read back.
    """
    require(isinstance(experts, Tensor) and experts.dim() == 2 and not experts.is_floating_point(),
            lambda: f"experts must be an integer tensor of expert ids shaped (T, K), got "
                    f"{getattr(experts, 'dtype', type(experts).__name__)} {tuple(getattr(experts, 'shape', ()))}")
    tokens, k = experts.shape
    check_int(num_experts, "num_experts", 1)
    capacity = tokens if capacity is None else check_int(capacity, "capacity", 1, what=" (slots per expert)")
    experts = experts.long()
    position, counts = moe.expert_queues(experts, num_experts)
    pair_slot, kept = slots_of_pairs(experts, position, capacity, num_experts)
    token_of_pair = torch.arange(tokens, device=experts.device)[:, None].expand(tokens, k)
    spare = num_experts * capacity
    slot_token = torch.zeros(spare + 1, dtype=torch.long, device=experts.device)
    slot_token.scatter_(0, pair_slot.reshape(-1), token_of_pair.reshape(-1))  # the dropped all land on the spare
    valid = torch.arange(capacity, device=experts.device) < counts[:, None]  # each expert's filled prefix
    return MaskedLayout(slot_token[:spare].view(num_experts, capacity), valid, counts, pair_slot, (~kept).sum())


def masked_experts(x: Tensor, layout: MaskedLayout, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """Every expert's SwiGLU on all its ``C`` slots: ``(E, C, d)``, three batched matmuls.

    The honest sync-free baseline in torch: ``(E, C)`` fixes every shape, so nothing is read
    back. Its price: the batched matmul computes every slot, empty ones included, and reads every
    expert's weights, idle ones included (at ``T = 1``, DeepSeek-V3 wakes 8 of its 256). Skipping
    them takes the counts, which torch could use only on the host; a kernel reads them on the
    device (each block reads its expert's count and leaves at once when its rows are empty).
    Empty slots' rows are zeros (the mask), so their outputs are zeros too."""
    if x.shape[0] == 0:  # no token to gather, every slot empty (a shape, known on the host)
        return x.new_zeros(*layout.slot_token.shape, w_down.shape[2])
    rows = torch.where(layout.valid[..., None], x[layout.slot_token], 0)  # (E, C, d)
    return torch.bmm(F.silu(torch.bmm(rows, w_gate)) * torch.bmm(rows, w_up), w_down)


def masked_combine(y_slots: Tensor, layout: MaskedLayout, weights: Tensor) -> Tensor:
    """Each token gathers its ``K`` slots' rows and sums them, weighted by the router:
    ``(E, C, d)``, ``weights (T, K)`` -> ``(T, d)``. A gather, not a scatter: no atomics, the same
    order every run. A dropped pair reads the spare slot, a row of zeros."""
    E, C, d = y_slots.shape
    return combine_rows(torch.cat([y_slots.reshape(E * C, d), y_slots.new_zeros(1, d)]), layout, weights)


def combine_rows(rows: Tensor, layout: MaskedLayout, weights: Tensor) -> Tensor:
    """:func:`masked_combine` on the slots' rows with the spare one already after them:
    ``rows (E * C + 1, d)``, the last row zero."""
    return torch.einsum("tk,tkd->td", weights.to(rows.dtype), rows[layout.pair_slot])


class DecodeOutput(NamedTuple):
    """One decode step of :func:`masked_moe_forward`: ``y (T, d)``; the routing, ``weights
    (T, K)`` float32 and ``experts (T, K)`` int64; and its :class:`MaskedLayout`."""
    y: Tensor
    weights: Tensor
    experts: Tensor
    layout: MaskedLayout


def masked_moe_forward(x: Tensor, w: moe.MoEWeights, k: int, *, capacity: int | None = None) -> DecodeOutput:
    """The decode MoE layer on the masked layout, with no host synchronisation anywhere:
    chapter 01's maths (``topk_softmax`` router, SwiGLU experts, weighted combine), so its output
    is :func:`moe_course.moe.moe_forward`'s. ``x (T, d)`` -> :class:`DecodeOutput`.

    ``capacity``: the slots per expert (default ``T``: nothing can be dropped; see
    :func:`masked_layout`). The checks look at shapes, dtypes and devices only: a check of values
    (NaN logits, ids in range) would read them back, which a captured step cannot do.
    """
    require(isinstance(w, moe.MoEWeights), lambda: f"w must be moe.MoEWeights, got {type(w).__name__}", TypeError)
    require(isinstance(x, Tensor) and x.dim() == 2,
            lambda: f"x must be the step's tokens, a tensor shaped (T, d), got "
                    f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    named = {"x": x, "w_router": w.w_router, "w_gate": w.w_gate, "w_up": w.w_up, "w_down": w.w_down}
    check_same_device(named)
    check_same_dtype(named)
    logits = moe.router_logits(x, w.w_router)  # (checks x's width against the router's)
    moe._check_expert_weights(w.w_gate, w.w_up, w.w_down, x.shape[1])
    check_int(k, "k", 1, w.num_experts, " (experts per token)")
    weights, experts = moe.topk_softmax(logits, k, validate=False)
    layout = masked_layout(experts, w.num_experts, capacity)
    y_slots = masked_experts(x, layout, w.w_gate, w.w_up, w.w_down)
    return DecodeOutput(masked_combine(y_slots, layout, weights), weights, experts, layout)


def check_no_overflow(layout: MaskedLayout) -> None:
    """Refuse a step whose experts got more pairs than their ``C`` slots (their outputs would
    miss those pairs). Reads the counts back: call it outside a captured step."""
    dropped = int(layout.dropped)
    if dropped:
        fullest = int(layout.counts.argmax())
        require(False, f"capacity {layout.capacity} is too small for this step: expert {fullest} got "
                       f"{int(layout.counts[fullest])} tokens and {dropped} (token, expert) pairs were dropped; "
                       f"leave capacity out (C = T, which cannot overflow) or raise it")


def masked_memory(shape, tokens: int, capacity: int | None = None, act_bytes: int = 2) -> dict[str, int]:
    """Bytes the torch layer on the masked layout allocates for one step of ``tokens`` tokens
    (``shape`` as in :func:`decode_step`; ``capacity`` as in :func:`masked_layout`), by tensor.
    Everything is ``E*C`` rows where the pairs are ``T*K``. A kernel that gathers the tokens' rows
    inside its loads keeps only the slot table and the rows it writes."""
    C = tokens if capacity is None else capacity
    slots = shape.E * C
    return {"slot table (E x C, int64)": 8 * slots,
            "gathered rows (E x C x d)": act_bytes * slots * shape.d,
            "gate, up and silu(gate) * up (E x C x n, three)": act_bytes * 3 * slots * shape.n,
            "expert outputs (E x C x d)": act_bytes * slots * shape.d}


# --------------------------------------------------------------------------------------------
# 4. Does it wait for the device? Named calls, the meta device, a CUDA graph

#: torch calls after which the host must wait for the device (on a GPU, a synchronisation): a
#: value read back, or a result whose size depends on values (the host must read it to allocate).
HOST_READS = {
    Tensor.item: "Tensor.item", Tensor.tolist: "Tensor.tolist", Tensor.numpy: "Tensor.numpy",
    Tensor.__bool__: "bool(tensor)", Tensor.__int__: "int(tensor)", Tensor.__float__: "float(tensor)",
    Tensor.__index__: "a tensor used as a Python index",
    torch.bincount: "torch.bincount", Tensor.bincount: "Tensor.bincount",
    torch.nonzero: "torch.nonzero", Tensor.nonzero: "Tensor.nonzero", torch.argwhere: "torch.argwhere",
    torch.unique: "torch.unique", Tensor.unique: "Tensor.unique",
    torch.masked_select: "torch.masked_select", Tensor.masked_select: "Tensor.masked_select",
    torch.repeat_interleave: "torch.repeat_interleave", Tensor.repeat_interleave: "Tensor.repeat_interleave",
}


def _bool_mask_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, Tensor) and p.dtype == torch.bool and p.dim() > 0 for p in parts)


class _HostReadWatch(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = HOST_READS.get(func)
        if name is None and func is Tensor.__getitem__ and _bool_mask_index(args):
            name = "a boolean mask as an index"
        if name is None and func is torch.where and len(args) + len(kwargs or {}) == 1:
            name = "torch.where(condition) (nonzero)"
        if name is not None:
            self.found.append(name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_reads():
    """``with host_reads() as found: ...``: ``found``, a list, gets the name of every call in
    :data:`HOST_READS` (and boolean-mask indexing) made in the block, in order. It sees calls made
    through torch's Python interface, not what an operator does inside C++: :func:`runs_on_meta`
    is the wider test."""
    watch = _HostReadWatch()
    with watch:
        yield watch.found


def _to_meta(value):
    if isinstance(value, Tensor):
        return value.to("meta")
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple of tensors (MoEWeights)
        return type(value)(*(_to_meta(v) for v in value))
    return value


def runs_on_meta(fn: Callable, *args, **kwargs) -> str | None:
    """Run ``fn`` with its tensor arguments moved to torch's meta device (tensors with a shape and
    a dtype but no values): ``None`` if it ran, else the first line of why not. Code that runs
    there reads no value back and makes no tensor whose size depends on values: every shape
    follows from the inputs' shapes, as a CUDA graph needs."""
    try:
        fn(*(_to_meta(a) for a in args), **{k: _to_meta(v) for k, v in kwargs.items()})
    except (RuntimeError, NotImplementedError) as exc:
        return str(exc).strip().splitlines()[0]
    return None


def graphed(step: Callable[[], Tensor], warmup: int = 2) -> tuple[torch.cuda.CUDAGraph, Tensor]:
    """Capture ``step()`` (a call on fixed input tensors, returning one tensor) in a CUDA graph,
    after ``warmup`` calls on a side stream (as torch asks: first calls pick algorithms and
    allocate). Returns the graph and its output tensor: copy new values into the inputs,
    ``graph.replay()``, read the output. Needs a GPU, and a step with no host synchronisation."""
    require(torch.cuda.is_available(), "capturing a CUDA graph needs a GPU that torch can use", RuntimeError)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


# --------------------------------------------------------------------------------------------
# 5. Checked against chapter 01's layer at the awkward steps


class Case(NamedTuple):
    """One awkward decode step: ``tokens`` tokens of width ``d``, experts ``n`` wide, ``E`` experts,
    top-``K``; ``routing`` "random" (the router's, on random weights) or "one expert" (every
    token's first choice is :data:`HOT_EXPERT`); ``capacity`` as :func:`masked_layout` takes it."""
    name: str
    tokens: int
    d: int
    n: int
    E: int
    K: int
    routing: str = "random"
    capacity: int | None = None


#: The expert that "one expert" cases send every token to. Not the last: a pair that overflows it
#: without the mask (:func:`slots_of_pairs`) lands, silently, in the next expert's slots.
HOT_EXPERT = 1

#: The steps the layer is checked at (issue #20): 1, 2, 7, 64 and 511 tokens, idle experts, every
#: token on one expert, a capacity that overflows and one larger than the step; at 256 slots, sparse
#: experts (where the layer runs 09_3) with and without one expert holding every token.
CHECK_CASES = (
    Case("1 token: all but K experts idle", 1, 32, 16, 16, 2),
    Case("2 tokens", 2, 32, 16, 16, 4),
    Case("7 tokens, top-1: idle experts", 7, 32, 16, 16, 1),
    Case("64 tokens", 64, 32, 16, 8, 2),
    Case("511 tokens", 511, 32, 16, 16, 4),
    Case("300 tokens over 64 experts, top-2: sparse experts", 300, 32, 16, 64, 2),
    Case("200 tokens, every one on one of 64 experts", 200, 32, 16, 64, 2, "one expert"),
    Case("every token on one expert", 64, 32, 16, 8, 2, "one expert"),
    Case("every token on one expert, top-1", 7, 32, 16, 8, 1, "one expert"),
    Case("capacity 16 under 64 tokens on one expert: pairs dropped", 64, 32, 16, 8, 2, "one expert", 16),
    Case("capacity 32 over 7 tokens", 7, 32, 16, 8, 2, capacity=32),
)


def case_inputs(case: Case, dtype=torch.float64, seed: int = 0) -> tuple[Tensor, moe.MoEWeights]:
    """The tokens ``x (T, d)`` and random weights of ``case``. For "one expert": feature 0 of
    every token is at least 4, and :data:`HOT_EXPERT`'s router logit is that feature alone, while
    the others' logits, which ignore it, are about standard normal: every token's first choice is
    the hot expert, and its other choices still weigh a few percent (not nothing, so that the
    check sees them)."""
    check_choice(case.routing, "routing", ("random", "one expert"))
    g = torch.Generator().manual_seed(seed)
    w = moe.random_weights(case.d, case.n, case.E, dtype=dtype, generator=g)
    x = torch.randn(case.tokens, case.d, generator=g).to(dtype)
    if case.routing == "one expert":
        x[:, 0] = 4 + x[:, 0].abs()
        w.w_router[0, :] = 0
        w.w_router[:, HOT_EXPERT] = 0
        w.w_router[0, HOT_EXPERT] = 1
    return x, w


def reference_forward(x: Tensor, w: moe.MoEWeights, k: int, capacity: int | None = None) -> Tensor:
    """Chapter 01's layer (:func:`moe_course.moe.moe_forward`: a loop over the experts, reading
    the counts back) on the same step; with a ``capacity`` under ``T``, its token dropping set to
    that capacity (the same queue order)."""
    tokens, num_experts = x.shape[0], w.num_experts
    if capacity is None or capacity >= tokens:
        return moe.moe_forward(x, w, k).y
    factor = capacity * num_experts / (tokens * k)
    require(moe.expert_capacity(tokens, num_experts, k, factor) == capacity,
            lambda: f"capacity {capacity} is not one that chapter 01's capacity factor gives for T={tokens}, "
                    f"E={num_experts}, k={k}")
    return moe.moe_forward(x, w, k, capacity_factor=factor).y


#: Tolerances of the check, by dtype: the two layers add the same products in different orders.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def check_against_chapter01(case: Case, layer: Callable = masked_moe_forward, dtype=torch.float64,
                            seed: int = 0) -> float:
    """Run ``layer`` (:func:`masked_moe_forward`'s arguments and result) on ``case`` and check its
    output against :func:`reference_forward`. Raises :class:`moe_course.checking.CheckFailed`
    naming the case; returns the relative error."""
    from .checking import check_close, relative_error

    x, w = case_inputs(case, dtype, seed)
    got = layer(x, w, case.K, capacity=case.capacity).y
    want = reference_forward(x, w, case.K, case.capacity)
    tolerance = TOLERANCE.get(dtype, 1e-2)
    check_close(f"y ({case.name}, {str(dtype).removeprefix('torch.')})", got, want, rtol=tolerance, atol=tolerance)
    return relative_error(got, want)


# --------------------------------------------------------------------------------------------
# 6. The step on the course's decode kernels (kernels/09_1_decode_swap_ab.cu, 09_2), a Hopper GPU


class DecodeWeights(NamedTuple):
    """A layer's weights as 09_1 and 09_2 read them (both projections ``[E, N, K]``, K contiguous), made
    once: serving does not change them between steps. ``w_router (d, E)``; ``w_gate_up (E, 2n,
    d)``: each expert's n gate rows, then its n up rows; ``w_down (E, d, n)``."""
    w_router: Tensor
    w_gate_up: Tensor
    w_down: Tensor


def prepare(w: moe.MoEWeights, dtype=torch.bfloat16) -> DecodeWeights:
    """Chapter 01's weights (``w_gate``, ``w_up`` ``(E, d, n)``, ``w_down`` ``(E, n, d)``) in
    09_1's and 09_2's layout and ``dtype``: one copy, before the first step."""
    gate_up = torch.cat((w.w_gate.transpose(1, 2), w.w_up.transpose(1, 2)), dim=1)
    return DecodeWeights(w.w_router.to(dtype), gate_up.to(dtype).contiguous(),
                         w.w_down.transpose(1, 2).to(dtype).contiguous())


def kernel_capacity(tokens: int) -> int:
    """The token slots per expert 09_1 and 09_2 are built for: the smallest of
    :data:`moe_course.launch.DECODE_SLOTS` that holds ``tokens`` (an expert gets at most one pair
    per token, so nothing can drop), or the largest, 256, past it (a step of more tokens then
    drops what an expert gets past 256: :func:`check_no_overflow` says so, outside the step)."""
    from .launch import DECODE_SLOTS

    check_int(tokens, "tokens", 0)
    return next((c for c in DECODE_SLOTS if c >= tokens), DECODE_SLOTS[-1])


#: Rows an active expert gets on average from which 09_2 takes chunks of 64 slots: with experts
#: that full, chunks of 32 run many narrow wgmma chains on a step near the ridge (Mixtral at 512
#: tokens, 128 rows an expert, H100: chunks of 32 74% of the copy rate, 09_1's one chain of 256
#: 84%, chunks of 64 89%); below it, chunks of 32 skip more empty slots (7B at 512 tokens, 32
#: rows an expert: 80% against 78%, 09_1 55%).
FULL_EXPERT_ROWS = 64


def gemm_chunk(tokens: int, capacity: int, num_experts: int, k: int) -> int:
    """09_2's chunk of token slots for a step, from numbers the host has (no read back): 64 where
    the capacity holds more than 64 slots and an active expert gets :data:`FULL_EXPERT_ROWS` rows
    or more on average (``T K / E``), else 32 (at 32 slots or fewer one chunk: 09_1's maths)."""
    from .launch import DECODE_CHUNK, DECODE_WIDE_CHUNK, DECODE_WIDE_CHUNK_STEPS

    full = capacity in DECODE_WIDE_CHUNK_STEPS and tokens * k >= FULL_EXPERT_ROWS * num_experts
    return DECODE_WIDE_CHUNK if full else DECODE_CHUNK


def gemm_step(tokens: int, capacity: int, num_experts: int, k: int) -> int:
    """The chapter-09 kernel a step's expert GEMMs run on, from numbers the host has: 3 (09_3,
    the slots split over blocks of ``launch.DECODE_SPLIT_SLOTS``) where the capacity holds more
    slots than one such block and the experts are sparse (:func:`gemm_chunk` gives chunks of 32:
    an expert's W is read by only one or two of its blocks), else 2 (09_2 in :func:`gemm_chunk`'s
    chunks: small capacities, where 09_2 already fits two blocks an SM, and full experts, whose W
    09_3 would read once per block)."""
    from .launch import DECODE_CHUNK, DECODE_SPLIT_STEPS

    sparse = gemm_chunk(tokens, capacity, num_experts, k) == DECODE_CHUNK
    return 3 if capacity in DECODE_SPLIT_STEPS and sparse else 2


def route(x: Tensor, w_router: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The router of the decode layers on a GPU (09_2's and the ``torch._grouped_mm`` one, so both
    route alike): logits in float32 at least (a small product), top-k softmax, no value read
    back. Returns ``(weights, experts)``, each ``(T, k)``."""
    acc = torch.promote_types(x.dtype, torch.float32)
    return moe.topk_softmax(moe.router_logits(x.to(acc), w_router.to(acc)), k, validate=False)


def masked_moe_forward_kernel(x: Tensor, w: DecodeWeights | moe.MoEWeights, k: int, *, capacity: int | None = None,
                              step: int | None = None, chunk: int | None = None) -> DecodeOutput:
    """:func:`masked_moe_forward` with its expert products on chapter 09's kernels: ``step`` 1
    (09_1), 2 (09_2, in chunks of ``chunk`` slots, default :func:`gemm_chunk`'s) or 3 (09_3);
    default :func:`gemm_step`'s. The router and the masked
    layout in torch (no value read back), the up-projection ``[gate; up]`` in one launch, SwiGLU
    in torch, the down-projection in a second launch, the combine in torch. Each launch reads the
    experts' counts on the device: an idle expert's weights are never read, and the whole step
    can be captured in a CUDA graph (:func:`graphed`). ``x (T, d)`` bf16 on a Hopper GPU; ``w``:
    :func:`prepare`'s (or chapter 01's, prepared on each call); ``capacity``: one of
    :data:`moe_course.launch.DECODE_SLOTS` (default :func:`kernel_capacity`)."""
    from . import launch

    if isinstance(w, moe.MoEWeights):
        w = prepare(w, x.dtype)
    require(isinstance(w, DecodeWeights), lambda: f"w must be DecodeWeights or moe.MoEWeights, got {type(w).__name__}",
            TypeError)
    tokens = x.shape[0]
    E, two_n, d = w.w_gate_up.shape
    acc = torch.promote_types(x.dtype, torch.float32)  # SwiGLU runs in float32 at least, as the router
    weights, experts = route(x, w.w_router, k)
    layout = masked_layout(experts, E, kernel_capacity(tokens) if capacity is None else capacity)
    C, spare = layout.capacity, E * layout.capacity
    count = layout.counts.clamp(max=C).to(torch.int32)
    if step is None:
        step = gemm_step(tokens, C, E, k)
    if step == 2 and chunk is None:
        chunk = gemm_chunk(tokens, C, E, k)
    # The glue works on the T k pairs' rows, not on all E x C slots, E / k times more (session 17's
    # glue gathered and ran SwiGLU in float32 over every slot: its layer took 2.4x chapter 06's on
    # 7B at 64 tokens, H200). Each buffer is the E x C slots' rows and, after them, the spare row a
    # dropped pair reads.
    pairs = layout.pair_slot.reshape(-1)  # (T k,): pair (t, j)'s slot, or the spare one
    n, like = two_n // 2, {"dtype": x.dtype, "device": x.device}
    # The kernels read whole chunks of slots, so the rows past an expert's count up to its chunk's
    # end are read as well (their columns of the product are never stored): reading memory nothing
    # wrote is an error (compute-sanitizer's initcheck), so the inputs' rows start at zero, one
    # memset, before each pair's row is copied in (the dropped ones onto the spare row, never read).
    x_rows = torch.zeros(spare + 1, d, **like)
    x_rows[pairs] = x[:, None].expand(tokens, k, d).reshape(tokens * k, d)
    # The kernels write the filled slots alone, and each pair reads back its own slot (a filled one)
    # or the spare row: the outputs need no memset, only that row zeroed (for y_rows, what a dropped
    # pair adds; for h_rows, so that its SwiGLU, which lands on a_rows' spare row, reads written memory).
    h_rows = torch.empty(spare + 1, two_n, **like)
    h_rows[spare] = 0
    launch.decode_grouped_gemm(x_rows[:spare].view(E, C, d), w.w_gate_up, count, out=h_rows[:spare].view(E, C, two_n),
                               step=step, chunk=chunk)
    gate, up = h_rows[pairs].to(acc).split(n, dim=-1)  # (T k, n) each: the pairs' rows only
    a_rows = torch.zeros(spare + 1, n, **like)  # read in whole chunks by the down-projection, as x_rows
    a_rows[pairs] = (F.silu(gate) * up).to(x.dtype)
    y_rows = torch.empty(spare + 1, d, **like)
    y_rows[spare] = 0
    launch.decode_grouped_gemm(a_rows[:spare].view(E, C, n), w.w_down, count,
                               out=y_rows[:spare].view(E, C, d), step=step, chunk=chunk)
    return DecodeOutput(combine_rows(y_rows, layout, weights), weights, experts, layout)


def grouped_mm_forward(x: Tensor, w: DecodeWeights, k: int) -> Tensor:
    """The decode layer as a torch user would write it on ``torch._grouped_mm``, with no host
    synchronisation (so it too can be captured in a CUDA graph): the same router as
    :func:`masked_moe_forward_kernel`, the (token, expert) pairs sorted by expert (a stable
    argsort; the counts by ``scatter_add_``, not ``bincount``, which reads its size back), both
    projections by ``torch._grouped_mm`` on the sorted rows, SwiGLU, and the weighted sum back
    to the tokens by ``index_add_``. ``x (T, d)``; ``w``: :func:`prepare`'s. Returns ``y (T, d)``."""
    tokens = x.shape[0]
    E, two_n, d = w.w_gate_up.shape
    acc = torch.promote_types(x.dtype, torch.float32)
    weights, experts = route(x, w.w_router, k)
    order = experts.reshape(-1).argsort(stable=True)  # pairs sorted by expert, in token order within one
    token = order // k
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
        0, experts.reshape(-1), torch.ones(tokens * k, dtype=torch.int32, device=x.device))
    offs = counts.cumsum(0, dtype=torch.int32)
    h = torch._grouped_mm(x[token], w.w_gate_up.transpose(1, 2), offs=offs)  # (T k, 2n)
    gate, up = h.to(acc).split(two_n // 2, dim=-1)
    y = torch._grouped_mm((F.silu(gate) * up).to(x.dtype), w.w_down.transpose(1, 2), offs=offs)  # (T k, d)
    out = torch.zeros(tokens, d, dtype=acc, device=x.device)
    return out.index_add_(0, token, y.to(acc) * weights.reshape(-1)[order, None]).to(x.dtype)


#: The record of benchmarks/bench_decode.py: the course's decode GEMMs against torch._grouped_mm
#: per shape, projection and step size.
GEMM_KIND = "decode_gemm"
#: Its contenders, as bench_decode.py names them: each replayed from a CUDA graph (as a serving
#: engine runs a step: the host's launch cost paid once), and the two fastest eager too (where
#: the host's cost per launch shows: ~80 µs for a course launch, ~23 for torch's, H200). Records
#: of session 14 and before hold "09_1" and "grouped_mm" eager only. "09_2/64": 09_2 in chunks of 64
#: slots (at 128 and 256 slots: ``launch.DECODE_WIDE_CHUNK_STEPS``), what the layer runs for full experts;
#: "09_3" (at 128 and 256 slots; records of session 18 on): what it runs for sparse ones there.
#: "vLLM, graph" (where it could run; records of session 20 on): vLLM's fused_moe_kernel on the same
#: rows (:mod:`moe_course.vllm_moe`). "copy, graph" (session 20 on) is no contender but the reference
#: at the step's size: a device copy of its bytes, replayed and timed the same way (launch and ramp
#: included).
GEMM_CONTENDERS = ("09_2, graph", "09_2/64, graph", "09_3, graph", "09_1, graph", "grouped_mm, graph", "vLLM, graph",
                   "09_2", "09_1", "grouped_mm", "copy, graph")


def course_gemm(row: dict) -> str:
    """The course's contender in a "decode_gemm" row: the graph of the kernel the layer runs at that
    step (:func:`gemm_step`'s, 09_2 in :func:`gemm_chunk`'s chunks; in records before 09_3 or chunks
    of 64 were timed, what the layer then ran: 09_2, or 09_1 for full experts), where those were
    measured; else the fastest 09_*."""
    if "09_1, graph" in row and "09_2, graph" in row:
        from .configs import by_name
        from .launch import DECODE_WIDE_CHUNK

        cfg = by_name(row["shape"])
        args = row["tokens"], row["capacity"], cfg.E, cfg.K
        if gemm_step(*args) == 3 and "09_3, graph" in row:
            return "09_3, graph"
        if gemm_chunk(*args) == DECODE_WIDE_CHUNK:
            return "09_2/64, graph" if "09_2/64, graph" in row else "09_1, graph"
        return "09_2, graph"
    return min((n for n in GEMM_CONTENDERS if n.startswith("09_") and n in row), key=lambda n: row[n]["ms"])


def torch_gemm(row: dict) -> str:
    """torch's contender in a "decode_gemm" row: its graph-replayed time where measured (the
    course's best is a graph too), else the eager one."""
    return "grouped_mm, graph" if "grouped_mm, graph" in row else "grouped_mm"


def gemm_table(data: dict) -> str:
    """A "decode_gemm" record's rows as text: µs and fraction of the device copy for each
    contender measured, and the course's (:func:`course_gemm`) over torch's (:func:`torch_gemm`)."""
    names = [n for n in GEMM_CONTENDERS if any(n in row for row in data["rows"])]
    lines = [f"{'shape':<16}{'proj':>5}{'T':>5}{'active':>7}" + "".join(f"{n + ' µs':>22}{'of copy':>8}" for n in names)
             + f"{'course':>14}{'speed-up':>9}"]
    for row in data["rows"]:
        cells = "".join(f"{1e3 * row[n]['ms']:>22.1f}{row[n]['of_copy']:>8.0%}" if n in row else f"{'-':>30}"
                        for n in names)
        ours, theirs = course_gemm(row), torch_gemm(row)
        lines.append(f"{row['shape']:<16}{row['proj']:>5}{row['tokens']:>5}{row['active']:>7}{cells}"
                     f"{ours:>14}{row[theirs]['ms'] / row[ours]['ms']:>8.2f}x")
    return "\n".join(lines)


#: The record of bench_decode.py's layer part: the whole decode layer, the course's graph-replayed
#: against the torch._grouped_mm layer, graph-replayed and eager.
LAYER_KIND = "decode_layer"
#: The whole decode layer, timed: on chapter 09's kernels as :func:`gemm_step` picks them ("09 layer";
#: records of session 17: "09_2 layer", 09_2 alone; of session 14 and before: 09_1), masked slots,
#: on chapter 06's training kernels (the
#: same launches as :func:`moe_course.layer.forward`: rows sorted by expert, 03_4's gathered
#: up-projection with SwiGLU, 03_2, 06_4's combine), both graph-replayed; the torch._grouped_mm
#: layer graph-replayed and eager; vLLM's ``fused_experts`` behind the same router, graph-replayed
#: (where it could run; records of session 20 on).
LAYER_CONTENDERS = ("09 layer, graph", "09_2 layer, graph", "09_1 layer, graph", "06 layer, graph",
                    "grouped_mm layer, graph", "vLLM layer, graph", "grouped_mm layer, eager")
COURSE_LAYERS = ("09 layer, graph", "09_2 layer, graph", "09_1 layer, graph", "06 layer, graph")
LAYER_MINIMUM = 1.3  # issue 20: the graph-replayed course layer over the grouped_mm layer at 64 tokens


def course_layer_ms(row: dict) -> float:
    """The course's decode layer in a "decode_layer" row: the fastest of those measured."""
    return min(row[n]["ms"] for n in COURSE_LAYERS if n in row)


def layer_table(data: dict) -> str:
    """A "decode_layer" record's rows as text: µs and fraction of the device copy (over the
    step's bytes, :func:`decode_step`'s "layer" with the active experts counted) per contender,
    and the course layer's speed-up (the fastest of its own) over the graph-replayed grouped_mm layer."""
    names = [n for n in LAYER_CONTENDERS if any(n in row for row in data["rows"])]
    lines = [f"{'shape':<16}{'T':>5}{'active':>7}" + "".join(f"{name + ' µs':>28}{'of copy':>8}"
                                                            for name in names) + f"{'speed-up':>9}"]
    for row in data["rows"]:
        cells = "".join(f"{1e3 * row[n]['ms']:>28.1f}{row[n]['of_copy']:>8.0%}" if n in row else f"{'-':>36}"
                        for n in names)
        speedup = row["grouped_mm layer, graph"]["ms"] / course_layer_ms(row)
        lines.append(f"{row['shape']:<16}{row['tokens']:>5}{row['active']:>7}{cells}{speedup:>8.2f}x")
    return "\n".join(lines)
