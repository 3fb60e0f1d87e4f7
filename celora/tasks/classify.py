"""Classification: cross-entropy over the model's logits, accuracy by argmax."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from celora.tasks import Task


def widened(logits: torch.Tensor) -> torch.Tensor:
    """Logits in at least fp32 for the loss (half-precision logits lose the loss's small differences)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


class Classify(Task):
    """logits = model(inputs); loss = cross-entropy with `labels`; a row is correct when its argmax is its label."""

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], clients: int = 1) -> torch.Tensor:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"})
        if clients == 1:
            return F.cross_entropy(logits, batch["labels"]).reshape(1)
        return F.cross_entropy(logits, batch["labels"], reduction="none").view(clients, -1).mean(1)

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor], clients: int = 1) -> torch.Tensor:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"})
        return F.cross_entropy(widened(logits), batch["labels"], reduction="none").view(clients, -1).sum(1)

    def loss_count(self, batch: dict[str, torch.Tensor], clients: int = 1) -> torch.Tensor:
        """Rows: the loss is a mean over examples."""
        return torch.full((clients,), len(batch["labels"]) // clients)

    def features(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the head sees (the model's pooled features)."""
        return model.features(**{k: v for k, v in batch.items() if k != "labels"})

    @torch.no_grad()
    def scores(self, model: nn.Module, batch: dict[str, torch.Tensor], clients: int = 1,
               valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        labels = batch["labels"]
        logits = model(**{k: v for k, v in batch.items() if k != "labels"})
        if valid is None and clients == 1:
            return {"examples": torch.tensor([len(labels)], device=labels.device),
                    "loss": F.cross_entropy(widened(logits), labels, reduction="sum").reshape(1),
                    "correct": (logits.argmax(-1) == labels).sum().reshape(1)}
        ce = F.cross_entropy(widened(logits), labels, reduction="none").view(clients, -1).double()
        hit = (logits.argmax(-1) == labels).view(clients, -1)
        valid = torch.ones_like(hit) if valid is None else valid.to(hit.device)
        return {"examples": valid.sum(1), "loss": (ce * valid).sum(1), "correct": (hit & valid).sum(1)}
