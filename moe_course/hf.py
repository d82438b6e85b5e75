"""The course's MoE layer inside real models: a Hugging Face ``transformers`` experts backend
(chapter 10).

Since transformers 5 every MoE model there (Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V3, ...) sends
its experts through one registry, ``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS``,
chosen per model with ``AutoModelForCausalLM.from_config(cfg, experts_implementation=NAME)``
(or ``model.set_experts_implementation(NAME)``). The model keeps its own router; a backend is
handed the experts module and each token's ``K`` experts and weights, and does the rest:
gather, up-projection, activation, down-projection, weighted combine, forward and backward.

>>> from moe_course import hf
>>> hf.register()                                   # once; importing moe_course never imports transformers
>>> model = AutoModelForCausalLM.from_config(cfg, experts_implementation="moe_course")

What a backend is given (transformers' layout, not the course's):

- ``self.gate_up_proj`` ``(E, 2I, H)``: each expert's gate rows, then its up rows
  (``is_concatenated``); ``self.down_proj`` ``(E, H, I)``; both ``(out, in)``, as ``nn.Linear``
  stores weights (``is_transposed=False``);
- ``hidden_states (T, H)``, ``top_k_index (T, K)`` and ``top_k_weights (T, K)``: the router's
  choice. An index equal to ``E`` means "no expert here": expert parallelism sends the pairs
  that belong to another GPU's experts there, with weight 0.

:func:`experts_forward` asks :func:`why_not_kernels` on each call whether the course's kernels
can take it. Where they can (a Hopper GPU, bf16, widths of the kernels' multiples; with no
gradient wanted: inference and ``generate()``), :func:`experts_kernels` runs them on the module's
own parameters, with no copy: ``gate_up_proj`` through a 4-D tensor map that interleaves its
gate and up halves in the load (``kernels/10_1_hf_swiglu.cu``), ``down_proj`` as it is (03_2),
06_4's combine; where a gradient is wanted, :class:`KernelExperts` adds chapter 06's backward on
the same layout (10_2, 10_5, 10_3, 10_4). Elsewhere the course's maths runs in torch: chapter 01's dispatch (:func:`moe_course.moe.dispatch`, pairs
sorted by expert), one grouped product on the concatenated ``[gate; up]`` rows, SwiGLU, the
down-projection, chapter 01's combine, on ``torch._grouped_mm`` where it can, else one product
per expert (:data:`moe_course.layer.TORCH_OPS`). Which one ran, and why, is printed once, in
one line.

What the maths cannot take (a bias, weights stored ``(E, in, out)`` or with gate and up rows
interleaved, an activation other than SiLU, a gating of the model's own that clips, a norm after
each expert) is refused by :func:`check_experts` with every field and value named: never a
wrong answer.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import layer, moe, variants
from .checks import check_ids_in_range, check_same_dtype, require

#: The backend's name in transformers' registry: ``experts_implementation="moe_course"``.
NAME = "moe_course"


def register() -> str:
    """Add :func:`experts_forward` to transformers' experts registry as :data:`NAME`; returns the
    name. Calling it again changes nothing (the registry is a dict: same key, same function)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(NAME, experts_forward)
    return NAME


def is_registered() -> bool:
    """Whether transformers is imported and knows :data:`NAME` (never imports it itself)."""
    import sys

    registry = sys.modules.get("transformers.integrations.moe")
    return registry is not None and registry.ALL_EXPERTS_FUNCTIONS.get(NAME) is experts_forward


# --------------------------------------------------------------------------------------------
# What the course's maths takes, and what it refuses


def problems(experts: torch.nn.Module) -> list[str]:
    """Every feature of a transformers experts module that the course's SwiGLU maths does not
    have, each as ``field=value (why)``; empty when the module fits."""
    from transformers.activations import SiLUActivation
    from transformers.integrations.moe import _default_apply_gate

    found = []
    if not getattr(experts, "has_gate", True):
        found.append("has_gate=False (an up_proj and an activation, no gate: the course's experts are SwiGLU)")
    if getattr(experts, "has_bias", False):
        found.append("has_bias=True (the experts add a bias; the course's have none)")
    if getattr(experts, "is_transposed", False):
        found.append("is_transposed=True (weights stored (E, in, out); the course reads transformers' "
                     "default (E, out, in))")
    if not getattr(experts, "is_concatenated", True):
        found.append("is_concatenated=False (gate and up rows interleaved; the course reads all gate rows, "
                     "then all up rows)")
    if getattr(experts, "has_post_expert_norm", False):
        found.append("has_post_expert_norm=True (a norm after each expert, before the combine)")
    own_gate = getattr(type(experts), "_apply_gate", _default_apply_gate)
    if own_gate is not _default_apply_gate:
        clips = ", ".join(f"{name}={getattr(experts, name)}" for name in ("limit", "alpha")
                          if getattr(experts, name, None) is not None)
        found.append(f"{type(experts).__name__}._apply_gate is the model's own gating"
                     f"{f' ({clips}: it clips or rescales the gate and up halves)' if clips else ''}, "
                     "not silu(gate) * up")
    act_fn = getattr(experts, "act_fn", None)
    if act_fn is not None and not isinstance(act_fn, (SiLUActivation, torch.nn.SiLU)):
        config = getattr(experts, "config", None)
        field = (f"config.hidden_act={config.hidden_act!r}" if hasattr(config, "hidden_act")
                 else f"act_fn={type(act_fn).__name__}")
        found.append(f"{field} (the course's experts are SwiGLU: silu(gate) * up; only 'silu' is taken)")
    return found


