"""The quality experiment of chapter 04 (moe_course/rounding_quality.py) and the two command-line
tools of benchmarks/ for token rounding: reproducible, honest about what it compares, recorded."""

import dataclasses
import json

import pytest
from benchmark_scripts import load

from moe_course import machine
from moe_course import rounding_quality as rq
from moe_course import token_rounding as tr

TINY = dataclasses.replace(rq.Setup(), steps=12, val_tokens=256, batch=128, tile=8)


def test_same_seed_same_run():
    a, b = rq.train("nearest", 3, TINY), rq.train("nearest", 3, TINY)
    assert a["val_loss"] == b["val_loss"] and a["curve"] == b["curve"]


def test_rounding_with_a_tile_of_one_trains_exactly_like_top_k():
    one = dataclasses.replace(TINY, tile=1)
    topk, nearest = rq.train("top-K", 0, one), rq.train("nearest", 0, one)
    assert nearest["val_loss"] == topk["val_loss"] and nearest["changed"] == 0.0


def test_rounding_changes_the_routing_and_the_result():
    topk, nearest = rq.train("top-K", 0, TINY), rq.train("nearest", 0, TINY)
    assert topk["changed"] == 0.0 and nearest["changed"] > 0.0
    assert nearest["val_loss"] != topk["val_loss"]


def test_summary_pairs_each_seed_with_its_own_baseline():
    runs = [{"method": m, "seed": s, "val_loss": v, "changed": c} for m, s, v, c in (
        ("top-K", 0, 1.0, 0.0), ("top-K", 1, 2.0, 0.0), ("nearest", 0, 1.1, 0.1), ("nearest", 1, 1.8, 0.3))]
    s = rq.summarize(runs)
    assert s["nearest"]["rel_diff_mean"] == pytest.approx((0.1 - 0.1) / 2)
    assert s["nearest"]["rel_diff_min"] == pytest.approx(-0.1) and s["nearest"]["rel_diff_max"] == pytest.approx(0.1)
    assert s["top-K"]["val_loss_mean"] == 1.5 and s["nearest"]["changed_mean"] == pytest.approx(0.2)
    assert "(baseline)" in rq.summary_table(s) and "+0.00% ± 14.14%" in rq.summary_table(s)


def test_bad_setups_and_methods_are_refused():
    with pytest.raises(ValueError, match="Setup.tile must be a positive int"):
        rq.Setup(tile=0)
    with pytest.raises(ValueError, match=r"Setup.k \(5\) cannot exceed Setup.experts \(4\)"):
        rq.Setup(k=5, experts=4)
    with pytest.raises(ValueError, match="method must be one of"):
        rq.train("sideways", 0, TINY)


def test_quality_script_records_its_result(tmp_path, capsys):
    script = load("token_rounding_quality")
    assert script.main(["--seeds", "2", "--steps", "5", "--methods", "nearest", "--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "<0.1% quality loss" in out and "nearest" in out
    (path,) = tmp_path.glob("token_rounding_quality__*.json")
    data = json.loads(path.read_text())["data"]
    assert {r["method"] for r in data["runs"]} == {"top-K", "nearest"} and len(data["runs"]) == 4
    assert data["setup"]["steps"] == 5 and "evaluated with plain top-K" in data["protocol"]


def test_speed_script_without_a_gpu_says_so(capsys, monkeypatch):
    if machine.has_gpu():
        pytest.skip("this machine has a GPU: the script measures instead")
    assert load("bench_token_rounding").main([]) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and ("no recorded" in out or "recorded on" in out)


def fake_rows():
    rows = []
    for method, tiles, up, down in (("top-K", 640, 2.0, 1.0), ("nearest", 512, 1.6, 0.9)):
        stats = {"rows": 1000, "tiles": tiles, "changed": 0.0 if method == "top-K" else 0.1}
        rows.append({"shape": "s", "method": method, "proj": "routing", "impl": "routing kernels", "ms": 0.05, **stats})
        for proj, ms in (("up", up), ("down", down)):
            rows.append({"shape": "s", "method": method, "proj": proj, "impl": "torch._grouped_mm", "ms": ms,
                         "tflops": 500.0, **stats})
    return rows


def test_speedups_are_top_k_time_over_the_methods_time():
    (s,) = tr.speedups(fake_rows())
    assert s["method"] == "nearest" and s["up"] == pytest.approx(1.25) and s["down"] == pytest.approx(1 / 0.9)
    assert s["up+down"] == pytest.approx(3.0 / 2.5) and s["tile_ratio"] == pytest.approx(1.25)
    table = tr.speed_table(fake_rows())
    assert "up to 1.16x" in table and "1.250" in table
