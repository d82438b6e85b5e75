"""Chapter 06's trainable layer (moe_course/layer.py: MoEFunction, CourseMoE): its backward
against autograd through chapter 01's layer, in float64 on the CPU, at awkward sizes; what its
forward keeps for the backward (X, H and the routing only); and, on a Hopper GPU, the kernels'
forward and backward against the torch implementation of the same maths."""

import pytest
import torch

from moe_course import layer, moe, layer_measurements

CASES = {  # (T, d, n, E, k, router bias towards expert 0)
    "ragged": (50, 16, 8, 5, 2, 0.0),
    "k=1": (40, 16, 8, 4, 1, 0.0),
    "experts-with-no-tokens": (6, 16, 8, 16, 2, 0.0),
    "one-expert-takes-all": (30, 16, 8, 4, 1, 100.0),
}


def reference_and_ours(T, d, n, E, k, bias, ops=layer.TORCH_OPS, seed=0):
    return layer_measurements.float64_gradients(T, d, n, E, k, router_bias=bias, seed=seed, ops=ops)


max_rel_errors = layer_measurements.max_rel_errors


@pytest.mark.parametrize("case", list(CASES))
def test_backward_matches_autograd_in_float64(case):
    errors = max_rel_errors(*reference_and_ours(*CASES[case]))
    # expert weights: exact up to float64 rounding; x and the router go through the router's
    # float32 softmax (moe.topk_softmax), as in the reference
    assert max(errors["w_gate"], errors["w_up"], errors["w_down"]) < 1e-12, errors
    assert max(errors["x"], errors["w_router"]) < 1e-5, errors


def test_a_wrong_backward_fails_the_check():
    broken = layer.TORCH_OPS._replace(
        weight_grad=lambda dy, x, idx, offs: layer.TORCH_OPS.weight_grad(dy, x, idx, offs) * 0.99)
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
    # x, h; the top-k weights, experts and each pair's sorted row; the sort order, each row's token; offsets
    assert shapes == sorted([(T, d), (R, 2 * n), (T, k), (T, k), (T, k), (R,), (R,), (E,)]), shapes
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
@pytest.mark.parametrize("T,d,n,E,k,bias", [
    (1000, 256, 256, 8, 2, 0.0),  # ragged counts
    (777, 512, 512, 16, 4, 0.0),  # two N-tiles of dA' per row: ds in two shares
    (300, 256, 256, 64, 2, 0.0),  # experts with no tokens
    (200, 256, 256, 4, 1, 100.0),  # one expert takes all
])
def test_kernels_match_the_torch_maths_on_the_gpu(T, d, n, E, k, bias):
    """Output and all five gradients, kernels in bf16 against the same maths in float32, with
    router logits exact in both (layer_measurements.integer_router_inputs), so both pick the same experts."""
    x, w_router, w_gate_up, w_down, grad_out = layer_measurements.integer_router_inputs(T, d, n, E, bias, seed=T)
    assert layer.kernels_unavailable(x, d, n) is None
    for label, (a, b) in layer_measurements.kernels_and_torch(x, w_router, w_gate_up, w_down, grad_out, k).items():
        assert torch.isfinite(a).all(), label
        if b.norm() == 0:  # k = 1: the one weight is always 1, so the router gets no gradient
            assert a.norm() == 0, label
            continue
        err = float((a - b).norm() / b.norm())
        assert err < 2e-2, (label, err)
    if bias:
        assert torch.all(layer.route(x, w_router, k).experts == 0), "meant: one expert takes every token"


@pytest.mark.gpu
@pytest.mark.parametrize("routing", ["nearest", "up", "down"])
def test_kernels_with_token_rounding_match_the_torch_maths_on_the_gpu(routing):
    """The kernels take any routing (rows per expert a multiple of the tile here, a token with
    any number of rows); the combine and the router's backward are torch's."""
    T, d, n, E, k = 1000, 256, 256, 8, 2
    x, w_router, w_gate_up, w_down, grad_out = layer_measurements.integer_router_inputs(T, d, n, E, seed=7)
    for label, (a, b) in layer_measurements.kernels_and_torch(x, w_router, w_gate_up, w_down, grad_out, k, routing, 64).items():
        assert torch.isfinite(a).all(), label
        assert float((a - b).norm() / b.norm()) < 2e-2, (routing, label)


def kernels_step(inputs, k):
    """One forward + backward of the layer on the kernels: the output and the four gradients."""
    return layer_measurements.layer_outputs(inputs, k, layer.KERNEL_OPS)


@pytest.mark.gpu
def test_the_kernels_run_on_torchs_current_stream():
    """Under ``with torch.cuda.stream(s)``, the course's kernels must wait for the torch work
    queued before them on s: here the input is written on s only after a long sleep, so kernels
    launched on any other stream would read it before it is there."""
    inputs = layer_measurements.integer_router_inputs(512, 256, 256, 8, seed=3)
    want = kernels_step(inputs, 2)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        late = torch.zeros_like(inputs[0])
        torch.cuda._sleep(500_000_000)  # about 0.3 s of GPU clock cycles on this stream alone
        late.copy_(inputs[0])
        got = kernels_step((late, *inputs[1:]), 2)
    torch.cuda.current_stream().wait_stream(side)
    for name, a, b in zip(("out", "x", "w_router", "w_gate_up", "w_down"), got, want):
        assert torch.equal(a, b), f"{name} differs when the layer runs on a side stream"


