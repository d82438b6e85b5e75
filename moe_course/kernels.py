"""The CUDA sources in ``kernels/``: load them on a GPU, or inspect them without one.

Two ways in, one source:

- :func:`load` compiles a source with CuPy ``RawModule`` for the GPU at hand (``sm_90a`` on
  Hopper) and returns the module, ready to launch.
- :func:`compile_report` compiles the same source with NVRTC for ``sm_90a`` (or any target)
  *without a GPU* and returns the cubin and, per kernel, the registers, shared memory, stack
  frame and spills that ptxas reported. That is what a laptop can still show of a kernel.

A compile error from either path is a :class:`CompileError` whose message quotes the source
lines the compiler complained about. :func:`excerpt` gives a notebook the numbered lines of a
kernel to show, :func:`edited` a copy with a planted bug or an added ``printf``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import KERNELS_DIR
from .machine import NO_NVRTC, info

DEFAULT_ARCH = "sm_90a"  # the course targets Hopper; the 'a' unlocks wgmma and setmaxnreg
BASE_OPTIONS = ("-std=c++17",)


class CompileError(RuntimeError):
    """The compiler rejected a source; the message shows the offending lines."""


@dataclass(frozen=True)
class Source:
    name: str  # file name used in compiler messages, e.g. "00_scale.cu"
    code: str


@dataclass(frozen=True)
class Resources:
    """What ptxas reported for one kernel (static shared memory only: dynamic is set at launch)."""

    kernel: str
    registers: int
    shared_bytes: int
    stack_bytes: int
    spill_stores: int
    spill_loads: int
    barriers: int = 0

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


@dataclass(frozen=True)
class CompiledKernel:
    source: Source
    arch: str
    cubin: bytes
    log: str
    resources: dict[str, Resources]

    def table(self) -> str:
        head = f"{'kernel':<34} {'regs':>5} {'smem B':>8} {'stack B':>8} {'spill st/ld B':>14}"
        rows = [head, "-" * len(head)]
        for r in self.resources.values():
            rows.append(f"{r.kernel:<34} {r.registers:>5} {r.shared_bytes:>8} {r.stack_bytes:>8} "
                        f"{f'{r.spill_stores}/{r.spill_loads}':>14}")
        return f"{self.source.name} for {self.arch} ({len(self.cubin)} byte cubin)\n" + "\n".join(rows)


def kernel_files() -> list[Path]:
    """Every ``.cu`` file in ``kernels/``, in teaching order (their names are numbered)."""
    return sorted(KERNELS_DIR.glob("*.cu"))


#: How long a source, once read, is trusted without looking at its file again. A layer loads its
#: kernels a dozen times a step, and parsing the path and stating the file each time cost ~0.1 ms
#: a load (the hf experts call, H100, session 14). A learner's edit shows at the first launch
#: after this many seconds, long before anyone can save a file and run a cell.
SOURCE_RECHECK_SECONDS = 1.0
_clock = time.monotonic  # a test's fake clock replaces it
_LOOKED_AT: dict[str, tuple[Source, float]] = {}  # as asked -> (its source, when its file was looked at)


def read_source(name_or_path: str | os.PathLike) -> Source:
    """``"00_scale"``, ``"00_scale.cu"`` or a path; a name is looked up in ``kernels/``."""
    asked, now = os.fspath(name_or_path), _clock()
    seen = _LOOKED_AT.get(asked)
    if seen is not None and now - seen[1] < SOURCE_RECHECK_SECONDS:
        return seen[0]
    path = Path(name_or_path)
    if not path.suffix:
        path = path.with_suffix(".cu")
    if not path.is_absolute() and not path.exists():
        path = KERNELS_DIR / path
    try:
        stat = path.stat()
    except FileNotFoundError:
        _LOOKED_AT.pop(asked, None)
        known = ", ".join(p.stem for p in kernel_files()) or "none"
        raise FileNotFoundError(f"no kernel source {name_or_path!r} (kernels/ has: {known})") from None
    source = _read_text(path, stat.st_mtime_ns, stat.st_size)
    _LOOKED_AT[asked] = (source, now)
    return source


@functools.lru_cache(maxsize=256)
def _read_text(path: Path, mtime_ns: int, size: int) -> Source:
    # Read again only when the file changed (an edited kernel recompiles): the layer loads its
    # kernels ~10 times a step, and reading each file every time was ~5% of the 7B step's host time.
    return Source(path.name, path.read_text())


def excerpt(name: str, start: str, end: str | None = None) -> str:
    """The lines of a kernel source from the first that contains ``start`` up to, not including,
    the next that contains ``end`` (``None``: to the end of the file), numbered as in the file,
    under a line naming it: what a notebook shows of a kernel, read from ``kernels/`` at run time.
    A marker that is not there (the kernel changed) is an error that names it."""
    source = read_source(name)
    lines = source.code.splitlines()
    first = next((i for i, line in enumerate(lines) if start in line), None)
    if first is None:
        raise ValueError(f"{source.name} has no line containing {start!r}: the kernel changed; update the excerpt")
    last = len(lines) if end is None else next((i for i in range(first + 1, len(lines)) if end in lines[i]), None)
    if last is None:
        raise ValueError(f"{source.name} has no line containing {end!r} after line {first + 1}: the kernel changed; "
                         "update the excerpt")
    body = "\n".join(f"{i + 1:4d}  {lines[i]}" for i in range(first, last))
    return f"kernels/{source.name}, lines {first + 1}-{last}:\n{body}"


def edited(name: str, old: str, new: str) -> Source:
    """A kernel source with ``old`` replaced by ``new``, which must occur exactly once (a planted
    bug, a ``printf`` added for debugging); the file itself is not touched. Keep ``new`` on as many
    lines as ``old`` and a compiler's line numbers still match the file's."""
    source = read_source(name)
    found = source.code.count(old)
    if found != 1:
        raise ValueError(f"{source.name} contains {old!r} {found} times, not once: the kernel changed; update the edit")
    return Source(source.name, source.code.replace(old, new))


def _as_source(src: str | os.PathLike | Source) -> Source:
    if isinstance(src, Source):
        return src
    if isinstance(src, str) and ("\n" in src or "__global__" in src):
        return Source("cell.cu", src)  # CUDA C written in a notebook cell
    return read_source(src)


@functools.lru_cache(maxsize=None)
def cuda_include_dir() -> str | None:
    """Where ``cuda_bf16.h`` and friends are: the NVIDIA header wheels, else a CUDA toolkit."""
    try:
        from cuda.pathfinder import find_nvidia_header_directory

        found = find_nvidia_header_directory("cudart")
        if found:
            return found
    except Exception:
        pass
    for root in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and Path(root, "include", "cuda_bf16.h").exists():
            return str(Path(root, "include"))
    return None


def nvrtc_options(arch: str | None, defines: dict | None, extra: tuple[str, ...]) -> tuple[str, ...]:
    """The course's NVRTC options: C++17, kernels/ and the CUDA headers on the include path."""
    opts = list(BASE_OPTIONS) + [f"-I{KERNELS_DIR}"]
    if inc := cuda_include_dir():
        opts.append(f"-I{inc}")
    if arch:
        opts.append(f"-arch={arch}")
    for key, value in (defines or {}).items():
        opts.append(f"-D{key}" if value is None else f"-D{key}={value}")
    return tuple(opts) + tuple(extra)


