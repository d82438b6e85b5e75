"""Every kind of bad input to the library is refused with a message that names the argument.

Issue #27's kinds, one table: each case calls one entry point with one mistake and states the
exception and the words the message must hold (the argument's name, what was expected). A raw
error from deep inside torch (RuntimeError, IndexError) or no error at all fails the case. The
records and the command lines have their own tests (test_records.py, test_bad_inputs_cli.py).
Runs on a CPU; the GPU-only entry points refuse the same inputs before they launch anything.
"""

from __future__ import annotations

import pytest
import torch

from moe_course import checking, configs, decode, grouped_gemm, layer, moe
from moe_course import token_rounding as tr
from moe_course.machine import info

T, D, N, E, K = 6, 8, 16, 4, 2


def _w(dtype=torch.float32):
    return moe.random_weights(D, N, E, dtype=dtype, generator=torch.Generator().manual_seed(0))


def _x(t=T, dtype=torch.float32):
    return torch.randn(t, D, generator=torch.Generator().manual_seed(1), dtype=torch.float32).to(dtype)


def _experts_forward(fn, offsets):
    w = _w()
    return lambda: fn(torch.randn(T, D), torch.tensor(offsets), w.w_gate, w.w_up, w.w_down)


def _gg(fn, offs):
    x = torch.randn(T, 16).to(torch.bfloat16)
    w = torch.randn(3, 8, 16).to(torch.bfloat16)
    return lambda: fn(x, w, torch.tensor(offs, dtype=torch.int32))


def _nan_logits():
    logits = torch.randn(T, E)
    logits[2, 1] = float("nan")
    return logits


def _ids(*values):
    return torch.tensor(values).view(-1, 1)


OFFSETS = {"not from 0": [1, 2, 4, 5, 6], "decreasing": [0, 4, 2, 5, 6], "short of the rows": [0, 1, 2, 3, 5],
           "past the rows": [0, 2, 4, 6, 7]}
END_ROWS = {"decreasing": [4, 2, 6], "short of the rows": [2, 3, 5], "past the rows": [2, 4, 7], "negative": [-1, 4, 6]}
PROBS = torch.full((T, E), 1.0 / E)

