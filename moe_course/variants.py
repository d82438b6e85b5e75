"""Every implementation of the MoE layer the course has, in one registry, so that
``benchmarks/bench_moe_variants.py`` (or a notebook) can check and time them all on the same
configurations.

An entry (:class:`Variant`) has a name, a one-line title, a way to say why it cannot run here
(or ``None`` when it can), and a ``run`` that checks, then times, one configuration
(:class:`Case`) and returns table rows. A later chapter adds its implementation with one call:

>>> register(layer_variant("layer-fused", "chapter 06: the fused layer", "course fused layer",
...                        build=lambda w, k: lambda x: my_fused_forward(x, w, k)))

Entries today, in table order:

- ``layer-loop``: chapter 01's layer (:func:`moe_course.moe.moe_forward`), a Python loop over
  the experts with three ``torch.mm`` each;
- ``layer-grouped-mm``: the same layer with the expert step as three ``torch._grouped_mm`` calls
  (:func:`moe_course.moe.experts_forward_grouped_mm`);
- ``layer-course``: the same layer on the course's kernels (:func:`moe_course.layer.forward`:
  chapter 04's routing kernels, chapter 03's gathered up-projection with SwiGLU fused, chapter
  06's down-projection and combine; Hopper only);
- ``sonicmoe``: the SonicMoE library's layer (``pip install sonic-moe``; Hopper or Blackwell);
- ``gemm-ladder``: the expert GEMMs alone, every step of chapters 02 and 03's kernel ladder
  beside a per-expert ``torch.mm`` loop and ``torch._grouped_mm``
  (:func:`moe_course.grouped_gemm.measure_ladder`, GPU only).

A row is a dict: the configuration (``config``, ``T``, ``d``, ``n``, ``E``, ``K``), ``variant``,
``impl``, ``scope`` (``"layer forward"``, ``"up GEMM"``, ``"down GEMM"``), ``status`` (``"ok"``,
``"wrong"``: a result the check rejected; ``"error"``: it raised; ``"refused"``: a shape it does
not take; ``"skipped"``: not timed, ``note`` says why) and, once timed, ``ms``, ``tflops`` and the
error ``rel_err`` found by the check. Only ``"wrong"`` and ``"error"`` fail a run.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import configs, grouped_gemm, layer, moe
from .bench import benchmark, rotate
from .checking import relative_error
from .machine import info
from .records import finite_or_none

#: A layer's bf16 output against the float32 reference of the same routing: one bf16 rounding
#: of each GEMM output gives about 0.5%; the margin covers a library whose own router sends the
#: odd near-tie token to another expert. A wrong layer (a missing weight, a wrong activation,
#: a lost expert) is off by far more.
LAYER_MAX_REL_ERR = 2e-2


@dataclass
class Case:
    """One configuration to measure, and how: shapes, device, dtype, repetitions. Its inputs
    (random bf16 tokens and weights) and the reference output are made once, on first use, and
    shared by every entry."""
    name: str
    shape: configs.MoEShape
    device: str = "cpu"
    dtype: torch.dtype = torch.bfloat16
    reps: int = 20
    warmup: int = 3
    projections: tuple[str, ...] = ("up",)  # for entries that time the expert GEMMs alone
    seed: int = 0
    _cache: dict = field(default_factory=dict, repr=False)

    def row(self, variant: str, impl: str, scope: str, **extra) -> dict:
        return {"config": self.name, **self.shape.as_dict(), "variant": variant, "impl": impl,
                "scope": scope, **extra}

    def inputs(self) -> tuple[list[tuple], moe.MoEWeights]:
        """``(input_sets, weights)``: token sets ``(x,)`` of ``(T, d)``, enough of them to rotate
        past the L2 cache (:func:`moe_course.bench.rotate`), and one layer's weights."""
        if "inputs" not in self._cache:
            T, d, n, E, _ = self.shape
            gen = torch.Generator(device=self.device).manual_seed(self.seed)
            weights = moe.random_weights(d, n, E, dtype=self.dtype, device=self.device, generator=gen)
            sets = rotate(lambda: (torch.randn(T, d, device=self.device, generator=gen).to(self.dtype),),
                          set_bytes=T * d * self.dtype.itemsize)
            self._cache["inputs"] = (sets, weights)
        return self._cache["inputs"]

    def reference(self) -> torch.Tensor:
        """The float32 output of the first token set (:func:`reference_forward`)."""
        if "reference" not in self._cache:
            sets, weights = self.inputs()
            with torch.no_grad():
                self._cache["reference"] = reference_forward(sets[0][0], weights, self.shape.K)
        return self._cache["reference"]

    def release(self) -> None:
        """Free the inputs (gigabytes of weights at full size); a later entry that needs them
        makes them again, the same (same seed)."""
        self._cache.clear()
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()


