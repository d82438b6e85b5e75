"""Chapter 10's kernels: the layer's products on Hugging Face's weight layout, with no copy of
the weights. Each is held bit for bit to the course kernel it varies, run on the interleaved
copy (same sums, same order), and to a float32 reference, at awkward sizes."""

import math

import pytest
import torch

from moe_course import io_overlap as io
from moe_course import launch
from moe_course.checking import check_close

COUNT_CASES = {
    "zeros-and-ragged": [0, 1, 130, 0, 257],
    "one-expert-has-all": [0, 0, 300, 0],
    "single-row": [1],
    "more-tiles-than-sms": [700, 0, 1333, 129, 2000, 65, 900, 1100, 3000, 256, 1, 777] * 3,
}


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