@pytest.mark.gpu
def test_forward_and_backward_replay_in_a_cuda_graph():
    """Every launch on torch's stream and no host synchronisation anywhere: the whole forward and
    backward can be captured once in a CUDA graph (layer_measurements.graphed_step) and replayed on new
    inputs, with the results of an eager run on those inputs."""
    T, d, n, E, k = 512, 256, 256, 8, 2
    static = [t.clone() for t in layer_measurements.integer_router_inputs(T, d, n, E, seed=1)]
    leaves = [t.requires_grad_() for t in static[:4]]
    c = layer_measurements.Contender("course", leaves, lambda: layer.MoEFunction.apply(*leaves, k, layer.KERNEL_OPS))
    graph, out = layer_measurements.graphed_step(c, static[4])
    fresh = layer_measurements.integer_router_inputs(T, d, n, E, seed=2)
    with torch.no_grad():
        for buffer, value in zip(static, fresh):
            buffer.copy_(value)
    graph.replay()
    want = kernels_step(fresh, k)
    for name, a, b in zip(("out", "x", "w_router", "w_gate_up", "w_down"), [out] + [t.grad for t in leaves], want):
        assert torch.equal(a, b), f"{name}: the graph's replay differs from an eager run on the same inputs"


def test_a_second_backward_through_one_forward_is_refused():
    """The backward frees H after its one use; a second pass (retain_graph=True) must say so, not
    read freed memory."""
    T, d, n, E, k = 64, 48, 16, 8, 2
    params = [torch.nn.Parameter(t) for t in layer.prepare(moe.random_weights(d, n, E), dtype=None)]
    out = layer.MoEFunction.apply(torch.randn(T, d, requires_grad=True), *params, k, layer.TORCH_OPS)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.sum().backward()


ROUNDING_CASES = {  # (T, d, n, E, k, router bias, tile): counts of 15-25 rows per expert, tiles of 8
    "nearest": (50, 16, 8, 5, 2, 0.0, 8),
    "up": (50, 16, 8, 5, 2, 0.0, 8),
    "down": (50, 16, 8, 5, 2, 0.0, 8),
    "down, one expert takes all": (30, 16, 8, 4, 1, 100.0, 8),
}


@pytest.mark.parametrize("case", list(ROUNDING_CASES))
def test_token_rounding_backward_matches_autograd_in_float64(case):
    """The layer with chapter 04's token rounding: a token has any number of rows, each weighted
    by the router's probability of the pair; gradients against autograd through chapter 04's
    reference layer on the same rounded routing."""
    T, d, n, E, k, bias, tile = ROUNDING_CASES[case]
    method = case.split(",")[0]
    errors = max_rel_errors(*layer_measurements.float64_gradients(T, d, n, E, k, router_bias=bias, routing=method, tile=tile))
    assert max(errors["w_gate"], errors["w_up"], errors["w_down"]) < 1e-12, errors
    assert max(errors["x"], errors["w_router"]) < 1e-5, errors


def test_the_rounding_cases_change_the_routing():
    """Else the test above would only check top-K again: here experts gain and lose rows."""
    for case, (T, d, _n, E, k, bias, tile) in ROUNDING_CASES.items():
        x, w_router = torch.randn(T, d), torch.randn(d, E)
        x[:, 0] = 1.0
        w_router[0] += bias * torch.linspace(1, 0, E)
        r = layer.route(x, w_router, k, case.split(",")[0], tile)
        counts = torch.diff(r.offs, prepend=r.offs.new_zeros(1))
        assert torch.all(counts % tile == 0) or case.startswith("down"), (case, counts)
        assert r.gather_idx.numel() != T * k or case == "down, one expert takes all", case


def test_a_wrong_rounding_router_gradient_fails_the_check(monkeypatch):
    """The router's part of the rounding backward is checked, not only the experts': drop the
    softmax's correction term and the router's gradient must disagree."""
    real = torch.Tensor.sum

    def no_correction(t, *args, **kwargs):  # (p * dprobs).sum(-1, keepdim=True) -> 0
        out = real(t, *args, **kwargs)
        return out * 0 if kwargs.get("keepdim") else out

    monkeypatch.setattr(torch.Tensor, "sum", no_correction)
    errors = max_rel_errors(*layer_measurements.float64_gradients(50, 16, 8, 5, 2, routing="nearest", tile=8))
    monkeypatch.undo()
    assert errors["w_router"] > 1e-3, errors


def test_course_moe_refuses_an_unknown_routing():
    with pytest.raises(ValueError, match="unknown routing 'padded'; choose one of: top-K, nearest"):
        layer.CourseMoE(32, 16, 4, 2, routing="padded")
