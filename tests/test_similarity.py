"""Similarity and weight solvers: closed forms vs sampling and brute force, FedAvg at gamma = 0, DP noise."""
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from celora.fl.aggregators import weighted_average
from celora.privacy.stats import MECHANISMS, clip_rows, gaussian_mechanism_sigma, noise_sigma, privatize
from celora.similarity import (
    ClassStats,
    class_gaussians,
    combined_distance,
    data_distance,
    log_expected_kernel,
    median_bandwidth,
    mix,
    mmd2_mixtures,
    param_distance,
    project_simplex,
    simplex_weights,
    softmax_weights,
)

from tolerance import assert_deep_close, deep_approx, gamma, simplex_sum_tol

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _stats(counts, means, vars_):
    return ClassStats(*(torch.tensor(t, dtype=F64) for t in (counts, means, vars_)))


def _random_stats(g, classes=3, dim=4, absent=()):
    counts = torch.randint(5, 50, (classes,), generator=g).double()
    counts[list(absent)] = 0.0
    means = torch.randn(classes, dim, generator=g, dtype=F64)
    vars_ = torch.rand(classes, dim, generator=g, dtype=F64) + 0.1
    return ClassStats(counts, means, vars_)


def _sample_mixture(stats, n, g):
    labels = torch.multinomial(stats.counts / stats.counts.sum(), n, replacement=True, generator=g)
    noise = torch.randn(n, stats.means.shape[1], generator=g, dtype=F64)
    return stats.means[labels] + noise * stats.vars[labels].sqrt()


def _mmd2_linear(x, y, length):
    """Unbiased linear-time MMD^2 (Gretton et al., 2012, Lemma 14) and its exact standard error.

    Draws are paired (z_i, z_{m+i}); h = k(x, x') + k(y, y') - k(x, y') - k(x', y) is i.i.d. over
    the m pairs, so the estimate is a plain sample mean with standard error sd(h) / sqrt(m).
    """
    m = len(x) // 2

    def k(a, b):
        return torch.exp(-((a - b) ** 2).sum(1) / (2 * length**2))

    x1, x2, y1, y2 = x[:m], x[m:2 * m], y[:m], y[m:2 * m]
    h = k(x1, x2) + k(y1, y2) - k(x1, y2) - k(x2, y1)
    return h.mean().item(), h.std().item() / math.sqrt(m)


# --- class summaries -------------------------------------------------------------------------


def _moment_tols(x):
    """How far two float64 evaluations, in any order, of the per-feature mean and (divide by n) variance of
    x [n, d] can be apart. The mean: an n-term sum and a division, gamma(n + 1) mean|x| each. The variance,
    centred or as E[x^2] - mean^2: at most 2n + 3 roundings on terms of size mean(x^2), gamma(2n + 3) 2 mean(x^2)
    each. Two evaluations: twice each bound."""
    n = x.shape[0]
    return 2 * gamma(n + 1, x.dtype) * x.abs().mean(0), 4 * gamma(2 * n + 3, x.dtype) * (x**2).mean(0)



def test_class_gaussians_matches_numpy_and_handles_tiny_classes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g, dtype=F64) * 3 + 10
    labels = torch.tensor([0] * 25 + [2] * 14 + [3])  # class 1 absent, class 3 a single example
    stats = class_gaussians(x, labels, num_classes=4, var_floor=1e-6)

    assert stats.counts.tolist() == [25.0, 0.0, 14.0, 1.0]
    for c in (0, 2):
        xc = x[labels == c]
        mean_tol, var_tol = _moment_tols(xc)
        assert ((stats.means[c] - torch.from_numpy(xc.numpy().mean(0))).abs() <= mean_tol).all()
        assert ((stats.vars[c] - torch.from_numpy(xc.numpy().var(0))).abs() <= var_tol).all()
    assert torch.equal(stats.means[3], x[-1])
    assert torch.all(stats.vars[1] == 1e-6) and torch.all(stats.vars[3] == 1e-6)


