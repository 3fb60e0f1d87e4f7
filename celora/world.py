"""What every participant of a run rebuilds from the config alone: data, partition, model with its adapter, exchange.

`python -m celora` builds it once for the whole simulation; in a Flower run the ServerApp and every
ClientApp build the same one from the same config, so the frozen factors, the head's init and each
client's rows are identical everywhere without being sent (one 64-bit seed stands for them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from celora import evalsets, schema
from celora.adapters import adapter_layers, inject
from celora.data import load
from celora.data.images import ImageData
from celora.data.partition import ClientSplit, hold_out_validation
from celora.data.views import View, Viewed
from celora.errors import InputError
from celora.fl.setup import Method, RunData
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
    eval_sets: list = field(default_factory=list)  # celora.evalsets.EvalSet: scored beside the test rows

    def simulation(self, cls=None, **kwargs):
        """The run's Simulation (or `cls`, a subclass of it, with the same bound config) over this world; kwargs
        go to it (e.g. `recorder`, `progress`)."""
        bound = self.parts.simulation  # conf/simulation: the class with its keys bound (Hydra `_partial_`)
        make = bound if cls is None else (lambda *a, **kw: cls(*a, *bound.args, **{**bound.keywords, **kw}))
        return make(self.method(), self.run_data(), self.parts.fl, self.parts.client, self.cfg.seed, **kwargs)

    def method(self) -> Method:
        """What the run trains and exchanges: the adapted model, the wire, the server, privacy and the task."""
        p = self.parts
        return Method(self.model, self.exchange, p.aggregator, p.task, p.privacy,
                      lora_sb_init=p.adapter.init == "lora_sb", server=p.server)

    def run_data(self) -> RunData:
        """The rows the run reads; a tuning run is scored on validation rows only (the global model on all
        clients' pooled ones).

        Where the partition gives clients views of their rows (celora.data.views: concept shift, noise,
        rotation), the train rows are every client's view side by side and each client's row numbers are
        those of its view; where latent groups share a view, the global test set is scored under each
        group's (`test_groups`: global/acc_group<g>)."""
        train, splits = self.data.encoded("train"), self.splits
        classes = self.data.num_classes
        if any(s.view is not None for s in splits):
            train = Viewed(train, [s.view or View() for s in splits])
            splits = [ClientSplit(train.rows(i, s.train), train.rows(i, s.test), s.view, s.truth)
                      for i, s in enumerate(splits)]
        n = self.parts.fl.num_clients
        group_views = self.parts.partition.group_views(n, self.cfg.seed, classes)
        groups = self.parts.partition.group_of(n) if group_views else None
        if self.validation is not None:  # the clients' own validation rows, in their own views
            test, by_group = train, None
            rows = np.concatenate([s.test for s in splits])
            if groups is not None:
                by_group = [np.concatenate([s.test for s, g2 in zip(splits, groups) if g2 == g])
                            for g in range(len(group_views))]
        elif group_views is not None:
            test = Viewed(self.data.encoded("test"), group_views)
            by_group = [test.rows(g, range(test.n)) for g in range(len(group_views))]
            rows = np.concatenate(by_group)
        else:
            test, rows, by_group = self.data.encoded("test"), None, None
        return RunData(train, test, splits, self.backbone.collate(), classes, rows, self.eval_sets, by_group)

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
    backbone = schema.make(cfg.model)
    data = load(schema.make(cfg.dataset), backbone.data_args(), cfg.seed)  # tokenised, or resized to the model's input
    splits = parts.partition.split(data.train, fl.num_clients, cfg.seed)
    validation = None
    if parts.client.val_fraction > 0:
        labels = np.asarray(data.train["label"][:])
        splits = hold_out_validation(splits, labels, parts.client.val_fraction, cfg.seed)
        validation = np.concatenate([s.test for s in splits])
    check_answers(backbone, data, parts.task, cfg)
    check_views(parts.partition, data, cfg)
    parts.task.bind(backbone, data)
    model = backbone.classifier(data.num_classes, seed=cfg.seed, label_names=data.label_names)
    targets = adapter.targets or backbone.default_targets
    if not targets:
        raise InputError(f"no default adapter targets for model_type={backbone.model_type!r}; set adapter.targets")
    # The one 64-bit seed the server sends: every client rebuilds identical frozen factors from it.
    inject(model, adapter, targets, seed=derive_seed(cfg.seed, FROZEN_FACTORS))
    exchange = Exchange.of(model, adapter, communicates=aggregator.communicates)
    sets = evalsets.load(cfg, backbone, data, cfg.seed)
    return World(cfg, parts, backbone, data, splits, model, exchange, validation, sets)


def check_views(partition, data, cfg) -> None:
    """A partition that shows clients their images changed (feature_noise, rotation_groups) needs image data, and one
    that permutes their labels (concept_shift) needs class labels, not a causal LM's answer tokens."""
    name = type(partition).__name__
    dataset = cfg.dataset.get("_target_", "this dataset")
    if partition.images_only and not isinstance(data, ImageData):
        raise InputError(f"the partition ({name}) adds noise to or rotates each client's images, but the dataset "
                         f"({dataset}) gives token ids; use it with an image dataset (dataset=mnist, fashion_mnist, "
                         "digits or hf_image), or another partition (concept_shift and quantity_skew split any "
                         "classification data)")
    if partition.relabels and data.answers != "classes":
        raise InputError(f"the partition ({name}) permutes each group's class labels, but the dataset ({dataset}) "
                         "is answered in tokens (a causal LM's instruction rows); use it with classification data "
                         "(dataset=rotten_tomatoes, glue, mnist, ...), or another partition")


def check_answers(backbone, data, task, cfg) -> None:
    """Model, data and task must agree on what an answer is: a class (label logits) or tokens (a causal LM).
    An option's YAML declares it (`answers`), so celora.schema refuses a mismatch before anything loads; this
    catches options that do not declare it (a user's own YAML), from what the loaded objects say."""
    problem = schema.disagreement({"model": backbone.answers, "dataset": data.answers, "task": task.answers}, cfg)
    if problem:
        raise InputError(problem)
