"""Graders of the exercises in which the learner writes a grouped GEMM kernel in CUDA C (exercise
03: the one-launch naive kernel; exercise 06: shared-memory tiles).

The learner's kernel has the signature of ``kernels/02_2_naive_grouped.cu``::

    extern "C" __global__ void NAME(const bf16* X, const bf16* W, bf16* Y, const int* offs,
                                    const TileInfo* tile_map, int M, int N, int K)

launched on a grid of (ceil(N / 16), tiles) blocks of 16 x 16 threads after ``build_tile_map``
with 16 rows per tile. Everywhere it is compiled for sm_90a (its resources shown) and run on
the CPU (:mod:`moe_course.cuda_on_cpu`: every thread, in two orders, bounds checked, so a
missing barrier or one that not every thread reaches is caught) at awkward sizes on fresh
random inputs, output poisoned with NaN; a wrong value is explained (which row, which weight
it came from). On a GPU it also runs there, in a separate process so that a fault cannot take
the notebook's GPU context with it, including two launches whose indices pass 2**31
(rows * K, experts * N * K), where 32-bit index arithmetic goes wrong, and its speed is
measured against a step of chapter 02's ladder where the exercise asks for it.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import secrets
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import cuda_on_cpu, kernels, launch, machine
from .. import grouped_gemm as gg
from ..checking import CheckFailed, check_true, grading

#: GPU only: (counts, K, N) whose indices pass 2**31 in 32-bit arithmetic; the last expert's rows are checked
BIG_INDEX_CASES = {
    "rows * K > 2**31 (X indexed in int)": ([2**31 // 4096, 20], 4096, 16),
    "experts * N * K > 2**31 (W indexed in int)": ([0] * 128 + [20], 4096, 4096),
}
BIG_INDEX_FREE_BYTES = 12 << 30  # what the two cases need, with room
SPEED_SHAPE = ([512] * 16, 1024, 1024)  # counts, K, N: 2 * 8192 * 1024 * 1024 FLOP


@dataclass(frozen=True)
class KernelExercise:
    """One exercise: the kernel's name, where it is graded (``module``: this exercise's grader
    module, which the GPU check's child process imports), its cases, and what to time it against."""

    title: str
    kernel: str
    module: str
    cases: tuple = ([0, 1, 17, 0, 40], [0, 0, 100, 0], [16, 32, 3], [5])  # empty experts, off the tile, one expert
    shapes: tuple = ((16, 16), (48, 40), (40, 130), (64, 33))  # (K, N): K and N off the multiples of 16 too
    compare_with: str | None = None  # a step of chapter 02 to time the kernel against, on a GPU

    @property
    def step(self) -> launch.Step:
        return launch.Step("exercise", self.kernel, self.title, block_m=16)

    def grade(self, source: str, seed: int | None = None) -> None:
        grade(self, source, seed)


def source_in_notebook(path: Path, variable: str = "MY_KERNEL") -> str:
    """The learner's kernel as their exercise notebook holds it: the string a code cell assigns
    to ``variable`` (read, never run: ``make sanitize EX=03`` checks it outside the notebook)."""
    import ast

    import nbformat

    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type != "code" or variable not in cell.source:
            continue
        for node in ast.walk(ast.parse(cell.source)):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == variable for t in node.targets):
                return ast.literal_eval(node.value)
    raise CheckFailed(f"{path.name} has no cell that sets {variable} = r\"\"\"...\"\"\" (the kernel's source)")


def grade(ex: KernelExercise, source: str, seed: int | None = None) -> None:
    """Check the learner's kernel: compiled for sm_90a, then run on the CPU and on a GPU where
    there is one. Raises CheckFailed with a targeted message; prints PASS only after a run."""
    seed = secrets.randbelow(2**31) if seed is None else int(seed)
    with grading(ex.title):
        if "YOUR CODE HERE" in source:
            raise NotImplementedError(f"write the body of {ex.kernel} where it says YOUR CODE HERE")
        refuse_course_kernels(ex, source)
        show_resources(ex, source)
        ran = []
        if cuda_on_cpu.compiler():
            check_on_cpu(ex, source, seed)
            ran.append("on the CPU (every thread, two orders, bounds checked)")
        else:
            print("not run on the CPU: no C++ compiler here (g++ or clang++ runs CUDA C on the CPU)")
        if machine.has_gpu():
            check_on_gpu(ex, source, seed)
            ran.append(f"on the GPU ({machine.info().gpu}), 32-bit index overflow included")
        if not ran:
            raise CheckFailed("nothing here can run your kernel, so it is not checked: install a C++ compiler "
                              f"(g++ or clang++) or use a machine with an NVIDIA GPU ({machine.skip_reason()})")
        print(f"checked {len(ex.cases) * len(ex.shapes)} cases (seed {seed}) " + " and ".join(ran))