def test_from_sufficient_agrees_with_direct_moments():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 3, generator=g, dtype=F64)
    labels = torch.randint(0, 4, (60,), generator=g)
    labels[labels == 2] = 1  # leave class 2 empty
    direct = class_gaussians(x, labels, 4)
    onehot = torch.nn.functional.one_hot(labels, 4).double()
    via = ClassStats.from_sufficient(onehot.sum(0), onehot.T @ x, onehot.T @ x**2)
    assert torch.equal(via.counts, direct.counts)
    for c in (0, 1, 3):
        mean_tol, var_tol = _moment_tols(x[labels == c])
        assert ((via.means[c] - direct.means[c]).abs() <= mean_tol).all()
        assert ((via.vars[c] - direct.vars[c]).abs() <= var_tol).all()


def test_nbytes_counts_counts_means_and_vars():
    stats = class_gaussians(torch.zeros(2, 384), torch.tensor([0, 1]), num_classes=10)
    # 10 counts + 10 x 384 means + 10 x 384 variances = 7,690 values, 4 bytes each in fp32.
    assert stats.nbytes() == 30_760
    assert stats.nbytes(dtype_bytes=2) == 15_380


def test_bad_labels_and_shapes_are_rejected():
    with pytest.raises(ValueError, match="labels must be"):
        class_gaussians(torch.zeros(2, 3), torch.tensor([0, 5]), num_classes=3)
    with pytest.raises(ValueError, match=r"need counts \[C\], means \[C, d\]"):
        ClassStats(torch.ones(3), torch.zeros(2, 4), torch.ones(2, 4))


# --- Gaussian mechanism ----------------------------------------------------------------------


def test_gaussian_mechanism_sigma_matches_hand_computation():
    # ln(1.25 / 1e-5) = ln(125,000) = 11.7360690; sqrt(2 x 11.7360690) = 4.8448053; / 0.5 = 9.6896105.
    # (rel=1e-7: the hand computation keeps 8 significant digits, so it is within 5e-8 relatively)
    assert gaussian_mechanism_sigma(0.5, 1e-5, 1.0) == pytest.approx(9.6896105, rel=1e-7)
    # Linear in the sensitivity and in 1 / epsilon.
    assert gaussian_mechanism_sigma(0.25, 1e-5, 3.0) == pytest.approx(6 * 9.6896105, rel=1e-7)
    assert gaussian_mechanism_sigma(0.5, 1e-5, 0.0) == 0.0


@pytest.mark.parametrize(("epsilon", "delta", "match"), [
    (0.0, 1e-5, "epsilon must be > 0"),
    (-1.0, 1e-5, "epsilon must be > 0"),
    (float("nan"), 1e-5, "epsilon must be > 0"),
    (0.5, 0.0, r"delta must be in \(0, 1\)"),
    (0.5, 1.0, r"delta must be in \(0, 1\)"),
    (0.5, -0.1, r"delta must be in \(0, 1\)"),
])
def test_gaussian_mechanism_rejects_bad_privacy_parameters(epsilon, delta, match):
    with pytest.raises(ValueError, match=match):
        gaussian_mechanism_sigma(epsilon, delta, 1.0)
    for mechanism in MECHANISMS:
        with pytest.raises(ValueError, match=match):
            noise_sigma(mechanism, epsilon, delta, 1.0)
        with pytest.raises(ValueError, match=match):
            privatize(torch.zeros(3, 2), torch.tensor([0, 1, 1]), 2, 1.0, epsilon, delta, torch.Generator(),
                      mechanism=mechanism)


def test_clip_rows_bounds_norms_and_keeps_short_rows():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, 6, generator=g, dtype=F64) * torch.logspace(-2, 1, 200, dtype=F64)[:, None]
    clipped = clip_rows(x, 1.5)
    norms, clipped_norms = x.norm(dim=1), clipped.norm(dim=1)
    # x 1.5 / |x|: |x| and the clipped norm each within gamma(d + 3) relatively (d squares, a root, a
    # quotient, a product), so the clipped norm is 1.5 within 2 gamma(d + 3) of 1.5
    rel = 2 * gamma(x.shape[1] + 3, F64)
    assert torch.all(clipped_norms <= 1.5 * (1 + rel))
    short = norms <= 1.5
    assert torch.equal(clipped[short], x[short])
    assert torch.all((clipped_norms[~short] - 1.5).abs() <= 1.5 * rel)
    # Direction is kept: the clipped rows are positive multiples of the originals (a dot product and two
    # norms of d terms, each clipped element one rounding off: within gamma(3d + 6) of 1)
    cos = torch.nn.functional.cosine_similarity(clipped, x)
    assert torch.all((cos - 1).abs() <= gamma(3 * x.shape[1] + 6, F64))
    assert torch.equal(clip_rows(torch.zeros(1, 3), 1.0), torch.zeros(1, 3, dtype=F64))


