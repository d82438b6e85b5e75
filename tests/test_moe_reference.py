"""The reference MoE maths (moe_course.moe) against independent computations: plain loops over
tokens, hand-worked examples, and properties that must hold for any input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_course import moe
from moe_course.checking import relative_error


def weights_and_input(T=37, d=16, n=24, E=6, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    return (moe.random_weights(d, n, E, generator=g, dtype=dtype, device=device),
            torch.randn(T, d, generator=g, device=device).to(dtype))


def dense_loop(x, w, weights, experts, keep=None):
    """out[t] = sum over t's experts e (kept ones) of weight * SwiGLU_e(x[t]), one token at a time."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(experts.shape[1]):
            if keep is not None and not keep[t, j]:
                continue
            e = int(experts[t, j])
            h = torch.nn.functional.silu(x[t] @ w.w_gate[e]) * (x[t] @ w.w_up[e])
            out[t] += weights[t, j] * (h @ w.w_down[e])
    return out


# --- the layer against a loop over tokens -------------------------------------------------------

@pytest.mark.parametrize("router", ["topk_softmax", "softmax_topk"])
@pytest.mark.parametrize("k", [1, 2, 6])
def test_layer_equals_a_dense_per_token_loop(router, k):
    w, x = weights_and_input()
    out = moe.moe_forward(x, w, k, router=router)
    weights, experts = moe.TOKEN_CHOICE_ROUTERS[router](moe.router_logits(x, w.w_router), k)
    torch.testing.assert_close(out.y, dense_loop(x, w, weights, experts), rtol=1e-5, atol=1e-5)
    assert out.counts.tolist() == torch.bincount(experts.flatten(), minlength=6).tolist()
    assert out.dropped_fraction == 0.0


def test_layer_with_an_expert_that_gets_no_tokens():
    w, x = weights_and_input(E=5)
    x[:, 0] = 1.0
    w.w_router[0, 2] = -100.0  # expert 2 never wins
    out = moe.moe_forward(x, w, 2)
    assert out.counts[2] == 0
    weights, experts = moe.topk_softmax(moe.router_logits(x, w.w_router), 2)
    torch.testing.assert_close(out.y, dense_loop(x, w, weights, experts), rtol=1e-5, atol=1e-5)


def test_layer_with_capacity_drops_exactly_what_drop_tokens_says():
    w, x = weights_and_input(T=40, E=4)
    w.w_router[:, 0] += 0.5  # a popular expert, so something overflows
    out = moe.moe_forward(x, w, 2, capacity_factor=1.0)
    weights, experts = moe.topk_softmax(moe.router_logits(x, w.w_router), 2)
    cap = moe.drop_tokens(experts, 4, moe.expert_capacity(40, 4, 2, 1.0))
    assert cap.dropped_fraction > 0
    assert out.dropped_fraction == cap.dropped_fraction
    assert out.counts.max() <= cap.capacity
    torch.testing.assert_close(out.y, dense_loop(x, w, weights, experts, cap.keep), rtol=1e-5, atol=1e-5)


def test_expert_choice_layer_equals_a_loop_over_experts():
    w, x = weights_and_input(T=20, E=4)
    out = moe.moe_forward(x, w, 2, router="expert_choice")
    choice = moe.expert_choice(moe.router_logits(x, w.w_router), 10)  # ceil(20 * 2 / 4)
    ref = torch.zeros_like(x)
    for e in range(4):
        for c in range(10):
            t = int(choice.tokens[e, c])
            ref[t] += choice.weights[e, c] * moe.swiglu(x[t:t + 1], w.w_gate[e], w.w_up[e], w.w_down[e])[0]
    torch.testing.assert_close(out.y, ref, rtol=1e-5, atol=1e-5)
    assert out.experts is None and out.counts.tolist() == [10] * 4
    routed = torch.zeros(20, dtype=torch.bool)
    routed[choice.tokens.flatten()] = True
    assert out.dropped_fraction == pytest.approx(1 - routed.float().mean().item())


