"""moe_course.hardware: datasheet profiles, GPU-name matching, measured ceilings from records."""

import json

import pytest

from moe_course import ceilings, hardware


def test_dense_rates_are_half_the_datasheets_sparse_figures():
    # Datasheets: A100 BF16 624 TFLOPS with sparsity; H100/H200 SXM 1,979; B200 (HGX) 4,500.
    assert hardware.by_name("a100").bf16_tflops == 624 / 2
    assert hardware.by_name("h100").bf16_tflops == pytest.approx(1979 / 2, abs=1)
    assert hardware.by_name("h200").bf16_tflops == pytest.approx(1979 / 2, abs=1)
    assert hardware.by_name("b200").bf16_tflops == 4500 / 2
    assert hardware.by_name("h200").hbm_tbps == 4.8 and hardware.by_name("h200").memory_gb == 141
    assert hardware.by_name("H100").ridge_intensity == pytest.approx(989 / 3.35)


def test_prices_say_they_are_assumptions():
    for hw in hardware.ALL:
        assert hw.price_per_gpu_hour > 0
        assert "assumed" in hw.price_note or "DeepSeek-V3 report" in hw.price_note
    assert "(assumed)" in str(hardware.by_name("h100"))


@pytest.mark.parametrize("gpu, profile", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA B200", "b200"), ("NVIDIA H800", "h800"),
    ("NVIDIA H100 NVL", None), ("NVIDIA H200 NVL", None), ("NVIDIA GeForce RTX 4090", None), (None, None),
])
def test_gpu_names_map_to_profiles(gpu, profile):
    found = hardware.for_gpu_name(gpu)
    assert (found.name if found else None) == profile


def test_unknown_hardware_lists_the_known_names():
    with pytest.raises(ValueError, match="unknown hardware 'h300'; known: a100, h100, h100-pcie, h800, h200, b200"):
        hardware.by_name("h300")


def test_recorded_ceilings_come_from_the_h200_record():
    h200 = hardware.by_name("h200")
    roof = hardware.recorded_ceilings(h200)
    assert roof is not None and roof.record.gpu == "NVIDIA H200"
    assert roof.matmul_tflops == ceilings.recorded(gpu="NVIDIA H200").matmul_tflops
    rates = h200.rates("measured")
    assert rates.matmul_tflops == roof.matmul_tflops and rates.label.startswith("measured: NVIDIA H200")
    assert h200.rates().matmul_tflops == 989


def test_measured_rates_without_a_record_say_what_to_run():
    assert hardware.recorded_ceilings(hardware.by_name("a100")) is None
    with pytest.raises(LookupError, match="no measured ceilings for NVIDIA A100 SXM4 80GB.*make bench"):
        hardware.by_name("a100").rates("measured")
    with pytest.raises(ValueError, match="'datasheet' or 'measured'"):
        hardware.by_name("a100").rates("vibes")


def test_recorded_ceilings_read_another_folder(tmp_path):
    rec = {"kind": "ceilings", "environment": {"gpu": "NVIDIA H100 80GB HBM3", "date": "2026-01-02"},
           "data": {"matmul_tflops": 700.0, "copy_tbps": 3.0}}
    (tmp_path / "ceilings__nvidia-h100-80gb-hbm3.json").write_text(json.dumps(rec))
    assert hardware.recorded_ceilings(hardware.by_name("h100"), tmp_path).matmul_tflops == 700.0
    assert hardware.recorded_ceilings(hardware.by_name("h200"), tmp_path) is None
