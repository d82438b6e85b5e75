"""Chapter 06's kernels: what the trainable layer (:mod:`moe_course.layer`) needs beyond
chapter 03's, each a thin launcher over one file of ``kernels/``:

- :func:`transposed_b_grouped_gemm` (``06_1``): ``y = x @ w[e]`` with ``w`` stored ``[E, K, N]``:
  the forward's down-projection and the backward's ``dX = dH @ W_gate_up[e]``, no weight copied;
- :func:`dswiglu_grouped_gemm` (``06_2``): ``dA' = dout[gather] @ W_down[e]^T`` with the SwiGLU
  backward in its epilogue: ``dH``, ``s * A`` and the routing-weight gradient ``ds``;
- :func:`weight_grad` (``06_3``): ``dW[e] = sum over e's rows of dy^T x[gather]``;
- :func:`combine` (``06_4``): each token gathers and sums its k rows (no atomics).

Conventions as in chapters 02-03: rows sorted by expert, ``offs[e]`` expert e's end row (int32),
``gather_idx[r]`` the token of sorted row ``r`` (int32). Everything is bf16 on a Hopper GPU;
each launcher refuses anything else with a message that names the problem. ``validate=True``
also checks the offsets and indices on the host (a synchronisation; the layer turns it off).
"""

from __future__ import annotations

import numpy as np

from . import kernels, tma
from .grouped_gemm import (MAX_EXPERTS, Step, _ws_smem, check_offsets, check_on_gpu, check_tensor_types,
                           check_tile_multiples, launch_persistent)
from .io_overlap import check_gather_range
from .kernels import ptr
from .machine import info

TRANSPOSED_B = Step("06_1_transposed_b", "transposed_b_grouped_gemm", "W stored [E, K, N], read transposed",
                    128, 256, 64, threads=384, min_cc=(9, 0), smem_bytes=_ws_smem(4), persistent=True, tma=True)
DSWIGLU = Step("06_2_dswiglu", "dswiglu_grouped_gemm", "gathered dout @ W_down^T + SwiGLU backward epilogue",
               128, 256, 64, threads=384, min_cc=(9, 0), smem_bytes=_ws_smem(4), persistent=True, tma=True)


def weight_grad_smem(stages: int = 4) -> int:
    """06_3's shared memory: ``stages`` slots of 48 KB (dY 64 rows x 256, X 64 rows x 128), a 16 KB
    staging buffer per consumer warpgroup, two mbarriers a slot, 1024 to align."""
    return stages * 49152 + 2 * 16384 + 16 * stages + 1024


WEIGHT_GRAD = Step("06_3_weight_grad", "weight_grad_grouped_gemm", "dW[e] = dy_e^T x_e (reduction over rows)",
                   256, 256, 128, threads=384, min_cc=(9, 0), smem_bytes=weight_grad_smem(), persistent=True, tma=True)
COMBINE = "06_4_combine.cu"


def _require(ok: bool, message: str, kind=ValueError) -> None:
    if not ok:
        raise kind(message)


def _check(tensors: dict, dims: dict, dtypes: dict | None = None) -> None:
    """Every tensor a torch tensor of the right dtype (bf16 unless told) and rank, contiguous,
    on the GPU; and the GPU a Hopper."""
    import torch

    check_tensor_types({name: (t, (dtypes or {}).get(name, torch.bfloat16), dims[name]) for name, t in tensors.items()})
    check_on_gpu(tensors)
    cc = info().compute_capability or (0, 0)
    _require(cc >= (9, 0), f"chapter 06's kernels need a Hopper GPU (sm_90a, wgmma and TMA); this one is "
                           f"{cc[0]}.{cc[1]}", RuntimeError)


def _check_offsets(offs, rows: int, validate: bool) -> int:
    E = offs.numel()
    _require(0 < E <= MAX_EXPERTS, f"between 1 and {MAX_EXPERTS} experts, got {E}")
    if validate:
        check_offsets(offs, rows)
    return E


def _check_gather_idx(gather_idx, rows: int, tokens: int, validate: bool) -> None:
    _require(gather_idx.numel() == rows, f"gather_idx must hold one token per sorted row: {rows}, got {gather_idx.numel()}")
    if validate:
        check_gather_range(gather_idx, tokens)


def transposed_b_grouped_gemm(x, w, offs, validate: bool = True):
    """``y[rows of e] = x[rows of e] @ w[e]``, ``x [M, K]``, ``w [E, K, N]`` (N contiguous),
    ``y [M, N]`` bf16. N a multiple of 256, K of 64."""
    import torch

    _check({"x": x, "w": w, "offs": offs}, {"x": 2, "w": 3, "offs": 1}, {"offs": torch.int32})
    M, K = x.shape
    E, Kw, N = w.shape
    _require(Kw == K, f"x has K={K} columns but w is [E, K, N] = {tuple(w.shape)}: K differs")
    check_tile_multiples(TRANSPOSED_B, N, K)
    _require(_check_offsets(offs, M, validate) == E, f"offs must hold one end row per expert: {E}, got {offs.numel()}")
    y = torch.empty(M, N, device=x.device, dtype=torch.bfloat16)
    if M:
        module = kernels.load(TRANSPOSED_B.source)
        w_map = tma.tensor_map_2d(w, 64)  # w as an [E * K, N] matrix, boxes of 64 rows of K x 64 columns of N
        launch_persistent(TRANSPOSED_B, module, (tma.tensor_map_2d(x, 128), w_map, ptr(y)), offs, M, K, (M, N, K))
    return y


