"""The objective of a run, as one object: what local training minimises and what evaluation scores, per batch."""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class Task(Protocol):
    """Loss and scores of one batch, for one client or for a stacked cohort of clients.

    A batch is a dict of tensors as the collator makes it (the inputs, and what the task needs to
    score them, e.g. `labels`). With `clients` = K > 1 its rows are K clients' equal blocks,
    client-major, and the model holds their K stacked states, so every quantity is per client: a
    client's numbers depend on its own rows only. A new task implements both methods and is named
    by a YAML under conf/task/.
    """

    answers = "classes"  # what it scores: "classes" (label logits) or "tokens" (a causal LM's answer tokens)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], clients: int = 1) -> torch.Tensor:
        """[clients]: each client's mean loss over its rows (what its local steps minimise)."""
        ...

    def scores(self, model: nn.Module, batch: dict[str, torch.Tensor], clients: int = 1,
               valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Each client's sums over its rows: name -> [clients], with `examples` (rows counted), `loss` (sum of
        per-example losses) and `correct`; the evaluation divides each by `examples`. `valid` ([clients,
        rows per client], bool) marks the rows that count (a cohort pads short clients); None: all count."""
        ...
