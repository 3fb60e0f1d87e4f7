"""The federated round loop: sample, send, train locally, upload, aggregate, evaluate, log."""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from celora.adapters import silent_layers
from celora.data.batches import train_loader
from celora.errors import UserError
from celora.fl import faults, lora_sb
from celora.fl.client import Fitting, set_trainable
from celora.fl.cohorts import plan
from celora.fl.config import ClientConfig, FLConfig
from celora.fl.data_stats import Collected, collect
from celora.fl.engine import Engine
from celora.fl.evaluation import Advance, add, evaluate, personal_summary
from celora.fl.participants import Clients, Pooled
from celora.fl.server_opt import server_step
from celora.fl.setup import Discard, EvalSet, Method, Recorder, RunData
from celora.fl.states import ModelStates
from celora.fl.wire import SEED_BYTES, Payload
from celora.metrics import GROUP_ACC
from celora.progress import bar
from celora.seeds import BATCHES, DROPOUT, SAMPLING, UPLOAD_NOISE, derive_seed
from celora.similarity import ClassStats
from celora.tensors import State, load, snapshot

log = logging.getLogger("celora")


class Simulation:
    """All clients in one process on one shared backbone.

    Two choices are made once, here: who trains (every client on its own rows, or, for the
    centralized reference, one trainer on the pooled rows: `fl.participants`), and how a pass over
    clients is grouped (`cohort_size=None` one after another on the model's own tensors; an integer K,
    or "all", K clients stacked in one batched pass: `fl.cohorts`). Both groupings give the same
    numbers where nothing random depends on the batch's shape (every dropout off, docs/parallel.md).
    Every client's model (the global state, its personalised state, its private tensors) lives in one
    place, `states` (fl.states.ModelStates).
    """

    def __init__(self, method: Method, data: RunData, fl: FLConfig, client: ClientConfig, seed: int, *,
                 accelerator: str = "cpu", precision: str = "32-true", progress: bool = True,
                 cohort_size: int | str | None = None, recorder: Recorder | None = None):
        # accelerator, precision, progress and cohort_size are conf/simulation's keys (Hydra `_partial_`)
        self.cohorts = plan(cohort_size)
        self.engine = Engine(accelerator, precision)  # the run's one device and precision (one Fabric)
        log.info("device %s, precision %s (simulation.accelerator=%s)", self.engine.device, precision, accelerator)
        self.engine.place(method.model)  # the backbone moves once, here, and stays
        self.method, self.data = method, data
        self.model, self.exchange, self.aggregator = method.model, method.exchange, method.aggregator
        self.train_data, self.test_data, self.collate = data.train, data.test, data.collate
        # the global evaluation's rows of `test`
        self.test_rows = range(len(data.test)) if data.test_rows is None else data.test_rows
        self.fl, self.client, self.seed, self.progress = fl, client, seed, progress
        self.recorder = recorder or Discard()
        self.num_classes = data.num_classes
        self.fitting = Fitting(method.task, client.optimizer, client.grad_clip, self.engine,
                               grad_accum=client.grad_accum, prox_mu=client.prox_mu,
                               anchored=tuple(n for n in method.exchange.shared if n in method.exchange.trainable))
        self.privacy = method.privacy
        self.server = method.server  # server.*: a server optimizer on the aggregate, or none (FedAvg's own path)
        self.moments: dict = {}  # its state: stream ("global", or a client id under a personalised aggregator) -> moments
        self.participants = (Pooled if method.aggregator.pooled else Clients)(data.splits)
        self.clients, self.trainers = self.participants.clients, self.participants.trainers
        initial = snapshot(method.model, method.exchange.trainable)
        self.states = ModelStates({n: initial[n] for n in method.exchange.shared},
                                  {n: initial[n] for n in method.exchange.private},
                                  self.participants.owners(), pooled=self.participants.pooled)
        self.evaluated = fl.evaluated(seed)  # whose personal model each evaluation scores: fixed for the run
        self.data_stats: list[ClassStats] | None = None  # what the clients summarised before round 1
        self.sampler = np.random.default_rng([seed, SAMPLING])
        self.cum = {"up": 0, "down": 0}
        self.completed = -1  # the last round done (0: the round-0 evaluation)
        self.lora_sb_init = method.lora_sb_init
        self.frozen: State | None = None  # Fed-SB's factors, once derived (the config alone does not rebuild them)
        self.gradients_checked = False  # the first local backward pass looks for adapters that get no gradient

    @property
    def global_state(self) -> State:
        """The server's model of the shared tensors (kept by `states`)."""
        return self.states.global_state

    # -- state: what a resumed run needs beyond what the config rebuilds ----------------------
    def state_dict(self) -> dict:
        """Everything that changes from round to round, as tensors and plain Python values.

        The rest (data, partition, backbone, frozen factors, head init, and the seeds of each
        round's sampling of batches, dropout and noise) is rebuilt from the config and the seed,
        so a run restored from this after round k computes round k + 1 exactly as if never stopped.
        """
        return {
            "completed": self.completed,
            **self.states.state_dict(),  # global, personal, private: the keys older checkpoints have
            "sampler": json.dumps(self.sampler.bit_generator.state),  # 128-bit ints as text
            "cum": dict(self.cum),
            "data_stats": None if self.data_stats is None else [vars(s) for s in self.data_stats],
            "privacy": self.privacy.state_dict(),
            "frozen": self.frozen,
            "server": self.moments,
        }

    def load_state_dict(self, state: dict) -> None:
        shapes = {n: p.shape for n, p in self.model.named_parameters()}
        bad = sorted({n for s in self.states.tensors(state) for n, t in s.items() if shapes.get(n) != t.shape})
        if len(state["private"]) != len(self.trainers):
            bad.append(f"{len(state['private'])} clients, not {len(self.trainers)}")
        if bad:
            raise ValueError(f"the checkpoint's state does not fit this run's model and clients ({bad[:3]}); "
                             "it belongs to another config: start over with resume=never")
        self.completed = state["completed"]
        self.states.load_state_dict(state)
        self.sampler.bit_generator.state = json.loads(state["sampler"])
        self.cum = dict(state["cum"])
        if state["data_stats"] is not None:  # the server learns again what it learnt before round 1
            self.data_stats = [ClassStats(**s) for s in state["data_stats"]]
            self.aggregator.prepare(self.data_stats)
        self.privacy.load_state_dict(state["privacy"])
        self.frozen = state.get("frozen")
        self.moments = dict(state.get("server") or {})  # a checkpoint from before server optimizers: none
        if self.frozen is not None:
            lora_sb.install(self.model, self.frozen)

    # -- one round ---------------------------------------------------------------------------
    def sample(self) -> list[int]:
        return self.participants.sample(self.sampler, self.fl.clients_per_round)

    def local_steps(self, i: int) -> int:
        base = self.participants.base_steps(self.client.local_steps, self.fl.clients_per_round)
        return self.client.steps(base, len(self.trainers[i].train))

    def _batches(self, rnd: int, i: int):
        """Client i's batches of round rnd: grad_accum of them for each of its local steps."""
        return train_loader(self.train_data, self.trainers[i].train, self.client.batch_size,
                            self.local_steps(i) * self.client.grad_accum, derive_seed(self.seed, BATCHES, rnd, i),
                            self.collate)

    def train_clients(self, rnd: int, cohort: list[int], received: dict[int, State]) -> list[tuple[float, State]]:
        """Local training of one cohort from what each client received; (mean loss, trained tensors) each."""
        starts = [{**received[i], **self.states.private[i]} for i in cohort]
        torch.manual_seed(derive_seed(self.seed, DROPOUT, rnd, cohort[0]))  # dropout, identical across runs
        check = None if self.gradients_checked else self.warn_silent_adapters
        self.gradients_checked = True
        # the round's rate, set here on the clients' side (a Flower ClientApp trains through this method too)
        fitting = replace(self.fitting, lr_scale=self.client.lr_factor(rnd, self.fl.rounds))
        return self.cohorts.train(self.model, self.exchange.trainable, starts, [self._batches(rnd, i) for i in cohort],
                                  [self.local_steps(i) for i in cohort], fitting, self.collate.pad_id, check)

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

    def downlink(self, i: int) -> Payload:
        """What client i is sent this round: its personal state where the server keeps one, else the global."""
        return Payload.pack(self.states.received(i), self.exchange.shared, self.fl.wire_dtype)

    def train_sampled(self, rnd: int, sampled: list[int], sent: dict[int, Payload],
                      received: dict[int, State]) -> tuple[dict[int, tuple[float, State]], dict[int, Exception]]:
        """The clients' side of a round: each sampled client trains from what it received. Returns (client ->
        (mean loss, trained tensors), client -> why it failed); a failed client is left out of the round."""
        trained, failed = {}, {}
        for cohort in self.cohorts.groups(sampled):
            done, bad = self.train_guarded(rnd, cohort, received)
            trained.update(done), failed.update(bad)
        return trained, failed

    def examples(self, i: int) -> int:
        """Client i's training examples: its weight in the aggregate."""
        return len(self.trainers[i].train)

    def commit(self, rnd: int, accepted: list[int], privates: dict[int, State]) -> None:
        """The accepted clients keep what they trained of their private tensors; a rejected one keeps its old."""
        for i in accepted:
            self.states.trained(i, privates[i])

    def train_round(self, rnd: int) -> dict:
        ex, dtype = self.exchange, self.fl.wire_dtype
        up = 0
        sampled = self.sample()
        self.fitting.tokens.take()
        sent = {i: self.downlink(i) for i in sampled}
        received = {i: payload.unpack() for i, payload in sent.items()}
        down = sum(payload.nbytes for payload in sent.values())
        t0 = time.perf_counter()
        trained, failed = self.train_sampled(rnd, sampled, sent, received)
        train_s = time.perf_counter() - t0
        throughput = self.throughput(rnd, train_s)
        t1 = time.perf_counter()
        if failed and not trained:  # a fault in every client is a fault of the run, not of a client
            first = next(iter(failed.values()))
            if isinstance(first, UserError):  # the user's mistake, said as such (the command line prints it alone)
                first.add_note(f"round {rnd}: the local training of every client raised this")
                raise first
            raise RuntimeError(f"round {rnd}: the local training of every client raised") from first
        uploads, privates, losses = {}, {}, {}
        for i in sorted(trained):
            losses[i], state = trained[i]
            uplink = Payload.pack(state, ex.shared, dtype)
            up += uplink.nbytes  # sent before the server could look at it: a rejected upload still counts
            uploads[i] = uplink.unpack()
            privates[i] = {n: state[n] for n in ex.private if n in state}  # none reach a server over a network
        rejected = faults.screen(uploads, privates, received, self.fl.max_update_norm_ratio, losses)
        for i, why in rejected.items():
            log.warning("round %d: client %d's result is rejected: %s", rnd, i, why)
        accepted = [i for i in sorted(uploads) if i not in rejected]
        self.commit(rnd, accepted, privates)
        uploads = {i: uploads[i] for i in accepted}
        sizes = {i: self.examples(i) for i in accepted}
        uploads, dp_metrics = self.privacy(uploads, received, sizes,
                                           torch.Generator().manual_seed(derive_seed(self.seed, UPLOAD_NOISE, rnd)))
        if uploads:  # with every client rejected the server keeps its state
            result = self.aggregator(uploads, sizes, received)
            if self.server.active and ex.shared:  # the aggregate as a pseudo-gradient (celora.fl.server_opt)
                result, self.moments = server_step(self.server, result, self.states, received, self.moments)
            # clients not sampled keep their last personal state
            self.states.aggregated(result.global_state if ex.shared else None, result.personal)
            if result.weights is not None:
                self.recorder.log_matrix("weights", rnd, result.ids, result.weights)
        # the round's client learning rate, where a schedule moves it (a constant one is client.lr)
        rate = {"train/lr": self.client.lr_at(rnd, self.fl.rounds)} if self.client.scheduled else {}
        return {"train/loss": float(np.mean([losses[i] for i in accepted])) if accepted else math.nan, **rate,
                "comm/up_bytes": up, "comm/down_bytes": down, "fl/clients": len(sampled),
                "fl/rejected_clients": len(sampled) - len(accepted), **dp_metrics, **throughput,
                **self.wire_metrics(), "time/train_s": train_s, "time/server_s": time.perf_counter() - t1}

    def wire_metrics(self) -> dict:
        """Extra byte counts of the round's transport, where there is one (a Flower run's records); {} here."""
        return {}

    def throughput(self, rnd: int, seconds: float) -> dict:
        """The round's local-training tokens and tokens/s (logged too), for token inputs; {} for images."""
        tokens = self.fitting.tokens.take()
        if not tokens:
            return {}
        log.info("round %d: local training processed %d tokens in %.1f s (%.0f tokens/s)", rnd, tokens, seconds,
                 tokens / seconds)
        return {"train/tokens": tokens, "time/train_tokens_per_s": tokens / seconds}

    # -- Fed-SB's frozen factors (once, in round 0) ----------------------------------------
    def init_factors(self) -> tuple[int, int]:
        """Fed-SB's round 0 (adapter.init=lora_sb; celora/fl/lora_sb.py): every client uploads its full-weight
        gradient on one batch, the server sends back A and B of the example-weighted mean's truncated SVD.
        Returns (uplink, downlink) bytes; (0, 0) for every other init."""
        if not self.lora_sb_init:
            return 0, 0
        load(self.model, self.global_state)
        grads, up = {}, 0
        for i, trainer in enumerate(self.trainers):
            g = lora_sb.client_gradient(self.model, self.fitting.task, self.train_data, trainer.train,
                                        self.client.batch_size, self.seed, i, self.collate, self.engine)
            upload = Payload.pack(g, tuple(g), self.fl.wire_dtype)
            up += upload.nbytes
            grads[i] = upload.unpack()
        made = lora_sb.factors(lora_sb.mean_gradient(grads, {i: self.examples(i) for i in grads}),
                               lora_sb.ranks(self.model))
        sent = Payload.pack(made, tuple(made), self.fl.wire_dtype)  # every client receives the same A and B
        self.frozen = sent.unpack()
        lora_sb.install(self.model, self.frozen)
        return up, sent.nbytes * len(self.trainers)

    # -- data-space summaries (once, before round 1) ---------------------------------------
    def upload_data_stats(self) -> dict:
        """Each client summarises its training data with the frozen backbone (fl.data_stats); the aggregator
        receives the summaries (its `prepare`) and returns what to log of them."""
        spec = self.aggregator.data_stats
        if spec is None:
            return {}
        load(self.model, self.global_state)
        value_bytes = torch.tensor([], dtype=self.fl.wire_dtype).element_size()
        collected = self.collect_stats(spec, value_bytes)
        self.data_stats = collected.stats
        ids = list(range(len(self.clients)))
        for name, matrix in self.aggregator.prepare(collected.stats).items():
            self.recorder.log_matrix(name, 0, ids, matrix)
        out = {"comm/up_bytes": collected.nbytes}
        if collected.sigma is not None:
            out["privacy/stats_sigma"] = collected.sigma
        return out

    def collect_stats(self, spec, value_bytes: int) -> Collected:
        """Every client's data summary, from the model as it stands (the frozen backbone: C = 0)."""
        with bar(len(self.clients), "data statistics", self.progress, unit="client") as clients:
            return collect(spec, self.model, self.fitting.task, self.train_data, [c.train for c in self.clients],
                           self.collate, self.num_classes, self.seed, value_bytes, self.engine, clients.update)

    # -- evaluation --------------------------------------------------------------------------
    def personal_state(self, i: int) -> State:
        """Client i's own model: what it last received (or the global state) and its private tensors."""
        return self.states.of(i)

    def timed_evaluation(self) -> dict:
        t0 = time.perf_counter()
        return {**self.evaluate(), "time/eval_s": time.perf_counter() - t0}

    def evaluate(self) -> dict:
        """global/<metric> of the server's model on the test rows (the test split, or in a tuning run the clients'
        pooled validation rows; NaN where there is no one model) and personal/<metric> of each evaluated
        client's own model on its local test rows (its validation rows in a tuning run; every client, or the
        fl.eval_clients drawn once: `personal/clients` says how many), for the task's metrics."""
        bs, task, out = self.client.eval_batch_size, self.fitting.task, {}
        state = self.states.global_model()
        rows = (len(self.test_rows) if state is not None else 0) + sum(len(self.clients[i].test) for i in self.evaluated)
        rows += sum(len(s) * ((state is not None) + s.personal * len(self.evaluated)) for s in self.data.eval_sets)
        with bar(rows, "evaluation", self.progress, unit="row") as rows_done:
            groups = self.data.test_groups or []
            if state is not None:  # one model: evaluated on its own tensors in either grouping
                load(self.model, state)
                if groups:  # each latent group's view of the test rows, then all of them
                    parts = [evaluate(self.model, self.test_data, rows, bs, self.collate, task, self.engine,
                                      rows_done.update) for rows in groups]
                    out.update({f"{GROUP_ACC}{g}": task.rates(p)["acc"] for g, p in enumerate(parts)})
                    sums = add(parts)
                else:
                    sums = evaluate(self.model, self.test_data, self.test_rows, bs, self.collate, task,
                                    self.engine, rows_done.update)
                out.update({f"global/{k}": v for k, v in task.rates(sums).items()})
            else:
                out.update({f"global/{k}": math.nan for k in task.metrics})
                out.update({f"{GROUP_ACC}{g}": math.nan for g in range(len(groups))})
            results = list(self.personal_sums(self.evaluated, rows_done.update).values())
            for scored in self.data.eval_sets:
                out.update(self.evaluate_set(scored, state, rows_done.update))
        rates = [task.rates(r) for r in results]
        accs, sizes = [r["acc"] for r in rates], [r.get("examples", 0) for r in results]
        out.update(personal_summary(accs, sizes))
        out["personal/loss"] = float(np.average([r["loss"] for r in rates], weights=sizes)) if sum(sizes) else math.nan
        pooled = {name: sum(r.get(name, 0) for r in results) for name in {n for r in results for n in r}}
        out.update({f"personal/{k}": v for k, v in task.rates(pooled).items() if k not in ("acc", "loss")})
        out["personal/acc_by_client"] = [a if n else None for a, n in zip(accs, sizes)]  # None: no local test row
        out["personal/clients"] = len(results)
        return out

    def evaluate_set(self, scored: EvalSet, state: State | None, advance: Advance | None = None) -> dict:
        """eval/<set>/<metric> of the global model (NaN where there is no one model) and, for a `personal` set,
        eval/<set>/personal/<metric> of the evaluated clients' own models, their scores pooled (each client scores
        every row of the set, so a pooled accuracy is the clients' mean)."""
        task, bs, prefix = scored.task, self.client.eval_batch_size, f"eval/{scored.name}"
        fitting = replace(self.fitting, task=task)
        out = {}
        if state is not None:
            load(self.model, state)
            sums = add(evaluate(self.model, data, rows, bs, self.collate, task, self.engine, advance)
                       for data, rows in scored.parts)
            out.update({f"{prefix}/{k}": v for k, v in task.rates(sums).items()})
        else:
            out.update({f"{prefix}/{k}": math.nan for k in task.metrics})
        if scored.personal:
            pooled = {}
            for cohort in self.cohorts.groups(self.evaluated):
                states = [self.personal_state(i) for i in cohort]
                for data, rows in scored.parts:
                    pooled = add([pooled, *self.cohorts.evaluate(self.model, fitting, data, states, [rows] * len(cohort),
                                                                bs, self.collate, advance)])
            out.update({f"{prefix}/personal/{k}": v for k, v in task.rates(pooled).items()})
        return out

    def personal_sums(self, ids: list[int], advance: Advance | None = None) -> dict[int, dict[str, float]]:
        """The task's summed scores of each client's own model on its local test rows (client -> sums);
        `advance(rows)` after each batch (the evaluation's progress bar)."""
        out = {}
        for cohort in self.cohorts.groups(ids):
            out.update(zip(cohort, self.cohorts.evaluate(self.model, self.fitting, self.train_data,
                                                         [self.personal_state(i) for i in cohort],
                                                         [self.clients[i].test for i in cohort],
                                                         self.client.eval_batch_size, self.collate, advance)))
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
            factors_up, factors_down = self.init_factors()
            stats = self.upload_data_stats()
            row = {"round": 0, "train/loss": math.nan, **stats,
                   "comm/up_bytes": factors_up + stats.get("comm/up_bytes", 0),
                   "comm/down_bytes": seed_down + factors_down,
                   "fl/clients": 0, "fl/rejected_clients": 0, **self.timed_evaluation()}
            self.cum["down"] += row["comm/down_bytes"]
            self.cum["up"] += row["comm/up_bytes"]
            rows.append(self._emit(row, t0))
            self.completed = 0
            on_round_end(0)
        with bar(self.fl.rounds, "rounds", self.progress, unit="round", leave=True) as rounds:
            rounds.update(self.completed)  # a resumed run's bar starts where it stopped
            for rnd in range(self.completed + 1, self.fl.rounds + 1):
                t0 = time.perf_counter()
                row = {"round": rnd, **self.train_round(rnd)}
                self.cum["up"] += row["comm/up_bytes"]
                self.cum["down"] += row["comm/down_bytes"]
                if rnd % self.fl.eval_every == 0 or rnd == self.fl.rounds:
                    row.update(self.timed_evaluation())
                    rows.append(self._emit(row, t0))
                    acc = row["global/acc"] if not math.isnan(row["global/acc"]) else row["personal/acc"]
                    rounds.set_postfix(acc=f"{acc:.3f}", up=f"{self.cum['up'] / 1e6:.2f}MB")
                self.completed = rnd
                on_round_end(rnd)
                rounds.update(1)
        return rows

    def _emit(self, row: dict, t0: float) -> dict:
        row["comm/up_bytes_cum"] = self.cum["up"]
        row["comm/down_bytes_cum"] = self.cum["down"]
        row["time/round_s"] = time.perf_counter() - t0
        log.info("round %d: global/acc %.4f, personal/acc %.4f, uplink %.3f MB in all, %.1f s", row["round"],
                 row["global/acc"], row["personal/acc"], self.cum["up"] / 1e6, row["time/round_s"])
        self.recorder.log(row)
        return row
