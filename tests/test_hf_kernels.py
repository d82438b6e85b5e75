"""Chapter 10's kernels: the layer's products on Hugging Face's weight layout, with no copy of
the weights. Each is held bit for bit to the course kernel it varies, run on the interleaved
copy (same sums, same order), and to a float32 reference, at awkward sizes."""

import math

import pytest
import torch
from kernel_checks import COUNT_CASES, LAYER_COUNT_CASES, SCHEDULES, poison, randn, rel, routing

from moe_course import io_overlap as io
from moe_course import launch, layer
from moe_course.checking import check_close


def hf_problem(counts, hidden, inter, tokens, seed):
    """Tokens x [tokens, hidden], HF's gate_up_proj [E, 2 inter, hidden] (gate rows, then up
    rows) and a gather index that repeats tokens in a random order."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    counts = torch.tensor(counts)
    x = torch.randn(tokens, hidden, device="cuda", generator=g).bfloat16()
    gate_up = (torch.randn(len(counts), 2 * inter, hidden, device="cuda", generator=g) / math.sqrt(hidden)).bfloat16()
    idx = torch.randint(0, tokens, (int(counts.sum()),), device="cuda", generator=g, dtype=torch.int32)
    offs = torch.cumsum(counts, 0).to(device="cuda", dtype=torch.int32)
    return x, idx, gate_up, offs


def swiglu_of_halves(x, idx, gate_up, offs):
    """float32 reference: silu(x W_gate^T) * (x W_up^T), each row by its expert's halves."""
    inter = gate_up.shape[1] // 2
    h = io.gather_reference(x, idx, gate_up, offs)
    return torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(COUNT_CASES))
