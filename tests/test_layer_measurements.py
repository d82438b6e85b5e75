"""moe_course/layer_measurements.py (chapter 06's measurements) on any machine: the torch contenders agree
with each other, what each layer keeps for the backward, the training run, the tables drawn from
the records; and benchmarks/bench_moe_layer.py without a GPU."""

import pytest
import torch

from benchmark_scripts import load
from moe_course import layer, layer_measurements, moe, records
from moe_course.machine import info


def small(seed=0, T=64, d=32, n=16, E=4):
    g = torch.Generator().manual_seed(seed)
    return moe.random_weights(d, n, E, generator=g), torch.randn(T, d, generator=g)


def test_torch_contenders_agree_and_the_course_says_why_it_is_missing():
    w, x = small()
    found, skipped = layer_measurements.contenders(x, w, 2, ("torch loop", "torch._grouped_mm", "course"))
    dout = torch.randn_like(x)
    if "torch._grouped_mm" in found:
        errs = layer_measurements.agreement(layer_measurements.gradients(found["torch loop"], dout),
                                  layer_measurements.gradients(found["torch._grouped_mm"], dout))
        assert max(errs.values()) < 1e-5, errs
    if not info().has_gpu:
        assert "course" in skipped and "GPU" in skipped["course"]


def test_agreement_catches_a_wrong_gradient():
    w, x = small()
    found, _ = layer_measurements.contenders(x, w, 2, ("torch loop",))
    g = layer_measurements.gradients(found["torch loop"], torch.randn_like(x))
    wrong = list(g)
    wrong[5] = wrong[5] * 1.01  # w_down's gradient 1% off
    errs = layer_measurements.agreement(wrong, g)
    assert errs["w_down"] > 5e-3 and errs["out"] == 0.0


def test_the_course_layer_keeps_less_than_autograd_through_the_loop():
    w, x = small(T=256, d=64, n=48, E=8)  # d, n and 2n all different: shapes tell tensors apart
    found, _ = layer_measurements.contenders(x, w, 4, ("torch loop",))
    c = found["torch loop"]
    theirs = sum(b for *_, b in layer_measurements.saved_for_backward(c.forward, c.params[1:])[1])
    params = [t.requires_grad_() for t in layer.prepare(w, dtype=None)]
    xl = x.clone().requires_grad_()
    _, ours = layer_measurements.saved_for_backward(lambda: layer.MoEFunction.apply(xl, *params, 4, layer.TORCH_OPS), params)
    R, n = 256 * 4, 48
    assert {shape for shape, *_ in ours} >= {(256, 64), (R, 2 * n)}  # X and H
    assert not any(shape in {(R, 64), (R, n)} for shape, *_ in ours)  # no gathered X, no A, no expert output
    assert sum(b for *_, b in ours) < 0.6 * theirs


def test_teacher_student_learns_on_the_cpu():
    losses = layer_measurements.teacher_student(32, 16, 4, 2, tokens=256, steps=40, lr=1e-2, device="cpu", dtype=torch.float32)
    assert len(losses) == 40 and losses[-1] < 0.8 * losses[0]


def test_tables_and_speedups_from_a_record():
    row = lambda ms, kept: {"forward": {"ms": ms / 3}, "forward+backward": {"ms": ms, "tflops": 100 / ms},
                            "held_after_forward_bytes": kept, "peak_fwd_bwd_bytes": 2 * kept}
    res = {"contenders": {"torch._grouped_mm": row(9.0, 1000), "course": row(4.5, 100)}, "skipped": {"x": "why"}}
    sp = layer_measurements.speedups(res)
    assert sp["course"]["fwd_bwd_speedup"] == pytest.approx(2.0)
    assert sp["course"]["activation_memory_ratio"] == pytest.approx(0.1)
    text = layer_measurements.table({"shapes": {"tiny": res}})
    assert "course" in text and "2.00x" in text and "skipped: why" in text


@pytest.mark.parametrize("kind", ["moe_layer_training", "moe_layer_sonicmoe", "moe_layer_sonicmoe_run"])
def test_recorded_layer_benchmarks_are_complete(kind):
    rec = records.load(kind)
    assert rec is not None, f"benchmarks/results has no {kind} record"
    for shape, res in rec.data["shapes"].items():
        assert "course" in res["contenders"], shape
        for name, r in res["contenders"].items():
            assert r["forward+backward"]["ms"] > 0 and r["held_after_forward_bytes"] > 0, (shape, name)
    layer_measurements.plot_layer(rec, live=False)


def test_bench_without_a_gpu_prints_the_record(capsys):
    if info().has_gpu:
        pytest.skip("with a GPU the script measures (minutes); the GPU run is recorded instead")
    assert load("bench_moe_layer").main([]) == 0
    out = capsys.readouterr().out
    assert "recorded on" in out and "course" in out


