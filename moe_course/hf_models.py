"""Chapter 10's models: Qwen3-MoE, Mixtral, OLMoE and DeepSeek-V3 from Hugging Face
``transformers``, built from their configurations with random weights (nothing is downloaded),
run with each experts backend and compared: logits, loss, every parameter's gradient, a few
training steps, greedy generation, time.

The sizes are the real models' (:mod:`moe_course.configs`: ``d``, ``n``, ``E``, ``K``, the
vocabulary) with two layers. Without a GPU, :func:`sizes_here` narrows them: ``d``, ``n`` and
the attention heads divided by 32 and a 1024-token vocabulary, every expert count and top-K
kept, so that the chapter runs in well under a minute on two CPU cores.

One model is built per architecture and switched between backends
(``model.set_experts_implementation``: :func:`use`), so every backend runs on the very same
weights.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from . import configs, hf, moe, plotting, records, variants
from .bench import interleaved
from .checking import relative_error
from .machine import info, one_thread

#: The backends chapter 10 compares: transformers' per-expert loop (the reference), its
#: ``torch._grouped_mm`` path, and the course's (:data:`moe_course.hf.NAME`).
BACKENDS = ("eager", "grouped_mm", hf.NAME)
REFERENCE = "eager"
#: transformers' own backend for SonicMoE's kernels (``transformers.integrations.sonicmoe``),
#: a fourth contender where the ``sonic-moe`` package is installed (:func:`sonicmoe_here`)
SONICMOE = "sonicmoe"


def sonicmoe_here() -> str | None:
    """Why transformers' "sonicmoe" backend cannot run here, or None after readying it.

    That backend fetches SonicMoE from the Hugging Face hub (``kernels-community/sonic-moe``,
    through the ``kernels`` package) on first use, which a machine without a network cannot. The
    release on PyPI (``sonic-moe``, the course's offline bundle: ``.sonic/README.txt``) exposes the
    same two entry points the backend calls (``moe_general_routing_inputs`` and
    ``enums.ActivationType``), so where it is installed it is handed to transformers in place of
    the download: transformers' own ``sonicmoe_experts_forward`` then runs, unchanged, on it."""
    why = variants.sonicmoe_unavailable(moe.device())
    if why:
        return why
    import sonicmoe
    from transformers.integrations import sonicmoe as backend

    if backend._SONICMOE is None:  # what its loader would set after the hub download
        backend._SONICMOE = backend.SonicMoE(activation_type_enum=sonicmoe.enums.ActivationType,
                                             moe_general_routing_inputs=sonicmoe.moe_general_routing_inputs)
    return None


def backends_here() -> tuple[str, ...]:
    """:data:`BACKENDS`, and SonicMoE's where it runs (:func:`sonicmoe_here`)."""
    return BACKENDS + ((SONICMOE,) if sonicmoe_here() is None else ())


@dataclass(frozen=True)
class Architecture:
    """How one model family names the course's five numbers in its transformers configuration.
    ``record``: the course's cited record of the real model (``d``, ``n``, ``E``, ``K``, vocabulary);
    ``n_field``, ``experts_field``: transformers' names for ``n`` and ``E``; ``narrowed``: the
    further widths divided with ``d`` on a CPU; ``real``: the real model's values where the
    configuration class's defaults differ."""
    record: configs.MoEConfig
    config_class: str
    n_field: str
    experts_field: str
    narrowed: tuple[str, ...] = ("num_attention_heads", "num_key_value_heads")
    real: dict = field(default_factory=dict)


ARCHITECTURES = {
    # Qwen3-30B-A3B's config.json: the class's defaults are it, except head_dim (128, where the
    # default would be hidden_size / heads = 64) and norm_topk_prob (true).
    "qwen3_moe": Architecture(configs.QWEN3_30B_A3B, "Qwen3MoeConfig", "moe_intermediate_size", "num_experts",
                              real={"head_dim": 128, "norm_topk_prob": True}),
    "mixtral": Architecture(configs.MIXTRAL_8X7B, "MixtralConfig", "intermediate_size", "num_local_experts"),
    "olmoe": Architecture(configs.OLMOE_1B_7B, "OlmoeConfig", "intermediate_size", "num_experts"),
    # MLA's two low-rank bottlenecks and the dense FFN of the first blocks narrow with d; the
    # first block stays dense (the real model has 3 dense blocks, then 58 MoE blocks).
    "deepseek_v3": Architecture(configs.DEEPSEEK_V3, "DeepseekV3Config", "moe_intermediate_size", "n_routed_experts",
                                narrowed=("num_attention_heads", "num_key_value_heads", "q_lora_rank",
                                          "kv_lora_rank", "intermediate_size"),
                                real={"first_k_dense_replace": 1}),
}


@dataclass(frozen=True)
class Sizes:
    """What this machine runs: widths divided by ``shrink``, ``vocab`` tokens (None: the real
    vocabulary), ``layers`` blocks, batches of ``batch`` sequences of ``seq`` tokens, in
    ``dtype`` on ``device``; ``why``: one line saying so."""
    shrink: int
    vocab: int | None
    layers: int
    batch: int
    seq: int
    dtype: torch.dtype
    device: str
    why: str


def sizes_here() -> Sizes:
    """Real widths in bf16 on a GPU; narrowed, in float32, on a CPU."""
    if moe.device() == "cuda":
        # 8192 tokens a step, training's size (issue 30: "8-16k"): at 2048 the experts call is
        # launch-bound (session 14: the host, not the GPU, set its time on an H200)
        return Sizes(1, None, 2, 16, 512, torch.bfloat16, "cuda",
                     "GPU: the real widths, expert counts, top-K and vocabularies, 2 blocks, 16 x 512 tokens, bf16")
    return Sizes(32, 1024, 2, 2, 16, torch.float32, "cpu",
                 f"no GPU ({info().why_no_gpu}): d, n and the attention heads divided by 32, a 1024-token "
                 "vocabulary, 2 blocks, 2 sequences of 16 tokens, float32; the expert counts and top-K are "
                 "the real models'")


def hf_config(arch: str, *, shrink: int = 1, layers: int = 2, vocab: int | None = None, **overrides):
    """The transformers configuration of ``arch`` (a key of :data:`ARCHITECTURES`): the real
    model's numbers with ``layers`` blocks, widths divided by ``shrink``, ``vocab`` tokens
    (None: the real vocabulary); no special tokens (random weights have no words)."""
    import transformers

    a = ARCHITECTURES[arch]
    config_class = getattr(transformers, a.config_class)
    defaults = config_class()
    r = a.record
    values = {"hidden_size": r.d, a.n_field: r.n, a.experts_field: r.E, "num_experts_per_tok": r.K,
              "vocab_size": vocab or r.vocab, "num_hidden_layers": layers, **a.real}
    for width in ("hidden_size", a.n_field, *a.narrowed):
        values[width] = max(1, values.get(width, getattr(defaults, width)) // shrink)
    values.update(bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    return config_class(**{**values, **overrides})


def build(config, backend: str = REFERENCE, *, seed: int = 0, dtype=torch.float32, device: str = "cpu"):
    """A causal LM with random weights from ``config`` (seeded: the same weights every time),
    on ``backend``, made where it will run (DeepSeek-V3's real MoE block alone is 22 GB in bf16:
    no detour through the host). The course's backend is registered first."""
    from transformers import AutoModelForCausalLM

    hf.register()
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, experts_implementation=backend, dtype=dtype)


def for_each_model(sizes: Sizes, work, archs=tuple(ARCHITECTURES), narrowed: dict | None = None) -> dict:
    """``{arch: work(model, input_ids)}`` over the architectures, each model built at ``sizes``,
    worked on, and freed before the next is built: on a GPU, DeepSeek-V3's one MoE block is 22 GB
    in bf16 (44 with its gradients), so the four models do not fit an 80 GB card side by side.
    ``input_ids``: :func:`tokens` for that model's vocabulary (the same every time). Built from
    the same seed, a model is the same every time it is built. A model that fits the card only
    with a narrower vocabulary (:func:`config_that_fits`) is built so, saying so; ``narrowed``,
    if given, collects them for the record: ``{arch: {"vocab": tokens, "note": why}}``."""
    out = {}
    for arch in archs:
        config, note = config_that_fits(arch, sizes)
        if config is None:
            print(f"{arch}: skipped on this GPU: {note}")
            continue
        if note:
            print(f"{arch}: {note}")
            if narrowed is not None:
                narrowed[arch] = {"vocab": config.vocab_size, "note": note}
        model = build(config, dtype=sizes.dtype, device=sizes.device)
        out[arch] = work(model, tokens(sizes, config.vocab_size))
        del model
        if sizes.device == "cuda":
            torch.cuda.empty_cache()  # the next model's weights in one piece, not in this one's holes
    return out


def too_large(config, sizes: Sizes, gpu_bytes: int | None = None) -> str | None:
    """Why a model of ``config`` does not fit this GPU (``gpu_bytes``: its memory, default the
    card's), or None. A forward and backward holds the weights, their gradients and, on eager,
    a temporary the size of a whole experts tensor (the gradient of ``gate_up_proj[expert]``):
    taken as 3x the weights, of which 90% of the card may be used. DeepSeek-V3's two blocks
    (27 GB of weights in bf16) need 82 GB: an H200 runs them, an 80 GB H100 ran out of memory."""
    if sizes.device != "cuda":
        return None
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes only: nothing allocated
        weights = weight_bytes(AutoModelForCausalLM.from_config(config, dtype=sizes.dtype))
    card = gpu_bytes if gpu_bytes is not None else torch.cuda.get_device_properties(0).total_memory
    if 3 * weights <= 0.9 * card:
        return None
    return (f"its weights are {weights / 1e9:.1f} GB; with their gradients and eager's temporaries about "
            f"{3 * weights / 1e9:.0f} GB, more than 90% of this card's {card / 1e9:.0f} GB")


#: The vocabulary a model gets where its real one does not fit the card beside the blocks'
#: gradients (DeepSeek-V3's two blocks on an 80 GB H100): the embedding and the logits' weights
#: shrink (3.5 GB of its 27.9 in bf16), the blocks, whose experts call this chapter measures, stay
#: the real model's.
NARROW_VOCAB = 8192


def config_that_fits(arch: str, sizes: Sizes, gpu_bytes: int | None = None):
    """``(config, note)``: the configuration of ``arch`` at ``sizes`` and None where it fits this
    GPU (:func:`too_large`); where only a vocabulary of :data:`NARROW_VOCAB` tokens fits, that
    configuration and a note saying so; where nothing fits, ``(None, why)``."""
    config = hf_config(arch, shrink=sizes.shrink, layers=sizes.layers, vocab=sizes.vocab)
    why = too_large(config, sizes, gpu_bytes)
    if why is None:
        return config, None
    if sizes.vocab is None or sizes.vocab > NARROW_VOCAB:
        narrow = hf_config(arch, shrink=sizes.shrink, layers=sizes.layers, vocab=NARROW_VOCAB)
        if too_large(narrow, sizes, gpu_bytes) is None:
            return narrow, (f"vocabulary narrowed from {config.vocab_size} to {NARROW_VOCAB} tokens to fit this card "
                            f"(at its real one {why}); its blocks are the real model's")
    return None, why


def optimizer_that_fits(model) -> str:
    """"adam" where the weights, their gradients and Adam's two moments fit the GPU (with a
    margin for the activations), else "sgd" (no state): DeepSeek-V3's block on an 80 GB card."""
    if not next(model.parameters()).is_cuda:
        return "adam"
    free, _ = torch.cuda.mem_get_info()
    return "adam" if 3 * weight_bytes(model) * 1.2 < free else "sgd"


def weight_bytes(model) -> int:
    """The bytes of ``model``'s parameters (on the meta device too: shapes and dtypes only)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def describe(model) -> str:
    """One line: the model's MoE shape in the course's letters, its blocks and parameters."""
    c = model.config
    a = ARCHITECTURES[c.model_type]
    moe_blocks = len(hf.experts_modules(model))
    params = sum(p.numel() for p in model.parameters())
    return (f"{a.record.title:<15} d={c.hidden_size} n={getattr(c, a.n_field)} E={getattr(c, a.experts_field)} "
            f"K={c.num_experts_per_tok}  vocabulary {c.vocab_size}, {c.num_hidden_layers} blocks ({moe_blocks} MoE), "
            f"{params / 1e6:.1f}M parameters, {next(model.parameters()).dtype}".replace("torch.", ""))


def refused_examples() -> dict:
    """Two configurations the course's backend refuses (tiny: refused before any product):
    gpt-oss (gate and up interleaved, weights stored (E, in, out), biases, its own clipped
    gating) and a Qwen3-MoE whose experts use GELU."""
    import transformers

    gpt_oss = transformers.GptOssConfig(hidden_size=64, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                        vocab_size=64, layer_types=["full_attention"])
    qwen_gelu = hf_config("qwen3_moe", shrink=32, layers=1, vocab=64, hidden_act="gelu")
    return {"gpt-oss": gpt_oss, "Qwen3-MoE with hidden_act='gelu'": qwen_gelu}


def use(model, backend: str) -> None:
    """Switch ``model``'s experts to ``backend`` (the weights stay as they are)."""
    model.set_experts_implementation(backend)


def threads_for(model):
    """On a CPU, one thread (:func:`moe_course.machine.one_thread`: these matrices are small,
    and a second thread loses several times over when another process holds a core); on a GPU,
    nothing changes."""
    return one_thread() if next(model.parameters()).device.type == "cpu" else contextlib.nullcontext()


def tokens(sizes: Sizes, vocab: int, *, seed: int = 1, batch: int | None = None, seq: int | None = None):
    """Random token ids ``(batch, seq)`` for a model of ``vocab`` tokens."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch or sizes.batch, seq or sizes.seq)
    return torch.randint(0, vocab, shape, generator=g).to(sizes.device)


# --------------------------------------------------------------------------------------------
# One forward and backward per backend, compared


@dataclass
class Run:
    """One forward + backward of the language-model loss: logits, loss, each parameter's
    gradient (None where autograd gave it none)."""
    logits: torch.Tensor
    loss: torch.Tensor
    grads: dict


def run(model, backend: str, input_ids, keep_on: str | None = None) -> Run:
    """Forward and backward of ``model`` on ``backend``; the results moved to ``keep_on``
    (e.g. "cpu", to hold a reference while the GPU runs the next backend) or left where they are."""
    use(model, backend)
    model.zero_grad(set_to_none=True)
    with threads_for(model):
        out = model(input_ids, labels=input_ids)
        out.loss.backward()
    keep = (lambda t: t.detach().to(keep_on)) if keep_on else (lambda t: t.detach())
    grads = {name: None if p.grad is None else keep(p.grad) for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return Run(keep(out.logits), keep(out.loss), grads)


def differences(got: Run, want: Run) -> dict:
    """How far ``got`` is from ``want``: the relative error of the logits and of the loss, the
    largest relative error over the parameters' gradients and whose it is, each parameter's."""
    errors, missing = {}, []
    for name, g in want.grads.items():
        mine = got.grads[name]
        if (g is None) != (mine is None):
            missing.append(name)  # one backend reached a parameter the other did not
        elif g is not None:
            errors[name] = relative_error(mine, g)
    worst = max(errors, key=errors.get)
    return {"logits": relative_error(got.logits, want.logits), "loss": relative_error(got.loss, want.loss),
            "gradients": errors[worst], "worst parameter": worst, "parameters": len(errors),
            "missing gradients": missing, "per parameter": errors}


def compare(model, input_ids, backends=BACKENDS, reference: str = REFERENCE, report=None) -> dict:
    """Every backend against ``reference`` on the same weights and tokens: ``{backend:
    differences}`` (:func:`differences`). On a GPU the reference is held on the host.
    ``report(backend, seconds)``, if given, after each backend's run (a first run may compile)."""
    keep_on = "cpu" if input_ids.is_cuda else None
    want = run(model, reference, input_ids, keep_on)
    found = {}
    for b in backends:
        if b != reference:
            start = time.perf_counter()
            found[b] = differences(run(model, b, input_ids), want)
            if report is not None:
                report(b, time.perf_counter() - start)
    return found


#: What "agree" means. float32: the backends differ only in the order of their sums (observed
#: 1e-7 to 8e-7). bf16: every product is rounded, and a gradient that nearly cancels (a norm's
#: weight) moved by 17% between transformers' own two backends; so each of the course's
#: gradients, and the logits, are held to transformers' grouped_mm's distance from eager: twice
#: it, plus 1% (a token whose top-K flips under rounding moves its logits: measured 3-4% for both
#: backends with torch 2.11 on the GPU machine's CPU and on an H100, under 1% with torch 2.13).
FLOAT32_TOLERANCE = {"logits": 1e-5, "loss": 1e-6, "gradients": 1e-5}
BF16_TOLERANCE = {"loss": 1e-3}


def disagreements(results: dict, dtype) -> list[str]:
    """What in :func:`compare`'s ``results`` (``{backend: differences}``) is further from eager
    than :data:`FLOAT32_TOLERANCE` or, in bf16, :data:`BF16_TOLERANCE` and transformers' own
    grouped_mm allow; empty when the course's backend agrees."""
    ours = results[hf.NAME]
    found = [f"{p}: no gradient from one backend" for p in ours["missing gradients"]]
    if dtype == torch.float32:
        return found + [f"{what} {ours[what]:.1e} > {tol:.0e}" for what, tol in FLOAT32_TOLERANCE.items()
                        if not ours[what] <= tol]
    found += [f"{what} {ours[what]:.1e} > {tol:.0e}" for what, tol in BF16_TOLERANCE.items() if not ours[what] <= tol]
    theirs = results["grouped_mm"]
    if not ours["logits"] <= 2 * theirs["logits"] + 1e-2:
        found.append(f"logits {ours['logits']:.1e}, transformers' grouped_mm {theirs['logits']:.1e}")
    return found + [f"{name}'s gradient {error:.1e}, transformers' grouped_mm {theirs['per parameter'][name]:.1e}"
                    for name, error in ours["per parameter"].items()
                    if not error <= 2 * theirs["per parameter"][name] + 1e-2]


#: How far (in loss, over the first step's loss) a training curve may stray from eager's: in
#: float32 the backends differ by summation order only; in bf16 each step's rounding differs and
#: training carries it on (Qwen3-MoE on an H100, Adam at 1e-3: transformers' own grouped_mm 1.4%).
TRAINING_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
#: bf16: the steps over which the course's curve is held to eager's. After them bf16 training
#: is chaos: Adam divides each gradient by its running size, so a gradient near zero, whose sign
#: one rounding decides, moves its weight a whole step either way, and the curves part further
#: each step. Qwen3-MoE, H100, session 11: over the first 4 losses grouped_mm and the course were
#: both within 1.3e-3 of eager's; at the fifth the course was 2.8e-2 away, grouped_mm 8e-3, and
#: at the sixth grouped_mm 7.7e-3, the course 2.0e-2 the other way (below eager). The gradients
#: themselves are compared in section 3; here, after these steps, each curve must only learn as
#: eager's does.
CLOSE_STEPS = 4


def curve_distance(curve: list[float], eager: list[float]) -> float:
    """The largest gap between two loss curves, over eager's first loss (a gap of 0.1 means as
    much at a loss of 12 as at 0.02: relative gaps blow up where a batch is learnt by heart)."""
    return max(abs(a - b) for a, b in zip(curve, eager, strict=True)) / eager[0]


def training_disagreement(curves: dict, dtype) -> str | None:
    """Why the course's loss curve (``curves``: ``{backend: losses}``, from :func:`train`) does
    not train as eager's does, or None. float32: the whole curve within
    :data:`TRAINING_TOLERANCE`. bf16: its first :data:`CLOSE_STEPS` losses within the tolerance
    or twice transformers' own grouped_mm's gap, whichever is larger; then its loss falls at
    least half as far as eager's. Also when eager's loss did not fall."""
    eager = curves[REFERENCE]
    if not eager[-1] < eager[0]:
        return f"eager's loss did not fall: {eager[0]:.3f} -> {eager[-1]:.3f}"
    ours_curve = curves[hf.NAME]
    n = len(eager) if dtype == torch.float32 else CLOSE_STEPS
    ours, theirs = curve_distance(ours_curve[:n], eager[:n]), curve_distance(curves["grouped_mm"][:n], eager[:n])
    allowed = max(TRAINING_TOLERANCE.get(dtype, 2e-2), 2 * theirs)
    if not ours <= allowed:
        return (f"over its first {n} losses the course's curve strays {ours:.1e} (of the first loss) from eager's; "
                f"transformers' grouped_mm {theirs:.1e}; allowed {allowed:.1e}")
    if not ours_curve[-1] <= eager[0] - (eager[0] - eager[-1]) / 2:
        return (f"the course's loss fell {ours_curve[0]:.3f} -> {ours_curve[-1]:.3f}, less than half as far as "
                f"eager's {eager[0]:.3f} -> {eager[-1]:.3f}")
    return None


def tokens_agreed(tokens, reference) -> int:
    """How many leading tokens of ``tokens`` (``(1, n)``, from :func:`greedy`) equal ``reference``'s."""
    same = (tokens == reference).flatten().tolist()
    return same.index(False) if False in same else len(same)


def generation_disagreement(tokens: dict, dtype) -> str | None:
    """Why the course's greedy tokens (``tokens``: ``{backend: (1, n)}``) disagree with eager's
    more than allowed, or None. float32: every token the same. bf16: random weights give
    near-tied logits that one rounding can flip (Mixtral's eighth token, H100, session 10:
    transformers' grouped_mm against eager), so the course's tokens must follow eager's at
    least as long as grouped_mm's do."""
    eager = tokens[REFERENCE]
    ours = tokens_agreed(tokens[hf.NAME], eager)
    if dtype == torch.float32:
        return None if ours == eager.numel() else f"the course's token {ours} differs from eager's"
    theirs = tokens_agreed(tokens["grouped_mm"], eager)
    if ours >= theirs:
        return None
    return f"the course's tokens follow eager's for {ours}, transformers' grouped_mm's for {theirs}"


def comparison_table(results: dict, shares: dict) -> str:
    """``results``: ``{arch: compare(...)}``; ``shares``: ``{arch: experts_share(...)}``."""
    lines = [f"{'model':<15} {'backend':<11} {'logits':>8} {'loss':>8} {'gradients (worst)':>18}  "
             f"{'experts move the logits by':>26}"]
    for arch, by_backend in results.items():
        for backend, d in by_backend.items():
            lines.append(f"{ARCHITECTURES[arch].record.title:<15} {backend:<11} {d['logits']:8.1e} {d['loss']:8.1e} "
                         f"{d['gradients']:18.1e}  {shares[arch]:26.1e}")
    return "\n".join(lines)


@contextlib.contextmanager
def experts_silenced(model):
    """Inside, every experts module outputs zeros: how much the experts move the logits is the
    yardstick for how closely two backends agree."""
    silence = lambda module, args, out: torch.zeros_like(out)
    handles = [m.register_forward_hook(silence) for m in hf.experts_modules(model).values()]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def experts_share(model, input_ids) -> float:
    """``‖logits − logits without the experts‖ / ‖logits‖`` on the reference backend."""
    use(model, REFERENCE)
    with torch.no_grad(), threads_for(model):
        full = model(input_ids).logits
        with experts_silenced(model):
            without = model(input_ids).logits
    return relative_error(without, full)


# --------------------------------------------------------------------------------------------
# Training, generation


def train(model, backend: str, input_ids, *, steps: int = 8, lr: float = 1e-3, optimizer: str = "adam") -> list[float]:
    """``steps`` steps on one fixed batch (the model learns it by heart: the loss falls fast),
    on ``backend``; returns the losses. The weights are put back afterwards, so that every
    backend starts from the same ones. ``optimizer``: "adam", or "sgd" where Adam's two copies
    of the weights do not fit."""
    start = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    use(model, backend)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr=lr)
    losses = []
    with threads_for(model):
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids, labels=input_ids).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
    model.zero_grad(set_to_none=True)
    model.load_state_dict(start)
    return losses


