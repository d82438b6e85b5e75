"""The MoE models the course measures against, one frozen record per model.

Every chart and table of the course names its MoE layer by five numbers:

- ``T``  tokens in one batch (the benchmark's choice, not a property of the model)
- ``d``  model (embedding) dimension
- ``n``  hidden dimension of one expert (its SwiGLU has a gate and an up half, each ``n`` wide)
- ``E``  experts per MoE layer
- ``K``  experts each token is routed to (top-K)

>>> from moe_course import configs
>>> for cfg in configs.CHAPTER02:            # the four benchmark shapes of chapter 02
...     T, d, n, E, K = cfg.shape
>>> configs.by_name("deepseek-v3").expert_gemm_flops()["total"]

The rest of each record describes the whole model, for ``benchmarks/throughput.py``: layer
counts, shared experts, attention and embedding sizes, so that its parameters (total and active
per token) can be counted and checked against what the model card reports. Every value says
where it comes from; values the course had to choose are listed in ``assumed`` and printed as
assumptions wherever they are used.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


# ----------------------------------------------------------------------------------------------
# One MoE layer's shape, and the FLOPs of its expert GEMMs
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MoEShape:
    """``(T, d, n, E, K)``; unpacks like a tuple: ``T, d, n, E, K = shape``."""

    T: int
    d: int
    n: int
    E: int
    K: int

    def __post_init__(self):
        for name in ("T", "d", "n", "E", "K"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MoE shape: {name} must be a positive integer, got {value!r}")
        if self.K > self.E:
            raise ValueError(f"MoE shape: top-K ({self.K}) cannot exceed the number of experts ({self.E})")

    def __iter__(self):
        return iter((self.T, self.d, self.n, self.E, self.K))

    def as_dict(self) -> dict:
        return {"T": self.T, "d": self.d, "n": self.n, "E": self.E, "K": self.K}

    def __str__(self) -> str:
        return f"(T={self.T}, d={self.d}, n={self.n}, E={self.E}, K={self.K})"


def expert_gemm_flops(T: int, d: int, n: int, K: int) -> dict[str, int]:
    """FLOPs of the expert GEMMs of one MoE layer with a SwiGLU expert (2 FLOPs per multiply-add).

    Each of the ``T*K`` routed rows goes through
      up-projection   X[T*K, d] x W1[d, 2n]  (gate and up halves together): 2 * T*K * d * 2n
      down-projection A[T*K, n] x W2[n, d]:                                  2 * T*K * n * d
    The backward pass runs two GEMMs of the same size per forward GEMM (the gradient with respect
    to the activations and the one with respect to the weights), so it costs twice the forward:
    forward 6*T*K*n*d, backward 12*T*K*n*d, as the SonicMoE authors count it ("(6+12)TnKd").
    The router (X[T, d] x W_r[d, E]) and the element-wise work are not included.
    """
    rows = T * K
    up = 2 * rows * d * (2 * n)
    down = 2 * rows * n * d
    return {"up_fwd": up, "down_fwd": down, "fwd": up + down,
            "up_bwd": 2 * up, "down_bwd": 2 * down, "bwd": 2 * (up + down),
            "total": 3 * (up + down)}


# ----------------------------------------------------------------------------------------------
# Attention parameter counts (weights of the projections; norm weights are left out everywhere:
# a few thousand per layer, below 0.01% of any model here)
# ----------------------------------------------------------------------------------------------

def gqa_attention_params(d: int, heads: int, kv_heads: int, head_dim: int) -> int:
    """Multi-head / grouped-query attention without biases: W_q, W_k, W_v, W_o."""
    q = d * heads * head_dim
    kv = 2 * d * kv_heads * head_dim
    o = heads * head_dim * d
    return q + kv + o


def mla_attention_params(d: int, heads: int, q_lora: int, kv_lora: int, qk_nope: int,
                         qk_rope: int, v_head: int) -> int:
    """DeepSeek's multi-head latent attention: queries and keys/values go through low-rank
    bottlenecks (``q_lora``, ``kv_lora``); one shared RoPE key of ``qk_rope`` per token."""
    q = d * q_lora + q_lora * heads * (qk_nope + qk_rope)
    kv = d * (kv_lora + qk_rope) + kv_lora * heads * (qk_nope + v_head)
    o = heads * v_head * d
    return q + kv + o


# ----------------------------------------------------------------------------------------------
# A whole MoE model
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MoEConfig:
    name: str  # the lookup key: by_name(name)
    title: str  # for tables and charts
    T: int  # tokens per batch in the course's benchmarks
    d: int
    n: int
    E: int
    K: int
    layers: int  # transformer blocks
    moe_layers: int  # blocks whose FFN is an MoE layer; the others have a dense FFN
    shared_experts: int  # experts every token goes through, besides its top-K (width n each)
    dense_ffn_n: int  # hidden width of the dense SwiGLU FFN of the non-MoE blocks (0: none)
    attn_params: int  # attention weights per block
    attn_qk_dim: int  # query heads x query/key head dim: the width of the scores' dot products
    attn_v_dim: int  # query heads x value head dim
    vocab: int
    tied_embeddings: bool  # input embedding and output head share one matrix
    reported_total: float | None  # parameters, as the model card / paper reports them
    reported_active: float | None  # active parameters per token, likewise
    source: str  # where the numbers come from
    assumed: tuple[str, ...] = ()  # fields the course chose itself (printed as assumptions)

    def __post_init__(self):
        MoEShape(self.T, self.d, self.n, self.E, self.K)  # validates the five numbers
        if not 0 <= self.moe_layers <= self.layers:
            raise ValueError(f"{self.name}: moe_layers ({self.moe_layers}) must be between 0 "
                             f"and layers ({self.layers})")
        if self.moe_layers < self.layers and self.dense_ffn_n <= 0:
            raise ValueError(f"{self.name}: {self.layers - self.moe_layers} dense blocks need dense_ffn_n")

    # -- the MoE layer --------------------------------------------------------------------------
    @property
    def shape(self) -> MoEShape:
        return MoEShape(self.T, self.d, self.n, self.E, self.K)

    def with_tokens(self, T: int) -> "MoEConfig":
        """The same model benchmarked with ``T`` tokens per batch (e.g. scaled down on a CPU)."""
        return replace(self, T=T)

    def expert_gemm_flops(self, T: int | None = None) -> dict[str, int]:
        return expert_gemm_flops(self.T if T is None else T, self.d, self.n, self.K)

    # -- parameters ------------------------------------------------------------------------------
    @property
    def expert_params(self) -> int:
        """One SwiGLU expert: W1 (gate and up, d x 2n) and W2 (n x d)."""
        return 3 * self.d * self.n

    def param_breakdown(self) -> dict[str, tuple[int, int]]:
        """``{part: (total, active per token)}`` parameter counts of the whole model."""
        dense_blocks = self.layers - self.moe_layers
        emb = self.vocab * self.d
        parts = {
            "attention": (self.layers * self.attn_params,) * 2,
            "dense FFN": (dense_blocks * 3 * self.d * self.dense_ffn_n,) * 2,
            "routed experts": (self.moe_layers * self.E * self.expert_params,
                               self.moe_layers * self.K * self.expert_params),
            "shared experts": (self.moe_layers * self.shared_experts * self.expert_params,) * 2,
            "routers": (self.moe_layers * self.d * self.E,) * 2,
            "input embedding": (emb, emb),
            "output head": (0, 0) if self.tied_embeddings else (emb, emb),
        }
        return parts

    @property
    def total_params(self) -> int:
        return sum(t for t, _ in self.param_breakdown().values())

    @property
    def active_params(self) -> int:
        return sum(a for _, a in self.param_breakdown().values())

    @property
    def active_matmul_params(self) -> int:
        """Active parameters that take part in a matrix product: all active ones except the
        input embedding, which is a table look-up. ``2 x`` this is a token's forward FLOPs
        outside the attention scores. A tied output head is a matmul even though it is stored
        only once, so it is counted here."""
        out = self.vocab * self.d
        return self.active_params - self.vocab * self.d + (out if self.tied_embeddings else 0)

    def attention_score_flops(self, seq_len: int) -> int:
        """Forward FLOPs per token of one block's attention scores and weighted sum, with
        ``seq_len`` keys: Q.K^T and P.V, 2 FLOPs per multiply-add, no causal halving (the
        convention of the PaLM paper's MFU, arXiv 2204.02311 appendix B)."""
        return 2 * seq_len * (self.attn_qk_dim + self.attn_v_dim)

    def __str__(self) -> str:
        return f"{self.title} {self.shape}"


# ----------------------------------------------------------------------------------------------
# The models. T is the course's benchmark batch; every other number is from the cited source
# unless listed in ``assumed``.
# ----------------------------------------------------------------------------------------------

SONICMOE_7B = MoEConfig(
    name="sonicmoe-7b", title="SonicMoE 7B",
    # The MoE layer of the fine-grained 7B model in the SonicMoE paper (Guo et al., arXiv
    # 2512.14080), the shape of its headline numbers: T=24576, d=1536, n=256, E=128, K=8.
    T=24576, d=1536, n=256, E=128, K=8,
    # The paper's kernel benchmarks give only the MoE layer. The rest of the model is the
    # course's assumption: an OLMoE-style block (multi-head attention, 12 heads of 128, every
    # FFN an MoE layer) with OLMoE's untied 50304-token vocabulary, and 42 blocks so that the
    # total comes to about 7B (6.9B).
    layers=42, moe_layers=42, shared_experts=0, dense_ffn_n=0,
    attn_params=gqa_attention_params(1536, heads=12, kv_heads=12, head_dim=128),
    attn_qk_dim=12 * 128, attn_v_dim=12 * 128,
    vocab=50304, tied_embeddings=False,
    reported_total=7e9, reported_active=None,
    source="https://arxiv.org/abs/2512.14080 (MoE layer shape); rest assumed by the course",
    assumed=("layers", "moe_layers", "attention", "vocab"),
)

QWEN3_30B_A3B = MoEConfig(
    name="qwen3-30b-a3b", title="Qwen3-30B-A3B",
    # huggingface.co/Qwen/Qwen3-30B-A3B config.json: hidden_size 2048, moe_intermediate_size
    # 768, num_experts 128, num_experts_per_tok 8, num_hidden_layers 48 (all MoE, no shared
    # expert), 32 query heads and 4 KV heads of head_dim 128, vocab_size 151936, untied.
    T=16384,  # the course's benchmark batch
    d=2048, n=768, E=128, K=8,
    layers=48, moe_layers=48, shared_experts=0, dense_ffn_n=0,
    attn_params=gqa_attention_params(2048, heads=32, kv_heads=4, head_dim=128),
    attn_qk_dim=32 * 128, attn_v_dim=32 * 128,
    vocab=151936, tied_embeddings=False,
    # Model card: "Number of Parameters: 30.5B in total and 3.3B activated".
    reported_total=30.5e9, reported_active=3.3e9,
    source="https://huggingface.co/Qwen/Qwen3-30B-A3B (model card and config.json)",
)

MIXTRAL_8X7B = MoEConfig(
    name="mixtral-8x7b", title="Mixtral-8x7B",
    # huggingface.co/mistralai/Mixtral-8x7B-v0.1 config.json: hidden_size 4096,
    # intermediate_size 14336, num_local_experts 8, num_experts_per_tok 2, 32 layers (all MoE),
    # 32 query heads and 8 KV heads of 128, vocab_size 32000, untied.
    T=8192,  # the course's benchmark batch
    d=4096, n=14336, E=8, K=2,
    layers=32, moe_layers=32, shared_experts=0, dense_ffn_n=0,
    attn_params=gqa_attention_params(4096, heads=32, kv_heads=8, head_dim=128),
    attn_qk_dim=32 * 128, attn_v_dim=32 * 128,
    vocab=32000, tied_embeddings=False,
    # Mistral AI, "Mixtral of experts" (2023-12-11): 46.7B total, 12.9B used per token
    # (the paper, arXiv 2401.04088, rounds these to 47B and 13B).
    reported_total=46.7e9, reported_active=12.9e9,
    source="https://huggingface.co/mistralai/Mixtral-8x7B-v0.1; https://mistral.ai/news/mixtral-of-experts",
)

DEEPSEEK_V3 = MoEConfig(
    name="deepseek-v3", title="DeepSeek-V3",
    # DeepSeek-V3 technical report (arXiv 2412.19437) and huggingface.co/deepseek-ai/DeepSeek-V3
    # config.json: hidden_size 7168, moe_intermediate_size 2048, n_routed_experts 256,
    # num_experts_per_tok 8, n_shared_experts 1, 61 layers of which the first 3
    # (first_k_dense_replace) have a dense FFN of intermediate_size 18432, vocab_size 129280,
    # untied. Attention is MLA with 128 heads: q_lora_rank 1536, kv_lora_rank 512,
    # qk_nope_head_dim 128, qk_rope_head_dim 64, v_head_dim 128.
    T=8192,  # the course's benchmark batch
    d=7168, n=2048, E=256, K=8,
    layers=61, moe_layers=58, shared_experts=1, dense_ffn_n=18432,
    attn_params=mla_attention_params(7168, heads=128, q_lora=1536, kv_lora=512,
                                     qk_nope=128, qk_rope=64, v_head=128),
    attn_qk_dim=128 * (128 + 64), attn_v_dim=128 * 128,
    vocab=129280, tied_embeddings=False,
    # Report, abstract: "671B total parameters with 37B activated for each token" (the
    # multi-token-prediction module, 14B more, is not counted there and not here).
    reported_total=671e9, reported_active=37e9,
    source="https://arxiv.org/abs/2412.19437; https://huggingface.co/deepseek-ai/DeepSeek-V3",
)

OLMOE_1B_7B = MoEConfig(
    name="olmoe-1b-7b", title="OLMoE-1B-7B",
    # OLMoE paper (Muennighoff et al., arXiv 2409.02060) and
    # huggingface.co/allenai/OLMoE-1B-7B-0924 config.json: hidden_size 2048,
    # intermediate_size 1024, num_experts 64, num_experts_per_tok 8, 16 layers (all MoE),
    # 16 heads of 128 (no grouping), vocab_size 50304, untied.
    T=16384,  # the course's benchmark batch
    d=2048, n=1024, E=64, K=8,
    layers=16, moe_layers=16, shared_experts=0, dense_ffn_n=0,
    attn_params=gqa_attention_params(2048, heads=16, kv_heads=16, head_dim=128),
    attn_qk_dim=16 * 128, attn_v_dim=16 * 128,
    vocab=50304, tied_embeddings=False,
    # Paper, Table 1: 6.9B total, 1.3B active parameters.
    reported_total=6.9e9, reported_active=1.3e9,
    source="https://arxiv.org/abs/2409.02060; https://huggingface.co/allenai/OLMoE-1B-7B-0924",
)

#: Every model, in the order tables list them.
ALL: tuple[MoEConfig, ...] = (SONICMOE_7B, QWEN3_30B_A3B, MIXTRAL_8X7B, DEEPSEEK_V3, OLMOE_1B_7B)

#: The four benchmark shapes of chapter 02 (and of benchmarks/bench_moe_variants.py), in order.
CHAPTER02: tuple[MoEConfig, ...] = (SONICMOE_7B, QWEN3_30B_A3B, MIXTRAL_8X7B, DEEPSEEK_V3)

_BY_NAME = {c.name: c for c in ALL}
_ALIASES = {"7b": "sonicmoe-7b", "sonic-7b": "sonicmoe-7b", "qwen3": "qwen3-30b-a3b",
            "mixtral": "mixtral-8x7b", "dsv3": "deepseek-v3", "olmoe": "olmoe-1b-7b"}


def names() -> list[str]:
    return [c.name for c in ALL]


def by_name(name: str) -> MoEConfig:
    """The configuration called ``name`` (case and ``_``/``-`` do not matter; a few short
    aliases such as ``7b``, ``qwen3``, ``mixtral``, ``dsv3``, ``olmoe`` work too)."""
    if not isinstance(name, str):
        raise TypeError(f"a configuration name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in _BY_NAME:
        raise ValueError(f"unknown MoE configuration {name!r}; known: {', '.join(names())} "
                         f"(aliases: {', '.join(sorted(_ALIASES))})")
    return _BY_NAME[key]
