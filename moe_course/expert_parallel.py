"""Chapter 08: expert parallelism. The experts of one MoE layer spread over several GPUs, each
GPU (a *rank*) holding ``E / world`` of them, and the tokens sent to their experts and back.

1. **Who holds what** (:func:`experts_of`, :func:`owner`): rank ``r`` holds experts
   ``r * E_local .. (r + 1) * E_local - 1``, so the rows of one rank's routing, sorted by
   expert, are already grouped by the rank they go to.
2. **The routing, as rows** (:func:`route_rows`): each rank routes its own tokens with the
   router it shares with every rank: chapter 01's top-K or chapter 04's token rounding, decided
   on each rank's tokens (every expert's rows *from each rank* whole tiles) or on the whole
   batch (the probabilities gathered from every rank: the decision one process would make).
3. **Dispatch and combine** (:func:`moe_forward`): two all-to-alls per layer through
   ``torch.distributed`` (NCCL between GPUs, gloo on a CPU). First the counts (how many rows each
   rank sends each other rank: one small all-to-all whose result the host must read, since the
   payload's split sizes are host numbers: the host waits for the device there), then the rows; the local experts run on them
   (chapter 10's backend: the course's kernels on a Hopper GPU, the torch maths elsewhere); the
   outputs go back by the same all-to-all with the splits swapped, and each rank sums its
   tokens' rows with their routing weights.
4. **The backward** (:class:`AllToAll`): the gradient of an all-to-all is the all-to-all of the
   gradient with the splits swapped, so autograd runs the layer backward through the same two
   exchanges. The router is replicated: its gradient is each rank's share, summed over ranks as
   data parallelism sums any replicated weight's.
5. **Overlap** (:func:`moe_forward_overlapped`, inference): the tokens in chunks, the exchange
   of one chunk in flight while the experts work on the one before.
6. **A model of it** (:func:`predict`): bytes per token and layer, the share that leaves the
   rank (over NVLink inside a node, over the network between nodes), against the expert GEMMs'
   time, for 1 to many GPUs.

:func:`run_check` spawns ``world`` processes on this machine (gloo, CPU) and checks the sharded
layer against chapter 01's (top-K) or chapter 04's (token rounding) single-process layer:
outputs and every gradient.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import configs, moe
from . import token_rounding as tr
from .checks import check_int, require

#: The routings :func:`route_rows` takes: chapter 01's top-K, chapter 04's token rounding.
ROUTINGS = ("top-K", "nearest", "up", "down")


# --------------------------------------------------------------------------------------------
# 1. Who holds what


def experts_per_rank(num_experts: int, world: int) -> int:
    """``E / world``: every rank holds the same number of experts."""
    check_int(world, "world", 1)
    require(num_experts % world == 0,
            f"{num_experts} experts do not split evenly over {world} ranks: choose a world size that divides E")
    return num_experts // world


def experts_of(rank: int, world: int, num_experts: int) -> range:
    """The experts rank ``rank`` holds: a contiguous block of ``E / world``."""
    per = experts_per_rank(num_experts, world)
    check_int(rank, "rank", 0, world - 1)
    return range(rank * per, (rank + 1) * per)


def owner(expert_ids: Tensor, per_rank: int) -> Tensor:
    """The rank that holds each expert id."""
    return expert_ids // per_rank


def shard(weights: Tensor, rank: int, world: int) -> Tensor:
    """Rank ``rank``'s slice of an all-experts weight ``(E, ...)``: its experts' weights."""
    block = experts_of(rank, world, weights.shape[0])
    return weights[block.start:block.stop]


def hf_layout(w: moe.MoEWeights) -> tuple[Tensor, Tensor]:
    """Chapter 01's expert weights in transformers' layout, which chapter 10's backend (and so
    this chapter's local experts) reads: ``gate_up_proj (E, 2n, d)`` (gate rows, then up rows)
    and ``down_proj (E, d, n)``."""
    gate_up = torch.cat([w.w_gate.transpose(1, 2), w.w_up.transpose(1, 2)], dim=1).contiguous()
    return gate_up, w.w_down.transpose(1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# 2. The routing, as rows sorted by expert


class Rows(NamedTuple):
    """One rank's routing: ``R`` rows sorted by expert (so grouped by destination rank).

    - ``token_ids (R,)`` int64: the local token each row carries (a real one: chapter 04's
      "padded" routing, whose padding rows carry none, is not among :data:`ROUTINGS`)
    - ``expert_ids (R,)`` int64: its expert, a global id
    - ``weights (R,)``: its routing weight (from the router: gradients flow through it)
    """
    token_ids: Tensor
    expert_ids: Tensor
    weights: Tensor


#: Where token rounding decides: on each rank's own tokens, or on the whole batch of every rank.
ROUNDING = ("per rank", "whole batch")


def route_rows(x: Tensor, w_router: Tensor, k: int, method: str = "top-K", tile: int = tr.DEFAULT_TILE, *,
               rounding: str = "per rank", group=None) -> Rows:
    """This rank's tokens ``x (T, d)`` routed with the shared ``w_router (d, E)``: ``"top-K"``
    (chapter 01's ``topk_softmax``: softmax over the k best logits) or chapter 04's token
    rounding (``"nearest"``, ``"up"``, ``"down"``: every expert's rows a multiple of ``tile``).

    ``rounding="per rank"`` rounds this rank's own counts (then every (rank, expert) block is whole
    tiles); ``"whole batch"`` makes the decision one process would make on every rank's tokens
    together: each rank gathers the router's probabilities of all tokens (``T * E`` numbers, about
    1% of the dispatch's bytes on DeepSeek-V3), runs the same rounding on them, and keeps the
    rows of its own tokens (every expert's total is whole tiles, its blocks from each rank not)."""
    require(rounding in ROUNDING, f"rounding must be one of {', '.join(ROUNDING)}; got {rounding!r}")
    logits = moe.router_logits(x, w_router).float()  # routers decide in float32
    if method == "top-K" or rounding == "per rank":
        return rows_from_logits(logits, k, method, tile)
    require(method in ROUTINGS, f"routing must be one of {', '.join(ROUTINGS)}; got {method!r}")
    probs = moe.router_probs(logits)
    everyone, first = gather_tokens(probs.detach(), group)
    routing = tr.route(everyone, k, tile, method)  # the same decision on every rank
    mine = (routing.token_ids >= first) & (routing.token_ids < first + x.shape[0])
    tokens, experts = routing.token_ids[mine] - first, routing.expert_ids[mine]
    return Rows(tokens, experts, probs[tokens, experts])  # weights from this rank's own probabilities


def gather_tokens(t: Tensor, group=None) -> tuple[Tensor, int]:
    """Every rank's rows of ``t (T_rank, ...)``, in rank order, and where this rank's begin.
    (``all_gather`` takes equal sizes: each rank's rows padded to the largest count.)"""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([t.shape[0]]), group=group)
    sizes = [int(s) for s in sizes]
    padded = t.new_zeros((max(sizes), *t.shape[1:]))
    padded[:t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]), sum(sizes[:rank])


