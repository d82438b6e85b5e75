"""Tile-aware token rounding (chapter 04): routing whose expert sizes are whole tiles.

A grouped GEMM computes each expert's rows in tiles of ``M_tile`` rows (128 in chapter 02's
kernels). Plain top-K routing gives expert ``e`` some count ``f_e`` of tokens, and its last tile
is ``f_e mod M_tile`` rows full: the rest of that tile is computed for nothing. Token rounding
(the SonicMoE paper's Algorithm 4, Guo et al., arXiv 2512.14080) changes the routing slightly
so that every expert gets a whole number of tiles:

1. **token-choice top-K**: each token picks its ``K`` best experts (:func:`topk_experts`);
2. **count**: expert ``e`` received ``f_e`` tokens (:func:`expert_counts`);
3. **round** ``f_e`` to a multiple of ``M_tile``: up, down or to the nearest (the default)
   (:func:`round_counts`);
4. **rank** each expert's candidates (all ``T`` tokens) so that its top-K tokens come first,
   each group by score: the paper subtracts one from the scores of the non-top-K tokens
   (:func:`rank_candidates`);
5. **keep** the first rounded-``f_e`` of that ranking (:func:`token_rounding`).

Rounding up fills the last tile with the best-scoring tokens that did *not* pick the expert;
rounding down drops the lowest-scoring tokens that did. Either way an expert moves by less than
one tile from plain top-K, and a token may end up with more or fewer than ``K`` experts.

Beside it, for comparison, :func:`topk_routing` (plain top-K, nothing changed) and
:func:`padded_routing` (every expert padded up to a tile multiple with *empty* rows, as vLLM's
``moe_align_block_size`` does: the waste is made explicit, the routing is unchanged).

**Tie rules** (the GPU kernels in ``kernels/04_1_token_rounding.cu`` follow them exactly):

- top-K: higher score first; equal scores go to the lower expert id;
- ranking an expert's candidates: top-K tokens before the others; within each group higher
  score first; equal scores go to the lower token id.

The paper writes step 4 as "scores minus one for the non-top-K tokens". For scores in
``[0, 1]`` (router probabilities) that is the same order as the two-part key used here
(top-K first, then score); the two-part key also stays exact where ``s - 1`` in float32 would
round small probabilities together (``1e-9 - 1 == 2e-9 - 1`` in float32), so ties are true ties.
Rounding to the nearest multiple sends an exact half tile **up**. (The authors' benchmark uses
``torch.round``, which sends halves to the even multiple; the two differ only at exactly half a
tile.) ``-0.0`` and ``0.0`` are equal scores.

Every routing here is returned as a :class:`Routing`: the metadata a grouped GEMM needs (rows
grouped by expert, each expert's rows in ascending token order, offsets, combine weights).
Notation as in :mod:`moe_course.moe`: ``T`` tokens, ``E`` experts, ``K`` experts per token,
``R`` rows of the grouped GEMM.

Further down: :func:`route_cuda` (the same routing built by ``kernels/04_1_token_rounding.cu``
on the GPU, no host synchronisation), :func:`awkward_cases` and :func:`check_kernel` (the kernels
against this file, field by field), and :func:`measure_speed` (the grouped GEMM's time on top-K
against rounded routing, for the notebook and ``benchmarks/bench_token_rounding.py``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import grouped_gemm as gg
from . import kernels, launch, moe
from .bench import benchmark
from .checking import check_equal
from .checks import check_device, check_ids_in_range, check_int, require
from .launch import MAX_EXPERTS, ROUTING


#: Rounding modes: to the nearest tile multiple (an exact half goes up), up, down.
MODES = ("nearest", "up", "down")
DEFAULT_TILE = launch.STEPS[launch.BEST].block_m  # the M tile of the course's best grouped GEMM (128, as SonicMoE's)
#: The routings the course compares: plain top-K, padding-only, and token rounding per mode.
ROUTINGS = ("top-K", "padded") + MODES

# --------------------------------------------------------------------------------------------
# Input checks: bad input gets a ValueError that names the problem (moe_course.checks).


def check_scores(scores) -> None:
    """``scores (T, E)``: a float tensor, at least one expert (an empty batch, T = 0, routes to no
    rows), no NaN."""
    require(isinstance(scores, Tensor), f"scores must be a torch.Tensor of shape (T, E), got {type(scores).__name__}")
    require(scores.dim() == 2, f"scores must have shape (T, E) (2 dimensions), got shape {tuple(scores.shape)}")
    require(scores.is_floating_point(), f"scores must be floating point (router scores), got dtype {scores.dtype}")
    require(scores.shape[1] >= 1, f"scores must have at least one expert, got shape {tuple(scores.shape)}")
    nan = torch.isnan(scores)
    if bool(nan.any()):
        t, e = (int(v) for v in nan.nonzero()[0])
        raise ValueError(f"scores contain NaN ({int(nan.sum())} of them; the first at token {t}, expert {e}): "
                         "a NaN has no place in a ranking")


def _check_counts(counts) -> None:
    require(isinstance(counts, Tensor) and counts.dim() == 1 and not counts.is_floating_point(),
            f"counts must be a 1-D integer tensor (tokens per expert), got "
            f"{getattr(counts, 'dtype', type(counts).__name__)} {tuple(getattr(counts, 'shape', ()))}")
    require(counts.numel() == 0 or int(counts.min()) >= 0, lambda: f"counts must be >= 0, got {counts.tolist()[:16]}")


def check_mode(mode) -> None:
    require(mode in MODES, f"mode must be one of {', '.join(MODES)}; got {mode!r}")


# --------------------------------------------------------------------------------------------
# Steps 1-2: token-choice top-K and the counts


def _sort_keys(scores: Tensor) -> Tensor:
    """The scores as the sorts see them: float32, no gradient, and every zero made ``+0.0``
    (``-0.0 + 0.0 == +0.0``): ``-0.0`` and ``0.0`` are equal scores, whichever sort runs (a radix
    sort on the GPU would otherwise put ``-0.0`` below ``0.0``)."""
    return scores.detach().float() + 0.0


def topk_experts(scores: Tensor, k: int) -> Tensor:
    """Each token's ``k`` best experts, best first: ``scores (T, E) -> (T, k)`` int64.

    Equal scores go to the lower expert id (a stable sort; ``torch.topk`` leaves ties
    unspecified, and a GPU kernel must be able to reproduce the choice bit for bit).
    """
    check_scores(scores)
    check_int(k, "k (experts per token)", 1, scores.shape[1])
    order = torch.sort(_sort_keys(scores), dim=1, descending=True, stable=True).indices
    return order[:, :k]


def expert_counts(topk: Tensor, num_experts: int) -> Tensor:
    """``f_e``, tokens per expert under top-K: ``topk (T, K) -> (E,)`` int64."""
    require(isinstance(topk, Tensor) and topk.dim() == 2,
            f"topk must be a (T, K) tensor of expert ids, got {getattr(topk, 'shape', type(topk).__name__)}")
    check_int(num_experts, "num_experts", 1)
    flat = topk.reshape(-1).long()
    check_ids_in_range(flat, num_experts, "topk", f"the {num_experts} experts")
    return torch.bincount(flat, minlength=num_experts)


def topk_mask(topk: Tensor, num_experts: int) -> Tensor:
    """``topk (T, K) -> (T, E)`` bool: True where the token picked the expert."""
    mask = torch.zeros(topk.shape[0], num_experts, dtype=torch.bool, device=topk.device)
    return mask.scatter_(1, topk.long(), True)


# --------------------------------------------------------------------------------------------
# Step 3: round the counts


def round_counts(counts: Tensor, tile: int = DEFAULT_TILE, mode: str = "nearest",
                 num_tokens: int | None = None) -> Tensor:
    """Each count rounded to a multiple of ``tile``: ``counts (E,) -> (E,)`` int64.

    - ``"nearest"``: the closer multiple; exactly half a tile goes up (``f = 64`` with ``tile =
      128`` gives 128)
    - ``"up"``: the next multiple at or above ``f`` (``ceil``); ``"down"``: at or below (``floor``)

    ``num_tokens``: an expert cannot take more tokens than there are (each token at most once),
    so rounded counts are capped at ``T``: the one case where a count is not a tile multiple.
    """
    _check_counts(counts)
    check_int(tile, "tile", 1)
    check_mode(mode)
    counts = counts.long()
    if mode == "up":
        rounded = (counts + tile - 1) // tile * tile
    elif mode == "down":
        rounded = counts // tile * tile
    else:  # the nearest multiple, in integers: floor((2f + tile) / (2 tile)) tiles; a half goes up
        rounded = (2 * counts + tile) // (2 * tile) * tile
    if num_tokens is not None:
        check_int(num_tokens, "num_tokens", 0)
        rounded = rounded.clamp(max=num_tokens)
    return rounded


# --------------------------------------------------------------------------------------------
# Step 4: rank each expert's candidates


def rank_candidates(scores: Tensor, topk: Tensor) -> Tensor:
    """Each expert's candidate tokens, best first: ``scores (T, E), topk (T, K) -> (E, T)`` int64.

    Row ``e`` lists all ``T`` tokens: first those that picked ``e`` in their top-K, then the
    others; within each group by score, higher first, equal scores by lower token id. (The
    paper's "non-top-K scores minus one", as an exact two-part key: two stable sorts, the last
    one on the most significant part.)
    """
    s = _sort_keys(scores).t()  # (E, T)
    by_score = torch.sort(s, dim=1, descending=True, stable=True).indices  # ties: lower token first
    picked = topk_mask(topk, scores.shape[1]).t().gather(1, by_score)  # (E, T): top-K flag in that order
    topk_first = torch.sort(picked.to(torch.uint8), dim=1, descending=True, stable=True).indices
    return by_score.gather(1, topk_first)


# --------------------------------------------------------------------------------------------
# The routing metadata


class Routing(NamedTuple):
    """What a grouped GEMM needs to run a routing, and what it changed.

    Rows (``R`` of them) are grouped by expert, expert 0 first; within an expert, in ascending
    token order (the order chapter 01's stable dispatch gives).

    - ``token_ids``: ``(R,)`` int64, the token each row reads; ``-1`` marks an empty padding row
    - ``expert_ids``: ``(R,)`` int64, the expert of each row
    - ``weights``: ``(R,)`` float, the combine weight of each row: the router score of the pair
      (gathered from ``scores``, so gradients flow to the router); 0 for padding rows
    - ``from_topk``: ``(R,)`` bool, True if the pair was one of its token's top-K (False: added
      by rounding up, or padding)
    - ``counts``: ``(E,)`` int64, rows per expert (padding rows included)
    - ``offsets``: ``(E+1,)`` int64, expert ``e``'s rows are ``offsets[e]:offsets[e+1]``
    - ``topk_counts``: ``(E,)`` int64, ``f_e``, tokens per expert under plain top-K
    - ``topk``: ``(T, K)`` int64, each token's top-K experts, best first
    - ``tile``: the tile size the routing was made for; ``method``: one of :data:`ROUTINGS`
    """
    token_ids: Tensor
    expert_ids: Tensor
    weights: Tensor
    from_topk: Tensor
    counts: Tensor
    offsets: Tensor
    topk_counts: Tensor
    topk: Tensor
    tile: int
    method: str

    @property
    def num_tokens(self) -> int:
        return self.topk.shape[0]

    @property
    def num_experts(self) -> int:
        return self.counts.numel()

    @property
    def num_rows(self) -> int:
        return self.token_ids.numel()

    def ends(self) -> Tensor:
        """``(E,)`` int32 end row of each expert: the ``offs`` of :mod:`moe_course.grouped_gemm`
        and ``torch._grouped_mm``."""
        return self.offsets[1:].to(torch.int32)


def _offsets(counts: Tensor) -> Tensor:
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.long, device=counts.device)
    offsets[1:] = counts.cumsum(0)
    return offsets


def _select(scores: Tensor, topk: Tensor, rounded: Tensor, tile: int, method: str) -> Routing:
    """Keep the first ``rounded[e]`` of each expert's ranking; rows in token order."""
    num_tokens, num_experts = scores.shape
    ranked = rank_candidates(scores, topk)  # (E, T)
    keep = torch.arange(num_tokens, device=scores.device) < rounded[:, None]  # the first rounded[e] of row e
    selected = torch.zeros(num_experts, num_tokens, dtype=torch.bool, device=scores.device)
    selected.scatter_(1, ranked, keep)  # (E, T): expert e keeps token t
    expert_ids, token_ids = selected.nonzero(as_tuple=True)  # row-major: by expert, then token
    picked = topk_mask(topk, num_experts)
    return Routing(token_ids, expert_ids, scores[token_ids, expert_ids], picked[token_ids, expert_ids],
                   rounded.clone(), _offsets(rounded), expert_counts(topk, num_experts), topk, tile, method)