_DIAG = re.compile(r"^(?P<file>[^\s(]+)\((?P<line>\d+)\): (?P<kind>(?:catastrophic )?error|warning)[^:]*: (?P<msg>.*)$")


def explain_log(source: Source, log: str, arch: str | None, context: int = 2) -> str:
    """Turn an NVRTC log into a message that quotes each offending source line."""
    lines = source.code.splitlines()
    out = [f"{source.name} could not be compiled for {arch or 'this GPU'}:"]
    shown = 0
    for entry in log.splitlines():
        m = _DIAG.match(entry.strip())
        if not m or not m["kind"].endswith("error"):
            continue
        shown += 1
        n = int(m["line"])
        where = m["file"]
        out.append(f"\n  {where} line {n}: {m['msg']}")
        if not where.endswith((".h", ".cuh", ".hpp")):  # the source itself, whatever CuPy named it
            for i in range(max(1, n - context), min(len(lines), n + context) + 1):
                out.append(f"  {'>' if i == n else ' '} {i:4d} | {lines[i - 1]}")
        if shown == 5:
            out.append("\n  (more errors follow in the full log: CompileError.log)")
            break
    if not shown:
        out.append(log.strip() or "(the compiler gave no message)")
    return "\n".join(out)


def _error(source: Source, log: str, arch: str | None) -> CompileError:
    err = CompileError(explain_log(source, log, arch))
    err.log = log
    return err


