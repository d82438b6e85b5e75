"""Next GPU session (branch hf-kernels): each HF-layout kernel against the course kernel it varies,
on the interleaved / transposed copy, timed interleaved at real shapes. Prediction: 10_1 = 03_4,
10_3 = 06_1, 10_4 = 06_3 within noise (only the tensor map differs); 10_2 vs 06_2 may differ
(W read MN-major: 64 x 64 boxes instead of one 256-row box)."""
import math

import torch

from moe_course import io_overlap as io
from moe_course import launch
from moe_course.bench import interleaved

SHAPES = {"Qwen3-30B-A3B": (16384, 2048, 768, 128, 8), "Mixtral-8x7B": (8192, 4096, 14336, 8, 2),
          "OLMoE": (16384, 2048, 1024, 64, 8)}
for name, (T, H, I, E, K) in SHAPES.items():
    g = torch.Generator(device="cuda").manual_seed(0)
    R = T * K
    ids = torch.randint(0, E, (R,), device="cuda", generator=g).sort().values
    offs = torch.searchsorted(ids, torch.arange(E, device="cuda"), right=True).to(torch.int32)
    idx = torch.randint(0, T, (R,), device="cuda", generator=g, dtype=torch.int32)
    x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
    gate_up = (torch.randn(E, 2 * I, H, device="cuda", generator=g) / math.sqrt(H)).bfloat16()
    down = (torch.randn(E, H, I, device="cuda", generator=g) / math.sqrt(I)).bfloat16()
    gu_int, down_t = io.interleave_gate_up(gate_up), down.transpose(1, 2).contiguous()
    h = torch.randn(R, 2 * I, device="cuda", generator=g).bfloat16()
    dout = torch.randn(T, H, device="cuda", generator=g).bfloat16()
    s = torch.rand(R, device="cuda")
    pairs = {
        "up 10_1 / 03_4": (lambda: launch.hf_swiglu_grouped_gemm(x, idx, gate_up, offs, validate=False),
                           lambda: launch.swiglu_grouped_gemm(x, idx, gu_int, offs, validate=False), 2 * R * H * 2 * I),
        "dA' 10_2 / 06_2": (lambda: launch.hf_dswiglu_grouped_gemm(dout, idx, down, h, s, offs, validate=False),
                            lambda: launch.dswiglu_grouped_gemm(dout, idx, down_t, h, s, offs, validate=False), 2 * R * H * I),
        "dX 10_3 / 06_1": (lambda: launch.hf_transposed_b_grouped_gemm(h, gate_up, offs, validate=False),
                           lambda: launch.transposed_b_grouped_gemm(h, gu_int, offs, validate=False), 2 * R * H * 2 * I),
        "dW1 10_4 / 06_3": (lambda: launch.hf_weight_grad_gate_up(h, x, idx, offs, validate=False),
                            lambda: launch.weight_grad(h, x, idx, offs, validate=False), 2 * R * H * 2 * I),
    }
    for what, (hf_fn, course_fn, flops) in pairs.items():
        m = interleaved({"hf": hf_fn, "course": course_fn}, rounds=5, reps=5, flops=flops)
        print(f"{name:<14} {what:<16} hf {m['hf'].ms:7.3f} ms  course {m['course'].ms:7.3f} ms  "
              f"ratio {m['course'].ms / m['hf'].ms:5.3f}  ({flops / m['hf'].ms / 1e9:6.0f} TFLOP/s)")