@pytest.mark.parametrize("kind", ["moe_layer_sonicmoe", "moe_layer_sonicmoe_run"])
def test_the_sonicmoe_record_compares_outputs_and_names_its_versions(kind):
    rec = records.load(kind)
    assert set(rec.data["versions"]) == {"sonic-moe", "quack-kernels", "nvidia-cutlass-dsl"}
    assert all(rec.data["versions"].values()), rec.data["versions"]
    for shape, res in rec.data["shapes"].items():
        sonic = res["contenders"]["SonicMoE"]
        errors = sonic["agreement_with_torch._grouped_mm"]
        assert set(errors) == set(layer_measurements.GRADIENT_NAMES) and max(errors.values()) < 2e-2, (shape, errors)


def test_sonicmoe_versions_names_each_package():
    from moe_course import variants

    found = variants.sonicmoe_versions()
    assert tuple(found) == variants.SONICMOE_PACKAGES
    assert all(v is None or isinstance(v, str) for v in found.values())


def test_the_profile_table_shows_idle_time_and_the_big_kernels(capsys):
    res = {"ms_per_iter": 10.0, "kernels": {"weight_grad_grouped_gemm": (4.0, 2.0), "combine_rows": (1.0, 2.0),
                                            "tiny": (0.004, 1.0)}}
    out = layer_measurements.profile_table("qwen3-30b-a3b / course", res)
    assert "GPU idle 4.996 ms" in out and "weight_grad_grouped_gemm" in out and "40.0%" in out
    assert "tiny" not in out  # under 1% of the kernel time: left out
    assert "skipped: why" in layer_measurements.profile_table("x", {"skipped": "why"})
    if not info().has_gpu:
        assert load("profile_moe_layer").main([]) == 0
        assert "needs a GPU" in capsys.readouterr().out


def grouped_mm_on_cpu():
    from moe_course.variants import grouped_mm_unavailable

    why = grouped_mm_unavailable("cpu")
    if why:
        pytest.skip(why)


def test_measure_ops_checks_then_times_each_product():
    """The per-kernel runner on a CPU, with the torch maths standing in for the kernels: every
    product checked and timed; a product that computes the wrong thing is caught and not timed."""
    grouped_mm_on_cpu()
    shape = (96, 64, 32, 4, 2)
    rows = layer_measurements.measure_ops(shape, mine=layer.TORCH_OPS, device="cpu", rounds=1, reps=1, progress=lambda s: None)
    assert [r["status"] for r in rows] == ["ok"] * 7, rows
    assert all(r["rel_err"] < 2e-2 and r["course"]["ms"] > 0 for r in rows)
    text = layer_measurements.ops_table({"shapes": {"tiny": rows}})
    assert "06_3_weight_grad" in text and "TB/s" in text  # the combine is counted in bytes

    broken = layer.TORCH_OPS._replace(weight_grad=lambda dy, x, idx, offs: layer.TORCH_OPS.weight_grad(dy, x, idx, offs) * 1.1)
    rows = layer_measurements.measure_ops(shape, mine=broken, device="cpu", rounds=1, reps=1, progress=lambda s: None)
    failed = [r for r in rows if r["status"] == "failed"]
    assert [r["kernel"] for r in failed] == ["06_3_weight_grad"] * 2 and all("course" not in r for r in failed)
    assert "FAILED" in layer_measurements.ops_table({"shapes": {"tiny": rows}})


def test_measure_ops_times_a_tried_build_only_where_it_gives_the_same_bytes():
    """--try's path on a CPU: a build equal to ``mine`` is timed beside it; one whose bytes differ
    (here the weight gradients, 1% off) is reported for those products, not timed."""
    grouped_mm_on_cpu()
    shape = (96, 64, 32, 4, 2)
    off = layer.TORCH_OPS._replace(weight_grad=lambda dy, x, idx, offs: layer.TORCH_OPS.weight_grad(dy, x, idx, offs)
                                   * 1.01)
    rows = layer_measurements.measure_ops(shape, mine=layer.TORCH_OPS, device="cpu", rounds=1, reps=1,
                                          progress=lambda s: None, tried={"SAME=1": layer.TORCH_OPS, "OFF=1": off})
    assert all(r["tried"]["SAME=1"]["ms"] > 0 for r in rows)
    assert [("error" in r["tried"]["OFF=1"]) for r in rows] == [k == "06_3_weight_grad" for k in
                                                                 (r["kernel"] for r in rows)]
    text = layer_measurements.tried_table({"shapes": {"tiny": rows}})
    assert text.count("[SAME=1]") == 7 and text.count("not course's bytes") == 2