def test_privatize_noise_std_matches_sigma():
    # All-zero features make the released counts and sums pure noise around (n_c, 0); the large
    # counts keep the count floor and the mean projection inactive, so counts - n_c and
    # means * counts are exactly the added noise. 20 classes x (1 + 4) values x 80 draws = 8,000
    # samples: the std of an estimated std is about 1 / sqrt(2 x 8,000) = 0.8%, so 4% is 5 s.e.
    num_classes, dim, per_class = 20, 4, 2000
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    x = torch.zeros(len(labels), dim)
    g = torch.Generator().manual_seed(3)
    noise = []
    for _ in range(80):
        stats, sigma = privatize(x, labels, num_classes, clip_norm=1.0, epsilon=0.5, delta=1e-5, generator=g,
                                 mechanism="classic")
        noise.append(torch.cat([(stats.counts - per_class)[:, None], stats.means * stats.counts[:, None]], 1))
    noise = torch.stack(noise)
    # Sensitivity sqrt(1 + R^2 + R^4) = sqrt(3) at R = 1: 9.6896105 x 1.7320508 = 16.7828977.
    assert sigma == pytest.approx(16.7828977, rel=1e-7)  # 8 significant digits by hand
    assert noise.std().item() == pytest.approx(sigma, rel=0.04)
    assert abs(noise.mean().item()) < 4 * sigma / math.sqrt(noise.numel())


def test_privatize_is_seeded_clipped_and_near_exact_with_little_noise():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(300, 5, generator=g) * 2
    labels = torch.randint(0, 3, (300,), generator=g)
    a, _ = privatize(x, labels, 3, 1.0, 0.5, 1e-5, torch.Generator().manual_seed(9), mechanism="analytic")
    b, _ = privatize(x, labels, 3, 1.0, 0.5, 1e-5, torch.Generator().manual_seed(9), mechanism="analytic")
    assert torch.equal(a.means, b.means) and torch.equal(a.vars, b.vars) and torch.equal(a.counts, b.counts)
    # means projected into the unit ball: within 2 gamma(d + 3) of norm 1 (test_clip_rows_bounds_norms...)
    assert torch.all(a.means.norm(dim=1) <= 1.0 + 2 * gamma(5 + 3, F64)) and torch.all(a.vars <= 1.0)
    assert torch.all(a.counts >= 1e-3)
    # With negligible noise the release is the class summary of the clipped features (classic: its sigma falls
    # as 1 / epsilon, the analytic one only as 1 / sqrt(2 epsilon), tests/test_dp_calibration.py).
    quiet, sigma = privatize(x, labels, 3, 1.0, 1e9, 0.5, torch.Generator().manual_seed(9), mechanism="classic")
    exact = class_gaussians(clip_rows(x, 1.0), labels, 3)
    assert sigma < 1e-8
    # Each released count, sum and sum of squares moves by its noise, within 6 sigma (2e-9 a value to be
    # beyond), and a mean or variance (a quotient by a count >= 1 of values of size <= R^2 = 1) by at most
    # 4 such moves; on top, the variance as E[x^2] - mean^2 against centred (see _moment_tols).
    noise = 4 * 6 * sigma
    assert torch.all((quiet.counts - exact.counts).abs() <= 6 * sigma)
    assert torch.all((quiet.means - exact.means).abs() <= noise + 2 * gamma(len(x) + 1, F64))
    assert torch.all((quiet.vars - exact.vars).abs() <= noise + 4 * gamma(2 * len(x) + 3, F64))


# --- closed-form kernel and MMD --------------------------------------------------------------