def test_module_reshapes_and_trains():
    layer = moe.MoELayer(8, 16, 4, 2, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 5, 8)
    y, out = layer(x, return_output=True)
    assert y.shape == x.shape and out.probs.shape == (15, 4)
    torch.testing.assert_close(y.reshape(15, 8), moe.moe_forward(x.reshape(15, 8), layer.weights(), 2).y)
    (y.square().mean() + moe.switch_aux_loss(out.probs, out.experts)).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_noisy_module_uses_noise_only_in_training():
    layer = moe.MoELayer(8, 16, 4, 2, router="noisy_topk", generator=torch.Generator().manual_seed(0))
    x = torch.randn(10, 8)
    layer.eval()
    torch.testing.assert_close(layer(x), moe.moe_forward(x, layer.weights(), 2).y)
    layer.train()
    layer(x).sum().backward()  # the noise scale is learnt: it gets a gradient path
    assert layer.w_noise.grad is not None


# --- routers -------------------------------------------------------------------------------------

def test_topk_softmax_is_softmax_topk_renormalised():
    logits = torch.randn(50, 8)
    a, b = moe.softmax_topk(logits, 3), moe.topk_softmax(logits, 3)
    assert torch.equal(a.experts, b.experts)
    torch.testing.assert_close(b.weights, a.weights / a.weights.sum(-1, keepdim=True))
    torch.testing.assert_close(b.weights.sum(-1), torch.ones(50))
    assert (a.weights.sum(-1) < 1).all()
    # independent: probabilities of the chosen experts, straight from the softmax
    torch.testing.assert_close(a.weights, logits.softmax(-1).gather(1, a.experts))


def test_noisy_topk():
    logits = torch.randn(200, 8)
    zero = moe.noisy_topk(logits, 2, 0.0)
    assert torch.equal(zero.experts, moe.topk_softmax(logits, 2).experts)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, b = moe.noisy_topk(logits, 2, 1.0, generator=g1), moe.noisy_topk(logits, 2, 1.0, generator=g2)
    assert torch.equal(a.experts, b.experts)  # reproducible with a generator
    assert not torch.equal(a.experts, zero.experts)  # and the noise does change the choice
    noise = torch.randn(logits.shape, generator=torch.Generator().manual_seed(5))
    top, idx = (logits + noise).topk(2, dim=-1)
    assert torch.equal(a.experts, idx)
    torch.testing.assert_close(a.weights, top.softmax(-1))


def test_expert_choice_picks_each_experts_best_tokens():
    logits = torch.randn(30, 5)
    probs = logits.softmax(-1)
    ch = moe.expert_choice(logits, 7)
    assert ch.tokens.shape == (5, 7)
    for e in range(5):
        best = sorted(range(30), key=lambda t: -probs[t, e].item())[:7]
        assert ch.tokens[e].tolist() == best
        torch.testing.assert_close(ch.weights[e], probs[best, e])