def test_kernel_ops_builds_each_gemm_with_the_tried_defines(monkeypatch):
    seen = {}
    for name in ("swiglu_grouped_gemm", "transposed_b_grouped_gemm", "dswiglu_grouped_gemm", "weight_grad"):
        monkeypatch.setattr(layer.launch, name, lambda *a, step, _n=name, **k: seen.setdefault(_n, step))
    ops = layer.kernel_ops(ISSUE_IN_TURN=1)
    ops.up(None, None, None, None), ops.times_w(None, None, None)
    ops.dswiglu(None, None, None, None, torch.ones(1), None), ops.weight_grad(None, None, None, None)
    assert len(seen) == 4 and all(step.defines.get("ISSUE_IN_TURN") == 1 for step in seen.values())


def test_relative_error_in_chunks_agrees_and_sees_nan():
    """checking.relative_error compares torch tensors a chunk at a time (measure_ops' 15 GB weight
    gradients): the same number as in one piece, and a NaN anywhere fails every tolerance."""
    from moe_course.checking import relative_error

    a, b = torch.randn(1000), torch.randn(1000)
    want = float((a - b).norm() / b.norm())
    assert relative_error(a, b, chunk=7) == pytest.approx(want, rel=1e-5)
    a[999] = float("nan")
    assert not relative_error(a, b, chunk=7) < float("inf")


def test_the_layer_on_grouped_mm_ops_matches_the_torch_maths():
    """layer.GROUPED_MM_OPS (the library every kernel is measured against) computes the layer
    right: output and gradients in bf16 against the float32 torch maths."""
    grouped_mm_on_cpu()
    inputs = layer_measurements.integer_router_inputs(80, 32, 16, 6, device="cpu")
    ours = layer_measurements.layer_outputs(inputs, 2, layer.GROUPED_MM_OPS, torch.bfloat16)
    reference = layer_measurements.layer_outputs(inputs, 2, layer.TORCH_OPS, torch.float32)
    for label, a, b in zip(("out", "x", "w_router", "w_gate_up", "w_down"), ours, reference):
        a, b = a.float(), b.float()
        assert float((a - b).norm() / b.norm()) < 2e-2, label


def test_bench_layer_kernels_without_a_gpu(capsys):
    if info().has_gpu:
        pytest.skip("with a GPU the script measures; the GPU run is recorded instead")
    assert load("bench_layer_kernels").main([]) == 0
    assert "timing" in capsys.readouterr().out


def test_the_recorded_kernel_comparison_checked_every_product():
    rec = records.load("layer_kernels")
    assert rec is not None and set(rec.data["shapes"]) == {"sonicmoe-7b", "qwen3-30b-a3b", "mixtral-8x7b", "deepseek-v3"}
    for shape, rows in rec.data["shapes"].items():
        assert len(rows) == 7 and all(r["status"] == "ok" and r["rel_err"] < 2e-2 for r in rows), shape
    assert "06_3_weight_grad" in layer_measurements.ops_table(rec.data)


def test_bench_moe_layer_merges_one_shape_a_run_into_one_record():
    """--merge: the shapes measured now replace theirs, the others are kept with their dates, in
    the course's order; an earlier training run is kept where this run has none."""
    bench = load("bench_moe_layer")
    earlier = records.Record("moe_layer_sonicmoe", {"gpu": "NVIDIA H200", "date": "2026-12-06"},
                             {"shapes": {"mixtral-8x7b": {"tag": 1}, "sonicmoe-7b": {"tag": 2}},
                              "train": {"losses": "then"}, "versions": {"sonic-moe": "0.1"}})
    now = {"shapes": {}, "train": None}
    data = bench.merged(now, earlier, ["qwen3-30b-a3b", "mixtral-8x7b"])
    assert list(data["shapes"]) == ["sonicmoe-7b"]  # mixtral is measured again: not kept
    data["shapes"] = bench.in_course_order(data["shapes"] | {"mixtral-8x7b": {"tag": 3}, "qwen3-30b-a3b": {"tag": 4}})
    assert list(data["shapes"]) == ["sonicmoe-7b", "qwen3-30b-a3b", "mixtral-8x7b"]
    assert data["measured_on"] == {"sonicmoe-7b": "2026-12-06", "qwen3-30b-a3b": records.environment()["date"],
                                   "mixtral-8x7b": records.environment()["date"]}
    assert data["train"] == {"losses": "then"} and data["versions"] == {"sonic-moe": "0.1"}
    alone = bench.merged({"shapes": {}, "train": None}, None, ["mixtral-8x7b"])
    assert alone["shapes"] == {} and alone["measured_on"] == {"mixtral-8x7b": records.environment()["date"]}
