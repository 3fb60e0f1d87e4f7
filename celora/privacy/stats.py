"""(epsilon, delta)-DP release of a client's class statistics: features clipped, sufficient statistics through the Gaussian mechanism."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from celora.similarity import VAR_FLOOR, ClassStats, check_labels

COUNT_FLOOR = 1e-3
_TINY = torch.finfo(torch.float64).tiny


def clip_rows(features: Tensor, max_norm: float) -> Tensor:
    """Scale every row whose L2 norm exceeds max_norm down onto the max_norm sphere (float64)."""
    if not max_norm > 0:
        raise ValueError(f"clip norm must be > 0, got {max_norm}")
    x = features.double()
    norms = x.norm(dim=-1, keepdim=True).clamp_min(_TINY)
    return x * (max_norm / norms).clamp(max=1.0)


def _check(epsilon: float, delta: float, sensitivity: float) -> None:
    if not 0 < epsilon < math.inf:
        raise ValueError(f"epsilon must be > 0 and finite, got {epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not 0 <= sensitivity < math.inf:
        raise ValueError(f"sensitivity must be >= 0 and finite, got {sensitivity}")


def gaussian_mechanism_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """Noise std of the classic Gaussian mechanism, sensitivity * sqrt(2 ln(1.25 / delta)) / epsilon.

    Dwork & Roth (2014, Thm A.1) prove (epsilon, delta)-DP for epsilon < 1 only; for epsilon >= 1
    the same formula is a common heuristic, not a proof, and at large epsilon it is too little noise (its
    exact delta is 1.3e-3 at epsilon 8, delta 1e-3, and 3.4e-4 at epsilon 16, delta 1e-5):
    `analytic_gaussian_sigma` holds there.
    """
    _check(epsilon, delta, sensitivity)
    return sensitivity * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


# Relative width at which the analytic calibration's bisection stops: the returned sigma meets (epsilon,
# delta) and sigma * (1 - ANALYTIC_RTOL) does not (see analytic_gaussian_sigma). 1e-10 keeps 10 digits,
# far above float64's 2e-16 spacing and above the profile's own rounding (tests/test_dp_calibration.py).
ANALYTIC_RTOL = 1e-10
_SQRT2 = math.sqrt(2.0)
_CF_FROM = 10.0  # erfc(z) below 2e-45 from here on: its log through the continued fraction instead


def _log_normal_tail(y: float) -> float:
    """log Phi(-y) = log(erfc(y / sqrt 2) / 2), accurate where erfc underflows (y > 38).

    For z = y / sqrt 2 >= 10, erfc(z) = exp(-z^2) erfcx(z) with erfcx from its continued fraction
    1 / (sqrt(pi) (z + (1/2) / (z + 1 / (z + (3/2) / (z + ...))))), 60 levels: exact to double
    precision from z = 10 on, so e^epsilon Phi(-y) is exp(epsilon + this) without overflow."""
    z = y / _SQRT2
    if z < _CF_FROM:
        return math.log(0.5 * math.erfc(z))
    k = z
    for n in range(60, 0, -1):
        k = z + 0.5 * n / k
    return -z * z - math.log(2.0 * math.sqrt(math.pi) * k)


def gaussian_profile(sigma_over_sensitivity: float, epsilon: float) -> float:
    """delta(epsilon) of the Gaussian mechanism with noise std s * sensitivity (Balle & Wang 2018, Thm 8):
    Phi(1/(2s) - epsilon s) - e^epsilon Phi(-1/(2s) - epsilon s), both tails through erfc (no 1 - Phi)."""
    s = sigma_over_sensitivity
    a, b = 0.5 / s, epsilon * s
    near = 0.5 * math.erfc((b - a) / _SQRT2)  # Phi(a - b)
    far = math.exp(epsilon + _log_normal_tail(a + b))  # e^epsilon Phi(-a - b) <= Phi(a - b): no overflow
    return near - far


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float,
                            rtol: float = ANALYTIC_RTOL) -> float:
    """The smallest noise std making the Gaussian mechanism (epsilon, delta)-DP: Balle & Wang's (ICML 2018)
    analytic Gaussian mechanism, valid at every epsilon > 0.

    Their Theorem 8: x -> f(x) + N(0, sigma^2 I), f of L2 sensitivity D, is (epsilon, delta)-DP if and only
    if delta(sigma) = Phi(D/(2 sigma) - epsilon sigma/D) - e^epsilon Phi(-D/(2 sigma) - epsilon sigma/D)
    <= delta. delta(sigma) falls strictly from 1 (sigma -> 0) to 0 (sigma -> inf): with a = D/(2 sigma) and
    b = epsilon sigma/D its derivative is -(D / sigma^2) phi(a - b), as e^epsilon phi(a + b) = phi(a - b)
    (4ab = 2 epsilon). The smallest sigma is therefore the one root of delta(sigma) = delta. Their Algorithm 1
    finds it by bisection in a reparametrised variable; here the same root is bracketed and bisected in
    s = sigma / D directly (sigma scales with D) until hi - lo <= rtol * hi, and hi is returned: the
    profile at hi is <= delta and at lo (>= hi * (1 - rtol)) above it, so the answer is within rtol of
    the smallest sigma and never below it (up to rounding in the profile, far below delta here).
    """
    _check(epsilon, delta, sensitivity)
    if not 0 < rtol < 1:
        raise ValueError(f"rtol must be in (0, 1), got {rtol}")
    if sensitivity == 0:
        return 0.0
    meets = lambda s: gaussian_profile(s, epsilon) <= delta  # noqa: E731
    lo = hi = 1.0
    while not meets(hi):
        lo, hi = hi, 2.0 * hi
    while meets(lo):
        lo, hi = 0.5 * lo, lo
    while hi - lo > rtol * hi:
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):  # the bracket is two neighbouring floats: nothing finer exists
            break
        lo, hi = (lo, mid) if meets(mid) else (mid, hi)
    return hi * sensitivity


_SIGMAS = {"classic": gaussian_mechanism_sigma, "analytic": analytic_gaussian_sigma}
MECHANISMS = tuple(_SIGMAS)


def noise_sigma(mechanism: str, epsilon: float, delta: float, sensitivity: float) -> float:
    """The Gaussian mechanism's noise std under the calibration `mechanism` (one of MECHANISMS).

    `analytic` (Balle & Wang 2018) is exact: the least noise that is (epsilon, delta)-DP, at every
    epsilon. `classic` (Dwork & Roth 2014) is a proof for epsilon < 1 only, where it is never below
    the analytic sigma; it is accepted at epsilon >= 1 to reproduce older runs, without a guarantee.
    """
    if mechanism not in _SIGMAS:
        raise ValueError(f"DP mechanism must be one of {MECHANISMS}, got {mechanism!r}")
    return _SIGMAS[mechanism](epsilon, delta, sensitivity)


def privatize(features: Tensor, labels: Tensor, num_classes: int, clip_norm: float,
              epsilon: float, delta: float, generator: torch.Generator, *, mechanism: str,
              var_floor: float = VAR_FLOOR, count_floor: float = COUNT_FLOOR) -> tuple[ClassStats, float]:
    """(epsilon, delta)-DP class Gaussians: clip, release (count, sum, sumsq) per class with Gaussian noise
    calibrated by `mechanism` (noise_sigma: `analytic` or `classic`).

    Returns the summary and the noise std sigma used on every released value.
    """
    x = clip_rows(features, clip_norm)
    check_labels(labels, num_classes, x.shape[0])
    d = x.shape[1]
    released = torch.zeros(num_classes, 1 + 2 * d, dtype=torch.float64)
    released.index_add_(0, labels, torch.cat([torch.ones_like(x[:, :1]), x, x**2], dim=1))
    # Neighbours differ by adding or removing one example x (||x|| <= R, any label): it moves one
    # class row only, its count by 1, its sum by x (norm <= R) and its sum of squares by x**2
    # (norm sqrt(sum x_k^4) <= ||x||^2 <= R^2). One mechanism over the whole concatenated table
    # therefore has L2 sensitivity sqrt(1 + R^2 + R^4).
    sensitivity = math.sqrt(1.0 + clip_norm**2 + clip_norm**4)
    sigma = noise_sigma(mechanism, epsilon, delta, sensitivity)
    noisy = released + sigma * torch.randn(released.shape, generator=generator, dtype=torch.float64)
    # Everything below is post-processing, so it costs no privacy. A tiny count floor keeps every
    # class (its weight stays negligible) instead of dividing by a noisy zero.
    stats = ClassStats.from_sufficient(noisy[:, 0].clamp_min(count_floor), noisy[:, 1:1 + d],
                                       noisy[:, 1 + d:], var_floor)
    # The true mean of vectors in the R-ball lies in that ball and no coordinate's variance exceeds
    # R^2; projecting there bounds what noise divided by a small count can do.
    means = clip_rows(stats.means, clip_norm)
    vars_ = stats.vars.clamp(max=max(clip_norm**2, var_floor))
    return ClassStats(stats.counts, means, vars_), sigma