def check_experts(experts: torch.nn.Module) -> None:
    """Refuse an experts module the course's maths cannot run, naming every reason at once."""
    found = problems(experts)
    require(not found, lambda: f"the {NAME} experts backend cannot run {type(experts).__name__}: "
                               + "; ".join(found))


def experts_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """``model``'s experts modules by name: those whose ``down_proj`` is one 3-D parameter for all
    experts (transformers' layout; a dense MLP's ``down_proj`` is an ``nn.Linear``)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(getattr(m, "down_proj", None), torch.nn.Parameter) and m.down_proj.dim() == 3}


def check_model(model: torch.nn.Module) -> list[str]:
    """:func:`check_experts` on every experts module of ``model``, before any forward; returns
    their names."""
    modules = experts_modules(model)
    for m in modules.values():
        check_experts(m)
    return list(modules)


def check_call(experts, hidden_states, top_k_index, top_k_weights) -> None:
    """The module, then the call's shapes, dtypes and expert ids (``0..E``; ``E``: no expert).
    A wrong id is refused, never routed to some expert's rows silently: at once on a CPU, one
    experts call later on a GPU (:func:`ids_checked`: no host synchronisation)."""
    check_experts(experts)
    w_up, w_down = experts.gate_up_proj, experts.down_proj
    require(w_up.dim() == 3 and w_up.shape[1] % 2 == 0,
            lambda: f"gate_up_proj must be (E, 2I, H), got {tuple(w_up.shape)}")
    E, two_I, H = w_up.shape
    require(tuple(w_down.shape) == (E, H, two_I // 2),
            lambda: f"down_proj must be (E, H, I) = {(E, H, two_I // 2)} next to gate_up_proj {tuple(w_up.shape)}, "
                    f"got {tuple(w_down.shape)}")
    check_same_dtype({"gate_up_proj": w_up, "down_proj": w_down})
    require(hidden_states.dim() == 2 and hidden_states.shape[1] == H,
            lambda: f"hidden_states must be (T, H) with H={H}, got {tuple(hidden_states.shape)}")
    T = hidden_states.shape[0]
    require(top_k_index.dim() == 2 and top_k_index.shape[0] == T and top_k_weights.shape == top_k_index.shape,
            lambda: f"top_k_index and top_k_weights must both be (T, K) with T={T}, got "
                    f"{tuple(top_k_index.shape)} and {tuple(top_k_weights.shape)}")
    require(not top_k_index.is_floating_point() and top_k_index.dtype != torch.bool,
            lambda: f"top_k_index must hold integer expert ids, got {top_k_index.dtype}")
    ids_checked(top_k_index, E)


# --------------------------------------------------------------------------------------------
# The id check without a host synchronisation
#
# Reading two numbers back from the GPU on every call stops the host until the GPU has caught up
# with everything queued before it, once per MoE block, and then the GPU waits while the host
# queues the next launches. Measured (H100, session 14, the experts call alone, forward and
# backward): Qwen3 4.69 -> 4.06 ms at 8192 tokens, OLMoE 5.92 -> 4.72, without that read. So on a
# GPU the ids' range is copied to pinned memory behind the call and looked at by the next call
# (or this call's backward); meanwhile an id outside 0..E counts as "no expert" (kernel_routing,
# kept_weights): weighted zero, no memory outside any expert read. A wrong id is still refused,
# one experts call later, with its values named: ``raise_id_errors(wait=True)`` asks at once.

_ID_CHECKS: list[tuple[torch.Tensor, object, int]] = []  # (pinned [min, max], its copy's event, E)


def _describe_ids(lo: int, hi: int, E: int) -> str:
    return f"top_k_index must index experts (0..{E - 1}), or {E} for no expert: values 0..{E}; got {lo}..{hi}"


def ids_checked(top_k_index: torch.Tensor, E: int) -> None:
    """Check the expert ids of a call: at once on a CPU; on a GPU, their range copied behind the
    call and checked by the next one (:func:`raise_id_errors`), no host synchronisation."""
    raise_id_errors()
    if not top_k_index.is_cuda:
        check_ids_in_range(top_k_index, E + 1, "top_k_index", f"experts (0..{E - 1}), or {E} for no expert")
        return
    if top_k_index.numel() == 0 or torch.cuda.is_current_stream_capturing():
        return  # a CUDA graph's capture: nothing may be read back, even later (the ids still add zero)
    lo_hi = torch.stack(torch.aminmax(top_k_index)).long()
    pinned = torch.empty(2, dtype=torch.long, pin_memory=True)
    pinned.copy_(lo_hi, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    _ID_CHECKS.append((pinned, done, E))


def raise_id_errors(wait: bool = False) -> None:
    """Refuse, with their values, the ids of earlier calls found outside ``0..E`` (ValueError):
    those whose copy has arrived, or (``wait``) all of them."""
    while _ID_CHECKS and not torch.cuda.is_current_stream_capturing():
        pinned, done, E = _ID_CHECKS[0]
        if not wait and not done.query():
            return
        done.synchronize()
        _ID_CHECKS.pop(0)
        lo, hi = pinned.tolist()
        if not (0 <= lo and hi <= E):
            raise ValueError(_describe_ids(lo, hi, E) + " (an earlier experts call: its pairs with such ids "
                             "were weighted zero)")


# --------------------------------------------------------------------------------------------
# Kernels or torch: decided on each call, said once


def why_not_kernels(experts, hidden_states) -> str | None:
    """Why this call does not run on the course's kernels, or ``None`` where it does. The
    conditions are :func:`moe_course.layer.kernels_unavailable`'s (a Hopper GPU, bf16, widths of
    the kernels' multiples) and the weights in bf16 too."""
    H, I = experts.down_proj.shape[1:]
    why = layer.kernels_unavailable(hidden_states, H, I)
    if why is None and experts.gate_up_proj.dtype != torch.bfloat16:
        why = f"the kernels take bf16 weights, these are {experts.gate_up_proj.dtype}"
    return why


