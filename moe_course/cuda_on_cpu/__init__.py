"""CUDA C kernels run on the CPU: for grading, and for debugging with ``printf``, on any laptop.

The course's kernels are CUDA C. A machine without an NVIDIA GPU cannot launch them, but most
of what a kernel *means* (which thread computes what, where the barriers are, which index it
reads) does not need one. This module compiles a kernel with the host's C++ compiler, with
``include/cuda_on_cpu.h`` giving it CUDA's words, and runs a launch like this:

- one thread block at a time; each CUDA thread runs on a stack of its own (a fiber, or a host
  thread where fibers are not available), and only one runs at any moment: it runs until it
  reaches ``__syncthreads()`` or a warp function (``__shfl_xor_sync`` ...), or returns, then the
  next thread in the order runs; when all have arrived, the barrier opens;
- the whole grid twice, from the same inputs: threads and blocks in ascending order, then in
  descending order. A result that differs between the two runs depends on the order in which
  threads ran, which no correct kernel does: :class:`RaceDetected` ("a missing
  ``__syncthreads()``?"). Shared memory starts each block filled with garbage (NaN), as on a GPU;
- a thread that returns while others wait at a barrier, or threads that wait at different
  barriers: :class:`BarrierDivergence` (a GPU hangs or computes garbage there);
- reads and writes outside a buffer or a shared array: :class:`OutOfBounds`, naming the argument,
  the element and the CUDA thread (AddressSanitizer, where the compiler has it); a ``uint4`` or
  ``float4`` access that is not 16-byte aligned: :class:`Misaligned`;
- bf16 conversions round as the GPU's do (to nearest, ties to even), so a bf16 result is bit for
  bit what the GPU would write for the same sums.

What it cannot run: PTX written in ``asm`` (``mma.sync``, ``wgmma``, TMA, mbarriers), which only a
GPU executes (:class:`NeedsGPU`). It is slow (microseconds per thread switch): small sizes only.

>>> mod = cuda_on_cpu.load("02_2_naive_grouped")
>>> mod.launch("naive_grouped_gemm", grid=(2, 5), block=(16, 16), args=(x, w, y, offs, tile_map, M, N, K))

Arguments are CPU torch tensors (or NumPy arrays), Python ints and floats, and None for a null
pointer; tensors the kernel writes are updated in place.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .. import KERNELS_DIR
from ..kernels import CompileError, Source, _as_source

INCLUDE_DIR = Path(__file__).resolve().parent / "include"
ORDERS = ("ascending", "descending")
DEFAULT_TIMEOUT_S = 120.0


class KernelFault(RuntimeError):
    """A launch on the CPU went wrong in a way a GPU would not say as clearly."""


class NeedsGPU(KernelFault):
    """The kernel uses instructions (PTX in ``asm``) that only an NVIDIA GPU runs."""


class RaceDetected(KernelFault):
    """Results differ between thread orders: threads touch the same data with no barrier between."""


class BarrierDivergence(KernelFault):
    """Threads of a block do not all reach the same ``__syncthreads()`` (or warp function)."""


class OutOfBounds(KernelFault):
    """A read or write outside a buffer or a shared array."""


class Misaligned(KernelFault):
    """A vector access (``uint4``, ``float4``...) at an address that is not a multiple of its size."""


class KernelTimeout(KernelFault):
    """The launch did not finish in time (an endless loop?)."""


class KernelCrashed(KernelFault):
    """The launch ended some other way (a crash, ``__trap()``, ``assert``)."""


class NoCompiler(RuntimeError):
    """No C++ compiler on this machine."""


# ----------------------------------------------------------------------------- the compiler


@functools.lru_cache(maxsize=None)
def compiler() -> str | None:
    """The host C++ compiler: ``$CXX``, else ``c++``, ``g++`` or ``clang++`` on the PATH."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and (path := shutil.which(name)):
            return path
    return None


def require_compiler() -> str:
    cxx = compiler()
    if cxx is None:
        raise NoCompiler(
            "running CUDA C on the CPU needs a C++ compiler (g++ or clang++) and none is on the PATH: "
            "install one (Debian/Ubuntu: `sudo apt install g++`; macOS: `xcode-select --install`), "
            "or set CXX to its path")
    return cxx