CASES = {
    # offsets that do not start at 0, decrease, or miss the row count: every function taking them
    **{f"experts_forward offsets {k}": (_experts_forward(moe.experts_forward, v), ValueError, "offsets")
       for k, v in OFFSETS.items()},
    **{f"experts_forward_grouped_mm offsets {k}": (_experts_forward(moe.experts_forward_grouped_mm, v), ValueError,
                                                   "offsets") for k, v in OFFSETS.items()},
    **{f"reference offs {k}": (_gg(grouped_gemm.reference, v), ValueError, "offs") for k, v in END_ROWS.items()},
    **{f"torch_loop offs {k}": (_gg(grouped_gemm.torch_loop, v), ValueError, "offs") for k, v in END_ROWS.items()},
    # expert ids out of range
    "tokens_per_expert id >= E": (lambda: moe.tokens_per_expert(_ids(0, 1, 4), E), ValueError, "experts"),
    "tokens_per_expert id < 0": (lambda: moe.tokens_per_expert(_ids(0, -1, 2), E), ValueError, "experts"),
    "switch_aux_loss id >= E": (lambda: moe.switch_aux_loss(PROBS, _ids(0, 1, 2, 3, 0, 4)), ValueError, "experts"),
    "gshard_aux_loss id < 0": (lambda: moe.gshard_aux_loss(PROBS, _ids(0, 1, 2, 3, 0, -1)), ValueError, "experts"),
    "dispatch id >= E": (lambda: moe.dispatch(_ids(0, 5), E), ValueError, "experts"),
    "drop_tokens id < 0": (lambda: moe.drop_tokens(_ids(0, -2), E, 1), ValueError, "experts"),
    "expert_counts id >= E": (lambda: tr.expert_counts(_ids(0, 9), E), ValueError, "expert"),
    "combine_rows token id >= T": (lambda: moe.combine_rows(torch.ones(2, D), torch.tensor([0, T]), torch.ones(2), T),
                                   ValueError, "token_of"),
    # a NaN logit: every router refuses it, as token rounding does
    "router_probs NaN": (lambda: moe.router_probs(_nan_logits()), ValueError, "logits"),
    "softmax_topk NaN": (lambda: moe.softmax_topk(_nan_logits(), K), ValueError, "logits"),
    "topk_softmax NaN": (lambda: moe.topk_softmax(_nan_logits(), K), ValueError, "logits"),
    "noisy_topk NaN": (lambda: moe.noisy_topk(_nan_logits(), K), ValueError, "logits"),
    "expert_choice NaN": (lambda: moe.expert_choice(_nan_logits(), 2), ValueError, "logits"),
    "moe_forward NaN token": (lambda: moe.moe_forward(_x().index_fill_(0, torch.tensor([3]), float("nan")), _w(), K),
                              ValueError, "logits"),
    "layer.route NaN token": (lambda: layer.route(_x().index_fill_(0, torch.tensor([3]), float("nan")),
                                                  _w().w_router, K), ValueError, "logits"),
    "token_rounding NaN": (lambda: tr.token_rounding(_nan_logits(), K, 4), ValueError, "scores"),
    # shapes that do not match
    "relative_error shapes": (lambda: checking.relative_error(torch.ones(4), torch.ones(2, 2)), ValueError, "shape"),
    "relative_error numpy shapes": (lambda: checking.relative_error([1.0, 2.0], [[1.0], [2.0]]), ValueError, "shape"),
    # counts
    "make_problem negative count": (lambda: grouped_gemm.make_problem([3, -1, 2], 16, 8, device="cpu"), ValueError,
                                    "counts"),
    "make_problem float counts": (lambda: grouped_gemm.make_problem([1.5, 2.0], 16, 8, device="cpu"), TypeError,
                                  "counts"),
    "make_problem d_in 0": (lambda: grouped_gemm.make_problem([1, 2], 0, 8, device="cpu"), ValueError, "d_in"),
    "round_counts negative": (lambda: tr.round_counts(torch.tensor([3, -1]), 4), ValueError, "counts"),
    "tile_map negative": (lambda: tr.tile_map(torch.tensor([3, -1]), 4), ValueError, "counts"),
    # mixed dtypes of x and the weights
    "moe_forward bf16 x, fp32 weights": (lambda: moe.moe_forward(_x(dtype=torch.bfloat16), _w(), K), TypeError,
                                         "w_router"),
    "router_logits mixed": (lambda: moe.router_logits(_x(dtype=torch.float64), _w().w_router), TypeError, "w_router"),
    "experts_forward mixed": (lambda: moe.experts_forward(_x(dtype=torch.bfloat16), torch.tensor([0, 2, 4, 5, 6]),
                                                          *_w()[1:]), TypeError, "w_gate"),
    "layer.route mixed": (lambda: layer.route(_x(dtype=torch.bfloat16), _w().w_router, K), TypeError, "w_router"),
    "MoELayer bf16 input to fp32 layer": (lambda: moe.MoELayer(D, N, E, K)(_x(dtype=torch.bfloat16)), TypeError,
                                          "w_router"),
    # tile = 0 or negative
    "token_rounding tile 0": (lambda: tr.token_rounding(PROBS, K, 0), ValueError, "tile"),
    "route tile -1": (lambda: tr.route(PROBS, K, -1, "up"), ValueError, "tile"),
    "round_counts tile 0": (lambda: tr.round_counts(torch.tensor([3, 1]), 0), ValueError, "tile"),
    "tile_map tile 0": (lambda: tr.tile_map(torch.tensor([3, 1]), 0), ValueError, "tile"),
    "max_rows tile 0": (lambda: tr.max_rows(T, E, K, 0, "up"), ValueError, "tile"),
    "layer.route tile 0": (lambda: layer.route(_x(), _w().w_router, K, "nearest", 0), ValueError, "tile"),
    "CourseMoE tile 0": (lambda: layer.CourseMoE(D, N, E, K, routing="up", tile=0), ValueError, "tile"),
    # unknown names
    "tr.route method": (lambda: tr.route(PROBS, K, 4, "nope"), ValueError, "method"),
    "max_rows method": (lambda: tr.max_rows(T, E, K, 4, "nope"), ValueError, "method"),
    "layer.route method": (lambda: layer.route(_x(), _w().w_router, K, "nope"), ValueError, "routing"),
    "moe_forward router": (lambda: moe.moe_forward(_x(), _w(), K, router="nope"), ValueError, "router"),
    "moe_forward expert_step": (lambda: moe.moe_forward(_x(), _w(), K, expert_step="nope"), ValueError, "expert step"),
    "grouped_gemm step": (lambda: grouped_gemm.implementation("nope"), ValueError, "implementation"),
    # top_k larger than the experts, or not a positive int
    "topk_softmax k > E": (lambda: moe.topk_softmax(torch.randn(T, E), E + 1), ValueError, "k"),
    "token_rounding k > E": (lambda: tr.token_rounding(PROBS, E + 1, 4), ValueError, "k"),
    "layer.route k > E": (lambda: layer.route(_x(), _w().w_router, E + 1), ValueError, "k"),
    "CourseMoE k > E": (lambda: layer.CourseMoE(D, N, E, E + 1), ValueError, "k"),
    "CourseMoE k 0": (lambda: layer.CourseMoE(D, N, E, 0), ValueError, "k"),
    "MoELayer k 0": (lambda: moe.MoELayer(D, N, E, 0), ValueError, "k"),
    # sizes
    "random_weights d 0": (lambda: moe.random_weights(0, N, E), ValueError, "d"),
    "random_weights experts -1": (lambda: moe.random_weights(D, N, -1), ValueError, "num_experts"),
    "CourseMoE d_model 0": (lambda: layer.CourseMoE(0, N, E, K), ValueError, "d_model"),
    # chapter 09's decode layer and its maths (checks of shapes and types only: no host read)
    "masked_moe_forward k > E": (lambda: decode.masked_moe_forward(_x(), _w(), E + 1), ValueError, "k"),
    "masked_moe_forward k 0": (lambda: decode.masked_moe_forward(_x(), _w(), 0), ValueError, "k"),
    "masked_moe_forward capacity 0": (lambda: decode.masked_moe_forward(_x(), _w(), K, capacity=0), ValueError,
                                      "capacity"),
    "masked_moe_forward capacity 2.5": (lambda: decode.masked_moe_forward(_x(), _w(), K, capacity=2.5), TypeError,
                                        "capacity"),
    "masked_moe_forward bf16 x, fp32 weights": (lambda: decode.masked_moe_forward(_x(dtype=torch.bfloat16), _w(), K),
                                                TypeError, "w_router"),
    "masked_moe_forward x 1-D": (lambda: decode.masked_moe_forward(torch.randn(D), _w(), K), ValueError, "x"),
    "masked_moe_forward x too wide": (lambda: decode.masked_moe_forward(torch.randn(T, D + 1), _w(), K), ValueError,
                                      "x has width"),
    "masked_moe_forward weights a tuple": (lambda: decode.masked_moe_forward(_x(), tuple(_w()), K), TypeError,
                                           "MoEWeights"),
    "masked_layout float ids": (lambda: decode.masked_layout(torch.zeros(T, K), E), ValueError, "experts"),
    "decode_step part": (lambda: decode.decode_step(configs.QWEN3_30B_A3B, 8, "sideways"), ValueError, "part"),
    "decode_step tokens 0": (lambda: decode.decode_step(configs.QWEN3_30B_A3B, 0, "up"), ValueError, "tokens"),
    "decode_step active > E": (lambda: decode.decode_step(configs.QWEN3_30B_A3B, 8, "up", active=129), ValueError,
                               "active"),
    "expected_active_experts k > E": (lambda: decode.expected_active_experts(8, E, E + 1), ValueError, "k"),
    "random_routing trials 0": (lambda: decode.random_routing(8, E, K, trials=0), ValueError, "trials"),
}

