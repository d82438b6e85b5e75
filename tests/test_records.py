import json

import pytest

from moe_course import RESULTS_DIR, ceilings, machine, records


def test_save_and_load_round_trip(tmp_path):
    rec = records.save("demo", {"tflops": 1.5}, results_dir=tmp_path)
    assert rec.path.exists()
    raw = json.loads(rec.path.read_text())
    assert raw["environment"]["date"] and "torch" in raw["environment"]
    back = records.load("demo", results_dir=tmp_path)
    assert back.data == {"tflops": 1.5}
    assert records.load("nothing", results_dir=tmp_path) is None


def test_load_prefers_the_newest_record(tmp_path):
    for gpu, date in (("GPU A", "2026-01-01"), ("GPU B", "2026-06-01")):
        path = tmp_path / f"demo__{gpu.replace(' ', '-').lower()}.json"
        path.write_text(json.dumps({"kind": "demo", "environment": {"gpu": gpu, "date": date}, "data": {}}))
    if not machine.has_gpu():
        assert records.load("demo", results_dir=tmp_path).gpu == "GPU B"
    assert records.load("demo", gpu="GPU A", results_dir=tmp_path).gpu == "GPU A"


def test_label_names_gpu_date_and_versions():
    rec = records.Record("k", {"gpu": "NVIDIA H200", "date": "2026-11-29", "torch": "2.11.0",
                               "cupy": "14.2.0", "cuda_runtime": "13.0"}, {})
    assert rec.label() == "NVIDIA H200, 2026-11-29 (torch 2.11.0, cupy 14.2.0, CUDA 13.0)"


def test_recorded_ceilings_come_from_a_real_gpu():
    roof = ceilings.recorded()
    assert roof is not None, f"no ceilings recorded in {RESULTS_DIR}: run `make bench` on a GPU"
    assert roof.record.environment["gpu"], "recorded ceilings must name their GPU"
    assert 100 < roof.matmul_tflops < 3000 and 0.5 < roof.copy_tbps < 10


@pytest.mark.skipif(machine.has_gpu(), reason="checks the no-GPU path")
def test_live_or_recorded_without_gpu_reads_the_record(capsys):
    rec, live = records.live_or_recorded("ceilings", lambda: pytest.fail("must not measure without a GPU"))
    assert not live and rec.data["matmul_tflops"] > 0
    assert "No GPU here" in capsys.readouterr().out
