"""The experiment, top to bottom: check, resume point, seed, data, partition, model, adapter, simulate, summarise."""
from __future__ import annotations

import json
import logging
import time
import traceback
import warnings
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from celora.data.partition import label_counts, partition_summary
from celora.files import atomic_write
from celora.fl import checkpoint
from celora.fl.engine import resolve
from celora.metrics import Metrics, Sink, best_round, budget_use, summarize
from celora.progress import logs_beside_bars
from celora.validate import build, declared_default
from celora.world import World, build_world

log = logging.getLogger("celora")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


def _run_dir(run_dir) -> Path:
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else "outputs/run"
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


# Keys that change no number of a run: a checkpoint may be resumed under other values of these. `answers`
# describes an option (celora.schema.METADATA); leaving it out keeps runs finished before it existed finished.
NOT_IN_RESULTS = ("resume", "logger", "hydra", "simulation.progress", "dataset.cache_dir", "optimized_metric",
                  "flower", "model.answers", "dataset.answers", "task.answers", "export", "fl.comm_budget_bytes")


def result_config(cfg: DictConfig) -> dict:
    """The resolved config without NOT_IN_RESULTS: what a checkpoint must match to be resumed. The device is
    the one `simulation.accelerator` picks here (auto: the GPU where there is one), so a run made with
    `accelerator: cpu` is the same run as `auto` on a machine without a GPU, and another one on a GPU."""
    tree = OmegaConf.to_container(cfg, resolve=True)
    simulation = tree.get("simulation")
    if isinstance(simulation, dict) and simulation.get("accelerator") is not None:
        simulation["accelerator"] = resolve(simulation["accelerator"])
    for key in NOT_IN_RESULTS:
        *path, last = key.split(".")
        node = tree
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return tree


def resume_point(directory: Path, mode: str, config: dict) -> dict | None:
    """The checkpoint to continue from (None: start over); one saved under another config is refused
    unless mode is `force`."""
    if mode == "never":
        checkpoint.clear(directory)
        return None
    saved = checkpoint.load_latest(directory)
    if saved is None or saved["config_hash"] == checkpoint.fingerprint(config):
        return saved
    added = checkpoint.added_keys(saved["config"], config, lambda key: declared_default(config, key))
    if added is not None:
        log.warning("resuming a checkpoint from before the config had %s (read at their defaults)", ", ".join(added))
        return saved
    changes = "; ".join(f"{key}: {old!r} -> {new!r}"
                        for key, old, new in checkpoint.differences(saved["config"], config))
    if mode != "force":
        raise ValueError(f"{directory.parent} holds a checkpoint (round {saved['round']}) of a run with another "
                         f"config ({changes}). Run it with its old config to resume it, add resume=force to go "
                         "on under the new one, or resume=never to start over.")
    log.warning("resuming after round %d under a changed config (resume=force): %s", saved["round"], changes)
    return saved


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict:
    """Runs one experiment from a composed config; returns the summary also written to summary.json.

    A run that raises (or is interrupted) leaves failed.json in its dir, so analysis can tell it from
    one still running."""
    out = _run_dir(run_dir)
    (out / "failed.json").unlink(missing_ok=True)
    try:
        with logs_beside_bars():  # log lines above the progress bars; warnings into the run's log
            return _experiment(cfg, out)
    except BaseException as e:
        (out / "failed.json").write_text(json.dumps(
            {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}, indent=1))
        e.add_note(f"{out / 'failed.json'} keeps the details")  # the command line prints it under the message
        raise