if not info().has_gpu:  # without a GPU, a request for one is refused in words, not a driver error
    CASES.update({
        "make_problem device cuda": (lambda: grouped_gemm.make_problem([1, 2], 16, 8, device="cuda"), RuntimeError,
                                     "GPU"),
        "random_weights device cuda": (lambda: moe.random_weights(D, N, E, device="cuda"), RuntimeError, "GPU"),
        "skewed_logits device cuda": (lambda: moe.skewed_logits(T, E, device="cuda"), RuntimeError, "GPU"),
        "synthetic_scores device cuda": (lambda: tr.synthetic_scores(T, E, device="cuda"), RuntimeError, "GPU"),
        "CourseMoE device cuda": (lambda: layer.CourseMoE(D, N, E, K, device="cuda"), RuntimeError, "GPU"),
        "MoELayer device cuda": (lambda: moe.MoELayer(D, N, E, K, device="cuda"), RuntimeError, "GPU"),
    })


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_by_name(case):
    call, kind, words = CASES[case]
    with pytest.raises(Exception) as raised:
        call()
    assert isinstance(raised.value, kind), f"{case}: {type(raised.value).__name__}: {raised.value}"
    assert words.lower() in str(raised.value).lower(), f"{case}: message does not name {words!r}: {raised.value}"