def test_log_expected_kernel_equals_the_matrix_formula_and_broadcasts():
    g = torch.Generator().manual_seed(5)
    m1, m2 = torch.randn(3, 4, generator=g, dtype=F64), torch.randn(2, 4, generator=g, dtype=F64)
    v1, v2 = torch.rand(3, 4, generator=g, dtype=F64), torch.rand(2, 4, generator=g, dtype=F64)
    length = 0.8
    table = log_expected_kernel(m1[:, None], v1[:, None], m2[None], v2[None], length)
    assert table.shape == (3, 2)
    eye = torch.eye(4, dtype=F64)
    for a in range(3):
        for b in range(2):
            s, mu = torch.diag(v1[a] + v2[b]), m1[a] - m2[b]
            direct = (torch.linalg.det(eye + s / length**2) ** -0.5
                      * torch.exp(-0.5 * mu @ torch.linalg.solve(s + length**2 * eye, mu)))
            # two closed forms, one through a 4 x 4 determinant and solve: DEEP roundings (tests/tolerance.py)
            assert table[a, b].exp().item() == deep_approx(direct.item())


def test_log_expected_kernel_matches_sampling():
    # 200,000 independent pairs: tolerance 4 standard errors of the sample mean.
    g = torch.Generator().manual_seed(6)
    m1, v1 = torch.tensor([0.0, 1.0, -0.5], dtype=F64), torch.tensor([0.3, 1.2, 0.5], dtype=F64)
    m2, v2 = torch.tensor([0.8, 0.2, 0.0], dtype=F64), torch.tensor([0.6, 0.2, 0.9], dtype=F64)
    n, length = 200_000, 1.3
    x = m1 + torch.randn(n, 3, generator=g, dtype=F64) * v1.sqrt()
    y = m2 + torch.randn(n, 3, generator=g, dtype=F64) * v2.sqrt()
    k = torch.exp(-((x - y) ** 2).sum(1) / (2 * length**2))
    closed = log_expected_kernel(m1, v1, m2, v2, length).exp().item()
    assert abs(closed - k.mean().item()) < 4 * k.std().item() / math.sqrt(n)


COMPONENTS = dict(means=[[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]], vars_=[[0.3, 0.5], [0.4, 0.2], [0.6, 0.6]])


@pytest.mark.parametrize(("first", "second"), [
    # Label proportions differ, components identical.
    (_stats([60, 30, 10], **COMPONENTS), _stats([10, 30, 60], **COMPONENTS)),
    # Same proportions, every class mean shifted.
    (_stats([40, 30, 30], **COMPONENTS),
     _stats([40, 30, 30], [[0.7, 0.0], [2.7, 0.0], [0.7, 2.0]], COMPONENTS["vars_"])),
], ids=["label_skew", "feature_shift"])
def test_mmd2_matches_unbiased_sample_estimate(first, second):
    # 2,000,000 seeded draws per mixture, paired into 1,000,000 i.i.d. terms of the linear-time
    # estimator (the quadratic U-statistic would need ~10^5 draws and ~3 x 10^10 kernel
    # evaluations for the same precision). Its standard error is about 0.0006 here: 0.4% (label
    # skew, MMD^2 = 0.157) and 1.3% (feature shift, 0.042) of the closed form. The closed form
    # must lie within 4 standard errors, a band that must stay under 10% of the value for the
    # check to mean anything.
    g = torch.Generator().manual_seed(7)
    n, length = 2_000_000, 1.0
    estimate, se = _mmd2_linear(_sample_mixture(first, n, g), _sample_mixture(second, n, g), length)
    closed = mmd2_mixtures(first, second, length)
    assert 4 * se < 0.1 * closed
    assert abs(closed - estimate) < 4 * se


def test_mmd2_is_zero_for_identical_stats_and_symmetric():
    g = torch.Generator().manual_seed(8)
    a, b = _random_stats(g), _random_stats(g)
    assert mmd2_mixtures(a, a, 1.0) == 0.0
    assert mmd2_mixtures(a, b, 1.0) > 0.0
    # the same sums of kernels (each <= 1, weights summing to 1) in another order: DEEP roundings of 1
    assert mmd2_mixtures(a, b, 1.0) == deep_approx(mmd2_mixtures(b, a, 1.0))