def rows_from_logits(logits: Tensor, k: int, method: str = "top-K", tile: int = tr.DEFAULT_TILE) -> Rows:
    """:func:`route_rows` from the router's logits ``(T, E)``."""
    require(method in ROUTINGS, f"routing must be one of {', '.join(ROUTINGS)}; got {method!r}")
    E = logits.shape[1]
    if method == "top-K":
        weights, experts = moe.topk_softmax(logits, k)
        d = moe.dispatch(experts, E, validate=False)  # ids from topk: in range
        return Rows(d.token_of, experts.reshape(-1)[d.order], weights.reshape(-1)[d.order])
    routing = tr.route(moe.router_probs(logits), k, tile, method)
    return Rows(routing.token_ids, routing.expert_ids, routing.weights)


def send_counts(rows: Rows, per_rank: int, world: int) -> Tensor:
    """``(world,)`` int64: how many of this rank's rows go to each rank."""
    return torch.bincount(owner(rows.expert_ids, per_rank), minlength=world)


class Plan(NamedTuple):
    """One rank's side of the exchanges: its :class:`Rows`, how many it sends each rank and
    receives from each (host lists: the split sizes of ``all_to_all_single``), and each row's
    expert as its destination numbers them (``0 .. E_local - 1``)."""
    rows: Rows
    send: list[int]
    receive: list[int]
    local_ids: Tensor