# An empty batch (0 tokens) is a valid input everywhere: an empty result of the right shape.
EMPTY = {
    "moe_forward": lambda: moe.moe_forward(_x(0), _w(), K).y,
    "moe_forward grouped_mm": lambda: moe.moe_forward(_x(0), _w(), K, expert_step="grouped_mm").y,
    "moe_forward expert_choice": lambda: moe.moe_forward(_x(0), _w(), K, router="expert_choice").y,
    "MoELayer": lambda: moe.MoELayer(D, N, E, K)(_x(0)),
    "decode.masked_moe_forward": lambda: decode.masked_moe_forward(_x(0), _w(), K).y,
    "decode.masked_moe_forward capacity 4": lambda: decode.masked_moe_forward(_x(0), _w(), K, capacity=4).y,
    "CourseMoE top-K": lambda: layer.CourseMoE(D, N, E, K, dtype=torch.float32)(_x(0)),
    "CourseMoE nearest": lambda: layer.CourseMoE(D, N, E, K, routing="nearest", tile=4, dtype=torch.float32)(_x(0)),
}


@pytest.mark.parametrize("entry", list(EMPTY))
def test_an_empty_batch_gives_an_empty_result(entry):
    y = EMPTY[entry]()
    assert tuple(y.shape) == (0, D)


def test_an_empty_batch_routes_to_no_rows():
    for method in tr.ROUTINGS:
        r = tr.route(torch.empty(0, E), K, 4, method)
        assert r.token_ids.numel() == 0 and r.counts.tolist() == [0] * E, method
    r = layer.route(_x(0), _w().w_router, K)
    assert r.gather_idx.numel() == 0 and r.offs.tolist() == [0] * E


def test_the_empty_backward_gives_zero_gradients():
    m = layer.CourseMoE(D, N, E, K, dtype=torch.float32)
    x = _x(0).requires_grad_()
    m(x).sum().backward()
    assert x.grad.shape == (0, D) and all(float(p.grad.abs().sum()) == 0 for p in m.parameters())


def test_good_input_still_passes():
    """The checks refuse only what is wrong: the same calls with correct input run."""
    w = _w()
    y = moe.moe_forward(_x(), w, K).y
    assert y.shape == (T, D) and torch.isfinite(y).all()
    offsets = torch.tensor([0, 2, 2, 5, 6])
    assert moe.experts_forward(_x(), offsets, *w[1:]).shape == (T, D)
    assert moe.tokens_per_expert(_ids(0, 3, 3), E).tolist() == [1, 0, 0, 2]
    assert checking.relative_error(torch.ones(2, 2), torch.ones(2, 2)) == 0.0
    assert grouped_gemm.make_problem([0, 3, 0], 16, 8, device="cpu").x.shape == (3, 16)
    assert tr.route(PROBS, K, 4, "nearest").offsets[-1] >= 0
