"""Gaussian-mechanism calibration: the analytic sigma against an independent privacy profile, classic vs analytic."""
import math

import pytest
import torch
from scipy.stats import norm

from celora.fl.data_stats import DataStats
from celora.privacy.stats import (
    ANALYTIC_RTOL,
    MECHANISMS,
    analytic_gaussian_sigma,
    gaussian_mechanism_sigma,
    noise_sigma,
    privatize,
)

from tolerance import unit_roundoff

U = unit_roundoff(torch.float64)
EPSILONS = (0.1, 0.5, 1.0, 4.0, 8.0, 16.0)
DELTAS = (1e-3, 1e-5, 1e-10)


def profile(sigma: float, epsilon: float, sensitivity: float = 1.0) -> tuple[float, float]:
    """(delta(epsilon) of the Gaussian mechanism with noise std sigma, a bound on its rounding error), through
    scipy.stats.norm, independent of the library's erfc: Balle & Wang (2018), Thm 8,
    Phi(a - b) - e^epsilon Phi(-a - b), a = D / (2 sigma), b = epsilon sigma / D.

    Rounding: a, b, a - b and a + b err by at most 2u (a + b) = 2u y; an argument x of Phi moved by h moves
    Phi(x) relatively by at most h (|x| + 1) (Mills' ratio, phi(x) / Phi(x) <= |x| + 1 for x <= 0, < 1 above),
    so by 2u y (y + 1) since |x| <= y. The far term goes through exp(epsilon + log Phi(-y)): an exponent of size
    <= epsilon + y^2 + 2 (|log Phi(-y)| <= y^2 + 2 for y >= 0, by Mills' ratio) rounded once,
    a relative error u (epsilon + y^2 + 2). Add 4u for Phi and exp themselves and u for the subtraction: each
    term within (3y^2 + 2y + epsilon + 7) u of itself."""
    a, b = sensitivity / (2.0 * sigma), epsilon * sigma / sensitivity
    near = norm.cdf(a - b)
    far = math.exp(epsilon + norm.logcdf(-a - b))
    y = a + b
    return near - far, (3 * y * y + 2 * y + epsilon + 7) * U * (near + far)


def slope(sigma: float, epsilon: float, sensitivity: float = 1.0) -> float:
    """|d delta(epsilon) / d log sigma| = (D / sigma) phi(a - b): the delta gained by lowering sigma by a
    fraction r is r times this (e^epsilon phi(a + b) = phi(a - b), since (a + b)^2 - (a - b)^2 = 2 epsilon)."""
    a, b = sensitivity / (2.0 * sigma), epsilon * sigma / sensitivity
    return sensitivity / sigma * norm.pdf(a - b)


@pytest.mark.parametrize("delta", DELTAS)
@pytest.mark.parametrize("epsilon", EPSILONS)
def test_analytic_sigma_meets_epsilon_delta_and_is_tight(epsilon, delta):
    sigma = analytic_gaussian_sigma(epsilon, delta, 1.0)
    # The bisection stops with [lo, hi] where the library's profile is > delta at lo and <= delta at hi =
    # sigma, hi - lo <= ANALYTIC_RTOL hi. Both evaluations (the library's, scipy's) are within `err` of the
    # exact profile, so scipy's at sigma is <= delta + 2 err ...
    at_sigma, err = profile(sigma, epsilon)
    assert at_sigma <= delta + 2 * err
    # ... and lower by 2 ANALYTIC_RTOL, below lo by at least ANALYTIC_RTOL sigma, the exact profile rises
    # above its value at lo (> delta - err) by ANALYTIC_RTOL x slope, which here outweighs 4 err: so scipy's
    # profile there is above delta, a violation. No smaller sigma is (epsilon, delta)-DP.
    gain = ANALYTIC_RTOL * slope(sigma, epsilon)
    assert gain > 4 * err
    below, _ = profile(sigma * (1 - 2 * ANALYTIC_RTOL), epsilon)
    assert below > delta


@pytest.mark.parametrize("epsilon", (0.1, 0.25, 0.5, 0.9, 0.99))
@pytest.mark.parametrize("delta", DELTAS)
def test_analytic_is_below_classic_where_classic_is_a_proof(epsilon, delta):
    # For epsilon < 1 Dwork & Roth's sigma is (epsilon, delta)-DP (Thm A.1), and the analytic one is the least
    # that is: so it can only be smaller.
    classic = gaussian_mechanism_sigma(epsilon, delta, 1.0)
    met, err = profile(classic, epsilon)
    assert met <= delta + err
    assert analytic_gaussian_sigma(epsilon, delta, 1.0) < classic


# The classic sigma against the exact profile at epsilon >= 1, where it is no proof: whether it meets
# (epsilon, delta), as computed (scipy; every margin is 20% of delta or more, 1e12 times the rounding bound).
CLASSIC_AT_LARGE_EPSILON = [
    (1.0, 1e-5, True),    # profile 4.1e-8: meets with room to spare, though nothing proves it
    (4.0, 1e-5, True),    # 6.8e-7
    (8.0, 1e-5, True),    # 8.0e-6: meets, barely
    (8.0, 1e-3, False),   # 1.3e-3 > 1e-3
    (16.0, 1e-3, False),  # 3.2e-2
    (16.0, 1e-5, False),  # 3.4e-4: 34 x delta
    (16.0, 1e-10, False),  # 2.3e-9
]


