"""The federated round loop: sample, send, train locally, upload, aggregate, evaluate, log."""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from celora.adapters import silent_layers
from celora.data.batches import Collate, Encoded, train_loader
from celora.fl import faults
from celora.fl.aggregators import FedAvg
from celora.fl.client import set_trainable, stacked, train_cohort, train_local
from celora.fl.evaluation import evaluate, evaluate_cohort, personal_summary
from celora.fl.wire import SEED_BYTES, Exchange, Payload
from celora.privacy.dp import NoPrivacy
from celora.similarity import data_distance

State = dict[str, torch.Tensor]
ON_CLIENT_ERROR = ("skip", "raise")
log = logging.getLogger("celora")


@dataclass
class FLConfig:
    num_clients: int = 10
    rounds: int = 15
    sample_fraction: float = 0.5
    eval_every: int = 1
    wire_dtype: torch.dtype = torch.float32
    max_update_norm_ratio: float | None = None  # reject an update this many times the round's median norm
    on_client_error: str = "skip"  # skip: a client whose training raises is left out of the round | raise

    def __post_init__(self):
        for key, low in (("num_clients", 1), ("rounds", 0), ("eval_every", 1)):
            if getattr(self, key) < low:
                raise ValueError(f"fl.{key} must be >= {low}, got {getattr(self, key)}")
        if not 0 < self.sample_fraction <= 1:
            raise ValueError(f"fl.sample_fraction must be in (0, 1], got {self.sample_fraction}")
        if self.max_update_norm_ratio is not None and not self.max_update_norm_ratio > 1:
            raise ValueError(f"fl.max_update_norm_ratio must be > 1 (e.g. 10) or null to turn the check off, "
                             f"got {self.max_update_norm_ratio}")
        if self.on_client_error not in ON_CLIENT_ERROR:
            raise ValueError(f"fl.on_client_error must be one of {ON_CLIENT_ERROR}, got {self.on_client_error!r}")

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
    max_epochs: float | None = None  # caps a client's steps at this many passes over its data (small clients run fewer)

    def __post_init__(self):
        for key in ("local_steps", "batch_size", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"client.{key} must be >= 1, got {getattr(self, key)}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"client.grad_clip must be > 0, or null to turn clipping off, got {self.grad_clip}")
        if self.max_epochs is not None and self.max_epochs <= 0:
            raise ValueError(f"client.max_epochs must be > 0 or null, got {self.max_epochs}")

    def steps(self, base: int, examples: int) -> int:
        """Local steps of a client with `examples` training examples: `base`, capped by max_epochs (at least 1)."""
        if self.max_epochs is None:
            return base
        return max(1, min(base, math.floor(self.max_epochs * examples / self.batch_size)))


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


def check_cohort_size(cohort_size) -> None:
    if not (cohort_size is None or cohort_size == "all" or
            (isinstance(cohort_size, int) and not isinstance(cohort_size, bool) and cohort_size >= 1)):
        raise ValueError(f"simulation.cohort_size must be a positive integer or 'all', got {cohort_size!r}")


class Simulation:
    """All clients in one process on one shared backbone.

    `cohort_size=None` trains them one after another on the model's own tensors; an integer K
    (or "all": every client of the round) trains cohorts of K clients in one batched pass, their
    trainable tensors stacked along a leading client dim (see client.train_cohort), and evaluates
    personal models the same way. Both give the same numbers.
    """

    def __init__(self, model: nn.Module, exchange: Exchange, aggregator: FedAvg, train: Encoded,
                 test: Encoded, splits, fl: FLConfig, client: ClientConfig, seed: int, collate: Collate,
                 log: Callable[[dict], None] = lambda row: None,
                 log_matrix: Callable[[str, int, list[int], torch.Tensor], None] = lambda *a: None,
                 num_classes: int = 2, accelerator: str = "cpu", progress: bool = True,
                 cohort_size: int | str | None = None, privacy: Callable | None = None):
        check_cohort_size(cohort_size)
        self.model, self.exchange, self.aggregator = model, exchange, aggregator
        self.train_data, self.test_data, self.collate = train, test, collate
        self.fl, self.client, self.seed, self.log, self.log_matrix = fl, client, seed, log, log_matrix
        self.num_classes = num_classes
        self.data_distance: torch.Tensor | None = None
        self.accelerator, self.progress, self.cohort_size = accelerator, progress, cohort_size
        self.privacy = privacy or NoPrivacy()  # (uploads, received, sizes, generator) -> (uploads, metrics)
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
        self.completed = -1  # the last round done (0: the round-0 evaluation)
        self.gradients_checked = False  # the first local backward pass looks for adapters that get no gradient

    # -- state: what a resumed run needs beyond what the config rebuilds ----------------------
    def state_dict(self) -> dict:
        """Everything that changes from round to round, as tensors and plain Python values.

        The rest (data, partition, backbone, frozen factors, head init, and the seeds of each
        round's sampling of batches, dropout and noise) is rebuilt from the config and the seed,
        so a run restored from this after round k computes round k + 1 exactly as if never stopped.
        """
        return {
            "completed": self.completed,
            "global": self.global_state,
            "personal": self.personal,
            "private": [t.private for t in self.trainers],
            "sampler": json.dumps(self.sampler.bit_generator.state),  # 128-bit ints as text
            "cum": dict(self.cum),
            "data_distance": self.data_distance,
            "privacy": self.privacy.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        shapes = {n: p.shape for n, p in self.model.named_parameters()}
        tensors = [state["global"], *state["personal"].values(), *state["private"]]
        bad = sorted({n for s in tensors for n, t in s.items() if shapes.get(n) != t.shape})
        if len(state["private"]) != len(self.trainers):
            bad.append(f"{len(state['private'])} clients, not {len(self.trainers)}")
        if bad:
            raise ValueError(f"the checkpoint's state does not fit this run's model and clients ({bad[:3]}); "
                             "it belongs to another config: start over with resume=never")
        self.completed = state["completed"]
        self.global_state = state["global"]
        self.personal = dict(state["personal"])
        for trainer, private in zip(self.trainers, state["private"]):
            trainer.private = private
        self.sampler.bit_generator.state = json.loads(state["sampler"])
        self.cum = dict(state["cum"])
        self.data_distance = state["data_distance"]
        self.privacy.load_state_dict(state["privacy"])

    # -- one round ---------------------------------------------------------------------------
    def sample(self) -> list[int]:
        if self.aggregator.pooled:
            return [0]
        k = self.fl.clients_per_round
        return sorted(self.sampler.choice(self.fl.num_clients, size=k, replace=False).tolist())

    def cohorts(self, ids: list[int]) -> list[list[int]]:
        """The round's clients in training groups: one at a time (sequential), or K at a time."""
        if self.cohort_size is None:
            return [[i] for i in ids]
        k = len(ids) if self.cohort_size == "all" else self.cohort_size
        return [ids[j:j + k] for j in range(0, len(ids), k)]

    def local_steps(self, i: int) -> int:
        base = self.client.local_steps * (self.fl.clients_per_round if self.aggregator.pooled else 1)
        return self.client.steps(base, len(self.trainers[i].train))

    def _batches(self, rnd: int, i: int):
        return train_loader(self.train_data, self.trainers[i].train, self.client.batch_size, self.local_steps(i),
                            derive_seed(self.seed, 4, rnd, i), self.collate)

    def train_clients(self, rnd: int, cohort: list[int], received: dict[int, State]) -> list[tuple[float, State]]:
        """Local training of one cohort from what each client received; (mean loss, trained tensors) each."""
        ex, opt, clip = self.exchange, self.client.optimizer, self.client.grad_clip
        starts = [{**received[i], **self.trainers[i].private} for i in cohort]
        torch.manual_seed(derive_seed(self.seed, 3, rnd, cohort[0]))  # dropout, identical across runs
        check = None if self.gradients_checked else self.warn_silent_adapters
        self.gradients_checked = True
        if self.cohort_size is None:
            load(self.model, starts[0])
            loss = train_local(self.model, ex.trainable, self._batches(rnd, cohort[0]), opt,
                               grad_clip=clip, accelerator=self.accelerator, on_first_backward=check)
            return [(loss, snapshot(self.model, ex.trainable))]
        losses, states = train_cohort(self.model, ex.trainable, starts, [self._batches(rnd, i) for i in cohort],
                                      [self.local_steps(i) for i in cohort], opt, pad_id=self.collate.pad_id,
                                      grad_clip=clip, accelerator=self.accelerator, on_first_backward=check)
        return list(zip(losses, states))

    def warn_silent_adapters(self, model: nn.Module) -> None:
        """Warns (once a run) of adapted modules whose trainable factors got no gradient in the first local
        backward pass: they are off the task's forward path, so what they train and send is wasted."""
        silent = silent_layers(model, self.exchange.trainable)
        if not silent:
            return
        sent = [n for n in self.exchange.shared if n.rpartition(".")[0] in silent]
        values = sum(self.global_state[n].numel() for n in sent)
        per_client = values * torch.tensor([], dtype=self.fl.wire_dtype).element_size()
        cost = (f"their factors are trained and sent for nothing: {values:,} values, {per_client:,} bytes per "
                f"client and direction each round ({per_client * self.fl.clients_per_round:,} bytes of uplink a "
                f"round for {self.fl.clients_per_round} clients)" if sent else "their factors are trained for nothing")
        log.warning(
            "adapters on %d module(s) got no gradient in the first local step: %s. They are not on the task's forward "
            "path (e.g. a BERT pooler under pooling=mean), so %s. Leave them out of adapter.targets: a target matches "
            "the modules whose dotted name ends with it, so name them more precisely (e.g. output.dense instead of "
            "dense).", len(silent), silent, cost)

    def train_guarded(self, rnd: int, cohort: list[int],
                      received: dict[int, State]) -> tuple[dict[int, tuple[float, State]], dict[int, Exception]]:
        """train_clients, keeping a client whose training raises out of the round (fl.on_client_error=skip).

        A cohort that raises is re-run one client at a time, so one client's fault never discards
        the others' work. Returns (client -> (loss, trained tensors), client -> its exception)."""
        try:
            return dict(zip(cohort, self.train_clients(rnd, cohort, received))), {}
        except Exception as e:
            if self.fl.on_client_error == "raise":
                raise
            if len(cohort) == 1:
                log.warning("round %d: client %d's local training raised %s: %s; it is left out of this round "
                            "(fl.on_client_error=skip)", rnd, cohort[0], type(e).__name__, e)
                return {}, {cohort[0]: e}
        done, failed = {}, {}
        for i in cohort:
            ok, bad = self.train_guarded(rnd, [i], received)
            done.update(ok), failed.update(bad)
        return done, failed

    def train_round(self, rnd: int) -> dict:
        ex, dtype = self.exchange, self.fl.wire_dtype
        trained, failed, received = {}, {}, {}
        up = down = 0
        sampled = self.sample()
        for i in sampled:
            downlink = Payload.pack(self.personal.get(i, self.global_state), ex.shared, dtype)
            down += downlink.nbytes
            received[i] = downlink.unpack()
        for cohort in self.cohorts(sampled):
            done, bad = self.train_guarded(rnd, cohort, received)
            trained.update(done), failed.update(bad)
        if failed and not trained:  # a fault in every client is a fault of the run, not of a client
            first = next(iter(failed.values()))
            raise RuntimeError(f"round {rnd}: the local training of every client raised") from first
        uploads, privates, losses = {}, {}, {}
        for i in sorted(trained):
            losses[i], state = trained[i]
            uplink = Payload.pack(state, ex.shared, dtype)
            up += uplink.nbytes  # sent before the server could look at it: a rejected upload still counts
            uploads[i] = uplink.unpack()
            privates[i] = {n: state[n] for n in ex.private}
        rejected = faults.screen(uploads, privates, received, self.fl.max_update_norm_ratio, losses)
        for i, why in rejected.items():
            log.warning("round %d: client %d's result is rejected: %s", rnd, i, why)
        accepted = [i for i in sorted(uploads) if i not in rejected]
        for i in accepted:
            self.trainers[i].private = privates[i]
        uploads = {i: uploads[i] for i in accepted}
        sizes = {i: len(self.trainers[i].train) for i in accepted}
        uploads, dp_metrics = self.privacy(uploads, received, sizes,
                                           torch.Generator().manual_seed(derive_seed(self.seed, 9, rnd)))
        if uploads:  # with every client rejected the server keeps its state
            result = self.aggregator(uploads, sizes, received, data_distance=self.data_distance)
            self.global_state = result.global_state if ex.shared else self.global_state
            self.personal.update(result.personal)  # clients not sampled keep their last personal state
            if result.weights is not None:
                self.log_matrix("weights", rnd, result.ids, result.weights)
        return {"train/loss": float(np.mean([losses[i] for i in accepted])) if accepted else math.nan,
                "comm/up_bytes": up, "comm/down_bytes": down, "fl/clients": len(sampled),
                "fl/rejected_clients": len(sampled) - len(accepted), **dp_metrics}

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

    def personal_state(self, i: int) -> State:
        """Client i's own model: what it last received (or the global state) and its private tensors."""
        own = self.trainers[0].private if self.aggregator.pooled else self.clients[i].private
        return {**self.personal.get(i, self.global_state), **own}

    def evaluate(self) -> dict:
        bs, out = self.client.eval_batch_size, {}
        state = self.global_model_state()
        if state is not None:
            load(self.model, state)
            acc, loss, _ = evaluate(self.model, self.test_data, range(len(self.test_data)), bs, self.collate)
            out.update({"global/acc": acc, "global/loss": loss})
        else:
            out.update({"global/acc": math.nan, "global/loss": math.nan})
        results = []
        for cohort in self.cohorts(list(range(len(self.clients)))):
            states = [self.personal_state(i) for i in cohort]
            if self.cohort_size is None:
                load(self.model, states[0])
                results.append(evaluate(self.model, self.train_data, self.clients[cohort[0]].test, bs, self.collate))
                continue
            with stacked(self.model, states):
                results += evaluate_cohort(self.model, self.train_data, [self.clients[i].test for i in cohort],
                                           bs, self.collate)
        accs, losses, sizes = (list(x) for x in zip(*results))
        out.update(personal_summary(accs, sizes))
        out["personal/loss"] = float(np.average(losses, weights=sizes))
        out["personal/acc_by_client"] = accs
        return out

    # -- the loop ----------------------------------------------------------------------------
    def run(self, on_round_end: Callable[[int], None] = lambda rnd: None) -> list[dict]:
        """Round 0 (data statistics, first evaluation), then rounds to fl.rounds, from the one after
        `self.completed` (a restored run goes on where it stopped); `on_round_end(rnd)` after each."""
        rows = []
        set_trainable(self.model, self.exchange.trainable)
        if self.completed < 0:
            t0 = time.perf_counter()
            # Round 0: each client receives the 64-bit init seed once (nothing is sent without a federation).
            seed_down = SEED_BYTES * self.fl.num_clients if self.aggregator.communicates else 0
            row = {"round": 0, "train/loss": math.nan, "comm/up_bytes": 0, "comm/down_bytes": seed_down,
                   "fl/clients": 0, "fl/rejected_clients": 0, **self.upload_data_stats(), **self.evaluate()}
            self.cum["down"] += row["comm/down_bytes"]
            self.cum["up"] += row["comm/up_bytes"]
            rows.append(self._emit(row, t0))
            self.completed = 0
            on_round_end(0)
        bar = tqdm(range(self.completed + 1, self.fl.rounds + 1), desc="rounds", disable=not self.progress,
                   dynamic_ncols=True)
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
            self.completed = rnd
            on_round_end(rnd)
        return rows

    def _emit(self, row: dict, t0: float) -> dict:
        row["comm/up_bytes_cum"] = self.cum["up"]
        row["comm/down_bytes_cum"] = self.cum["down"]
        row["time/round_s"] = time.perf_counter() - t0
        self.log(row)
        return row
