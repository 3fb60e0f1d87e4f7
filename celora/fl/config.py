"""The federation's settings (`fl.*`) and each client's (`client.*`), as typed values that check themselves."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from celora.errors import ConfigError
from celora.seeds import EVAL_CLIENTS

ON_CLIENT_ERROR = ("skip", "raise")


@dataclass
class FLConfig:
    num_clients: int = 10
    rounds: int = 15
    sample_fraction: float = 0.5
    eval_every: int = 1
    wire_dtype: torch.dtype = torch.float32
    max_update_norm_ratio: float | None = None  # reject an update this many times the round's median norm
    on_client_error: str = "skip"  # skip: a client whose training raises is left out of the round | raise
    eval_clients: int | str = "all"  # personal evaluation of every client, or of this many (seeded, fixed for the run)

    def __post_init__(self):
        for key, low in (("num_clients", 1), ("rounds", 0), ("eval_every", 1)):
            if getattr(self, key) < low:
                raise ConfigError(f"fl.{key} must be >= {low}, got {getattr(self, key)}")
        if not 0 < self.sample_fraction <= 1:
            raise ConfigError(f"fl.sample_fraction must be in (0, 1], got {self.sample_fraction}")
        if self.max_update_norm_ratio is not None and not self.max_update_norm_ratio > 1:
            raise ConfigError(f"fl.max_update_norm_ratio must be > 1 (e.g. 10) or null to turn the check off, "
                             f"got {self.max_update_norm_ratio}")
        if not (self.eval_clients == "all" or isinstance(self.eval_clients, int) and
                not isinstance(self.eval_clients, bool) and 1 <= self.eval_clients):
            raise ConfigError(f"fl.eval_clients must be 'all' or a positive number of clients, got {self.eval_clients!r}")
        if isinstance(self.eval_clients, int) and self.eval_clients > self.num_clients:
            raise ConfigError(f"fl.eval_clients={self.eval_clients} is more than fl.num_clients={self.num_clients}; "
                             f"use fl.eval_clients=all or at most {self.num_clients}")
        if self.on_client_error not in ON_CLIENT_ERROR:
            raise ConfigError(f"fl.on_client_error must be one of {ON_CLIENT_ERROR}, got {self.on_client_error!r}")

    @property
    def clients_per_round(self) -> int:
        return max(1, round(self.sample_fraction * self.num_clients))

    def evaluated(self, seed: int) -> list[int]:
        """The clients personal evaluation scores: all, or `eval_clients` of them drawn once from the run's seed
        (their own stream, so the choice changes no training number)."""
        if self.eval_clients == "all" or self.eval_clients >= self.num_clients:
            return list(range(self.num_clients))
        rng = np.random.default_rng([seed, EVAL_CLIENTS])
        return sorted(rng.choice(self.num_clients, size=self.eval_clients, replace=False).tolist())


@dataclass
class ClientConfig:
    """`client.*` (instantiated by Hydra): how each client trains locally and evaluates."""

    optimizer: Callable  # params -> torch.optim.Optimizer (Hydra `_partial_`)
    local_steps: int = 10
    batch_size: int = 16
    eval_batch_size: int = 128
    lr: float | None = None  # the optimizer's learning rate (its config node reads ${client.lr}); checked here
    grad_clip: float | None = 1.0
    max_epochs: float | None = None  # caps a client's steps at this many passes over its data (small clients run fewer)
    val_fraction: float = 0.0  # > 0: this share of each client's local train is its validation split, scored instead of any test row

    def __post_init__(self):
        for key in ("local_steps", "batch_size", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"client.{key} must be >= 1, got {getattr(self, key)}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"client.lr={self.lr} must be > 0")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"client.grad_clip must be > 0, or null to turn clipping off, got {self.grad_clip}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"client.val_fraction={self.val_fraction} must be in [0, 1): 0 scores the test rows, "
                             "e.g. 0.2 holds a fifth of each client's training rows out for validation")
        if self.max_epochs is not None and self.max_epochs <= 0:
            raise ConfigError(f"client.max_epochs must be > 0 or null, got {self.max_epochs}")

    def steps(self, base: int, examples: int) -> int:
        """Local steps of a client with `examples` training examples: `base`, capped by max_epochs (at least 1)."""
        if self.max_epochs is None:
            return base
        return max(1, min(base, math.floor(self.max_epochs * examples / self.batch_size)))
