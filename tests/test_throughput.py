"""benchmarks/throughput.py: checked against hand calculations, options, and the record path."""

import json
import subprocess
import sys
import time

import pytest
from benchmark_scripts import load

from moe_course import ROOT

tp = load("throughput")


def test_mixtral_on_h100_by_hand():
    # Mixtral-8x7B: 32 blocks; attention q, o 4096x4096, k, v 4096x1024; 2 of 8 experts of
    # 3 x 4096 x 14336; routers 4096 x 8; output head 32000 x 4096 (the input embedding is a
    # look-up, not a matmul).
    n = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024) + 32 * 2 * 3 * 4096 * 14336 + 32 * 4096 * 8 + 32000 * 4096
    r = tp.estimate("mixtral-8x7b", "h100", num_gpus=8, mfu=0.5, seq_len=0)
    tokens_per_s = 8 * 989e12 * 0.5 / (6 * n)
    assert r["training"]["flops_per_token"] == 6 * n
    assert r["training"]["tokens_per_second"] == pytest.approx(tokens_per_s)
    assert r["training"]["tokens_per_day"] == pytest.approx(tokens_per_s * 86400)
    assert r["training"]["usd_per_million_tokens"] == pytest.approx(8 * 2.50 / (tokens_per_s * 3600) * 1e6)
    assert r["training"]["usd_per_billion_tokens"] == pytest.approx(8 * 2.50 / (tokens_per_s * 3600) * 1e9)
    assert r["training"]["gpu_hours_per_billion_tokens"] == pytest.approx(8 * 1e9 / tokens_per_s / 3600)
    assert r["inference"]["flops_per_token"] == 2 * n
    assert r["inference"]["tokens_per_second"] == pytest.approx(3 * tokens_per_s)


def test_deepseek_v3_on_b200_with_attention_by_hand():
    mla = 7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256 + 128 * 128 * 7168
    n = (61 * mla + 3 * 3 * 7168 * 18432 + 58 * 9 * 3 * 7168 * 2048 + 58 * 7168 * 256
         + 129280 * 7168)
    attention = 61 * 2 * 4096 * (128 * 192 + 128 * 128)  # per token, forward, 4096 keys
    r = tp.estimate("deepseek-v3", "b200", num_gpus=16, mfu=0.4, price_per_gpu_hour=6.0, seq_len=4096)
    assert r["training"]["flops_per_token"] == 6 * n + 3 * attention
    assert r["inference"]["flops_per_token"] == 2 * n + attention
    tokens_per_s = 16 * 2250e12 * 0.4 / (6 * n + 3 * attention)
    assert r["training"]["tokens_per_day"] == pytest.approx(tokens_per_s * 86400)
    assert r["training"]["usd_per_billion_tokens"] == pytest.approx(16 * 6.0 / (tokens_per_s * 3600) * 1e9)
    assert r["hardware"]["price_source"] == "given (--price-per-gpu-hour)"


def test_default_mfu_reproduces_deepseek_v3s_reported_gpu_hours():
    # DeepSeek-V3's report: 14.8T pre-training tokens in 2,664K H800 GPU-hours ($2 each).
    r = tp.estimate("deepseek-v3", "h800", num_gpus=2048, seq_len=0)
    assert r["mfu"] == tp.DEFAULT_MFU
    gpu_hours = r["training"]["gpu_hours_per_billion_tokens"] * 14.8e3
    assert gpu_hours == pytest.approx(2.664e6, rel=0.05)
    assert r["training"]["usd_per_billion_tokens"] * 14.8e3 == pytest.approx(2.664e6 * 2.0, rel=0.05)


def test_gpus_scale_tokens_not_the_cost_per_token():
    one = tp.estimate("qwen3-30b-a3b", "h200", num_gpus=1, mfu=0.3)
    many = tp.estimate("qwen3-30b-a3b", "h200", num_gpus=64, mfu=0.3)
    assert many["training"]["tokens_per_day"] == pytest.approx(64 * one["training"]["tokens_per_day"])
    assert many["training"]["usd_per_million_tokens"] == pytest.approx(one["training"]["usd_per_million_tokens"])