# --- dispatch ------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 40), E=st.integers(1, 9), data=st.data())
def test_dispatch_is_a_stable_sort_and_inverse_round_trips(T, E, data):
    K = data.draw(st.integers(1, E))
    seed = data.draw(st.integers(0, 2**16))
    experts = torch.randint(E, (T, K), generator=torch.Generator().manual_seed(seed))
    d = moe.dispatch(experts, E)
    flat = experts.flatten()
    # by hand: pairs listed expert by expert, in pair order within an expert
    expected = [i for e in range(E) for i in range(T * K) if flat[i] == e]
    assert d.order.tolist() == expected
    assert torch.equal(d.order[d.inverse], torch.arange(T * K))
    assert torch.equal(d.inverse[d.order], torch.arange(T * K))
    assert torch.equal(d.token_of, d.order // K)
    assert d.counts.tolist() == [int((flat == e).sum()) for e in range(E)]
    assert d.offsets.tolist() == [sum(d.counts.tolist()[:e]) for e in range(E + 1)]
    assert d.kept == T * K
    x = torch.randn(T, 3)
    xs = moe.permute(x, d)
    for e in range(E):  # each expert's block holds exactly its tokens
        lo, hi = d.offsets[e], d.offsets[e + 1]
        assert torch.equal(xs[lo:hi], x[[i // K for i in expected if flat[i] == e]])
    torch.testing.assert_close(xs[d.inverse], x.repeat_interleave(K, 0))


def test_dispatch_with_dropped_pairs_puts_them_last():
    experts = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    keep = torch.tensor([[True, True], [True, True], [False, False], [True, False]])
    d = moe.dispatch(experts, 3, keep)
    assert d.counts.tolist() == [2, 2, 1] and d.offsets.tolist() == [0, 2, 4, 5] and d.kept == 5
    assert d.order.tolist() == [0, 2, 1, 6, 3, 4, 5, 7]  # kept pairs by expert, then the dropped
    assert torch.equal(d.order[d.inverse], torch.arange(8))


def test_combine_equals_the_scatter_add_combine():
    experts = torch.randint(5, (20, 3), generator=torch.Generator().manual_seed(1))
    d = moe.dispatch(experts, 5)
    y = torch.randn(60, 4)
    weights = torch.rand(20, 3)
    by_gather = moe.combine(y, d, weights)
    by_scatter = moe.combine_rows(y, d.token_of, weights.flatten()[d.order], 20)
    torch.testing.assert_close(by_gather, by_scatter)
    # and by hand, for one token
    t = 7
    want = sum(weights[t, j] * y[d.inverse[t * 3 + j]] for j in range(3))
    torch.testing.assert_close(by_gather[t], want)


# --- load balancing ------------------------------------------------------------------------------

def test_drop_tokens_by_hand():
    # Queue: first choices of tokens 0..3 (experts 0, 0, 0, 1), then second choices (1, 2, 1, 0).
    # Capacity 2. Expert 0 serves t0, t1; t2 (first choice) and t3 (second) overflow.
    # Expert 1 serves t3 (first choice), then t0; t2's second choice overflows. Expert 2: t1.
    experts = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    cap = moe.drop_tokens(experts, 3, 2)
    assert cap.keep.tolist() == [[True, True], [True, True], [False, False], [True, False]]
    assert cap.position.tolist() == [[0, 1], [1, 0], [2, 2], [0, 3]]
    assert cap.dropped_fraction == 3 / 8
    assert moe.drop_tokens(experts, 3, 4).dropped_fraction == 0.0
    assert moe.drop_tokens(experts, 3, 0).keep.sum() == 0


@pytest.mark.parametrize("T, E, k, cf, want", [
    (64, 8, 2, 1.0, 16), (50, 8, 2, 1.25, 16), (100, 10, 1, 1.1, 11), (7, 4, 1, 2.0, 4),
    (10, 4, 2, 0.5, 3), (3, 8, 1, 1.0, 1), (1000, 64, 8, 1.25, 157)])
def test_expert_capacity_by_hand(T, E, k, cf, want):
    assert moe.expert_capacity(T, E, k, cf) == want


def test_aux_losses_by_hand():
    T, E = 12, 4
    uniform = torch.full((T, E), 1 / E)
    balanced = torch.arange(T * 2).remainder(E).view(T, 2)  # every expert gets T*2/E pairs
    assert moe.switch_aux_loss(uniform, balanced).item() == pytest.approx(1.0)
    collapsed = torch.zeros(T, E)
    collapsed[:, 0] = 1.0
    assert moe.switch_aux_loss(collapsed, torch.zeros(T, 1, dtype=torch.long)).item() == pytest.approx(E)
    # a small case worked out: probs means P = (0.5, 0.3, 0.2, 0); pairs f = (3/6, 2/6, 1/6, 0)
    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0]] * 3)
    experts = torch.tensor([[0, 1], [0, 2], [0, 1]])
    assert moe.switch_aux_loss(probs, experts).item() == pytest.approx(4 * (0.5 * 3 / 6 + 0.3 * 2 / 6 + 0.2 / 6))
    # GShard counts first choices only: f = (1, 0, 0, 0)
    assert moe.gshard_aux_loss(probs, experts).item() == pytest.approx(4 * 0.5)
    assert moe.gshard_aux_loss(probs, experts[:, :1]).item() == moe.switch_aux_loss(probs, experts[:, :1]).item()


def test_aux_loss_gradient_flows_through_the_mean_probabilities_only():
    probs = torch.rand(10, 5).softmax(-1).requires_grad_()
    experts = torch.randint(5, (10, 2), generator=torch.Generator().manual_seed(0))
    moe.switch_aux_loss(probs, experts).backward()
    f = torch.bincount(experts.flatten(), minlength=5) / 20
    torch.testing.assert_close(probs.grad, (5 * f / 10).expand(10, 5))


def test_activation_bytes_matches_what_autograd_saves():
    T, d, n, E, K = 64, 16, 24, 8, 2
    w, x = weights_and_input(T, d, n, E)
    w = moe.MoEWeights(*(t.requires_grad_() for t in w))
    inputs = {t.untyped_storage().data_ptr() for t in (*w, x)}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in inputs:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = moe.moe_forward(x, w, K).y
    measured = sum(saved.values()) + y.nbytes
    counted = sum(moe.activation_bytes((T, d, n, E, K), dtype_bytes=4).values())
    assert abs(measured - counted) / counted < 0.1, (measured, counted)


# --- bad input gets a clear error ----------------------------------------------------------------

def test_bad_input_is_refused_with_a_clear_message():
    w, x = weights_and_input(E=4)
    logits = torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"between 1 and the number of experts \(4\), got 5"):
        moe.topk_softmax(logits, 5)
    with pytest.raises(ValueError, match="got 0"):
        moe.softmax_topk(logits, 0)
    with pytest.raises(ValueError, match="must be an int"):
        moe.topk_softmax(logits, 2.0)
    with pytest.raises(ValueError, match=r"logits must be shape \(T, E\)"):
        moe.topk_softmax(torch.randn(5), 1)
    with pytest.raises(ValueError, match="x has width d=15 but w_router expects d=16"):
        moe.router_logits(torch.randn(3, 15), w.w_router)
    with pytest.raises(ValueError, match="experts must index the 4 experts: values 0..3; got 0..4"):
        moe.dispatch(torch.tensor([[0, 4]]), 4)
    with pytest.raises(ValueError, match="experts must index the 4 experts: values 0..3; got -1..0"):
        moe.dispatch(torch.tensor([[0, -1]]), 4)
    with pytest.raises(ValueError, match="integer expert ids"):
        moe.dispatch(torch.tensor([[0.0, 1.0]]), 4)
    with pytest.raises(ValueError, match="keep must be a bool tensor"):
        moe.dispatch(torch.tensor([[0, 1]]), 4, keep=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"w_down must have shape \(E, n, d\)"):
        moe.experts_forward(torch.randn(4, 16), torch.tensor([0, 1, 2, 3, 4]), w.w_gate, w.w_up,
                            w.w_down.transpose(1, 2))
    with pytest.raises(ValueError, match=r"offsets must be the E\+1 boundaries .* the last == the row count 4; got \[0, 1, 2, 3, 3\]"):
        moe.experts_forward(torch.randn(4, 16), torch.tensor([0, 1, 2, 3, 3]), w.w_gate, w.w_up, w.w_down)
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        moe.expert_capacity(10, 4, 1, 0.0)
    with pytest.raises(ValueError, match="capacity .* between 1 and the number of tokens"):
        moe.expert_choice(logits, 6)
    with pytest.raises(ValueError, match="unknown router 'top1'"):
        moe.moe_forward(x, w, 1, router="top1")
    with pytest.raises(ValueError, match="probs has 5 tokens but experts has 3"):
        moe.switch_aux_loss(torch.rand(5, 4), torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"between 1 and the number of experts \(4\), got 8"):
        moe.MoELayer(8, 8, 4, 8)