@functools.lru_cache(maxsize=None)
def _grouped_mm_runs_here(device: str, dtype: torch.dtype) -> str | None:
    return variants.grouped_mm_unavailable(device, dtype)  # a tiny trial run, once per device and dtype


def torch_products(experts) -> tuple[layer.Ops, str]:
    """The products of the torch maths on these experts' weights: ``torch._grouped_mm`` (no host
    sync; CUTLASS on a GPU) where it runs in their dtype and ``H``, ``I`` fit it; else one
    product per expert. Returns the ops and what they are, in words."""
    w = experts.down_proj
    H, I = w.shape[1:]
    why = _grouped_mm_runs_here(w.device.type, w.dtype) or moe.grouped_mm_misaligned(w.dtype, H=H, I=I)
    return (layer.TORCH_OPS, f"a per-expert loop: {why}") if why else (layer.GROUPED_MM_OPS, "torch._grouped_mm")


_SAID: set[str] = set()


def say_once(line: str) -> None:
    """Print ``line`` the first time it comes (a model calls its experts once per layer per step)."""
    if line not in _SAID:
        _SAID.add(line)
        print(line)


# --------------------------------------------------------------------------------------------
# The backend


def experts_torch(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, ops: layer.Ops):
    """The course's maths in transformers' layout, in torch (autograd gives the backward):

    1. sort the ``T*K`` pairs by expert (chapter 01's :func:`~moe_course.moe.dispatch`); pairs
       routed to no expert (id ``E``) are kept out and sorted last;
    2. gather each pair's token row: ``x_sorted (R, H)``;
    3. one grouped product with the concatenated ``[gate; up]`` rows, read as they are stored
       (``gate_up_proj[e]`` is ``(2I, H)``, so rows times its transpose, a view: no copy);
    4. SwiGLU on the two halves: ``silu(gate) * up``, ``(R, I)``;
    5. the down-projection, ``down_proj[e]`` ``(H, I)`` read transposed the same way;
    6. chapter 01's :func:`~moe_course.moe.combine`: back to token order, each token's ``K`` rows
       summed with their weights (a pair routed to no expert adds zero).

    ``ops``: :data:`moe_course.layer.GROUPED_MM_OPS` or :data:`moe_course.layer.TORCH_OPS`.
    ``top_k_index`` as :func:`check_call` has checked it (on a GPU, its check arrives with the
    next call; meanwhile an id outside ``0..E`` adds zero, as ``E`` does).
    """
    E = gate_up_proj.shape[0]
    routed = routed_pairs(top_k_index, E)
    d = moe.dispatch(top_k_index.where(routed, 0), E, keep=routed, validate=False)
    if d.kept == 0:  # every pair went to another GPU's experts: nothing to add here
        return torch.zeros_like(hidden_states)
    ends = d.offsets[1:].to(torch.int32)
    x = hidden_states.to(gate_up_proj.dtype)  # as transformers' grouped_mm: the weights' dtype (autocast)
    h = ops.times_w(moe.permute(x, d), gate_up_proj.transpose(1, 2), ends)  # (R, 2I): gate | up
    gate, up = h.chunk(2, dim=-1)
    y_sorted = ops.times_w(F.silu(gate) * up, down_proj.transpose(1, 2), ends)  # (R, H)
    # The combine in the routing weights' precision, as transformers' own backends multiply: Mixtral
    # and DeepSeek-V3 hand them over in float32, and rounding them to bf16 (by 0.2%) for a bf16 sum
    # added about half a bf16 rounding to the output and to their gradient: enough to flip a
    # near-tied top-K in the next layer (tiny Mixtral, torch 2.11: logits 3.3e-2 from eager, where
    # transformers' grouped_mm is 4.5e-3). bf16 weights (Qwen3-MoE, OLMoE): unchanged, bf16.
    acc = torch.promote_types(y_sorted.dtype, top_k_weights.dtype)
    return moe.combine(y_sorted.to(acc), d, top_k_weights.to(acc)).to(hidden_states.dtype)


