"""One metrics schema, round as the step: written to metrics.jsonl and to W&B; summary of last and best."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Protocol

from celora.errors import ConfigError

log = logging.getLogger("celora")

KEYS = (
    "round", "global/acc", "global/loss", "personal/acc", "personal/acc_unweighted",
    "personal/acc_worst10", "personal/loss", "train/loss", "comm/up_bytes", "comm/down_bytes",
    "comm/up_bytes_cum", "comm/down_bytes_cum", "fl/clients", "fl/rejected_clients", "time/round_s",
    "personal/clients",
)


# Present in the runs they concern: DP, and the metrics a task adds (a causal LM's answer perplexity; a
# classification benchmark's Matthews correlation or F1, task.extra_metrics, personal/* from the evaluated
# clients' confusion counts pooled) and its
# training throughput in tokens; the round's time in local training, on the server (screening, privacy,
# aggregation) and in evaluation, on the rounds that have each; in a Flower run, Flower's own count of the
# round's records (ArrayRecord.count_bytes(): celora's bytes plus the tensors' names, docs/flower.md); the
# round's client learning rate where a schedule moves it (client.lr_schedule, client.lr_warmup_rounds).
OPTIONAL = ("privacy/epsilon", "privacy/clipped_fraction", "privacy/update_norm", "privacy/stats_sigma",
            "global/ppl", "personal/ppl", "train/tokens", "train/lr", "time/train_tokens_per_s",
            "time/train_s", "time/server_s", "time/eval_s", "comm/record_up_bytes", "comm/record_down_bytes",
            "global/mcc", "personal/mcc", "global/f1", "personal/f1")
# A partition with latent groups that see the data each their own way (concept_shift, rotation_groups) scores the
# global model on the test set under each group's view: global/acc_group0, global/acc_group1, ...
GROUP_ACC = "global/acc_group"


def group_key(key: str) -> bool:
    """Whether `key` is a latent group's global accuracy (global/acc_group<g>)."""
    return key.startswith(GROUP_ACC) and key[len(GROUP_ACC):].isdigit()


def check_objective(key: str | None, eval_sets: list[str] = ()) -> None:
    """optimized_metric must name a scalar of the schema, or best/<one>, or a metric of one of `eval_sets`
    (eval/<set>/<metric>, eval/<set>/personal/<metric>), or an accuracy per subject or category of data with
    subjects (global/acc/<subject>, personal/acc/category/<category>: celora.tasks.subjects)."""
    name = key[len("best/"):] if key and key.startswith("best/") else key
    parts = (name or "").split("/")
    if len(parts) > 2 and parts[0] == "eval" and parts[1] in eval_sets:
        return
    if len(parts) > 2 and parts[0] in ("global", "personal") and parts[1] == "acc" and all(parts[2:]):
        return
    if name and group_key(name):
        return
    if key is not None and name not in set(KEYS) - {"round"} | set(OPTIONAL):
        raise ConfigError(f"optimized_metric={key!r} is not a metric of the schema; use one of "
                         f"{[k for k in KEYS if k != 'round']}, or best/<one of them>, or null")


def objective(summary: dict, key: str | None = None) -> float | None:
    """The number a sweeper optimises: `key` of the summary's last row, or its best value (`best/<key>`);
    None: global/acc where the server has one model, else personal/acc."""
    last = summary.get("last", {})
    if key is None:
        return last.get("global/acc") if last.get("global/acc") is not None else last.get("personal/acc")
    if key.startswith("best/"):
        return summary.get("best", {}).get(key[len("best/"):])
    return last.get(key)


def higher_is_better(key: str) -> bool | None:
    """An accuracy is better higher, a loss or perplexity lower; None for a key that is neither."""
    if key.endswith(("acc", "mcc", "f1")) or "/acc_" in key or "/acc/" in key:
        return True
    if key.endswith("loss") or key.endswith("ppl"):
        return False
    return None


