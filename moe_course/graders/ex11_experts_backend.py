"""Grader of exercise 11, an experts backend for Hugging Face ``transformers`` (chapter 10, in torch).

The learner writes what :func:`moe_course.hf.experts_forward` does on a CPU:
``experts_forward(self, hidden_states (T, H), top_k_index (T, K), top_k_weights (T, K)) -> (T, H)``,
where ``self`` is the model's experts module: ``self.gate_up_proj (E, 2I, H)`` (each expert's
gate rows, then its up rows), ``self.down_proj (E, H, I)``; a pair whose id is ``E`` is routed
to no expert here (expert parallelism marks so the experts another GPU holds) and adds nothing.

- :func:`grade_experts_forward` calls it on a stand-in module in float64 at awkward routings (one
  token, an idle expert, every token's first choice on one expert, pairs routed to no expert,
  ``K = 1``) and checks the output and every gradient (the tokens, the routing weights, both
  weights) against the maths written out expert by expert;
- :func:`grade_in_a_model` registers it in transformers' registry and runs two small models built
  from real configs (Qwen3-MoE and Mixtral, narrowed) with it and with transformers' "eager":
  logits, loss and every parameter's gradient must agree.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import hf
from ..checking import CheckFailed, grading, relative_error
from . import Case, as_graded, as_outputs, fresh_seed, random_experts

TITLE = "Exercise 11"
#: The name the learner's backend is registered under for :func:`grade_in_a_model`.
BACKEND = "exercise_11"

#: The course's answers: a learner's function that calls one is refused.
REFERENCES = (hf.experts_forward, hf.experts_torch, hf.experts_kernels)


class Experts(torch.nn.Module):
    """A stand-in for a model's experts module: the two weights in transformers' layout."""

    def __init__(self, gate_up_proj: Tensor, down_proj: Tensor):
        super().__init__()
        self.gate_up_proj = torch.nn.Parameter(gate_up_proj)
        self.down_proj = torch.nn.Parameter(down_proj)
        self.num_experts = gate_up_proj.shape[0]


def reference(module: Experts, x: Tensor, ids: Tensor, weights: Tensor, *, swap_halves: bool = False,
              weighted: bool = True) -> Tensor:
    """The maths expert by expert (float64); the keywords give the usual mistakes."""
    E, two_i, _ = module.gate_up_proj.shape
    out = torch.zeros_like(x)
    for e in range(E):
        t, j = (ids == e).nonzero(as_tuple=True)
        h = x[t] @ module.gate_up_proj[e].T
        gate, up = h[:, :two_i // 2], h[:, two_i // 2:]
        a = F.silu(up) * gate if swap_halves else F.silu(gate) * up
        y = a @ module.down_proj[e].T
        out = out.index_add(0, t, y * weights[t, j, None] if weighted else y)
    return out


def cases(seed: int) -> list[tuple[str, Experts, Tensor, Tensor, Tensor]]:
    """(name, module, hidden_states, top_k_index, top_k_weights), float64, H != I != 2I so a
    weight read the wrong way round fails by its shape."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for name, T, E, K, H, I, empty, unrouted, first_on in (
            ("1 token", 1, 4, 2, 12, 5, None, 0, None),
            ("9 tokens, expert 2 idle", 9, 6, 2, 12, 5, 2, 0, None),
            ("every token's first choice on expert 3", 11, 8, 2, 16, 6, 3, 0, 3),
            ("17 tokens, 4 pairs routed to no expert here (id E)", 17, 8, 3, 12, 5, None, 4, None),
            ("13 tokens, k=1", 13, 4, 1, 8, 3, 0, 0, None)):
        ids = random_experts(Case(T=T, d=1, E=E, K=K, empty=empty), g)
        if first_on is not None:
            ids[:, 0] = first_on
        if unrouted:
            ids.view(-1)[torch.randperm(T * K, generator=g)[:unrouted]] = E
        weights = torch.softmax(torch.randn(T, K, generator=g, dtype=torch.float64), dim=1)
        module = Experts(torch.randn(E, 2 * I, H, generator=g, dtype=torch.float64) / H**0.5,
                         torch.randn(E, H, I, generator=g, dtype=torch.float64) / I**0.5)
        x = torch.randn(T, H, generator=g, dtype=torch.float64)
        out.append((name, module, x, ids, weights))
    return out


#: ``{why: keywords of reference() that give that mistake}``
MISTAKES: dict[str, dict] = {
    "the two halves of gate_up_proj are swapped: an expert's first I rows are the gate (silu(gate) * up), "
    "the next I rows the up projection": {"swap_halves": True},
    "the routing weights are not applied: each pair's output is scaled by its top_k_weights before the sum":
        {"weighted": False},
}


