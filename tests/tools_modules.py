"""The set-up tools of ``tools/`` as modules, for their tests. They are scripts, and make_locks
imports setup_env the way a script imports a file beside it: tools/ goes on the path."""

import importlib
import sys

from moe_course import ROOT

if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))
setup_env = importlib.import_module("setup_env")
make_locks = importlib.import_module("make_locks")
