"""benchmarks/bench_moe_variants.py and its registry (moe_course/variants.py): the --quick run end
to end on the CPU, wrong implementations injected through the registry failing the run, the
recorded-results path without a GPU, --help and --list; on a GPU, --quick with every entry."""

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from benchmark_scripts import load

from moe_course import RESULTS_DIR, ROOT, grouped_gemm, launch, machine, moe, variants

bmv = load("bench_moe_variants")
SCRIPT = ROOT / "benchmarks" / "bench_moe_variants.py"


def run_script(*args, force_cpu: bool = True, timeout: int = 180):
    env = dict(os.environ)
    if force_cpu:  # the CPU path, on any machine (machine.py reads this)
        env["MOE_COURSE_FORCE_CPU"] = "1"
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _results_listing():
    return sorted(p.name for p in RESULTS_DIR.iterdir()) if RESULTS_DIR.exists() else []


def test_quick_run_on_the_cpu_end_to_end(tmp_path):
    before = _results_listing()
    start = time.perf_counter()
    done = run_script("--quick", "--results-dir", str(tmp_path))
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout

    # A table: one block per tiny shape, a header, the chapter-01 layer checked and timed.
    assert "Measured on CPU" in out and "(--quick: tiny shapes)" in out
    for name, shape in bmv.QUICK_SHAPES.items():
        assert f"{name} (T={shape.T}, d={shape.d}, n={shape.n}, E={shape.E}, K={shape.K})" in out
    assert out.count("scope          implementation") == len(bmv.QUICK_SHAPES)
    assert out.count("layer forward  torch loop") == len(bmv.QUICK_SHAPES)
    # Every entry ran or said, in one line, why not; the GPU-only ones say so here.
    grouped_runs = variants.grouped_mm_unavailable("cpu") is None
    assert ("layer forward  torch._grouped_mm" in out) == grouped_runs
    assert ("layer-grouped-mm: skipped: " in out) != grouped_runs
    assert "gemm-ladder: skipped: needs an NVIDIA GPU (" in out
    assert "sonicmoe: skipped: " in out

    # The record went to the folder asked for, and nowhere else.
    saved = list(tmp_path.glob("moe_variants_quick__*.json"))
    assert [p.name for p in saved] == ["moe_variants_quick__cpu.json"]
    assert f"recorded in {saved[0]}" in out
    record = json.loads(saved[0].read_text())
    assert record["kind"] == "moe_variants_quick" and record["environment"]["gpu"] is None
    rows = record["data"]["rows"]
    assert {r["config"] for r in rows} == set(bmv.QUICK_SHAPES)
    for r in rows:
        assert r["status"] == "ok", r
        assert 0 <= r["rel_err"] < variants.LAYER_MAX_REL_ERR and r["ms"] > 0 and r["tflops"] > 0
    assert set(record["data"]["skipped"]) >= {"gemm-ladder", "sonicmoe"}
    chart = tmp_path / "moe_variants_quick__cpu.png"
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _results_listing() == before
    assert elapsed < 90, f"--quick took {elapsed:.0f} s"


# ----------------------------------------------------------------------------------------------
# Wrong implementations, injected through the registry, fail the run (exit code 1)


def _lose_expert_0(x_sorted, offsets, w_gate, w_up, w_down):
    y = moe.experts_forward(x_sorted, offsets, w_gate, w_up, w_down)
    y[: int(offsets[1])] = 0  # expert 0's tokens get nothing from it
    return y


def _raise(w, k):
    raise RuntimeError("kernel launch failed: too many resources requested")


WRONG = {  # name: (build, what the table must say)
    "scaled": (lambda w, k: lambda x: moe.moe_forward(x, w, k).y * 1.1, "WRONG: wrong result: relative error 0."),
    "loses-an-expert": (lambda w, k: lambda x: moe.moe_forward(x, w, k, expert_step=_lose_expert_0).y,
                        "WRONG: wrong result: relative error"),
    "nan": (lambda w, k: lambda x: moe.moe_forward(x, w, k).y.index_fill(0, torch.tensor([3], device=x.device),
                                                                        float("nan")),
            "WRONG: wrong result: relative error nan"),
    "drops-a-column": (lambda w, k: lambda x: moe.moe_forward(x, w, k).y[:, 1:],
                       "WRONG: wrong result: output shape (256, 255), expected (256, 256)"),
    "raises": (_raise, "ERROR: failed: RuntimeError: kernel launch failed: too many resources requested"),
}


