"""The ClientApp: one SuperNode's side of a celora run, with celora's own local training, evaluation and summaries.

A SuperNode is client `partition-id` of the partition (its node config). It rebuilds the run's
world from the config (the same data, partition, backbone, frozen factors and head init as every
other participant) once per process and trains with the very `Simulation.train_clients` that
`python -m celora` runs, from the same `derive_seed` streams of batches and dropout, so a Flower run
computes what the sequential simulation computes.

Private tensors (FedSA-LoRA's B, a local head) never leave the node: they live in the node's
`context.state`. What a round trains of them is kept aside until the server's next message says
whether the round's upload was accepted (`last-accepted`), as the simulation keeps a rejected
client's old private tensors.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from omegaconf import DictConfig, OmegaConf

from celora.fl.data_stats import client_summary
from celora.fl.faults import nonfinite
from celora.fl.simulation import Simulation
from celora.fl.wire import Payload
from celora.flower import protocol as P
from celora.flower.records import from_record, record_state, state_record, stats_record, to_record
from celora.flower.settings import check_flower, compose
from celora.tensors import load
from celora.world import build_world

log = logging.getLogger("celora")

_RUNS: dict[str, Simulation] = {}  # config (YAML) -> the run's world in this process: built once, reused


def partition_id(context: Context, num_clients: int) -> int:
    """This SuperNode's client id, from its node config, checked against the run's partition."""
    config = context.node_config
    hint = (f"start the SuperNode with --node-config \"{P.PARTITION_ID}=<i> {P.NUM_PARTITIONS}={num_clients}\" "
            f"and i in 0..{num_clients - 1} (one SuperNode per client of fl.num_clients={num_clients})")
    if P.PARTITION_ID not in config:
        raise ValueError(f"this SuperNode's node config has no {P.PARTITION_ID} (it has {sorted(config)}): {hint}")
    raw = config[P.PARTITION_ID]
    try:
        i = int(raw)
    except (TypeError, ValueError):
        raise ValueError(f"this SuperNode's {P.PARTITION_ID}={raw!r} is not an integer: {hint}") from None
    if not 0 <= i < num_clients or isinstance(raw, float) and raw != i:
        raise ValueError(f"this SuperNode's {P.PARTITION_ID}={raw!r} names no client of the run's partition: {hint}")
    n = config.get(P.NUM_PARTITIONS)
    if n is not None and int(n) != num_clients:
        raise ValueError(f"this SuperNode's {P.NUM_PARTITIONS}={n} but the run partitions its data among "
                         f"fl.num_clients={num_clients} clients: {hint}")
    return i


class Participant:
    """A client's handlers of the server's messages, over the run's world in this process."""

    def __init__(self, cfg: DictConfig):
        world = build_world(cfg)
        check_flower(cfg, world.parts.aggregator)
        self.sim = world.simulation(progress=False)
        self.dtypes = {n: p.dtype for n, p in self.sim.model.named_parameters()}

    # -- the node's own state -----------------------------------------------------------------
    def private(self, i: int, context: Context, last_accepted: int):
        """Client i's private tensors: what it trained in the last round the server accepted, else its start."""
        state = context.state
        if P.PENDING in state:
            pending_round = int(state[P.PENDING_ROUND][P.ROUND])
            if pending_round == last_accepted:
                state[P.PRIVATE] = state[P.PENDING]
            del state[P.PENDING], state[P.PENDING_ROUND]
        return record_state(state[P.PRIVATE]) if P.PRIVATE in state else dict(self.sim.states.own(i))

    def received(self, message: Message, key: str) -> dict:
        return from_record(message.content[key], self.dtypes, self.sim.exchange.shared).unpack()

    # -- the messages ---------------------------------------------------------------------------
    def query(self, i: int, message: Message, context: Context) -> RecordDict:
        what = message.content[P.CONFIG][P.KIND]
        if what == P.HELLO:
            return RecordDict({P.METRICS: MetricRecord({P.CLIENT: i, P.EXAMPLES: self.sim.examples(i)})})
        if what == P.DATA_STATS:
            sim = self.sim
            load(sim.model, sim.global_state)  # the frozen backbone: C = 0 before round 1
            stats, sigma = client_summary(sim.aggregator.data_stats, sim.model, sim.fitting.task, sim.train_data,
                                          sim.clients[i].train, sim.collate, sim.num_classes, sim.seed, i, sim.engine)
            metrics = {P.CLIENT: i} if sigma is None else {P.CLIENT: i, P.SIGMA: sigma}
            return RecordDict({P.STATS: stats_record(stats, sim.fl.wire_dtype), P.METRICS: MetricRecord(metrics)})
        raise ValueError(f"unknown query {what!r}: the ServerApp and ClientApp run different celora versions")

    def train(self, i: int, message: Message, context: Context) -> RecordDict:
        config = message.content[P.CONFIG]
        rnd = int(config[P.ROUND])
        sim = self.sim
        sim.states.trained(i, self.private(i, context, int(config[P.LAST_ACCEPTED])))
        received = self.received(message, P.SHARED)
        sim.fitting.tokens.take()
        [(loss, state)] = sim.train_clients(rnd, [i], {i: received})
        private = {n: state[n] for n in sim.exchange.private}
        bad = nonfinite(private)
        if bad:  # the simulation rejects such a result; here it never leaves the node
            raise FloatingPointError(f"client {i}'s private tensors hold non-finite values after round {rnd}: {bad[:3]}")
        context.state[P.PENDING] = state_record(private)
        context.state[P.PENDING_ROUND] = ConfigRecord({P.ROUND: rnd})
        upload = Payload.pack(state, sim.exchange.shared, sim.fl.wire_dtype)
        metrics = {P.CLIENT: i, P.LOSS: loss, P.EXAMPLES: sim.examples(i), P.TOKENS: sim.fitting.tokens.take()}
        return RecordDict({P.SHARED: to_record(upload), P.METRICS: MetricRecord(metrics)})

    def evaluate(self, i: int, message: Message, context: Context) -> RecordDict:
        config = message.content[P.CONFIG]
        sim = self.sim
        sim.states.trained(i, self.private(i, context, int(config[P.LAST_ACCEPTED])))
        sim.states.aggregated(None, {i: self.received(message, P.PERSONAL)})
        sums = sim.personal_sums([i])[i]
        return RecordDict({P.METRICS: MetricRecord({P.CLIENT: i, **{k: float(v) for k, v in sums.items()}})})


def participant(cfg: DictConfig) -> Participant:
    key = OmegaConf.to_yaml(cfg, resolve=True)
    if key not in _RUNS:
        _RUNS.clear()  # one run's world per process
        _RUNS[key] = Participant(cfg)
    return _RUNS[key]


def client_app(cfg: DictConfig | None = None) -> ClientApp:
    """celora's ClientApp for a composed config, or (None) for the config `overrides` of the run config (`flwr run`)."""
    config_yaml = None if cfg is None else OmegaConf.to_yaml(cfg, resolve=True)  # travels to Ray's workers as text
    app = ClientApp()

    def handler(kind: Callable[[Participant], Callable]):
        def handle(message: Message, context: Context) -> Message:
            c = OmegaConf.create(config_yaml) if config_yaml else compose(context.run_config.get(P.OVERRIDES, ""))
            who = participant(c)
            i = partition_id(context, who.sim.fl.num_clients)
            return Message(kind(who)(i, message, context), reply_to=message)
        return handle

    app.train()(handler(lambda p: p.train))
    app.evaluate()(handler(lambda p: p.evaluate))
    app.query()(handler(lambda p: p.query))
    return app

