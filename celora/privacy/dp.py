"""Client-level differential privacy for uploads: clip each update, add Gaussian noise, account epsilon."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol

import torch
from opacus.accountants import RDPAccountant
from torch import Tensor

from celora.errors import ConfigError
from celora.tensors import State, global_norm

MODES = ("central", "local")


def clip_update(update: Mapping[str, Tensor], clip_norm: float) -> tuple[State, float]:
    """Scales the update to global norm <= clip_norm (left unscaled when already inside); returns (clipped, norm)."""
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    norm = global_norm(update)
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {n: t * factor for n, t in update.items()}, norm


def add_noise(update: Mapping[str, Tensor], std: float, generator: torch.Generator) -> State:
    """update + N(0, std^2) on every coordinate, drawn from `generator` in name order."""
    if not std >= 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    return {n: t + std * torch.randn(t.shape, generator=generator, dtype=t.dtype) for n, t in update.items()}


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon after `steps` sampled Gaussian mechanisms, from opacus's RDP accountant (inf without noise)."""
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    return float(accountant.get_epsilon(delta))


class Privacy(Protocol):
    """What protects a round's uploads before the server aggregates them (`privacy` config group)."""

    active: bool  # False: it changes nothing (then it fits every aggregator)
    mode: str | None  # central | local | None: where the noise is drawn, which decides what it covers

    def __call__(self, uploads: dict[int, State], received: dict[int, State], sizes: dict[int, int],
                 generator: torch.Generator) -> tuple[dict[int, State], dict]:
        """(uploads to aggregate, this round's privacy metrics)."""
        ...

    def state_dict(self) -> dict: ...  # the accountant's state, for resuming

    def load_state_dict(self, state: dict) -> None: ...


class NoPrivacy(Privacy):
    """Uploads pass through unchanged and nothing is reported (same call as ClientDP)."""

    active = False  # changes nothing, so it fits every aggregator
    mode = None

    def __init__(self, sample_rate: float = 1.0):
        self.sample_rate = sample_rate

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...

    def __call__(self, uploads: dict[int, State], received: dict[int, State], sizes: dict[int, int],
                 generator: torch.Generator) -> tuple[dict[int, State], dict]:
        return uploads, {}


class ClientDP(Privacy):
    """User-level DP-FedAvg (McMahan et al., 2018): each client's update clipped to S, Gaussian noise std sigma*S.

    An update is upload - received: the model the server sent is public, so clipping and noise act
    on what the client's data changed. The same Gaussian mechanism (noise multiplier sigma on a
    sensitivity S) is applied in two places:

    - `central`: the trusted server draws one noise vector of std sigma * S * max_i w_i (w: the
      size weights the aggregator uses, summing to 1; = sigma * S on the sum of K equal-weight
      updates, divided by K) and adds it to every clipped update, so any aggregate with weights
      summing to one, FedAvg's among them, carries exactly that noise. Epsilon: sampled Gaussian
      mechanism, sample rate = clients per round / clients, one step per round. The guarantee holds
      for the size-weighted aggregate; it protects against those who see aggregates, not the server.
    - `local`: each client adds its own N(0, (sigma * S)^2) before uploading, so the server only
      ever sees noisy updates. The server knows whom it sampled, so there is no amplification by
      sampling: epsilon composes one unsampled mechanism per round (a client taking part in every
      round, the worst case).

    Call it on one round's uploads before aggregation; `rounds` counts the rounds that released
    something (the accountant's state). `sample_rate` (clients per round / clients) is supplied by
    the run, the rest by the `privacy` config.
    """

    active = True  # acts on uploads: a run that uploads nothing has nothing for it to protect

    def __init__(self, clip_norm: float, noise_multiplier: float, mode: str = "central", delta: float = 1e-5,
                 sample_rate: float = 1.0):
        if mode not in MODES:
            raise ConfigError(f"privacy.mode must be one of {MODES}, got {mode!r}")
        if not clip_norm > 0:
            raise ConfigError(f"privacy.clip_norm must be > 0, got {clip_norm}")
        if not noise_multiplier >= 0:
            raise ConfigError(f"privacy.noise_multiplier must be >= 0, got {noise_multiplier}")
        if not 0 < delta < 1:
            raise ConfigError(f"privacy.delta must be in (0, 1), got {delta}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.clip_norm, self.noise_multiplier, self.mode, self.delta = clip_norm, noise_multiplier, mode, delta
        self.sample_rate = sample_rate if mode == "central" else 1.0
        self.rounds = 0

    @property
    def epsilon(self) -> float:
        return epsilon(self.noise_multiplier, self.sample_rate, self.rounds, self.delta)

    def state_dict(self) -> dict:
        return {"rounds": self.rounds}

    def load_state_dict(self, state: dict) -> None:
        self.rounds = int(state["rounds"])

    def __call__(self, uploads: dict[int, State], received: dict[int, State], sizes: dict[int, int],
                 generator: torch.Generator) -> tuple[dict[int, State], dict]:
        """One round: client id -> uploaded tensors, -> what it was sent, -> its example count.

        Returns the uploads to aggregate (received + noisy clipped update, in the upload dtype) and
        the round's metrics: `privacy/epsilon` (cumulative), the clipped fraction, the mean update norm.
        """
        ids = sorted(uploads)
        if not ids:  # every client of the round was rejected: nothing is released, nothing is spent
            return {}, {"privacy/epsilon": self.epsilon, "privacy/clipped_fraction": math.nan,
                        "privacy/update_norm": math.nan}
        # float64 for the arithmetic: (u - r) + r then returns u exactly when nothing is clipped or added
        deltas = {i: {n: uploads[i][n].double() - received[i][n].double() for n in uploads[i]} for i in ids}
        clipped, norms = {}, []
        for i in ids:
            clipped[i], norm = clip_update(deltas[i], self.clip_norm)
            norms.append(norm)
        std = self.noise_multiplier * self.clip_norm
        if self.mode == "central":
            total = sum(sizes[i] for i in ids)
            shared = add_noise({n: torch.zeros_like(t) for n, t in clipped[ids[0]].items()},
                               std * max(sizes[i] for i in ids) / total, generator)
            noisy = {i: {n: t + shared[n] for n, t in clipped[i].items()} for i in ids}
        else:
            noisy = {i: add_noise(clipped[i], std, generator) for i in ids}
        out = {i: {n: (received[i][n].double() + t).to(uploads[i][n].dtype) for n, t in noisy[i].items()}
               for i in ids}
        self.rounds += 1
        return out, {"privacy/epsilon": self.epsilon,
                     "privacy/clipped_fraction": sum(x > self.clip_norm for x in norms) / len(norms),
                     "privacy/update_norm": sum(norms) / len(norms)}