def greedy(model, backend: str, prompt, new_tokens: int = 8):
    """``new_tokens`` tokens generated after ``prompt`` by greedy decoding on ``backend`` (each
    step after the first is one token: T = 1 in every experts call)."""
    use(model, backend)
    with torch.no_grad(), threads_for(model):
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return out[:, prompt.shape[1]:]


def plot_training(curves: dict, record, live: bool):
    """``curves``: ``{arch: {backend: losses}}``, one panel per architecture, the backends
    overlaid (identical maths: the curves lie on top of each other)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(3.6 * len(curves), 3.2), squeeze=False)
    for ax, (arch, by_backend) in zip(axes[0], curves.items()):
        for (backend, losses), style in zip(by_backend.items(), ("-", "--", ":")):
            ax.plot(range(1, len(losses) + 1), losses, style, marker="o", ms=3, label=backend)
        ax.set_title(ARCHITECTURES[arch].record.title, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("loss (next token, one batch)")
    fig.suptitle(plotting.source_text(record, live), fontsize=8,
                 color=plotting.LIVE_COLOR if live else plotting.RECORDED_COLOR)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# Time per backend (a GPU), recorded as "hf_backends"

KIND = "hf_backends"


def time_backends(model, input_ids, backends=BACKENDS, *, rounds: int = 3, reps: int = 5) -> dict:
    """``{backend: {"forward": timing, "forward+backward": timing}}`` for the whole model on
    ``input_ids``, the backends interleaved (:func:`moe_course.bench.interleaved`; the switch
    between backends is not timed)."""
    def forward():
        with torch.no_grad():
            model(input_ids)

    def forward_backward():
        model(input_ids, labels=input_ids).loss.backward()
        model.zero_grad(set_to_none=True)

    switch = lambda backend: use(model, backend)
    fwd = interleaved({b: forward for b in backends}, rounds=rounds, reps=reps, warmup=2, before=switch)
    both = interleaved({b: forward_backward for b in backends}, rounds=rounds, reps=reps, warmup=2, before=switch)
    return {b: {"forward": fwd[b].timing(), "forward+backward": both[b].timing()} for b in backends}


def experts_inputs(model, input_ids) -> tuple:
    """What the model hands its first experts module for ``input_ids``: ``(module, hidden_states,
    top_k_index, top_k_weights)``, caught by a hook on one forward (the reference backend)."""
    module = next(iter(hf.experts_modules(model).values()))
    caught = {}

    def catch(_, args, kwargs):
        caught.setdefault("args", tuple(a.detach() for a in args) + tuple(kwargs[k].detach() for k in
                                        ("hidden_states", "top_k_index", "top_k_weights") if k in kwargs))

    handle = module.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        use(model, REFERENCE)
        with torch.no_grad(), threads_for(model):
            model(input_ids)
    finally:
        handle.remove()
    return (module, *caught["args"][:3])


#: An "hf_backends" experts row's key for the time of grouped_mm's six GEMMs alone
PRODUCTS = "grouped_mm_products"


def grouped_mm_products(module, hidden, index):
    """A function running the six products transformers' "grouped_mm" backend runs in one experts
    call's forward and backward, alone: the up- and down-projection, and for each the gradient of
    its input and of its weight, ``torch._grouped_mm`` through autograd on the module's own weights
    (no gradient accumulated into them), the ``T K`` rows of ``index``'s routing sorted by
    expert, random activations. No gather, activation or combine: timed, it is the GEMMs' part of
    that backend's call (the share that decides which minimum of issue 30 applies)."""
    w_up, w_down = module.gate_up_proj.detach(), module.down_proj.detach()  # (E, 2n, d), (E, d, n)
    E, d, n = w_down.shape[0], w_down.shape[1], w_down.shape[2]
    offs = torch.bincount(index.flatten(), minlength=E).cumsum(0).to(torch.int32)
    g = torch.Generator(device=hidden.device).manual_seed(5)
    rand = lambda *shape: torch.randn(*shape, device=hidden.device, dtype=hidden.dtype, generator=g)
    M = index.numel()
    x, a = rand(M, d).requires_grad_(), rand(M, n).requires_grad_()
    dh, dy = rand(M, 2 * n), rand(M, d)
    w_up, w_down = w_up.requires_grad_(), w_down.requires_grad_()

    def products():
        torch.autograd.grad(torch._grouped_mm(x, w_up.transpose(1, 2), offs=offs), (x, w_up), dh)
        torch.autograd.grad(torch._grouped_mm(a, w_down.transpose(1, 2), offs=offs), (a, w_down), dy)
    return products


