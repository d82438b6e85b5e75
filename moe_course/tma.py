"""Tensor maps for the Hopper copy engine (TMA), made on the host for chapter 03's kernels.

A TMA copy names a tensor by a 128-byte *tensor map*: base address, sizes, strides, the box
one copy fetches, and the shared-memory swizzle to write it in. The driver encodes it
(``cuTensorMapEncodeTiled``, reached through ``cuda.bindings``, which CuPy does not wrap) and
the kernel receives it by value, as a ``const __grid_constant__ TmaDesc`` parameter
(``kernels/tma.cuh``); CuPy passes a 128-byte ``numpy.void`` scalar for it.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

BOX_COLS = 64  # 64 bf16 = 128 bytes: one row of the 128-byte swizzle pattern
MAX_BOX_ROWS = 256  # the copy engine's limit per box dimension


def tensor_map_2d(tensor, box_rows: int, rows: int | None = None):
    """The tensor map of a contiguous bf16 tensor seen as a 2D ``[rows, cols]`` matrix
    (``rows`` = everything but the last dimension by default), boxes of ``box_rows x 64``
    values, 128-byte swizzled; reads outside the matrix return zeros."""
    if tensor.dtype != torch.bfloat16:
        raise TypeError(f"tensor maps here are for bf16 tensors, got {tensor.dtype}")
    if not tensor.is_cuda or not tensor.is_contiguous():
        raise ValueError("a tensor map needs a contiguous tensor on the GPU")
    cols = tensor.shape[-1]
    rows = tensor.numel() // cols if rows is None else rows
    if tensor.data_ptr() % 16:
        raise ValueError(f"TMA needs a 16-byte aligned base address; this tensor starts at "
                         f"{tensor.data_ptr():#x} (a slice at an odd offset? call .clone())")
    if (cols * 2) % 16:
        raise ValueError(f"TMA needs rows of a multiple of 16 bytes: {cols} bf16 columns are {cols * 2} bytes")
    if not 0 < box_rows <= MAX_BOX_ROWS:
        raise ValueError(f"box rows must be in 1..{MAX_BOX_ROWS}, got {box_rows}")
    return _encode(tensor.data_ptr(), rows, cols, box_rows)


@functools.lru_cache(maxsize=256)
def _encode(address: int, rows: int, cols: int, box_rows: int):
    # The map holds only these numbers, so maps are cached by them: re-encoding costs ~10 us a call.
    from cuda.bindings import driver as cu

    (err,) = cu.cuInit(0)
    if err != cu.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuInit failed: {err}")
    _make_context_current(cu)
    err, tmap = cu.cuTensorMapEncodeTiled(
        cu.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        2,
        address,
        [cu.cuuint64_t(cols), cu.cuuint64_t(rows)],  # sizes, innermost first
        [cu.cuuint64_t(cols * 2)],  # byte stride of the outer dimension
        [cu.cuuint32_t(BOX_COLS), cu.cuuint32_t(box_rows)],
        [cu.cuuint32_t(1), cu.cuuint32_t(1)],
        cu.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        cu.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
        cu.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        cu.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
    )
    if err != cu.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed ({err}) for a [{rows}, {cols}] bf16 matrix, "
                           f"box {box_rows} x {BOX_COLS}")
    return np.array(tmap.opaque, dtype=np.uint64).view(np.dtype((np.void, 128)))[0]


def _make_context_current(cu) -> None:
    """The driver encodes a tensor map only with a context current in the calling thread. The
    CUDA runtime (torch, CuPy) makes the device's primary context current in a thread at its first
    call there; autograd runs a layer's backward in a thread of its own, where a tensor map can be
    the first thing asked for. So: make the primary context current if nothing is."""
    err, ctx = cu.cuCtxGetCurrent()
    if err == cu.CUresult.CUDA_SUCCESS and int(ctx) != 0:
        return
    err, dev = cu.cuDeviceGet(torch.cuda.current_device())
    if err == cu.CUresult.CUDA_SUCCESS:
        err, ctx = cu.cuDevicePrimaryCtxRetain(dev)
    if err == cu.CUresult.CUDA_SUCCESS:
        (err,) = cu.cuCtxSetCurrent(ctx)
    if err != cu.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"no CUDA context for the tensor map, and making the primary one current failed: {err}")
