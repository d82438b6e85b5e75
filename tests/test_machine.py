import sys

import pytest

from moe_course import machine


def test_info_describes_this_machine():
    m = machine.info()
    assert m.python
    assert m.has_gpu == (m.gpu is not None)
    assert m.has_gpu or m.why_no_gpu, "without a GPU the reason must be given"
    text = m.summary()
    for row in ("GPU", "NVRTC", "CuPy", "torch"):
        assert row in text


@pytest.mark.skipif(sys.platform == "darwin", reason="NVIDIA publishes no NVRTC for macOS")
def test_nvrtc_is_installed():
    assert machine.nvrtc_version(), "NVRTC must be installed: kernels compile for sm_90a on any machine"


def test_arch_for_compute_capability():
    assert machine.MachineInfo(compute_capability=(9, 0)).arch == "sm_90a"
    assert machine.MachineInfo(compute_capability=(8, 0)).arch == "sm_80"
    assert machine.MachineInfo().arch is None
