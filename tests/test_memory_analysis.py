"""benchmarks/memory_analysis.py: the activation-memory formula against hand-counted bytes and
against what autograd really saves; the layers it measures against a plain reference."""

import json

import pytest
import torch
from benchmark_scripts import load

from moe_course import configs, machine, records

ma = load("memory_analysis")

SMALL = (64, 32, 16, 4, 2)  # T, d, n, E, K


def test_formula_for_a_small_layer_by_hand():
    T, d, n, E, K = SMALL
    TK = T * K  # 128 routed rows
    torch_layer = (T * d * 2  # X, bf16: 4096
                   + T * E * 4  # router probabilities, fp32: 1024
                   + (TK + T) * 4  # top-K probabilities and their sum, fp32: 768
                   + TK * 8  # top-K indices, int64: 1024
                   + 2 * TK * 8  # token indices, int64: 2048
                   + TK * d * 2  # gathered X: 8192
                   + TK * 2 * n * 2  # H: 8192
                   + TK * n * 2  # SiLU(gate): 4096
                   + TK * n * 2  # A: 4096
                   + TK * d * 2  # Y: 8192
                   + TK * 2  # routing weight per row: 256
                   + TK * d * 2)  # weighted Y, kept by index_add: 8192
    assert torch_layer == 50176
    assert ma.total_bytes(SMALL, "torch-loop") == 50176
    assert ma.total_bytes(SMALL, "grouped-mm") == 50176 + E * 4  # plus grouped_mm's int32 group ends
    sonic = T * d * 2 + TK * 2 * n * 2 + TK * 4 + TK * 4 + 3 * TK * 4 + (E + 1) * 4  # X, H, metadata
    assert sonic == 14868
    assert ma.total_bytes(SMALL, "sonicmoe") == 14868


def test_every_term_is_explained_and_names_its_size():
    for impl in ma.IMPLEMENTATIONS:
        for term in ma.terms(SMALL, impl):
            assert term.bytes > 0 and term.size and len(term.why) > 20
    sonic = {t.name for t in ma.terms(SMALL, "sonicmoe")}
    assert not sonic & {"gathered X", "Y", "weighted Y", "A"}  # the facts of COURSE.md
    assert {"X", "H"} <= sonic


def test_sonicmoe_memory_does_not_grow_with_granularity():
    # Same FLOPs (n*K fixed), experts twice as fine: the torch layer keeps more, SonicMoE the same
    # apart from its O(T*K) routing metadata.
    coarse, fine = (4096, 1024, 512, 64, 4), (4096, 1024, 256, 128, 8)
    assert ma.total_bytes(fine, "torch-loop") > 1.5 * ma.total_bytes(coarse, "torch-loop")
    assert ma.total_bytes(fine, "sonicmoe") < 1.05 * ma.total_bytes(coarse, "sonicmoe")


def test_bad_implementation_and_shape_are_refused():
    with pytest.raises(ValueError, match="unknown implementation 'scattermoe'; known: torch-loop, grouped-mm, sonicmoe"):
        ma.terms(SMALL, "scattermoe")
    with pytest.raises(ValueError, match=r"top-K \(5\) cannot exceed"):
        ma.terms((8, 8, 8, 4, 5), "sonicmoe")


def _reference(x, w_router, w_up, w_down, K):
    """Token by token, in float32: the maths both layers implement."""
    x, w_router, w_up, w_down = (t.detach().float() for t in (x, w_router, w_up, w_down))
    p = torch.softmax(x @ w_router, dim=-1)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        top_p, top_i = p[t].topk(K)
        for w, e in zip(top_p / top_p.sum(), top_i.tolist()):
            h = x[t] @ w_up[e]
            gate, up = h.chunk(2)
            out[t] += w * ((torch.nn.functional.silu(gate) * up) @ w_down[e])
    return out


@pytest.mark.parametrize("impl", list(ma.LAYERS))
def test_both_layers_compute_the_moe_layer(impl):
    x, wr, wu, wd = ma.make_inputs(SMALL)
    got = ma.LAYERS[impl](x, wr, wu, wd, SMALL[-1])
    expected = _reference(x, wr, wu, wd, SMALL[-1])
    assert float((got.detach().float() - expected).norm() / expected.norm()) < 2e-2


