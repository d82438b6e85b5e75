"""Makes CuPy, cuda-bindings and NVIDIA's CUDA wheels look uninstalled, as on a Mac (NVIDIA
publishes none of them for macOS), in any Python whose PYTHONPATH starts with this folder: the
subprocesses of tests/test_without_cuda.py and the notebook kernels they start.

The path finder that reads site-packages is replaced by one that finds nothing under these names,
so `import cupy` fails exactly as where it is not installed, and `importlib.util.find_spec`
returns None."""

import importlib.machinery
import sys

HIDDEN = ("cupy", "cupyx", "cupy_backends", "cuda", "nvidia")


class WithoutCuda(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname.partition(".")[0] in HIDDEN:
            return None
        return super().find_spec(fullname, path, target)


sys.meta_path[:] = [WithoutCuda if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
