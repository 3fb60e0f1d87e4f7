"""What every participant of a run rebuilds from the config alone: data, partition, model with its adapter, exchange.

`python -m celora` builds it once for the whole simulation; in a Flower run the ServerApp and every
ClientApp build the same one from the same config, so the frozen factors, the head's init and each
client's rows are identical everywhere without being sent (one 64-bit seed stands for them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from celora.adapters import adapter_layers, inject
from celora.data import load
from celora.data.partition import ClientSplit, hold_out_validation
from celora.fl.wire import Exchange
from celora.seeds import FROZEN_FACTORS, derive_seed
from celora.validate import Parts, build


@dataclass
class World:
    """A run's parts, data, partition and adapted model: everything its config determines."""

    cfg: DictConfig
    parts: Parts
    backbone: Any
    data: Any
    splits: list[ClientSplit]
    model: nn.Module
    exchange: Exchange
    validation: np.ndarray | None = None  # a tuning run's pooled validation rows of data.train (client.val_fraction)

    def simulation(self, cls=None, **kwargs):
        """The run's Simulation (or `cls`, a subclass of it, with the same bound config) over this world."""
        bound = self.parts.simulation
        make = bound if cls is None else (lambda **kw: cls(*bound.args, **{**bound.keywords, **kw}))
        train = self.data.encoded("train")
        # a tuning run is scored on validation rows only: the global model on all clients' pooled ones
        held_out = {"test": self.data.encoded("test")} if self.validation is None else {
            "test": train, "test_rows": self.validation}
        return make(model=self.model, exchange=self.exchange, aggregator=self.parts.aggregator,
                    train=train, **held_out, splits=self.splits, lora_sb_init=self.parts.adapter.init == "lora_sb",
                    fl=self.parts.fl, client=self.parts.client, seed=self.cfg.seed, collate=self.backbone.collate(),
                    num_classes=self.data.num_classes, privacy=self.parts.privacy, task=self.parts.task, **kwargs)

    def param_counts(self) -> dict:
        params = dict(self.model.named_parameters())
        return {
            "params/trainable_per_client": sum(params[n].numel() for n in self.exchange.trainable),
            "params/shared_per_client": sum(params[n].numel() for n in self.exchange.shared),
            "params/adapted_modules": len(adapter_layers(self.model)),
        }


def build_world(cfg: DictConfig, parts: Parts | None = None) -> World:
    """Checks the config (unless its `parts` are given), then loads the data, splits it and adapts the model."""
    parts = parts or build(cfg)
    torch.manual_seed(cfg.seed)
    fl, adapter, aggregator = parts.fl, parts.adapter, parts.aggregator
    backbone = instantiate(cfg.model)
    data = load(instantiate(cfg.dataset), backbone.data_args(), cfg.seed)  # tokenised, or resized to the model's input
    splits = parts.partition.split(data.train, fl.num_clients, cfg.seed)
    validation = None
    if parts.client.val_fraction > 0:
        labels = np.asarray(data.train["label"][:])
        splits = hold_out_validation(splits, labels, parts.client.val_fraction, cfg.seed)
        validation = np.concatenate([s.test for s in splits])
    check_answers(backbone, data, parts.task, cfg)
    model = backbone.classifier(data.num_classes, seed=cfg.seed, label_names=data.label_names)
    targets = adapter.targets or backbone.default_targets
    if not targets:
        raise ValueError(f"no default adapter targets for model_type={backbone.model_type!r}; set adapter.targets")
    # The one 64-bit seed the server sends: every client rebuilds identical frozen factors from it.
    inject(model, adapter, targets, seed=derive_seed(cfg.seed, FROZEN_FACTORS))
    exchange = Exchange.of(model, adapter, communicates=aggregator.communicates)
    return World(cfg, parts, backbone, data, splits, model, exchange, validation)


def check_answers(backbone, data, task, cfg) -> None:
    """Model, data and task must agree on what an answer is: a class (label logits) or tokens (a causal LM)."""
    kinds = {"model": backbone.answers, "dataset": data.answers, "task": task.answers}
    if len(set(kinds.values())) > 1:
        said = ", ".join(f"{k}={OmegaConf.select(cfg, k + '._target_')} answers in {v}" for k, v in kinds.items())
        raise ValueError(f"{said}: they must agree. A classifier backbone takes task=classify and a labelled "
                         "dataset; a causal LM (smollm2, hf_causal_lm, tiny_llama) takes task=instruct and "
                         "instruction data: dataset=rt_instruct, party_instruct, instruct_mix or hf_instruct "
                         "(docs/llm.md)")
