"""Round 0's data summaries for data-space similarity: per-class diagonal Gaussians (or GMMs), optionally DP."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from celora.data.batches import Collate, Encoded, eval_batches, eval_order
from celora.fl.engine import Engine, autocast
from celora.privacy.stats import MECHANISMS, privatize
from celora.seeds import STATS_NOISE, STATS_SUBSAMPLE, derive_seed
from celora.similarity import ClassStats, class_gaussians
from celora.tasks import Task

KINDS = ("gaussian", "gmm")


@dataclass
class DataStats:
    """What each client computes once before round 1 and uploads (counted as round-0 uplink).

    kind: `gaussian` (count, mean, variance per class) or `gmm` (a diagonal GMM of `components`
    per class, as the authors' client code fits). With `dp_epsilon` set, features are clipped to
    `clip_norm` and the per-class (count, sum, sum of squares) go through the Gaussian mechanism, its noise
    calibrated by `dp_mechanism` (celora.privacy.stats.noise_sigma): `analytic` (Balle & Wang 2018, the least
    noise that is (epsilon, delta)-DP at any epsilon) or `classic` (Dwork & Roth's bound, a proof for epsilon
    < 1 only; the runs made before this key existed used it).
    """

    kind: str = "gaussian"
    components: int = 2
    max_examples: int | None = 256  # per client, a seeded subsample: one forward pass each
    dp_epsilon: float | None = None
    dp_delta: float = 1e-5
    dp_mechanism: str = "analytic"
    clip_norm: float = 5.0
    batch_size: int = 128

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"aggregator.data_stats.kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "gmm" and self.dp_epsilon is not None:
            raise ValueError("DP data statistics are released for kind=gaussian only; set "
                             "aggregator.data_stats.kind=gaussian or dp_epsilon=null")
        if self.dp_mechanism not in MECHANISMS:
            raise ValueError(f"aggregator.data_stats.dp_mechanism must be one of {MECHANISMS}, got "
                             f"{self.dp_mechanism!r}; set aggregator.data_stats.dp_mechanism=analytic")
        if self.components < 1:
            raise ValueError(f"aggregator.data_stats.components must be >= 1, got {self.components}")

    @torch.no_grad()
    def features(self, model: nn.Module, task: Task, data: Encoded, indices, collate: Collate, seed: int,
                 engine: Engine | None = None):
        """(features [n, d], class ids [n]) of a seeded subsample of the rows: what the task summarises of
        each (the pooled features the head sees; a causal LM's prompt), from the model as it stands (the
        frozen backbone: C = 0 before round 1)."""
        idx = np.asarray(indices)
        if self.max_examples is not None and len(idx) > self.max_examples:
            idx = np.sort(np.random.default_rng(seed).choice(idx, self.max_examples, replace=False))
        model.eval()
        device = next(model.parameters()).device
        order = eval_order(data, idx)
        with autocast(engine):
            feats = [task.features(model, {k: v.to(device) for k, v in batch.items()}).double()
                     for batch in eval_batches(data, idx, self.batch_size, collate)]
        classes = data.classes  # read once: a client view's (celora.data.views) is a list it builds
        return torch.cat(feats).cpu(), torch.tensor([classes[i] for i in order])

    def summarize(self, feats: torch.Tensor, labels: torch.Tensor, num_classes: int,
                  seed: int) -> tuple[ClassStats, float | None]:
        """(summary to upload, DP noise std or None)."""
        if self.dp_epsilon is not None:
            gen = torch.Generator().manual_seed(seed)
            return privatize(feats, labels, num_classes, self.clip_norm, self.dp_epsilon, self.dp_delta, gen,
                             mechanism=self.dp_mechanism)
        if self.kind == "gaussian":
            return class_gaussians(feats, labels, num_classes), None
        return _class_gmms(feats, labels, num_classes, self.components, seed), None


@dataclass
class Collected:
    """What the clients uploaded before round 1: one summary each (client id = position), its bytes, the DP noise."""

    stats: list[ClassStats]
    nbytes: int
    sigma: float | None  # the noise std of the DP release, None without DP


def collect(spec: DataStats, model: nn.Module, task: Task, data: Encoded, rows: Sequence[np.ndarray], collate: Collate,
            num_classes: int, seed: int, value_bytes: int, engine: Engine | None = None,
            advance: Callable[[int], None] | None = None) -> Collected:
    """Each client summarises its training rows with the model as it stands (the frozen backbone: C = 0 before
    round 1), seeded per client, on the engine's device and precision; `value_bytes` is the wire size of one value;
    `advance(1)` after each client (a progress bar)."""
    summaries = []
    for i, mine in enumerate(rows):
        summaries.append(client_summary(spec, model, task, data, mine, collate, num_classes, seed, i, engine))
        if advance is not None:
            advance(1)
    stats = [s for s, _ in summaries]
    return Collected(stats, sum(s.nbytes(value_bytes) for s in stats), summaries[0][1] if summaries else None)


def client_summary(spec: DataStats, model: nn.Module, task: Task, data: Encoded, rows: np.ndarray, collate: Collate,
                   num_classes: int, seed: int, client: int,
                   engine: Engine | None = None) -> tuple[ClassStats, float | None]:
    """Client `client`'s summary of its training rows, from its own seed streams: (summary, DP noise std or None)."""
    feats, labels = spec.features(model, task, data, rows, collate, derive_seed(seed, STATS_SUBSAMPLE, client), engine)
    return spec.summarize(feats, labels, num_classes, derive_seed(seed, STATS_NOISE, client))


def _class_gmms(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int, seed: int) -> ClassStats:
    """Each class as up to k weighted diagonal Gaussians; the MMD treats them as mixture components."""
    from sklearn.mixture import GaussianMixture

    counts, means, vars_ = [], [], []
    for c in range(num_classes):
        x = feats[labels == c].numpy()
        if len(x) == 0:
            continue
        n = min(k, len(x))
        if n == 1:
            counts.append(np.array([len(x)], float)), means.append(x.mean(0, keepdims=True))
            vars_.append(x.var(0, keepdims=True))
            continue
        gmm = GaussianMixture(n, covariance_type="diag", random_state=seed % 2**32, reg_covar=1e-6).fit(x)
        counts.append(len(x) * gmm.weights_), means.append(gmm.means_), vars_.append(gmm.covariances_)
    t = lambda parts: torch.from_numpy(np.concatenate(parts)).double()  # noqa: E731
    return ClassStats(t(counts), t(means), t(vars_).clamp_min(1e-6))
