"""Chapter 02's pictures (moe_course.diagrams) say what the kernels do: each layout formula is
checked against the kernel's own device code run on the CPU where that code is plain CUDA C,
the PTX fragments against the PTX ISA's tables, and the bank model on accesses whose answer
is known (including the layouts the kernels avoid)."""

import math
from itertools import product

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from moe_course import cuda_on_cpu, diagrams as dg  # noqa: E402
from moe_course import launch  # noqa: E402

needs_compiler = pytest.mark.skipif(cuda_on_cpu.compiler() is None, reason="no C++ compiler on this machine")

LAYOUT_PROBES = r'''
#include "grouped_gemm.cuh"
extern "C" __global__ void swizzles(int* out) {
    out[threadIdx.x] = swizzle_128b(threadIdx.x / 8, threadIdx.x % 8);
}
extern "C" __global__ void wgmma_layout(bf16* value_of, bf16* thread_of) {  // a 64 x 128 tile
    float v[64], t[64];
    for (int i = 0; i < 64; ++i) { v[i] = i; t[i] = threadIdx.x; }  // small integers: exact in bf16
    store_wgmma_tile(v, value_of, 128, 0, 64, 0);
    store_wgmma_tile(t, thread_of, 128, 0, 64, 0);
}
'''


@pytest.fixture(scope="module")
def probes():
    return cuda_on_cpu.load(LAYOUT_PROBES)


@needs_compiler
def test_swizzle_is_grouped_gemm_cuh_s(probes):
    out = torch.empty(16 * 8, dtype=torch.int32)
    probes.launch("swizzles", 1, 16 * 8, (out,))
    assert out.tolist() == [dg.swizzle_128b(r, c) for r in range(16) for c in range(8)]


@needs_compiler
def test_wgmma_accumulator_owner_inverts_store_wgmma_tile(probes):
    value_of, thread_of = (torch.full((64, 128), float("nan"), dtype=torch.bfloat16) for _ in range(2))
    probes.launch("wgmma_layout", 1, 128, (value_of, thread_of))
    want = [[dg.wgmma_accumulator_owner(r, c) for c in range(128)] for r in range(64)]
    assert thread_of.int().tolist() == [[t for t, _ in row] for row in want]
    assert value_of.int().tolist() == [[v for _, v in row] for row in want]


@needs_compiler
@pytest.mark.parametrize("counts,block_m", [([0, 37, 80, 5, 0, 50], 16), ([300], 128), ([0, 0, 1], 128),
                                            ([129, 127, 128, 0, 256], 128)])
def test_tiles_are_build_tile_map_s(counts, block_m):
    module = cuda_on_cpu.load("02_2_naive_grouped")
    offs = torch.tensor(counts).cumsum(0).int()
    M, E = sum(counts), len(counts)
    max_tiles = launch.max_tiles_for(M, E, block_m)
    tile_map, num_tiles = torch.zeros(max_tiles, 2, dtype=torch.int32), torch.zeros(2, dtype=torch.int32)
    module.launch("build_tile_map", 1, 1024, (offs, E, M, block_m, max_tiles, tile_map, num_tiles))
    tl = dg.tiles(counts, block_m)
    assert int(num_tiles[0]) == len(tl)
    assert tile_map[:len(tl)].tolist() == [[t.expert, t.row] for t in tl]
    ends = offs.tolist()
    assert [t.rows for t in tl] == [min(block_m, ends[t.expert] - t.row) for t in tl]  # tile_rows' row_end


def test_tiles_refuse_what_is_not_a_routing():
    with pytest.raises(ValueError, match="counts must be rows per expert"):
        dg.tiles([3, -1], 16)
    with pytest.raises(ValueError, match="block_m must be a positive"):
        dg.tiles([3], 0)


def test_ptx_fragments_give_every_element_to_one_lane():
    a = {dg.ldmatrix_a_owner(r, c) for r, c in product(range(16), range(16))}
    assert a == {(lane, reg, half) for lane in range(32) for reg in range(4) for half in range(2)}
    acc = {dg.mma_accumulator_owner(r, c) for r, c in product(range(16), range(8))}
    assert acc == {(lane, v) for lane in range(32) for v in range(4)}
    wg = {dg.wgmma_accumulator_owner(r, c) for r, c in product(range(64), range(128))}
    assert wg == {(t, v) for t in range(128) for v in range(64)}


