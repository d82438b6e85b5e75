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
    _check_tensor(tensor)
    cols = tensor.shape[-1]
    rows = tensor.numel() // cols if rows is None else rows
    if not 0 < box_rows <= MAX_BOX_ROWS:
        raise ValueError(f"box rows must be in 1..{MAX_BOX_ROWS}, got {box_rows}")
    return _encode(tensor.data_ptr(), (cols, rows), (cols * 2,), (BOX_COLS, box_rows))


def tensor_map_gate_up(gate_up_proj, box_rows: int):
    """The tensor map of Hugging Face's ``gate_up_proj (E, 2I, H)`` (each expert's I gate rows,
    then its I up rows) that hands a kernel the *interleaved* tile chapter 03's SwiGLU epilogue
    reads (gate_j in row 2j, up_j in row 2j + 1 of the box), with no copy of the weights.

    The view is 4-D, innermost first: (H, 2, I, E), with the byte strides of the HF layout for
    (gate or up, j, e): ``I*H*2``, ``H*2``, ``2I*H*2``, out of increasing order, which the copy
    engine takes. A box of (64, 2, box_rows / 2, 1) lands (gate_j, up_j) pairs in consecutive
    rows of shared memory, swizzled as a 2-D box of ``box_rows`` rows of the interleaved matrix
    (byte-identical on an H100, session 10). A kernel loads it with
    ``tma_load_4d(dst, map, k0, 0, j0, e, bar)`` (kernels/tma.cuh)."""
    if gate_up_proj.dim() != 3 or gate_up_proj.shape[1] % 2:
        raise ValueError(f"gate_up_proj must be (E, 2I, H) with gate rows then up rows, got shape "
                         f"{tuple(gate_up_proj.shape)}")
    _check_tensor(gate_up_proj)
    E, two_i, H = gate_up_proj.shape
    if box_rows % 2 or not 0 < box_rows // 2 <= MAX_BOX_ROWS:
        raise ValueError(f"box rows (gate and up interleaved) must be even, 2..{2 * MAX_BOX_ROWS}; got {box_rows}")
    I = two_i // 2
    return _encode(gate_up_proj.data_ptr(), (H, 2, I, E), (I * H * 2, H * 2, two_i * H * 2),
                   (BOX_COLS, 2, box_rows // 2, 1))


def tensor_map_fp8(tensor, box_rows: int):
    """Chapter 07: the tensor map of a contiguous FP8 (e4m3) tensor seen as ``[rows, cols]``,
    boxes of ``box_rows x 128`` values: one byte a value, so a row of the box is 128 bytes, the
    same 128-byte swizzled layout as bf16's 64 (the tensor cores read it as e4m3)."""
    _check_tensor(tensor, torch.float8_e4m3fn)
    cols = tensor.shape[-1]
    if not 0 < box_rows <= MAX_BOX_ROWS:
        raise ValueError(f"box rows must be in 1..{MAX_BOX_ROWS}, got {box_rows}")
    return _encode(tensor.data_ptr(), (cols, tensor.numel() // cols), (cols,), (FP8_BOX_COLS, box_rows), "uint8")


FP8_BOX_COLS = 128  # 128 e4m3 values = 128 bytes: one row of the 128-byte swizzle pattern
_ELEMENTS = {torch.bfloat16: ("bf16", 2), torch.float8_e4m3fn: ("FP8 e4m3", 1)}


def _check_tensor(tensor, dtype=torch.bfloat16) -> None:
    """What the copy engine needs of any tensor it reads: the map's element type, contiguous on
    the GPU, a 16-byte aligned base and rows (the last dimension) of a multiple of 16 bytes."""
    name, size = _ELEMENTS[dtype]
    if tensor.dtype != dtype:
        raise TypeError(f"this tensor map is for {name} tensors, got {tensor.dtype}")
    if not tensor.is_cuda or not tensor.is_contiguous():
        raise ValueError("a tensor map needs a contiguous tensor on the GPU")
    if tensor.data_ptr() % 16:
        raise ValueError(f"TMA needs a 16-byte aligned base address; this tensor starts at "
                         f"{tensor.data_ptr():#x} (a slice at an odd offset? call .clone())")
    cols = tensor.shape[-1]
    if (cols * size) % 16:
        raise ValueError(f"TMA needs rows of a multiple of 16 bytes: {cols} {name} columns are {cols * size} bytes")


@functools.lru_cache(maxsize=256)
def _encode(address: int, sizes: tuple, byte_strides: tuple, box: tuple, dtype: str = "bfloat16"):
    """A tensor map of elements ``dtype`` (bfloat16, or uint8 for FP8): ``sizes`` and ``box``
    innermost first, ``byte_strides`` of every dimension but the innermost, 128-byte swizzle,
    zeros outside the tensor. The map holds only these numbers, so maps are
    cached by them: re-encoding costs ~10 us a call."""
    from cuda.bindings import driver as cu

    (err,) = cu.cuInit(0)
    if err != cu.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuInit failed: {err}")
    _make_context_current(cu)
    err, tmap = cu.cuTensorMapEncodeTiled(
        getattr(cu.CUtensorMapDataType, f"CU_TENSOR_MAP_DATA_TYPE_{dtype.upper()}"),
        len(sizes),
        address,
        [cu.cuuint64_t(n) for n in sizes],
        [cu.cuuint64_t(b) for b in byte_strides],
        [cu.cuuint32_t(n) for n in box],
        [cu.cuuint32_t(1)] * len(sizes),
        cu.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        cu.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
        cu.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        cu.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
    )
    if err != cu.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed ({err}) for a {dtype} tensor of sizes {sizes} "
                           f"(innermost first), byte strides {byte_strides}, box {box}")
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