@pytest.mark.parametrize(("epsilon", "delta", "meets"), CLASSIC_AT_LARGE_EPSILON)
def test_classic_at_large_epsilon_is_not_always_private(epsilon, delta, meets):
    classic = gaussian_mechanism_sigma(epsilon, delta, 1.0)
    analytic = analytic_gaussian_sigma(epsilon, delta, 1.0)
    at_classic, err = profile(classic, epsilon)
    assert (at_classic <= delta) == meets
    assert abs(at_classic - delta) > 4 * err  # the fact does not hang on rounding (either evaluation's)
    # The analytic sigma is the least that meets it: below classic exactly where classic meets.
    assert (analytic < classic) == meets


def test_analytic_sigma_at_a_huge_epsilon_has_no_overflow():
    # e^1e9 overflows any float; the far term goes through its log. At epsilon -> inf the profile tends to
    # Phi(a - b), so delta = 1/2 needs a = b: sigma = D / sqrt(2 epsilon), while the classic formula falls as
    # 1 / epsilon and gives 1e-9, far too little.
    epsilon, delta = 1e9, 0.5
    sigma = analytic_gaussian_sigma(epsilon, delta, 1.0)
    assert sigma == pytest.approx(1 / math.sqrt(2 * epsilon), rel=2 * ANALYTIC_RTOL)
    assert gaussian_mechanism_sigma(epsilon, delta, 1.0) < 1e-4 * sigma
    at_sigma, err = profile(sigma, epsilon)
    assert at_sigma <= delta + 2 * err


@pytest.mark.parametrize("epsilon", (0.5, 1.0, 4.0, 8.0))
def test_opacus_gdp_dual_inverts_the_analytic_sigma(epsilon):
    # opacus has no analytic calibration, but its GDP dual (Dong, Roth & Su 2022, Cor. 2.13) is the same
    # profile: noise D / mu is mu-GDP, and eps_from_mu solves delta_eps_mu(eps, mu) = delta for eps by brentq.
    from opacus.accountants.analysis.gdp import eps_from_mu

    delta = 1e-5
    sigma = analytic_gaussian_sigma(epsilon, delta, 1.0)
    eps = eps_from_mu(mu=1 / sigma, delta=delta)
    # sigma is up to ANALYTIC_RTOL above the exact root, which lowers the epsilon met by
    # ANALYTIC_RTOL x slope / |d delta / d eps|, with d delta / d eps = -e^eps Phi(-a - b); brentq stops within
    # xtol 2e-12 + 4 x 8.9e-16 x eps (scipy's defaults).
    a, b = 1 / (2 * sigma), epsilon * sigma
    d_eps = ANALYTIC_RTOL * slope(sigma, epsilon) / math.exp(epsilon + norm.logcdf(-a - b))
    assert epsilon - d_eps - 2e-12 - 4 * 8.9e-16 * epsilon <= eps <= epsilon + 2e-12 + 4 * 8.9e-16 * epsilon


def test_noise_sigma_chooses_by_name_and_scales_with_sensitivity():
    assert MECHANISMS == ("classic", "analytic")
    assert noise_sigma("classic", 0.5, 1e-5, 2.0) == gaussian_mechanism_sigma(0.5, 1e-5, 2.0)
    assert noise_sigma("analytic", 0.5, 1e-5, 2.0) == analytic_gaussian_sigma(0.5, 1e-5, 2.0)
    # The root is found for sensitivity 1 and scaled: exactly linear, 0 without sensitivity.
    assert analytic_gaussian_sigma(1.0, 1e-5, 3.0) == 3 * analytic_gaussian_sigma(1.0, 1e-5, 1.0)
    assert analytic_gaussian_sigma(1.0, 1e-5, 0.0) == 0.0
    with pytest.raises(ValueError, match=r"DP mechanism must be one of \('classic', 'analytic'\), got 'laplace'"):
        noise_sigma("laplace", 1.0, 1e-5, 1.0)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_privatize_and_data_stats_use_the_chosen_mechanism(mechanism):
    g = torch.Generator().manual_seed(5)
    x, labels = torch.randn(40, 3, generator=g), torch.randint(0, 2, (40,), generator=g)
    # sensitivity sqrt(1 + R^2 + R^4) at R = 5 (privatize): sqrt(651)
    expected = noise_sigma(mechanism, 1.0, 1e-5, math.sqrt(651.0))
    _, sigma = privatize(x, labels, 2, 5.0, 1.0, 1e-5, torch.Generator().manual_seed(0), mechanism=mechanism)
    assert sigma == expected
    _, sigma = DataStats(dp_epsilon=1.0, dp_mechanism=mechanism).summarize(x.double(), labels, 2, seed=0)
    assert sigma == expected


def test_data_stats_rejects_an_unknown_mechanism_naming_the_key():
    with pytest.raises(ValueError, match=r"aggregator.data_stats.dp_mechanism must be one of "
                                         r"\('classic', 'analytic'\), got 'exact'"):
        DataStats(dp_mechanism="exact")
    assert DataStats().dp_mechanism == "analytic"
