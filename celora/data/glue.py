"""GLUE as its papers run it: each task's columns, label names, evaluation split and metrics, read from the hub
(`nyu-mll/glue`) or from a local folder of its parquet files, through `celora.data.text.hf`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from celora.data.splits import Limit
from celora.data.text import PairTruncation, TextData, hf
from celora.errors import InputError, MissingFile

GlueTaskName = Literal["sst2", "cola", "mrpc", "qqp", "mnli", "qnli", "rte", "stsb"]
HUB = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: its text column(s), class names in label order, the split it is evaluated on (GLUE's test
    labels are hidden), and what is reported beside accuracy (F1 of class 1, Matthews correlation)."""

    text: str
    pair: str | None
    labels: tuple[str, ...]
    eval_split: str = "validation"
    metrics: tuple[str, ...] = ()


TASKS = {
    "sst2": GlueTask("sentence", None, ("negative", "positive")),
    "cola": GlueTask("sentence", None, ("unacceptable", "acceptable"), metrics=("mcc",)),
    "mrpc": GlueTask("sentence1", "sentence2", ("not_equivalent", "equivalent"), metrics=("f1",)),
    "qqp": GlueTask("question1", "question2", ("not_duplicate", "duplicate"), metrics=("f1",)),
    "mnli": GlueTask("premise", "hypothesis", ("entailment", "neutral", "contradiction"),
                     eval_split="validation_matched"),
    "qnli": GlueTask("question", "sentence", ("entailment", "not_entailment")),
    "rte": GlueTask("sentence1", "sentence2", ("entailment", "not_entailment")),
}


def glue(*, tokenizer, max_length: int, seed: int, task: GlueTaskName, path: str = HUB,
         eval_split: str | None = None, pair_truncation: PairTruncation = "longest_first", limit: Limit = None,
         cache_dir: str | None = None, drop_missing: bool = False) -> TextData:
    """GLUE task `task` from `path`: the hub id (with a network) or a local folder laid out as the hub's
    repository, `<path>/<task>/<split>-*.parquet`. Trains on `train`, evaluates on the task's labelled evaluation
    split (`eval_split` overrides it, e.g. MNLI's validation_mismatched)."""
    if task == "stsb":
        raise InputError("dataset.task=stsb is a regression task (a similarity score from 0 to 5, reported as "
                         "Pearson and Spearman correlation); celora's classification task has no regression head "
                         "yet. Use one of the classification tasks: " + ", ".join(TASKS) + ".")
    spec = TASKS[task]
    split_test = eval_split or spec.eval_split
    folder = Path(path).expanduser()
    if folder.is_dir():
        files = {split: _parquet(folder, task, split) for split in ("train", split_test)}
        source: dict = {"path": "parquet", "name": None, "data_files": files}
    else:
        source = {"path": path, "name": task, "data_files": None}
    data = hf(tokenizer=tokenizer, max_length=max_length, seed=seed, **source, split_train="train",
              split_test=split_test, text_column=spec.text, text_pair_column=spec.pair,
              pair_truncation=pair_truncation, label_column="label", label_names=list(spec.labels),
              limit=limit, cache_dir=cache_dir, drop_missing=drop_missing)
    return dataclasses.replace(data, metrics=spec.metrics)


def _parquet(folder: Path, task: str, split: str) -> list[str]:
    found = sorted(str(p) for p in (folder / task).glob(f"{split}-*.parquet"))
    if not found:
        raise MissingFile(f"dataset.path={str(folder)!r} has no {task}/{split}-*.parquet: a local GLUE folder is laid "
                          f"out as the hub's {HUB} repository (e.g. {task}/{split}-00000-of-00001.parquet; "
                          f"`huggingface-cli download {HUB} --repo-type dataset --local-dir <folder>` on a machine "
                          "with a network), or set dataset.path to the hub id where there is a network.")
    return found