@functools.lru_cache(maxsize=None)
def compiler_version() -> str:
    out = subprocess.run([require_compiler(), "--version"], capture_output=True, text=True)
    return (out.stdout or out.stderr).splitlines()[0].strip()


@functools.lru_cache(maxsize=None)
def has_sanitizers() -> bool:
    """Whether this compiler builds with AddressSanitizer and the alignment check (gcc and clang
    do on Linux and macOS); without them out-of-bounds accesses go unreported."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "probe.cpp")
        src.write_text("int main() { return 0; }\n")
        done = subprocess.run([require_compiler(), *SANITIZE, str(src), "-o", str(Path(tmp, "probe"))],
                              capture_output=True)
        return done.returncode == 0 and subprocess.run([str(Path(tmp, "probe"))], capture_output=True,
                                                       env=_run_env()).returncode == 0


SANITIZE = ("-fsanitize=address,alignment", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer")
FLAGS = ("-std=c++20", "-O1", "-g", "-w", "-fno-strict-aliasing", "-pthread")


def cache_dir() -> Path:
    base = os.environ.get("MOE_COURSE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moe_course")
    path = Path(base, "cuda_on_cpu")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run_env() -> dict:
    env = dict(os.environ)
    env["ASAN_OPTIONS"] = "detect_leaks=0:halt_on_error=1:print_summary=0:allocator_may_return_null=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1:abort_on_error=1"  # abort: the harness names the thread
    return env


# ----------------------------------------------------------------------------- the source


@dataclass(frozen=True)
class Param:
    type: str  # as written, e.g. "const bf16* __restrict__"
    name: str

    @property
    def pointer(self) -> bool:
        return "*" in self.type

    @property
    def pointee(self) -> str:
        """``const __nv_bfloat16* __restrict__`` -> ``__nv_bfloat16``."""
        words = [w for w in self.type.replace("*", " ").split()
                 if w not in ("const", "volatile", "__restrict__", "__restrict", "restrict", "__grid_constant__")]
        return " ".join(words)


_EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s*)?(?P<type>[\w:]+(?:\s+[\w:]+)*?)\s+"
    r"(?:__align__\s*\(\s*\d+\s*\)\s*)?(?P<name>\w+)\s*\[\s*\]\s*;")
_STATIC_SHARED = re.compile(r"^(?P<decl>[ \t]*__shared__[^;{}=\n]*?\b(?P<name>\w+)\s*(?:\[[^\]\n;]*\]\s*)*;)",
                            re.MULTILINE)
_KERNEL = re.compile(r'extern\s+"C"\s+__CUDA_ON_CPU_GLOBAL__\s+void\s+(?P<name>\w+)\s*\((?P<params>[^)]*)\)\s*\{')


def for_the_cpu(code: str) -> str:
    """The two rewrites the CPU needs in a kernel's own source (line numbers kept): dynamic shared
    memory (``extern __shared__ T s[];``) becomes a pointer to the launch's block of it, and each
    static ``__shared__`` declaration fills its memory with garbage once per block."""
    code = _EXTERN_SHARED.sub(
        lambda m: f"{m['type']}* const {m['name']} = static_cast<{m['type']}*>(::cuda_on_cpu::dynamic_shared());",
        code)
    return _STATIC_SHARED.sub(
        lambda m: f"{m['decl']} ::cuda_on_cpu::poison_shared(&{m['name']}, sizeof({m['name']}));", code)


def _params(text: str) -> list[Param]:
    out = []
    for raw in filter(None, (p.strip() for p in text.split(","))):
        m = re.match(r"(?P<type>.*?)(?P<name>\w+)\s*$", raw, re.S)
        out.append(Param(" ".join(m["type"].split()), m["name"]))
    return out


def _explain_compile_error(source: Source, log: str) -> KernelFault | CompileError:
    """g++/clang++ messages as the course shows NVRTC's: each error with its source lines; PTX
    the host cannot assemble means the kernel needs a GPU."""
    ptx = re.findall(r"no such instruction: `([\w.]+)", log)  # the assembler met PTX
    in_asm = False  # or the compiler failed on an asm statement (its constraints are GPU registers)
    for m in re.finditer(r"^(?P<file>[^:\n]+):(?P<line>\d+):(?:\d+:)? error:", log, re.M):
        name = Path(m["file"]).name
        text = source.code if name == source.name else (
            (KERNELS_DIR / name).read_text() if (KERNELS_DIR / name).is_file() else "")
        near = "\n".join(text.splitlines()[max(0, int(m["line"]) - 1):int(m["line"]) + 2])
        if re.search(r"\basm\b", near):
            in_asm = True
            ptx += re.findall(r'"\s*([a-z][a-z0-9_]*\.[\w.]+)', near)[:1]
    if ptx or in_asm:
        where = sorted(set(re.findall(r"In function [‘'](?:[\w:<>]+\s+)*?(\w+)\(", log)) - {"main"})
        what = ", ".join(dict.fromkeys(ptx)) or "inline PTX (asm)"
        return NeedsGPU(f"{source.name} uses {what}{' (in ' + ', '.join(where) + ')' if where else ''}: PTX "
                        f"that only an NVIDIA GPU runs, so it cannot run on the CPU (kernels.compile_report() "
                        f"still compiles it for sm_90a without a GPU)")
    lines = source.code.splitlines()
    out = [f"{source.name} could not be compiled for the CPU:"]
    shown = 0
    for m in re.finditer(r"^(?P<file>[^:\n]+):(?P<line>\d+):(?:\d+:)? (?:fatal )?error: (?P<msg>.*)$", log, re.M):
        shown += 1
        n = int(m["line"])
        out.append(f"\n  {m['file']} line {n}: {m['msg']}")
        if m["file"] == source.name and 0 < n <= len(lines):
            for i in range(max(1, n - 2), min(len(lines), n + 2) + 1):
                out.append(f"  {'>' if i == n else ' '} {i:4d} | {lines[i - 1]}")
        if shown == 5:
            break
    if not shown:
        out.append(log.strip()[-2000:])
    err = CompileError("\n".join(out))
    err.log = log
    return err


def _compile(args: list[str], source: Source) -> None:
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise _explain_compile_error(source, done.stderr + done.stdout)


def _course_headers() -> Path:
    """The course's headers (kernels/*.cuh) with the same rewrites as a kernel's own source, in
    a folder searched before kernels/ (made once per version of the headers)."""
    headers = sorted(KERNELS_DIR.glob("*.cuh"))
    key = hashlib.sha256("\0".join(p.name + p.read_text() for p in headers).encode()).hexdigest()[:20]
    folder = cache_dir() / f"headers-{key}"
    if not folder.exists():
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            for p in headers:
                Path(tmp, p.name).write_text(f'#line 1 "{p.name}"\n{for_the_cpu(p.read_text())}')
            try:
                os.rename(tmp, folder)
            except OSError:  # made meanwhile by another process
                pass
            Path(tmp).mkdir(exist_ok=True)  # for TemporaryDirectory's clean-up
    return folder


def _harness_object(cxx: str, flags: list[str]) -> Path:
    """include/harness.cpp (the scheduler and main), compiled once per compiler and flags."""
    text = "".join(p.read_text() for p in sorted(INCLUDE_DIR.iterdir()) if p.suffix in (".h", ".cpp"))
    key = hashlib.sha256("\0".join([text, " ".join(flags), compiler_version()]).encode()).hexdigest()[:20]
    obj = cache_dir() / f"harness-{key}.o"
    if not obj.exists():
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            _compile([cxx, *flags, "-c", str(INCLUDE_DIR / "harness.cpp"), "-o", str(Path(tmp, "harness.o"))],
                     Source("harness.cpp", (INCLUDE_DIR / "harness.cpp").read_text()))
            os.replace(Path(tmp, "harness.o"), obj)
    return obj


def load(src, defines: dict | None = None, *, sanitize: bool = True, threads: bool = False) -> Module:
    """Compile a kernel source (a name in ``kernels/``, a path, or CUDA C text from a cell) for the
    CPU; cached on disk by its text, so a second load is instant. ``threads=True`` uses host
    threads instead of fibers (what macOS uses; here for testing that path)."""
    source = _as_source(src)
    cxx = require_compiler()
    sanitize = sanitize and has_sanitizers()
    defs = [f"-D{k}" if v is None else f"-D{k}={v}" for k, v in sorted((defines or {}).items())]
    defs += ["-DCUDA_ON_CPU_THREADS"] if threads else []
    includes = ["-I", str(INCLUDE_DIR), "-I", str(_course_headers()), "-I", str(KERNELS_DIR),
                "-include", "cuda_on_cpu.h"]
    body = f'#line 1 "{source.name}"\n{for_the_cpu(source.code)}\n'
    with tempfile.TemporaryDirectory() as tmp:
        scan = Path(tmp, "scan.cpp")
        scan.write_text(body)
        pre = subprocess.run([cxx, "-E", "-std=c++20", *includes, *defs, "-DCUDA_ON_CPU_SCAN",
                              str(scan)], capture_output=True, text=True)
        if pre.returncode != 0:
            raise _explain_compile_error(source, pre.stderr)
    kernels = {m["name"]: _params(m["params"]) for m in _KERNEL.finditer(pre.stdout)}
    if not kernels:
        raise CompileError(f'{source.name} defines no extern "C" __global__ function to launch')
    table = ",\n".join(f'    ::cuda_on_cpu::entry("{k}", &{k})' for k in kernels)
    unit = (f"{body}\n#line 1 \"the kernel table of moe_course.cuda_on_cpu\"\n"
            f"const ::cuda_on_cpu::KernelEntry* cuda_on_cpu_kernel_table(int* count) {{\n"
            f"    static const ::cuda_on_cpu::KernelEntry table[] = {{\n{table}\n    }};\n"
            f"    *count = {len(kernels)};\n    return table;\n}}\n")
    flags = [*FLAGS, *(SANITIZE if sanitize else ()), *includes, *defs]
    harness = _harness_object(cxx, [*FLAGS, *(SANITIZE if sanitize else ()), *includes,
                                    *(["-DCUDA_ON_CPU_THREADS"] if threads else [])])
    key = hashlib.sha256("\0".join([unit, pre.stdout, str(harness), " ".join(flags), compiler_version()]).encode())
    exe = cache_dir() / f"{Path(source.name).stem}-{key.hexdigest()[:20]}"
    if not exe.exists():
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            unit_path = Path(tmp, "unit.cpp")
            unit_path.write_text(unit)
            _compile([cxx, *flags, str(unit_path), str(harness), "-o", str(Path(tmp, "kernel"))], source)
            os.replace(Path(tmp, "kernel"), exe)
    return Module(source, exe, kernels, sanitize)


# ----------------------------------------------------------------------------- launching

# Pointee types whose element the tensor's dtype must match (others: any bytes).
_ELEMENT = {
    "__nv_bfloat16": ("bfloat16",), "bf16": ("bfloat16",), "nv_bfloat16": ("bfloat16",),
    "float": ("float32",), "double": ("float64",),
    "int": ("int32",), "int32_t": ("int32",), "unsigned": ("int32", "uint32"), "unsigned int": ("int32", "uint32"),
    "u32": ("int32", "uint32"), "uint32_t": ("int32", "uint32"),
    "long long": ("int64",), "int64_t": ("int64",), "unsigned long long": ("int64", "uint64"),
    "u64": ("int64", "uint64"), "uint64_t": ("int64", "uint64"), "short": ("int16",),
}


@dataclass
class LaunchResult:
    printed: str  # what the kernel printf'd (first order's run)
    seconds: float


class Module:
    """A kernel source compiled for the CPU: :meth:`launch` runs one of its kernels."""

    def __init__(self, source: Source, exe: Path, kernels: dict[str, list[Param]], sanitized: bool):
        self.source, self.exe, self.kernels, self.sanitized = source, exe, kernels, sanitized

    def __repr__(self) -> str:
        return f"<cuda_on_cpu.Module {self.source.name}: {', '.join(self.kernels)}>"

    def launch(self, kernel: str, grid, block, args, shared_mem: int = 0, *, orders=ORDERS,
               timeout: float = DEFAULT_TIMEOUT_S, echo: bool = True) -> LaunchResult:
        """Run ``kernel<<<grid, block, shared_mem>>>(*args)`` once per thread order; tensors the
        kernel writes are updated in place (with the first order's results, once every order
        gave the same). Raises a :class:`KernelFault` subclass that says what went wrong."""
        import numpy as np
        import torch

        if kernel not in self.kernels:
            raise KeyError(f"{self.source.name} has no kernel {kernel!r} (it has: {', '.join(self.kernels)})")
        params = self.kernels[kernel]
        grid, block = _dim3("grid", grid), _dim3("block", block)
        if block[0] * block[1] * block[2] > 1024:
            raise ValueError(f"block {block} has {block[0] * block[1] * block[2]} threads; a block holds at most 1024")
        if len(args) != len(params):
            raise TypeError(f"{kernel} takes {len(params)} arguments ({', '.join(p.name for p in params)}), "
                            f"got {len(args)}")
        header = [f"kernel {kernel}", "grid {} {} {}".format(*grid), "block {} {} {}".format(*block),
                  f"shared {int(shared_mem)}", "orders " + " ".join(orders)]
        buffers: list[tuple[Param, torch.Tensor]] = []
        for p, a in zip(params, args):
            if isinstance(a, np.ndarray):
                a = torch.from_numpy(a)
            if a is None:
                header.append("arg null")
            elif isinstance(a, torch.Tensor):
                _check_buffer(kernel, p, a)
                buffers.append((p, a))
                header.append(f"arg buffer {a.numel() * a.element_size()}")
            elif isinstance(a, (bool, int, np.integer)):
                header.append(f"arg int {int(a)}")
            elif isinstance(a, (float, np.floating)):
                header.append(f"arg float {float(a)!r}")
            elif isinstance(a, (bytes, bytearray)):  # a struct passed by value
                t = torch.frombuffer(bytearray(a), dtype=torch.uint8)
                buffers.append((p, t))
                header.append(f"arg buffer {len(a)}")
            else:
                raise TypeError(f"argument {p.name} of {kernel}: a tensor, an int, a float or None, "
                                f"not {type(a).__name__}")
        with tempfile.TemporaryDirectory() as tmp:
            inp, out, status = Path(tmp, "in"), Path(tmp, "out"), Path(tmp, "status")
            with open(inp, "wb") as f:
                f.write(("\n".join(header) + "\ndata\n").encode())
                for _, t in buffers:
                    f.write(_bytes_of(t))
            start = time.perf_counter()
            try:
                done = subprocess.run([str(self.exe), str(inp), str(out), str(status)], capture_output=True,
                                      timeout=timeout, env=_run_env())
            except subprocess.TimeoutExpired:
                raise KernelTimeout(
                    f"{kernel} did not finish in {timeout:g} s on the CPU (grid {grid}, block {block}): "
                    "an endless loop, or a launch too big for the CPU (it runs one thread at a time)") from None
            seconds = time.perf_counter() - start
            printed = done.stdout.decode(errors="replace")
            if echo and printed:
                sys.stdout.write(printed)
            state = status.read_text() if status.exists() else ""
            if done.returncode != 0 or not state.startswith("ok"):
                layout = Path(str(status) + ".layout")
                raise self._fault(kernel, params, args, state, done.stderr.decode(errors="replace"),
                                  layout.read_text() if layout.exists() else "")
            results = out.read_bytes()
        self._compare_orders(kernel, buffers, results, orders)
        pos = 0
        for _, t in buffers:  # the first order's results, now known to be the only ones
            n = t.numel() * t.element_size()
            _write_bytes(t, results[pos:pos + n])
            pos += n
        return LaunchResult(printed, seconds)

    # ------------------------------------------------------------------------- reports

    def _compare_orders(self, kernel, buffers, results: bytes, orders) -> None:
        import torch

        size = sum(t.numel() * t.element_size() for _, t in buffers)
        runs = [results[i * size:(i + 1) * size] for i in range(len(orders))]
        pos = 0
        for p, t in buffers:
            n = t.numel() * t.element_size()
            first = runs[0][pos:pos + n]
            for o, run in enumerate(runs[1:], start=1):
                other = run[pos:pos + n]
                if other == first:
                    continue
                a = _tensor_from(first, t)
                b = _tensor_from(other, t)
                differ = ~((a == b) | (a.isnan() & b.isnan())) if a.is_floating_point() else a != b
                if not bool(differ.any()):  # only NaN payloads differ
                    continue
                idx = tuple(int(i) for i in torch.nonzero(differ)[0])
                raise RaceDetected(
                    f"{kernel}: results differ between thread orders: {p.name}{list(idx)} is "
                    f"{a[idx].item():.6g} when threads and blocks run in {orders[0]} order but "
                    f"{b[idx].item():.6g} in {orders[o]} order ({int(differ.sum())} of {differ.numel()} values "
                    f"of {p.name} differ). Threads read or write the same data with no barrier between them "
                    f"(a missing __syncthreads()?), or two threads or blocks write the same element.")
            pos += n

    def _fault(self, kernel, params, args, state: str, stderr: str, layout: str) -> KernelFault:
        kind, _, message = state.partition("\n")
        message = message.strip()
        if kind == "divergence":
            return BarrierDivergence(f"{kernel}: barrier divergence: {message}")
        if kind in ("warp", "trap"):
            return (BarrierDivergence if kind == "warp" else KernelCrashed)(f"{kernel}: {message}")
        if kind == "arguments":
            return TypeError(message)
        where = f" ({message})" if message else ""
        report = "\n".join(line for line in stderr.splitlines() if "swapcontext" not in line)
        if kind == "sanitizer" or "Sanitizer" in report or "runtime error" in report:
            return _sanitizer_fault(kernel, params, args, report, layout, where, self.source)
        if kind.startswith("crash"):
            sig = kind.split()[-1]
            hint = (" (an access far outside a buffer?)" if sig in ("SIGSEGV", "SIGBUS") else
                    " (an integer division by zero?)" if sig == "SIGFPE" else
                    " (an assert or abort?)" if sig == "SIGABRT" else "")
            return KernelCrashed(f"{kernel} crashed on the CPU with {sig}{where}{hint}\n{report[-1500:]}".rstrip())
        return KernelCrashed(f"{kernel} failed on the CPU{where}:\n{(report or state)[-2000:]}")


def _source_line(report: str, source: Source) -> str:
    """" at cell.cu line 17: `acc += ...`": the innermost frame of the sanitizer's stack that is in
    the kernel's own source (else the innermost frame)."""
    frames = re.findall(r"#\d+ 0x[0-9a-f]+ in \S+ ([^:\s]+):(\d+)", report)
    frames += re.findall(r"^([^:\s]+):(\d+):\d+: runtime error", report, re.M)
    if not frames:
        return ""
    file, line = next(((f, n) for f, n in frames if Path(f).name == source.name), frames[0])
    text = ""
    if Path(file).name == source.name and 0 < int(line) <= len(lines := source.code.splitlines()):
        text = f": `{lines[int(line) - 1].strip()}`"
    return f" at {Path(file).name} line {line}{text}"


