"""Client similarity (class-Gaussian MMD, update cosine) and the personalised weights built on it."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

VAR_FLOOR = 1e-6
_TINY = torch.finfo(torch.float64).tiny


@dataclass(frozen=True)
class ClassStats:
    """One client's per-class summary (float64): counts [C], means [C, d], diagonal variances [C, d].

    A class with count 0 carries placeholder moments and gets zero mixture weight downstream.
    """

    counts: Tensor
    means: Tensor
    vars: Tensor

    def __post_init__(self) -> None:
        c = self.counts.shape[0] if self.counts.dim() == 1 else -1
        if c < 0 or self.means.dim() != 2 or self.means.shape[0] != c or self.vars.shape != self.means.shape:
            raise ValueError(f"need counts [C], means [C, d], vars [C, d], got {tuple(self.counts.shape)}, "
                             f"{tuple(self.means.shape)}, {tuple(self.vars.shape)}")

    @classmethod
    def from_sufficient(cls, counts: Tensor, sums: Tensor, sumsqs: Tensor,
                        var_floor: float = VAR_FLOOR) -> ClassStats:
        """Moments from per-class (count [C], sum [C, d], sum of squares [C, d]); count <= 0 means absent."""
        counts = counts.double()
        present = (counts > 0).unsqueeze(1)
        # Fractional counts are legitimate (noisy DP releases), so only non-positive ones are replaced.
        safe = torch.where(present, counts.unsqueeze(1), 1.0)
        means = torch.where(present, sums.double() / safe, 0.0)
        vars_ = torch.where(present, sumsqs.double() / safe - means**2, 0.0)
        return cls(counts.clamp_min(0.0), means, vars_.clamp_min(var_floor))

    def nbytes(self, dtype_bytes: int = 4) -> int:
        """Bytes this summary costs to upload: counts, means and variances at dtype_bytes per value."""
        return (self.counts.numel() + self.means.numel() + self.vars.numel()) * dtype_bytes


def class_gaussians(features: Tensor, labels: Tensor, num_classes: int,
                    var_floor: float = VAR_FLOOR) -> ClassStats:
    """Per-class count, mean and maximum-likelihood (divide by n) diagonal variance of the features."""
    x = features.double()
    check_labels(labels, num_classes, x.shape[0])
    counts = torch.bincount(labels, minlength=num_classes).double()
    safe = counts.clamp_min(1.0).unsqueeze(1)
    means = torch.zeros(num_classes, x.shape[1], dtype=torch.float64).index_add_(0, labels, x) / safe
    # Centred second moment: sumsq/n - mean^2 would cancel badly when |mean| >> std.
    centred = (x - means[labels]) ** 2
    vars_ = torch.zeros_like(means).index_add_(0, labels, centred) / safe
    return ClassStats(counts, means, vars_.clamp_min(var_floor))


def log_expected_kernel(m1: Tensor, v1: Tensor, m2: Tensor, v2: Tensor, bandwidth: float) -> Tensor:
    """log E k(X, Y) for X ~ N(m1, diag v1), Y ~ N(m2, diag v2), k(x, y) = exp(-||x - y||^2 / (2 l^2)).

    Closed form det(I + S / l^2)^(-1/2) exp(-1/2 mu^T (S + l^2 I)^(-1) mu) with S = diag(v1 + v2),
    mu = m1 - m2; the last dim is the feature dim, leading dims broadcast (pass [C1, 1, d] and
    [1, C2, d] for a whole table).
    """
    l2 = float(bandwidth) ** 2
    s = v1 + v2
    # Diagonal S turns the log-determinant and the quadratic form into sums over dimensions;
    # log1p keeps precision when the variances are small next to l^2.
    return -0.5 * (torch.log1p(s / l2) + (m1 - m2) ** 2 / (s + l2)).sum(-1)


def _log_weights(stats: ClassStats) -> Tensor:
    """Log label proportions; absent classes get -inf so they drop out of every logsumexp."""
    total = stats.counts.sum()
    if not total > 0:
        raise ValueError("a client's class counts must have a positive sum")
    return torch.log(stats.counts / total)


def _expected_kernel(a: ClassStats, b: ClassStats, bandwidth: float) -> float:
    """E k(X, Y) with X drawn from a's class mixture and Y from b's, summed over class pairs in log space."""
    log_k = log_expected_kernel(a.means[:, None], a.vars[:, None], b.means[None], b.vars[None], bandwidth)
    log_terms = _log_weights(a)[:, None] + _log_weights(b)[None] + log_k
    return math.exp(torch.logsumexp(log_terms.flatten(), dim=0).item())


def _check_bandwidth(bandwidth: float) -> None:
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")


def mmd2_mixtures(stats_i: ClassStats, stats_j: ClassStats, bandwidth: float) -> float:
    """Squared MMD between two clients' class mixtures of diagonal Gaussians (weights = label proportions)."""
    _check_bandwidth(bandwidth)
    value = (_expected_kernel(stats_i, stats_i, bandwidth) + _expected_kernel(stats_j, stats_j, bandwidth)
             - 2.0 * _expected_kernel(stats_i, stats_j, bandwidth))
    # The true value is >= 0; a tiny negative is rounding between near-equal terms.
    return max(value, 0.0)