@pytest.mark.parametrize("name", list(WRONG))
def test_a_wrong_implementation_fails_the_run(name, monkeypatch, capsys):
    build, says = WRONG[name]
    wrong = variants.layer_variant(name, "a wrong layer, for this test", f"wrong {name}", build=build)
    monkeypatch.setitem(variants.REGISTRY, name, wrong)
    assert bmv.main(["--quick", "--no-save", "--no-plot", "--variants", "layer-loop", name]) == 1
    captured = capsys.readouterr()
    assert says in captured.out, captured.out
    assert captured.out.count("WRONG: " if says.startswith("WRONG") else "ERROR: ") == len(bmv.QUICK_SHAPES)
    assert f"bench_moe_variants.py: {name} (wrong {name}, layer forward) on tiny-8x2: " in captured.err
    assert captured.out.count("layer forward  torch loop") == len(bmv.QUICK_SHAPES)  # the others still ran


def test_the_same_run_without_the_wrong_one_passes(capsys):
    assert bmv.main(["--quick", "--no-save", "--no-plot", "--variants", "layer-loop"]) == 0
    assert "WRONG" not in capsys.readouterr().out


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="a variant called 'layer-loop' is registered already"):
        variants.register(variants.REGISTRY["layer-loop"])


def test_ladder_rows_say_ok_wrong_refused_or_skipped(monkeypatch, capsys):
    """The ladder needs a GPU; its rows are made here from a stand-in measure_ladder, the way the
    real one reports (bench_grouped_gemm.py): a wrong result and a refusal carry an 'error'."""
    def fake_measure_ladder(shapes, projections, routings, impls=None, seed=0, progress=None, on_row=None):
        (name, (T, d, n, E, K)), = shapes.items()
        rows = []
        for proj in projections:
            for impl in grouped_gemm.IMPLEMENTATIONS:
                if impl in grouped_gemm.SLOW_STEPS:
                    continue  # as for a problem over 1 TFLOP
                progress(f"{name} {proj} {impl}")
                row = {"shape": name, "proj": proj, "routing": "uniform", "impl": impl, "flops": 1e9}
                if impl == "02_5_wgmma":
                    rows.append({**row, "rel_err": 0.3, "error": "wrong result: relative error 0.3"})
                elif impl == "02_3_smem_tiled":
                    rows.append({**row, "error": "ValueError: 02_3_smem_tiled needs N % 128 == 0"})
                else:
                    rows.append({**row, "rel_err": 1e-3, "ms": 1.0, "ms_p10": 0.9, "ms_p90": 1.1, "reps": 9,
                                 "tflops": 1e-3})
        return rows

    monkeypatch.setattr(grouped_gemm, "measure_ladder", fake_measure_ladder)
    monkeypatch.setitem(variants.REGISTRY, "gemm-ladder",
                        dataclasses.replace(variants.REGISTRY["gemm-ladder"], unavailable=lambda device: None))
    assert bmv.main(["--quick", "--no-save", "--no-plot", "--variants", "gemm-ladder", "--proj", "up", "down"]) == 1
    out = capsys.readouterr().out
    block = out.split("tiny-32x4")[0]
    assert block.index("up GEMM        torch loop") < block.index("up GEMM        02_1_naive_per_expert") \
        < block.index("up GEMM        02_6_persistent[STAGES=6]") < block.index("down GEMM      torch loop")
    assert "02_1_naive_per_expert     SKIPPED: not timed: over 1 TFLOP" in block
    assert "02_5_wgmma                WRONG: wrong result: relative error 0.3" in block
    assert "02_3_smem_tiled           REFUSED: ValueError: 02_3_smem_tiled needs N % 128 == 0" in block
    assert "up GEMM        torch._grouped_mm" in block and "1.00" in block  # ok rows are timed


# ----------------------------------------------------------------------------------------------
# Without a GPU and without --quick: what was recorded on one


