"""benchmarks/bench_io_overlap.py on a machine without a GPU: it prints the recorded tables,
labelled, and fails (exit 1) when the record holds a wrong result. Its table helpers on
hand-made rows."""


import pytest

from benchmark_scripts import load
from moe_course import machine, records

bio = load("bench_io_overlap")
no_gpu = pytest.mark.skipif(machine.has_gpu(), reason="checks the no-GPU path (with a GPU it measures)")


@no_gpu
def test_without_a_gpu_it_prints_the_record(capsys):
    rec = records.load(bio.KIND)
    code = bio.main([])
    out = capsys.readouterr().out
    if rec is None:
        assert code == 1 and "no recorded results either" in out
        return
    assert code == 0 and f"recorded on {rec.label()}" in out
    for part, head in (("pipeline", "math waits"), ("gather", "x pre-permuted"), ("stalls", "stall reason")):
        if part in rec.data and "skipped" not in rec.data[part]:
            assert head in out


@no_gpu
def test_a_wrong_result_in_the_record_fails_the_run(monkeypatch, capsys):
    wrong = {"shape": "s", "proj": "up", "impl": "03_1_tma, 4 slots", "error": "wrong result: relative error 0.5"}
    fake = records.Record(bio.KIND, {"gpu": "NVIDIA H200", "date": "2026-11-29"}, {"pipeline": [wrong]})
    monkeypatch.setattr(records, "load", lambda kind, **kw: fake)
    assert bio.main([]) == 1
    assert "wrong result: relative error 0.5" in capsys.readouterr().out


def test_tables_from_rows():
    rows = [{"shape": "qwen3", "proj": "up", "impl": "03_1_tma, 1 slot", "ms": 2.0, "tflops": 300.0,
             "trace_wait_share": 0.5},
            {"shape": "qwen3", "proj": "up", "impl": "03_2_warp_specialized", "ms": 1.0, "tflops": 600.0,
             "trace_wait_share": None},  # too few slices traced
            {"shape": "qwen3", "proj": "up", "impl": "broken", "error": "wrong result: relative error 1"}]
    text = bio.pipeline_table(rows)
    assert "50%" in text and "wrong result" in text and "03_2_warp_specialized" in text
    gather = [{"shape": "qwen3", "impl": "03_2 on pre-permuted rows", "ms": 1.0, "tflops": 600.0},
              {"shape": "qwen3", "impl": "03_3 gather in the load", "ms": 1.25, "tflops": 480.0}]
    assert "0.80" in bio.gather_table(gather)  # speed relative to the pre-permuted rows
    assert "skipped (no counters)" in bio.stalls_table({"skipped": "no counters"})
    stalls = {"variants": {"1 slot": {"long_scoreboard": 15.0, "barrier": 12.0}, "4 slots": {"long_scoreboard": 0.8}}}
    table = bio.stalls_table(stalls)
    assert table.index("long_scoreboard") < table.index("barrier") and "0.00" in table


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        bio.main(["--help"])
    out = capsys.readouterr().out
    for option in ("--parts", "--shapes", "--rounds", "--json", "--no-save"):
        assert option in out