# --- on a GPU ------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_the_steps_on_the_gpu_match_the_cpu():
    """Routing is taken from the CPU, so bf16 rounding cannot change which experts are chosen."""
    assert moe.device() == "cuda"
    w, x = weights_and_input(T=512, d=256, n=384, E=16)
    weights, experts = moe.topk_softmax(moe.router_logits(x, w.w_router), 4)
    d = moe.dispatch(experts, 16)
    want = moe.combine(moe.experts_forward(moe.permute(x, d), d.offsets, w.w_gate, w.w_up, w.w_down), d, weights)
    dg = moe.dispatch(experts.cuda(), 16)
    for name in ("order", "inverse", "token_of", "counts", "offsets"):
        assert torch.equal(getattr(dg, name).cpu(), getattr(d, name)), name
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        wg = moe.MoEWeights(*(t.cuda().to(dtype) for t in w))
        xs = moe.permute(x.cuda().to(dtype), dg)
        got = moe.combine(moe.experts_forward(xs, dg.offsets, wg.w_gate, wg.w_up, wg.w_down), dg, weights.cuda())
        assert got.dtype == dtype and got.is_cuda
        assert relative_error(got, want) < tol, (dtype, relative_error(got, want))
    # the whole layer in fp32 on the GPU (routing computed there too)
    wg = moe.MoEWeights(*(t.cuda() for t in w))
    assert relative_error(moe.moe_forward(x.cuda(), wg, 4).y, moe.moe_forward(x, w, 4).y) < 1e-3
