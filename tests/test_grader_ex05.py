"""Exercise 05's grader passes right answers and FAILS known wrong ones (the routing weight
forgotten, sigmoid for silu's derivative, gate and up read as halves, ds scaled by s, a
softmax backward that drops the sum, a ratio of exponentials that overflows, experts mixed up
or left unwritten in torch.empty memory, a whole layer built from a wrong piece, nothing
returned, an unfilled cell), each with a message saying what went wrong; an answer that calls
the course's own backward is refused."""

import nbformat
import pytest
import torch

from moe_course import ROOT, layer
from moe_course.graders import ex05_moe_backward as ex05

from grader_checks import SEEDS, must_fail, must_pass, unfilled


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


def _swiglu_from(sig_of, dsilu_of):
    """The SwiGLU backward with the sigmoid and silu's derivative computed as given."""
    def swiglu(da_raw, h, s):
        g, u = h[:, 0::2], h[:, 1::2]
        sig = sig_of(g)
        a = g * sig * u
        da = da_raw * s[:, None]
        dh = torch.stack((da * u * dsilu_of(g), da * g * sig), dim=-1).reshape(h.shape)
        return dh, s[:, None] * a, (da_raw * a).sum(-1)
    return swiglu


def _hand_sigmoid(g):
    return 1 / (1 + torch.exp(-g))


#: silu's derivative through a ratio or product of exponentials: inf / inf or inf * 0 = NaN once |g| > 709.8
OVERFLOWING = {
    "(1 + e + g e) / (1 + e)^2, e = exp(-g)":
        _swiglu_from(_hand_sigmoid, lambda g: (1 + torch.exp(-g) + g * torch.exp(-g)) / (1 + torch.exp(-g)) ** 2),
    "sig + g exp(-g) sig^2 (inf * 0)":
        _swiglu_from(_hand_sigmoid, lambda g: _hand_sigmoid(g) + g * torch.exp(-g) * _hand_sigmoid(g) ** 2),
    "sig + g exp(-g) / (1 + exp(-g))^2":
        _swiglu_from(_hand_sigmoid, lambda g: _hand_sigmoid(g) + g * torch.exp(-g) / (1 + torch.exp(-g)) ** 2),
    "sigmoid as exp(g) / (1 + exp(g))": _swiglu_from(
        lambda g: torch.exp(g) / (1 + torch.exp(g)),
        lambda g: torch.exp(g) / (1 + torch.exp(g)) * (1 + g / (1 + torch.exp(g)))),
}


def test_swiglu_grader():
    must_pass(ex05.grade_swiglu_backward, _swiglu)
    must_fail(ex05.grade_swiglu_backward, lambda d, h, s: _swiglu(d, h, s, use_s=False), "ignores the routing weight s")
    must_fail(ex05.grade_swiglu_backward, lambda d, h, s: _swiglu(d, h, s, derivative="sigmoid"),
              r"silu'\(g\) is taken as sig\(g\)")
    must_fail(ex05.grade_swiglu_backward, lambda d, h, s: _swiglu(d, h, s, halves=True),
              r"h is read as gate \| up halves; it is interleaved")
    must_fail(ex05.grade_swiglu_backward, lambda d, h, s: _swiglu(d, h, s, ds_scaled=True), "ds = <dA', a>")
    must_fail(ex05.grade_swiglu_backward, lambda d, h, s: _swiglu(d, h, s)[:2], "expected 3 values, got a tuple of 2")
    must_fail(ex05.grade_swiglu_backward, lambda d, h, s: None, "got None")
    must_fail(ex05.grade_swiglu_backward, unfilled, "not implemented yet")


def test_a_hand_written_sigmoid_is_fine_as_the_notebook_says():
    """1 / (1 + exp(-g)) survives any gate (1 / inf = 0), with silu' written from it."""
    must_pass(ex05.grade_swiglu_backward, _swiglu_from(_hand_sigmoid, lambda g: _hand_sigmoid(g) * (
        1 + g * (1 - _hand_sigmoid(g)))))


@pytest.mark.parametrize("form", list(OVERFLOWING))
def test_a_ratio_of_exponentials_fails_naming_the_gate(form):
    must_fail(ex05.grade_swiglu_backward, OVERFLOWING[form],
              r"dh \[gates deep in silu's flat and steep parts.*values are nan \(first in row [08], whose largest gate "
              r"is -?1000\)\. Beyond \|g\| = 709.8, exp\(\|g\|\) is inf")