def _experiment(cfg: DictConfig, out: Path) -> dict:
    """run() itself, writing into `out`."""
    parts = build(cfg)  # every check that needs neither data nor model, all problems in one error
    config = result_config(cfg)
    done = finished_before(out, config) if cfg.get("resume", "auto") != "never" else None
    if done is not None:
        log.info("%s finished before under this config: nothing to do", out)
        return done
    saved = resume_point(out / "checkpoints", cfg.get("resume", "auto"), config)
    if saved is not None and saved["round"] >= parts.fl.rounds and (out / "summary.json").exists():
        try:
            summary = json.loads((out / "summary.json").read_text())
            log.info("%s finished before (round %d): nothing to do", out, saved["round"])
            return summary
        except ValueError:
            pass  # unreadable: written again below from the checkpoint
    (out / "summary.json").unlink(missing_ok=True)  # a run that trains has no summary until it ends

    world = build_world(cfg, parts)
    write_partition(world, out)
    sink: Sink = instantiate(cfg.logger)
    metrics = Metrics(out, sink, parts.fl.comm_budget_bytes)
    summary: dict = {}
    try:
        whole = OmegaConf.to_container(cfg, resolve=True)  # also what `python -m celora.export` rebuilds the run from
        sink.log_config(whole, out)
        sim = world.simulation(recorder=metrics)
        before = 0.0  # seconds spent in earlier processes of this run
        if saved is not None:
            sim.load_state_dict(saved["simulation"])
            before = saved["elapsed_s"]
            log.info("resuming %s after round %d", out, saved["round"])
        # exactly the checkpointed rows: those a killed process logged after its last checkpoint go
        metrics.restore(saved["metrics"] if saved else [], saved["round"] if saved else -1)
        t0 = time.perf_counter()

        def save(rnd: int) -> None:
            best = best_round(metrics.rows, cfg.get("optimized_metric"))  # kept beside the newest two
            checkpoint.save(out / "checkpoints", rnd, {
                "round": rnd, "config": config, "config_hash": checkpoint.fingerprint(config),
                "simulation": sim.state_dict(), "metrics": metrics.rows,
                "elapsed_s": before + time.perf_counter() - t0, "run_config": whole},
                keep=() if best is None else (best,))

        sim.run(on_round_end=save)
        summary = run_summary(metrics.rows, before + time.perf_counter() - t0, world)
        atomic_write(out / "summary.json", json.dumps(summary, indent=1, allow_nan=False).encode())
        log_done(summary, out)
        export_at_end(cfg, out)
    finally:
        sink.finish(summary)
    return summary


def write_partition(world: World, out: Path) -> None:
    """partition.json: each client's train and test label counts (`scored_on`: test, or validation rows in a
    tuning run), the label names and any latent groups."""
    counts = label_counts(world.data.train, world.splits, world.data.num_classes)
    # latent groups, where the partition has them: the ground truth personalisation should find
    groups = world.parts.partition.group_of(world.parts.fl.num_clients)
    (out / "partition.json").write_text(json.dumps(
        {"label_names": world.data.label_names, "groups": groups, "clients": counts,
         "scored_on": "test" if world.validation is None else "validation"}, indent=1))
    log.info(partition_summary(counts))


def run_summary(rows: list[dict], seconds: float, world: World) -> dict:
    """summary.json: the rows summarised (undefined metrics are null, not NaN), the wall time, parameter counts,
    and the config that made them (result_config: a run dir copied elsewhere, checkpoints left behind, still
    says what it finished)."""
    budget = world.parts.fl.comm_budget_bytes
    used = budget_use(rows[-1], budget) if budget is not None and rows else {}  # fl.comm_budget_bytes
    return {**summarize(rows), "time/total_s": seconds, **world.param_counts(), **used,
            "config": result_config(world.cfg)}


def finished_before(out: Path, config: dict) -> dict | None:
    """The summary of a run already finished in `out` under this config, else None. The same config less keys
    added since counts (checkpoint.added_keys); any changed or removed value does not."""
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    added = (checkpoint.added_keys(summary["config"], config, lambda key: declared_default(config, key))
             if isinstance(summary.get("config"), dict) else None)
    if added:
        log.warning("%s finished before the config had %s (read at their defaults)", out, ", ".join(added))
    return None if added is None else summary


def log_done(summary: dict, out: Path) -> None:
    last = summary["last"]
    budget = (f" ({100 * summary['comm/budget_share']:.2f}% of the {summary['comm/budget_bytes'] / 1e9:.3f} GB "
              "communication budget, uplink+downlink)" if "comm/budget_share" in summary else "")
    log.info("done in %.0f s: global/acc %s, personal/acc %s, uplink %.3f MB%s -> %s",
             summary["time/total_s"], _shown(last.get("global/acc")), _shown(last.get("personal/acc")),
             last["comm/up_bytes_cum"] / 1e6, budget, out)


def export_at_end(cfg: DictConfig, out: Path) -> None:
    """`export.at_end`: the finished run's models as `python -m celora.export` writes them (it reads the run dir
    back, so both give the same folders). A failed export costs the run nothing: it is logged, the run's own
    files stand, and the command can be run again."""
    settings = cfg.get("export")
    if not settings or not settings.get("at_end"):
        return
    from celora.errors import UserError
    from celora.export.folders import export_run

    try:
        export_run(out, settings.round, settings.models, settings.format)
    except UserError as e:
        log.error("export.at_end: %s (the run itself finished; `python -m celora.export %s` exports it later)", e, out)


def _shown(value) -> str:
    """A metric in a log line: 4 decimals, or '-' where it is undefined (null)."""
    return "-" if value is None else f"{value:.4f}"
