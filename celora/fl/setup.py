"""What a Simulation is made of: the method it runs, the rows it reads, and where its metrics go."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from celora.data.batches import Collate, Encoded
from celora.data.partition import ClientSplit
from celora.fl.aggregators import Aggregator
from celora.fl.server_opt import ServerOptimizer
from celora.fl.wire import Exchange
from celora.privacy.dp import NoPrivacy, Privacy
from celora.tasks import Task
from celora.tasks.classify import Classify


@dataclass
class Method:
    """What is trained and how it travels: the adapted model (the one shared backbone), the wire's declaration,
    the server's aggregator and optimizer, the privacy of uploads and the task's loss and scores."""

    model: nn.Module
    exchange: Exchange
    aggregator: Aggregator
    task: Task = field(default_factory=Classify)
    privacy: Privacy = field(default_factory=NoPrivacy)
    lora_sb_init: bool = False  # Fed-SB: round 0 derives the frozen factors from the clients' gradients
    server: ServerOptimizer = field(default_factory=ServerOptimizer)  # what the server does with the aggregate


@dataclass
class EvalSet:
    """A loaded evaluation set: its scored rows (per split of its data: the encoded split and its row numbers), the
    task that scores them, and whether clients' own models score them too."""

    name: str
    parts: list[tuple[Encoded, Sequence[int]]]
    task: Task
    personal: bool = False

    def __len__(self) -> int:
        return sum(len(rows) for _, rows in self.parts)


@dataclass
class RunData:
    """The rows a run reads: the encoded train and test data, each client's split of the train rows, the global
    evaluation's rows of `test` (None: all of them), how rows become batches, and the eval sets."""

    train: Encoded
    test: Encoded
    splits: Sequence[ClientSplit]
    collate: Collate
    num_classes: int = 2
    test_rows: Sequence[int] | None = None
    eval_sets: Sequence[EvalSet] = ()  # other data scored at every evaluation (celora.evalsets)
    # the global evaluation's rows of `test` per latent group that sees the data its own way (global/acc_group<g>;
    # concept_shift, rotation_groups); None: no such groups, `test_rows` scored as one
    test_groups: Sequence[Sequence[int]] | None = None


class Recorder(Protocol):
    """Where a run's rows go (celora.metrics.Metrics: metrics.jsonl and the logger)."""

    def log(self, row: dict) -> None:
        """One evaluated round's row of the metrics schema."""

    def log_matrix(self, name: str, rnd: int, ids: list[int], matrix: torch.Tensor) -> None:
        """A client x client matrix of a round (the personalised weights, the data-space distances)."""


class Discard(Recorder):
    """Records nothing (tests and benchmarks that read the returned rows)."""

    def log(self, row: dict) -> None:
        pass

    def log_matrix(self, name: str, rnd: int, ids: list[int], matrix: torch.Tensor) -> None:
        pass
