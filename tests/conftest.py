import pytest

from moe_course import machine


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped without a GPU, tests marked ``nvrtc`` where NVRTC is not
    installed (macOS: NVIDIA publishes none), and the reason is printed (pytest -rs)."""
    skips = {}
    if not machine.has_gpu():
        skips["gpu"] = pytest.mark.skip(reason=machine.skip_reason())
    if machine.info().nvrtc is None:
        skips["nvrtc"] = pytest.mark.skip(reason=machine.compile_skip_reason())
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)