def kernel_routing(top_k_index: torch.Tensor, num_experts: int):
    """The kernels' routing from the model's own choice, with no host synchronisation:
    ``(gather_idx, offs, pos)``, int32, and ``order`` (int64: the pair, ``t * K + j``, of each
    sorted row). Pairs sorted by expert (stable: token order within an expert); ``offs`` from a
    search in the sorted ids, not ``torch.bincount`` (which reads its size back).

    Pairs routed to no expert (id ``E``) sort last and are counted among the last expert's rows:
    computed like its own, then weighted zero (:func:`kept_weights`). So every row a kernel reads
    was written: 06_3 reads up to 63 rows past an expert's end, multiplied by zeros, and rows
    left unwritten could hold NaN, which zero does not cancel (compute-sanitizer's memcheck
    showed it, H100, session 11: NaN in gate_up_proj's gradient)."""
    T, K = top_k_index.shape
    flat = top_k_index.reshape(-1).long()
    # id E sorts last either way; an id outside 0..E (refused one call later: ids_checked) as E
    key, order = torch.sort(torch.where(flat >= 0, flat, num_experts).clamp(max=num_experts - 1), stable=True)
    i32 = torch.int32
    gather_idx = (order // K).to(i32)
    offs = torch.searchsorted(key, torch.arange(num_experts, device=key.device), right=True).to(i32)
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel(), device=order.device)
    return gather_idx, offs, pos.to(i32).view(T, K), order


