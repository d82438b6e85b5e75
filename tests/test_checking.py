import numpy as np
import pytest
import torch

from moe_course.checking import CheckFailed, check_close, check_equal, grading, relative_error


def test_check_close_passes_and_fails_with_a_useful_message():
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    check_close("a", a + 1e-7, a)
    b = a.clone()
    b[2, 1] += 0.5
    with pytest.raises(CheckFailed) as err:
        check_close("y", b, a)
    msg = str(err.value)
    assert "1 of 12 values differ" in msg and "at [2, 1]: expected 9, got 9.5" in msg


def test_check_close_rejects_nan_shape_and_none():
    a = np.ones(4)
    with pytest.raises(CheckFailed, match="1 of 4"):
        check_close("y", np.array([1, 1, np.nan, 1.0]), a)
    with pytest.raises(CheckFailed, match=r"expected shape \(4,\).*got shape \(2, 2\)"):
        check_close("y", np.ones((2, 2)), a)
    with pytest.raises(CheckFailed, match="got None"):
        check_close("y", None, a)


def test_check_equal_for_indices_and_bf16():
    check_equal("idx", torch.tensor([3, 1, 2]), np.array([3, 1, 2]))
    with pytest.raises(CheckFailed, match="first at \\[1\\]: expected 1, got 0"):
        check_equal("idx", torch.tensor([3, 0, 2]), torch.tensor([3, 1, 2]))
    x = torch.randn(5, dtype=torch.bfloat16)
    check_close("bf16", x, x.float())


def test_grading_reports_unfilled_and_wrong_answers(capsys):
    with pytest.raises(CheckFailed, match="Exercise X: not implemented yet"):
        with grading("Exercise X"):
            raise NotImplementedError("fill in the router")
    with pytest.raises(CheckFailed, match="Exercise X: FAILED"):
        with grading("Exercise X"):
            check_equal("k", np.array([1]), np.array([2]))
    with grading("Exercise X"):
        pass
    assert "PASS  Exercise X" in capsys.readouterr().out


def test_relative_error():
    assert relative_error(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0
    assert relative_error(np.array([1.1, 0.0]), np.array([1.0, 0.0])) == pytest.approx(0.1)


def test_same_bytes_reads_e4m3_and_tells_one_bit_apart():
    from moe_course.checking import same_bytes

    a = torch.linspace(-3, 3, 64).to(torch.float8_e4m3fn)
    assert same_bytes(a, a.clone())
    b = a.clone()
    b.view(torch.uint8)[7] ^= 1
    assert not same_bytes(a, b)
    assert not same_bytes(a.float(), a.clone().float().to(torch.float64))  # one dtype
    assert not same_bytes(a.view(8, 8), a)  # one shape
    nan = torch.full((3,), float("nan"))
    assert same_bytes(nan, nan.clone())  # the same bits, though NaN != NaN
