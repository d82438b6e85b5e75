"""vLLM's fused MoE, the serving library chapter 09's decode kernels race (issue 20).

vLLM serves an MoE model's experts with ``fused_experts``: one Triton kernel, ``fused_moe_kernel``,
launched once for the up-projection (``[gate; up]`` rows) and once for the down-projection, on
the (token, expert) pairs sorted by expert and padded per expert to a multiple of the kernel's
row block (``moe_align_block_size``, a CUDA op of vLLM's ``_moe_C`` library), with block sizes
from vLLM's tuned tables (``configs/E=..,N=..,device_name=...json``, else its default), SwiGLU
between the two, and the weighted sum of each token's rows (``moe_sum``). Its weights are laid out
as chapter 09's (:class:`moe_course.decode.DecodeWeights`): ``w1 (E, 2n, d)`` gate rows then up
rows, ``w2 (E, d, n)``.

Where it comes from, in this order:

1. an installed vLLM of the version the course drives (:data:`VERSION`: these are vLLM's own
   internals, ``_prepare_expert_assignment`` and ``dispatch_fused_moe_kernel``, which change
   between releases; ``pip install vllm==0.26.0``, Linux and CUDA 13, torch 2.11);
2. else the wheel's own files, unpacked into the folder ``$MOE_COURSE_VLLM_SITE`` (a machine with
   no package registry, like the one the course is measured on; ``tools/vllm_bundle.sh`` makes
   it). vLLM's package ``__init__`` files import its whole serving engine, so they are not run:
   the few names the fused-MoE files import from the rest of vLLM are given here (:func:`_stand_ins`,
   each saying what vLLM's own does). Every GPU instruction is still vLLM's: its Triton kernel,
   its alignment and sum from its compiled ``_moe_C``. One exception, said by :func:`describe`:
   vLLM's fused ``silu_and_mul`` lives in a second library (``_C``, 79 MB) that the bundle
   leaves out, so the SwiGLU between the launches is vLLM's own torch formula
   (``SiluAndMul.forward_native``), a few kernels instead of one: in the layer's time, not in
   either GEMM's.

    from moe_course import vllm_moe
    why = vllm_moe.unavailable()            # None where it runs
    y = vllm_moe.layer(x, wd, k)            # the decode layer: the course's router, vLLM's experts
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
import re
import sys
import types

import torch
import torch.nn.functional as F

#: The vLLM release whose fused-MoE internals this module drives (the newest that pins torch 2.11).
VERSION = "0.26.0"
#: The folder holding the unpacked wheel files (``vllm/...``), where vLLM is not installed.
SITE_VARIABLE = "MOE_COURSE_VLLM_SITE"
_FUSED_MOE = "vllm.model_executor.layers.fused_moe"
_loaded: dict = {}


@functools.cache
def unavailable() -> str | None:
    """Why vLLM's fused MoE cannot run here, or ``None`` where it can (a CUDA GPU, and vLLM
    :data:`VERSION` installed or unpacked at ``$MOE_COURSE_VLLM_SITE``)."""
    if not torch.cuda.is_available():
        return "no CUDA GPU (vLLM's fused_moe is a Triton kernel for NVIDIA and AMD GPUs)"
    try:
        _load()
    except (ImportError, RuntimeError) as e:
        return str(e)
    except Exception as e:  # vLLM's own files failed to load here: say how, do not stop the caller
        return f"vLLM's fused_moe did not load: {type(e).__name__}: {e}"
    return None


def describe() -> str:
    """One line: which vLLM, where from, and what of it ran."""
    fm = _load()
    import triton

    align = ("vLLM's CUDA moe_align_block_size and moe_sum" if _loaded["compiled"]
             else f"torch stand-ins for moe_align_block_size and moe_sum ({_loaded['why_not_compiled']})")
    silu = "vLLM's silu_and_mul" if _has_fused_silu() else "SwiGLU in torch (vLLM's SiluAndMul.forward_native)"
    return (f"vLLM {_loaded['version']} fused_moe (Triton {triton.__version__} fused_moe_kernel), {align}, "
            f"{silu}; {_loaded['source']} ({os.path.dirname(fm.__file__)})")


# ------------------------------------------------------------------------------------------------
# The calls
# ------------------------------------------------------------------------------------------------

def config(tokens: int, E: int, d: int, n: int, k: int, dtype=torch.bfloat16) -> dict:
    """vLLM's block sizes for a step of ``tokens`` on ``E`` experts of width ``d`` and ``n``: its
    tuned table for this GPU, ``E`` and ``N = n`` where one ships (the entry nearest to
    ``tokens``), else its default. vLLM uses the same for both projections."""
    fm = _load()
    return dict(fm.try_get_optimal_moe_config((E, 2 * n, d), (E, d, n), k, fm._get_config_dtype_str(dtype=dtype),
                                              tokens))


def config_source(E: int, n: int, dtype=torch.bfloat16) -> str:
    """The tuned table :func:`config` reads, or ``"default"`` where none ships for this GPU."""
    fm = _load()
    name = fm.get_config_file_name(E, n, fm._get_config_dtype_str(dtype=dtype))
    return name if os.path.exists(os.path.join(os.path.dirname(fm.__file__), "configs", name)) else "default"


def routing(experts: torch.Tensor, num_experts: int, block: dict) -> tuple:
    """vLLM's routing for the kernel (``_prepare_expert_assignment``): ``(sorted_token_ids,
    expert_ids, num_tokens_post_padded)``, the pairs sorted by expert and padded per expert to
    ``block["BLOCK_SIZE_M"]``; for a very sparse step (``T k 4 <= E``) its "naive" assignment,
    one pair a block, ``sorted_token_ids`` then ``None``."""
    fm = _load()
    tokens, k = experts.shape
    return fm._prepare_expert_assignment(experts.to(torch.int32), block, tokens, k, num_experts, None,
                                         ignore_invalid_experts=True)


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, experts: torch.Tensor, block: dict, route,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """One launch of vLLM's ``fused_moe_kernel`` as its up-projection makes it: for token ``t``'s
    ``j``-th expert, ``out[t, j] = x[t] @ w[experts[t, j]].T``. ``x (T, K_in)``, ``w (E, N, K_in)``,
    ``route``: :func:`routing`'s. Returns ``out (T, k, N)``."""
    import triton.language as tl

    fm = _load()
    tokens, k = experts.shape
    out = torch.empty(tokens, k, w.shape[1], device=x.device, dtype=x.dtype) if out is None else out
    sorted_ids, expert_ids, padded = route
    fm.dispatch_fused_moe_kernel(
        x, w, out, None, None, None, None, sorted_ids, expert_ids, padded, False, k, block,
        compute_type={torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[x.dtype],
        use_fp8_w8a8=False, use_int8_w8a8=False, use_int8_w8a16=False, use_int4_w4a16=False,
        per_channel_quant=False, block_shape=None)
    return out


def fused_experts(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, weights: torch.Tensor,
                  experts: torch.Tensor) -> torch.Tensor:
    """vLLM's ``fused_experts`` (its ``fused_experts_impl``): block sizes, routing, up-projection,
    SwiGLU, down-projection with the routing weights, the sum per token. ``x (T, d)``,
    ``w_gate_up (E, 2n, d)``, ``w_down (E, d, n)``, ``weights``/``experts (T, k)``. Returns ``(T, d)``."""
    return _load().fused_experts_impl(x, w_gate_up, w_down, weights.float(), experts.to(torch.int32))


def layer(x: torch.Tensor, w, k: int) -> torch.Tensor:
    """The decode layer with vLLM's experts: chapter 09's router (:func:`moe_course.decode.route`,
    as the course's and torch's decode layers route), then :func:`fused_experts` on ``w``
    (:class:`moe_course.decode.DecodeWeights`). No value is read back: it can be captured in a
    CUDA graph."""
    from .decode import route

    weights, chosen = route(x, w.w_router, k)
    return fused_experts(x, w.w_gate_up, w.w_down, weights, chosen)


# ------------------------------------------------------------------------------------------------
# Loading: an installed vLLM, else the unpacked wheel files with stand-ins for its engine
# ------------------------------------------------------------------------------------------------

def _load():
    """vLLM's ``fused_moe`` module, loaded once (:func:`unavailable` says why it cannot be)."""
    if "module" in _loaded:
        return _loaded["module"]
    try:
        import vllm
    except ImportError:
        vllm = None
    if vllm is not None and not getattr(vllm, "_moe_course_stand_in", False):
        if not vllm.__version__.startswith(VERSION):
            raise RuntimeError(f"vLLM {vllm.__version__} is installed; the course drives {VERSION}'s fused_moe")
        fm = importlib.import_module(f"{_FUSED_MOE}.fused_moe")
        _loaded.update(module=fm, version=vllm.__version__, source="the installed vLLM", compiled=True,
                       why_not_compiled="")
        return fm
    site = os.environ.get(SITE_VARIABLE)
    if not site:
        raise ImportError(f"vLLM is not installed (pip install vllm=={VERSION}) and ${SITE_VARIABLE} names no "
                          f"folder of its unpacked files (tools/vllm_bundle.sh)")
    return _from_files(site)


def _from_files(site: str):
    vdir = os.path.join(site, "vllm")
    fmdir = os.path.join(vdir, "model_executor", "layers", "fused_moe")
    if not os.path.isfile(os.path.join(fmdir, "fused_moe.py")):
        raise ImportError(f"${SITE_VARIABLE}={site} holds no vllm/model_executor/layers/fused_moe/fused_moe.py "
                          f"(tools/vllm_bundle.sh unpacks vLLM {VERSION}'s files there)")
    _package("vllm", vdir, _moe_course_stand_in=True)
    version = _file("vllm._version", os.path.join(vdir, "_version.py")).__version__
    if version != VERSION:
        raise RuntimeError(f"${SITE_VARIABLE} holds vLLM {version}; the course drives {VERSION}'s fused_moe")
    compiled, why = _stand_ins(vdir)
    _package("vllm.model_executor", os.path.join(vdir, "model_executor"))
    _package("vllm.model_executor.layers", os.path.join(vdir, "model_executor", "layers"))
    _package(_FUSED_MOE, fmdir, get_config=lambda: None)  # its __init__'s: no override of the tables
    activation = _file(f"{_FUSED_MOE}.activation", os.path.join(fmdir, "activation.py"))
    _fused_moe_stand_ins()
    _file(f"{_FUSED_MOE}.moe_align_block_size", os.path.join(fmdir, "moe_align_block_size.py"))
    fm = _file(f"{_FUSED_MOE}.fused_moe", os.path.join(fmdir, "fused_moe.py"))
    vllms = fm.apply_moe_activation

    def apply_moe_activation(kind, output, input, **kwargs):  # vLLM's SiluAndMul.forward_native
        if kind == activation.MoEActivation.SILU and not kwargs.get("clamp_limit") and not _has_fused_silu():
            half = input.shape[-1] // 2
            return output.copy_(F.silu(input[..., :half]) * input[..., half:])
        return vllms(kind, output, input, **kwargs)

    fm.apply_moe_activation = apply_moe_activation
    _loaded.update(module=fm, version=version, source=f"vLLM's files in ${SITE_VARIABLE}", compiled=compiled,
                   why_not_compiled=why)
    return fm


def _stand_ins(vdir: str) -> tuple[bool, str]:
    """What fused_moe.py imports from the rest of vLLM (whose packages import the engine), given
    as small modules; and vLLM's compiled MoE ops, loaded as vLLM's ``platforms/cuda.py`` does.
    Returns whether those loaded, and why not."""
    # vllm/envs.py reads its settings from the environment; fused_moe.py reads these two
    _module("vllm.envs", VLLM_BATCH_INVARIANT=os.environ.get("VLLM_BATCH_INVARIANT", "0") == "1",
            VLLM_TUNED_CONFIG_FOLDER=os.environ.get("VLLM_TUNED_CONFIG_FOLDER"))
    _module("vllm.logger", init_logger=lambda name: _OnceLogger(logging.getLogger(name), {}))
    _module("vllm.platforms", current_platform=_Platform())
    import triton
    import triton.language as tl

    _module("vllm.triton_utils", triton=triton, tl=tl, HAS_TRITON=True)  # vLLM's wraps the same two
    _package("vllm.utils", os.path.join(vdir, "utils"))  # its math_utils.py loads from the files

    @functools.cache
    def get_device_name_as_file_name(device_id: int = 0) -> str:  # picks the tuned table, as vLLM's
        return re.sub(r"[\s/]+", "_", _Platform.get_device_name(device_id))

    _module("vllm.utils.platform_utils", get_device_name_as_file_name=get_device_name_as_file_name)
    # vLLM registers fused_experts as torch.ops.vllm.fused_experts; here fused_experts_impl is called
    _module("vllm.utils.torch_utils", direct_register_custom_op=lambda **kwargs: None)
    compiled, why = False, ""
    try:
        importlib.import_module("vllm._moe_C_stable_libtorch")
        torch.ops._moe_C.moe_align_block_size  # noqa: B018 (raises where the library registered nothing)
        compiled = True
    except (ImportError, OSError, AttributeError, RuntimeError) as e:
        why = f"{type(e).__name__}: {e}"
    if compiled:  # vllm/_custom_ops.py's two wrappers
        def moe_align_block_size(topk_ids, num_experts, block_size, sorted_ids, expert_ids, padded, expert_map=None):
            torch.ops._moe_C.moe_align_block_size(topk_ids, num_experts, block_size, sorted_ids, expert_ids, padded,
                                                  expert_map)

        def moe_sum(input, output, topk_ids=None, expert_map=None):
            torch.ops._moe_C.moe_sum(input, output, topk_ids, expert_map)
    else:
        moe_align_block_size, moe_sum = align_block_size, sum_pairs
    _module("vllm._custom_ops", moe_align_block_size=moe_align_block_size, moe_sum=moe_sum)
    return compiled, why


def _fused_moe_stand_ins() -> None:
    """The names fused_moe.py imports from its own package's heavier modules."""

    class FusedMoEExpertsModular:  # modular_kernel.py's (it imports the engine)
        @staticmethod
        def adjust_N_for_activation(N, activation):
            return N // 2 if activation.is_gated else N

    _module(f"{_FUSED_MOE}.modular_kernel", FusedMoEExpertsModular=FusedMoEExpertsModular)

    def _get_config_dtype_str(dtype, use_fp8_w8a8=False, use_fp8_w8a16=False, use_int8_w8a16=False,
                              use_int4_w4a16=False, ocp_mx_scheme=None):  # config.py's
        quantised = {"fp8_w8a8": use_fp8_w8a8, "fp8_w8a16": use_fp8_w8a16, "int8_w8a16": use_int8_w8a16,
                     "int4_w4a16": use_int4_w4a16}
        named = next((name for name, on in quantised.items() if on), None)
        if named or ocp_mx_scheme is not None:
            return named
        return "float32" if dtype == torch.float else None

    _module(f"{_FUSED_MOE}.config", FUSED_MOE_UNQUANTIZED_CONFIG=None, FusedMoEQuantConfig=object,
            _get_config_dtype_str=_get_config_dtype_str)

    def moe_kernel_quantize_input(A, A_scale, quant_dtype, per_act_token_quant, block_shape=None, **kwargs):
        if quant_dtype is not None:
            raise NotImplementedError("the course runs vLLM's fused_moe unquantised (bf16) only")
        return A, A_scale  # utils.py's, unquantised

    _module(f"{_FUSED_MOE}.utils", moe_kernel_quantize_input=moe_kernel_quantize_input,
            enable_swap_ab=lambda block_m, block_n: False)  # utils.py's matters for FP8 only


def align_block_size(topk_ids, num_experts, block_size, sorted_ids, expert_ids, padded, expert_map=None):
    """``moe_align_block_size`` in torch, where vLLM's compiled one cannot load (the same outputs,
    no value read back): the ``T k`` pairs sorted by expert (stable), each expert's run padded with
    the sentinel ``T k`` to a multiple of ``block_size`` (an idle expert gets no block), the expert
    of each block, and the padded total."""
    if expert_map is not None:
        raise NotImplementedError("expert parallelism (expert_map) is not part of the course's stand-in")
    flat = topk_ids.reshape(-1).long()
    pairs = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    rounded = (counts + block_size - 1) // block_size * block_size
    ends = rounded.cumsum(0)
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    rank = torch.arange(pairs, device=flat.device) - (counts.cumsum(0) - counts)[expert_of]
    sorted_ids.fill_(pairs)
    sorted_ids.scatter_(0, (ends - rounded)[expert_of] + rank, order.to(sorted_ids.dtype))
    block_start = torch.arange(expert_ids.numel(), device=flat.device) * block_size
    expert_ids.copy_(torch.searchsorted(ends, block_start, right=True).clamp_(max=num_experts - 1))
    padded.copy_(ends[-1:])


def sum_pairs(input, output, topk_ids=None, expert_map=None):
    """``moe_sum`` in torch: ``output[t] = sum_j input[t, j]``."""
    output.copy_(input.sum(dim=1))


def _has_fused_silu() -> bool:
    try:
        torch.ops._C.silu_and_mul  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


class _OnceLogger(logging.LoggerAdapter):
    """vllm.logger's logger: a logger with ``*_once`` variants."""
    seen: set = set()

    def _once(self, level, msg, *args, **kwargs):
        kwargs.pop("scope", None)
        if (level, msg, args) not in self.seen:
            self.seen.add((level, msg, args))
            self.log(level, msg, *args, **kwargs)

    def info_once(self, msg, *args, **kwargs):
        self._once(logging.INFO, msg, *args, **kwargs)

    def warning_once(self, msg, *args, **kwargs):
        self._once(logging.WARNING, msg, *args, **kwargs)

    def debug_once(self, msg, *args, **kwargs):
        self._once(logging.DEBUG, msg, *args, **kwargs)


class _Platform:
    """vllm.platforms.current_platform: the few methods fused_moe.py calls."""

    @staticmethod
    def is_cuda() -> bool:
        return torch.cuda.is_available() and torch.version.hip is None

    @staticmethod
    def is_rocm() -> bool:
        return torch.version.hip is not None

    @staticmethod
    def fp8_dtype():
        return torch.float8_e4m3fn

    @staticmethod
    def get_device_name(device_id: int = 0) -> str:  # "NVIDIA H200" -> the table "...NVIDIA_H200.json"
        return torch.cuda.get_device_name(device_id) if torch.cuda.is_available() else "cpu"

    @staticmethod
    def is_device_capability(capability: int, device_id: int = 0) -> bool:
        if not torch.cuda.is_available():
            return False
        major, minor = torch.cuda.get_device_capability(device_id)
        return major * 10 + minor == capability


def _module(name: str, **attrs) -> types.ModuleType:
    """A stand-in module ``name`` in ``sys.modules``, holding ``attrs``."""
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return _register(name, module)


def _package(name: str, path: str, **attrs) -> types.ModuleType:
    """A package whose submodules load from ``path`` and whose ``__init__`` never runs."""
    module = _module(name, **attrs)
    module.__path__ = [path]
    return module


def _file(name: str, path: str) -> types.ModuleType:
    """The module ``name`` run from the file ``path``."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    _register(name, module)
    spec.loader.exec_module(module)
    return module


def _register(name: str, module: types.ModuleType) -> types.ModuleType:
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
    return module
