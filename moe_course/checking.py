"""Small, friendly checks: each failure says what was expected, what came back, and where.

Used by exercise graders and by the kernel tests. A failed check raises :class:`CheckFailed`
(an ``AssertionError``), so nbval and pytest both count it as a failure.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from .checks import require


class CheckFailed(AssertionError):
    pass


def to_numpy(x) -> np.ndarray:
    """torch (CPU or GPU, any dtype incl. bf16), CuPy or NumPy to a float64/int64 NumPy array."""
    if hasattr(x, "detach"):  # torch
        x = x.detach()
        x = x.float() if x.is_floating_point() else x
        return x.cpu().numpy()
    if type(x).__module__.startswith("cupy"):
        return x.get()
    return np.asarray(x)


def _describe(arr: np.ndarray) -> str:
    return f"shape {tuple(arr.shape)}, dtype {arr.dtype}"


def check_shape(name: str, got, expected_shape) -> None:
    shape = tuple(getattr(got, "shape", ()))
    if shape != tuple(expected_shape):
        raise CheckFailed(f"{name}: expected shape {tuple(expected_shape)}, got {shape}")


def check_dtype(name: str, got, expected_dtype) -> None:
    if got.dtype != expected_dtype:
        raise CheckFailed(f"{name}: expected dtype {expected_dtype}, got {got.dtype}")


def check_close(name: str, got, expected, *, rtol: float = 1e-4, atol: float = 1e-5,
                max_shown: int = 3) -> None:
    """Element-wise ``|got - expected| <= atol + rtol * |expected|``; NaN never passes."""
    if got is None:
        raise CheckFailed(f"{name}: got None (did the function forget to return its result?)")
    g, e = to_numpy(got), to_numpy(expected)
    if g.shape != e.shape:
        raise CheckFailed(f"{name}: expected {_describe(e)}, got {_describe(g)}")
    g64, e64 = g.astype(np.float64), e.astype(np.float64)
    bad = ~(np.abs(g64 - e64) <= atol + rtol * np.abs(e64))  # NaN compares False: counted bad
    if not bad.any():
        return
    where = np.argwhere(bad)
    err = np.where(bad, np.nan_to_num(np.abs(g64 - e64), nan=np.inf), 0)
    worst = np.unravel_index(np.argmax(err), err.shape)
    lines = [f"{name}: {bad.sum()} of {bad.size} values differ "
             f"(tolerance {atol:g} + {rtol:g}*|expected|)"]
    for idx in [worst] + [tuple(i) for i in where[:max_shown] if tuple(i) != worst][: max_shown - 1]:
        i = tuple(int(v) for v in idx)
        lines.append(f"  at {list(i)}: expected {e64[i]:.6g}, got {g64[i]:.6g}")
    raise CheckFailed("\n".join(lines))


def check_equal(name: str, got, expected) -> None:
    """Exact equality, for indices, counts and masks."""
    if got is None:
        raise CheckFailed(f"{name}: got None (did the function forget to return its result?)")
    g, e = to_numpy(got), to_numpy(expected)
    if g.shape != e.shape:
        raise CheckFailed(f"{name}: expected {_describe(e)}, got {_describe(g)}")
    bad = g != e
    if bad.any():
        first = tuple(int(v) for v in np.argwhere(bad)[0])
        raise CheckFailed(f"{name}: {bad.sum()} of {bad.size} entries differ; first at {list(first)}: "
                          f"expected {e[first]}, got {g[first]}")


def check_true(name: str, condition: bool, explanation: str) -> None:
    if not condition:
        raise CheckFailed(f"{name}: {explanation}")


def _check_same_shape(got: tuple, expected: tuple) -> None:
    """An error of two tensors needs one shape: flattened, (4,) against (2, 2) would compare
    values that do not correspond, and broadcasting (4, 1) against (4,) compares 16 pairs."""
    require(got == expected, lambda: f"relative_error compares tensors of one shape; got shape {got}, "
                                     f"expected shape {expected}")


def relative_error(got, expected, chunk: int = 1 << 24) -> float:
    """‖got − expected‖ / ‖expected‖ in float64: the one number for a whole tensor (NaN if
    ``got`` holds one). Two torch tensors are compared where they are (a GPU need not copy
    gigabytes to the host), ``chunk`` values at a time, so that the float64 copies stay small
    (DeepSeek-V3's weight gradient is 15 GB in bf16: 60 GB in float64 at once)."""
    if hasattr(got, "detach") and hasattr(expected, "detach"):
        _check_same_shape(tuple(got.shape), tuple(expected.shape))
        g, e = got.detach().reshape(-1), expected.detach().to(got.device).reshape(-1)
        num, den = g.new_zeros((), dtype=torch.float64), g.new_zeros((), dtype=torch.float64)
        for i in range(0, g.numel(), chunk):
            a, b = g[i:i + chunk].double(), e[i:i + chunk].double()
            num += (a - b).square().sum()
            den += b.square().sum()
        denom = float(den.sqrt())
        return float(num.sqrt()) / (denom if denom else 1.0)
    g, e = to_numpy(got).astype(np.float64), to_numpy(expected).astype(np.float64)
    _check_same_shape(g.shape, e.shape)
    denom = np.linalg.norm(e)
    return float(np.linalg.norm(g - e) / (denom if denom else 1.0))


def same_bytes(a, b) -> bool:
    """Two contiguous tensors of one shape and dtype hold the same bytes: an experimental kernel
    build against its default (``torch.equal`` does not take e4m3, so both are read as bytes)."""
    return (a.shape == b.shape and a.dtype == b.dtype
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


@contextlib.contextmanager
def grading(title: str):
    """Wrap a grader: a pass prints one line; an unfilled exercise says so plainly.

    >>> with grading("Exercise 1: router"):
    ...     check_close("router weights", my_router(x), reference_router(x))
    """
    try:
        yield
    except NotImplementedError as exc:
        raise CheckFailed(f"{title}: not implemented yet ({exc or 'fill in the cell marked YOUR CODE'})") from None
    except CheckFailed as exc:
        raise CheckFailed(f"{title}: FAILED\n{exc}") from None
    print(f"PASS  {title}")