def test_ptx_fragments_match_the_isa_tables():
    # PTX ISA, mma.m16n8k16 (bf16): a0/a1 at (groupID, 2*tig + i), a2/a3 eight rows down,
    # a4..a7 eight columns on; register j of ldmatrix.x4 is matrix j.
    assert dg.ldmatrix_a_owner(0, 1) == (0, 0, 1)
    assert dg.ldmatrix_a_owner(9, 3) == (5, 1, 1)  # groupID 1, tig 1, second register (rows 8-15)
    assert dg.ldmatrix_a_owner(2, 12) == (10, 2, 0)
    assert dg.ldmatrix_a_owner(15, 15) == (31, 3, 1)
    assert dg.ldmatrix_address_lane(3, 0) == 3 and dg.ldmatrix_address_lane(12, 8) == 28
    assert dg.mma_accumulator_owner(8, 7) == (3, 3)  # c3 of lane 3: row groupID + 8, col 2*3 + 1
    with pytest.raises(ValueError, match="row must be in 0..15"):
        dg.ldmatrix_a_owner(16, 0)


def test_bank_model_on_known_accesses():
    assert dg.wavefronts([4 * t for t in range(32)]) == 1  # consecutive words
    assert dg.wavefronts([0] * 32) == 1  # one word, broadcast
    assert dg.wavefronts([8 * t for t in range(32)]) == 2  # stride of 2 words
    assert dg.wavefronts([128 * t for t in range(32)]) == 32  # one column of a 32-word-wide array
    assert dg.wavefronts([16 * t for t in range(32)], 16) == 4  # 512 bytes: 4 passes however laid out
    assert dg.min_wavefronts([16 * t for t in range(32)], 16) == 4
    with pytest.raises(ValueError, match="not aligned"):
        dg.wavefronts([4], 16)


def test_the_layouts_the_kernels_chose_are_conflict_free_and_the_others_are_not():
    assert dg.wavefronts(dg.ldmatrix_rows(64), 16) == 4  # 02_4 without its 8-value padding
    assert dg.wavefronts(dg.ldmatrix_rows(80), 16) == 1  # LDS = BK + 8: 80-byte rows
    for chunk in range(8):
        assert dg.wavefronts(dg.column_addresses(chunk, swizzled=False), 16) == 8
        assert dg.wavefronts(dg.column_addresses(chunk, swizzled=True), 16) == 1
    # a swizzle that only spreads over 4 chunk positions (row & 3) would still conflict
    half = [16 * (r * 8 + (0 ^ (r & 3))) for r in range(8)]
    assert dg.wavefronts(half, 16) == 2


def test_naive_warp_lines():
    assert dg.naive_warp_lines((16, 16)) == (2, 16)  # the naive kernels' blocks
    assert dg.naive_warp_lines((32, 8)) == (1, 32)
    assert dg.naive_warp_lines((8, 8)) == (4, 8)


def test_persistent_order_walks_every_tile_once():
    order = dg.persistent_order(num_m_tiles=7, n_tiles=3, blocks=4)
    assert sorted((m, n) for _, _, m, n in order) == sorted(product(range(7), range(3)))
    assert all(b == i % 4 and r == i // 4 for i, (b, r, _, _) in enumerate(order))
    assert order[:3] == [(0, 0, 0, 0), (1, 0, 0, 1), (2, 0, 0, 2)]  # the N-tiles of an M-tile run together


def test_drawings_show_the_counts_they_are_given():
    counts = [0, 37, 80, 5, 0, 50]
    ax = dg.draw_tile_map(counts, 16)
    n_tiles = len(dg.tiles(counts, 16))
    assert f"{n_tiles} tiles" in ax.get_title() and f"{math.ceil(172 / 16) + 6 - n_tiles} of the" in ax.get_title()
    ax = dg.draw_banks({"plain": dg.column_addresses(0, swizzled=False)})
    assert any("8 passes" in t.get_text() for t in ax.texts)
    axes = dg.draw_swizzle()
    assert "1 pass" in axes[1].get_title() and "8 passes" in axes[0].get_title()
    for draw in (dg.draw_naive_warp, dg.draw_thread_tile, dg.draw_ldmatrix, dg.draw_wgmma_accumulator,
                 lambda: dg.draw_persistent(counts, 32, 2, 4)):
        draw()
    plt.close("all")