def test_mmd2_grows_with_label_skew_quadratically():
    # Mean embeddings are linear in the mixture weights, so moving the proportions a fraction t
    # of the way from uniform to one class gives MMD^2(t) = t^2 MMD^2(1) exactly.
    uniform = _stats([1, 1, 1], **COMPONENTS)
    skews = [_stats([1 - t + 3 * t, 1 - t, 1 - t], **COMPONENTS) for t in (0.0, 0.25, 0.5, 0.75, 1.0)]
    values = [mmd2_mixtures(uniform, s, 1.0) for s in skews]
    assert values[0] == 0.0
    assert all(a < b for a, b in zip(values, values[1:]))
    for t, v in zip((0.25, 0.5, 0.75), values[1:4]):
        # exactly t^2 in exact arithmetic; in float64 DEEP roundings of the kernel sums (<= 1) apart
        assert v == deep_approx(t**2 * values[-1])


def test_mmd2_rejects_bad_bandwidth_and_empty_clients():
    a = _stats([1, 1, 1], **COMPONENTS)
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        mmd2_mixtures(a, a, 0.0)
    with pytest.raises(ValueError, match="positive sum"):
        mmd2_mixtures(a, _stats([0, 0, 0], **COMPONENTS), 1.0)


def test_data_distance_is_a_normalised_symmetric_matrix():
    g = torch.Generator().manual_seed(9)
    stats = [_random_stats(g, absent=[i % 3] if i % 2 else []) for i in range(6)]
    dist = data_distance(stats)
    assert dist.shape == (6, 6) and dist.dtype == F64
    assert torch.equal(dist, dist.T)
    assert torch.all(dist.diagonal() == 0)
    assert dist.min() >= 0 and dist.max() == 1.0
    assert torch.equal(data_distance(stats, bandwidth=2.0), data_distance(stats, bandwidth=2.0).T)


def test_data_distance_ignores_absent_classes_and_is_scale_free_with_the_median_bandwidth():
    g = torch.Generator().manual_seed(10)
    stats = [_random_stats(g, absent=[1]), _random_stats(g), _random_stats(g, absent=[0, 2])]
    dist = data_distance(stats)
    # The placeholder moments of a class with count 0 must not matter.
    moved = ClassStats(stats[0].counts, stats[0].means.clone(), stats[0].vars.clone())
    moved.means[1] += 100.0
    moved.vars[1] *= 50.0
    assert torch.equal(data_distance([moved, *stats[1:]]), dist)  # exact: a class of weight 0 adds exactly 0
    # Rescaling every feature by s rescales the median bandwidth by s and leaves D unchanged.
    scaled = [ClassStats(s.counts, 3.0 * s.means, 9.0 * s.vars) for s in stats]
    assert median_bandwidth(scaled) == deep_approx(3.0 * median_bandwidth(stats))
    assert_deep_close(data_distance(scaled), dist)  # D is normalised to at most 1


def test_data_distance_of_identical_clients_is_all_zero():
    a = _stats([3, 1, 2], **COMPONENTS)
    assert torch.equal(data_distance([a, a, a]), torch.zeros(3, 3, dtype=F64))


# --- parameter distance ----------------------------------------------------------------------


def test_param_distance_reference_angles_and_zero_vector():
    u = torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [-3.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 0.0]])
    dist = param_distance(u)
    # float32 vectors: unit vectors within gamma(d + 2) of length 1, their dot within gamma(d) more, and
    # (1 - cos) / 2 halves that: d = 3
    tol = gamma(2 * 3 + 4, torch.float32)
    assert dist[0, 1] == pytest.approx(0.0, abs=tol)  # same direction, any length
    assert dist[0, 2] == pytest.approx(1.0, abs=tol)  # opposite
    assert dist[0, 3] == pytest.approx(0.5, abs=tol)  # orthogonal
    assert torch.all(dist[4, :4] == 0.5) and torch.all(dist[:4, 4] == 0.5)
    assert torch.all(dist.diagonal() == 0) and torch.equal(dist, dist.T)
    assert dist.min() >= 0 and dist.max() <= 1


# --- simplex projection and weight solvers ---------------------------------------------------


def _on_simplex(w, magnitude):
    """Non-negative rows summing to 1 within the rounding of weights from inputs of size <= magnitude."""
    return bool(torch.all(w >= 0)) and bool(torch.all((w.sum(-1) - 1).abs() <= simplex_sum_tol(w.shape[-1], magnitude)))