def test_price_peak_and_mfu_enter_as_they_should():
    base = tp.estimate("olmoe-1b-7b", "a100", mfu=0.4)
    assert tp.estimate("olmoe-1b-7b", "a100", mfu=0.4, price_per_gpu_hour=3.0)["training"]["usd_per_million_tokens"] \
        == pytest.approx(base["training"]["usd_per_million_tokens"] * 3.0 / 1.50)
    assert tp.estimate("olmoe-1b-7b", "a100", mfu=0.2)["training"]["tokens_per_day"] \
        == pytest.approx(base["training"]["tokens_per_day"] / 2)
    assert tp.estimate("olmoe-1b-7b", "a100", mfu=0.4, peak_tflops=624)["training"]["tokens_per_day"] \
        == pytest.approx(base["training"]["tokens_per_day"] * 2)


def test_measured_peak_comes_from_the_recorded_ceilings():
    r = tp.estimate("sonicmoe-7b", "h200", mfu=0.5, measured_peak=True)
    assert 700 < r["hardware"]["peak_tflops"] < 900
    assert r["hardware"]["peak_source"].startswith("measured: NVIDIA H200")
    with pytest.raises(LookupError, match="no measured ceilings for NVIDIA H100"):
        tp.estimate("sonicmoe-7b", "h100", mfu=0.5, measured_peak=True)


@pytest.mark.parametrize("kwargs, message", [
    ({"mfu": 0}, "mfu must be a number > 0 and <= 1, got 0"),
    ({"mfu": 1.5}, "mfu must be a number > 0 and <= 1, got 1.5"),
    ({"num_gpus": 0}, "num_gpus must be an integer > 0, got 0"),
    ({"num_gpus": 2.5}, "num_gpus must be an integer > 0, got 2.5"),
    ({"seq_len": -1}, "seq_len must be an integer >= 0, got -1"),
    ({"price_per_gpu_hour": -2.0}, "price_per_gpu_hour must be a number > 0"),
    ({"mfu": 0.3, "mfu_from_record": "ceilings"}, "either mfu or mfu_from_record"),
    ({"implementation": "x"}, "needs mfu_from_record"),
])
def test_bad_input_is_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tp.estimate("deepseek-v3", "h100", **kwargs)


def test_the_report_prints_formula_assumptions_and_warnings():
    text = tp.report(tp.estimate("deepseek-v3", "h100", num_gpus=8))
    assert "6 x N" in text and "tokens/s = GPUs x peak x MFU" in text
    assert "price $2.50 per GPU-hour: assumed" in text
    assert "MFU) 0.350: assumed" in text
    assert "does not fit in 8 x 80 GB" in text  # 671B parameters of training state
    assert "671.0B parameters" in text and "reported: 671B, 37B active" in text
    sonic = tp.report(tp.estimate("sonicmoe-7b", "h200"))
    assert "the course's assumptions" in sonic


# -- efficiency from a record ----------------------------------------------------------------
# (kinds the course does not record, so that no layout of moe_course/record_layouts.py applies:
# throughput.py reads any record that names MoE shapes and TFLOP/s)

def _record(folder, kind, gpu, data):
    path = folder / f"{kind}__{gpu.lower().replace(' ', '-')}.json"
    path.write_text(json.dumps({"kind": kind, "environment": {"gpu": gpu, "date": "2026-12-01"}, "data": data}))


SEVEN_B = {"T": 24576, "d": 1536, "n": 256, "E": 128, "K": 8}
QWEN3 = {"T": 16384, "d": 2048, "n": 768, "E": 128, "K": 8}


