"""GPU profiles for cost and throughput estimates: rates from datasheets, or measured here.

Each profile holds a GPU's dense bf16 tensor-core rate and memory bandwidth as its datasheet
states them, its memory, and a price per GPU-hour. Datasheets quote tensor-core rates "with
sparsity" (2:4 structured sparsity doubles them); the dense rate, half of that, is the one a
bf16 training step can use, so that is the one stored here.

The prices are ASSUMPTIONS (round figures for renting one GPU by the hour in 2025-26; providers
and contracts differ by a factor of two or three): every tool that uses them says so, and lets
you pass your own (``--price-per-gpu-hour``).

Datasheet rates are not reached by real code. Where this course has measured a GPU (``make
bench`` records ``benchmarks/results/ceilings__<gpu>.json``), :func:`recorded_ceilings` returns
the measured ceilings for that profile, and :meth:`Hardware.rates` can use them instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import RESULTS_DIR, ceilings, records

PRICE_NOTE = ("assumed: a round figure for renting one GPU by the hour in 2025-26; prices differ "
              "two- to three-fold between providers and contracts (override it)")


@dataclass(frozen=True)
class Hardware:
    name: str  # the lookup key: by_name(name)
    title: str
    bf16_tflops: float  # dense (no sparsity) bf16 tensor-core rate, datasheet
    hbm_tbps: float  # device memory bandwidth, datasheet, TB/s (10^12 bytes/s)
    memory_gb: float  # device memory, GB (10^9 bytes) as the datasheet states it
    price_per_gpu_hour: float  # US dollars; see price_note
    source: str
    price_note: str = PRICE_NOTE
    # How to recognise this GPU in a device name (torch / CuPy / nvidia-smi), e.g. "NVIDIA H200":
    # every word of ``match`` in the name, none of ``exclude``.
    match: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @property
    def ridge_intensity(self) -> float:
        """FLOPs per byte above which a kernel can be compute-bound on this GPU (datasheet)."""
        return self.bf16_tflops / self.hbm_tbps

    def matches(self, gpu_name: str) -> bool:
        words = gpu_name.upper().replace("-", " ").split()
        return (all(any(w.startswith(m) for w in words) for m in self.match)
                and not any(any(w.startswith(x) for w in words) for x in self.exclude))

    def rates(self, source: str = "datasheet", results_dir: Path | None = None) -> "Rates":
        """The matmul rate and bandwidth to plan with: ``"datasheet"`` or ``"measured"`` (the
        recorded ceilings of a GPU of this kind; an error names what to run if there are none)."""
        if source == "datasheet":
            return Rates(self.bf16_tflops, self.hbm_tbps, f"{self.title} datasheet")
        if source == "measured":
            roof = recorded_ceilings(self, results_dir)
            if roof is None:
                folder = Path(results_dir or RESULTS_DIR)
                raise LookupError(f"no measured ceilings for {self.title} in {folder} (run "
                                  f"`make bench` on one to record them, or use the datasheet rates)")
            return Rates(roof.matmul_tflops, roof.copy_tbps, f"measured: {roof.record.label()}")
        raise ValueError(f"rates source must be 'datasheet' or 'measured', got {source!r}")

    def __str__(self) -> str:
        return (f"{self.title}: {self.bf16_tflops:.0f} TFLOP/s dense bf16, {self.hbm_tbps:g} TB/s, "
                f"{self.memory_gb:g} GB, ${self.price_per_gpu_hour:.2f}/GPU-hour "
                f"({'assumed' if self.price_note == PRICE_NOTE else self.price_note.split(' (')[0]})")


@dataclass(frozen=True)
class Rates:
    matmul_tflops: float
    copy_tbps: float
    label: str  # where the numbers come from


# Dense bf16 = half the datasheet's "with sparsity" figure, as the datasheets' footnotes say.
A100 = Hardware(
    name="a100", title="NVIDIA A100 SXM4 80GB",
    bf16_tflops=312, hbm_tbps=2.039, memory_gb=80, price_per_gpu_hour=1.50,
    # NVIDIA A100 Tensor Core GPU datasheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity);
    # A100 80GB SXM: 80 GB HBM2e, 2,039 GB/s.
    source="https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf",
    match=("A100",),
)

H100 = Hardware(
    name="h100", title="NVIDIA H100 SXM5 80GB",
    bf16_tflops=989, hbm_tbps=3.35, memory_gb=80, price_per_gpu_hour=2.50,
    # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM: BF16 Tensor Core 1,979 TFLOPS with
    # sparsity (989 dense); 80 GB HBM3, 3.35 TB/s.
    source="https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet",
    match=("H100",), exclude=("PCIE", "NVL"),
)

H100_PCIE = Hardware(
    name="h100-pcie", title="NVIDIA H100 PCIe 80GB",
    bf16_tflops=756, hbm_tbps=2.0, memory_gb=80, price_per_gpu_hour=2.00,
    # Same datasheet, H100 PCIe: BF16 1,513 TFLOPS with sparsity (756 dense); 80 GB, 2 TB/s.
    source="https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet",
    match=("H100", "PCIE"),
)

H800 = Hardware(
    name="h800", title="NVIDIA H800 SXM5 80GB",
    bf16_tflops=989, hbm_tbps=3.35, memory_gb=80, price_per_gpu_hour=2.00,
    # The export variant of the H100 SXM (same tensor cores and HBM3, narrower NVLink); DeepSeek
    # trained V3 on it. Its price is the one the DeepSeek-V3 report assumes: "the rental price
    # of the H800 GPU is $2 per GPU hour" (arXiv 2412.19437, Table 1).
    source="NVIDIA H800 datasheet; price: https://arxiv.org/abs/2412.19437",
    price_note="the DeepSeek-V3 report's own figure ($2 per H800 GPU-hour, arXiv 2412.19437); override it",
    match=("H800",), exclude=("PCIE",),
)

H200 = Hardware(
    name="h200", title="NVIDIA H200 SXM 141GB",
    bf16_tflops=989, hbm_tbps=4.8, memory_gb=141, price_per_gpu_hour=3.50,
    # NVIDIA H200 Tensor Core GPU datasheet, H200 SXM: BF16 Tensor Core 1,979 TFLOPS with
    # sparsity (989 dense); 141 GB HBM3e, 4.8 TB/s.
    source="https://www.nvidia.com/en-us/data-center/h200/",
    match=("H200",), exclude=("NVL",),
)

B200 = Hardware(
    name="b200", title="NVIDIA B200 (HGX, 1000 W)",
    bf16_tflops=2250, hbm_tbps=7.7, memory_gb=180, price_per_gpu_hour=5.00,
    # NVIDIA HGX B200 specifications (8 GPUs): FP16/BF16 Tensor Core 36 PFLOPS with sparsity,
    # i.e. 4.5 per GPU, 2.25 PFLOPS dense; 1,440 GB HBM3e at 62 TB/s in all, i.e. 180 GB and
    # 7.7 TB/s per GPU (single-GPU marketing figures say 192 GB and 8 TB/s).
    source="https://www.nvidia.com/en-us/data-center/hgx/",
    match=("B200",),
)

#: Every profile, in the order tables list them.
ALL: tuple[Hardware, ...] = (A100, H100, H100_PCIE, H800, H200, B200)
_BY_NAME = {h.name: h for h in ALL}


def names() -> list[str]:
    return [h.name for h in ALL]


def by_name(name: str) -> Hardware:
    """The profile called ``name`` (case and ``_``/``-`` do not matter)."""
    if not isinstance(name, str):
        raise TypeError(f"a hardware name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("_", "-")
    if key not in _BY_NAME:
        raise ValueError(f"unknown hardware {name!r}; known: {', '.join(names())}")
    return _BY_NAME[key]


def for_gpu_name(gpu_name: str | None) -> Hardware | None:
    """The profile of a GPU as it names itself (``"NVIDIA H200"``, ``"NVIDIA H100 80GB HBM3"``),
    or ``None`` if it is none of these."""
    if not gpu_name:
        return None
    found = [h for h in ALL if h.matches(gpu_name)]
    return found[0] if len(found) == 1 else None


def _recorded_gpus(kind: str, folder: Path) -> list[str]:
    """The GPU names of the records of ``kind`` in ``folder``."""
    gpus = []
    for rec in records.load_all(kind, folder):
        gpu = rec.environment.get("gpu")
        if gpu and gpu not in gpus:
            gpus.append(gpu)
    return gpus


def recorded_ceilings(hw: Hardware, results_dir: Path | None = None) -> ceilings.Ceilings | None:
    """The newest measured ceilings (``moe_course.ceilings.recorded``) of a GPU of this kind,
    or ``None`` if none was recorded."""
    folder = Path(results_dir or RESULTS_DIR)
    found = [ceilings.recorded(gpu=g, results_dir=folder)
             for g in _recorded_gpus(ceilings.KIND, folder) if for_gpu_name(g) is hw]
    found = [c for c in found if c is not None]
    return max(found, key=lambda c: c.record.environment.get("date", ""), default=None)