def median_bandwidth(stats: Sequence[ClassStats]) -> float:
    """Median heuristic on the summaries: sqrt of the median of E||X - Y||^2 over class-component pairs.

    For X, Y from two components a, b, E||X - Y||^2 = ||m_a - m_b||^2 + tr V_a + tr V_b: the
    expected squared distance between samples, which is what the usual sample median heuristic
    measures. The median of mean distances alone would ignore the within-class spread; where
    classes overlap (common for pooled embeddings) that makes l small next to the spread and the
    determinant factor drives every kernel term towards zero. Pairs are the present (count > 0)
    components of all clients, each unordered pair once, a component with itself included.
    """
    means = torch.cat([s.means[s.counts > 0] for s in stats])
    traces = torch.cat([s.vars[s.counts > 0].sum(1) for s in stats])
    if means.shape[0] == 0:
        raise ValueError("median_bandwidth needs at least one class with a positive count")
    dist2 = torch.cdist(means, means, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    sq = dist2 + traces[:, None] + traces[None]
    rows, cols = torch.triu_indices(len(means), len(means))
    return math.sqrt(sq[rows, cols].median().item())


def data_distance(stats: Sequence[ClassStats], bandwidth: float | None = None) -> Tensor:
    """Pairwise squared MMD [K, K] between clients' class mixtures, normalised by its maximum to [0, 1].

    bandwidth=None uses median_bandwidth over all clients. All zeros when every pair is identical.
    """
    length = median_bandwidth(stats) if bandwidth is None else bandwidth
    _check_bandwidth(length)
    dist = mmd2_table(stats, length)
    top = dist.max()
    return dist / top if top > 0 else dist


# Elements of one block of the pairwise log-kernel tensor [rows, K, M, M, d] (float64: 32 MiB).
_BLOCK_ELEMENTS = 2**22


def mmd2_table(stats: Sequence[ClassStats], bandwidth: float) -> Tensor:
    """The squared MMD of every pair of clients [K, K], unnormalised, as tensor operations: each client's
    components padded to the most any client has (padding weighs exp(-inf) = 0), the expected kernel of
    all pairs computed in blocks of rows, then MMD^2_ij = E_ii + E_jj - 2 E_ij, clamped at 0.

    The same numbers as mmd2_mixtures pair by pair (its loop is the reference in the tests), in
    O(K^2 M^2 d) tensor work instead of K^2 Python calls."""
    k, m, d = len(stats), max(s.counts.shape[0] for s in stats), stats[0].means.shape[1]
    log_w = torch.full((k, m), -math.inf, dtype=torch.float64)
    means = torch.zeros(k, m, d, dtype=torch.float64)
    vars_ = torch.ones(k, m, d, dtype=torch.float64)
    for i, s in enumerate(stats):
        c = s.counts.shape[0]
        log_w[i, :c], means[i, :c], vars_[i, :c] = _log_weights(s), s.means, s.vars
    kernel = torch.empty(k, k, dtype=torch.float64)
    rows = max(1, _BLOCK_ELEMENTS // (k * m * m * d))
    for a in range(0, k, rows):
        b = min(k, a + rows)
        log_k = log_expected_kernel(means[a:b, None, :, None], vars_[a:b, None, :, None],
                                    means[None, :, None, :], vars_[None, :, None, :], bandwidth)  # [rows, K, M, M]
        terms = log_w[a:b, None, :, None] + log_w[None, :, None, :] + log_k
        kernel[a:b] = torch.logsumexp(terms.flatten(2), dim=-1).exp()
    kernel = kernel.triu() + kernel.triu(1).T  # E_ij as computed for i <= j: exactly symmetric
    own = kernel.diagonal()
    dist = (own[:, None] + own[None] - 2.0 * kernel).clamp_min(0.0)
    return dist.fill_diagonal_(0.0)


def param_distance(vectors: Tensor) -> Tensor:
    """(1 - cos(u_i, u_j)) / 2 for the rows of vectors [K, p], in [0, 1] with a zero diagonal.

    A zero vector has no direction: its cosine with anything is taken as 0, so its distance to
    every other client is 0.5 (neither alike nor opposite).
    """
    u = vectors.double()
    unit = u / u.norm(dim=1, keepdim=True).clamp_min(_TINY)
    dist = (1.0 - (unit @ unit.T).clamp(-1.0, 1.0)) / 2.0
    return dist.fill_diagonal_(0.0)


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of each row (last dim) onto {w >= 0, sum w = 1}, exact in O(K log K).

    Sort-based algorithm of Duchi et al. (2008), as written by Wang & Carreira-Perpinan (2013):
    w = max(v - theta, 0) with theta chosen so that w sums to 1.
    """
    v = v.double()
    u = torch.sort(v, dim=-1, descending=True).values
    css = u.cumsum(-1) - 1.0
    ks = torch.arange(1, v.shape[-1] + 1, dtype=torch.float64)
    # The support size rho is the last sorted position still above its running threshold; taking
    # the last one (not counting) stays right if rounding flips a comparison near the boundary.
    rho = torch.where(u - css / ks > 0, ks, 0.0).amax(dim=-1, keepdim=True)
    theta = css.gather(-1, rho.long() - 1) / rho
    return (v - theta).clamp_min(0.0)


def _check_weights_inputs(dist: Tensor, p: Tensor) -> None:
    k = p.shape[-1]
    if p.dim() != 1 or dist.shape != (k, k):
        raise ValueError(f"need p [K] and D [K, K], got {tuple(p.shape)} and {tuple(dist.shape)}")
    if (p < 0).any() or abs(p.double().sum().item() - 1.0) > 1e-6:
        raise ValueError("p must be a probability vector (non-negative, summing to 1)")


def simplex_weights(dist: Tensor, p: Tensor, gamma: float) -> Tensor:
    """W [K, K]: row i = argmin over the simplex of ||w - p||^2 + gamma <w, D_i> = proj(p - gamma/2 D_i)."""
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    _check_weights_inputs(dist, p)
    p = p.double()
    if gamma == 0:
        # p is its own projection; returning it directly keeps gamma = 0 bit-identical to FedAvg
        # instead of carrying the projection threshold's rounding.
        return p.expand(len(p), -1).clone()
    return project_simplex(p[None] - gamma / 2.0 * dist.double())


def softmax_weights(dist: Tensor, p: Tensor, tau: float) -> Tensor:
    """W [K, K] with w_ij proportional to p_j exp(-D_ij / tau), normalised in log space."""
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    _check_weights_inputs(dist, p)
    return torch.softmax(torch.log(p.double())[None] - dist.double() / tau, dim=-1)


def combined_distance(d_data: Tensor, d_param: Tensor, lam: float) -> Tensor:
    """D = lam * D_data + (1 - lam) * D_param, zero diagonal; lam = 1 is data only, 0 parameters only."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    dist = lam * d_data.double() + (1.0 - lam) * d_param.double()
    return dist.fill_diagonal_(0.0)


def mix(states: Sequence[Mapping[str, Tensor]], weights: Tensor) -> list[dict[str, Tensor]]:
    """Personalised states: out_i = sum_j W_ij state_j, key by key, accumulated in float64, cast back."""
    if not states or weights.dim() != 2 or weights.shape[1] != len(states):
        raise ValueError(f"need W [M, K] for K = {len(states)} states, got {tuple(weights.shape)}")
    w = weights.double()
    out: list[dict[str, Tensor]] = [{} for _ in range(w.shape[0])]
    for key, ref in states[0].items():
        mixed = torch.tensordot(w, torch.stack([s[key].double() for s in states]), dims=1)
        for i, row in enumerate(mixed):
            out[i][key] = row.to(dtype=ref.dtype, copy=True)
    return out


def check_labels(labels: Tensor, num_classes: int, n: int) -> None:
    if labels.shape != (n,) or (n and (labels.min() < 0 or labels.max() >= num_classes)):
        raise ValueError(f"labels must be [n] = [{n}] integers in [0, {num_classes})")