_PTXAS_FUNC = re.compile(r"Function properties for (\S+)")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?(?:, (\d+) bytes smem)?")
_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\S+)'")


def parse_ptxas_report(log: str) -> dict[str, Resources]:
    """Read ptxas's ``-v`` lines: one entry per ``__global__`` function."""
    found: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        if m := _PTXAS_ENTRY.search(line) or _PTXAS_FUNC.search(line):
            current = found.setdefault(m[1], {"kernel": m[1]})
        elif current is None:
            continue
        elif m := _PTXAS_STACK.search(line):
            current.update(stack_bytes=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif m := _PTXAS_USED.search(line):
            current.update(registers=int(m[1]), barriers=int(m[2] or 0), shared_bytes=int(m[3] or 0))
    return {
        k: Resources(**{"stack_bytes": 0, "spill_stores": 0, "spill_loads": 0, **v})
        for k, v in found.items() if "registers" in v
    }


def compile_report(src: str | os.PathLike | Source, arch: str = DEFAULT_ARCH,
                   defines: dict | None = None, options: tuple[str, ...] = ()) -> CompiledKernel:
    """Compile with NVRTC (no GPU needed) and report each kernel's resources."""
    return _compile_report(_as_source(src), arch, tuple(sorted((defines or {}).items())), tuple(options))


@functools.lru_cache(maxsize=64)
def _compile_report(source: Source, arch: str, defines: tuple, options: tuple) -> CompiledKernel:
    opts = nvrtc_options(arch, dict(defines), ("-Xptxas=-v", "-lineinfo") + options)
    out = nvrtc_compile(source, opts)
    if not out.ok:
        raise _error(source, out.log, arch)
    return CompiledKernel(source, arch, out.cubin, out.log, parse_ptxas_report(out.log))


@dataclass(frozen=True)
class NvrtcOutput:
    ok: bool
    log: str
    cubin: bytes = b""
    ptx: str = ""


def nvrtc_compile(source: Source, opts: tuple[str, ...]) -> NvrtcOutput:
    """One NVRTC compile (no GPU needed): its log and, if it compiled, the cubin and the PTX."""
    try:
        from cuda.bindings import nvrtc
    except ImportError as exc:
        raise RuntimeError(f"{NO_NVRTC}: `make setup` installs them on Linux") from exc

    def check(result):
        err, *rest = result
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"NVRTC: {nvrtc.nvrtcGetErrorString(err)[1].decode()}")
        return rest[0] if len(rest) == 1 else rest

    def fetch(size, get) -> bytes:
        buf = bytearray(check(size(prog)))
        check((get(prog, buf)[0], None))
        return bytes(buf)

    prog = check(nvrtc.nvrtcCreateProgram(source.code.encode(), source.name.encode(), 0, [], []))
    try:
        (status,) = nvrtc.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts])
        log = fetch(nvrtc.nvrtcGetProgramLogSize, nvrtc.nvrtcGetProgramLog).rstrip(b"\0").decode(errors="replace")
        if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            return NvrtcOutput(False, log)
        cubin = fetch(nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN)
        ptx = fetch(nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX).rstrip(b"\0").decode()
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return NvrtcOutput(True, log, cubin, ptx)