def time_experts(model, input_ids, backends=BACKENDS, *, rounds: int = 3, reps: int = 5) -> dict:
    """The experts' share alone: ``{backend: {"forward": timing, "forward+backward": timing,
    "kept_MiB": ...}}`` for the first MoE block's experts call on the inputs the model hands it
    (:func:`experts_inputs`), the backends interleaved. ``kept_MiB``: what the call leaves
    allocated for its backward (activation memory; None without a GPU). :data:`PRODUCTS`: the
    time of grouped_mm's six GEMMs alone (:func:`grouped_mm_products`), where it runs."""
    module, hidden, index, weights = experts_inputs(model, input_ids)
    grad_out = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(3)).to(hidden.device, hidden.dtype)

    def forward():
        with torch.no_grad():
            module(hidden, index, weights)

    def forward_backward():
        x, w = hidden.clone().requires_grad_(), weights.clone().requires_grad_()
        module(x, index, w).backward(grad_out)
        module.zero_grad(set_to_none=True)

    def kept_mib(backend: str) -> float | None:
        if hidden.device.type != "cuda":
            return None
        use(model, backend)
        x, w = hidden.clone().requires_grad_(), weights.clone().requires_grad_()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = module(x, index, w)
        kept = torch.cuda.memory_allocated() - before - out.numel() * out.element_size()
        del out
        return kept / 2**20

    switch = lambda name: use(model, name) if name in backends else None
    # grouped_mm's GEMMs alone, timed in the same turns as the backends' forward + backward
    alone = ({PRODUCTS: grouped_mm_products(module, hidden, index)}
             if "grouped_mm" in backends and variants.grouped_mm_unavailable(hidden.device.type, hidden.dtype) is None
             else {})
    with threads_for(model):
        fwd = interleaved({b: forward for b in backends}, rounds=rounds, reps=reps, warmup=2, before=switch)
        both = interleaved({**{b: forward_backward for b in backends}, **alone}, rounds=rounds, reps=reps, warmup=2,
                           before=switch)
        kept = {b: kept_mib(b) for b in backends}
    T, K = index.shape
    return {"tokens": T, "top_k": K,
            "backends": {b: {"forward": fwd[b].timing(), "forward+backward": both[b].timing(), "kept_MiB": kept[b]}
                         for b in backends},
            **({PRODUCTS: both[PRODUCTS].timing()} if alone else {})}


