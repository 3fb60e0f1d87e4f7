"""The ServerApp: celora's round loop with Flower messages where the simulation calls its clients.

`FlowerRun` is the `Simulation` itself, with its four client phases (the data summaries before
round 1, a round's local training, the examples each client weighs with, and personal evaluation)
done by messages to the SuperNodes through Flower's `Grid`. Everything on the server's side is the
simulation's own code: client sampling from the same seed, screening, privacy, celora's pure
aggregators, global evaluation on the server's test split, the metrics schema. celora sends each
client its own personalised state, which one `Strategy` broadcast cannot, so the loop is the
ServerApp's `main`, with `grid.send_and_receive`.

Bytes: `comm/*` is celora's count (the tensor data at fl.wire_dtype), the same numbers as
`python -m celora`; `comm/record_up_bytes` and `comm/record_down_bytes` are Flower's own
`ArrayRecord.count_bytes()` of the same messages, which also counts the tensors' names.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig, OmegaConf

from celora.fl.data_stats import Collected
from celora.fl.simulation import Simulation
from celora.fl.wire import Payload
from celora.files import atomic_write
from celora.flower import protocol as P
from celora.flower.records import from_record, record_stats, to_record
from celora.flower.settings import FlowerSettings, check_flower, compose
from celora.metrics import Metrics
from celora.run import log_done, run_summary, write_partition
from celora.world import build_world

log = logging.getLogger("celora")


class FlowerRun(Simulation):
    """The simulation's loop with its clients behind Flower's Grid (one SuperNode per client)."""

    def __init__(self, *args, grid: Grid, settings: FlowerSettings, **kwargs):
        super().__init__(*args, **kwargs)
        self.grid, self.settings = grid, settings
        self.nodes: dict[int, int] = {}  # client id -> node id
        self.sizes: dict[int, int] = {}  # client id -> its examples, as it reported them
        self.last_accepted: dict[int, int] = {}  # client id -> the last round its upload was accepted
        self.record_bytes = {"up": 0, "down": 0}
        self.dtypes = {n: p.dtype for n, p in self.model.named_parameters()}

    # -- messages ---------------------------------------------------------------------------------
    def _message(self, i: int, kind: str, content: dict) -> Message:
        return Message(RecordDict(content), dst_node_id=self.nodes[i], message_type=kind)

    def _exchange(self, messages: dict[int, Message], what: str) -> tuple[dict[int, RecordDict], dict[int, str]]:
        """Sends one message per client and waits for the replies (flower.reply_timeout_s): (client -> reply
        content, client -> why it gave none)."""
        clients = {m.metadata.dst_node_id: i for i, m in messages.items()}
        replies = self.grid.send_and_receive(list(messages.values()), timeout=self.settings.reply_timeout_s)
        got, failed = {}, {}
        for reply in replies:
            i = clients[reply.metadata.src_node_id]
            if reply.has_error():
                last = (reply.error.reason or "").strip().splitlines()[-1:] or ["no reason given"]
                failed[i] = f"its ClientApp failed (Flower error {reply.error.code}): {last[0]}"
            else:
                got[i] = reply.content
        for i in messages:
            if i not in got and i not in failed:
                failed[i] = f"no reply within flower.reply_timeout_s={self.settings.reply_timeout_s} s"
        for i, why in sorted(failed.items()):
            log.warning("%s: client %d (node %d) is left out: %s", what, i, self.nodes[i], why)
        return got, failed

    def connect(self) -> None:
        """Waits for a SuperNode per client and learns which client each node is (its `partition-id`)."""
        n, deadline = self.fl.num_clients, time.monotonic() + self.settings.connect_timeout_s
        while len(nodes := sorted(self.grid.get_node_ids())) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(nodes)} SuperNode(s) connected within flower.connect_timeout_s="
                                   f"{self.settings.connect_timeout_s}, but the run has fl.num_clients={n}: start one "
                                   "SuperNode per client, each with --node-config \"partition-id=<i> "
                                   f"num-partitions={n}\"")
            time.sleep(0.2)
        hello = RecordDict({P.CONFIG: ConfigRecord({P.KIND: P.HELLO})})
        messages = [Message(hello, dst_node_id=node, message_type=MessageType.QUERY) for node in nodes]
        replies = list(self.grid.send_and_receive(messages, timeout=self.settings.connect_timeout_s))
        errors = [r.error.reason for r in replies if r.has_error()]
        if errors:
            raise RuntimeError(f"{len(errors)} SuperNode(s) refused the run: {errors[0].strip().splitlines()[-1]}")
        seen: dict[int, int] = {}
        for r in replies:
            i = int(r.content[P.METRICS][P.CLIENT])
            if i in seen:
                raise RuntimeError(f"SuperNodes {seen[i]} and {r.metadata.src_node_id} both have partition-id={i}: "
                                   "give each SuperNode its own partition-id")
            seen[i] = r.metadata.src_node_id
            self.sizes[i] = int(r.content[P.METRICS][P.EXAMPLES])
        missing = sorted(set(range(n)) - set(seen))
        if missing:
            raise RuntimeError(f"no SuperNode answered for client(s) {missing[:5]} of fl.num_clients={n}")
        self.nodes = seen
        log.info("Flower: %d SuperNodes, one per client", n)

    # -- the client phases of Simulation, by message ---------------------------------------------
    def collect_stats(self, spec, value_bytes: int) -> Collected:
        ask = {P.CONFIG: ConfigRecord({P.KIND: P.DATA_STATS})}
        got, failed = self._exchange({i: self._message(i, MessageType.QUERY, ask) for i in self.nodes}, "data stats")
        if failed:
            raise RuntimeError(f"the data summaries of client(s) {sorted(failed)[:5]} did not arrive "
                               f"({next(iter(failed.values()))}); the data-space distance needs every client's")
        stats = [record_stats(got[i][P.STATS]) for i in range(self.fl.num_clients)]
        self.record_bytes["up"] += sum(got[i][P.STATS].count_bytes() for i in got)
        sigma = got[0][P.METRICS].get(P.SIGMA)
        return Collected(stats, sum(s.nbytes(value_bytes) for s in stats), sigma)

    def upload_data_stats(self) -> dict:
        return {**super().upload_data_stats(), **self.wire_metrics()}

    def train_sampled(self, rnd, sampled, sent: dict[int, Payload], received):
        messages = {}
        for i in sampled:
            record = to_record(sent[i])
            self.record_bytes["down"] += record.count_bytes()
            config = ConfigRecord({P.ROUND: rnd, P.LAST_ACCEPTED: self.last_accepted.get(i, -1)})
            messages[i] = self._message(i, MessageType.TRAIN, {P.SHARED: record, P.CONFIG: config})
        got, failed = self._exchange(messages, f"round {rnd}")
        if failed and self.fl.on_client_error == "raise":
            raise RuntimeError(f"round {rnd}: client {min(failed)} failed ({failed[min(failed)]}) and "
                               "fl.on_client_error=raise")
        trained = {}
        for i, content in got.items():
            record, metrics = content[P.SHARED], content[P.METRICS]
            self.record_bytes["up"] += record.count_bytes()
            self.sizes[i] = int(metrics[P.EXAMPLES])
            self.fitting.tokens.count += int(metrics[P.TOKENS])
            trained[i] = (float(metrics[P.LOSS]), from_record(record, self.dtypes, self.exchange.shared).unpack())
        return trained, {i: RuntimeError(why) for i, why in failed.items()}

    def examples(self, i: int) -> int:
        return self.sizes[i]

    def commit(self, rnd, accepted, privates) -> None:
        for i in accepted:  # the client keeps its private tensors of this round when it next hears from us
            self.last_accepted[i] = rnd

    def wire_metrics(self) -> dict:
        out = {"comm/record_up_bytes": self.record_bytes["up"], "comm/record_down_bytes": self.record_bytes["down"]}
        self.record_bytes = {"up": 0, "down": 0}
        return out

    def personal_sums(self, ids, advance=None):
        messages = {}
        for i in ids:
            payload = Payload.pack(self.states.received(i), self.exchange.shared, self.fl.wire_dtype)
            config = ConfigRecord({P.LAST_ACCEPTED: self.last_accepted.get(i, -1)})
            messages[i] = self._message(i, MessageType.EVALUATE, {P.PERSONAL: to_record(payload), P.CONFIG: config})
        got, failed = self._exchange(messages, "evaluation")
        if not got:
            raise RuntimeError(f"no client answered the evaluation: {next(iter(failed.values()))}")
        return {i: {k: v for k, v in got[i][P.METRICS].items() if k != P.CLIENT} for i in sorted(got)}


def serve(grid: Grid, cfg: DictConfig, out: Path) -> dict:
    """One celora run over the Grid's SuperNodes, writing the run dir as `python -m celora` does."""
    from hydra.utils import instantiate

    out.mkdir(parents=True, exist_ok=True)
    world = build_world(cfg)
    settings = check_flower(cfg, world.parts.aggregator)
    write_partition(world, out)
    (out / "metrics.jsonl").unlink(missing_ok=True)  # a Flower run does not resume: it starts over
    sink = instantiate(cfg.logger)
    metrics = Metrics(out, sink, world.parts.fl.comm_budget_bytes)
    summary: dict = {}
    try:
        sink.log_config(OmegaConf.to_container(cfg, resolve=True), out)
        run = world.simulation(cls=FlowerRun, grid=grid, settings=settings, recorder=metrics, progress=False)
        t0 = time.perf_counter()
        run.connect()
        run.run()
        summary = run_summary(metrics.rows, time.perf_counter() - t0, world)
        atomic_write(out / "summary.json", json.dumps(summary, indent=1, allow_nan=False).encode())
        log_done(summary, out)
    finally:
        sink.finish(summary)
    return summary


def server_app(cfg: DictConfig | None = None, out_dir: str | Path | None = None) -> ServerApp:
    """celora's ServerApp for a composed config and run dir, or (None) for the run config's `overrides` and
    `out-dir` (`flwr run`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        c = cfg if cfg is not None else compose(context.run_config.get(P.OVERRIDES, ""))
        out = out_dir if out_dir is not None else context.run_config.get(P.OUT_DIR, "outputs/flower")
        serve(grid, c, Path(out))

    return app