def test_efficiency_from_measurement_records(tmp_path):
    _record(tmp_path, "kernel_rates", "NVIDIA H100 80GB HBM3", {"measurements": [
        {"name": "grouped_mm", "tflops": 500.0, "params": SEVEN_B},
        {"name": "torch_loop", "tflops": 150.0, "params": SEVEN_B},
        {"name": "grouped_mm", "tflops": 400.0, "params": QWEN3},
    ]})
    r = tp.estimate("sonicmoe-7b", "h200", mfu_from_record="kernel_rates", implementation="grouped_mm",
                    results_dir=tmp_path)
    assert r["mfu"] == pytest.approx(500 / 989)
    assert "grouped_mm on sonicmoe-7b" in r["mfu_source"] and "NVIDIA H100 80GB HBM3" in r["mfu_source"]
    assert any("upper bound" in a for a in r["assumptions"])
    loop = tp.efficiency_from_record("kernel_rates", tp.configs.by_name("7b"), implementation="loop",
                                     results_dir=tmp_path)
    assert loop.mfu == pytest.approx(150 / 989)
    with pytest.raises(LookupError, match=r"several measurements of sonicmoe-7b: grouped_mm \(500 TFLOP/s\), "
                                          r"torch_loop \(150 TFLOP/s\); choose one with --implementation"):
        tp.estimate("sonicmoe-7b", "h200", mfu_from_record="kernel_rates", results_dir=tmp_path)
    with pytest.raises(LookupError, match=r"no measurement of olmoe-1b-7b.*it has: \(16384, 2048, 768, 128, 8\) grouped_mm"):
        tp.estimate("olmoe-1b-7b", "h200", mfu_from_record="kernel_rates", results_dir=tmp_path)


def test_efficiency_from_rows_with_one_column_per_implementation(tmp_path):
    # The layout of the chapter 02 anchors: one row per shape, "<implementation>_tflops" columns.
    _record(tmp_path, "anchors", "NVIDIA H200", {"moe_up_proj": [
        {"shape": "qwen3-30b-a3b", **QWEN3, "loop_mm_tflops": 410.0, "grouped_mm_tflops": 647.0}]})
    eff = tp.efficiency_from_record("anchors", tp.configs.by_name("qwen3"), implementation="grouped_mm",
                                    results_dir=tmp_path)
    assert eff.mfu == pytest.approx(647 / 989)


def test_efficiency_against_the_measured_peak_needs_that_gpus_ceilings(tmp_path):
    _record(tmp_path, "kernel_rates", "NVIDIA H200", {"measurements": [{"name": "k", "tflops": 393.0, "params": QWEN3}]})
    with pytest.raises(LookupError, match="no measured ceilings for NVIDIA H200"):
        tp.efficiency_from_record("kernel_rates", tp.configs.by_name("qwen3"), peak_source="measured",
                                  results_dir=tmp_path)
    _record(tmp_path, "ceilings", "NVIDIA H200", {"matmul_tflops": 786.0, "copy_tbps": 4.2})
    eff = tp.efficiency_from_record("kernel_rates", tp.configs.by_name("qwen3"), peak_source="measured",
                                    results_dir=tmp_path)
    assert eff.mfu == pytest.approx(0.5)


def test_ceilings_give_the_dense_matmuls_efficiency():
    r = tp.estimate("deepseek-v3", "h100", mfu_from_record="ceilings")
    assert 0.6 < r["mfu"] < 0.9  # the recorded H200 matmul over its 989 TFLOP/s datasheet peak
    assert "dense bf16 matmul (an upper bound" in r["mfu_source"]


def test_records_that_cannot_give_an_efficiency_say_why(tmp_path):
    with pytest.raises(LookupError, match=r"no recorded 'moe_variants' results in .*recorded kinds there: none"):
        tp.estimate("deepseek-v3", "h100", mfu_from_record="moe_variants", results_dir=tmp_path)
    _record(tmp_path, "scale_kernel", "NVIDIA H200", {"name": "00_scale", "tflops": 0.95, "params": {"n": 5}})
    with pytest.raises(LookupError, match="holds no measurement of an MoE shape"):
        tp.estimate("deepseek-v3", "h100", mfu_from_record="scale_kernel", results_dir=tmp_path)
    _record(tmp_path, "other", "Mystery GPU 9000", {"measurements": []})
    with pytest.raises(LookupError, match="'Mystery GPU 9000', which matches none of the hardware profiles"):
        tp.estimate("deepseek-v3", "h100", mfu_from_record="other", results_dir=tmp_path)


# -- the command line --------------------------------------------------------------------------