@pytest.mark.parametrize("hidden,inter", [(192, 256), (512, 384)])
def test_hf_up_projection_is_03_4_on_the_interleaved_copy(case, hidden, inter):
    x, idx, gate_up, offs = hf_problem(COUNT_CASES[case], hidden, inter, tokens=611, seed=hash((case, inter)) % 2**31)
    a, h = launch.hf_swiglu_grouped_gemm(x, idx, gate_up, offs)
    a_copy, h_copy = launch.swiglu_grouped_gemm(x, idx, io.interleave_gate_up(gate_up), offs)
    assert torch.equal(h, h_copy) and torch.equal(a, a_copy), "the 4-D map's tile differs from the interleaved copy's"
    check_close(f"hf up {case}", a.float(), swiglu_of_halves(x, idx, gate_up, offs), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_hf_up_projection_sees_an_update_of_the_weights():
    """No copy and no cache of the weights: an optimizer's in-place step is read at the next call."""
    x, idx, gate_up, offs = hf_problem([40, 0, 300, 17], 128, 256, tokens=200, seed=5)
    before, _ = launch.hf_swiglu_grouped_gemm(x, idx, gate_up, offs, store_h=False)
    with torch.no_grad():
        gate_up.mul_(-0.5)
    after, _ = launch.hf_swiglu_grouped_gemm(x, idx, gate_up, offs, store_h=False)
    assert not torch.equal(before, after)
    check_close("after the update", after.float(), swiglu_of_halves(x, idx, gate_up, offs), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_hf_up_projection_refuses_an_intermediate_size_off_the_tile():
    x, idx, gate_up, offs = hf_problem([10, 20], 128, 200, tokens=50, seed=1)  # 2I = 400, not a multiple of 256
    with pytest.raises(ValueError, match="400"):
        launch.hf_swiglu_grouped_gemm(x, idx, gate_up, offs)


# --------------------------------------------------------------------------------------------
# The backward: 10_2 to 10_5, each against chapter 06's float32 maths on the course's layout
# (converted from HF's in float32 here, never by the kernels), outputs poisoned first.


@pytest.mark.gpu
@pytest.mark.parametrize("pingpong", SCHEDULES)
@pytest.mark.parametrize("case", list(LAYER_COUNT_CASES))
@pytest.mark.parametrize("hidden,inter", [(256, 256), (512, 512)])  # inter = 512: ds in two shares
def test_hf_dswiglu_reads_down_proj_as_it_is(case, hidden, inter, pingpong):
    counts, T = LAYER_COUNT_CASES[case], 333
    step = launch.pingpong_step(launch.HF_DSWIGLU) if pingpong else launch.HF_DSWIGLU
    offs, idx = routing(counts, T, seed=1)
    R, E = sum(counts), len(counts)
    dout, down_proj, h = randn(T, hidden), randn(E, hidden, inter, scale=hidden ** -0.5), randn(R, 2 * inter, scale=2.0)
    s = torch.rand(R, device="cuda")
    poison(((R, 2 * inter), torch.bfloat16), ((R, inter), torch.bfloat16), ((inter // step.block_n, R), torch.float32))
    got = launch.hf_dswiglu_grouped_gemm(dout, idx, down_proj, h, s, offs, step=step)
    w_down = down_proj.float().transpose(1, 2)  # the course's [E, n, d]
    want = layer.TORCH_OPS.dswiglu(dout.float(), idx, w_down, h.float(), s, offs)
    for name, g, w in zip(("dh", "s*a", "ds"), got, want):
        assert rel(g, w) < 1e-2, name


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(LAYER_COUNT_CASES))
@pytest.mark.parametrize("hidden,inter", [(256, 128), (512, 384)])
def test_hf_transposed_b_reads_gate_up_in_dh_order(case, hidden, inter):
    counts = LAYER_COUNT_CASES[case]
    offs, _ = routing(counts, 1, seed=0)
    R, E = sum(counts), len(counts)
    dh, gate_up = randn(R, 2 * inter), randn(E, 2 * inter, hidden, scale=(2 * inter) ** -0.5)
    poison(((R, hidden), torch.bfloat16))
    got = launch.hf_transposed_b_grouped_gemm(dh, gate_up, offs)
    w_interleaved = io.interleave_gate_up(gate_up.float())  # K in dh's order: [E, 2I, H] = [E, K, N]
    assert rel(got, layer.TORCH_OPS.times_w(dh.float(), w_interleaved, offs)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(LAYER_COUNT_CASES))
@pytest.mark.parametrize("inter,hidden", [(128, 128), (256, 384)])
def test_hf_weight_grad_is_stored_in_gate_up_order(case, inter, hidden):
    counts, T = LAYER_COUNT_CASES[case], 333
    offs, idx = routing(counts, T, seed=2)
    R, E = sum(counts), len(counts)
    dh, x = randn(R, 2 * inter), randn(T, hidden)
    poison(((E, 2 * inter, hidden), torch.bfloat16))
    got = launch.hf_weight_grad_gate_up(dh, x, idx, offs)
    interleaved = layer.TORCH_OPS.weight_grad(dh.float(), x.float(), idx, offs)  # rows in dh's order
    want = torch.cat((interleaved[:, 0::2], interleaved[:, 1::2]), dim=1)  # HF: gate rows, then up rows
    assert got.shape == (E, 2 * inter, hidden) and rel(got, want) < 1e-2
    for e, c in enumerate(counts):
        if c == 0:
            assert torch.all(got[e] == 0), f"expert {e} has no rows: its gradient must be zero"


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(LAYER_COUNT_CASES))
@pytest.mark.parametrize("inter,hidden", [(256, 128), (512, 384)])
def test_hf_down_weight_grad_is_stored_in_down_projs_layout(case, inter, hidden):
    """10_5: down_proj's gradient (E, H, I) = dout_e^T (s A)_e with dout gathered, the tile left as
    accumulated: against the float32 product, transposed here, never by the kernel."""
    counts, T = LAYER_COUNT_CASES[case], 333
    offs, idx = routing(counts, T, seed=3)
    R, E = sum(counts), len(counts)
    sa, dout = randn(R, inter), randn(T, hidden)
    poison(((E, hidden, inter), torch.bfloat16))
    got = launch.hf_weight_grad_down(sa, dout, idx, offs)
    course = layer.TORCH_OPS.weight_grad(sa.float(), dout.float(), idx, offs)  # (E, I, H): the course's layout
    assert got.shape == (E, hidden, inter) and rel(got, course.transpose(1, 2)) < 1e-2
    for e, c in enumerate(counts):
        if c == 0:
            assert torch.all(got[e] == 0), f"expert {e} has no rows: its gradient must be zero"
