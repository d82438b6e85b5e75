"""Exercise 05's grader passes right answers and FAILS known wrong ones (the routing weight
forgotten, sigmoid for silu's derivative, gate and up read as halves, ds scaled by s, a
softmax backward that drops the sum, an unstable silu, experts mixed up or not zeroed, nothing
returned, an unfilled cell), each with a message saying what went wrong."""

import pytest
import torch

from moe_course import layer
from moe_course.checking import CheckFailed
from moe_course.graders import ex05_moe_backward as ex05

SEEDS = (0, 1, 2)


def must_fail(grade, fn, match, seeds=SEEDS):
    for seed in seeds:
        with pytest.raises(CheckFailed, match=match):
            grade(fn, seed=seed)


def unfilled(*args):
    raise NotImplementedError("fill in this cell (test)")


# --- the SwiGLU backward --------------------------------------------------------------------------

def _swiglu(da_raw, h, s, *, use_s=True, derivative="silu", halves=False, ds_scaled=False):
    n = h.shape[1] // 2
    g, u = (h[:, :n], h[:, n:]) if halves else (h[:, 0::2], h[:, 1::2])
    sig = torch.sigmoid(g)
    a = g * sig * u
    da = da_raw * (s[:, None] if use_s else 1)
    dsilu = sig * (1 + g * (1 - sig)) if derivative == "silu" else sig
    dg, du = da * u * dsilu, da * g * sig
    dh = torch.cat((dg, du), dim=1) if halves else torch.stack((dg, du), dim=-1).reshape(h.shape)
    ds = (da_raw * a).sum(-1) * (s if ds_scaled else 1)
    return dh, s[:, None] * a, ds


def swiglu_unstable(da_raw, h, s):  # silu through exp(-g): inf / inf = NaN for a gate of -40
    g, u = h[:, 0::2], h[:, 1::2]
    e = torch.exp(-g)
    sig = 1 / (1 + e)
    dsilu = (1 + e + g * e) / (1 + e) ** 2
    da = da_raw * s[:, None]
    a = g * sig * u
    return torch.stack((da * u * dsilu, da * g * sig), dim=-1).reshape(h.shape), s[:, None] * a, (da_raw * a).sum(-1)


def test_swiglu_grader():
    for seed in SEEDS:
        ex05.grade_swiglu_backward(_swiglu, seed=seed)
    must_fail(ex05.grade_swiglu_backward, lambda d, h, s: _swiglu(d, h, s, use_s=False), "ignores the routing weight s")
    must_fail(ex05.grade_swiglu_backward, lambda d, h, s: _swiglu(d, h, s, derivative="sigmoid"), "not sig")
    must_fail(ex05.grade_swiglu_backward, lambda d, h, s: _swiglu(d, h, s, halves=True), "h is interleaved")
    must_fail(ex05.grade_swiglu_backward, lambda d, h, s: _swiglu(d, h, s, ds_scaled=True), "ds = <dA', a>")
    must_fail(ex05.grade_swiglu_backward, swiglu_unstable, "dh")
    must_fail(ex05.grade_swiglu_backward, lambda d, h, s: _swiglu(d, h, s)[:2], "a tuple of 3")
    must_fail(ex05.grade_swiglu_backward, lambda d, h, s: None, "got None")
    must_fail(ex05.grade_swiglu_backward, unfilled, "not implemented yet")


def test_the_course_layer_passes_its_own_grader():
    """layer.TORCH_OPS.dswiglu computes dA' itself; fed dA' directly through an identity W it
    must match the grader's autograd reference."""
    def through_layer(da_raw, h, s):
        R, n = da_raw.shape
        offs = torch.tensor([R])
        eye = torch.eye(n, dtype=da_raw.dtype)[None]  # W_down [1, n, n]: dA' = dout W^T = dout
        return layer.TORCH_OPS.dswiglu(da_raw, torch.arange(R), eye, h, s, offs)
    ex05.grade_swiglu_backward(through_layer, seed=0)


# --- the softmax over the top k -------------------------------------------------------------------

def softmax_ok(ds, w):
    return w * (ds - (w * ds).sum(-1, keepdim=True))


def test_softmax_grader():
    for seed in SEEDS:
        ex05.grade_topk_softmax_backward(softmax_ok, seed=seed)
    must_fail(ex05.grade_topk_softmax_backward, lambda ds, w: w * ds, "dlogits")
    must_fail(ex05.grade_topk_softmax_backward, lambda ds, w: ds, "dlogits")
    must_fail(ex05.grade_topk_softmax_backward, lambda ds, w: None, "got None")
    must_fail(ex05.grade_topk_softmax_backward, unfilled, "not implemented yet")


# --- weight gradients -----------------------------------------------------------------------------

def wg_ok(dy, x, idx, offs):
    return layer.TORCH_OPS.weight_grad(dy, x, idx, offs)


def wg_dense(dy, x, idx, offs):  # every expert summed over all rows
    total = dy.T @ x[idx]
    return total[None].expand(offs.numel(), -1, -1).clone()


def wg_off_by_one(dy, x, idx, offs):  # offsets read as starts
    out = dy.new_zeros(offs.numel(), dy.shape[1], x.shape[1])
    bounds = [0] + offs.tolist()
    for e in range(offs.numel()):
        lo, hi = bounds[e], bounds[e + 1]
        out[e] = dy[lo:hi + 1].T @ x[idx][lo:hi + 1]
    return out


def test_weight_grad_grader():
    for seed in SEEDS:
        ex05.grade_weight_grad(wg_ok, seed=seed)
    must_fail(ex05.grade_weight_grad, wg_dense, r"dW\[")
    must_fail(ex05.grade_weight_grad, wg_off_by_one, r"dW\[")
    must_fail(ex05.grade_weight_grad, lambda dy, x, idx, offs: wg_ok(dy, x, idx, offs)[:-1], r"expected shape")
    must_fail(ex05.grade_weight_grad, lambda *a: None, "got None")
    must_fail(ex05.grade_weight_grad, unfilled, "not implemented yet")
