"""The federated round loop: sample, send, train locally, upload, aggregate, evaluate, log."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from celora.data.batches import Collate, Encoded, train_loader
from celora.fl.aggregators import FedAvg
from celora.fl.client import set_trainable, train_local
from celora.fl.evaluation import evaluate, personal_summary
from celora.fl.wire import SEED_BYTES, Exchange, Payload
from celora.similarity import data_distance

State = dict[str, torch.Tensor]


@dataclass
class FLConfig:
    num_clients: int = 10
    rounds: int = 15
    sample_fraction: float = 0.5
    eval_every: int = 1
    wire_dtype: torch.dtype = torch.float32

    def __post_init__(self):
        if self.num_clients < 1 or self.rounds < 0 or self.eval_every < 1:
            raise ValueError("fl.num_clients >= 1, fl.rounds >= 0 and fl.eval_every >= 1 are required")
        if not 0 < self.sample_fraction <= 1:
            raise ValueError(f"fl.sample_fraction must be in (0, 1], got {self.sample_fraction}")

    @property
    def clients_per_round(self) -> int:
        return max(1, round(self.sample_fraction * self.num_clients))


@dataclass
class ClientConfig:
    optimizer: Callable  # params -> torch.optim.Optimizer (Hydra `_partial_`)
    local_steps: int = 10
    batch_size: int = 16
    eval_batch_size: int = 128
    grad_clip: float | None = 1.0


@dataclass
class ClientState:
    """A client is the small set of tensors that are its own; the backbone is shared."""

    train: np.ndarray
    test: np.ndarray
    private: State = field(default_factory=dict)


def snapshot(model: nn.Module, names) -> State:
    params = dict(model.named_parameters())
    return {n: params[n].detach().to("cpu", copy=True) for n in names}


@torch.no_grad()
def load(model: nn.Module, state: State) -> None:
    params = dict(model.named_parameters())
    for n, t in state.items():
        params[n].copy_(t)


def derive_seed(*parts: int) -> int:
    """Independent 63-bit seeds for each (purpose, round, client) from the run's one seed."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


