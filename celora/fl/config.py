"""The federation's settings (`fl.*`) and each client's (`client.*`), as typed values that check themselves."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal, get_args

import numpy as np
import torch

from celora.errors import ConfigError
from celora.schema import Range
from celora.seeds import EVAL_CLIENTS

ON_CLIENT_ERROR = ("skip", "raise")
LrSchedule = Literal["constant", "cosine", "linear"]  # the client learning rate's shape over the rounds
LR_SCHEDULES = get_args(LrSchedule)


def lr_factor(rnd: int, rounds: int, schedule: LrSchedule = "constant", warmup_rounds: int = 0,
              min_ratio: float = 0.0) -> float:
    """The learning rate of round `rnd` (1-based, of `rounds`) as a multiple of the base rate.

    Warmup: rnd / W for rnd <= W (W = warmup_rounds > 0; round W trains at the full rate). Then, with
    p = (rnd - W) / (rounds - W) (0 at round W, 1 at the last round) and m = min_ratio:
    constant 1; cosine m + (1 - m) (1 + cos(pi p)) / 2; linear m + (1 - m) (1 - p). So the last round
    trains at m times the base rate, as FlowerTune's cosine over rounds does (W = 0, m = lrate_min / lrate_max).
    """
    if warmup_rounds and rnd <= warmup_rounds:
        return rnd / warmup_rounds
    if schedule == "constant":
        return 1.0
    p = min(1.0, (rnd - warmup_rounds) / max(1, rounds - warmup_rounds))
    shape = (1 + math.cos(math.pi * p)) / 2 if schedule == "cosine" else 1 - p
    return min_ratio + (1 - min_ratio) * shape


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
    # a stated budget of uplink + downlink bytes, e.g. FlowerTune's 200,000 MiB: each evaluated round logs the share
    # used and summary.json keeps it (celora.metrics.budget_use); it changes no number of the run
    comm_budget_bytes: Annotated[float, Range(gt=0)] | None = None

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
        if self.comm_budget_bytes is not None and not self.comm_budget_bytes > 0:
            raise ConfigError(f"fl.comm_budget_bytes must be > 0 (bytes) or null for none, "
                             f"got {self.comm_budget_bytes}")
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
    lr_schedule: LrSchedule = "constant"  # the rate over rounds (lr_factor); a round's optimiser starts at it
    lr_warmup_rounds: Annotated[int, Range(ge=0)] = 0  # the rate rises linearly over these first rounds
    lr_min_ratio: Annotated[float, Range(ge=0, le=1)] = 0.0  # cosine and linear end at this share of lr (last round)
    grad_accum: Annotated[int, Range(ge=1)] = 1  # batches summed into each local step (local_steps x this drawn)
    # FedProx (Li et al. 2020): mu/2 ||w - w_received||^2 over the client's shared trained tensors joins its loss; 0: off
    prox_mu: Annotated[float, Range(ge=0)] = 0.0

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
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"client.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.lr_warmup_rounds < 0:
            raise ConfigError(f"client.lr_warmup_rounds must be >= 0, got {self.lr_warmup_rounds}")
        if not 0 <= self.lr_min_ratio <= 1:
            raise ConfigError(f"client.lr_min_ratio must be in [0, 1], got {self.lr_min_ratio}")
        if self.grad_accum < 1:
            raise ConfigError(f"client.grad_accum must be >= 1 (1: no accumulation), got {self.grad_accum}")
        if not self.prox_mu >= 0:
            raise ConfigError(f"client.prox_mu (FedProx's mu) must be >= 0 (0: no proximal term), got {self.prox_mu}")
        if self.scheduled and self.lr is None:
            raise ConfigError(f"client.lr_schedule={self.lr_schedule} with client.lr_warmup_rounds="
                             f"{self.lr_warmup_rounds} schedules client.lr, which is null; set client.lr")

    def steps(self, base: int, examples: int) -> int:
        """Local steps of a client with `examples` training examples: `base`, capped by max_epochs (at least 1).
        A step takes grad_accum batches, so one epoch is examples / (batch_size x grad_accum) steps."""
        if self.max_epochs is None:
            return base
        return max(1, min(base, math.floor(self.max_epochs * examples / (self.batch_size * self.grad_accum))))

    @property
    def scheduled(self) -> bool:
        """Whether the rate moves over the rounds (else every round trains at the optimiser's own rate)."""
        return self.lr_schedule != "constant" or self.lr_warmup_rounds > 0

    def lr_factor(self, rnd: int, rounds: int) -> float:
        """Round `rnd`'s rate over the base rate (lr_factor of this config's schedule)."""
        return lr_factor(rnd, rounds, self.lr_schedule, self.lr_warmup_rounds, self.lr_min_ratio)

    def lr_at(self, rnd: int, rounds: int) -> float | None:
        """Round `rnd`'s learning rate: client.lr times the schedule's factor (logged as train/lr)."""
        return None if self.lr is None else self.lr * self.lr_factor(rnd, rounds)
