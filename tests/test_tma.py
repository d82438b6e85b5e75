"""Tensor maps (moe_course/tma.py): the 4-D map that reads Hugging Face's ``gate_up_proj`` as the
interleaved tile of chapter 03's SwiGLU epilogue, checked on a GPU against a 2-D map of the
interleaved weights, byte for byte in shared memory (swizzle included)."""

import numpy as np
import pytest
import torch

from moe_course import tma

PROBE = r'''
#include "tma.cuh"
// One box into shared memory by a 2-D or a 4-D map, copied out as it lies there (swizzled).
extern "C" __global__ void copy_box(const __grid_constant__ TmaDesc map, int four_d, int k0, int row0, int j0,
                                    int e, unsigned short* out, int box_rows) {
    extern __shared__ __align__(1024) unsigned char smem[];
    __shared__ u64 bar;
    if (threadIdx.x == 0) {
        mbar_init(&bar, 1);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        mbar_arrive_expect_tx(&bar, box_rows * 128);
        if (four_d) tma_load_4d(smem, map, k0, 0, j0, e, &bar);
        else tma_load_2d(smem, map, k0, row0, &bar);
    }
    __syncthreads();
    mbar_wait(&bar, 0);
    const unsigned short* s = reinterpret_cast<const unsigned short*>(smem);
    for (int i = threadIdx.x; i < box_rows * 64; i += blockDim.x) out[i] = s[i];
}
'''


def test_the_gate_up_map_refuses_what_it_cannot_read():
    w = torch.zeros(2, 8, 64, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bf16"):
        tma.tensor_map_gate_up(w.float(), 16)
    with pytest.raises(ValueError, match=r"\(E, 2I, H\) with gate rows then up rows, got shape \(2, 7, 64\)"):
        tma.tensor_map_gate_up(w[:, :7], 16)
    with pytest.raises(ValueError, match="contiguous tensor on the GPU"):
        tma.tensor_map_gate_up(w, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("E,I,H,box_rows", [(4, 256, 512, 128), (3, 768, 2048, 256), (2, 200, 128, 128)])
def test_the_gate_up_map_lands_the_interleaved_tile(E, I, H, box_rows):
    from moe_course import kernels
    from moe_course.kernels import ptr

    fn = kernels.load(PROBE).get_function("copy_box")
    fn.max_dynamic_shared_size_bytes = box_rows * 128
    g = torch.Generator(device="cuda").manual_seed(E * I)
    w_hf = torch.randn(E, 2 * I, H, device="cuda", generator=g).to(torch.bfloat16)
    w_interleaved = torch.stack((w_hf[:, :I], w_hf[:, I:]), dim=2).reshape(E, 2 * I, H).contiguous()
    map_4d, map_2d = tma.tensor_map_gate_up(w_hf, box_rows), tma.tensor_map_2d(w_interleaved, box_rows)
    i32 = np.int32
    j_box = box_rows // 2
    for e, j0, k0 in ((0, 0, 0), (E - 1, I - j_box, H - 64), (E // 2, I // 3 // 8 * 8, 64)):
        want = torch.zeros(box_rows * 64, dtype=torch.int16, device="cuda")
        got = torch.full_like(want, -1)
        fn((1,), (128,), (map_2d, i32(0), i32(k0), i32(e * 2 * I + 2 * j0), i32(0), i32(0), ptr(want),
                          i32(box_rows)), shared_mem=box_rows * 128)
        fn((1,), (128,), (map_4d, i32(1), i32(k0), i32(0), i32(j0), i32(e), ptr(got), i32(box_rows)),
           shared_mem=box_rows * 128)
        torch.cuda.synchronize()
        assert torch.equal(got, want), f"expert {e}, rows j {j0}.., columns {k0}..: {int((got != want).sum())} differ"
        assert bool(want.ne(0).any())  # the box was loaded at all
