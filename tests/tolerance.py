"""Float tolerances that follow from the dtype and the size of the computation, never guessed.

Rounding model (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., 2002, ch. 2-3): every
floating-point operation returns the exact result times (1 + d) with |d| <= u, the unit roundoff
(eps / 2). A sum or dot product of n terms, in any order, then errs by at most gamma(n) * sum |terms|,
gamma(n) = n u / (1 - n u) (Higham's eq. 3.4). Two evaluations of the same quantity in different
orders differ by at most the sum of their two errors.

Two kinds of bound are used by the tests:
- `dot_bound` and friends: operation by operation, for short computations (an average, a merged
  weight, one layer's output), in the dtype the test runs in;
- `DEEP`: for computations too deep to bound operation by operation (a whole network, a training run
  through AdamW), two evaluations that differ only in the order of operations agree to DEEP * u * scale,
  where scale is the size of what is compared. See DEEP. Tests that use it run in fp64
  (`model.dtype=fp64 fl.wire_dtype=fp64`), where DEEP * u is 1.1e-10.
"""
from __future__ import annotations

import torch

# Measured error amplification K of the deepest computation compared in the tests, the simulation of
# two federated rounds through AdamW (tests/test_parallel.py): sequential and parallel runs, which differ
# only in the order of operations, uploaded tensors that differ by 2.4e-6 of their norm in fp32
# (u = 6.0e-8: K = 40) and 5.9e-15 in fp64 (u = 1.1e-16: K = 53); every metric agreed to 1e-7 / 3e-16.
# The same K in both dtypes is what a rounding (not a logic) difference looks like. DEEP = 1e6 keeps
# a factor of 2e4 above that, and in fp64 (1.1e-10) stays 10^6 below the smallest real disagreement
# these tests look for (one AdamW step of lr 1e-3 missing or misplaced moves a tensor by ~1e-3 of its norm).
DEEP = 1e6


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype) -> float:
    """Higham's gamma_n: the relative error bound of a sum or dot product of n terms."""
    nu = n * unit_roundoff(dtype)
    if not nu < 1:
        raise ValueError(f"n = {n} is too long a reduction for {dtype}")
    return nu / (1 - nu)


def dot_bound(n: int, magnitude, dtype: torch.dtype):
    """Error bound of a length-n sum or dot product whose terms have absolute values summing to `magnitude`
    (a number or an elementwise tensor such as |A| @ |x|)."""
    return gamma(n, dtype) * magnitude


def deep_tol(scale: float, dtype: torch.dtype) -> float:
    """Absolute tolerance between two evaluations of a deep computation whose results are of size `scale`."""
    return DEEP * unit_roundoff(dtype) * scale


def assert_deep_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """actual == expected to DEEP roundings of the size of `expected` (see DEEP), in their dtype."""
    tol = deep_tol(float(expected.abs().max()), expected.dtype)
    torch.testing.assert_close(actual, expected, atol=tol, rtol=0)


def deep_approx(expected: float, dtype: torch.dtype = torch.float64):
    """pytest.approx for a scalar metric of a deep computation (a loss, an accuracy) run in `dtype`."""
    import pytest

    return pytest.approx(expected, rel=DEEP * unit_roundoff(dtype), abs=DEEP * unit_roundoff(dtype))


def deep_equal(a, b) -> bool:
    """Two fp64 runs' metrics (numbers, lists of them, null, text) that differ only in the order of operations:
    numbers DEEP roundings apart, the rest equal."""
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(deep_equal(x, y) for x, y in zip(a, b))
    if a is None or b is None or isinstance(a, str):
        return a == b
    return a == deep_approx(b)


def simplex_sum_tol(k: int, magnitude: float, dtype: torch.dtype = torch.float64) -> float:
    """Bound on |sum(w) - 1| for a row of k weights from celora.similarity: a simplex projection of inputs
    of absolute value <= `magnitude`, or a softmax (magnitude 0).

    Projection (w = max(v - theta, 0), theta = (sum of the rho largest v - 1) / rho): theta's running sum
    errs by gamma(k) (k magnitude + 1), its division and each v - theta by u, and the final sum by gamma(k),
    so the row sums to 1 within gamma(2k + 2) (k magnitude + 2). A softmax row e_i / sum(e) errs by
    gamma(k + 1) relatively before its sum adds gamma(k): inside the same bound with magnitude 0."""
    return gamma(2 * k + 2, dtype) * (k * magnitude + 2)


def spacing(x: torch.Tensor) -> torch.Tensor:
    """An upper bound on the gap between x and its neighbouring float of x's dtype: eps |x| (or the
    smallest normal's gap at 0). A float64 result within far less than that of an exact float32 value
    rounds back to a neighbour of it: the two differ by at most one spacing."""
    info = torch.finfo(x.dtype)
    return torch.clamp(x.abs(), min=info.tiny) * info.eps
