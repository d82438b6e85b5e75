"""Import a command-line tool of ``benchmarks/`` as a module, for its tests (the folder is not
a package: its files are scripts run as ``python benchmarks/NAME.py``)."""

import importlib.util
import sys

from moe_course import ROOT


def load(name: str):
    module_name = f"benchmarks_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module
