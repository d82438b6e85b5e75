"""Helpers shared by every notebook of "Tile-Aware MoE Accelerators".

One obvious place for each thing:

- ``machine``    what this machine has (GPU, CUDA driver and runtime, CuPy, NVRTC)
- ``kernels``    CUDA sources in ``kernels/``: compiled and loaded through CuPy on a GPU
                 (launched on torch's current stream: ``on_torch_stream``), or compiled for
                 ``sm_90a`` without one to read their resource use
- ``cuda_on_cpu``  CUDA C kernels run on the CPU (no GPU needed): one thread at a time, in two
                 thread orders, so races, barrier divergence and out-of-bounds indices are
                 reported; the exercise graders and ``printf`` debugging use it
- ``bench``      timing (CUDA events, warm-up, median, inputs rotated past the L2)
- ``ceilings``   this machine's two ceilings: dense bf16 matmul rate and device copy bandwidth
- ``records``    benchmark results saved as JSON under ``benchmarks/results/``, each file checked
                 as it is read (``record_layouts``: what each kind holds, as the course reads it)
- ``plotting``   charts of live or recorded results, always labelled with where they came from
- ``checking``   friendly checks for exercises and tests
- ``moe``        the reference MoE maths: routers, dispatch, SwiGLU experts, combine,
                 load-balancing losses, capacity and dropping, the ``MoELayer`` module
- ``token_rounding``    tile-aware token rounding (chapter 04): the routing in torch and on the
                 GPU, and the grouped GEMM's time on top-K against rounded routing
- ``rounding_quality``  chapter 04's quality experiment: a small MoE trained with and without rounding
- ``graders``    the exercise graders (one module per exercise notebook; the CUDA C ones share
                 ``graders.kernel_exercise``)
- ``launch``     every kernel of ``kernels/`` and how it is launched: each file's ``Step`` (tile,
                 threads, shared memory), its launcher, the tile map and the persistent grid,
                 the input checks; the CUDA-core steps on the CPU too
- ``grouped_gemm``  chapter 02: the grouped GEMM's baselines and problems, and the
                 check-then-time runner behind ``benchmarks/bench_grouped_gemm.py``
- ``diagrams``   chapter 02's pictures of its kernels (tile map, thread and fragment layouts,
                 shared-memory banks, the swizzle, the persistent schedule), each from the
                 kernel's own index formula
- ``configs``    the MoE model configurations (shapes, parameter counts, each value cited)
- ``hardware``   GPU profiles (datasheet rates, prices) for ``benchmarks/throughput.py``
- ``variants``   every implementation of the MoE layer in one registry, checked then timed
                 by ``benchmarks/bench_moe_variants.py``
- ``tma``        TMA tensor maps for chapter 03's and 06's kernels (through cuda.bindings)
- ``io_overlap`` chapter 03's maths (the layer's own inputs: gathered rows, interleaved gate and
                 up) and its pipeline measurements
- ``moe_measurements``  chapter 01's measurements of the torch layer: its time, each step's
                 share, its activation memory
- ``layer``      the MoE layer on the course's kernels: inference ``forward``, and the
                 trainable ``MoEFunction`` / ``CourseMoE`` (chapter 06, top-K or token rounding),
                 with the same maths in torch and on ``torch._grouped_mm``
- ``fp8``        chapter 07's FP8 maths in torch: e4m3 / e5m2, quantisation per tensor, per row,
                 in DeepSeek-V3's ``1x128`` groups and ``128x128`` blocks (and back), the FP8 GEMM's
                 reference (grouped over experts too), a model of Hopper's limited FP8
                 accumulation with promotion to float32 every 128 of K, the MoE layer with FP8 experts
- ``decode``     chapter 09's decode regime (1 to 512 tokens a step): the experts a step wakes,
                 the bytes and FLOPs it must move and the time bound from the ceilings; the
                 fixed-capacity "masked" layout and the whole layer on it in torch with no host
                 synchronisation (CUDA-graph capturable), checked against ``moe``; telling whether
                 code waits for the device (named host reads, the meta device)
- ``layer_measurements``  chapter 06's measurements: the layer against the torch layers and
                 SonicMoE, forward + backward time and memory, each kernel against
                 ``torch._grouped_mm``, a kernel-by-kernel profile, eager against a CUDA graph,
                 and a short training run
- ``hf``         the course's layer as a Hugging Face ``transformers`` experts backend
                 (chapter 10): ``hf.register()``, then ``experts_implementation="moe_course"``;
                 what it refuses; kernels or torch, decided per call and said once
- ``hf_models``  chapter 10's models: Qwen3-MoE, Mixtral, OLMoE and DeepSeek-V3 from their
                 transformers configurations, compared across experts backends (logits,
                 gradients, training, generation, time)
"""

from pathlib import Path
import os

#: The course's top folder (holds ``kernels/``, ``notebooks/``, ``benchmarks/``).
ROOT = Path(os.environ.get("MOE_COURSE_ROOT", Path(__file__).resolve().parent.parent))
KERNELS_DIR = ROOT / "kernels"
RESULTS_DIR = ROOT / "benchmarks" / "results"
#: Where quick and scratch benchmark runs record (ignored by git): ``RESULTS_DIR`` keeps only the
#: committed measurements that charts and notebooks show.
SCRATCH_DIR = ROOT / "benchmarks" / "scratch"

__all__ = ["ROOT", "KERNELS_DIR", "RESULTS_DIR", "SCRATCH_DIR"]