def _sanitizer_fault(kernel, params, args, report: str, layout: str, where: str, source: Source) -> KernelFault:
    """AddressSanitizer's or UBSan's report, said in the kernel's terms: which argument, which
    element, which line, which CUDA thread."""
    buffers = []  # (start address, bytes, parameter, tensor)
    for line in layout.splitlines():
        _, index, addr, nbytes = line.split()
        buffers.append((int(addr), int(nbytes), params[int(index)], args[int(index)]))
    at_line = _source_line(report, source)
    if m := re.search(r"runtime error: (?P<what>[\w ]+?) (?:of|to|within) misaligned address (?P<addr>0x[0-9a-f]+) "
                      r"for type '(?:const )?(?:struct )?(?P<type>[^']+)', which requires (?P<align>\d+) byte alignment",
                      report):
        spot = _locate(int(m["addr"], 16), buffers)
        what = "a store" if "store" in m["what"] else "a load"
        return Misaligned(f"{kernel}: {what} of {m['type']} {spot}{at_line}{where} is not "
                          f"{m['align']}-byte aligned; on a GPU this is a fault (misaligned address). Vector "
                          f"accesses need an address that is a multiple of their size.")
    if m := re.search(r"AddressSanitizer: (?P<kind>[\w-]+) on address (?P<addr>0x[0-9a-f]+).*?\n"
                      r"(?P<rw>READ|WRITE) of size (?P<size>\d+)", report, re.S):
        rw = "reads" if m["rw"] == "READ" else "writes"
        addr, size = int(m["addr"], 16), int(m["size"])
        if var := re.search(r"global variable '(?P<name>\w+)' defined in '[^']*' \(0x[0-9a-f]+\) of size (?P<n>\d+)",
                            report):
            spot = f"outside the shared array {var['name']} ({var['n']} bytes)"
        elif var := re.search(r"'(?P<name>\w+)'[^\n]*<== Memory access at offset \d+ (?:overflows|underflows) this "
                              r"variable", report):
            spot = f"outside the local array {var['name']}"
        else:
            spot = _locate(addr, buffers)
        return OutOfBounds(f"{kernel} {rw} {size} bytes {spot}{at_line}{where}. On a GPU this reads garbage or "
                           f"faults (illegal memory access); check the bounds of every index.")
    return KernelCrashed(f"{kernel} failed on the CPU{where}:\n{report[-2000:]}")


