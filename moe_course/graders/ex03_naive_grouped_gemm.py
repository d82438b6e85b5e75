"""Grader for exercise 03: the one-launch naive grouped GEMM, written in CUDA C in a cell.

The learner's kernel has the signature of ``kernels/02_2_naive_grouped.cu``::

    extern "C" __global__ void my_grouped_gemm(const bf16* X, const bf16* W, bf16* Y,
                                               const int* offs, const TileInfo* tile_map,
                                               int M, int N, int K)

launched on a grid of (ceil(N / 16), tiles) blocks of 16 x 16 threads after ``build_tile_map``
with 16 rows per tile. Without a GPU the grader compiles it for sm_90a and says that running
it needs a GPU; with one it runs it at awkward sizes on fresh random inputs, output poisoned.
"""

from __future__ import annotations

import secrets

import torch

from .. import grouped_gemm as gg
from .. import kernels, machine
from ..checking import CheckFailed, check_close, check_true, grading

KERNEL = "my_grouped_gemm"
STEP = gg.Step("exercise", KERNEL, "exercise 03", block_m=16)
#: rows per expert: empty experts, counts that are not multiples of 16, one expert with all rows
CASES = ([0, 1, 17, 0, 40], [0, 0, 100, 0], [16, 32, 3], [5])
SHAPES = ((16, 16), (48, 40), (64, 130))  # (K, N): N not a multiple of 16 too


def grade(source: str, seed: int | None = None) -> None:
    title = "Exercise 03 · one-launch grouped GEMM"
    seed = secrets.randbelow(2**31) if seed is None else seed
    with grading(title):
        if "YOUR CODE HERE" in source:
            raise NotImplementedError("write the body of my_grouped_gemm where it says YOUR CODE HERE")
        try:
            report = kernels.compile_report(source)
        except kernels.CompileError as err:
            raise CheckFailed(str(err)) from None
        check_true("kernel name", KERNEL in report.resources,
                   f"no __global__ function named {KERNEL} (found: {', '.join(report.resources) or 'none'}); "
                   'declare it extern "C" with that name')
        print(report.table())
        if not machine.has_gpu():
            print(f"compiled for sm_90a; {machine.skip_reason()} (running and checking it needs a GPU)")
            return
        module = kernels.load(source)
        for i, counts in enumerate(CASES):
            for K, N in SHAPES:
                p = gg.make_problem(counts, K, N, seed=seed + i)
                y = torch.full((p.x.shape[0], N), float("nan"), device="cuda", dtype=torch.bfloat16)
                gg.run_step(STEP, p.x, p.w, p.offs, out=y, module=module)
                check_close(f"Y for rows per expert {counts}, K={K}, N={N} (seed {seed})", y.float(),
                            gg.reference(p.x, p.w, p.offs), rtol=2e-2, atol=2e-2)