def best_round(rows: list[dict], key: str | None = None) -> int | None:
    """The evaluated round where the objective (`optimized_metric`: a key, `best/<key>`, or None as in
    `objective`) is best; the earliest on ties; None if no row has it."""
    def value(row: dict):
        if key is None:
            found = [row.get(k) for k in ("global/acc", "personal/acc")]
            return next((v for v in found if isinstance(v, (int, float)) and math.isfinite(v)), None)
        v = row.get(key[len("best/"):] if key.startswith("best/") else key)
        return v if isinstance(v, (int, float)) and math.isfinite(v) else None

    name = "personal/acc" if key is None else key[len("best/"):] if key.startswith("best/") else key
    sign = 1 if higher_is_better(name) is not False else -1
    scored = [(sign * v, -r["round"], r["round"]) for r in rows if (v := value(r)) is not None]
    return max(scored)[2] if scored else None


def budget_use(row: dict, budget: float) -> dict:
    """The share of a communication budget (bytes of uplink and downlink together, as FlowerTune's leaderboard counts
    them) that a row's cumulative bytes used: summary.json's `comm/budget_*`."""
    used = row["comm/up_bytes_cum"] + row["comm/down_bytes_cum"]
    return {"comm/budget_bytes": budget, "comm/budget_used_bytes": used, "comm/budget_share": used / budget}


def budget_line(row: dict, budget: float) -> str:
    use = budget_use(row, budget)
    return (f"round {row['round']}: uplink+downlink {use['comm/budget_used_bytes'] / 1e9:.3f} GB of budget "
            f"{budget / 1e9:.3f} GB ({100 * use['comm/budget_share']:.2f}%)")


def _clean(value):
    """NaN is not JSON: undefined metrics (e.g. global accuracy with private tensors) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def summarize(rows: list[dict]) -> dict:
    """`last` row, and for each scalar accuracy (max) and loss or perplexity (min) key its best value and round
    (a per-client list such as `personal/acc_by_client` has no best: it stays in `last`)."""
    best, best_round = {}, {}
    for key in rows[-1] if rows else ():
        higher = higher_is_better(key)
        if higher is None:
            continue
        vals = [(r[key], r["round"]) for r in rows if isinstance(r.get(key), (int, float))]
        if vals:
            v, rnd = (max if higher else min)(vals, key=lambda t: t[0])
            best[key], best_round[key] = v, rnd
    return {"last": rows[-1] if rows else {}, "best": best, "best_round": best_round}


def sweep_labels() -> dict:
    """Inside a Hydra multirun job: W&B group = the sweep dir, run name = the job's overrides."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return {}
    hc = HydraConfig.get()
    return {"group": hc.sweep.dir, "name": hc.job.override_dirname or f"job {hc.job.num}"}


class Sink(Protocol):
    """Where a run's metrics go besides metrics.jsonl (`logger` config group: W&B, or nowhere).

    Called in this order: log_config once, then log / log_matrix / log_partition as the run goes,
    then finish (also after a failure). A sink must never raise: a logging fault only warns.
    """

    def log_config(self, config: dict, run_dir: str | Path | None = None) -> None:
        """The run's resolved config, and the dir it writes to (where the sink may keep its files)."""

    def log(self, row: dict) -> None:
        """One evaluated round, the metrics schema's keys, `round` as the step."""

    def log_matrix(self, name: str, rnd: int, ids: list[int], matrix) -> None:
        """A client x client matrix (aggregation weights, data distances) of round `rnd`."""

    def log_partition(self, partition: dict) -> None:
        """partition.json: each client's label counts."""

    def finish(self, summary: dict) -> None:
        """summary.json's content ({} when the run failed)."""


class NullSink(Sink):
    """metrics.jsonl and summary.json only."""