def _locate(addr: int, buffers) -> str:
    """``addr`` as an element of the nearest argument: "at X[3, 17]" or "12 elements past the end of X"."""
    best = min(buffers, key=lambda b: 0 if b[0] <= addr < b[0] + b[1] else min(abs(addr - b[0]), abs(addr - b[0] - b[1])),
               default=None)
    if best is None:
        return f"at address {addr:#x}"
    start, nbytes, p, t = best
    elem = t.element_size() if hasattr(t, "element_size") else 1
    shape = list(getattr(t, "shape", [nbytes]))
    offset = addr - start
    if 0 <= offset < nbytes:
        flat = offset // elem
        idx, rem = [], flat
        for d in reversed(shape):
            idx.append(rem % d)
            rem //= d
        byte = f" (byte {offset % elem} of the element)" if offset % elem else ""
        return f"at {p.name}{idx[::-1]}{byte} (element {flat} of {t.numel()})"
    if offset >= nbytes:
        past = (offset - nbytes) // elem
        how_far = "just past" if past == 0 else f"{past + 1} elements past"
        return (f"{how_far} the end of {p.name} (element {offset // elem}; {p.name} holds {t.numel()} elements, "
                f"shape {shape})")
    return f"{-(offset // elem)} elements before the start of {p.name} (shape {shape})"