def token_rounding(scores: Tensor, k: int, tile: int = DEFAULT_TILE, mode: str = "nearest") -> Routing:
    """Tile-aware token rounding (Algorithm 4): ``scores (T, E)`` -> :class:`Routing`.

    ``scores`` are the router's scores (e.g. softmax probabilities over the ``E`` experts); they
    decide top-K and the ranking, and the selected pairs' scores become the combine weights.
    Every expert's row count becomes a multiple of ``tile`` (rounded ``mode``), capped at ``T``.
    """
    check_scores(scores)
    check_int(tile, "tile", 1)
    check_mode(mode)
    topk = topk_experts(scores, k)
    rounded = round_counts(expert_counts(topk, scores.shape[1]), tile, mode, num_tokens=scores.shape[0])
    return _select(scores, topk, rounded, tile, mode)


def topk_routing(scores: Tensor, k: int, tile: int = DEFAULT_TILE) -> Routing:
    """Plain token-choice top-K in the same format (``tile`` only labels it: nothing is rounded)."""
    check_scores(scores)
    check_int(tile, "tile", 1)
    topk = topk_experts(scores, k)
    return _select(scores, topk, expert_counts(topk, scores.shape[1]), tile, "top-K")


def padded_routing(scores: Tensor, k: int, tile: int = DEFAULT_TILE) -> Routing:
    """Top-K with every expert padded up to a multiple of ``tile`` by empty rows (token ``-1``,
    weight 0), as vLLM's ``moe_align_block_size``: same routing, the tile waste made explicit."""
    plain = topk_routing(scores, k, tile)
    padded = round_counts(plain.topk_counts, tile, "up")
    real = torch.arange(int(padded.sum()), device=scores.device) - _offsets(padded)[:-1].repeat_interleave(padded)
    real = real < plain.topk_counts.repeat_interleave(padded)  # each expert's first f_e rows are real
    token_ids = torch.full(real.shape, -1, dtype=torch.long, device=scores.device)
    token_ids[real] = plain.token_ids
    weights = torch.zeros(real.shape, dtype=plain.weights.dtype, device=scores.device)
    weights = weights.masked_scatter(real, plain.weights)
    expert_ids = torch.arange(padded.numel(), device=scores.device).repeat_interleave(padded)
    return Routing(token_ids, expert_ids, weights, real, padded, _offsets(padded), plain.topk_counts,
                   plain.topk, tile, "padded")