def test_cli_json_and_exit_codes(capsys, tmp_path):
    assert tp.main(["--config", "mixtral-8x7b", "--hardware", "h200", "--num-gpus", "4", "--mfu", "0.5",
                    "--seq-len", "0", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    direct = tp.estimate("mixtral-8x7b", "h200", num_gpus=4, mfu=0.5, seq_len=0)
    assert r["training"]["tokens_per_day"] == pytest.approx(direct["training"]["tokens_per_day"])
    with pytest.raises(SystemExit) as exit_:
        tp.main(["--config", "gpt-5"])
    assert exit_.value.code == 2  # argparse's usage error, naming the argument
    assert "argument --config: unknown MoE configuration 'gpt-5'" in capsys.readouterr().err
    assert tp.main(["--mfu-from-record", "moe_variants", "--results-dir", str(tmp_path)]) == 1
    assert "no recorded 'moe_variants' results" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        tp.main(["--mfu", "0.3", "--mfu-from-record", "ceilings"])
    assert exit_.value.code == 2  # argparse: not allowed together
    assert tp.main(["--list"]) == 0
    assert "deepseek-v3" in capsys.readouterr().out


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        tp.main(["--help"])
    text = capsys.readouterr().out
    for option in ("--config", "--hardware", "--num-gpus", "--mfu", "--mfu-from-record", "--implementation",
                   "--price-per-gpu-hour", "--peak-tflops", "--measured-peak", "--seq-len", "--results-dir",
                   "--json", "--list"):
        assert option in text
    assert "FLOPs per token, training  = 6 x N" in text


def test_the_script_runs_with_its_defaults_in_a_moment():
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "DeepSeek-V3 on 8 x NVIDIA H100" in done.stdout and "tokens/day" in done.stdout
    assert time.perf_counter() - start < 10


def test_shapes_are_found_wherever_a_record_keeps_them():
    assert tp._shape_of({"T": 1, "d": 2, "n": 3, "E": 4, "K": 1}) == (1, 2, 3, 4, 1)
    assert tp._shape_of({"params": {"shape": [1, 2, 3, 4, 1]}}) == (1, 2, 3, 4, 1)
    assert tp._shape_of({"shape": [1, 2, 3, 4, 1], "tflops": 5}) == (1, 2, 3, 4, 1)
    assert tp._shape_of({"shape": "deepseek-v3", "tflops": 5}) is None
    assert tp._shape_of({"params": {"n": 3}}) is None


def test_efficiency_from_a_grouped_gemm_record(tmp_path):
    # The rows of benchmarks/bench_grouped_gemm.py: "impl", "proj", "routing", the shape, "tflops"
    # (and what the record's layout asks of every row: its FLOPs, bytes and time).
    work = {"flops": 1e12, "bytes": 1e9, "ms": 1.7}
    rows = [{"shape": "qwen3-30b-a3b", "impl": impl, "proj": proj, "routing": "uniform", **QWEN3, **work, "tflops": tf}
            for impl, proj, tf in (("02_5_wgmma", "up", 600.0), ("02_5_wgmma", "down", 550.0),
                                   ("torch._grouped_mm", "up", 640.0))]
    rows.append({"shape": "qwen3-30b-a3b", "impl": "02_1_naive", "proj": "up", "routing": "uniform", **QWEN3,
                 "flops": 1e12, "bytes": 1e9, "error": "refused"})
    _record(tmp_path, "grouped_gemm", "NVIDIA H200", {"rows": rows, "matmul_tflops": 786.0})
    qwen3 = tp.configs.by_name("qwen3")
    eff = tp.efficiency_from_record("grouped_gemm", qwen3, implementation="wgmma up", results_dir=tmp_path)
    assert eff.mfu == pytest.approx(600 / 989) and "02_5_wgmma up uniform" in eff.source
    with pytest.raises(LookupError, match=r"02_5_wgmma up uniform \(600 TFLOP/s\), 02_5_wgmma down uniform"):
        tp.efficiency_from_record("grouped_gemm", qwen3, implementation="wgmma", results_dir=tmp_path)
