"""The MoE layer from the course's kernels (moe_course/layer.py) against chapter 01's float32
layer: same weights, same routing rule. CPU tests check the weight layout it prepares."""

import pytest
import torch

from moe_course import io_overlap as io
from moe_course import layer, moe, variants
from moe_course.checking import check_close


def weights(d, n, E, seed=0, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    return moe.random_weights(d, n, E, dtype=torch.float32, device=device, generator=g)


def test_prepare_interleaves_gate_and_up_and_keeps_down():
    w = weights(64, 32, 3)
    kw = layer.prepare(w)
    assert kw.w_gate_up.shape == (3, 64, 64) and kw.w_down.shape == (3, 32, 64)
    assert kw.w_gate_up.dtype == torch.bfloat16 and kw.w_gate_up.is_contiguous()
    assert torch.equal(kw.w_gate_up[:, 0::2], w.w_gate.transpose(1, 2).bfloat16())
    assert torch.equal(kw.w_gate_up[:, 1::2], w.w_up.transpose(1, 2).bfloat16())
    stacked = torch.cat([w.w_gate.transpose(1, 2), w.w_up.transpose(1, 2)], dim=1).bfloat16()
    assert torch.equal(kw.w_gate_up, io.interleave_gate_up(stacked))  # the same layout, two ways
    assert torch.equal(kw.w_down, w.w_down.bfloat16())


@pytest.mark.gpu
@pytest.mark.parametrize("T,d,n,E,k,skew", [
    (300, 256, 128, 8, 2, 0.0),  # ragged counts, not multiples of 128
    (1000, 512, 256, 16, 4, 3.0),  # heavily skewed: experts with no tokens
    (64, 256, 128, 4, 1, 50.0),  # one expert holds every token
])
def test_layer_matches_the_float32_layer(T, d, n, E, k, skew):
    w = moe.random_weights(d, n, E, dtype=torch.bfloat16, device="cuda",
                           generator=torch.Generator(device="cuda").manual_seed(T))
    # favour low-numbered experts: feature 0 of every token is 1, and its router row a bias
    x = torch.randn(T, d, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)).bfloat16()
    x[:, 0] = 1.0
    w_router = w.w_router.clone()
    w_router[0] += skew * torch.linspace(1, 0, E, device="cuda").bfloat16()
    w = w._replace(w_router=w_router)
    ref = variants.reference_forward(x, w, k)  # float32 experts, the bf16 layer's routing
    y = layer.forward(x, layer.prepare(w), k)
    assert y.shape == (T, d) and y.dtype == torch.bfloat16
    check_close(f"layer T={T} E={E} k={k} skew={skew}", y.float(), ref, rtol=3e-2, atol=3e-2)
    if skew >= 50:
        experts = moe.topk_softmax(moe.router_logits(x, w.w_router), k).experts
        assert torch.all(experts == 0), "the test meant every token to go to expert 0"
