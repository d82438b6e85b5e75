"""Chapter 06's trainable layer (moe_course/layer.py: MoEFunction, CourseMoE): its backward
against autograd through chapter 01's layer, in float64 on the CPU, at awkward sizes; what its
forward keeps for the backward (X, H and the routing only); and, on a Hopper GPU, the kernels'
forward and backward against the torch implementation of the same maths."""

import pytest
import torch

from moe_course import layer, moe

CASES = {  # (T, d, n, E, k, router bias towards expert 0)
    "ragged": (50, 16, 8, 5, 2, 0.0),
    "k=1": (40, 16, 8, 4, 1, 0.0),
    "experts-with-no-tokens": (6, 16, 8, 16, 2, 0.0),
    "one-expert-takes-all": (30, 16, 8, 4, 1, 100.0),
}


def reference_and_ours(T, d, n, E, k, bias, ops=layer.TORCH_OPS, seed=0):
    """Gradients of <g, out> with respect to x and every weight, by autograd through
    moe.moe_forward (reference) and by MoEFunction (ours), in float64; ours mapped back to
    chapter 01's layouts."""
    g = torch.Generator().manual_seed(seed)
    w = moe.random_weights(d, n, E, dtype=torch.float64, generator=g)
    x = torch.randn(T, d, dtype=torch.float64, generator=g)
    x[:, 0] = 1.0
    w.w_router[0] += bias * torch.linspace(1, 0, E, dtype=torch.float64)
    grad_out = torch.randn(T, d, dtype=torch.float64, generator=g)

    ref = [t.clone().requires_grad_() for t in (x, *w)]
    moe.moe_forward(ref[0], moe.MoEWeights(*ref[1:]), k).y.backward(grad_out)
    kw = layer.prepare(w, dtype=None)
    ours = [t.clone().requires_grad_() for t in (x, *kw)]
    out = layer.MoEFunction.apply(*ours, k, ops)
    out.backward(grad_out)
    dx, dr, dgu, dd = (t.grad for t in ours)
    mine = {"x": dx, "w_router": dr, "w_gate": dgu[:, 0::2].transpose(1, 2), "w_up": dgu[:, 1::2].transpose(1, 2),
            "w_down": dd.transpose(1, 2)}
    theirs = dict(zip(["x", "w_router", "w_gate", "w_up", "w_down"], (t.grad for t in ref)))
    return mine, theirs


def max_rel_errors(mine, theirs):
    return {k: float((mine[k] - theirs[k]).abs().max() / theirs[k].abs().max().clamp_min(1e-30)) for k in mine}


@pytest.mark.parametrize("case", list(CASES))
def test_backward_matches_autograd_in_float64(case):
    errors = max_rel_errors(*reference_and_ours(*CASES[case]))
    # expert weights: exact up to float64 rounding; x and the router go through the router's
    # float32 softmax (moe.topk_softmax), as in the reference
    assert max(errors["w_gate"], errors["w_up"], errors["w_down"]) < 1e-12, errors
    assert max(errors["x"], errors["w_router"]) < 1e-5, errors


def test_a_wrong_backward_fails_the_check():
    broken = layer.Ops(grouped=layer.TORCH_OPS.grouped, gathered=layer.TORCH_OPS.gathered, up=layer.TORCH_OPS.up,
                       weight_grad=lambda dy, x, offs: layer.TORCH_OPS.weight_grad(dy, x, offs) * 0.99)
    errors = max_rel_errors(*reference_and_ours(*CASES["ragged"], ops=broken))
    assert errors["w_gate"] > 1e-3 and errors["w_down"] > 1e-3


def test_the_forward_keeps_x_h_and_the_routing_only():
    T, d, n, E, k = 64, 48, 16, 8, 2  # d, n and 2n all different, so shapes tell tensors apart
    w = layer.prepare(moe.random_weights(d, n, E), dtype=None)
    params = [torch.nn.Parameter(t) for t in w]
    x = torch.randn(T, d, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer.MoEFunction.apply(x, *params, k, layer.TORCH_OPS)
    activations = [t for t in saved if not any(t is p for p in params)]
    R = T * k
    shapes = sorted(tuple(t.shape) for t in activations)
    assert shapes == sorted([(T, d), (R, 2 * n), (T, k), (T, k), (R,), (R,), (R,), (E,)]), shapes
    assert not any(t.shape in {(R, d), (R, n)} for t in activations)  # no gathered X, no A, no expert outputs
    out.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in params)


def test_course_moe_trains_on_the_cpu():
    torch.manual_seed(0)
    layer_ = layer.CourseMoE(32, 16, 4, 2, dtype=torch.float32)
    target = layer.CourseMoE(32, 16, 4, 2, dtype=torch.float32)
    x = torch.randn(256, 32)
    with torch.no_grad():
        y = target(x)
    opt = torch.optim.Adam(layer_.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(layer_(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert layer_.backend == "torch" and layer_.why_torch
    assert losses[-1] < 0.5 * losses[0], losses[::10]


@pytest.mark.gpu
@pytest.mark.parametrize("T,E,k", [(1000, 8, 2), (777, 16, 4)])
def test_kernels_match_the_torch_maths_on_the_gpu(T, E, k):
    d, n = 256, 256
    torch.manual_seed(T)
    w = [t.cuda() for t in layer.prepare(moe.random_weights(d, n, E), dtype=torch.bfloat16)]
    w[0] = w[0].bfloat16()
    x = torch.randn(T, d, device="cuda").bfloat16()
    grad_out = torch.randn(T, d, device="cuda").bfloat16()
    assert layer.kernels_unavailable(x, d, n) is None
    results = {}
    for name, ops in (("kernels", layer.KERNEL_OPS), ("torch", layer.TORCH_OPS)):
        ins = [t.clone().float().requires_grad_() if name == "torch" else t.clone().requires_grad_() for t in (x, *w)]
        out = layer.MoEFunction.apply(*ins, k, ops)
        out.backward(grad_out.to(out.dtype))
        results[name] = [out.detach().float()] + [t.grad.float() for t in ins]
    for label, a, b in zip(["out", "x", "w_router", "w_gate_up", "w_down"], results["kernels"], results["torch"]):
        err = float((a - b).norm() / b.norm())
        assert err < 2e-2, (label, err)
