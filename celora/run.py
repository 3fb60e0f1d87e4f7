"""The experiment, top to bottom: seed, data, partition, model, adapter, exchange, simulate, summarise."""
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

from celora.adapters import inject
from celora.data import load
from celora.data.partition import label_counts
from celora.fl.simulation import ClientConfig, FLConfig, derive_seed
from celora.fl.wire import Exchange, wire_dtype
from celora.metrics import Metrics, summarize

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


def fl_config(cfg: DictConfig) -> FLConfig:
    """The federation's settings, interpolations resolved (experiments set e.g. eval_every: ${fl.rounds})."""
    return FLConfig(**{**OmegaConf.to_container(cfg.fl, resolve=True), "wire_dtype": wire_dtype(cfg.fl.wire_dtype)})


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
    torch.manual_seed(cfg.seed)
    fl = fl_config(cfg)
    adapter = instantiate(cfg.adapter)  # validates itself

    backbone = instantiate(cfg.model)
    data = load(instantiate(cfg.dataset), backbone.data_args(), cfg.seed)  # tokenised, or resized to the model's input
    partition = instantiate(cfg.partition)
    splits = partition.split(data.train, fl.num_clients, cfg.seed)
    counts = label_counts(data.train, splits, data.num_classes)
    # latent groups, where the partition has them: the ground truth personalisation should find
    groups = partition.group_of(fl.num_clients) if hasattr(partition, "group_of") else None
    (out / "partition.json").write_text(json.dumps(
        {"label_names": data.label_names, "groups": groups, "clients": counts}, indent=1))
    log.info("partition (train label counts per client): %s", [c["train_counts"] for c in counts])

    model = backbone.classifier(data.num_classes, seed=cfg.seed, label_names=data.label_names)
    targets = adapter.targets or backbone.default_targets
    if not targets:
        raise ValueError(f"no default adapter targets for model_type={backbone.model_type!r}; set adapter.targets")
    # The one 64-bit seed the server sends: every client rebuilds identical frozen factors from it.
    inject(model, adapter, targets, seed=derive_seed(cfg.seed, 2))
    aggregator = instantiate(cfg.aggregator)
    exchange = Exchange.of(model, adapter, communicates=aggregator.communicates)

    sink = instantiate(cfg.logger)
    if hasattr(sink, "kwargs") and sink.kwargs.get("dir") is None:
        sink.kwargs["dir"] = str(out)
    metrics = Metrics(out, sink)
    summary: dict = {}
    try:
        sink.log_config(OmegaConf.to_container(cfg, resolve=True))
        client = ClientConfig(optimizer=instantiate(cfg.client.optimizer), local_steps=cfg.client.local_steps,
                              batch_size=cfg.client.batch_size, eval_batch_size=cfg.client.eval_batch_size,
                              grad_clip=cfg.client.grad_clip, max_epochs=cfg.client.max_epochs)
        sim = instantiate(cfg.simulation)(
            model=model, exchange=exchange, aggregator=aggregator, train=data.encoded("train"),
            test=data.encoded("test"), splits=splits, fl=fl, client=client, seed=cfg.seed,
            collate=backbone.collate(), log=metrics.log,
            log_matrix=metrics.log_matrix, num_classes=data.num_classes,
            privacy=instantiate(cfg.privacy)(sample_rate=fl.clients_per_round / fl.num_clients),
        )
        t0 = time.perf_counter()
        sim.run()
        params = dict(model.named_parameters())
        summary = {
            **summarize(metrics.rows),  # the rows as logged: undefined metrics are null, not NaN
            "time/total_s": time.perf_counter() - t0,
            "params/trainable_per_client": sum(params[n].numel() for n in exchange.trainable),
            "params/shared_per_client": sum(params[n].numel() for n in exchange.shared),
            "params/adapted_modules": len([n for n in params if n.endswith(".lora_A")]),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False))
        last = summary["last"]
        log.info("done in %.0f s: global/acc %s, personal/acc %.4f, uplink %.3f MB -> %s",
                 summary["time/total_s"], last.get("global/acc"), last["personal/acc"],
                 last["comm/up_bytes_cum"] / 1e6, out)
    finally:
        sink.finish(summary)
    return summary
