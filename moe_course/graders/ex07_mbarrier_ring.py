"""Grader for exercise 07: the bookkeeping of chapter 03's mbarrier ring, in CUDA C.

The learner writes the four functions that ``kernels/03_1_tma.cu`` defines for itself::

    __device__ __forceinline__ int ring_slot(int kt);            // the slot of slice kt
    __device__ __forceinline__ int ring_full_parity(int kt);     // consumers wait full[slot] for this parity
    __device__ __forceinline__ bool ring_producer_waits(int kt); // must the producer wait before loading kt?
    __device__ __forceinline__ int ring_empty_parity(int kt);    // ... on empty[slot], for this parity

with ``STAGES`` the number of slots. On any machine the functions are run on the CPU
(:mod:`moe_course.cuda_on_cpu`) for 1 to 4 slots, and the ring they describe is explored by
:mod:`moe_course.ring_model`: every interleaving of two warps and the copy engine, with the
mbarrier's parity rule; a wrong parity reads a stale slot or deadlocks, and the grader says
which, at which step. On a GPU, 03_1 is also compiled with the learner's functions and run
(in a child process, so that a deadlocked kernel is stopped) at 1 to 4 slots.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .. import KERNELS_DIR, cuda_on_cpu, kernels, launch, machine, ring_model
from .. import grouped_gemm as gg
from ..checking import CheckFailed, grading

TITLE = "Exercise 07 · the mbarrier ring"
FUNCTIONS = ("ring_slot", "ring_full_parity", "ring_producer_waits", "ring_empty_parity")
STAGES = (1, 2, 3, 4)
MAX_SLICES = 9


def slices_for(stages: int) -> tuple[int, ...]:
    """One slice, exactly one use of each slot, a ring that wraps twice, and the most."""
    return tuple(sorted({1, stages, 2 * stages + 1, MAX_SLICES}))


TABLE = r"""
static int ring_stages;  // STAGES, set per launch: one build serves every ring size
#define STAGES ring_stages
#line 1 "cell.cu"
%s
#line 1 "the table of exercise 07"
extern "C" __global__ void ring_table(int stages, int n, int* slot, int* full_parity, int* waits, int* empty_parity) {
    ring_stages = stages;
    for (int kt = 0; kt < n; ++kt) {
        slot[kt] = ring_slot(kt);
        full_parity[kt] = ring_full_parity(kt);
        waits[kt] = ring_producer_waits(kt) ? 1 : 0;
        empty_parity[kt] = ring_empty_parity(kt);
    }
}
"""


def grade(source: str, seed: int | None = None) -> None:
    """``seed`` picks the GPU check's random inputs (the CPU check explores every schedule)."""
    seed = secrets.randbelow(2**31) if seed is None else int(seed)
    with grading(TITLE):
        if "YOUR CODE HERE" in source:
            raise NotImplementedError("write the four ring functions where it says YOUR CODE HERE")
        missing = [f for f in FUNCTIONS if f not in source]
        if missing:
            raise CheckFailed(f"define {', '.join(missing)} (the spec lists the four functions)")
        ran = []
        if cuda_on_cpu.compiler():
            rings = tabulate(source)
            explored = check_rings(rings)
            ran.append(f"on the CPU: {explored} ring sizes and lengths, every interleaving of two warps and the "
                       f"copy engine")
        else:
            print("not run on the CPU: no C++ compiler here (g++ or clang++ runs CUDA C on the CPU)")
        if machine.has_gpu() and (machine.info().compute_capability or (0, 0)) >= (9, 0):
            check_on_gpu(source, seed)
            ran.append(f"inside 03_1 on the GPU ({machine.info().gpu}), 1 to 4 slots")
        if not ran:
            raise CheckFailed("nothing here can run your functions, so they are not checked: install a C++ compiler "
                              "(g++ or clang++) or use a machine with a Hopper GPU")
        print("checked " + " and ".join(ran))


