"""The experiment, top to bottom: check, resume point, seed, data, partition, model, adapter, simulate, summarise."""
from __future__ import annotations

import json
import logging
import time
import traceback
import warnings
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from celora.adapters import adapter_layers, inject
from celora.data import load
from celora.data.partition import label_counts
from celora.files import atomic_write
from celora.fl import checkpoint
from celora.fl.wire import Exchange
from celora.metrics import Metrics, Sink, summarize
from celora.seeds import FROZEN_FACTORS, derive_seed
from celora.validate import build

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


# Keys that change no number of a run: a checkpoint may be resumed under other values of these.
NOT_IN_RESULTS = ("resume", "logger", "hydra", "simulation.progress", "dataset.cache_dir", "optimized_metric")


def result_config(cfg: DictConfig) -> dict:
    """The resolved config without NOT_IN_RESULTS: what a checkpoint must match to be resumed."""
    tree = OmegaConf.to_container(cfg, resolve=True)
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
    changes = "; ".join(f"{key}: {old!r} -> {new!r}"
                        for key, old, new in checkpoint.differences(saved["config"], config))
    if mode != "force":
        raise ValueError(f"{directory.parent} holds a checkpoint (round {saved['round']}) of a run with another "
                         f"config ({changes}). Run it with its old config to resume it, add resume=force to go "
                         "on under the new one, or resume=never to start over.")
    warnings.warn(f"resuming after round {saved['round']} under a changed config (resume=force): {changes}")
    return saved


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict:
    """Runs one experiment from a composed config; returns the summary also written to summary.json.

    A run that raises (or is interrupted) leaves failed.json in its dir, so analysis can tell it from
    one still running."""
    out = _run_dir(run_dir)
    (out / "failed.json").unlink(missing_ok=True)
    try:
        return _experiment(cfg, out)
    except BaseException as e:
        (out / "failed.json").write_text(json.dumps(
            {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}, indent=1))
        raise


def _experiment(cfg: DictConfig, out: Path) -> dict:
    """run() itself, writing into `out`."""
    parts = build(cfg)  # every check that needs neither data nor model, all problems in one error
    config = result_config(cfg)
    saved = resume_point(out / "checkpoints", cfg.get("resume", "auto"), config)
    if saved is not None and saved["round"] >= parts.fl.rounds and (out / "summary.json").exists():
        try:
            summary = json.loads((out / "summary.json").read_text())
            log.info("%s finished before (round %d): nothing to do", out, saved["round"])
            return summary
        except ValueError:
            pass  # unreadable: written again below from the checkpoint
    (out / "summary.json").unlink(missing_ok=True)  # a run that trains has no summary until it ends

    torch.manual_seed(cfg.seed)
    fl, adapter, aggregator = parts.fl, parts.adapter, parts.aggregator

    backbone = instantiate(cfg.model)
    data = load(instantiate(cfg.dataset), backbone.data_args(), cfg.seed)  # tokenised, or resized to the model's input
    splits = parts.partition.split(data.train, fl.num_clients, cfg.seed)
    counts = label_counts(data.train, splits, data.num_classes)
    # latent groups, where the partition has them: the ground truth personalisation should find
    groups = parts.partition.group_of(fl.num_clients)
    (out / "partition.json").write_text(json.dumps(
        {"label_names": data.label_names, "groups": groups, "clients": counts}, indent=1))
    log.info("partition (train label counts per client): %s", [c["train_counts"] for c in counts])

    check_answers(backbone, data, parts.task, cfg)
    model = backbone.classifier(data.num_classes, seed=cfg.seed, label_names=data.label_names)
    targets = adapter.targets or backbone.default_targets
    if not targets:
        raise ValueError(f"no default adapter targets for model_type={backbone.model_type!r}; set adapter.targets")
    # The one 64-bit seed the server sends: every client rebuilds identical frozen factors from it.
    inject(model, adapter, targets, seed=derive_seed(cfg.seed, FROZEN_FACTORS))
    exchange = Exchange.of(model, adapter, communicates=aggregator.communicates)

    sink: Sink = instantiate(cfg.logger)
    metrics = Metrics(out, sink)
    summary: dict = {}
    try:
        sink.log_config(OmegaConf.to_container(cfg, resolve=True), out)
        sim = parts.simulation(
            model=model, exchange=exchange, aggregator=aggregator, train=data.encoded("train"),
            test=data.encoded("test"), splits=splits, fl=fl, client=parts.client, seed=cfg.seed,
            collate=backbone.collate(), log=metrics.log,
            log_matrix=metrics.log_matrix, num_classes=data.num_classes, privacy=parts.privacy, task=parts.task,
        )
        before = 0.0  # seconds spent in earlier processes of this run
        if saved is not None:
            sim.load_state_dict(saved["simulation"])
            before = saved["elapsed_s"]
            log.info("resuming %s after round %d", out, saved["round"])
        # exactly the checkpointed rows: those a killed process logged after its last checkpoint go
        metrics.restore(saved["metrics"] if saved else [], saved["round"] if saved else -1)
        t0 = time.perf_counter()

        def save(rnd: int) -> None:
            checkpoint.save(out / "checkpoints", rnd, {
                "round": rnd, "config": config, "config_hash": checkpoint.fingerprint(config),
                "simulation": sim.state_dict(), "metrics": metrics.rows,
                "elapsed_s": before + time.perf_counter() - t0})

        sim.run(on_round_end=save)
        params = dict(model.named_parameters())
        summary = {
            **summarize(metrics.rows),  # the rows as logged: undefined metrics are null, not NaN
            "time/total_s": before + time.perf_counter() - t0,
            "params/trainable_per_client": sum(params[n].numel() for n in exchange.trainable),
            "params/shared_per_client": sum(params[n].numel() for n in exchange.shared),
            "params/adapted_modules": len(adapter_layers(model)),
        }
        atomic_write(out / "summary.json", json.dumps(summary, indent=1, allow_nan=False).encode())
        last = summary["last"]
        log.info("done in %.0f s: global/acc %s, personal/acc %.4f, uplink %.3f MB -> %s",
                 summary["time/total_s"], last.get("global/acc"), last["personal/acc"],
                 last["comm/up_bytes_cum"] / 1e6, out)
    finally:
        sink.finish(summary)
    return summary


def check_answers(backbone, data, task, cfg) -> None:
    """Model, data and task must agree on what an answer is: a class (label logits) or tokens (a causal LM)."""
    kinds = {"model": backbone.answers, "dataset": data.answers, "task": task.answers}
    if len(set(kinds.values())) > 1:
        said = ", ".join(f"{k}={OmegaConf.select(cfg, k + '._target_')} answers in {v}" for k, v in kinds.items())
        raise ValueError(f"{said}: they must agree. A classifier backbone takes task=classify and a labelled "
                         "dataset; a causal LM (smollm2, hf_causal_lm, tiny_llama) takes task=instruct and "
                         "instruction data: dataset=rt_instruct, party_instruct, instruct_mix or hf_instruct "
                         "(docs/llm.md)")

