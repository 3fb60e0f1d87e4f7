"""Who trains each round: every client on its own data, or one trainer on the pooled data (centralized)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from celora.data.partition import ClientSplit


@dataclass
class ClientRows:
    """A client's rows of the run's data: the indices it trains on and those it is tested on."""

    train: np.ndarray
    test: np.ndarray


class Clients:
    """The federated setting (and local-only training): each client trains on its own rows, sampled each round."""

    pooled = False

    def __init__(self, splits: Sequence[ClientSplit]):
        self.clients = [ClientRows(s.train, s.test) for s in splits]
        self.trainers = self.clients  # who trains: the clients themselves

    def owners(self) -> list[int]:
        """Client -> the trainer that holds its private tensors (its own model's)."""
        return list(range(len(self.clients)))

    def sample(self, rng: np.random.Generator, per_round: int) -> list[int]:
        return sorted(rng.choice(len(self.clients), size=per_round, replace=False).tolist())

    def base_steps(self, local_steps: int, per_round: int) -> int:
        return local_steps


class Pooled(Clients):
    """The centralized reference: one trainer on the union of the clients' training rows, every round, for as
    many samples as the round's clients together (local_steps x clients per round batches); each client's own
    model is that model, evaluated on its local test rows."""

    pooled = True

    def __init__(self, splits: Sequence[ClientSplit]):
        super().__init__(splits)
        pooled = np.concatenate([s.train for s in splits])
        self.trainers = [ClientRows(pooled, np.array([], dtype=int))]

    def owners(self) -> list[int]:
        return [0] * len(self.clients)

    def sample(self, rng: np.random.Generator, per_round: int) -> list[int]:
        return [0]  # no draw: the one trainer takes part in every round

    def base_steps(self, local_steps: int, per_round: int) -> int:
        return local_steps * per_round
