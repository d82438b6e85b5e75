"""What this machine has: GPU, compute capability, CUDA driver and runtime, CuPy, NVRTC.

Every notebook starts from :func:`info`. Set ``MOE_COURSE_FORCE_CPU=1`` to take the
no-GPU path on a GPU machine (that is how the CPU path is tested on a GPU box).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import sys
from dataclasses import asdict, dataclass, field


def _cuda_version(v: int | None) -> str | None:
    """CUDA encodes versions as 1000*major + 10*minor."""
    return None if not v else f"{v // 1000}.{(v % 1000) // 10}"


@dataclass(frozen=True)
class MachineInfo:
    gpu: str | None = None  # device name, None without a usable GPU
    compute_capability: tuple[int, int] | None = None
    sm_count: int | None = None
    l2_bytes: int | None = None
    memory_bytes: int | None = None
    cuda_driver: str | None = None  # newest CUDA the driver supports
    cuda_runtime: str | None = None  # the CUDA runtime CuPy was built for
    nvrtc: str | None = None
    cupy: str | None = None
    torch: str | None = None
    torch_cuda: bool = False
    python: str = field(default_factory=lambda: platform.python_version())
    why_no_gpu: str | None = None  # one line, when gpu is None

    @property
    def has_gpu(self) -> bool:
        return self.gpu is not None

    @property
    def is_hopper(self) -> bool:
        return self.compute_capability == (9, 0)

    @property
    def arch(self) -> str | None:
        """The NVRTC target for this GPU: ``sm_90a`` on Hopper (wgmma, setmaxnreg need the 'a')."""
        if self.compute_capability is None:
            return None
        major, minor = self.compute_capability
        return f"sm_{major}{minor}{'a' if (major, minor) == (9, 0) else ''}"

    def as_dict(self) -> dict:
        d = asdict(self)
        d["compute_capability"] = (
            ".".join(map(str, self.compute_capability)) if self.compute_capability else None
        )
        return d

    def summary(self) -> str:
        rows = [
            ("GPU", self.gpu or f"none ({self.why_no_gpu})"),
            ("compute capability", self.as_dict()["compute_capability"] or "-"),
            ("SMs / L2 / memory", "-" if not self.gpu else
             f"{self.sm_count} / {self.l2_bytes / 2**20:.0f} MiB / {self.memory_bytes / 2**30:.0f} GiB"),
            ("CUDA driver / runtime", f"{self.cuda_driver or '-'} / {self.cuda_runtime or '-'}"),
            ("NVRTC", self.nvrtc or "not found"),
            ("CuPy", self.cupy or "not installed"),
            ("torch", f"{self.torch or 'not installed'}"
                      f"{' (CUDA)' if self.torch_cuda else ' (CPU only)' if self.torch else ''}"),
            ("Python", f"{self.python} ({sys.executable})"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def nvrtc_version() -> str | None:
    try:
        from cuda.bindings import nvrtc

        err, major, minor = nvrtc.nvrtcVersion()
        return f"{major}.{minor}" if err == nvrtc.nvrtcResult.NVRTC_SUCCESS else None
    except Exception:  # no NVRTC library found: compile_report says how to install it
        return None


@functools.lru_cache(maxsize=None)
def info() -> MachineInfo:
    """Look once; every later call returns the same answer."""
    fields: dict = {"nvrtc": nvrtc_version()}
    try:
        import torch

        fields["torch"] = torch.__version__
        fields["torch_cuda"] = bool(torch.cuda.is_available())
    except ImportError:
        pass
    try:
        import cupy
    except ImportError:
        fields["why_no_gpu"] = "CuPy is not installed"
        return MachineInfo(**fields)
    fields["cupy"] = cupy.__version__
    rt = cupy.cuda.runtime
    try:
        fields["cuda_runtime"] = _cuda_version(rt.runtimeGetVersion())
        fields["cuda_driver"] = _cuda_version(rt.driverGetVersion())
    except Exception:
        pass
    if os.environ.get("MOE_COURSE_FORCE_CPU"):
        fields["why_no_gpu"] = "MOE_COURSE_FORCE_CPU is set"
        return MachineInfo(**fields)
    try:
        if rt.getDeviceCount() == 0:
            raise RuntimeError("no CUDA device")
        props = rt.getDeviceProperties(cupy.cuda.Device().id)
    except Exception as exc:  # no driver, no device, driver too old for this CuPy
        msg = str(exc).split(":")[0] if str(exc) else type(exc).__name__
        fields["why_no_gpu"] = ("no NVIDIA GPU driver on this machine" if not fields.get("cuda_driver")
                                else f"no usable NVIDIA GPU ({msg})")
        return MachineInfo(**fields)
    name = props["name"]
    fields.update(
        gpu=name.decode() if isinstance(name, bytes) else name,
        compute_capability=(props["major"], props["minor"]),
        sm_count=props["multiProcessorCount"],
        l2_bytes=props["l2CacheSize"],
        memory_bytes=props["totalGlobalMem"],
    )
    return MachineInfo(**fields)


def has_gpu() -> bool:
    return info().has_gpu


def skip_reason() -> str:
    """The one line a notebook prints when it skips a GPU step."""
    return f"skipped: {info().why_no_gpu}"


# NVIDIA publishes cuda-bindings and the NVRTC wheels for Linux and Windows, none for macOS.
NO_NVRTC = ("compiling a kernel needs NVIDIA's NVRTC, through cuda-bindings and nvidia-cuda-nvrtc "
            "(Linux and Windows; none exist for macOS), and they are not installed here")


def compile_skip_reason() -> str:
    """The one line a notebook prints when it skips compiling a kernel (``info().nvrtc`` is None)."""
    return f"skipped: {NO_NVRTC}"


@contextlib.contextmanager
def one_thread():
    """Run torch on one CPU thread: small matrices gain nothing from more, and lose a lot when
    another process keeps a core busy (a shared 2-core machine: several times slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
