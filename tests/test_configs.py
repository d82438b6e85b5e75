"""moe_course.configs: the shapes and models, checked against the model cards and by hand."""

import pytest

from moe_course import configs
from moe_course.configs import MoEShape, by_name


def test_chapter02_shapes_are_the_benchmark_shapes():
    assert [tuple(c.shape) for c in configs.CHAPTER02] == [
        (24576, 1536, 256, 128, 8),  # SonicMoE 7B
        (16384, 2048, 768, 128, 8),  # Qwen3-30B-A3B
        (8192, 4096, 14336, 8, 2),  # Mixtral-8x7B
        (8192, 7168, 2048, 256, 8),  # DeepSeek-V3
    ]
    T, d, n, E, K = configs.CHAPTER02[0].shape  # unpacks like a tuple
    assert (T, d, n, E, K) == (24576, 1536, 256, 128, 8)


@pytest.mark.parametrize("cfg", [c for c in configs.ALL if c.reported_total], ids=lambda c: c.name)
def test_parameter_counts_match_what_the_model_cards_report(cfg):
    # The cards round to two or three digits; counting norms or not moves the sums by < 0.01%.
    assert cfg.total_params == pytest.approx(cfg.reported_total, rel=0.02)
    if cfg.reported_active:
        assert cfg.active_params == pytest.approx(cfg.reported_active, rel=0.02)


def test_deepseek_v3_counted_by_hand():
    mla = (7168 * 1536 + 1536 * 128 * (128 + 64)  # queries through their 1536-wide bottleneck
           + 7168 * (512 + 64) + 512 * 128 * (128 + 128)  # keys and values through 512, plus RoPE key
           + 128 * 128 * 7168)  # output projection
    assert mla == 187_105_280
    cfg = by_name("deepseek-v3")
    assert cfg.attn_params == mla
    expert = 3 * 7168 * 2048
    active = (61 * mla + 3 * 3 * 7168 * 18432 + 58 * (8 + 1) * expert + 58 * 7168 * 256
              + 2 * 129280 * 7168)
    assert cfg.active_params == active
    assert cfg.active_matmul_params == active - 129280 * 7168  # the input embedding is a look-up
    assert cfg.total_params == active + 58 * (256 - 8) * expert


def test_mixtral_counted_by_hand():
    cfg = by_name("mixtral-8x7b")
    attention = 4096 * 4096 * 2 + 4096 * 1024 * 2  # q and o 32 heads, k and v 8 heads of 128
    assert cfg.attn_params == attention
    assert cfg.active_params == (32 * attention + 32 * 2 * 3 * 4096 * 14336 + 32 * 4096 * 8
                                 + 2 * 32000 * 4096)


def test_expert_gemm_flops_by_hand():
    flops = configs.expert_gemm_flops(T=10, d=6, n=4, K=2)
    assert flops["up_fwd"] == 2 * 20 * 6 * 8  # X[T*K, d] x W1[d, 2n]
    assert flops["down_fwd"] == 2 * 20 * 4 * 6  # A[T*K, n] x W2[n, d]
    assert flops["fwd"] == 6 * 10 * 2 * 4 * 6
    assert flops["bwd"] == 2 * flops["fwd"] and flops["up_bwd"] == 2 * flops["up_fwd"]
    assert flops["total"] == 18 * 10 * 2 * 4 * 6  # SonicMoE's "(6+12)TnKd"
    cfg = by_name("7b")
    assert cfg.expert_gemm_flops()["fwd"] == 6 * 24576 * 8 * 256 * 1536
    assert cfg.expert_gemm_flops(T=1)["fwd"] == 6 * 8 * 256 * 1536


def test_by_name_forgives_case_and_separators_and_knows_aliases():
    assert by_name("DeepSeek_V3") is configs.DEEPSEEK_V3
    assert by_name(" qwen3 ") is configs.QWEN3_30B_A3B
    assert by_name("olmoe") is configs.OLMOE_1B_7B and by_name("mixtral") is configs.MIXTRAL_8X7B


def test_by_name_lists_the_known_names_on_a_typo():
    with pytest.raises(ValueError, match="unknown MoE configuration 'deepseek-v4'; known: sonicmoe-7b, "
                                         "qwen3-30b-a3b, mixtral-8x7b, deepseek-v3, olmoe-1b-7b"):
        by_name("deepseek-v4")
    with pytest.raises(TypeError, match="must be a string"):
        by_name(3)


@pytest.mark.parametrize("bad, message", [
    ((0, 8, 8, 4, 2), "T must be a positive integer, got 0"),
    ((8, 8.0, 8, 4, 2), "d must be a positive integer, got 8.0"),
    ((8, 8, True, 4, 2), "n must be a positive integer, got True"),
    ((8, 8, 8, 4, 5), r"top-K \(5\) cannot exceed the number of experts \(4\)"),
])
def test_bad_shapes_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        MoEShape(*bad)


def test_with_tokens_keeps_the_model_and_checks_the_count():
    small = configs.DEEPSEEK_V3.with_tokens(256)
    assert small.T == 256 and small.d == 7168 and small.total_params == configs.DEEPSEEK_V3.total_params
    with pytest.raises(ValueError, match="T must be a positive integer"):
        configs.DEEPSEEK_V3.with_tokens(-1)


def test_assumed_fields_are_declared_where_the_source_is_silent():
    assert configs.SONICMOE_7B.assumed  # the paper gives only the MoE layer
    assert all(not c.assumed for c in configs.ALL if c is not configs.SONICMOE_7B)
    assert all(c.source for c in configs.ALL)