@pytest.mark.skipif(machine.has_gpu(), reason="checks the no-GPU path")
def test_without_a_gpu_it_says_when_nothing_is_recorded(tmp_path, capsys):
    assert bmv.main(["--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert machine.skip_reason() in out
    assert f"No 'moe_variants' results are recorded in {tmp_path}: run this on a GPU to record them." in out


@pytest.mark.skipif(machine.has_gpu(), reason="checks the no-GPU path")
def test_without_a_gpu_it_shows_the_record_of_a_gpu_labelled(tmp_path, capsys):
    # A record as a GPU run writes it (a test fixture, in a temporary folder).
    row = {"config": "qwen3-30b-a3b", "T": 16384, "d": 2048, "n": 768, "E": 128, "K": 8, "scope": "layer forward",
           "status": "ok", "ms": 14.0, "tflops": 88.0, "rel_err": 4e-3}
    data = {"rows": [{**row, "variant": "layer-loop", "impl": "torch loop"},
                     {**row, "variant": "layer-grouped-mm", "impl": "torch._grouped_mm", "ms": 4.0, "tflops": 308.0}],
            "skipped": {"sonicmoe": "`import sonicmoe` fails"}, "matmul_tflops": 786.0}
    env = {"gpu": "NVIDIA H200", "date": "2026-11-30", "torch": "2.11.0+cu130", "cupy": "14.2.0", "cuda_runtime": "13.2"}
    (tmp_path / "moe_variants__nvidia-h200.json").write_text(json.dumps({"kind": "moe_variants", "environment": env,
                                                                          "data": data}))
    chart = tmp_path / "chart.png"
    assert bmv.main(["--results-dir", str(tmp_path), "--plot", str(chart)]) == 0
    out = capsys.readouterr().out
    assert "Recorded on NVIDIA H200, 2026-11-30 (torch 2.11.0+cu130, cupy 14.2.0, CUDA 13.2):" in out
    assert "sonicmoe: skipped there: `import sonicmoe` fails" in out
    assert "layer forward  torch._grouped_mm" in out and "3.50" in out and "39%" in out  # 308/88, 308/786
    assert chart.read_bytes()[:4] == b"\x89PNG"
    assert bmv.main(["--results-dir", str(tmp_path), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["live"] is False and shown["environment"]["gpu"] == "NVIDIA H200" and shown["data"] == data


# ----------------------------------------------------------------------------------------------
# The command line


def test_help_explains_every_option():
    done = run_script("--help")
    assert done.returncode == 0
    text = done.stdout
    for option in ("--configs", "--tokens", "--variants", "--proj", "--quick", "--reps", "--seed", "--results-dir",
                   "--no-save", "--plot", "--no-plot", "--json", "--list", "--help"):
        assert option in text, option
    for name in variants.REGISTRY:
        assert name in text, name
    assert "Exit code: 0; 1 if an implementation gave a wrong result" in text
    assert "float32 reference" in text and "moe_variants__<gpu>.json" in text


def test_list_says_what_runs_here(capsys):
    assert bmv.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name, v in variants.REGISTRY.items():
        assert f"{name:<18} {v.title}" in out
    assert out.count("runs here") + out.count("skipped here: ") == len(variants.REGISTRY)


@pytest.mark.parametrize("args,message", [
    (["--configs", "gpt-5"], "unknown MoE configuration 'gpt-5'"),
    (["--tokens", "0"], "argument --tokens: must be >= 1, got 0"),
    (["--quick", "--configs", "qwen3"], "--quick measures its own tiny shapes"),
    (["--variants", "cutlass"], "argument --variants: invalid choice: 'cutlass'"),
])
def test_bad_arguments_are_refused_by_name(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bmv.main(args)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.gpu
def test_quick_run_on_the_gpu_with_every_course_entry(tmp_path):
    # SonicMoE is left out: optional, and its own chapter (05) checks it.
    done = run_script("--quick", "--results-dir", str(tmp_path), "--proj", "up", "down",
                      "--variants", "layer-loop", "layer-grouped-mm", "gemm-ladder", force_cpu=False, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads(next(tmp_path.glob("moe_variants_quick__*.json")).read_text())
    rows = record["data"]["rows"]
    hopper = machine.info().compute_capability >= (9, 0)
    for r in rows:
        needs_hopper = r["impl"] in launch.STEPS and launch.STEPS[r["impl"]].min_cc >= (9, 0)
        assert r["status"] == ("ok" if hopper or not needs_hopper else "refused"), r
    ladder = {(r["config"], r["proj"], r["impl"]) for r in rows if r["variant"] == "gemm-ladder"}
    assert len(ladder) == len(bmv.QUICK_SHAPES) * 2 * len(grouped_gemm.IMPLEMENTATIONS)
