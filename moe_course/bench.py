"""Timing that can be trusted: device events, warm-up, the median of many runs, and inputs
rotated so that the L2 cache cannot serve them.

>>> m = benchmark(lambda a, b: a @ b, rotate(lambda: (randn(n, n), randn(n, n)), set_bytes=...),
...               flops=2 * n**3, bytes=3 * 2 * n * n, name="matmul")
>>> m.tflops, m.tbps, m.fraction(ceilings)

On a GPU the time comes from CUDA events recorded on the default stream (which CuPy kernels
and torch share); on a CPU from ``time.perf_counter``. Either way the answer is a
:class:`Measurement` with the FLOPs and bytes counted, so rates and fractions of the machine's
ceilings follow from it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from .machine import info

L2_MULTIPLE = 3  # rotate through at least this many L2s of inputs
MAX_SETS = 64


@dataclass
class Measurement:
    name: str
    ms: float  # median time of one call
    ms_p10: float
    ms_p90: float
    reps: int
    device: str  # "cuda" or "cpu"
    flops: float = 0.0
    bytes: float = 0.0
    params: dict = field(default_factory=dict)  # shapes and settings, for the record

    @property
    def tflops(self) -> float:
        return self.flops / (self.ms * 1e-3) / 1e12

    @property
    def tbps(self) -> float:
        return self.bytes / (self.ms * 1e-3) / 1e12

    @property
    def intensity(self) -> float:
        """FLOPs per byte of device memory traffic (the roofline's x axis)."""
        return self.flops / self.bytes if self.bytes else float("inf")

    def fraction(self, ceilings) -> dict[str, float]:
        """This result as a fraction of the machine's measured ceilings."""
        return {"of_matmul": self.tflops / ceilings.matmul_tflops if self.flops else 0.0,
                "of_copy": self.tbps / ceilings.copy_tbps if self.bytes else 0.0}

    def timing(self) -> dict:
        """The fields a benchmark row records: median and spread in ms, repetitions, TFLOP/s."""
        return {"ms": self.ms, "ms_p10": self.ms_p10, "ms_p90": self.ms_p90, "reps": self.reps, "tflops": self.tflops}

    def as_dict(self) -> dict:
        return {**asdict(self), "tflops": self.tflops, "tbps": self.tbps}

    def __str__(self) -> str:
        rate = []
        if self.flops:
            rate.append(f"{self.tflops:7.1f} TFLOP/s")
        if self.bytes:
            rate.append(f"{self.tbps:6.2f} TB/s")
        return (f"{self.name:<28} {self.ms:9.4f} ms (p10 {self.ms_p10:.4f}, p90 {self.ms_p90:.4f}, "
                f"n={self.reps})  " + "  ".join(rate))


def rotate(make_inputs: Callable[[], tuple], set_bytes: float, l2_bytes: int | None = None,
           max_sets: int = MAX_SETS) -> list[tuple]:
    """Enough independent input sets that cycling through them overflows the L2 cache.

    ``make_inputs()`` must return fresh random tensors each call; ``set_bytes`` is the bytes
    one call reads. Without a GPU the L2 is taken as 0 and one set is made.
    """
    l2 = info().l2_bytes if l2_bytes is None else l2_bytes
    count = 1 if not l2 else min(max_sets, max(1, -(-L2_MULTIPLE * l2 // max(int(set_bytes), 1))))
    return [make_inputs() for _ in range(count)]


def _percentile(xs: Sequence[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def benchmark(fn: Callable, input_sets: Sequence[tuple] = ((),), *, name: str = "",
              flops: float = 0.0, bytes: float = 0.0, warmup: int = 5, reps: int = 50,
              device: str | None = None, params: dict | None = None) -> Measurement:
    """Median time of ``fn(*inputs)`` over ``reps`` calls, cycling through ``input_sets``."""
    device = device or ("cuda" if info().has_gpu else "cpu")
    if not input_sets:
        raise ValueError("benchmark needs at least one input set (use ((),) for a function of no arguments)")
    sets = list(input_sets)
    times = _time_cuda(fn, sets, warmup, reps) if device == "cuda" else _time_cpu(fn, sets, warmup, reps)
    return Measurement(name or getattr(fn, "__name__", "fn"), statistics.median(times),
                       _percentile(times, 0.1), _percentile(times, 0.9), reps, device,
                       float(flops), float(bytes), dict(params or {}))


def _time_cpu(fn, sets, warmup, reps) -> list[float]:
    for i in range(warmup):
        fn(*sets[i % len(sets)])
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        fn(*sets[i % len(sets)])
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _time_cuda(fn, sets, warmup, reps) -> list[float]:
    import cupy

    for i in range(warmup):
        fn(*sets[i % len(sets)])
    cupy.cuda.Device().synchronize()
    starts = [cupy.cuda.Event() for _ in range(reps)]
    ends = [cupy.cuda.Event() for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        fn(*sets[(warmup + i) % len(sets)])
        ends[i].record()
    ends[-1].synchronize()
    return [cupy.cuda.get_elapsed_time(s, e) for s, e in zip(starts, ends)]


def interleaved(fns: dict[str, Callable], *, rounds: int = 7, reps: int = 10, warmup: int = 5,
                flops: float | dict = 0.0, bytes: float | dict = 0.0,
                before: Callable[[str], None] | None = None) -> dict[str, Measurement]:
    """Time several implementations of one problem fairly: in ``rounds`` rounds, each runs
    ``reps`` times in turn, and the median is over all their calls. A GPU's clock drifts with
    its temperature and power draw over a run of seconds; timing A to the end and then B would
    charge that drift to one of them (it moved results by 5-8% on the H200), interleaving spreads
    it over all. ``flops`` and ``bytes``: one value, or one per name. ``before(name)``, untimed,
    before each turn: e.g. switching one model to that contender's experts backend."""
    per = lambda v, name: v.get(name, 0.0) if isinstance(v, dict) else v
    device = "cuda" if info().has_gpu else "cpu"
    timer = _time_cuda if device == "cuda" else _time_cpu
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            if before is not None:
                before(name)
            times[name] += timer(fn, [()], warmup if r == 0 else 1, reps)
    return {name: Measurement(name, statistics.median(t), _percentile(t, 0.1), _percentile(t, 0.9), len(t), device,
                              float(per(flops, name)), float(per(bytes, name)))
            for name, t in times.items()}
