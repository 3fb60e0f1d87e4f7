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


def gaussian_mechanism_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """Noise std of the classic Gaussian mechanism, sensitivity * sqrt(2 ln(1.25 / delta)) / epsilon.

    Dwork & Roth (2014, Thm A.1) prove (epsilon, delta)-DP for epsilon < 1 only; for epsilon >= 1
    the same formula is a common heuristic, not a proof (the analytic mechanism of Balle & Wang,
    2018, would be needed there).
    """
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not sensitivity >= 0:
        raise ValueError(f"sensitivity must be >= 0, got {sensitivity}")
    return sensitivity * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def privatize(features: Tensor, labels: Tensor, num_classes: int, clip_norm: float,
              epsilon: float, delta: float, generator: torch.Generator,
              var_floor: float = VAR_FLOOR, count_floor: float = COUNT_FLOOR) -> tuple[ClassStats, float]:
    """(epsilon, delta)-DP class Gaussians: clip, release (count, sum, sumsq) per class with Gaussian noise.

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
    sigma = gaussian_mechanism_sigma(epsilon, delta, sensitivity)
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