def route(scores: Tensor, k: int, tile: int = DEFAULT_TILE, method: str = "nearest") -> Routing:
    """Any of :data:`ROUTINGS` by name: ``"top-K"``, ``"padded"``, ``"nearest"``, ``"up"``, ``"down"``."""
    require(method in ROUTINGS, f"method must be one of {', '.join(ROUTINGS)}; got {method!r}")
    if method == "top-K":
        return topk_routing(scores, k, tile)
    if method == "padded":
        return padded_routing(scores, k, tile)
    return token_rounding(scores, k, tile, method)


# --------------------------------------------------------------------------------------------
# What a routing costs and what it changed


def tile_map(counts: Tensor, tile: int = DEFAULT_TILE) -> Tensor:
    """``(num_tiles, 2)`` int64: for each ``tile``-row tile of the grouped GEMM, its expert and
    first row, expert by expert (what ``build_tile_map`` in ``kernels/grouped_gemm.cuh`` writes)."""
    _check_counts(counts)
    check_int(tile, "tile", 1)
    counts = counts.long()
    tiles = (counts + tile - 1) // tile
    experts = torch.arange(counts.numel(), device=counts.device).repeat_interleave(tiles)
    first_tile = _offsets(tiles)[:-1].repeat_interleave(tiles)
    j = torch.arange(int(tiles.sum()), device=counts.device) - first_tile  # tile index within its expert
    rows = _offsets(counts)[:-1][experts] + j * tile
    return torch.stack([experts, rows], dim=1)