def dswiglu_grouped_gemm(dout, gather_idx, w_down, h, row_scale, offs, validate: bool = True):
    """The backward's first product and the SwiGLU backward (``kernels/06_2_dswiglu.cu``).

    ``dout [T, d]`` (the layer's output gradient), ``w_down [E, n, d]``, ``h [R, 2n]`` (the
    forward's pre-activation, gate and up interleaved), ``row_scale [R]`` fp32 (each sorted row's
    routing weight). Returns ``(dh [R, 2n], sa [R, n], ds [R])``: the pre-activation's gradient,
    ``s * silu(gate) * up`` and each row's routing-weight gradient ``<dout W_down[e], a>`` (fp32)."""
    import torch

    _check({"dout": dout, "gather_idx": gather_idx, "w_down": w_down, "h": h, "row_scale": row_scale, "offs": offs},
           {"dout": 2, "gather_idx": 1, "w_down": 3, "h": 2, "row_scale": 1, "offs": 1},
           {"gather_idx": torch.int32, "row_scale": torch.float32, "offs": torch.int32})
    T, d = dout.shape
    E, n, dw = w_down.shape
    R = gather_idx.numel()
    _require(dw == d, f"dout has d={d} columns but w_down is [E, n, d] = {tuple(w_down.shape)}")
    _require(h.shape == (R, 2 * n), f"h must be [R, 2n] = ({R}, {2 * n}), got {tuple(h.shape)}")
    _require(row_scale.shape == (R,), f"row_scale must be [R] = ({R},), got {tuple(row_scale.shape)}")
    check_tile_multiples(DSWIGLU, n, d, names=("n", "d"))
    _require(_check_offsets(offs, R, validate) == E, f"offs must hold one end row per expert: {E}, got {offs.numel()}")
    _check_gather_idx(gather_idx, R, T, validate)
    dh = torch.empty(R, 2 * n, device=dout.device, dtype=torch.bfloat16)
    sa = torch.empty(R, n, device=dout.device, dtype=torch.bfloat16)
    ds_part = torch.empty(n // 256, R, device=dout.device, dtype=torch.float32)  # one share per N-tile
    if R:
        module = kernels.load(DSWIGLU.source, defines=DSWIGLU.defines)
        args = (tma.tensor_map_2d(w_down, 256), ptr(dout), ptr(gather_idx), ptr(h), ptr(row_scale), ptr(dh), ptr(sa),
                ptr(ds_part))
        launch_persistent(DSWIGLU, module, args, offs, R, d, (R, n, d, T))
    return dh, sa, ds_part.sum(0)


@kernels.on_torch_stream
def weight_grad(dy, x, gather_idx, offs, validate: bool = True, step: Step = WEIGHT_GRAD):
    """``dW[e] = dy[rows of e]^T @ x[gather_idx[rows of e]]``, ``[E, N, K]`` bf16 (fp32 sums):
    ``dy [R, N]`` sorted by expert, ``x [T, K]`` (``gather_idx`` None: ``x`` is ``[R, K]``, row r
    itself). An expert with no rows gets zeros. N a multiple of 256, K of 128. ``step``: another
    build of ``06_3`` (other ``defines`` and shared memory), for experiments."""
    import torch

    tensors = {"dy": dy, "x": x, "offs": offs} | ({"gather_idx": gather_idx} if gather_idx is not None else {})
    _check(tensors, {"dy": 2, "x": 2, "offs": 1, "gather_idx": 1}, {"offs": torch.int32, "gather_idx": torch.int32})
    R, N = dy.shape
    T, K = x.shape
    E = _check_offsets(offs, R, validate)
    check_tile_multiples(step, N, K)
    if gather_idx is None:
        _require(T == R, f"without gather_idx, x must have dy's {R} rows, got {T}")
    else:
        _check_gather_idx(gather_idx, R, T, validate)
    dw = torch.empty(E, N, K, device=dy.device, dtype=torch.bfloat16)
    fn = kernels.load(step.source, defines=step.defines).get_function(step.kernel)
    fn.max_dynamic_shared_size_bytes = step.smem_bytes
    i32 = np.int32
    idx = ptr(gather_idx) if gather_idx is not None else np.uint64(0)
    dy_map = tma.tensor_map_2d(dy, 64) if R else tma.tensor_map_2d(dy.new_zeros(64, N), 64)
    fn((info().sm_count,), (step.threads,),
       (dy_map, ptr(x), idx, tma.tensor_map_2d(dw, 64), ptr(offs), i32(E), i32(R), i32(N), i32(K), i32(T)),
       shared_mem=step.smem_bytes)
    return dw


@kernels.on_torch_stream
def combine(rows, pos, weights, validate: bool = True):
    """``out[t] = sum_j weights[t, j] * rows[pos[t, j]]`` (``weights`` None: all ones), fp32
    sums, bf16 out. ``rows [R, d]``, ``pos [T, k]`` int32 (a position outside ``rows``: a dropped
    pair, adds nothing), ``weights [T, k]`` fp32."""
    import torch

    tensors = {"rows": rows, "pos": pos} | ({"weights": weights} if weights is not None else {})
    _check(tensors, {"rows": 2, "pos": 2, "weights": 2}, {"pos": torch.int32, "weights": torch.float32})
    T, k = pos.shape
    R, d = rows.shape
    _require(d % 8 == 0, f"rows must have a multiple of 8 columns (16-byte loads), got {d}")
    _require(weights is None or weights.shape == (T, k), f"weights must be [T, k] = ({T}, {k}), got "
                                                        f"{None if weights is None else tuple(weights.shape)}")
    out = torch.empty(T, d, device=rows.device, dtype=torch.bfloat16)
    if T:
        fn = kernels.load(COMBINE).get_function("combine_rows")
        fn((T,), (128,), (ptr(rows), ptr(pos), ptr(weights) if weights is not None else np.uint64(0), ptr(out),
                          np.int32(k), np.int32(d), np.int32(R)))
    return out
