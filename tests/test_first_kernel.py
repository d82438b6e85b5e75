"""kernels/00_scale.cu: bit-exact against torch at awkward sizes; bad input refused."""

import pytest
import torch

from moe_course.checking import check_equal
from moe_course.launch import scale


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 7, 8, 9, 4096 + 3, 5_000_011])
def test_scale_matches_torch_bit_for_bit(n):
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    y = torch.full_like(x, float("nan"))  # poisoned: a value the kernel skips stays NaN
    scale(x, -0.3, out=y)
    check_equal("y bits", y.view(torch.int16), (x.float() * -0.3).bfloat16().view(torch.int16))


@pytest.mark.gpu
def test_scale_refuses_misaligned_views():
    x = torch.randn(64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="16-byte boundary"):
        scale(x[1:], 2.0)


@pytest.mark.gpu
def test_scale_refuses_a_wrong_shaped_out():
    x = torch.randn(64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="out has shape"):
        scale(x, 2.0, out=torch.empty(32, device="cuda", dtype=torch.bfloat16))


def test_scale_refuses_wrong_dtype_and_device():
    with pytest.raises(TypeError, match="must be bfloat16, got torch.float32"):
        scale(torch.randn(8), 2.0)
    with pytest.raises(ValueError, match="is on cpu"):
        scale(torch.randn(8, dtype=torch.bfloat16), 2.0)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        scale([1.0, 2.0], 2.0)