def tabulate(source: str) -> dict[int, ring_model.Ring]:
    """Run the learner's functions on the CPU for every ring size: kt -> slot, parities, waits."""
    try:
        module = cuda_on_cpu.load(TABLE % source)
    except (kernels.CompileError, cuda_on_cpu.NeedsGPU) as err:
        raise CheckFailed(str(err)) from None
    rings = {}
    for stages in STAGES:
        out = [torch.zeros(MAX_SLICES, dtype=torch.int32) for _ in range(4)]
        try:
            module.launch("ring_table", 1, 1, (stages, MAX_SLICES, *out))
        except cuda_on_cpu.KernelFault as err:
            raise CheckFailed(f"with STAGES = {stages}, your functions fail on the CPU: {err}") from None
        slot, full, waits, empty = ([int(v) for v in t] for t in out)
        for name, values in (("ring_full_parity", full), ("ring_empty_parity", empty)):
            for kt, v in enumerate(values):
                if v not in (0, 1) and (name == "ring_full_parity" or waits[kt]):
                    raise CheckFailed(f"with STAGES = {stages}, {name}({kt}) returned {v}: a parity is 0 or 1")
        rings[stages] = ring_model.Ring(stages, tuple(slot), tuple(full), tuple(bool(w) for w in waits), tuple(empty))
    return rings


def check_rings(rings: dict[int, ring_model.Ring]) -> int:
    explored = 0
    for stages, ring in rings.items():
        for n in slices_for(stages):
            cut = ring_model.Ring(stages, ring.slot[:n], ring.full_parity[:n], ring.producer_waits[:n],
                                  ring.empty_parity[:n])
            verdict = ring_model.explore(cut, n, warps=2)
            explored += 1
            if not verdict.ok:
                raise CheckFailed(f"with STAGES = {stages} and {n} slice{'s' if n > 1 else ''} of K: {verdict}")
    return explored


# ----------------------------------------------------------------------------- on the GPU


def check_on_gpu(source: str, seed: int, timeout_s: float = 120.0) -> None:
    """03_1 compiled with the learner's ring, run in a child process: a deadlock there is a kernel
    that never finishes, stopped by the timeout, not a notebook that hangs."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "ring.cuh")
        path.write_text(source)
        try:
            done = subprocess.run([sys.executable, "-m", __name__, str(path), str(seed)], capture_output=True,
                                  text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"inside 03_1 on the GPU, the kernel did not finish in {timeout_s:g} s: your ring "
                              "deadlocks there (a wait for a phase that never completes)") from None
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise CheckFailed("the GPU check ended without a result:\n" + "\n".join(done.stderr.strip().splitlines()[-6:]))
    result = json.loads(lines[-1])
    if not result["ok"]:
        raise CheckFailed(result["message"])


def with_ring(source: str) -> str:
    """03_1's source with the learner's four functions in place of its own."""
    return "#define RING_FROM_EXERCISE\n" + source + "\n" + (KERNELS_DIR / "03_1_tma.cu").read_text()


def _gpu_checks(source: str, seed: int) -> dict:
    counts, N = [0, 130, 1, 77], 256
    for stages in STAGES:
        step = launch.pipeline_step(stages)
        module = kernels.load(with_ring(source), defines={"STAGES": stages})
        for n in slices_for(stages):
            p = gg.make_problem(counts, 64 * n, N, device="cuda", seed=seed + n)
            y = torch.full((p.x.shape[0], N), float("nan"), device="cuda", dtype=torch.bfloat16)
            launch.run_step(step, p.x, p.w, p.offs, out=y, module=module)
            ref = gg.reference(p.x, p.w, p.offs)
            err = float(((y.float() - ref).abs() / (1e-2 + ref.abs())).nan_to_num(float("inf")).max())
            if err > 5e-2:
                return {"ok": False, "message": f"inside 03_1 on the GPU with STAGES = {stages} and {n} slices of K: "
                                                f"wrong results (largest relative error {err:.3g}): a slot was read "
                                                f"before its slice had landed, or after it was overwritten"}
    return {"ok": True}


if __name__ == "__main__":  # the child process of check_on_gpu: FILE SEED
    print(json.dumps(_gpu_checks(Path(sys.argv[1]).read_text(), int(sys.argv[2]))))