#: Issue 30's minimum, per model, forward + backward of the experts call: "moe_course" at least
#: this much faster than "grouped_mm" wherever the GEMMs are under GEMM_BOUND of grouped_mm's
#: experts time (else simply faster), at least SonicMoE's speed where it ran, and the whole model
#: faster than with "grouped_mm".
MIN_OVER_GROUPED_MM = 1.25
GEMM_BOUND = 0.8


def minimum(data: dict, arch: str) -> dict:
    """Issue 30's minimum for one model of an "hf_backends" record: the GEMMs' share of grouped_mm's
    experts call (None where the record did not time them: then the 1.25x applies), the speed-ups
    it asks for, and whether each part and all are met."""
    e, whole = data["experts"][arch], data["models"][arch]
    ms = {b: t["forward+backward"]["ms"] for b, t in e["backends"].items()}
    products = e.get(PRODUCTS)
    share = products["ms"] / ms["grouped_mm"] if products else None
    need = 1.0 if share is not None and share >= GEMM_BOUND else MIN_OVER_GROUPED_MM
    over_grouped = ms["grouped_mm"] / ms[hf.NAME]
    over_sonic = ms[SONICMOE] / ms[hf.NAME] if SONICMOE in ms else None
    whole_over = whole["grouped_mm"]["forward+backward"]["ms"] / whole[hf.NAME]["forward+backward"]["ms"]
    parts = {"over_grouped_mm": over_grouped > 1.0 and over_grouped >= need,
             "over_sonicmoe": None if over_sonic is None else over_sonic >= 1.0, "whole_model": whole_over > 1.0}
    return {"gemm_share": share, "need_over_grouped_mm": need, "over_grouped_mm": over_grouped,
            "over_sonicmoe": over_sonic, "whole_model_over_grouped_mm": whole_over, "parts": parts,
            "met": all(v is not False for v in parts.values())}  # over_sonicmoe None: SonicMoE did not run