@dataclass(frozen=True)
class Variant:
    name: str  # for --variants, the table and the record
    title: str  # one line: what it is, and which chapter it comes from
    run: Callable[[Case, Callable[[str], None]], list[dict]]  # (case, progress) -> rows
    unavailable: Callable[[str], str | None] = lambda device: None  # why not on this device
    count: Callable[[Case], int] = lambda case: 1  # progress() calls per case, for the bar


REGISTRY: dict[str, Variant] = {}


def register(variant: Variant) -> Variant:
    """Add an entry (a later chapter's implementation); names are unique."""
    if variant.name in REGISTRY:
        raise ValueError(f"a variant called {variant.name!r} is registered already")
    REGISTRY[variant.name] = variant
    return variant


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}".rstrip(": ")


# --------------------------------------------------------------------------------------------
# Whole layers: checked against a float32 reference of the same routing, then timed


def _experts_float32(x_sorted, offsets, w_gate, w_up, w_down) -> torch.Tensor:
    """The expert step in float32 from the layer's own (bf16) inputs and weights, one expert at
    a time so that no float32 copy of all the weights is made (45 GB for DeepSeek-V3)."""
    bounds = offsets.tolist()
    out = torch.empty(x_sorted.shape, dtype=torch.float32, device=x_sorted.device)
    for e in range(w_gate.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            out[lo:hi] = moe.swiglu(x_sorted[lo:hi].float(), w_gate[e].float(), w_up[e].float(),
                                    w_down[e].float())
    return out


def reference_forward(x: torch.Tensor, w: moe.MoEWeights, k: int) -> torch.Tensor:
    """float32 output of the layer on bf16 ``x`` and ``w``: the router and dispatch of
    :func:`moe_course.moe.moe_forward` (so the routing is the one the bf16 layer chooses; the
    routers have their own tests), experts and combine in float32."""
    return moe.moe_forward(x, w, k, expert_step=_experts_float32).y


def layer_variant(name: str, title: str, impl: str,
                  build: Callable[[moe.MoEWeights, int], Callable[[torch.Tensor], torch.Tensor]],
                  unavailable: Callable[[str], str | None] = lambda device: None) -> Variant:
    """An entry for a whole MoE layer's forward pass (inference: no autograd).

    ``build(weights, k)`` returns ``forward(x) -> y``, ``(T, d) -> (T, d)``: whatever it must
    prepare once (weights in a library's layout, a compiled kernel) happens there, outside the
    timing. The rate counts the expert GEMMs' FLOPs only (``6 T K d n``), so the time spent
    routing, sorting and combining shows as a lower rate.
    """
    def run(case: Case, progress: Callable[[str], None]) -> list[dict]:
        progress(f"{case.name}: {impl}")
        T, d, n, E, K = case.shape
        row = case.row(name, impl, "layer forward", **{"pass": "forward"})
        failure = None
        try:
            sets, weights = case.inputs()
            reference = case.reference()
            with torch.no_grad():
                forward = build(weights, K)
                y = forward(sets[0][0])
            if tuple(y.shape) != (T, d):
                failure = ("wrong", f"wrong result: output shape {tuple(y.shape)}, expected {(T, d)}")
            else:
                err = relative_error(y, reference)
                row["rel_err"] = finite_or_none(err)  # a record holds no NaN
                if not err < LAYER_MAX_REL_ERR:  # NaN fails too
                    failure = ("wrong", f"wrong result: relative error {err:.3g} (limit {LAYER_MAX_REL_ERR:g})")
        except Exception as exc:  # reported in the table; the run's exit code says it failed
            failure = ("error", f"failed: {_first_line(exc)}")
        if failure:
            return [{**row, "status": failure[0], "note": failure[1]}]
        flops = configs.expert_gemm_flops(T, d, n, K)["fwd"]
        with torch.no_grad():
            m = benchmark(forward, sets, name=impl, flops=flops, reps=case.reps, warmup=case.warmup,
                          device=case.device)
        return [{**row, "status": "ok", "flops": flops, **m.timing()}]

    return Variant(name, title, run, unavailable)


def grouped_mm_unavailable(device: str, dtype: torch.dtype = torch.bfloat16) -> str | None:
    """Why ``torch._grouped_mm`` cannot run on ``device`` in ``dtype``, or ``None`` if it can
    (tried on a tiny problem: some builds lack it, some GPUs and dtypes are not supported)."""
    if not hasattr(torch, "_grouped_mm"):
        return f"this torch ({torch.__version__}) has no torch._grouped_mm"
    try:
        x = torch.zeros(16, 16, dtype=dtype, device=device)
        w = torch.zeros(2, 16, 16, dtype=dtype, device=device)
        torch._grouped_mm(x, w, offs=torch.tensor([8, 16], dtype=torch.int32, device=device))
    except Exception as exc:
        where = device if dtype == torch.bfloat16 else f"{device} in {str(dtype).removeprefix('torch.')}"
        return f"torch {torch.__version__}: torch._grouped_mm does not run on {where} ({_first_line(exc)})"
    return None


# --------------------------------------------------------------------------------------------
# SonicMoE (chapter 05): the library's layer, given the course's weights


SONICMOE_PACKAGES = ("sonic-moe", "quack-kernels", "nvidia-cutlass-dsl")


def sonicmoe_versions() -> dict[str, str | None]:
    """The installed versions of SonicMoE and the two packages its kernels come from (None: not
    installed): recorded beside every SonicMoE measurement, since its speed moves with them."""
    import importlib.metadata as md

    found = {}
    for package in SONICMOE_PACKAGES:
        try:
            found[package] = md.version(package)
        except md.PackageNotFoundError:
            found[package] = None
    return found


def sonicmoe_unavailable(device: str) -> str | None:
    try:
        import sonicmoe  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install failing inside its imports
        return (f"`import sonicmoe` fails ({_first_line(exc)}); it needs `pip install sonic-moe` "
                "and a Hopper or Blackwell GPU (chapter 05)")
    if device != "cuda":
        return f"SonicMoE runs on NVIDIA GPUs only, and there is none here ({info().why_no_gpu})"
    cc = info().compute_capability or (0, 0)
    if cc < (9, 0):
        return f"SonicMoE needs a Hopper or Blackwell GPU; this one is compute capability {cc[0]}.{cc[1]}"
    return None


def _sonicmoe_build(w: moe.MoEWeights, k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``sonicmoe.MoE`` holding the course's weights, in its layout (sonicmoe/moe.py): the
    router an ``nn.Linear`` ``(E, d)``; ``c_fc.weight`` ``(E, 2n, d)`` with the gate and up rows
    interleaved (gate in the even rows: its SwiGLU takes ``x[..., ::2]`` as the gate);
    ``c_proj.weight`` ``(E, d, n)``. Built on the meta device, so no weights of its own are made."""
    from sonicmoe import KernelBackendMoE, MoE
    from sonicmoe.enums import ActivationType

    E, d, n = w.w_gate.shape
    with torch.device("meta"):
        layer = MoE(num_experts=E, num_experts_per_tok=k, hidden_size=d, intermediate_size=n,
                    activation_function=ActivationType.SWIGLU, add_bias=False, std=0.02)
    gate_up = torch.stack((w.w_gate.transpose(1, 2), w.w_up.transpose(1, 2)), dim=2).reshape(E, 2 * n, d)
    layer.router.weight = torch.nn.Parameter(w.w_router.t().contiguous(), requires_grad=False)
    layer.c_fc.weight = torch.nn.Parameter(gate_up.contiguous(), requires_grad=False)
    layer.c_proj.weight = torch.nn.Parameter(w.w_down.transpose(1, 2).contiguous(), requires_grad=False)
    layer.eval()  # inference: it keeps nothing for a backward pass
    return lambda x: layer(x, kernel_backend_moe=KernelBackendMoE.sonicmoe)[0]


# --------------------------------------------------------------------------------------------
# The expert GEMMs alone: chapter 02's ladder


def _ladder_run(case: Case, progress: Callable[[str], None]) -> list[dict]:
    """Every step of chapter 02 (and the two torch baselines) on the configuration's expert GEMMs,
    checked against a float32 reference, then timed, by :func:`grouped_gemm.measure_ladder`. Its
    routing: token-choice top-K of random logits (the same spread of rows as the layer's)."""
    case.release()  # it makes problems of its own: free the layer's weights first (GBs at full size)
    measured = grouped_gemm.measure_ladder({case.name: tuple(case.shape)}, case.projections,
                                           (("uniform", 0.0),), seed=case.seed, progress=progress)
    rows = []
    for proj in case.projections:  # what measure_ladder leaves out, said so rather than missing
        timed = {r["impl"] for r in measured if r["proj"] == proj}
        rows += [case.row("gemm-ladder", impl, f"{proj} GEMM", proj=proj, routing="uniform", status="skipped",
                          note=f"not timed: over {grouped_gemm.SLOW_STEP_MAX_FLOPS / 1e12:g} TFLOP, a naive step "
                               "takes seconds per call")
                 for impl in grouped_gemm.IMPLEMENTATIONS if impl not in timed]
    for r in measured:
        row = case.row("gemm-ladder", r["impl"], f"{r['proj']} GEMM", proj=r["proj"], routing=r["routing"],
                       flops=r["flops"])
        if "error" in r:
            wrong = r["error"].startswith("wrong result")
            rows.append({**row, "status": "wrong" if wrong else "refused", "note": r["error"],
                         **({"rel_err": r["rel_err"]} if "rel_err" in r else {})})
        else:
            rows.append({**row, "status": "ok", **{k: r[k] for k in ("ms", "ms_p10", "ms_p90", "reps", "tflops",
                                                                     "rel_err")}})
    order = grouped_gemm.IMPLEMENTATIONS  # teaching order, per projection
    return sorted(rows, key=lambda r: (case.projections.index(r["proj"]), order.index(r["impl"])))


def hopper_unavailable(device: str) -> str | None:
    """Chapter 03's kernels need sm_90a (wgmma, TMA, setmaxnreg)."""
    if device != "cuda" or not info().has_gpu:
        return f"needs a Hopper GPU ({info().why_no_gpu or 'this run is on the CPU'})"
    cc = info().compute_capability or (0, 0)
    return None if cc >= (9, 0) else f"needs a Hopper GPU (sm_90a); this one is compute capability {cc[0]}.{cc[1]}"


def _ladder_unavailable(device: str) -> str | None:
    # The ladder's kernels are CUDA C launched through CuPy: a GPU or nothing.
    return None if device == "cuda" and info().has_gpu else f"needs an NVIDIA GPU ({info().why_no_gpu})"


# --------------------------------------------------------------------------------------------
# The registry, in table order. Later chapters: add one register(...) each, below.

register(layer_variant(
    "layer-loop", "chapter 01's layer: router, sort by expert, a torch.mm loop over experts, combine",
    "torch loop", build=lambda w, k: lambda x: moe.moe_forward(x, w, k).y))
register(layer_variant(
    "layer-grouped-mm", "the same layer, its expert step as three torch._grouped_mm calls",
    "torch._grouped_mm", build=lambda w, k: lambda x: moe.moe_forward(x, w, k, expert_step="grouped_mm").y,
    unavailable=grouped_mm_unavailable))
register(layer_variant(
    "layer-course", "the same layer on the course's kernels: routing (04_1), gathered up-projection + SwiGLU "
    "(03_4), down-projection (06_1), combine (06_4)", "course kernels",
    build=lambda w, k: (lambda kw: lambda x: layer.forward(x, kw, k))(layer.prepare(w)),
    unavailable=hopper_unavailable))
register(layer_variant(
    "sonicmoe", "SonicMoE's layer (chapter 05), given the same weights", "SonicMoE", build=_sonicmoe_build,
    unavailable=sonicmoe_unavailable))
register(Variant(
    "gemm-ladder", "the expert GEMMs alone: the kernel ladder of chapters 02-03, a torch.mm loop, torch._grouped_mm",
    _ladder_run, _ladder_unavailable, count=lambda case: len(case.projections) * len(grouped_gemm.IMPLEMENTATIONS)))
