import pytest

from moe_course import machine


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped without a GPU, and the reason is printed (pytest -rs)."""
    if machine.has_gpu():
        return
    skip = pytest.mark.skip(reason=machine.skip_reason())
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