def measure(sizes: Sizes, archs=tuple(ARCHITECTURES), backends=BACKENDS, work=None) -> dict:
    """Every architecture at ``sizes``, timed per backend: what the "hf_backends" record holds:
    the whole model (``models``) and its first experts call alone (``experts``). ``work(model,
    ids)``: what returns that pair for one model (default: time both; the benchmark checks the
    backends agree first)."""
    data = {"sizes": {"shrink": sizes.shrink, "vocab": sizes.vocab, "layers": sizes.layers, "batch": sizes.batch,
                      "seq": sizes.seq, "dtype": str(sizes.dtype).removeprefix("torch.")},
            "models": {}, "experts": {}}
    work = work or (lambda model, ids: (time_backends(model, ids, backends), time_experts(model, ids, backends)))
    narrowed = {}
    both = for_each_model(sizes, work, archs, narrowed)
    for arch, (whole, experts) in both.items():
        data["models"][arch], data["experts"][arch] = whole, experts
    if narrowed:  # models built with a narrower vocabulary than the real one, and why
        data["narrowed"] = narrowed
    return data


def timings() -> tuple[records.Record | None, bool]:
    """On a GPU: measured now and recorded. Without one: the recorded "hf_backends" results, or
    ``(None, False)`` after one line saying that nothing has been measured yet."""
    if info().has_gpu:
        return records.live_or_recorded(KIND, lambda: measure(sizes_here()))
    recorded = records.load_all(KIND)
    if not recorded:
        print(f"nothing measured yet: no GPU here ({info().why_no_gpu}) and no record "
              f"benchmarks/results/{KIND}__<gpu>.json; run this chapter on a GPU to make one")
        return None, False
    # the record with the most models (a run may have measured one model alone, as SonicMoE's
    # compile makes a whole run too long for one sitting); of equals, the newest
    rec = max(recorded, key=lambda r: (len(r.data["models"]), str(r.environment.get("date", ""))))
    print(f"No GPU here ({info().why_no_gpu}): showing '{KIND}' as recorded on {rec.label()}.")
    for other in (r for r in recorded if r is not rec):
        print(f"\nAlso recorded, on {other.label()} ({', '.join(other.data['models'])}):")
        print(timing_table(other.data))
    if len(recorded) > 1:
        print(f"\n{rec.gpu}:")
    return rec, False


