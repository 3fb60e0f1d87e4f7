"""CE-LoRA's server: personalised weights from client similarity in data and parameter space (pure)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from celora.adapters import is_factor
from celora.errors import ConfigError
from celora.fl.aggregators import Aggregate, Aggregator, weighted_average
from celora.fl.data_stats import DataStats
from celora.similarity import (
    ClassStats,
    combined_distance,
    data_distance,
    mix,
    param_distance,
    simplex_weights,
    softmax_weights,
)
from celora.tensors import State

SOLVERS = ("simplex", "softmax")
PARAM_SPACES = ("update", "weights")


@dataclass
class CeLoRA(Aggregator):
    """Client i receives sum_j w_ij C_j, w_i learned from D = lam D_data + (1 - lam) D_param.

    simplex: w_i = argmin_{w in simplex} ||w - p||^2 + gamma <w, D_i> (gamma = 0 is FedAvg);
    softmax: w_ij proportional to p_j exp(-D_ij / tau). p = example shares of this round's clients.
    D_data comes from the clients' class statistics (`prepare`, once); without them it is zero.
    The server also keeps the example-weighted global state (for global evaluation and new clients).
    """

    lam: float = 0.5
    solver: str = "simplex"
    gamma: float = 1.0
    tau: float = 0.1
    param_space: str = "update"
    bandwidth: float | None = None  # data-space kernel bandwidth; None: median heuristic
    data_stats: DataStats | None = None

    personalised = True  # each client receives its own mix of the uploads
    data_distance: torch.Tensor | None = field(default=None, init=False, repr=False)  # [N, N] from prepare()

    def __post_init__(self):
        if not 0 <= self.lam <= 1:
            raise ConfigError(f"aggregator.lam must be in [0, 1] (1 = data space only), got {self.lam}")
        if self.solver not in SOLVERS:
            raise ConfigError(f"aggregator.solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.param_space not in PARAM_SPACES:
            raise ConfigError(f"aggregator.param_space must be one of {PARAM_SPACES}, got {self.param_space!r}")
        if self.gamma < 0 or self.tau <= 0:
            raise ConfigError(f"aggregator.gamma must be >= 0 and aggregator.tau > 0, got {self.gamma}, {self.tau}")
        if self.lam == 0:  # parameter space only: clients compute and send no data summaries
            self.data_stats = None
        elif self.data_stats is None:
            self.data_stats = DataStats()

    def prepare(self, stats: Sequence[ClassStats]) -> dict[str, torch.Tensor]:
        """D_data: the squared MMD between every pair of clients' class mixtures, normalised to [0, 1]."""
        self.data_distance = data_distance(stats, self.bandwidth).float()
        return {"data_distance": self.data_distance}

    def __call__(self, uploads: Mapping[int, State], sizes: Mapping[int, int],
                 received: Mapping[int, State] | None = None) -> Aggregate:
        ids = sorted(uploads)
        states = [uploads[i] for i in ids]
        global_state = weighted_average(states, [sizes[i] for i in ids])
        if not global_state:  # nothing shared
            return Aggregate(global_state)
        p = torch.tensor([sizes[i] for i in ids], dtype=torch.float64)
        p = p / p.sum()
        keys = [k for k in global_state if is_factor(k)] or list(global_state)  # C (the adapter), not the head
        base = received if self.param_space == "update" and received is not None else None
        vectors = torch.stack([
            torch.cat([(uploads[i][k] - (base[i][k] if base else 0)).double().flatten() for k in keys])
            for i in ids
        ])
        d_param = param_distance(vectors)
        d_data = (self.data_distance[ids][:, ids].double() if self.data_distance is not None
                  else torch.zeros_like(d_param))
        dist = combined_distance(d_data, d_param, self.lam)
        w = (simplex_weights(dist, p, self.gamma) if self.solver == "simplex"
             else softmax_weights(dist, p, self.tau))
        return Aggregate(global_state, dict(zip(ids, mix(states, w))), weights=w, ids=ids)
