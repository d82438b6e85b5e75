"""moe_course.vllm_moe, vLLM's fused MoE as chapter 09's serving contender: the torch stand-in of
vLLM's pair alignment against vLLM's documented example and against its contract at awkward
routings (idle experts, every pair on one expert, counts on and off the block), a clear reason
where it cannot run; on a GPU where vLLM's files are present, its kernel and layer against
float32. The decode tables' columns for it: tests/test_decode.py."""

import pytest
import torch

from moe_course import vllm_moe


def aligned(topk_ids, num_experts, block):
    """vllm_moe.align_block_size into buffers sized as vLLM sizes them."""
    pairs = topk_ids.numel()
    room = pairs + num_experts * (block - 1)
    sorted_ids = torch.full((room,), -1, dtype=torch.int32)
    expert_ids = torch.full((-(-room // block),), -1, dtype=torch.int32)
    padded = torch.zeros(1, dtype=torch.int32)
    vllm_moe.align_block_size(topk_ids, num_experts, block, sorted_ids, expert_ids, padded)
    return sorted_ids, expert_ids, int(padded)


def test_the_alignment_stand_in_gives_vllms_documented_example():
    """moe_align_block_size's docstring: 4 tokens, top-3 of experts 1-4, blocks of 4."""
    ids = torch.tensor([[2, 3, 4], [1, 2, 4], [1, 3, 4], [1, 2, 3]], dtype=torch.int32)
    sorted_ids, expert_ids, padded = aligned(ids, 5, 4)
    assert padded == 16  # expert 0 is idle: no block
    assert sorted_ids[:16].tolist() == [3, 6, 9, 12, 0, 4, 10, 12, 1, 7, 11, 12, 2, 5, 8, 12]
    assert expert_ids[:4].tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("tokens, E, K, block", [(1, 8, 2, 16), (7, 8, 2, 4), (64, 16, 4, 16), (33, 4, 1, 32),
                                                 (5, 64, 8, 16)])
@pytest.mark.parametrize("routing", ["random", "one expert", "idle experts"])
def test_the_alignment_stand_in_keeps_every_pair_once_in_its_experts_blocks(tokens, E, K, block, routing):
    g = torch.Generator().manual_seed(tokens * E + K)
    pool = {"random": E, "one expert": E - 1, "idle experts": E // 2}[routing]  # experts a token draws from
    ids = torch.stack([torch.randperm(pool, generator=g)[:K] for _ in range(tokens)])
    if routing == "one expert":  # every token's first pair on the last expert
        ids = torch.cat([torch.full((tokens, 1), E - 1), ids[:, :K - 1]], dim=1)
    sorted_ids, expert_ids, padded = aligned(ids.to(torch.int32), E, block)
    pairs = ids.numel()
    counts = torch.bincount(ids.reshape(-1), minlength=E)
    assert padded == int(((counts + block - 1) // block * block).sum())
    real = sorted_ids[:padded]
    assert sorted(real[real < pairs].tolist()) == list(range(pairs))  # each pair once
    assert (real[real >= pairs] == pairs).all()  # the rest is the sentinel
    for b in range(padded // block):  # each block holds its expert's pairs, in token order
        got = real[b * block:(b + 1) * block]
        got = got[got < pairs].long()
        assert (ids.reshape(-1)[got] == expert_ids[b]).all()
        assert torch.equal(got, got.sort().values)
    assert set(expert_ids[:padded // block].tolist()) == set(torch.nonzero(counts).reshape(-1).tolist())


def test_it_says_why_it_cannot_run():
    why = vllm_moe.unavailable()
    if not torch.cuda.is_available():
        assert why is not None and "no CUDA GPU" in why
    elif why is not None:  # a GPU, but neither vLLM nor its files: the two ways to get them named
        assert "vllm" in why.lower()


needs_vllm = pytest.mark.skipif(vllm_moe.unavailable() is not None, reason=f"{vllm_moe.unavailable()}")


@pytest.mark.gpu
@needs_vllm
@pytest.mark.parametrize("tokens", [1, 7, 64, 511])
def test_vllms_kernel_and_layer_match_float32(tokens):
    """Its GEMM (aligned pairs, or its naive assignment for a sparse step) and its whole layer,
    at awkward step sizes, one expert with every token, against float32; the layer checked with
    the course's stand-ins for alignment too."""
    E, d, n, K = 64, 512, 256, 4
    g = torch.Generator(device="cuda").manual_seed(tokens)
    w_gate_up = (torch.randn(E, 2 * n, d, device="cuda", generator=g) / d**0.5).bfloat16()
    w_down = (torch.randn(E, d, n, device="cuda", generator=g) / n**0.5).bfloat16()
    x = torch.randn(tokens, d, device="cuda", generator=g).bfloat16()
    experts = torch.stack([torch.randperm(E, device="cuda", generator=g)[:K] for _ in range(tokens)])
    experts[:, 0] = 5  # every token on expert 5
    weights = torch.softmax(torch.randn(tokens, K, device="cuda", generator=g), dim=1)
    block = vllm_moe.config(tokens, E, d, n, K)
    route = vllm_moe.routing(experts, E, block)
    out = torch.full((tokens, K, 2 * n), float("nan"), device="cuda", dtype=torch.bfloat16)
    got = vllm_moe.grouped_gemm(x, w_gate_up, experts, block, route, out=out)
    want = torch.einsum("td,tkmd->tkm", x.float(), w_gate_up.float()[experts])
    assert (got.float() - want).norm() / want.norm() < 1e-2
    h = want.reshape(tokens * K, 2 * n)
    a = torch.nn.functional.silu(h[:, :n]) * h[:, n:]
    y = torch.einsum("pn,pdn->pd", a, w_down.float()[experts.reshape(-1)]).reshape(tokens, K, d)
    want_y = (y * weights[..., None]).sum(1)
    got_y = vllm_moe.fused_experts(x, w_gate_up, w_down, weights, experts)
    assert (got_y.float() - want_y).norm() / want_y.norm() < 2e-2
