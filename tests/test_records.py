import json

import numpy as np
import pytest
import torch

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


@pytest.mark.skipif(machine.has_gpu(), reason="with a GPU, load() prefers this machine's own record")
def test_of_two_records_from_one_day_the_reference_cards_is_shown(tmp_path):
    for gpu in ("NVIDIA H100 80GB HBM3", records.REFERENCE_GPU, "NVIDIA Z9"):  # files sort H100 first
        path = tmp_path / f"demo__{gpu.replace(' ', '-').lower()}.json"
        path.write_text(json.dumps({"kind": "demo", "environment": {"gpu": gpu, "date": "2026-12-06"}, "data": {}}))
    assert records.load("demo", results_dir=tmp_path).gpu == records.REFERENCE_GPU


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


# ----------------------------------------------------------------------------------------------
# A record that cannot be used is refused once, naming the file and what is wrong

CEILINGS = {"kind": "ceilings", "environment": {"gpu": "NVIDIA H200", "date": "2026-11-29"},
            "data": {"matmul_tflops": 786.0, "copy_tbps": 4.2}}


def _text(record: dict) -> str:
    return json.dumps(record, indent=1)


@pytest.mark.parametrize("content,message", [
    (_text(CEILINGS)[:60], "is cut short (its JSON stops in the middle, at line 4): measure again"),
    ("", "is empty: measure again"),
    ("{'kind': 'ceilings'}", "is not valid JSON (Expecting property name enclosed in double quotes, line 1 column 2)"),
    ("[]", "holds a list, not a record (an object with keys kind, environment, data)"),
    (_text({k: v for k, v in CEILINGS.items() if k != "data"}), "has no key 'data' (keys: kind, environment)"),
    (_text({**CEILINGS, "environment": []}), "environment must be an object, got a list"),
    (_text({**CEILINGS, "kind": "grouped_gemm"}), "holds a record of kind 'grouped_gemm', but its name says 'ceilings'"),
    (_text({**CEILINGS, "data": {"matmul_tflop": 786.0, "copy_tbps": 4.2}}),  # a renamed key
     "data has no key 'matmul_tflops' (keys: matmul_tflop, copy_tbps)"),
    (_text({**CEILINGS, "data": {"matmul_tflops": "786", "copy_tbps": 4.2}}),  # a string for a number
     'data.matmul_tflops must be a number, got a string "786"'),
    (_text(CEILINGS).replace("4.2", "NaN"), "data.copy_tbps is NaN: a record holds finite numbers"),
    (_text(CEILINGS).replace("4.2", "Infinity"), "data.copy_tbps is infinite"),
], ids=["truncated", "empty", "not JSON", "a list", "no data", "environment a list", "another kind", "renamed key",
        "string for a number", "NaN", "infinity"])
def test_a_broken_record_is_refused_naming_the_file(tmp_path, content, message):
    path = tmp_path / "ceilings__nvidia-h200.json"
    path.write_text(content)
    for read in (lambda: records.load("ceilings", results_dir=tmp_path), lambda: records.read(path)):
        with pytest.raises(records.RecordError) as err:
            read()
        assert str(err.value).startswith(f"{path}: ") and message in str(err.value), str(err.value)


def test_a_row_deep_in_a_record_is_named_by_its_place(tmp_path):
    good = records.read(next(RESULTS_DIR.glob("moe_layer_training__*.json")))
    data = json.loads(json.dumps(good.data))
    del data["shapes"]["qwen3-30b-a3b"]["contenders"]["course"]["forward+backward"]["ms"]
    path = tmp_path / "moe_layer_training__nvidia-h200.json"
    path.write_text(json.dumps({"kind": good.kind, "environment": good.environment, "data": data}))
    with pytest.raises(records.RecordError, match=r'moe_layer_training__nvidia-h200\.json: data\.shapes\["qwen3-30b-a3b"\]'
                                                  r'\.contenders\.course\["forward\+backward"\] has no key \'ms\' '
                                                  r"\(keys: ms_p10, ms_p90, reps, tflops\)"):
        records.read(path)
    rows = {"rows": [{"shape": "s", "proj": "up", "routing": "uniform", "impl": "x", "flops": 1.0, "bytes": 1.0,
                      "T": 1, "d": 1, "n": 1, "E": 1, "K": 1, "error": 7}], "matmul_tflops": 1.0}
    (tmp_path / "grouped_gemm__gpu.json").write_text(json.dumps({"kind": "grouped_gemm", "environment": {},
                                                                 "data": rows}))
    with pytest.raises(records.RecordError, match=r"data\.rows\[0\]\.error must be a string, got a number 7"):
        records.load("grouped_gemm", results_dir=tmp_path)


def test_every_committed_record_reads_back_checked():
    paths = sorted(RESULTS_DIR.glob("*.json"))
    assert len(paths) >= 10
    for path in paths:  # raises RecordError naming the file if one fails its kind's layout
        assert records.read(path).path == path


def test_need_names_the_file_and_the_place(tmp_path):
    rec = records.save("demo", {"rows": [{"ms": 1.5}, {"ms": "slow"}]}, results_dir=tmp_path)
    assert records.read(rec.path).need("rows", 0, "ms", layout=float) == 1.5
    with pytest.raises(records.RecordError, match=r"demo__[\w-]+\.json: data\.rows\[1\]\.ms must be a number, got a "
                                                  r'string "slow"'):
        rec.need("rows", 1, "ms", layout=float)
    with pytest.raises(records.RecordError, match=r"data\.rows\[0\] has no key 'tflops' \(keys: ms\)"):
        rec.need("rows", 0, "tflops")
    with pytest.raises(records.RecordError, match=r"data\.rows has no item \[2\]"):
        rec.need("rows", 2)


# ----------------------------------------------------------------------------------------------
# save writes only what reads back the same, and only inside the results folder


@pytest.mark.parametrize("data,message", [
    ({"ms": float("nan")}, "data.ms is NaN: a record holds finite numbers (None where nothing was measured)"),
    ({"rows": [{"tflops": float("inf")}]}, "data.rows[0].tflops is infinite"),
    ({"x": torch.ones(3)}, "data.x is a torch.Tensor, which a JSON record cannot hold"),
    ({"x": np.ones(3)}, "data.x is a numpy.ndarray, which a JSON record cannot hold"),
    ({"shapes": {"forward+backward": np.float64("nan")}}, 'data.shapes["forward+backward"] is NaN'),
    ({"by_tile": {128: 1.0}}, "data.by_tile has a key 128 that is not a string"),
])
def test_save_refuses_what_json_cannot_hold(tmp_path, data, message):
    with pytest.raises(records.RecordError) as err:
        records.save("demo", data, results_dir=tmp_path)
    assert message in str(err.value)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even half a file


def test_save_turns_numpy_scalars_into_numbers(tmp_path):
    rec = records.save("demo", {"ms": np.float32(1.5), "reps": np.int64(3), "ok": np.bool_(True), "t": (1, 2)},
                       results_dir=tmp_path)
    assert records.read(rec.path).data == {"ms": 1.5, "reps": 3, "ok": True, "t": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == [rec.path.name]  # no .partial left behind


@pytest.mark.parametrize("kind", ["../x", "a/b", "", "/tmp/x", "a__b", "x.json", None])
def test_a_kind_that_would_leave_the_results_folder_is_refused(tmp_path, kind):
    with pytest.raises(ValueError, match="a record kind"):
        records.save(kind, {}, results_dir=tmp_path)
    with pytest.raises(ValueError, match="a record kind"):
        records.load(kind, results_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
