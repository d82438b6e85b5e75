"""What the GPU tests of the kernels share: the awkward expert counts and their routing (offsets
and random gather indices), outputs poisoned before a launch (so a tile the kernel skips shows
up as NaN), and the relative error that refuses NaN."""

import pytest
import torch

COUNT_CASES = {  # rows per expert
    "zeros-and-ragged": [0, 1, 130, 0, 257],
    "one-expert-has-all": [0, 0, 300, 0],
    "single-row": [1],
    "more-tiles-than-sms": [700, 0, 1333, 129, 2000, 65, 900, 1100, 3000, 256, 1, 777] * 3,
}
# chapter 06's kernels and chapter 10's backward: the cases above ("more-tiles-than-sms": 268
# M-tiles, so each persistent block takes two or more), and a few of their own
LAYER_COUNT_CASES = COUNT_CASES | {
    "single-expert": [64],
    "a-few-tiles": [1500, 3, 700, 0, 129],  # 21 M-tiles: at most one a block
    "16-row-boundaries": [16, 0, 48, 80, 33],  # 06_3 reduces 16 rows a wgmma: ends on and off them
}


# the consumer schedules 06_2 and 10_2 are tested under, as `pingpong` (launch.pingpong_step or not)
SCHEDULES = [pytest.param(False, id="cooperative"), pytest.param(True, id="pingpong")]


def routing(counts, tokens, seed=0):
    """``(offs, gather_idx)`` for ``counts`` rows per expert: each expert's end row (int32), and
    for every row a random token of ``tokens`` (int32; the same draws for the same seed)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    offs = torch.tensor(counts).cumsum(0).to(device="cuda", dtype=torch.int32)
    return offs, torch.randint(0, tokens, (sum(counts),), device="cuda", dtype=torch.int32, generator=g)


def poison(*shapes_dtypes):
    """Fill and free blocks of the sizes the kernel's outputs will take: the caching allocator
    hands the same memory back, NaN-filled, so a row or tile left unwritten shows up."""
    blocks = [torch.full(shape, float("nan"), device="cuda", dtype=dtype) for shape, dtype in shapes_dtypes]
    del blocks


def rel(a, b):
    a, b = a.float(), b.float()
    assert torch.isfinite(a).all(), "NaN or inf in the kernel's output: a tile was skipped or read garbage"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def randn(*shape, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).bfloat16()