@pytest.mark.parametrize("shape", [SMALL, (200, 64, 24, 8, 3), (16, 16, 8, 64, 1), (300, 16, 8, 64, 8)],
                         ids=str)
@pytest.mark.parametrize("impl", list(ma.LAYERS))
def test_formula_equals_what_autograd_saves(impl, shape):
    # (16, 16, 8, 64, 1): most experts get no token, so the loop skips them.
    x, wr, wu, wd = ma.make_inputs(shape)
    _, saved = ma.forward_saving(impl, x, wr, wu, wd, shape[-1])
    assert saved == ma.total_bytes(shape, impl)


def test_cli_on_this_machine(capsys):
    assert ma.main(["--config", "olmoe", "--tokens", "512", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["configs"]["olmoe-1b-7b"]
    assert out["shape"]["T"] == 512
    assert out["formula"]["sonicmoe"]["total_bytes"] == ma.total_bytes((512, 2048, 1024, 64, 8), "sonicmoe")
    if not machine.has_gpu():
        assert out["measured"] == machine.skip_reason()
    assert ma.main(["--config", "deepseek-v3", "--no-measure"]) == 0
    text = capsys.readouterr().out
    assert "DeepSeek-V3 (T=8192, d=7168, n=2048, E=256, K=8)" in text and "total (formula)" in text
    assert "measured: skipped (--no-measure)" in text and "what each term is" in text
    for bad, message in ((["--config", "deepseek-v4"], "argument --config: unknown MoE configuration"),
                         (["--tokens", "0"], "argument --tokens: must be >= 1, got 0")):
        with pytest.raises(SystemExit) as exit_:  # argparse's usage error
            ma.main(bad)
        assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(machine.has_gpu(), reason="checks the no-GPU path")
def test_without_a_gpu_the_measured_part_is_the_record_or_says_it_is_skipped(capsys):
    assert ma.main(["--config", "7b"]) == 0
    out = capsys.readouterr().out
    rec = records.load(ma.KIND)
    if rec is not None and "sonicmoe-7b" in rec.data["configs"]:
        assert f"measured rows: RECORDED on {rec.label()}" in out and "measured: saved by autograd" in out
    else:
        assert f"measured: {machine.skip_reason()}" in out
    assert ma.main(["--config", "7b", "--tokens", "128"]) == 0  # another shape: nothing recorded for it
    assert f"measured: {machine.skip_reason()}" in capsys.readouterr().out


def test_a_disagreement_between_the_layers_fails_the_run(monkeypatch, capsys):
    fake = {impl: {"saved_bytes": 1, "held_after_forward_bytes": 1, "peak_fwd_bwd_bytes": 2, "gradient_bytes": 1}
            for impl in ma.LAYERS}
    monkeypatch.setattr(machine, "has_gpu", lambda: True)
    monkeypatch.setattr(ma, "measure_gpu", lambda shape: {**fake, "agreement": {"relative_error": 0.5, "ok": False}})
    assert ma.main(["--config", "7b", "--no-save"]) == 1
    captured = capsys.readouterr()
    assert "relative error 5.00e-01 (FAILED)" in captured.out and "disagree" in captured.err
    monkeypatch.setattr(ma, "measure_gpu", lambda shape: {**fake, "agreement": {"relative_error": 1e-3, "ok": True}})
    assert ma.main(["--config", "7b", "--no-save"]) == 0


@pytest.mark.gpu
def test_measured_on_the_gpu_matches_the_formula():
    shape = configs.SONICMOE_7B.with_tokens(4096).shape
    measured = ma.measure_gpu(shape)
    assert measured["agreement"]["ok"], measured["agreement"]
    for impl in ma.LAYERS:
        formula = ma.total_bytes(shape, impl)
        assert measured[impl]["saved_bytes"] == formula
        # The allocator rounds each block up (512 bytes); nothing else should stay alive.
        assert measured[impl]["held_after_forward_bytes"] == pytest.approx(formula, rel=0.02)
        assert measured[impl]["peak_fwd_bwd_bytes"] >= formula