def _call(fn, module, x, ids, weights, where: str):
    try:
        return fn(module, x, ids, weights)
    except IndexError as exc:
        if int(ids.max()) < module.num_experts:
            raise
        raise CheckFailed(f"experts_forward ({where}): {exc}\n  a pair whose id is E = {module.num_experts} is "
                          f"routed to no expert on this GPU and adds nothing: leave it out") from None
    except RuntimeError as exc:
        if "shape" not in str(exc) and "size" not in str(exc):
            raise
        raise CheckFailed(f"experts_forward ({where}): {str(exc).splitlines()[0]}\n  gate_up_proj[e] is (2I, H) and "
                          f"down_proj[e] is (H, I): rows times their transpose (x @ gate_up_proj[e].T)") from None


def grade_experts_forward(experts_forward, seed: int | None = None) -> None:
    """``experts_forward(self, hidden_states, top_k_index, top_k_weights) -> (T, H)``."""
    seed = fresh_seed(seed)
    experts_forward = as_graded(experts_forward, REFERENCES)
    with grading(f"{TITLE} · experts_forward"):
        for name, module, x, ids, weights in cases(seed):
            where = f"{name}, seed {seed}"
            x, weights = x.clone().requires_grad_(), weights.clone().requires_grad_()
            (got,) = as_outputs("experts_forward", _call(experts_forward, module, x, ids.clone(), weights, where), 1,
                                where)
            if not isinstance(got, Tensor) or tuple(got.shape) != tuple(x.shape):
                what = tuple(got.shape) if isinstance(got, Tensor) else type(got).__name__
                raise CheckFailed(f"experts_forward ({where}): expected the tokens' outputs shaped {tuple(x.shape)}, "
                                  f"got {what}")
            want = reference(module, x, ids, weights)
            error = relative_error(got.detach(), want.detach())
            if not error < 1e-10:
                message = f"experts_forward ({where}): relative error {error:.1e} against the maths"
                for why, keywords in MISTAKES.items():
                    if relative_error(got.detach(), reference(module, x, ids, weights, **keywords).detach()) < 1e-10:
                        raise CheckFailed(f"{message}\n  it is what you get if {why}")
                raise CheckFailed(message)
            _check_gradients(module, x, weights, got, want, where)


def _check_gradients(module: Experts, x: Tensor, weights: Tensor, got: Tensor, want: Tensor, where: str) -> None:
    """Every input's gradient, through the learner's output and through the maths, for one
    random direction of the output."""
    inputs = {"hidden_states": x, "top_k_weights": weights, "gate_up_proj": module.gate_up_proj,
              "down_proj": module.down_proj}
    direction = torch.randn(got.shape, generator=torch.Generator().manual_seed(7), dtype=got.dtype)
    if not got.requires_grad:
        raise CheckFailed(f"experts_forward ({where}): no gradient flows back through the output (was it computed "
                          f"under torch.no_grad(), or from .detach() / .data?): training needs all four gradients")
    mine = torch.autograd.grad(got, list(inputs.values()), direction, allow_unused=True)
    theirs = torch.autograd.grad(want, list(inputs.values()), direction, allow_unused=True)
    for (name, _), g_mine, g_want in zip(inputs.items(), mine, theirs, strict=True):
        if g_mine is None:
            raise CheckFailed(f"experts_forward ({where}): no gradient reaches {name} (is it used through .detach(), "
                              f".data or a copy made outside autograd?)")
        error = relative_error(g_mine, g_want)
        if not error < 1e-10:
            raise CheckFailed(f"experts_forward ({where}): the gradient of {name} is {error:.1e} from the maths' "
                              f"(the output was right: does an in-place change or a detached value cut the graph?)")


def register(experts_forward: Callable) -> str:
    """Put ``experts_forward`` in transformers' experts registry as :data:`BACKEND`."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(BACKEND, experts_forward)
    return BACKEND


#: The models :func:`grade_in_a_model` builds: real configs, narrowed (the expert counts and top-K
#: are the real models').
MODELS = ("qwen3_moe", "mixtral")


def grade_in_a_model(experts_forward, seed: int | None = None) -> None:
    """The learner's backend inside two small real-config models, against transformers' eager."""
    from .. import hf_models as hm

    seed = fresh_seed(seed)
    register(as_graded(experts_forward, REFERENCES))
    with grading(f"{TITLE} · in a model"):
        for arch in MODELS:
            config = hm.hf_config(arch, shrink=64, layers=2, vocab=256)
            model = hm.build(config, seed=seed, dtype=torch.float32)
            ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))
            found = hm.compare(model, ids, backends=("eager", BACKEND))[BACKEND]
            where = f"{hm.describe(model)}, seed {seed}"
            if found["missing gradients"]:
                raise CheckFailed(f"in a model ({where}): no gradient reaches {', '.join(found['missing gradients'])} "
                                  f"with your backend")
            for what, tolerance in hm.FLOAT32_TOLERANCE.items():
                if not found[what] <= tolerance:
                    worst = f" (the worst: {found['worst parameter']})" if what == "gradients" else ""
                    raise CheckFailed(f"in a model ({where}): {what} {found[what]:.1e} from eager's, more than "
                                      f"{tolerance:.0e}{worst}")
