"""This machine's two ceilings, against which every chart in the course is drawn.

- ``matmul_tflops``: dense bf16 matrix product through cuBLAS (``torch.matmul``), random inputs.
- ``copy_tbps``: device-to-device copy, counting bytes read plus bytes written.

Datasheet numbers (about 990 TFLOP/s and 4.8 TB/s for an H200) are not reached by real code;
the measured ones are what a kernel can be asked to approach.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import records
from .bench import benchmark, rotate
from .machine import info

KIND = "ceilings"


@dataclass(frozen=True)
class Ceilings:
    matmul_tflops: float
    copy_tbps: float
    record: records.Record | None = None  # where the numbers come from
    live: bool = False  # measured in this process

    @property
    def ridge_intensity(self) -> float:
        """FLOPs per byte at which a kernel stops being memory-bound."""
        return self.matmul_tflops / self.copy_tbps

    def label(self) -> str:
        where = self.record.label() if self.record else "?"
        return ("measured here: " if self.live else "recorded on ") + where

    def __str__(self) -> str:
        return (f"dense bf16 matmul {self.matmul_tflops:.0f} TFLOP/s, device copy {self.copy_tbps:.2f} TB/s"
                f" (ridge at {self.ridge_intensity:.0f} FLOP/byte; {self.label()})")


def measure(n: int = 8192, copy_gib: float = 2.0, reps: int = 30, save: bool = True) -> Ceilings:
    """Measure both ceilings on this GPU (a few seconds) and, by default, record them."""
    if not info().has_gpu:
        raise RuntimeError(f"measuring ceilings needs a GPU ({info().why_no_gpu})")
    dev = "cuda"
    mm = benchmark(torch.matmul,
                   rotate(lambda: (torch.randn(n, n, device=dev, dtype=torch.bfloat16),
                                   torch.randn(n, n, device=dev, dtype=torch.bfloat16)), 2 * 2 * n * n),
                   flops=2 * n**3, bytes=3 * 2 * n * n, reps=reps, name=f"bf16 matmul {n}^3")
    elems = int(copy_gib * 2**30) // 2
    src = torch.randn(elems, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    cp = benchmark(lambda: dst.copy_(src), bytes=2 * src.nbytes, reps=reps, name=f"copy {copy_gib} GiB")
    data = {"matmul_tflops": mm.tflops, "copy_tbps": cp.tbps,
            "measurements": [mm.as_dict(), cp.as_dict()]}
    rec = records.save(KIND, data) if save else records.Record(KIND, records.environment(), data)
    return Ceilings(mm.tflops, cp.tbps, rec, live=True)


def recorded(gpu: str | None = None, results_dir=None) -> Ceilings | None:
    rec = records.load(KIND, gpu=gpu, results_dir=results_dir)
    return None if rec is None else Ceilings(rec.data["matmul_tflops"], rec.data["copy_tbps"], rec)


def for_this_machine() -> Ceilings:
    """On a GPU: its recorded ceilings, measured now if there are none. Without one: the most
    recent record from a real GPU, labelled as such."""
    if info().has_gpu:
        mine = recorded(gpu=info().gpu)
        return mine if mine is not None else measure()
    rec = recorded()
    if rec is None:
        raise RuntimeError("no GPU here and no recorded ceilings in benchmarks/results/")
    return rec