def entry_points() -> set[str]:
    """The ``extern "C" __global__`` functions of kernels/*.cu and *.cuh: every kernel the course launches."""
    pattern = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(')
    return {name for path in KERNELS_DIR.glob("*.cu*") for name in pattern.findall(path.read_text())}


def kernels_fingerprint() -> str:
    """sha256 of every source in kernels/ (names and texts), 16 hex digits."""
    digest = hashlib.sha256()
    for path in kernel_files() + sorted(KERNELS_DIR.glob("*.cuh")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def ptr(tensor, offset_bytes: int = 0) -> np.uint64:
    """A tensor's device address (plus an offset) as a kernel argument: CuPy passes a
    ``np.uint64`` as the 64 bits a pointer parameter expects."""
    return np.uint64(tensor.data_ptr() + offset_bytes)


def on_torch_stream(launcher):
    """Decorator for a function that launches kernels on torch tensors: its CuPy launches go on
    torch's current stream, where torch's own work on those tensors goes, instead of CuPy's.

    Both libraries default to the same (legacy default) stream, so without this everything still
    works until someone uses a stream: under ``with torch.cuda.stream(s):`` the course's kernels
    would not wait for the torch work that made their inputs, and a CUDA graph capture (it
    records one stream) would fail. ``tests/test_layer_training.py`` checks both."""
    @functools.wraps(launcher)
    def on_the_same_stream(*args, **kwargs):
        if not info().has_gpu:  # nothing will launch: the launcher's own checks say why
            return launcher(*args, **kwargs)
        import torch

        with _cupy_stream(torch.cuda.current_stream()):
            return launcher(*args, **kwargs)
    return on_the_same_stream


_CUPY_STREAMS: dict = {}


def _cupy_stream(torch_stream):
    """CuPy's view of a torch stream (nothing created), made once per stream."""
    import cupy

    key = (torch_stream.cuda_stream, torch_stream.device.index)
    if key not in _CUPY_STREAMS:
        from_external = getattr(cupy.cuda.Stream, "from_external", None)  # CuPy >= 14.1; older: ExternalStream
        _CUPY_STREAMS[key] = from_external(torch_stream) if from_external else cupy.cuda.ExternalStream(*key)
    return _CUPY_STREAMS[key]


def load(src: str | os.PathLike | Source, defines: dict | None = None,
         options: tuple[str, ...] = (), name_expressions: tuple[str, ...] = ()):
    """Compile for this GPU with CuPy ``RawModule`` and return the module (needs a GPU)."""
    machine = info()
    if not machine.has_gpu:
        raise RuntimeError(f"loading a kernel needs a GPU ({machine.why_no_gpu}); "
                           "compile_report() shows what it compiles to without one")
    return _load(_as_source(src), machine.arch, tuple(sorted((defines or {}).items())),
                 tuple(options), tuple(name_expressions))


@functools.lru_cache(maxsize=64)
def _load(source: Source, arch: str, defines: tuple, options: tuple, name_expressions: tuple):
    import cupy

    opts = nvrtc_options(arch, dict(defines), options)
    # CuPy's disk cache knows only this text, not the files it #includes (a later step includes
    # an earlier one's .cu): the fingerprint of kernels/ makes an edit to any of them recompile.
    code = f"{source.code}\n// kernels/ {kernels_fingerprint()}\n"
    module = cupy.RawModule(code=code, options=opts, name_expressions=name_expressions or None)
    try:
        module.compile()  # compile now, so errors surface here and not at the first launch
    except cupy.cuda.compiler.CompileException as exc:
        raise _error(source, str(exc), arch) from None
    return module