def swiglu_half_unwritten(da_raw, h, s):  # torch.empty_like, the up half never written
    dh, sa, ds = _swiglu(da_raw, h, s)
    out = torch.empty_like(dh)
    out[:, 0::2] = dh[:, 0::2]
    return out, sa, ds


def test_a_result_left_in_empty_memory_is_not_blamed_on_exp():
    must_fail(ex05.grade_swiglu_backward, swiglu_half_unwritten, r"dh \[one row.*values are nan \(first in row 0, "
              r"whose largest gate is .*\): no overflow at such gates, so part of the result was never written")


def test_every_seed_has_gates_beyond_exps_range():
    for seed in range(20):
        _, _, h, _ = ex05.swiglu_cases(seed)[-1]
        gates = h[:, 0::2]
        assert (gates > 709.8).any() and (gates < -709.8).any() and (gates.abs() <= 1e5).all()


def test_the_course_layer_agrees_with_the_graders_reference():
    """layer.TORCH_OPS.dswiglu computes dA' itself; fed dA' directly through an identity W it
    must match the grader's autograd reference on every case (called directly: through the
    grader it is refused, being the course's own answer)."""
    for seed in SEEDS:
        for _name, da_raw, h, s in ex05.swiglu_cases(seed):
            R, n = da_raw.shape
            eye = torch.eye(n, dtype=da_raw.dtype)[None]  # W_down [1, n, n]: dA' = dout W^T = dout
            got = layer.TORCH_OPS.dswiglu(da_raw, torch.arange(R), eye, h, s, torch.tensor([R]))
            for mine, want in zip(got, ex05.swiglu_reference(da_raw, h, s)):
                torch.testing.assert_close(mine, want, rtol=1e-6, atol=1e-9)


# --- the softmax over the top k -------------------------------------------------------------------

def softmax_ok(ds, w):
    return w * (ds - (w * ds).sum(-1, keepdim=True))


def test_softmax_grader():
    must_pass(ex05.grade_topk_softmax_backward, softmax_ok)
    must_fail(ex05.grade_topk_softmax_backward, lambda ds, w: w * ds, "dlogits")
    must_fail(ex05.grade_topk_softmax_backward, lambda ds, w: ds, "dlogits")
    must_fail(ex05.grade_topk_softmax_backward, lambda ds, w: None, "got None")
    must_fail(ex05.grade_topk_softmax_backward, unfilled, "not implemented yet")


# --- weight gradients -----------------------------------------------------------------------------

def wg_ok(dy, x, idx, offs):
    out = dy.new_zeros(offs.numel(), dy.shape[1], x.shape[1])
    lo = 0
    for e, hi in enumerate(offs.tolist()):
        out[e] = dy[lo:hi].T @ x[idx[lo:hi]]
        lo = hi
    return out


def wg_empty_unwritten(dy, x, idx, offs):  # torch.empty, and experts with no rows skipped
    out = torch.empty(offs.numel(), dy.shape[1], x.shape[1], dtype=dy.dtype)
    lo = 0
    for e, hi in enumerate(offs.tolist()):
        if hi > lo:
            out[e] = dy[lo:hi].T @ x[idx[lo:hi]]
        lo = hi
    return out


def wg_empty_like_unwritten(dy, x, idx, offs):  # the same mistake in other words
    out = dy.new_empty(offs.numel(), dy.shape[1], x.shape[1])
    bounds = torch.cat([offs.new_zeros(1), offs]).tolist()
    for e in range(offs.numel()):
        if bounds[e + 1] > bounds[e]:
            out[e] = torch.einsum("rn,rk->nk", dy[bounds[e]:bounds[e + 1]], x[idx[bounds[e]:bounds[e + 1]]])
    return out


def wg_empty_all_written(dy, x, idx, offs):  # torch.empty is fine when every expert is written
    out = torch.empty(offs.numel(), dy.shape[1], x.shape[1], dtype=dy.dtype)
    lo = 0
    for e, hi in enumerate(offs.tolist()):
        out[e] = dy[lo:hi].T @ x[idx[lo:hi]]  # zero rows give a zero matrix
        lo = hi
    return out


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
    must_pass(ex05.grade_weight_grad, wg_ok)
    must_pass(ex05.grade_weight_grad, wg_empty_all_written)
    for unwritten in (wg_empty_unwritten, wg_empty_like_unwritten):
        must_fail(ex05.grade_weight_grad, unwritten, r"dW\[0\] .*: this expert has no rows and its gradient is NaN: "
                                                     r"it was never written")
    must_fail(ex05.grade_weight_grad, wg_dense, r"dW\[")
    must_fail(ex05.grade_weight_grad, wg_off_by_one, r"dW\[")
    must_fail(ex05.grade_weight_grad, lambda dy, x, idx, offs: wg_ok(dy, x, idx, offs)[:-1], r"expected shape")
    must_fail(ex05.grade_weight_grad, lambda *a: None, "got None")
    must_fail(ex05.grade_weight_grad, unfilled, "not implemented yet")


