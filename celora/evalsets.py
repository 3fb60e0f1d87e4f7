"""Evaluation sets beside the run's own test rows (`eval_sets` in the config): any dataset option, with its own
task settings, scored every evaluation round by the global model and, where asked, by each client's own model.

    eval_sets:
      speeches:                      # logged as eval/speeches/<metric> and eval/speeches/personal/<metric>
        dataset: {_target_: ..., ...}   # any option of conf/dataset, e.g. +dataset@eval_sets.speeches.dataset=party_instruct
        split: test                  # test | train | all: which of its rows are scored
        limit: null                  # at most this many of them (a seeded subset, the same every evaluation)
        personal: false              # also each evaluated client's own model (its personalised state)
        task: {}                     # the run's task keys this set sets otherwise, e.g. {accuracy: generate}

The check (`check`) runs with the config's other checks, before anything loads; `load` builds the sets from
the run's loaded model and data.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
from omegaconf import DictConfig, OmegaConf

from celora import schema
from celora.data import load as load_dataset
from celora.data.batches import Encoded
from celora.errors import InputError
from celora.fl.setup import EvalSet
from celora.schema import Range

Split = Literal["test", "train", "all"]


@dataclass
class EvalSetConfig:
    """One entry of `eval_sets` as the config gives it (its `dataset` a dataset option's node)."""

    dataset: dict
    split: Split = "test"
    limit: Annotated[int, Range(ge=1)] | None = None
    personal: bool = False
    task: dict = field(default_factory=dict)


def check(cfg: DictConfig) -> list[str]:
    """Problems of `eval_sets`, each naming its key and the fix: an entry that is not a mapping or has no dataset
    option, a key or value its type does not take, a dataset or task that answers otherwise than the run's
    model (classes or tokens), task keys the run's task does not have."""
    sets = cfg.get("eval_sets")
    if sets is None or len(sets) == 0:
        return []
    if not isinstance(sets, DictConfig):
        return [f"eval_sets must be a mapping of names to sets ({{name: {{dataset: ..., personal: ...}}}}), got "
                f"{OmegaConf.to_container(sets) if OmegaConf.is_config(sets) else sets!r}"]
    out = []
    model_kind = cfg.get("model", {}).get("answers")
    for name, entry in sets.items():
        key = f"eval_sets.{name}"
        if not isinstance(entry, DictConfig) or not isinstance(entry.get("dataset"), DictConfig) or (
                "_target_" not in entry.dataset):
            out.append(f"{key} needs a dataset option: e.g. +dataset@{key}.dataset=party_instruct on the command "
                       f"line, or `- /dataset@{key}.dataset: party_instruct` in an experiment's defaults")
            continue
        out += [p.message for p in schema.node_problems(entry, key, EvalSetConfig)]
        kind = entry.dataset.get("answers")
        if model_kind and kind and kind != model_kind:
            out.append(f"{key}.dataset answers in {kind} but the run's model ({schema.choice(cfg, 'model')}) answers in "
                       f"{model_kind}: an eval set is scored by the run's model; use a dataset that answers in "
                       f"{model_kind}")
        unknown = [k for k in entry.get("task") or {} if k not in cfg.task or k in ("_target_", "answers")]
        if unknown:
            out.append(f"{key}.task sets {unknown}, which the run's task ({cfg.task._target_}) does not take; its keys "
                       f"are {[k for k in cfg.task if k not in ('_target_', 'answers')]}")
    return out


def load(cfg: DictConfig, backbone, run_data, seed: int) -> list[EvalSet]:
    """The config's eval sets, loaded with the run's model (its tokenizer or image size) and checked against the
    run's data: a classification set must name the run's classes, in the run's order."""
    out = []
    for name, entry in (cfg.get("eval_sets") or {}).items():
        data = load_dataset(schema.make(entry.dataset), backbone.data_args(), seed)
        task = schema.make(OmegaConf.merge(cfg.task, entry.get("task") or {}))
        task.bind(backbone, data)
        if task.answers == "classes" and list(data.label_names) != list(run_data.label_names):
            raise InputError(f"eval_sets.{name}: its classes {list(data.label_names)} are not the run's "
                             f"{list(run_data.label_names)}: the run's head scores the run's classes, in its order; "
                             "map the set's labels to them (dataset.label_names, or the same label column values)")
        out.append(EvalSet(str(name), scored(data, entry.get("split", "test"), entry.get("limit"), seed), task,
                           bool(entry.get("personal", False))))
    return out


def scored(data, split: str, limit: int | None, seed: int) -> list[tuple[Encoded, np.ndarray]]:
    """(encoded split, its row numbers) of the rows a set scores: the split's (train then test for `all`), at most
    `limit` of them drawn with `seed` (the same every evaluation and every run of that seed)."""
    names = ("train", "test") if split == "all" else (split,)
    sizes = [len(getattr(data, n)) for n in names]
    rows = np.arange(sum(sizes))
    if limit is not None and limit < len(rows):
        rows = np.sort(np.random.default_rng(seed).choice(rows, limit, replace=False))
    starts = np.cumsum([0, *sizes])
    return [(data.encoded(n), rows[(rows >= a) & (rows < b)] - a) for n, a, b in zip(names, starts, starts[1:])
            if ((rows >= a) & (rows < b)).any()]
