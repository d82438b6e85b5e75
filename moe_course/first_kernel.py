"""Host side of ``kernels/00_scale.cu``: the pattern every kernel wrapper in the course follows.

1. check the inputs and refuse what the kernel cannot take, with a message that names the problem;
2. load the module (compiled once per process, then cached);
3. size the grid from the GPU, launch on the stream torch uses, return a torch tensor.
"""

from __future__ import annotations

import numpy as np

from . import kernels
from .machine import info

SOURCE = "00_scale"
THREADS = 256
BLOCKS_PER_SM = 8  # enough resident warps to keep many 16-byte loads in flight


def check_bf16_cuda(name: str, t, align: int = 16) -> None:
    import torch

    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.bfloat16:
        raise TypeError(f"{name} must be bfloat16, got {t.dtype}")
    if t.device.type != "cuda":
        raise ValueError(f"{name} is on {t.device}; the kernel reads GPU memory: move it with .cuda()")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous())")
    if t.data_ptr() % align:
        raise ValueError(f"{name} must start on a {align}-byte boundary for 16-byte loads "
                         f"(its address ends in {t.data_ptr() % align} mod {align}; a sliced view?)")


@kernels.on_torch_stream
def scale(x, alpha: float, out=None):
    """``alpha * x`` in bf16 by the course's first kernel."""
    import torch

    check_bf16_cuda("x", x)
    if out is None:
        out = torch.empty_like(x)
    check_bf16_cuda("out", out)
    if out.shape != x.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, x has {tuple(x.shape)}")
    n = x.numel()
    if n == 0:
        return out
    kernel = kernels.load(SOURCE).get_function("scale_bf16")
    blocks = max(1, min(-(-n // (8 * THREADS)), info().sm_count * BLOCKS_PER_SM))
    kernel((blocks,), (THREADS,), (kernels.ptr(x), kernels.ptr(out), np.float32(alpha), np.int64(n)))
    return out
