"""Chapter 08's expert-parallel layer (moe_course/expert_parallel.py): sharded over 4 ranks
(spawned processes, torch.distributed with gloo, CPU) it equals the single-process layer of
chapter 01 (top-K) or 04 (token rounding), output and every gradient, in float64; two known
mistakes are caught; and the pieces and the model it is built from. Well under a minute."""

import pytest
import torch

from moe_course import configs, moe
from moe_course import expert_parallel as ep


def test_the_layer_over_4_ranks_equals_the_single_process_layer():
    """Every case (ragged token counts, a rank whose experts get no tokens, a rank that gets every
    token, a rank with no tokens of its own, token rounding), outputs and gradients of x, the
    router (summed over ranks), each rank's experts; and the overlapped forward."""
    errors = ep.run_check(4)
    assert set(errors) == {case.name for case in ep.CASES}
    for case, by_what in errors.items():
        for what, error in by_what.items():
            assert error < 1e-12, (case, what, error)
    assert "y overlapped" in errors["top-K, ragged"]


@pytest.mark.parametrize("wrong", [w for w in ep.WRONG if w])
def test_a_known_mistake_fails_the_check(wrong):
    """The check is not blind: the combine without routing weights, and a backward that keeps the
    gradient on the rank instead of sending it back, each miss by far more than rounding."""
    errors = ep.run_check(4, cases=ep.CASES[:1], wrong=wrong)["top-K, ragged"]
    assert max(errors.values()) > 0.1, errors


def test_who_holds_which_expert():
    assert list(ep.experts_of(2, 4, 16)) == [8, 9, 10, 11]
    assert ep.owner(torch.tensor([0, 3, 4, 15]), 4).tolist() == [0, 0, 1, 3]
    w = torch.arange(16.0).reshape(8, 2)
    assert torch.equal(ep.shard(w, 1, 4), w[2:4])
    with pytest.raises(ValueError, match="6 experts do not split evenly over 4 ranks"):
        ep.experts_per_rank(6, 4)
    with pytest.raises(ValueError, match="rank"):
        ep.experts_of(4, 4, 16)


@pytest.mark.parametrize("method", ep.ROUTINGS)
def test_the_rows_are_grouped_by_destination_rank(method):
    g = torch.Generator().manual_seed(1)
    x, router = torch.randn(40, 8, generator=g), torch.randn(8, 8, generator=g)
    rows = ep.route_rows(x, router, 2, method, tile=4)
    dest = ep.owner(rows.expert_ids, 2)
    assert bool((dest[1:] >= dest[:-1]).all())  # sorted by expert: one block per rank
    counts = ep.send_counts(rows, 2, 4)
    assert counts.sum() == rows.token_ids.numel()
    if method != "top-K":  # token rounding: every expert's rows (so every rank's) whole tiles
        assert bool((torch.bincount(rows.expert_ids, minlength=8) % 4 == 0).all())


def test_the_hf_layout_runs_chapter_01s_experts():
    """local_experts on transformers' layout (chapter 10's backend, the torch maths here) equals
    chapter 01's SwiGLU experts on the same rows."""
    g = torch.Generator().manual_seed(2)
    w = moe.random_weights(16, 8, 4, dtype=torch.float64, generator=g)
    gate_up, down = ep.hf_layout(w)
    ids = torch.tensor([0, 0, 2, 3, 3, 3])
    x = torch.randn(6, 16, generator=g, dtype=torch.float64)
    want = torch.stack([moe.swiglu(x[i:i + 1], w.w_gate[e], w.w_up[e], w.w_down[e])[0] for i, e in enumerate(ids)])
    torch.testing.assert_close(ep.local_experts(x, ids, gate_up, down), want)
    assert ep.local_experts(x[:0], ids[:0], gate_up, down).shape == (0, 16)


def test_the_model_counts_bytes_and_links():
    assert ep.bytes_per_token(7168, 8) == 7168 * 8 * 2
    assert ep.leaving_share(1) == (0.0, 0.0)
    assert ep.leaving_share(8) == (7 / 8, 0.0)
    assert ep.leaving_share(32) == (7 / 32, 24 / 32)
    ds = configs.by_name("deepseek-v3")
    one = ep.predict(ds, 4096, 1, gemm_tflops=600)
    assert one["comm"] == 0 and one["total"] == pytest.approx(one["gemm"])
    eight, sixteen = (ep.predict(ds, 4096, w, gemm_tflops=600) for w in (8, 16))
    assert eight["gemm"] == pytest.approx(one["gemm"])  # weak scaling: each rank's work stays
    assert sixteen["comm"] > 4 * eight["comm"]  # the network is 9x slower than NVLink
    hidden = ep.predict(ds, 4096, 8, gemm_tflops=600, overlap=0.5)
    assert hidden["total"] == pytest.approx(eight["gemm"] + eight["comm"] / 2)


def test_the_benchmark_runs_under_torchrun_on_a_cpu():
    """bench_expert_parallel.py --smoke: 2 processes, gloo, tiny sizes: its check, then a table."""
    import subprocess
    import sys

    from moe_course import ROOT

    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           str(ROOT / "benchmarks" / "bench_expert_parallel.py"), "--smoke", "--shapes", "qwen3-30b-a3b"],
                          capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "qwen3-30b-a3b       2" in done.stdout, done.stdout


def test_a_routing_it_does_not_know_is_refused():
    x, router = torch.randn(4, 8), torch.randn(8, 4)
    with pytest.raises(ValueError, match="rounding must be one of per rank, whole batch; got 'global'"):
        ep.route_rows(x, router, 2, "nearest", rounding="global")
    with pytest.raises(ValueError, match="routing must be one of top-K, nearest, up, down; got 'padded'"):
        ep.route_rows(x, router, 2, "padded")