def stats(routing: Routing, tile: int | None = None) -> dict:
    """What a routing costs on a ``tile``-row grouped GEMM and how far it is from plain top-K.

    - ``rows``: rows computed for a reason (real rows); ``tiles``: tiles of ``tile`` rows
    - ``wasted_rows``: rows of those tiles that hold no token (``tiles * tile - rows``);
      ``waste``: their share of the computed rows
    - ``dropped`` / ``added``: top-K pairs left out / pairs added that were not in top-K;
      ``changed``: both, as a fraction of the ``T*K`` top-K pairs
    """
    tile = routing.tile if tile is None else tile
    real = routing.token_ids >= 0
    rows = int(real.sum())
    per_expert = torch.bincount(routing.expert_ids[real], minlength=routing.num_experts)
    tiles = int(((routing.counts + tile - 1) // tile).sum())  # padding rows count as rows to compute
    kept_topk = int((routing.from_topk & real).sum())
    pairs = routing.topk.numel()
    added = rows - kept_topk
    dropped = pairs - kept_topk
    computed = tiles * tile
    return {"method": routing.method, "tile": tile, "rows": rows, "tiles": tiles,
            "wasted_rows": computed - rows, "waste": (computed - rows) / computed if computed else 0.0,
            "dropped": dropped, "added": added, "changed": (dropped + added) / pairs,
            "max_rows_per_expert": int(per_expert.max()) if per_expert.numel() else 0}


def synthetic_scores(num_tokens: int, num_experts: int, skew: float = 0.0, seed: int = 0,
                     device=None) -> Tensor:
    """Router probabilities ``(T, E)`` of a synthetic router: softmax of random logits with a
    popularity bias ``-skew * log(1 + e)`` (as :func:`moe_course.moe.skewed_logits`)."""
    check_device(device)
    gen = torch.Generator(device=device or "cpu").manual_seed(seed)
    return moe.skewed_logits(num_tokens, num_experts, skew, generator=gen, device=device).softmax(dim=-1)


# --------------------------------------------------------------------------------------------
# Running a routing: gather the rows, run the experts, combine


def permute(x: Tensor, routing: Routing) -> Tensor:
    """``x (T, d) -> (R, d)``: row ``r`` is ``x[token_ids[r]]`` (zeros for padding rows)."""
    rows = x[routing.token_ids.clamp(min=0)]
    if bool((routing.token_ids < 0).any()):
        rows = rows * (routing.token_ids >= 0).unsqueeze(1).to(rows.dtype)
    return rows


def moe_forward(x: Tensor, w, routing: Routing) -> Tensor:
    """An MoE layer's output for any :class:`Routing`: ``x (T, d)`` and ``w`` a
    :class:`moe_course.moe.MoEWeights` -> ``(T, d)``. Rows go through their expert's SwiGLU,
    then each token sums its rows' outputs weighted by ``routing.weights``."""
    y_rows = moe.experts_forward(permute(x, routing), routing.offsets, w.w_gate, w.w_up, w.w_down)
    real = routing.token_ids >= 0
    return moe.combine_rows(y_rows[real], routing.token_ids[real], routing.weights[real], x.shape[0])


# --------------------------------------------------------------------------------------------
# The GPU version: kernels/04_1_token_rounding.cu, no host synchronisation

KERNEL_SOURCE = ROUTING.source  # its launch: moe_course.launch.route_tokens


class DeviceRouting(NamedTuple):
    """A routing built on the GPU, in buffers sized without reading anything back.

    The host cannot know ``R`` (the sum of the rounded counts) without a synchronisation, so the
    row buffers hold :func:`max_rows` entries and only the first ``offsets[E]`` are written;
    ``tile_map`` holds ``max_tiles`` entries, ``(expert, first row)``, the first ``num_tiles[0]``
    real and the rest ``(-1, 0)``, exactly as ``build_tile_map`` of chapter 02 writes it.
    int32 throughout (what the kernels take). :meth:`to_routing` reads it back (a sync).
    """
    token_ids: Tensor  # (max_rows,) int32
    expert_ids: Tensor  # (max_rows,) int32
    weights: Tensor  # (max_rows,) float32
    from_topk: Tensor  # (max_rows,) bool
    counts: Tensor  # (E,) int32 rows per expert
    ends: Tensor  # (E,) int32 end row of each expert (offs for the grouped GEMM)
    offsets: Tensor  # (E+1,) int32
    topk_counts: Tensor  # (E,) int32
    topk: Tensor  # (T, K) int32
    tile_map: Tensor  # (max_tiles, 2) int32
    num_tiles: Tensor  # (2,) int32: the number of tiles, then 0 (the persistent kernels' tile counter)
    tile: int
    method: str

    def to_routing(self, scores: Tensor | None = None) -> Routing:
        """The same metadata as a :class:`Routing` (int64, trimmed to the real rows): one sync.
        With ``scores``, the weights are gathered from it (so they carry its gradient)."""
        rows = int(self.offsets[-1])
        token_ids = self.token_ids[:rows].long()
        expert_ids = self.expert_ids[:rows].long()
        weights = self.weights[:rows]
        if scores is not None:
            real = token_ids >= 0
            weights = torch.where(real, scores[token_ids.clamp(min=0), expert_ids], 0.0)
        return Routing(token_ids, expert_ids, weights, self.from_topk[:rows].clone(), self.counts.long(),
                       self.offsets.long(), self.topk_counts.long(), self.topk.long(), self.tile, self.method)


def max_rows(num_tokens: int, num_experts: int, k: int, tile: int, method: str) -> int:
    """An upper bound of the rows of a routing, known on the host without reading the counts:
    top-K and rounding down never add rows; nearest adds at most ``tile // 2`` per expert, up and
    padding fewer than ``tile``; and no expert takes more than ``T`` tokens (padding aside)."""
    check_int(tile, "tile", 1)
    require(method in ROUTINGS, f"method must be one of {', '.join(ROUTINGS)}; got {method!r}")
    pairs = num_tokens * k
    extra = {"top-K": 0, "down": 0, "nearest": tile // 2, "up": tile - 1, "padded": tile - 1}[method]
    bound = pairs + num_experts * extra
    return bound if method == "padded" else min(bound, num_tokens * num_experts)


def empty_device_routing(num_experts: int, k: int, tile: int, method: str, device) -> DeviceRouting:
    """The routing of an empty batch (no tokens, no rows, no tiles) in :class:`DeviceRouting`'s
    buffers, made without a kernel."""
    i32 = dict(dtype=torch.int32, device=device)
    none, per_expert = torch.zeros(0, **i32), torch.zeros(num_experts, **i32)
    return DeviceRouting(none, none.clone(), torch.zeros(0, device=device), torch.zeros(0, dtype=torch.bool, device=device),
                         per_expert, per_expert.clone(), torch.zeros(num_experts + 1, **i32), per_expert.clone(),
                         torch.zeros(0, k, **i32), torch.zeros(0, 2, **i32), torch.zeros(2, **i32), tile, method)


def route_cuda(scores: Tensor, k: int, tile: int = DEFAULT_TILE, method: str = "nearest",
               validate: bool = True, module=None) -> DeviceRouting:
    """Build a routing on the GPU with the kernels of ``kernels/04_1_token_rounding.cu``:
    ``scores (T, E)`` float32 on the GPU -> :class:`DeviceRouting`. Four launches on torch's current
    stream, no host synchronisation (``validate=True`` adds one: it checks the scores for NaN
    first; benchmarks turn it off). Identical, bit for bit, to :func:`route` on the same scores.
    """
    require(isinstance(scores, Tensor), f"scores must be a torch.Tensor of shape (T, E), got {type(scores).__name__}")
    require(scores.dim() == 2 and scores.shape[1] >= 1,
            f"scores must have shape (T, E) with E >= 1, got {tuple(scores.shape)}")
    require(scores.dtype == torch.float32, f"scores must be float32 (the router's precision), got {scores.dtype}")
    require(method in ROUTINGS, f"method must be one of {', '.join(ROUTINGS)}; got {method!r}")
    num_tokens, num_experts = scores.shape
    check_int(k, "k (experts per token)", 1, num_experts)
    check_int(tile, "tile", 1)
    require(num_experts <= MAX_EXPERTS, f"at most {MAX_EXPERTS} experts (one thread each), got {num_experts}")
    require(num_tokens * num_experts < 2**31, f"T * E must be below 2**31, got {num_tokens} * {num_experts}")
    require(scores.device.type == "cuda", f"scores are on {scores.device}; the kernels read GPU memory: .cuda()")
    if validate:
        check_scores(scores)  # a NaN check: one sync
    if num_tokens == 0:  # an empty batch routes to no rows, as route() does: nothing to launch
        return empty_device_routing(num_experts, k, tile, method, scores.device)
    scores = scores.contiguous()
    rows = max_rows(num_tokens, num_experts, k, tile, method)
    require(rows < 2**31, f"{rows} rows do not fit int32 indices")
    return DeviceRouting(*launch.route_tokens(scores, k, tile, method, rows, module), tile, method)


# --------------------------------------------------------------------------------------------
# Inputs where a routing kernel goes wrong if it is going to: used by the tests, the notebook
# and benchmarks/bench_token_rounding.py to check the kernels against the torch version


def scores_with_counts(counts, num_tokens: int, k: int, seed: int = 0, ties: bool = False,
                       device=None) -> Tensor:
    """Scores ``(T, E)`` whose top-K gives expert ``e`` exactly ``counts[e]`` tokens.

    Each token's ``k`` planned experts score in ``[0.5, 1)``, the others in ``[0, 0.5)``, in
    steps of 1/64 (so equal scores are common). ``ties=True``: every planned pair scores 0.75 and
    every other 0.25, so every ranking decision is a tie. ``sum(counts)`` must be ``T*k`` and no
    count may exceed ``T``.
    """
    counts = [int(c) for c in counts]
    require(sum(counts) == num_tokens * k, f"counts must add up to T*k = {num_tokens * k}, got {sum(counts)}")
    require(max(counts) <= num_tokens, f"no expert can take more than T = {num_tokens} tokens, got {max(counts)}")
    gen = torch.Generator().manual_seed(seed)
    # Lay the pairs out expert by expert and give pair i to token i mod T: an expert's block of
    # at most T consecutive pairs lands on distinct tokens, so no token gets an expert twice.
    experts = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    tokens = torch.randperm(num_tokens, generator=gen)[torch.arange(num_tokens * k) % num_tokens]
    if ties:
        scores = torch.full((num_tokens, len(counts)), 0.25)
        scores[tokens, experts] = 0.75
    else:
        scores = torch.randint(0, 32, (num_tokens, len(counts)), generator=gen) / 64
        scores[tokens, experts] = torch.randint(32, 64, (tokens.numel(),), generator=gen) / 64
    return scores.to(device or "cpu")


def awkward_cases(device=None) -> dict[str, tuple[Tensor, int, int]]:
    """Named ``(scores, k, tile)`` where a routing is easy to get wrong."""
    def signed_zeros():  # raw scores (not probabilities): negative values, -0.0 and 0.0, infinities
        g = torch.Generator().manual_seed(6)
        s = torch.randint(-2, 3, (200, 12), generator=g).float()
        s[s == 0] = torch.where(torch.rand(int((s == 0).sum()), generator=g) < 0.5, -0.0, 0.0)
        s[0, 0], s[1, 1] = float("-inf"), float("inf")
        return s

    gen = torch.Generator().manual_seed(5)
    one_expert = torch.rand(1000, 4, generator=gen) * 0.5
    one_expert[:, 0] = 1.0  # every token's first choice
    cases = {
        "experts with no tokens": (scores_with_counts([0, 40, 0, 56, 24, 0, 40, 0], 80, 2, seed=1), 2, 16),
        "experts on a tile multiple": (scores_with_counts([32, 0, 64, 16, 16, 32], 80, 2, seed=2), 2, 16),
        "exactly half a tile": (scores_with_counts([8, 24, 40, 8], 40, 2, seed=3), 2, 16),
        "ties everywhere": (scores_with_counts([30, 10, 50, 30], 60, 2, seed=4, ties=True), 2, 16),
        "one expert takes everything": (one_expert, 1, 128),
        "signed zeros and infinities": (signed_zeros(), 3, 8),
        "a skewed router, many blocks": (synthetic_scores(3000, 33, skew=0.7, seed=7), 3, 64),
        "1024 experts": (synthetic_scores(64, 1024, seed=8), 8, 4),
        "tile of one": (synthetic_scores(50, 6, seed=9), 2, 1),
    }
    return {name: (s.to(device or "cpu"), k, tile) for name, (s, k, tile) in cases.items()}


def check_kernel(scores: Tensor, k: int, tile: int, method: str, module=None, label: str = "") -> None:
    """The GPU kernels against :func:`route` on the same scores: every field identical (weights
    bit for bit), and the tile map as chapter 02's grouped GEMM reads it. Raises
    :class:`moe_course.checking.CheckFailed` naming the first difference."""
    where = f"{label or 'scores'} {tuple(scores.shape)}, k={k}, tile={tile}, {method}"
    want = route(scores, k, tile, method)
    dev = route_cuda(scores, k, tile, method, module=module)
    got = dev.to_routing()
    for field in ("topk", "topk_counts", "counts", "offsets", "token_ids", "expert_ids", "from_topk"):
        check_equal(f"{field} ({where})", getattr(got, field).cpu(), getattr(want, field).cpu())
    check_equal(f"weights, as bits ({where})", got.weights.float().cpu().view(torch.int32),
                want.weights.float().cpu().view(torch.int32))
    tiles = tile_map(want.counts, tile).cpu()
    check_equal(f"number of tiles ({where})", dev.num_tiles.cpu(), torch.tensor([tiles.shape[0], 0], dtype=torch.int32))
    got_map = dev.tile_map.cpu().long()
    check_equal(f"tile map ({where})", got_map[: tiles.shape[0]], tiles)
    check_equal(f"tile map after the last tile ({where})", got_map[tiles.shape[0]:, 0],
                torch.full((got_map.shape[0] - tiles.shape[0],), -1))


# --------------------------------------------------------------------------------------------
# Kernel time: the grouped GEMM on top-K routing against rounded routing (needs a GPU)

#: The shapes of the comparison, (T, d, n, E, K): the paper's token-rounding setting (T=16384,
#: d=4096, n=1024, E=256, K=4) and DeepSeek-V3's layer; both average T*K/E = 256 tokens per
#: expert, two tiles of 128, where a count just above a multiple costs a whole extra tile.
SPEED_SHAPES = {"sonicmoe-tr": (16384, 4096, 1024, 256, 4), "deepseek-v3": (8192, 7168, 2048, 256, 8)}
PAPER_SPEEDUP = 1.16  # "up to 1.16x" on kernel time (SonicMoE paper, H100, its own kernels)
SPEED_METHODS = ("top-K", "nearest", "up", "down")
SPEED_KIND = "token_rounding_speed"  # the record: benchmarks/results/token_rounding_speed__<gpu>.json


def measure_speed(shapes: dict | None = None, methods=SPEED_METHODS, impls=None, projections=("up", "down"),
                  tile: int = DEFAULT_TILE, skew: float = 0.0, seed: int = 0, progress=None) -> list[dict]:
    """Time the grouped GEMM on each routing, and the routing itself, on the GPU.

    For every shape, one synthetic router (softmax of random logits, ``skew`` as in
    :func:`synthetic_scores`) is routed by every method with the CUDA kernels (checked against
    the torch version first). Then, per projection (up: ``X[R, d] x W[E, 2n, d]``; down:
    ``X[R, n] x W[E, d, n]``) and implementation (default: the course's best grouped GEMM and
    ``torch._grouped_mm``), the GEMM on that routing's rows is checked against a float32
    reference and timed (median of CUDA events). The routing's own time is recorded too, as
    ``proj="routing"`` rows: the kernels, and the torch version on the GPU.
    """
    shapes = shapes or SPEED_SHAPES
    impls = list(impls or (launch.BEST, "torch._grouped_mm"))
    module = kernels.load(KERNEL_SOURCE)
    rows = []
    for shape, (T, d, n, E, K) in shapes.items():
        base = {"shape": shape, "T": T, "d": d, "n": n, "E": E, "K": K, "tile": tile, "skew": skew}
        scores = synthetic_scores(T, E, skew, seed, device="cuda")
        routings = {}
        for method in methods:
            if progress:
                progress(f"{shape}: routing {method}")
            check_kernel(scores, K, tile, method, module=module, label=shape)
            routings[method] = route_cuda(scores, K, tile, method, module=module).to_routing()
            info_ = stats(routings[method])
            for impl, fn in (("routing kernels", lambda m=method, s=scores, k=K: route_cuda(s, k, tile, m, validate=False,
                                                                                          module=module)),
                             ("routing torch", lambda m=method, s=scores, k=K: route(s, k, tile, m))):
                t = benchmark(fn, warmup=3, reps=20, name=impl)
                rows.append({**base, "method": method, "proj": "routing", "impl": impl, "ms": t.ms,
                             "ms_p10": t.ms_p10, "ms_p90": t.ms_p90, **info_})
        for proj in projections:
            d_in, d_out = (d, 2 * n) if proj == "up" else (n, d)
            g = torch.Generator(device="cuda").manual_seed(seed + 1)
            w = torch.randn(E, d_out, d_in, device="cuda", dtype=torch.bfloat16, generator=g).mul_(d_in ** -0.5)
            for method, routing in routings.items():
                info_ = stats(routing)
                x = torch.randn(routing.num_rows, d_in, device="cuda", dtype=torch.bfloat16, generator=g)
                offs = routing.ends()
                ref = gg.reference(x, w, offs)
                flops = 2.0 * routing.num_rows * d_out * d_in
                for impl in impls:
                    if progress:
                        progress(f"{shape}: {proj} {method} {impl}")
                    fn = gg.implementation(impl)
                    row = {**base, "method": method, "proj": proj, "impl": impl, "M": routing.num_rows,
                           "N": d_out, "Kdim": d_in, "flops": flops, **info_}
                    row.update(gg.check_result(fn, x, w, offs, ref))
                    if "error" not in row:
                        row.update(gg.time_result(fn, x, w, offs, flops=flops, name=impl, reps=50, warmup=5))
                    rows.append(row)
                del x, ref
            del w
    return rows


def speed_record(rows: list[dict], tile: int = DEFAULT_TILE, skew: float = 0.0) -> dict:
    """What is recorded of :func:`measure_speed` (by the notebook and by the benchmark alike)."""
    return {"rows": rows, "speedups": speedups(rows), "paper_speedup": PAPER_SPEEDUP, "tile": tile, "skew": skew,
            "method": "median of CUDA-event timings after warm-up; every GEMM checked against a float32 "
                      "reference first; routing built by the CUDA kernels, checked identical to the torch version"}


def speedups(rows: list[dict]) -> list[dict]:
    """Per (shape, implementation, method): the GEMM time of top-K over the method's, for each
    projection and for up + down together; and the tile-count ratio that predicts it."""
    ms = {(r["shape"], r["impl"], r["method"], r["proj"]): r["ms"] for r in rows if "ms" in r}
    tiles = {(r["shape"], r["method"]): r["tiles"] for r in rows if "tiles" in r}
    out = []
    keys = dict.fromkeys((r["shape"], r["impl"], r["method"]) for r in rows
                         if r["proj"] != "routing" and r["method"] != "top-K")
    for shape, impl, method in keys:
        entry = {"shape": shape, "impl": impl, "method": method,
                 "tile_ratio": tiles[shape, "top-K"] / tiles[shape, method]}
        for proj in ("up", "down"):
            a, b = ms.get((shape, impl, "top-K", proj)), ms.get((shape, impl, method, proj))
            entry[proj] = a / b if a and b else None
        a = [ms.get((shape, impl, "top-K", p)) for p in ("up", "down")]
        b = [ms.get((shape, impl, method, p)) for p in ("up", "down")]
        entry["up+down"] = sum(a) / sum(b) if all(a) and all(b) else None
        out.append(entry)
    return out


def speed_table(rows: list[dict]) -> str:
    """The results of :func:`measure_speed` as text: GEMM times, routing times, speed-ups."""
    out = [f"{'shape':<13}{'proj':<9}{'routing':<9}{'implementation':<26}{'rows':>8}{'tiles':>7}"
           f"{'changed':>9}{'ms':>9}{'TFLOP/s':>9}"]
    for r in rows:
        head = f"{r['shape']:<13}{r['proj']:<9}{r['method']:<9}{r['impl']:<26}{r['rows']:>8}{r['tiles']:>7}" \
               f"{100 * r['changed']:>8.1f}%"
        if "error" in r:
            out.append(f"{head}  {r['error']}")
        else:
            out.append(f"{head}{r['ms']:>9.3f}" + (f"{r['tflops']:>9.0f}" if "tflops" in r else ""))
    out.append("")
    out.append(f"speed-up over top-K (GEMM time of top-K / time of the method; the paper: up to {PAPER_SPEEDUP}x)")
    out.append(f"{'shape':<13}{'implementation':<26}{'routing':<9}{'up':>7}{'down':>7}{'up+down':>9}{'tiles':>8}")
    for s in speedups(rows):
        cells = "".join(f"{s[p]:>{w}.3f}" if s[p] else f"{'-':>{w}}" for p, w in (("up", 7), ("down", 7), ("up+down", 9)))
        out.append(f"{s['shape']:<13}{s['impl']:<26}{s['method']:<9}{cells}{s['tile_ratio']:>8.3f}")
    return "\n".join(out)