class Simulation:
    """All clients in one process, one after another, on one shared backbone."""

    def __init__(self, model: nn.Module, exchange: Exchange, aggregator: FedAvg, train: Encoded,
                 test: Encoded, splits, fl: FLConfig, client: ClientConfig, seed: int, collate: Collate,
                 log: Callable[[dict], None] = lambda row: None,
                 log_matrix: Callable[[str, int, list[int], torch.Tensor], None] = lambda *a: None,
                 num_classes: int = 2, accelerator: str = "cpu", progress: bool = True):
        self.model, self.exchange, self.aggregator = model, exchange, aggregator
        self.train_data, self.test_data, self.collate = train, test, collate
        self.fl, self.client, self.seed, self.log, self.log_matrix = fl, client, seed, log, log_matrix
        self.num_classes = num_classes
        self.data_distance: torch.Tensor | None = None
        self.accelerator, self.progress = accelerator, progress
        initial = snapshot(model, exchange.trainable)
        self.clients = [ClientState(s.train, s.test, {n: initial[n] for n in exchange.private}) for s in splits]
        if aggregator.pooled:  # one model on the union of the clients' training data
            pooled = np.concatenate([s.train for s in splits])
            self.trainers = [ClientState(pooled, np.array([], dtype=int), dict(self.clients[0].private))]
        else:
            self.trainers = self.clients
        self.global_state: State = {n: initial[n] for n in exchange.shared}
        self.personal: dict[int, State] = {}
        self.sampler = np.random.default_rng([seed, 1])
        self.cum = {"up": 0, "down": 0}

    # -- one round ---------------------------------------------------------------------------
    def sample(self) -> list[int]:
        if self.aggregator.pooled:
            return [0]
        k = self.fl.clients_per_round
        return sorted(self.sampler.choice(self.fl.num_clients, size=k, replace=False).tolist())

    def train_round(self, rnd: int) -> dict:
        ex, dtype = self.exchange, self.fl.wire_dtype
        steps = self.client.local_steps * (self.fl.clients_per_round if self.aggregator.pooled else 1)
        uploads, sizes, received, losses = {}, {}, {}, []
        up = down = 0
        sampled = self.sample()
        for i in sampled:
            me = self.trainers[i]
            downlink = Payload.pack(self.personal.get(i, self.global_state), ex.shared, dtype)
            down += downlink.nbytes
            received[i] = downlink.unpack()
            load(self.model, {**received[i], **me.private})
            torch.manual_seed(derive_seed(self.seed, 3, rnd, i))  # dropout, identical across runs
            batches = train_loader(self.train_data, me.train, self.client.batch_size, steps,
                                   derive_seed(self.seed, 4, rnd, i), self.collate)
            losses.append(train_local(self.model, ex.trainable, batches, self.client.optimizer,
                                      grad_clip=self.client.grad_clip, accelerator=self.accelerator))
            uplink = Payload.pack(snapshot(self.model, ex.shared), ex.shared, dtype)
            up += uplink.nbytes
            uploads[i] = uplink.unpack()
            sizes[i] = len(me.train)
            me.private = snapshot(self.model, ex.private)
        result = self.aggregator(uploads, sizes, received, data_distance=self.data_distance)
        self.global_state = result.global_state if ex.shared else self.global_state
        self.personal.update(result.personal)  # clients not sampled keep their last personal state
        if result.weights is not None:
            self.log_matrix("weights", rnd, result.ids, result.weights)
        return {"train/loss": float(np.mean(losses)), "comm/up_bytes": up, "comm/down_bytes": down,
                "fl/clients": len(sampled)}

    # -- data-space summaries (once, before round 1) ---------------------------------------
    def upload_data_stats(self) -> dict:
        """Each client summarises its training data with the frozen backbone; the server compares them."""
        spec = self.aggregator.data_stats
        if spec is None:
            return {}
        load(self.model, self.global_state)
        stats, sigmas, up = [], [], 0
        value_bytes = torch.tensor([], dtype=self.fl.wire_dtype).element_size()
        for i, c in enumerate(self.clients):
            feats, labels = spec.features(self.model, self.train_data, c.train, self.collate,
                                          derive_seed(self.seed, 5, i))
            s, sigma = spec.summarize(feats, labels, self.num_classes, derive_seed(self.seed, 6, i))
            stats.append(s), sigmas.append(sigma)
            up += s.nbytes(value_bytes)
        self.data_distance = data_distance(stats, self.aggregator.bandwidth).float()
        ids = list(range(len(self.clients)))
        self.log_matrix("data_distance", 0, ids, self.data_distance)
        out = {"comm/up_bytes": up}
        if sigmas[0] is not None:
            out["privacy/stats_sigma"] = sigmas[0]
        return out

    # -- evaluation --------------------------------------------------------------------------
    def global_model_state(self) -> State | None:
        """The one model everybody shares, if there is one (none when tensors stay private)."""
        if self.aggregator.pooled:
            return self.trainers[0].private
        return self.global_state if not self.exchange.private else None

    def evaluate(self) -> dict:
        bs, out = self.client.eval_batch_size, {}
        state = self.global_model_state()
        if state is not None:
            load(self.model, state)
            acc, loss, _ = evaluate(self.model, self.test_data, range(len(self.test_data)), bs, self.collate)
            out.update({"global/acc": acc, "global/loss": loss})
        else:
            out.update({"global/acc": math.nan, "global/loss": math.nan})
        accs, losses, sizes = [], [], []
        for i, c in enumerate(self.clients):
            own = self.trainers[0].private if self.aggregator.pooled else c.private
            load(self.model, {**self.personal.get(i, self.global_state), **own})
            acc, loss, n = evaluate(self.model, self.train_data, c.test, bs, self.collate)
            accs.append(acc), losses.append(loss), sizes.append(n)
        out.update(personal_summary(accs, sizes))
        out["personal/loss"] = float(np.average(losses, weights=sizes))
        out["personal/acc_by_client"] = accs
        return out

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> list[dict]:
        rows = []
        set_trainable(self.model, self.exchange.trainable)
        t0 = time.perf_counter()
        # Round 0: each client receives the 64-bit init seed once (nothing is sent without a federation).
        seed_down = SEED_BYTES * self.fl.num_clients if self.aggregator.communicates else 0
        row = {"round": 0, "train/loss": math.nan, "comm/up_bytes": 0, "comm/down_bytes": seed_down,
               "fl/clients": 0, **self.upload_data_stats(), **self.evaluate()}
        self.cum["down"] += row["comm/down_bytes"]
        self.cum["up"] += row["comm/up_bytes"]
        rows.append(self._emit(row, t0))
        bar = tqdm(range(1, self.fl.rounds + 1), desc="rounds", disable=not self.progress, dynamic_ncols=True)
        for rnd in bar:
            t0 = time.perf_counter()
            row = {"round": rnd, **self.train_round(rnd)}
            self.cum["up"] += row["comm/up_bytes"]
            self.cum["down"] += row["comm/down_bytes"]
            if rnd % self.fl.eval_every == 0 or rnd == self.fl.rounds:
                row.update(self.evaluate())
                rows.append(self._emit(row, t0))
                acc = row["global/acc"] if not math.isnan(row["global/acc"]) else row["personal/acc"]
                bar.set_postfix(acc=f"{acc:.3f}", up=f"{self.cum['up'] / 1e6:.2f}MB")
        return rows

    def _emit(self, row: dict, t0: float) -> dict:
        row["comm/up_bytes_cum"] = self.cum["up"]
        row["comm/down_bytes_cum"] = self.cum["down"]
        row["time/round_s"] = time.perf_counter() - t0
        self.log(row)
        return row