# --- the whole layer ------------------------------------------------------------------------------

def notebook_layer(swiglu_backward=_swiglu, topk_softmax_backward=softmax_ok, weight_grad=wg_ok):
    """The notebook's own layer_weight_grads (given code, read from the solution notebook), on
    the pieces given here."""
    nb = nbformat.read(ROOT / "solutions" / "05_moe_backward.ipynb", as_version=4)
    source = next(c.source for c in nb.cells if "def layer_weight_grads" in c.source)
    namespace = {"torch": torch, "swiglu_backward": swiglu_backward, "topk_softmax_backward": topk_softmax_backward,
                 "weight_grad": weight_grad}
    exec(source.split("grader.grade_whole_layer")[0], namespace)
    return namespace["layer_weight_grads"]


def test_whole_layer_grader():
    must_pass(ex05.grade_whole_layer, notebook_layer())
    must_fail(ex05.grade_whole_layer, notebook_layer(swiglu_backward=lambda d, h, s: _swiglu(d, h, s, use_s=False)),
              r"gradient of w_gate .*: largest difference from autograd .*it comes from dh of swiglu_backward")
    must_fail(ex05.grade_whole_layer, notebook_layer(swiglu_backward=lambda d, h, s: _swiglu(d, h, s, ds_scaled=True)),
              r"gradient of w_router .*it comes from ds of swiglu_backward and topk_softmax_backward")
    must_fail(ex05.grade_whole_layer, notebook_layer(topk_softmax_backward=lambda ds, w: w * ds),
              r"gradient of w_router")
    must_fail(ex05.grade_whole_layer, notebook_layer(weight_grad=wg_off_by_one), r"gradient of w_gate")
    # an expert with no rows left in torch.empty memory: NaN, and the whole layer says so too
    must_fail(ex05.grade_whole_layer, notebook_layer(weight_grad=wg_empty_unwritten),
              r"gradient of w_gate \(T=33, .*expert 3 gets no tokens.*: largest difference from autograd nan")
    must_fail(ex05.grade_whole_layer, lambda x, w, k, dout: {"w_gate": None}, "expected a dict with the keys")
    must_fail(ex05.grade_whole_layer, notebook_layer(swiglu_backward=unfilled), "the whole layer against autograd: "
                                                                               "not implemented yet")


# --- shortcuts ------------------------------------------------------------------------------------

def test_shortcuts_are_refused():
    must_fail(ex05.grade_swiglu_backward, layer.swiglu_backward,
              "the function given is the course's own moe_course.layer.swiglu_backward")
    must_fail(ex05.grade_swiglu_backward, lambda d, h, s: ex05.swiglu_reference(d, h, s),
              "calls the course's own moe_course.graders.ex05_moe_backward.swiglu_reference")
    must_fail(ex05.grade_topk_softmax_backward, lambda ds, w: ex05.softmax_reference(ds, w.log()),
              "moe_course.graders.ex05_moe_backward.softmax_reference")
    must_fail(ex05.grade_weight_grad, lambda dy, x, idx, offs: layer.TORCH_OPS.weight_grad(dy, x, idx, offs),
              "calls the course's own moe_course.layer._torch_weight_grad")
    must_fail(ex05.grade_weight_grad, lambda dy, x, idx, offs: layer.GROUPED_MM_OPS.weight_grad(dy, x, idx, offs),
              "moe_course.layer._grouped_mm_weight_grad")

    def autograd_through_the_course(x, w, k, dout):
        leaves = type(w)(*(t.clone().requires_grad_() for t in w))
        ex05.moe.moe_forward(x, leaves, k).y.backward(dout)
        return {name: getattr(leaves, name).grad for name in ex05.WEIGHTS}
    must_fail(ex05.grade_whole_layer, autograd_through_the_course,
              "autograd_through_the_course, line .*moe_course.moe.moe_forward")