def timing_table(data: dict) -> str:
    """The "hf_backends" record as text: ms per forward and per forward + backward, each backend's
    speed over eager's."""
    lines = [f"{'model':<15} {'backend':<11} {'forward ms':>11} {'fwd+bwd ms':>11} {'fwd+bwd vs eager':>17}"]
    for arch, by_backend in data["models"].items():
        eager = by_backend.get(REFERENCE, {}).get("forward+backward", {}).get("ms")
        for backend, t in by_backend.items():
            both = t["forward+backward"]["ms"]
            lines.append(f"{ARCHITECTURES[arch].record.title:<15} {backend:<11} {t['forward']['ms']:11.2f} {both:11.2f} "
                         + (f"{eager / both:16.2f}x" if eager else ""))
    if data.get("experts"):  # the experts' share alone (records from session 10 on)
        lines += ["", f"{'experts call':<15} {'backend':<11} {'forward ms':>11} {'fwd+bwd ms':>11} "
                      f"{'vs grouped_mm':>14} {'kept MiB':>9}"]
        for arch, e in data["experts"].items():
            grouped = e["backends"].get("grouped_mm", {}).get("forward+backward", {}).get("ms")
            for backend, t in e["backends"].items():
                both = t["forward+backward"]["ms"]
                kept = "" if t.get("kept_MiB") is None else f"{t['kept_MiB']:9.0f}"
                lines.append(f"{ARCHITECTURES[arch].record.title:<15} {backend:<11} {t['forward']['ms']:11.2f} "
                             f"{both:11.2f} " + (f"{grouped / both:13.2f}x" if grouped else " " * 14) + f" {kept}")
            if grouped and hf.NAME in e["backends"] and arch in data["models"]:
                lines.append(f"{'':<15} {minimum_line(minimum(data, arch))}")
            if arch in data.get("narrowed", {}):
                lines.append(f"{'':<15} {data['narrowed'][arch]['note']}")
    return "\n".join(lines)


