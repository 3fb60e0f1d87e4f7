"""The objective of a run, as one object: what local training minimises, what evaluation scores, and what the
data statistics summarise, per batch."""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class Task(Protocol):
    """Loss, scores and features of one batch, for one client or for a stacked cohort of clients.

    A batch is a dict of tensors as the collator makes it (the inputs, and what the task needs to
    score them, e.g. `labels`). With `clients` = K > 1 its rows are K clients' equal blocks,
    client-major, and the model holds their K stacked states, so every quantity is per client: a
    client's numbers depend on its own rows only. A new task implements `loss` (and `loss_sum` and
    `loss_count`, which `client.grad_accum` > 1 needs), `scores` and `features` (and `metrics` /
    `rates` if it reports more than accuracy and loss) and is named by a YAML under conf/task/.
    """

    answers = "classes"  # what it scores: "classes" (label logits) or "tokens" (a causal LM's answer tokens)
    metrics = ("acc", "loss")  # what `rates` reports, logged as global/<name> and personal/<name>

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], clients: int = 1) -> torch.Tensor:
        """[clients]: each client's mean loss over its rows (what its local steps minimise)."""
        ...

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor], clients: int = 1) -> torch.Tensor:
        """[clients]: each client's summed loss, of which `loss` is the mean over `loss_count` (an accumulated
        step divides the sums of its batches by their counts summed: the mean over all its rows)."""
        ...

    def loss_count(self, batch: dict[str, torch.Tensor], clients: int = 1) -> torch.Tensor:
        """[clients]: what each client's loss is a mean over (rows; answer tokens), read from the batch alone,
        so a step knows its count before any forward pass."""
        ...

    def scores(self, model: nn.Module, batch: dict[str, torch.Tensor], clients: int = 1,
               valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Each client's sums over its rows: name -> [clients], with `examples` (rows counted), `loss` (sum of
        per-example losses) and `correct`; `rates` turns sums into metrics. `valid` ([clients, rows per
        client], bool) marks the rows that count (a cohort pads short clients); None: all count."""
        ...

    def features(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[rows, d]: what the data statistics summarise of each row, from the model as it stands."""
        ...

    def bind(self, backbone, data) -> None:
        """Told the run's loaded model (a `Backbone`) and data before anything is trained or scored; a task takes
        what it needs of them (Instruct the tokenizer, Classify the metrics the data's benchmark reports)."""

    def rates(self, sums: dict[str, float]) -> dict[str, float]:
        """The metrics of summed scores (one client's, or pooled): accuracy and mean loss per example (0 where
        nothing was counted: such a client weighs 0 in the personal means)."""
        n = max(sums.get("examples", 0), 1)
        return {"acc": sums.get("correct", 0) / n, "loss": sums.get("loss", 0.0) / n}
