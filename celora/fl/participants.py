"""Who trains each round: every client on its own data, or one trainer on the pooled data (centralized)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from celora.data.partition import ClientSplit
from celora.tensors import State


@dataclass
class ClientState:
    """A client is the small set of tensors that are its own; the backbone is shared."""

    train: np.ndarray
    test: np.ndarray
    private: State = field(default_factory=dict)


class Clients:
    """The federated setting (and local-only training): each client trains on its own rows, sampled each round."""

    def __init__(self, splits: Sequence[ClientSplit], private: State):
        self.clients = [ClientState(s.train, s.test, dict(private)) for s in splits]
        self.trainers = self.clients  # who trains: the clients themselves

    def sample(self, rng: np.random.Generator, per_round: int) -> list[int]:
        return sorted(rng.choice(len(self.clients), size=per_round, replace=False).tolist())

    def base_steps(self, local_steps: int, per_round: int) -> int:
        return local_steps

    def own(self, i: int) -> State:
        """Client i's private tensors, part of its personal model."""
        return self.clients[i].private

    def global_model(self, global_state: State, private: Sequence[str]) -> State | None:
        """The one model everybody shares, if there is one (none while trained tensors stay private)."""
        return None if private else global_state


class Pooled(Clients):
    """The centralized reference: one trainer on the union of the clients' training rows, every round, for as
    many samples as the round's clients together (local_steps x clients per round batches); each client's own
    model is that model, evaluated on its local test rows."""

    def __init__(self, splits: Sequence[ClientSplit], private: State):
        super().__init__(splits, private)
        pooled = np.concatenate([s.train for s in splits])
        self.trainers = [ClientState(pooled, np.array([], dtype=int), dict(private))]

    def sample(self, rng: np.random.Generator, per_round: int) -> list[int]:
        return [0]  # no draw: the one trainer takes part in every round

    def base_steps(self, local_steps: int, per_round: int) -> int:
        return local_steps * per_round

    def own(self, i: int) -> State:
        return self.trainers[0].private

    def global_model(self, global_state: State, private: Sequence[str]) -> State | None:
        return self.trainers[0].private