def refuse_course_kernels(ex: KernelExercise, source: str) -> None:
    """The exercise is to write the kernel, not to include the course's."""
    for m in re.finditer(r'#\s*include\s*[<"]([^>"]+)[>"]', source):
        name = Path(m[1]).name
        if name.endswith(".cu") or (name.endswith(".cuh") and name != "grouped_gemm.cuh"):
            raise CheckFailed(f'your source #includes "{m[1]}", a kernel of the course: write {ex.kernel} '
                              f'yourself (only "grouped_gemm.cuh", for TileInfo and tile_rows, is meant to be included)')


def show_resources(ex: KernelExercise, source: str) -> None:
    """Compile for sm_90a with NVRTC (no GPU needed) and show registers and memory; a compile
    error quotes the lines. Where NVRTC is not installed (macOS) the CPU build checks the name."""
    try:
        report = kernels.compile_report(source)
    except kernels.CompileError as err:
        raise CheckFailed(str(err)) from None
    except RuntimeError as err:  # no NVRTC here: the CPU compile below still reports errors
        print(f"not compiled for sm_90a: {err}")
        return
    if not report.resources:  # ptxas said nothing (seen once with NVRTC 13.0): the runs below check the name
        print(f"compiled for sm_90a ({len(report.cubin)} byte cubin); ptxas reported no resources")
        return
    check_kernel_name(ex, report.resources)
    print(report.table())


def check_kernel_name(ex: KernelExercise, found) -> None:
    """``found``: the kernels a build of the learner's source has."""
    check_true("kernel name", ex.kernel in found,
               f"no __global__ function named {ex.kernel} (found: {', '.join(found) or 'none'}); "
               'declare it extern "C" with that name')


def case_name(counts, K: int, N: int, seed: int) -> str:
    return f"rows per expert {list(counts)}, K={K}, N={N} (seed {seed})"


def check_on_cpu(ex: KernelExercise, source: str, seed: int) -> None:
    try:
        module = cuda_on_cpu.load(source)
    except (kernels.CompileError, cuda_on_cpu.NeedsGPU) as err:
        raise CheckFailed(str(err)) from None
    check_kernel_name(ex, module.kernels)
    for i, counts in enumerate(ex.cases):
        for K, N in ex.shapes:
            p = gg.make_problem(counts, K, N, device="cpu", seed=seed + i)
            y = torch.full((p.x.shape[0], N), float("nan"), dtype=torch.bfloat16)
            where = case_name(counts, K, N, seed)
            try:
                launch.run_step_on_cpu(ex.step, p.x, p.w, p.offs, out=y, module=module)
            except cuda_on_cpu.KernelFault as err:
                raise CheckFailed(f"{where}, run on the CPU:\n{err}") from None
            check_result(y, p, where)


def check_result(y, p, where: str) -> None:
    """Y against a float32 reference; a wrong Y is explained as precisely as it can be."""
    ref = gg.reference(p.x, p.w, p.offs)
    yf = y.float()
    bad = ~((yf - ref).abs() <= 2e-2 + 2e-2 * ref.abs())
    if bool(bad.any()):
        raise CheckFailed(f"Y for {where}: {int(bad.sum())} of {bad.numel()} values are wrong\n"
                          + diagnose(yf.cpu(), p.x.cpu(), p.w.cpu(), p.counts.tolist(), bad.cpu()))


def diagnose(y, x, w, counts: list[int], bad) -> str:
    """Say which mistake produces this Y: unwritten rows or columns, a wrong row of X, a wrong
    expert's weight, or a weight read in the wrong layout."""
    E = w.shape[0]
    expert_of = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))
    starts = [sum(counts[:e]) for e in range(E)]
    nan = y.isnan()
    if bool(nan.all()):
        return "  Y was never written (it still holds the NaN it was filled with): is the body empty, or does every thread return?"
    found = []
    if bool(nan.any()):
        found.append(_unwritten(nan, counts, expert_of, starts))
    if bool((bad & ~nan).any()):
        found.append(_wrong_value(y, x, w, counts, expert_of, starts, bad & ~nan))
    return "\n".join(found)


