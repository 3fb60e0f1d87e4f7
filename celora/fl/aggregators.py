"""Aggregation rules: pure functions of the uploads and client sizes (no I/O, no model, deterministic)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

State = dict[str, torch.Tensor]


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> State:
    """sum_k w_k * state_k / sum_k w_k, key by key (accumulated in float64 for exactness)."""
    if len(states) != len(weights) or not states:
        raise ValueError("weighted_average needs one weight per state and at least one state")
    w = torch.tensor(weights, dtype=torch.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    w = w / w.sum()
    out = {}
    for key in states[0]:
        acc = sum(wk * s[key].double() for wk, s in zip(w, states))
        out[key] = acc.to(states[0][key].dtype)
    return out


@dataclass
class Aggregate:
    """The server's result: the global state, and per-client states where personalised."""

    global_state: State
    personal: dict[int, State] = field(default_factory=dict)
    weights: torch.Tensor | None = None  # [K, K] mixing weights of personalised rules, rows = receivers
    ids: list[int] | None = None  # the client ids that index `weights`


class FedAvg:
    """Example-weighted mean of the uploads (McMahan et al., 2017); also FedIT for LoRA."""

    communicates = True
    pooled = False
    personalised = False  # one aggregate for everybody (size-weighted), not a mix per client

    data_stats = None  # no data-space summaries needed

    def __call__(self, uploads: Mapping[int, State], sizes: Mapping[int, int],
                 received: Mapping[int, State] | None = None, data_distance=None) -> Aggregate:
        ids = sorted(uploads)
        return Aggregate(weighted_average([uploads[i] for i in ids], [sizes[i] for i in ids]))


class Local(FedAvg):
    """No communication at all: each client trains alone (personal accuracy only)."""

    communicates = False


class Centralized(FedAvg):
    """One model trained on the union of the clients' data for the same samples: the upper bound."""

    communicates = False
    pooled = True
