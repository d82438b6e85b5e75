"""Import a command-line script of ``benchmarks/`` (or ``tools/``) as a module, for its tests
(neither folder is a package: their files are scripts run as ``python benchmarks/NAME.py``)."""

import importlib.util
import sys

from moe_course import ROOT


def load(name: str, folder: str = "benchmarks"):
    module_name = f"{folder}_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module