def _unwritten(nan, counts, expert_of, starts) -> str:
    M, N = nan.shape
    rows = sorted(set(torch.nonzero(nan)[:, 0].tolist()))
    cols = sorted(set(torch.nonzero(nan)[:, 1].tolist()))
    partial_rows = {r for r in range(M) if counts[expert_of[r]] - (r - starts[expert_of[r]]) // 16 * 16 < 16}
    if set(rows) <= partial_rows:
        return (f"  rows {_ranges(rows)} were never written: they are in partial tiles (an expert's last tile, "
                f"fewer than 16 rows). A tile covers rows [row, row_end): keep the threads whose row < row_end.")
    if min(cols) >= N // 16 * 16:
        return (f"  columns {_ranges(cols)} were never written: the last column block is partial (N={N} is not a "
                f"multiple of 16); keep the threads whose column < N.")
    r, c = torch.nonzero(nan)[0].tolist()
    return f"  {int(nan.sum())} values were never written (NaN), the first Y[{r}, {c}] (rows {_ranges(rows)})."


def _wrong_value(y, x, w, counts, expert_of, starts, bad) -> str:
    M, N = y.shape
    E, _, K = w.shape
    r, c = torch.nonzero(bad)[0].tolist()
    e = int(expert_of[r])
    xd, wd, row = x.double(), w.double(), y[r].double()
    written = ~row.isnan()

    def whole_row_is(candidate) -> bool:  # every written value of row r: a chance match is out of the question
        return bool(((row - candidate).abs() <= 1e-2 + 2e-2 * candidate.abs())[written].all())

    head = f"  Y[{r}, {c}] is {float(y[r, c]):.5g}, expected {float(xd[r] @ wd[e, c]):.5g} (row {r} belongs to expert {e}):"
    before = [e2 for e2 in range(e) if counts[e2] > 0]
    if before:  # the tile before this row's expert runs past its expert's last row (no row bound)
        e2 = before[-1]
        tile_end = starts[e2] + -(-counts[e2] // 16) * 16
        if r < tile_end and whole_row_is(wd[e2] @ xd[r]):
            return (f"{head} row {r} of Y is X row {r} times expert {e2}'s weight, and it lies in expert {e2}'s "
                    f"last tile (rows {starts[e2]}-{tile_end - 1}; its rows end at {starts[e2] + counts[e2] - 1}): "
                    f"the threads of that tile past its last row wrote it. A tile covers rows [row, row_end): "
                    f"keep the threads whose row < row_end.")
    for e2 in range(E):
        if e2 != e and whole_row_is(wd[e2] @ xd[r]):
            return (f"{head} row {r} of Y is X row {r} times expert {e2}'s weight: the weight offset is wrong "
                    f"(expert e's weight starts at W + e * N * K).")
    for r2 in range(M):
        if r2 != r and whole_row_is(wd[e] @ xd[r2]):
            return (f"{head} row {r} of Y is X row {r2} times expert {e}'s weight: the row is wrong. Thread y of a "
                    f"tile computes row tile_map[tile].row + threadIdx.y (tile_rows gives it).")
    as_kn = wd.reshape(-1)[e * N * K:(e + 1) * N * K].reshape(K, N)  # W read as [E, K, N]
    if whole_row_is(xd[r] @ as_kn):
        return (f"{head} row {r} of Y is X row {r} times expert {e}'s weight read as [K, N]: W is [E, N, K], so "
                f"output n of expert e reads W[(e * N + n) * K + k].")
    return f"{head} accumulate the sum over k of X[row, k] * W[expert, col, k] in float."


def _ranges(values: list[int]) -> str:
    out, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ", ".join(out[:6]) + (" ..." if len(out) > 6 else "")


# ----------------------------------------------------------------------------- on the GPU


def check_on_gpu(ex: KernelExercise, source: str, seed: int) -> None:
    """Run the GPU checks in a child process: a kernel that faults there (an illegal address)
    ends that process, not the notebook's CUDA context."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "my_kernel.cu")
        path.write_text(source)
        done = subprocess.run([sys.executable, "-m", __name__, ex.module, str(path), str(seed)],
                              capture_output=True, text=True, timeout=900)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-6:]
        fault = " ".join(tail)
        if re.search(r"illegal memory access|illegal address|ILLEGAL_ADDRESS", fault):
            raise CheckFailed("on the GPU your kernel read or wrote outside its buffers (CUDA: illegal memory "
                              "access). Where the CPU run passed, this is an index past 2**31: compute "
                              "row * K and (expert * N + col) * K in 64 bits ((size_t)row * K).")
        raise CheckFailed("the GPU check ended without a result:\n" + "\n".join(tail))
    result = json.loads(lines[-1])
    if not result["ok"]:
        raise CheckFailed(result["message"])
    for note in result.get("notes", []):
        print(note)


def _gpu_checks(ex: KernelExercise, source: str, seed: int, awkward_only: bool = False) -> dict:
    """In the child process: the awkward cases, then (unless ``awkward_only``: under
    compute-sanitizer, ``make sanitize EX=03``, where they would take hours) the 32-bit index
    cases and the speed."""
    notes = []
    try:
        module = kernels.load(source)
        for i, counts in enumerate(ex.cases):
            for K, N in ex.shapes:
                p = gg.make_problem(counts, K, N, device="cuda", seed=seed + i)
                y = torch.full((p.x.shape[0], N), float("nan"), device="cuda", dtype=torch.bfloat16)
                launch.run_step(ex.step, p.x, p.w, p.offs, out=y, module=module)
                check_result(y, p, case_name(counts, K, N, seed) + ", on the GPU")
        free, _ = torch.cuda.mem_get_info()
        if awkward_only:
            return {"ok": True, "notes": [f"{len(ex.cases) * len(ex.shapes)} awkward cases checked"]}
        if free < BIG_INDEX_FREE_BYTES:
            notes.append(f"the 32-bit index checks need {BIG_INDEX_FREE_BYTES >> 30} GiB of free GPU memory, "
                         f"{free / 2**30:.1f} GiB is free: not run")
        else:
            for what, (counts, K, N) in BIG_INDEX_CASES.items():
                check_big_index(ex, module, what, counts, K, N, seed)
        if ex.compare_with:
            notes.append(speed_against(ex, module, ex.compare_with))
    except CheckFailed as err:
        return {"ok": False, "message": str(err)}
    return {"ok": True, "notes": notes}


def check_big_index(ex: KernelExercise, module, what: str, counts, K: int, N: int, seed: int, rows_checked: int = 20) -> None:
    """Only the last ``rows_checked`` rows (the last expert's) are compared: that is where the
    indices pass 2**31."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    M, E = sum(counts), len(counts)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16, generator=g) / math.sqrt(K)
    offs = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    y = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
    launch.run_step(ex.step, x, w, offs, out=y, module=module)
    torch.cuda.synchronize()
    got, expected = y[-rows_checked:].float(), x[-rows_checked:].float() @ w[-1].float().T
    bad = ~((got - expected).abs() <= 2e-2 + 2e-2 * expected.abs())
    if bool(bad.any()):
        raise CheckFailed(f"on the GPU, {what}: {int(bad.sum())} of {bad.numel()} values of the last expert's rows "
                          f"are wrong (M={M}, E={E}, N={N}, K={K}). Indices past 2**31 overflow in int: compute "
                          f"them in 64 bits, as (size_t)row * K and ((size_t)expert * N + col) * K.")


def speed_against(ex: KernelExercise, module, step_name: str) -> str:
    """The learner's kernel and a step of the ladder, timed in turns on one problem."""
    counts, K, N = SPEED_SHAPE
    p = gg.make_problem(counts, K, N, device="cuda", seed=0)
    fns = {"yours": lambda x, w, offs: launch.run_step(ex.step, x, w, offs, module=module, validate=False),
           step_name: lambda x, w, offs: launch.run_step(launch.STEPS[step_name], x, w, offs, validate=False)}
    speed = {name: t["tflops"] for name, t in gg.time_interleaved(fns, p.x, p.w, p.offs, flops=p.flops,
                                                                   rounds=3, reps=5).items()}
    return (f"speed on {len(counts)} experts x {counts[0]} rows, K={K}, N={N}: your kernel {speed['yours']:.2f} "
            f"TFLOP/s, {step_name} {speed[step_name]:.2f} TFLOP/s: {speed['yours'] / speed[step_name]:.1f}x")


if __name__ == "__main__":  # the child process of check_on_gpu: MODULE FILE SEED [--awkward-only]
    exercise = importlib.import_module(sys.argv[1]).EXERCISE
    print(json.dumps(_gpu_checks(exercise, Path(sys.argv[2]).read_text(), int(sys.argv[3]),
                                 awkward_only="--awkward-only" in sys.argv[4:])))