def test_project_simplex_matches_a_brute_force_qp():
    rng = np.random.default_rng(11)
    for _ in range(30):
        k = int(rng.integers(2, 9))
        v = rng.normal(scale=rng.choice([0.1, 1.0, 5.0]), size=k)
        sums_to_one = {"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones(k)}
        result = minimize(lambda w: 0.5 * np.sum((w - v) ** 2), np.full(k, 1.0 / k), jac=lambda w: w - v,
                          method="SLSQP", bounds=[(0.0, 1.0)] * k, constraints=[sums_to_one],
                          options={"ftol": 1e-12, "maxiter": 500})
        assert result.success
        w = project_simplex(torch.from_numpy(v))
        # SLSQP stops at an objective within ftol of the optimum; the objective is 1-strongly convex, so
        # |w - w*| <= sqrt(2 ftol)
        np.testing.assert_allclose(w.numpy(), result.x, atol=math.sqrt(2 * 1e-12))


def test_project_simplex_satisfies_the_optimality_conditions_exactly():
    # KKT: w = max(v - theta, 0) for one theta, i.e. v - w is constant on the support and v <= theta off it.
    g = torch.Generator().manual_seed(12)
    v = torch.randn(200, 7, generator=g, dtype=F64) * torch.logspace(-2, 1, 200, dtype=F64)[:, None]
    w = project_simplex(v)
    assert _on_simplex(w, float(v.abs().max()))
    for vi, wi in zip(v, w):
        support = wi > 0
        theta = (vi - wi)[support]
        # w = v - theta rounds once and v - w once more: each within u (|v| + |theta|) of theta
        tol = gamma(2, F64) * (vi.abs().max() + theta.abs().max())
        assert torch.all((theta - theta[0]).abs() <= 2 * tol)
        assert torch.all(vi[~support] <= theta[0] + tol)


def test_project_simplex_is_row_wise_and_fixes_simplex_points():
    g = torch.Generator().manual_seed(13)
    v = torch.randn(2, 3, 5, generator=g, dtype=F64)
    batched = project_simplex(v)
    assert batched.shape == v.shape
    assert torch.equal(batched[1, 2], project_simplex(v[1, 2]))
    p = torch.distributions.Dirichlet(torch.ones(5, dtype=F64)).sample()
    # p sums to 1 only to its own rounding, so theta is that off-by plus the projection's rounding
    assert torch.all((project_simplex(p) - p).abs() <= (p.sum() - 1).abs() + simplex_sum_tol(5, 1.0))


def test_gamma_zero_is_exactly_fedavg():
    g = torch.Generator().manual_seed(14)
    sizes = [30, 5, 12, 50, 3]
    p = torch.tensor(sizes, dtype=F64) / sum(sizes)
    states = [{"c": torch.randn(4, 4, generator=g, dtype=F64), "h": torch.randn(3, generator=g, dtype=F64)}
              for _ in sizes]
    dist = param_distance(torch.randn(5, 7, generator=g, dtype=F64))
    weights = simplex_weights(dist, p, gamma=0.0)
    assert all(torch.equal(row, p) for row in weights)
    fedavg = weighted_average(states, sizes)
    for personal in mix(states, weights):
        for key in fedavg:
            # the same weighted sum of 5 states in another order: each within gamma(6) max|x| of the exact
            bound = 2 * gamma(len(sizes) + 1, F64) * torch.stack([s[key].abs() for s in states]).max(0).values
            assert torch.all((personal[key] - fedavg[key]).abs() <= bound)


def test_every_weight_row_is_on_the_simplex():
    g = torch.Generator().manual_seed(15)
    for _ in range(200):
        k = int(torch.randint(1, 13, (1,), generator=g))
        raw = torch.rand(k, k, generator=g, dtype=F64)
        dist = combined_distance(raw, raw.T, lam=0.5)
        p = torch.distributions.Dirichlet(torch.ones(k, dtype=F64)).sample()
        scale = 10 ** (6 * torch.rand(2, generator=g, dtype=F64) - 3)  # gamma, tau in [1e-3, 1e3]
        # inputs p - gamma / 2 D with D in [0, 1]
        assert _on_simplex(simplex_weights(dist, p, float(scale[0])), 1 + float(scale[0]) / 2)
        assert _on_simplex(softmax_weights(dist, p, float(scale[1])), 0.0)


def test_weight_solvers_limits():
    g = torch.Generator().manual_seed(16)
    raw = torch.rand(4, 4, generator=g, dtype=F64) + 0.1
    dist = combined_distance(raw, raw.T, lam=1.0)
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    eye = torch.eye(4, dtype=F64)
    # A large gamma keeps only the client itself (its distance is the unique minimum, 0) ...
    # (the projection keeps one entry, p_i - (p_i - 1): within the rounding of a row sum)
    assert torch.all((simplex_weights(dist, p, gamma=100.0) - eye).abs() <= simplex_sum_tol(4, 1 + 50 * 1.1))
    # exact: exp(-D / tau) <= exp(-1000) underflows to 0 in float64
    assert torch.equal(softmax_weights(dist, p, tau=1e-4), eye)
    # ... and a large tau forgets the distances: w_ij = p_j exp(-D_ij / tau) / sum_k p_k exp(-D_ik / tau)
    # moves from p_j by at most p_j (max D - min D) / tau, plus the softmax's rounding
    drift = float(p.max() * dist.max() / 1e9) + simplex_sum_tol(4, 0.0)
    assert torch.all((softmax_weights(dist, p, tau=1e9) - p.expand(4, 4)).abs() <= drift)
    # A client with p_j = 0 never receives weight from softmax.
    q = torch.tensor([0.0, 0.5, 0.5, 0.0], dtype=F64)
    assert torch.all(softmax_weights(dist, q, tau=0.1)[:, [0, 3]] == 0)


def test_weight_solvers_reject_bad_arguments():
    dist, p = torch.zeros(3, 3, dtype=F64), torch.full((3,), 1 / 3, dtype=F64)
    with pytest.raises(ValueError, match="tau must be > 0"):
        softmax_weights(dist, p, 0.0)
    with pytest.raises(ValueError, match="tau must be > 0"):
        softmax_weights(dist, p, -1.0)
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        simplex_weights(dist, p, -0.1)
    with pytest.raises(ValueError, match="probability vector"):
        simplex_weights(dist, torch.tensor([0.5, 0.6, -0.1], dtype=F64), 1.0)
    with pytest.raises(ValueError, match=r"need p \[K\] and D \[K, K\]"):
        softmax_weights(torch.zeros(2, 2), p, 1.0)


def test_combined_distance_interpolates_with_zero_diagonal():
    g = torch.Generator().manual_seed(17)
    d_data, d_param = torch.rand(4, 4, generator=g, dtype=F64), torch.rand(4, 4, generator=g, dtype=F64)
    mixed = combined_distance(d_data, d_param, 0.25)
    expected = 0.25 * d_data + 0.75 * d_param
    assert torch.all(mixed.diagonal() == 0)
    off = ~torch.eye(4, dtype=torch.bool)
    assert torch.equal(mixed[off], expected[off])  # exact: the same two products and one sum
    assert torch.equal(combined_distance(d_data, d_param, 1.0)[off], d_data[off])
    assert torch.equal(combined_distance(d_data, d_param, 0.0)[off], d_param[off])
    for lam in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"lam must be in \[0, 1\]"):
            combined_distance(d_data, d_param, lam)


def test_mix_keeps_dtypes_and_identity_returns_the_inputs():
    g = torch.Generator().manual_seed(18)
    states = [{"c": torch.randn(3, 3, generator=g), "b": torch.randn(2, generator=g).to(torch.bfloat16)}
              for _ in range(3)]
    out = mix(states, torch.eye(3, dtype=F64))
    for s, o in zip(states, out):
        assert o["c"].dtype == torch.float32 and o["b"].dtype == torch.bfloat16
        assert torch.equal(o["c"], s["c"]) and torch.equal(o["b"], s["b"])
    # Outputs are fresh tensors: editing one client's state touches nobody else's.
    out[0]["c"].zero_()
    assert not torch.equal(out[1]["c"], out[0]["c"]) and torch.any(states[0]["c"] != 0)
    with pytest.raises(ValueError, match="need W"):
        mix(states, torch.eye(2))