def minimum_line(m: dict, details: bool = True) -> str:
    """:func:`minimum`'s verdict in one line: met or not and which bar (from the GEMMs' share), then,
    with ``details``, the speed-ups it was judged on (the README's cell is the verdict alone)."""
    share = ("grouped_mm's GEMMs not timed alone" if m["gemm_share"] is None
             else f"grouped_mm's GEMMs {m['gemm_share']:.0%} of its call")
    need = "faster" if m["need_over_grouped_mm"] == 1.0 else f">= {m['need_over_grouped_mm']:.2f}x"
    missed = [what for part, what in (("over_grouped_mm", "short of grouped_mm's bar"),
                                      ("over_sonicmoe", "behind SonicMoE"), ("whole_model", "whole model not faster"))
              if m["parts"][part] is False]
    verdict = (f"{'met' if m['met'] else 'NOT met'} ({share}: {need} asked"
               f"{', SonicMoE not run' if m['over_sonicmoe'] is None else ''}"
               f"{'; ' + ', '.join(missed) if missed else ''})")
    if not details:
        return verdict
    sonic = "" if m["over_sonicmoe"] is None else f", x{m['over_sonicmoe']:.2f} SonicMoE"
    return (f"issue 30: {verdict}: x{m['over_grouped_mm']:.2f} grouped_mm{sonic}, whole model "
            f"x{m['whole_model_over_grouped_mm']:.2f}")


def plot_times(record, live: bool, step: str = "forward+backward", ax=None):
    """Milliseconds per ``step`` ("forward" or "forward+backward") of each model, one bar per backend."""
    models = record.data["models"]
    archs = list(models)
    backends = list(dict.fromkeys(b for by_backend in models.values() for b in by_backend))  # eager may be untimed
    series = {b: [models[a][b][step]["ms"] if b in models[a] else None for a in archs] for b in backends}
    return plotting.grouped_bars([ARCHITECTURES[a].record.title for a in archs], series,
                                 ylabel=f"{step}, ms", record=record, live=live, fmt="%.1f",
                                 title=f"whole model ({record.data['sizes']['layers']} blocks), {step}", ax=ax)