def plan(rows: Rows, per_rank: int, group=None) -> Plan:
    """The exchange of ``rows``: their counts per rank, sent and received (:func:`exchange_counts`)."""
    counts = send_counts(rows, per_rank, dist.get_world_size(group))
    return Plan(rows, counts.tolist(), exchange_counts(counts, group), rows.expert_ids % per_rank)


def weighted_sum(y_rows: Tensor, rows: Rows, num_tokens: int, weights: Tensor | None = None) -> Tensor:
    """Each token's rows summed with their routing weights (``weights``: others in their place),
    in the weights' precision when it is the higher (float32 router weights, bf16 rows)."""
    weights = rows.weights if weights is None else weights
    return moe.combine_rows(y_rows.to(torch.promote_types(y_rows.dtype, weights.dtype)), rows.token_ids, weights,
                            num_tokens)


# --------------------------------------------------------------------------------------------
# 3-4. The exchanges: counts, then rows, differentiable


def exchange_counts(counts: Tensor, group=None) -> list[int]:
    """Each rank's ``counts[r]`` (rows for rank ``r``) -> how many rows this rank receives from
    each rank. A host list: ``all_to_all_single`` takes its split sizes from the host, so the host
    waits here for the device, a synchronisation the exchange cannot avoid (DeepEP's low-latency kernels avoid it with receive buffers of
    a fixed size, as chapter 09's masked layout does)."""
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts.contiguous(), group=group)
    return received.tolist()


