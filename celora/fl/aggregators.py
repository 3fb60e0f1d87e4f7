"""The aggregator interface, and FedAvg with its reference modes: pure functions of the uploads and client sizes."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from celora.tensors import State

if TYPE_CHECKING:  # types only: the server's interface does not depend on how clients summarise their data
    from celora.fl.data_stats import DataStats
    from celora.similarity import ClassStats


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> State:
    """sum_k w_k * state_k / sum_k w_k, key by key, as one contraction over the stacked states (in float64)."""
    if len(states) != len(weights) or not states:
        raise ValueError("weighted_average needs one weight per state and at least one state")
    w = torch.tensor(weights, dtype=torch.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    w = w / w.sum()
    out = {}
    for key, ref in states[0].items():
        stacked = torch.stack([s[key].double() for s in states])
        out[key] = torch.tensordot(w, stacked, dims=1).to(ref.dtype)
    return out


@dataclass
class Aggregate:
    """The server's result: the global state, and per-client states where personalised."""

    global_state: State
    personal: dict[int, State] = field(default_factory=dict)
    weights: torch.Tensor | None = None  # [K, K] mixing weights of personalised rules, rows = receivers
    ids: list[int] | None = None  # the client ids that index `weights`


class Aggregator(Protocol):
    """What the server does with a round's uploads: a new method is a class with these members and a YAML
    under conf/aggregator/ naming it (`_target_`); nothing else in celora changes.

    Subclass it to take the defaults below (FedAvg's declarations) and override what differs. The call
    must be pure: tensors and sizes in, an Aggregate out, deterministic, no I/O and no model.
    """

    communicates: bool = True  # False: nothing crosses the wire, each client trains alone (no bytes, no DP)
    needs_groups: bool = False  # True: it reads the partition's latent groups (`groups`, a reference that knows them)
    pooled: bool = False  # True: one trainer on the union of the clients' data (the centralized reference)
    personalised: bool = False  # True: each client receives its own mix (Aggregate.personal), not one aggregate
    data_stats: DataStats | None = None  # the data summaries clients upload once before round 1; None: none

    def prepare(self, stats: Sequence[ClassStats]) -> dict[str, torch.Tensor]:
        """Receives every client's data summary (client id = position) once, before round 1, when `data_stats`
        is set, and again with the same summaries when a run resumes; returns client x client matrices to
        log by name (e.g. a distance). Default: nothing to keep."""
        return {}

    def __call__(self, uploads: Mapping[int, State], sizes: Mapping[int, int],
                 received: Mapping[int, State]) -> Aggregate:
        """One round: client id -> its upload, -> its example count, -> what it was sent this round."""
        ...


class FedAvg(Aggregator):
    """Example-weighted mean of the uploads (McMahan et al., 2017); also FedIT for LoRA."""

    def __call__(self, uploads: Mapping[int, State], sizes: Mapping[int, int],
                 received: Mapping[int, State] | None = None) -> Aggregate:
        ids = sorted(uploads)
        return Aggregate(weighted_average([uploads[i] for i in ids], [sizes[i] for i in ids]))


class Local(FedAvg):
    """No communication at all: each client trains alone (personal accuracy only)."""

    communicates = False


class Centralized(FedAvg):
    """One model trained on the union of the clients' data for the same samples: the upper bound."""

    communicates = False
    pooled = True


@dataclass
class GroupOracle(Aggregator):
    """A reference no real server can run: FedAvg within each true latent group of clients (the partition's
    ground truth, `groups`: client id -> group, set from `partition.group_of` when the run is built). Every
    client of a group that uploaded receives the group's example-weighted mean; the global state is the mean
    of all uploads. On splits with latent groups (grouped, concept_shift, rotation_groups) it is the upper
    bound a personalised aggregator can approach without knowing the groups."""

    personalised = True
    needs_groups = True  # validate.build gives it the partition's groups, or refuses a partition without them
    groups: list[int] | None = field(default=None, init=False)

    def __call__(self, uploads: Mapping[int, State], sizes: Mapping[int, int],
                 received: Mapping[int, State] | None = None) -> Aggregate:
        if self.groups is None:
            raise ValueError("GroupOracle has no groups: validate.build sets them from the partition")
        ids = sorted(uploads)
        global_state = weighted_average([uploads[i] for i in ids], [sizes[i] for i in ids])
        personal = {}
        for g in sorted({self.groups[i] for i in ids}):
            members = [i for i in ids if self.groups[i] == g]
            mean = weighted_average([uploads[i] for i in members], [sizes[i] for i in members])
            personal.update({j: mean for j, group in enumerate(self.groups) if group == g})
        return Aggregate(global_state, personal)