def routed_pairs(top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The pairs routed to an expert (id in ``0..E-1``): not those sent to no expert (``E``), nor,
    until :func:`ids_checked` refuses them one call later, those with an id outside ``0..E``."""
    return (top_k_index >= 0) & (top_k_index < num_experts)


def kept_weights(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The routing weights the kernels combine with, in float32: zero for a pair routed to no
    expert (its row is computed, :func:`kernel_routing`, and must add nothing)."""
    return top_k_weights.float().where(routed_pairs(top_k_index, num_experts), 0.0).contiguous()


def experts_kernels(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj):
    """The forward on the course's kernels, on the module's own parameters (no copy): the
    gathered up-projection with SwiGLU reading ``gate_up_proj`` through its 4-D tensor map
    (``kernels/10_1_hf_swiglu.cu``), the down-projection on ``down_proj (E, H, I)`` as it is
    (03_2: ``[E, N, K]``), 06_4's weighted combine in float32. Inference only: nothing is kept."""
    from . import launch

    E = gate_up_proj.shape[0]
    gather_idx, offs, pos, _ = kernel_routing(top_k_index, E)
    x = hidden_states.contiguous()
    a, _ = launch.hf_swiglu_grouped_gemm(x, gather_idx, gate_up_proj, offs, store_h=False, validate=False)
    y_sorted = launch.grouped_gemm(a, down_proj, offs, validate=False)
    return launch.combine(y_sorted, pos, kept_weights(top_k_index, top_k_weights, E), validate=False)


class KernelExperts(torch.autograd.Function):
    """``KernelExperts.apply(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj)``:
    the experts call on the course's kernels, forward and backward, on transformers' layout with
    no copy of the weights. Kept for the backward, as chapter 06's layer keeps: X, the
    pre-activation H and the routing. The backward (chapter 06's, one kernel each):

    - 10_2: dA' = gathered dout @ down_proj[e], read MN-major, with 06_2's SwiGLU backward:
      dH (interleaved like H), s * A and each row's routing-weight gradient ds;
    - 10_5: down_proj's gradient (E, H, I) = dout_e^T (s A)_e, dout gathered as 06_3 gathers
      its X, the tile stored as accumulated (06_3 holds it transposed: here that is down_proj's
      layout);
    - 10_3: dX's rows = dH @ gate_up_proj[e] through the 4-D map; 06_4 sums each token's rows;
    - 10_4: gate_up_proj's gradient = dH_e^T x_gathered, stored in gate | up order;
    - the routing weights' gradient: each pair's ds (zero for a pair routed to no expert, whose
      row was computed with weight zero: :func:`kernel_routing`)."""

    @staticmethod
    def forward(ctx, hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj):
        from . import launch

        E = gate_up_proj.shape[0]
        gather_idx, offs, pos, order = kernel_routing(top_k_index, E)
        x = hidden_states.contiguous()
        a, h = launch.hf_swiglu_grouped_gemm(x, gather_idx, gate_up_proj, offs, validate=False)
        y_sorted = launch.grouped_gemm(a, down_proj, offs, validate=False)
        weights = kept_weights(top_k_index, top_k_weights, E)
        out = launch.combine(y_sorted, pos, weights, validate=False)
        ctx.dtype = top_k_weights.dtype
        ctx.save_for_backward(x, h, gather_idx, offs, pos, order, weights, top_k_index, gate_up_proj, down_proj)
        return out

    @staticmethod
    def backward(ctx, dout):
        from . import launch

        x, h, gather_idx, offs, pos, order, weights, top_k_index, gate_up_proj, down_proj = ctx.saved_tensors
        dout = dout.contiguous().to(x.dtype)
        row_scale = weights.reshape(-1)[order]  # each sorted row's routing weight (0: no expert)
        dh, sa, ds = launch.hf_dswiglu_grouped_gemm(dout, gather_idx, down_proj, h, row_scale, offs, validate=False)
        d_down = launch.hf_weight_grad_down(sa, dout, gather_idx, offs, validate=False)
        del sa
        dx = launch.combine(launch.hf_transposed_b_grouped_gemm(dh, gate_up_proj, offs, validate=False), pos, None,
                            validate=False)
        d_gate_up = launch.hf_weight_grad_gate_up(dh, x, gather_idx, offs, validate=False)
        raise_id_errors()  # the forward's ids, where their check has arrived
        # a pair routed to no expert: its weight is no parameter
        d_weights = torch.where(routed_pairs(top_k_index, gate_up_proj.shape[0]), ds[pos.long()], 0.0).to(ctx.dtype)
        return dx.to(x.dtype), None, d_weights, d_gate_up, d_down


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """The ``"moe_course"`` experts backend: ``self`` is the model's experts module,
    ``hidden_states (T, H)``, ``top_k_index`` and ``top_k_weights (T, K)`` -> ``(T, H)``.

    The kernels run where :func:`why_not_kernels` returns ``None`` (:func:`experts_kernels`);
    otherwise the torch maths (:func:`experts_torch`), the reason said once.
    """
    check_call(self, hidden_states, top_k_index, top_k_weights)
    needs_grad = torch.is_grad_enabled() and (hidden_states.requires_grad or top_k_weights.requires_grad
                                               or self.gate_up_proj.requires_grad or self.down_proj.requires_grad)
    why = why_not_kernels(self, hidden_states)
    if why is None and needs_grad:
        say_once(f"{NAME} experts: the course's kernels, forward and backward (10_1, 03_2, 06_4; 10_2, 10_5, "
                 "10_3, 10_4), on the model's own weights")
        return KernelExperts.apply(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj)
    if why is None:
        say_once(f"{NAME} experts: the course's kernels (10_1, 03_2, 06_4) on the model's own weights")
        return experts_kernels(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj)
    ops, products = torch_products(self)
    say_once(f"{NAME} experts: {why}: running the torch maths ({products})")
    return experts_torch(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj, ops)