class AllToAll(torch.autograd.Function):
    """``AllToAll.apply(x, send, receive, group)``: rows ``x (sum(send), ...)`` in destination
    order, ``send[r]`` of them for rank ``r``; returns the rows received, ``receive[r]`` from rank
    ``r``, in rank order. Its backward sends the gradient back the way the rows came: the same
    exchange with ``send`` and ``receive`` swapped."""

    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], receive: list[int], group=None) -> Tensor:
        ctx.send, ctx.receive, ctx.group = send, receive, group
        out = x.new_empty((sum(receive), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=receive, input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return AllToAll.apply(grad.contiguous(), ctx.receive, ctx.send, ctx.group), None, None, None


def exchange_ids(ids: Tensor, send: list[int], receive: list[int], group=None) -> Tensor:
    """The rows' local expert ids, along the same exchange (no gradient)."""
    out = ids.new_empty(sum(receive))
    dist.all_to_all_single(out, ids.contiguous(), output_split_sizes=receive, input_split_sizes=send, group=group)
    return out


class _Experts(NamedTuple):  # what chapter 10's backend reads from an experts module
    gate_up_proj: Tensor
    down_proj: Tensor


def local_experts(x_rows: Tensor, local_ids: Tensor, gate_up_proj: Tensor, down_proj: Tensor) -> Tensor:
    """The rows a rank received through its own experts: chapter 10's backend on one expert per
    row (``K = 1``, weight 1), so on a Hopper GPU in bf16 the course's kernels, forward and
    backward, and elsewhere the torch maths. Rows come back in the order they arrived."""
    from . import hf

    if x_rows.shape[0] == 0:  # nothing came: nothing to run, but the weights stay in the graph
        return x_rows * 0 + 0 * (gate_up_proj.sum() + down_proj.sum())  # (their gradient: zeros, not None)
    index = local_ids[:, None]
    ones = torch.ones(index.shape, device=x_rows.device, dtype=torch.float32)
    experts = _Experts(gate_up_proj, down_proj)
    if hf.why_not_kernels(experts, x_rows) is None:
        return hf.KernelExperts.apply(x_rows, index, ones, gate_up_proj, down_proj)
    ops, _ = hf.torch_products(experts)  # torch._grouped_mm where it runs, else a loop over experts
    return hf.experts_torch(x_rows, index, ones, gate_up_proj, down_proj, ops)


def moe_forward(x: Tensor, w_router: Tensor, gate_up_proj: Tensor, down_proj: Tensor, k: int, *,
                method: str = "top-K", tile: int = tr.DEFAULT_TILE, rounding: str = "per rank", group=None,
                exchange: type | None = None) -> Tensor:
    """One rank's share of the expert-parallel MoE layer: its tokens ``x (T, d)`` -> ``(T, d)``.

    ``w_router (d, E)``: the router, the same on every rank; ``gate_up_proj (E_local, 2n, d)``
    and ``down_proj (E_local, d, n)``: this rank's experts (:func:`shard`, :func:`hf_layout`).
    Autograd gives the backward (through :class:`AllToAll`). Every rank of ``group`` must call it.
    ``method``, ``tile``, ``rounding``: the routing (:func:`route_rows`). ``exchange``: the autograd
    Function that moves the rows (default :class:`AllToAll`).
    """
    exchange = exchange or AllToAll
    world = dist.get_world_size(group)
    E_local = gate_up_proj.shape[0]
    require(w_router.dim() == 2 and w_router.shape == (x.shape[1], E_local * world),
            lambda: f"w_router must be (d, E) = ({x.shape[1]}, {E_local * world}) for {E_local} experts on each of "
                    f"{world} ranks, got {tuple(w_router.shape)}")
    p = plan(route_rows(x, w_router, k, method, tile, rounding=rounding, group=group), E_local, group)
    x_recv = exchange.apply(x[p.rows.token_ids], p.send, p.receive, group)  # dispatch
    y_recv = local_experts(x_recv, exchange_ids(p.local_ids, p.send, p.receive, group), gate_up_proj, down_proj)
    y_rows = exchange.apply(y_recv, p.receive, p.send, group)  # combine: back the way they came
    return weighted_sum(y_rows, p.rows, x.shape[0]).to(x.dtype)


# --------------------------------------------------------------------------------------------
# 5. Overlap: the exchange of one chunk in flight while the experts work on another


@torch.no_grad()
def moe_forward_overlapped(x: Tensor, w_router: Tensor, gate_up_proj: Tensor, down_proj: Tensor, k: int, *,
                           chunks: int = 2, method: str = "top-K", tile: int = tr.DEFAULT_TILE,
                           group=None) -> Tensor:
    """:func:`moe_forward` (inference) with the tokens in ``chunks`` pieces: every chunk's
    dispatch is started at once (``async_op=True``: NCCL runs it on its own stream, beside the
    experts' kernels), then chunk by chunk: wait for its rows, run the experts, start its
    combine, and go on to the next while that combine travels. Same output as
    :func:`moe_forward` (each token's routing does not depend on the others' under top-K; under
    token rounding each chunk is rounded on its own)."""
    check_int(chunks, "chunks", 1)
    E_local = gate_up_proj.shape[0]
    pieces = x.tensor_split(chunks)  # the same number on every rank (some may be empty): one exchange each
    started = []
    for piece in pieces:  # route every chunk and start every dispatch
        p = plan(route_rows(piece, w_router, k, method, tile), E_local, group)
        x_recv = piece.new_empty((sum(p.receive), piece.shape[1]))
        work = dist.all_to_all_single(x_recv, piece[p.rows.token_ids], p.receive, p.send, group=group, async_op=True)
        started.append((p, x_recv, exchange_ids(p.local_ids, p.send, p.receive, group), work))
    returning = []
    for p, x_recv, ids, work in started:  # experts, combines in flight
        work.wait()
        y_recv = local_experts(x_recv, ids, gate_up_proj, down_proj)
        y_rows = y_recv.new_empty((sum(p.send), y_recv.shape[1]))
        returning.append((p, y_rows, dist.all_to_all_single(y_rows, y_recv.contiguous(), p.send, p.receive,
                                                            group=group, async_op=True)))
    out = []
    for (p, y_rows, work), piece in zip(returning, pieces, strict=True):
        work.wait()
        out.append(weighted_sum(y_rows, p.rows, piece.shape[0]).to(x.dtype))
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# The single-process layer it must equal, and the check on spawned processes


def reference_forward(x_per_rank: list[Tensor], w: moe.MoEWeights, k: int, method: str = "top-K",
                      tile: int = tr.DEFAULT_TILE, rounding: str = "per rank") -> list[Tensor]:
    """What the ranks together must compute, in one process: chapter 01's layer (top-K: each
    token's routing is its own, so all tokens at once) or chapter 04's (token rounding: each
    rank's tokens rounded as that rank rounds them, or all tokens at once)."""
    sizes = [t.shape[0] for t in x_per_rank]
    if method == "top-K":
        return list(moe.moe_forward(torch.cat(x_per_rank), w, k).y.split(sizes))

    def rounded(x):
        return tr.moe_forward(x, w, tr.route(moe.router_probs(moe.router_logits(x, w.w_router).float()), k, tile,
                                             method))
    if rounding == "whole batch":
        return list(rounded(torch.cat(x_per_rank)).split(sizes))
    return [rounded(x) for x in x_per_rank]


@dataclass(frozen=True)
class Case:
    """One check of the sharded layer: ``tokens`` per rank, the routing, and how the router is
    biased (``"none"``; ``"idle rank"``: the last rank's experts are never chosen; ``"one rank"``:
    every token's experts are rank 1's)."""
    name: str
    tokens: tuple[int, ...]
    d: int = 32
    n: int = 16
    experts: int = 8
    k: int = 2
    method: str = "top-K"
    tile: int = 4
    bias: str = "none"
    rounding: str = "per rank"


CASES = (
    Case("top-K, ragged", (13, 7, 1, 9)),
    Case("a rank whose experts get no tokens", (6, 5, 8, 3), bias="idle rank"),
    Case("a rank that gets every token", (5, 9, 4, 6), bias="one rank"),
    Case("a rank with no tokens of its own", (7, 0, 5, 6)),
    Case("token rounding (nearest, tile 4)", (16, 11, 9, 20), method="nearest"),
    Case("token rounding on the whole batch", (16, 11, 9, 20), method="nearest", rounding="whole batch"),
)


def case_inputs(case: Case, world: int) -> tuple[list[Tensor], moe.MoEWeights, list[Tensor]]:
    """The same inputs on every rank (seeded): each rank's tokens (``case.tokens``, repeated if
    there are more ranks), the weights of all experts, and the output gradient of each rank."""
    g = torch.Generator().manual_seed(0)
    w = moe.random_weights(case.d, case.n, case.experts, dtype=torch.float64, generator=g)
    router = w.w_router.clone()
    per = experts_per_rank(case.experts, world)
    if case.bias == "idle rank":  # the last rank's experts can never win
        router[:, (world - 1) * per:] -= 50.0
    elif case.bias == "one rank":  # rank 1's experts always win (k <= E_local)
        router[:, per:2 * per] += 50.0
    w = w._replace(w_router=router)
    tokens = [case.tokens[r % len(case.tokens)] for r in range(world)]  # one block per rank
    xs = [torch.randn(t, case.d, generator=g, dtype=torch.float64) for t in tokens]
    grads = [torch.randn(t, case.d, generator=g, dtype=torch.float64) for t in tokens]
    if case.bias != "none":  # large router entries: keep the inputs small so the logits stay finite
        xs = [x / 10 for x in xs]
    return xs, w, grads


def _leaves(*tensors: Tensor) -> list[Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


def check_rank(case: Case, rank: int, world: int, *, wrong: str | None = None, group=None) -> dict:
    """On one rank: the sharded layer against the single-process one on the same inputs (every
    rank computes the reference itself: it is small), in float64. Returns the largest relative
    errors of the output, ``dx``, this rank's expert weights' gradients, and the router's gradient
    summed over ranks; and of :func:`moe_forward_overlapped` (top-K only). ``wrong``: a known
    mistake to make on purpose (the test shows the check catches it): ``"combine unweighted"`` or
    ``"backward not exchanged"``."""
    xs, w, grads = case_inputs(case, world)
    gate_up, down = hf_layout(w)
    x, router, gu, dn = _leaves(xs[rank], w.w_router, shard(gate_up, rank, world), shard(down, rank, world))
    require(wrong in WRONG, f"wrong must be one of {WRONG}, got {wrong!r}")
    if wrong == "combine unweighted":
        y = _unweighted_forward(x, router, gu, dn, case.k, method=case.method, tile=case.tile, group=group)
    else:
        y = moe_forward(x, router, gu, dn, case.k, method=case.method, tile=case.tile, rounding=case.rounding,
                        group=group, exchange=_NotExchangedBackward if wrong == "backward not exchanged" else None)
    y.backward(grads[rank])
    router_grad = torch.zeros_like(router) if router.grad is None else router.grad.clone()
    dist.all_reduce(router_grad, group=group)  # the replicated router: its gradient summed over ranks

    ref_x, ref_w = _leaves(*xs), moe.MoEWeights(*_leaves(*w))
    ref_y = reference_forward(ref_x, ref_w, case.k, case.method, case.tile, case.rounding)
    sum((r * g).sum() for r, g in zip(ref_y, grads, strict=True)).backward()
    ref_gate_up, ref_down = hf_layout(moe.MoEWeights(*(t.grad for t in ref_w)))
    errors = {"y": _rel(y, ref_y[rank]), "dx": _rel(x.grad, ref_x[rank].grad),
              "d_router": _rel(router_grad, ref_w.w_router.grad),
              "d_gate_up_proj": _rel(gu.grad, shard(ref_gate_up, rank, world)),
              "d_down_proj": _rel(dn.grad, shard(ref_down, rank, world))}
    if case.method == "top-K" and wrong is None:
        errors["y overlapped"] = _rel(moe_forward_overlapped(xs[rank], w.w_router, gu.detach(), dn.detach(), case.k,
                                                             chunks=3, group=group), ref_y[rank])
    return errors


#: The known mistakes :func:`check_rank` can make on purpose (None: none).
WRONG = (None, "combine unweighted", "backward not exchanged")


def _rel(got: Tensor | None, want: Tensor) -> float:
    got = torch.zeros_like(want) if got is None else got.detach()
    scale = want.detach().norm()
    return float((got - want.detach()).norm() / scale) if scale > 0 else float(got.norm())


def _unweighted_forward(x, w_router, gate_up_proj, down_proj, k, *, method, tile, group):
    """Known-wrong on purpose: :func:`moe_forward` whose combine forgets the routing weights."""
    p = plan(route_rows(x, w_router, k, method, tile), gate_up_proj.shape[0], group)
    y_recv = local_experts(AllToAll.apply(x[p.rows.token_ids], p.send, p.receive, group),
                           exchange_ids(p.local_ids, p.send, p.receive, group), gate_up_proj, down_proj)
    y_rows = AllToAll.apply(y_recv, p.receive, p.send, group)
    return weighted_sum(y_rows, p.rows, x.shape[0], weights=torch.ones_like(p.rows.weights))


class _NotExchangedBackward(AllToAll):
    @staticmethod
    def backward(ctx, grad):  # wrong: keeps the gradient here instead of sending it back
        out = grad.new_zeros((sum(ctx.send), *grad.shape[1:]))
        n = min(out.shape[0], grad.shape[0])
        out[:n] = grad[:n]
        return out, None, None, None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_worker(rank: int, world: int, port: int, cases: tuple[Case, ...], wrong: str | None, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results.put((rank, {case.name: check_rank(case, rank, world, wrong=wrong) for case in cases}))
    except Exception as exc:  # said by the parent, with the rank
        results.put((rank, f"{type(exc).__name__}: {exc}"))
    finally:
        dist.destroy_process_group()


def run_check(world: int = 4, cases: tuple[Case, ...] = CASES, wrong: str | None = None) -> dict:
    """Spawn ``world`` processes (gloo, on this machine's CPU), run :func:`check_rank` for every
    case on each, and return ``{case: {what: largest error over the ranks}}``. A rank that dies
    (a collective the ranks disagree on aborts them) raises, naming it."""
    import torch.multiprocessing as mp

    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_check_worker, args=(world, free_port(), cases, wrong, results), nprocs=world, join=True)
    got = dict(results.get() for _ in range(world))  # small dicts: written before each rank exits
    failed = {r: v for r, v in got.items() if isinstance(v, str)}
    require(not failed, lambda: "; ".join(f"rank {r}: {v}" for r, v in sorted(failed.items())), RuntimeError)
    return {case.name: {what: max(got[r][case.name][what] for r in range(world)) for what in got[0][case.name]}
            for case in cases}


# --------------------------------------------------------------------------------------------
# 6. A model of it: bytes, links, time per layer


@dataclass(frozen=True)
class Link:
    """A link's bandwidth per GPU and direction, GB/s (10^9 bytes/s), and its start-up latency."""
    name: str
    gb_per_s: float
    latency_us: float
    source: str


#: NVLink 4 on H100/H200 SXM: 900 GB/s per GPU, both directions together (NVIDIA datasheets).
NVLINK = Link("NVLink 4 (H100/H200 SXM)", 450.0, 10.0, "datasheet: 900 GB/s per GPU, both directions")
#: One 400 Gb/s InfiniBand NDR adapter per GPU, the usual H100/H200 cluster design.
NETWORK = Link("InfiniBand NDR, one 400 Gb/s adapter per GPU", 50.0, 20.0, "400 Gb/s = 50 GB/s per direction")
#: DeepEP's published intranode numbers (its README, H800, whose NVLink gives ~160 GB/s): dispatch
#: 153 GB/s, combine 158 GB/s, at 8 ranks. A claim to compare with, not measured here.
DEEPEP_INTRANODE_GBPS = {"dispatch": 153.0, "combine": 158.0}


def bytes_per_token(d: int, k: int, element_bytes: int = 2) -> int:
    """What one token sends per all-to-all: its ``k`` rows of ``d`` values (bf16: 2 bytes each).
    A layer's forward makes two all-to-alls (dispatch, combine), its backward two more."""
    return k * d * element_bytes


def leaving_share(world: int, gpus_per_node: int = 8) -> tuple[float, float]:
    """The share of a rank's rows (experts spread evenly, routing uniform) that goes to another
    GPU of its node, and to another node's GPUs."""
    in_node = min(world, gpus_per_node)
    return (in_node - 1) / world, (world - in_node) / world


def comm_seconds(tokens: int, d: int, k: int, world: int, *, gpus_per_node: int = 8, nvlink: Link = NVLINK,
                 network: Link = NETWORK, efficiency: float = 1.0) -> float:
    """One all-to-all of ``tokens`` tokens per rank: the NVLink and network parts run at once, so
    the slower sets the time; ``efficiency``: the fraction of each link's rate reached."""
    if world == 1:
        return 0.0
    payload = tokens * bytes_per_token(d, k)
    near, far = leaving_share(world, gpus_per_node)
    t_near = payload * near / (nvlink.gb_per_s * 1e9 * efficiency) + nvlink.latency_us * 1e-6
    t_far = payload * far / (network.gb_per_s * 1e9 * efficiency) + network.latency_us * 1e-6 if far else 0.0
    return max(t_near, t_far)


def predict(config: configs.MoEConfig, tokens: int, world: int, *, gemm_tflops: float, backward: bool = True,
            overlap: float = 0.0, imbalance: float = 1.0, efficiency: float = 0.6, gpus_per_node: int = 8) -> dict:
    """Predicted time per layer, in ms, for ``tokens`` per rank on ``world`` GPUs (weak scaling:
    each rank's expert work stays the same, ``tokens * k`` rows over its ``E / world`` experts).

    ``gemm_tflops``: the expert GEMMs' rate on one GPU (a measured one: chapter 06's layer);
    ``efficiency``: the fraction of each link's rate an all-to-all reaches; ``overlap``: the
    fraction of the exchange hidden behind the GEMMs; ``imbalance``: the busiest rank's rows over
    the mean (the slowest rank sets the pace). Returns ``gemm``, ``comm`` and ``total``."""
    flops = configs.expert_gemm_flops(tokens, config.d, config.n, config.K)["total" if backward else "fwd"]
    gemm = flops / (gemm_tflops * 1e12) * imbalance
    exchanges = 4 if backward else 2
    comm = exchanges * comm_seconds(round(tokens * imbalance), config.d, config.K, world,
                                    gpus_per_node=gpus_per_node, efficiency=efficiency)
    return {"gemm": gemm * 1e3, "comm": comm * 1e3, "total": (gemm + comm * (1 - overlap)) * 1e3}


#: The record the model takes its GEMM rate from: chapter 06's layer on one GPU.
LAYER_KIND = "moe_layer_training"
#: The record of benchmarks/bench_expert_parallel.py (torchrun, one process per GPU).
KIND = "expert_parallel"


def measured_layer_tflops(config: configs.MoEConfig, backward: bool = True):
    """The course's layer on one GPU at ``config``'s shape, as chapter 06 recorded it:
    ``(TFLOP/s over the expert GEMMs' FLOPs, the record)``, or None without such a record. Its
    time includes everything the layer does (routing, gather, combine), so it is the rate a rank
    keeps when its experts are a slice of the layer's."""
    from . import records

    rec = records.load(LAYER_KIND)
    entry = rec and rec.data.get("shapes", {}).get(config.name, {}).get("contenders", {}).get("course")
    if not entry:
        return None
    return entry["forward+backward" if backward else "forward"]["tflops"], rec


def traffic(rows_per_rank: list[Rows], per_rank: int) -> Tensor:
    """``(world, world)``: rows rank ``i`` sends rank ``j`` (the diagonal stays home)."""
    world = len(rows_per_rank)
    return torch.stack([send_counts(rows, per_rank, world) for rows in rows_per_rank])


def table(data: dict) -> str:
    """The record of :data:`KIND` as a table: one line per shape and number of GPUs."""
    lines = [f"{'shape':<16} {'GPUs':>4} {'fwd ms':>8} {'fwd+bwd':>8} {'a2a ms':>7} {'a2a share':>9} "
             f"{'GB/s':>6} {'chunks 2/4 ms':>14} {'hidden':>7} {'imbal.':>6}"]
    for world, shapes in sorted(data["runs"].items(), key=lambda kv: int(kv[0])):
        for name, r in shapes.items():
            gbps = f"{r['exchange_gbps']:.0f}" if r["exchange_gbps"] else "-"
            lines.append(f"{name:<16} {world:>4} {r['forward_ms']:>8.2f} {r['forward_backward_ms']:>8.2f} "
                         f"{r['exchanges_ms']:>7.2f} {r['exchange_share_of_forward']:>9.0%} {gbps:>6} "
                         f"{r['forward_2_chunks_ms']:>6.2f}/{r['forward_4_chunks_ms']:<7.2f} "
                         f"{r['hidden_share_of_exchanges']:>7.0%} {r['imbalance']:>6.2f}")
    return "\n".join(lines)