def _dim3(name: str, v) -> tuple[int, int, int]:
    v = (v,) if isinstance(v, int) else tuple(int(x) for x in v)
    if not 1 <= len(v) <= 3 or any(x < 1 for x in v):
        raise ValueError(f"{name} must be 1 to 3 positive sizes, got {v}")
    return v + (1,) * (3 - len(v))


def _check_buffer(kernel: str, p: Param, t) -> None:
    if not p.pointer:
        raise TypeError(f"argument {p.name} of {kernel} is `{p.type}`, a value: pass a number, not a tensor")
    if t.device.type != "cpu":
        raise ValueError(f"argument {p.name} of {kernel} is on {t.device}: kernels on the CPU take CPU tensors "
                         "(on a GPU, use moe_course.kernels.load instead)")
    if not t.is_contiguous():
        raise ValueError(f"argument {p.name} of {kernel} must be contiguous (call .contiguous())")
    expected = _ELEMENT.get(p.pointee)
    got = str(t.dtype).replace("torch.", "")
    if expected and got not in expected:
        raise TypeError(f"argument {p.name} of {kernel} is `{p.type}` ({' or '.join(expected)} elements); "
                        f"got a tensor of {got}")


def _bytes_of(t) -> bytes:
    import torch

    return t.detach().reshape(-1).view(torch.uint8).numpy().tobytes()


def _tensor_from(data: bytes, like):
    import torch

    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return raw.view(like.dtype).reshape(like.shape)


def _write_bytes(t, data: bytes) -> None:
    import torch

    with torch.no_grad():
        t.reshape(-1).view(torch.uint8).copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8) if data
                                              else torch.empty(0, dtype=torch.uint8))


__all__ = ["load", "Module", "LaunchResult", "compiler", "has_sanitizers", "KernelFault", "NeedsGPU",
           "RaceDetected", "BarrierDivergence", "OutOfBounds", "Misaligned", "KernelTimeout", "KernelCrashed",
           "NoCompiler", "ORDERS"]