class WandbSink(Sink):
    """Weights & Biases, offline by default (sync later with `wandb sync`); failures only warn.

    One W&B run per experiment; in a multirun each job's run is grouped by its sweep (`sweep_labels`)
    unless logger.group / logger.name say otherwise."""

    def __init__(self, project: str = "celora", mode: str = "offline", entity: str | None = None,
                 group: str | None = None, name: str | None = None, tags: list[str] | None = None,
                 dir: str | None = None):
        self.kwargs = dict(project=project, mode=mode, entity=entity, group=group, name=name,
                           tags=list(tags or []), dir=dir)
        self.run = None

    def log_config(self, config: dict, run_dir: str | Path | None = None) -> None:
        try:
            import wandb

            kwargs = {**self.kwargs, **{k: v for k, v in sweep_labels().items() if self.kwargs.get(k) is None}}
            if kwargs["dir"] is None and run_dir is not None:  # the W&B files beside the run's own
                kwargs["dir"] = str(run_dir)
            self.run = wandb.init(config=config, reinit="finish_previous", **kwargs)
        except Exception as e:  # a logging fault must never cost the run
            log.warning("W&B disabled for this run: %s", e)

    def log(self, row: dict) -> None:
        if self.run is not None:
            try:
                scalars = {k: v for k, v in row.items() if k != "round" and isinstance(v, (int, float))}
                self.run.log(scalars, step=row["round"])
            except Exception as e:
                log.warning("W&B log failed (metrics.jsonl still has it): %s", e)

    def _image(self, key: str, figure, step: int) -> None:
        """Logs the figure `figure()` draws; drawing is inside the guard, so a plotting fault only warns."""
        if self.run is not None:
            try:
                import wandb

                self.run.log({key: wandb.Image(figure())}, step=step)
            except Exception as e:
                log.warning("W&B image log failed (the run dir still has its data): %s", e)

    def log_matrix(self, name: str, rnd: int, ids: list[int], matrix) -> None:
        from celora.plots import heatmap

        self._image(f"matrix/{name}", lambda: heatmap(matrix, ids, f"{name}, round {rnd}"), step=rnd)

    def log_partition(self, partition: dict) -> None:
        from celora.plots import partition_histogram

        self._image("partition/train_labels", lambda: partition_histogram(partition), step=0)

    def finish(self, summary: dict) -> None:
        if self.run is not None:
            try:
                for section in ("last", "best", "best_round"):
                    for k, v in summary.get(section, {}).items():
                        if k != "round" and isinstance(v, (int, float)):
                            self.run.summary[f"{section}/{k}"] = v
                for k, v in summary.items():
                    if isinstance(v, (int, float)):  # wall time, parameter counts
                        self.run.summary[k] = v
                self.run.finish()
            except Exception as e:
                log.warning("W&B finish failed: %s", e)
            self.run = None


class Metrics:
    """Appends rows to metrics.jsonl (always) and forwards them to a sink; with a communication budget (bytes), logs
    the share of it each row's cumulative uplink + downlink used."""

    def __init__(self, run_dir: Path, sink: Sink | None = None, comm_budget_bytes: float | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.sink = sink or NullSink()
        self.budget = comm_budget_bytes
        self.rows: list[dict] = []

    def log(self, row: dict) -> None:
        row = {k: _clean(v) for k, v in row.items()}
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.budget is not None:
            log.info(budget_line(row, self.budget))
        self._forward(row, first=len(self.rows) == 1)

    def _forward(self, row: dict, first: bool) -> None:
        partition = self.path.parent / "partition.json"
        if first and partition.exists():  # written before training: it opens the run's images
            self.sink.log_partition(json.loads(partition.read_text()))
        self.sink.log(row)

    def restore(self, rows: list[dict], through: int) -> None:
        """Makes the run dir hold exactly `rows` and the matrices of rounds <= `through` (what a
        checkpoint saw), so rows a killed process wrote after its last checkpoint are neither kept
        nor duplicated; replays the rows to the sink, whose run starts anew."""
        self.rows = list(rows)
        self.path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        for path in self.path.parent.glob("*.jsonl"):
            if path != self.path:
                _trim_matrices(path, through)
        for k, row in enumerate(rows):
            self._forward(row, first=k == 0)

    def log_matrix(self, name: str, rnd: int, ids: list[int], matrix) -> None:
        """A client x client matrix (aggregation weights, data distances) to `<name>.jsonl` and the sink."""
        rows = [[float(v) for v in r] for r in matrix.tolist()]
        with (self.path.parent / f"{name}.jsonl").open("a") as f:
            f.write(json.dumps({"round": rnd, "clients": list(ids), "matrix": rows}) + "\n")
        self.sink.log_matrix(name, rnd, ids, rows)


def _trim_matrices(path: Path, through: int) -> None:
    """Keeps the rows of rounds <= through of a `log_matrix` file (a cut-off last line goes too);
    files of another shape are left alone."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not (isinstance(row, dict) and {"round", "clients", "matrix"} <= set(row)):
            return  # not a matrix file
        if row["round"] <= through:
            kept.append(line + "\n")
    if kept:
        path.write_text("".join(kept))
    else:
        path.unlink()
