"""Classification: cross-entropy over the model's logits, accuracy by argmax; Matthews correlation and F1 from
summed confusion counts where asked."""
from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from celora.tasks import Task

ExtraMetric = Literal["mcc", "f1"]  # Matthews correlation (multi-class: Gorodkin's); F1 of class 1 (binary)
EXTRA = get_args(ExtraMetric)


def widened(logits: torch.Tensor) -> torch.Tensor:
    """Logits in at least fp32 for the loss (half-precision logits lose the loss's small differences)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


class Classify(Task):
    """logits = model(inputs); loss = cross-entropy with `labels`; a row is correct when its argmax is its label.

    `extra_metrics`: what is reported beside accuracy and loss, from the confusion counts summed over every
    batch and client (so batching and stacked cohorts do not change them): `mcc`, `f1` (of class 1, binary
    tasks), or `auto`, what the dataset's benchmark reports (GLUE: CoLA mcc, MRPC and QQP f1; others none)."""

    def __init__(self, extra_metrics: Literal["auto"] | list[ExtraMetric] = "auto"):
        self.extra_metrics = extra_metrics
        self.extra: tuple[str, ...] = () if extra_metrics == "auto" else tuple(extra_metrics)

    def bind(self, backbone, data) -> None:
        """With `extra_metrics: auto`, report what the loaded data declares (`TextData.metrics`)."""
        if self.extra_metrics == "auto":
            self.extra = tuple(getattr(data, "metrics", ()))

    @property
    def metrics(self) -> tuple[str, ...]:
        return ("acc", "loss", *self.extra)

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
        if valid is None and clients == 1 and not self.extra:
            return {"examples": torch.tensor([len(labels)], device=labels.device),
                    "loss": F.cross_entropy(widened(logits), labels, reduction="sum").reshape(1),
                    "correct": (logits.argmax(-1) == labels).sum().reshape(1)}
        ce = F.cross_entropy(widened(logits), labels, reduction="none").view(clients, -1).double()
        predicted = logits.argmax(-1)
        hit = (predicted == labels).view(clients, -1)
        valid = torch.ones_like(hit) if valid is None else valid.to(hit.device)
        out = {"examples": valid.sum(1), "loss": (ce * valid).sum(1), "correct": (hit & valid).sum(1)}
        if self.extra:  # each client's confusion counts: confusion/<true>/<predicted>
            classes = logits.shape[-1]
            cell = (labels * classes + predicted).view(clients, -1)
            for t in range(classes):
                for p in range(classes):
                    out[f"confusion/{t}/{p}"] = ((cell == t * classes + p) & valid).sum(1)
        return out

    def rates(self, sums: dict[str, float]) -> dict[str, float]:
        """Accuracy and mean loss; and `extra` from the summed confusion counts."""
        out = super().rates(sums)
        if self.extra:
            out.update(confusion_metrics(confusion(sums), self.extra))
        return out


def confusion(sums: dict[str, float]) -> list[list[float]]:
    """The confusion matrix [true][predicted] of summed `confusion/<t>/<p>` scores."""
    cells = {tuple(map(int, k.split("/")[1:])): v for k, v in sums.items() if k.startswith("confusion/")}
    classes = 1 + max((max(c) for c in cells), default=-1)
    return [[cells.get((t, p), 0.0) for p in range(classes)] for t in range(classes)]


def confusion_metrics(m: list[list[float]], names: tuple[str, ...]) -> dict[str, float]:
    """`mcc`: Matthews correlation (Gorodkin's K-class form, the binary one for 2 classes; 0 where a margin is
    constant, as scikit-learn); `f1`: F1 of class 1 (0 where it is never true nor predicted)."""
    out = {}
    k = len(m)
    if "mcc" in names:
        n = sum(map(sum, m))
        right = sum(m[i][i] for i in range(k))
        true = [sum(m[i]) for i in range(k)]
        pred = [sum(m[i][j] for i in range(k)) for j in range(k)]
        cov = right * n - sum(t * p for t, p in zip(true, pred))
        var = (n * n - sum(p * p for p in pred)) * (n * n - sum(t * t for t in true))
        out["mcc"] = cov / math.sqrt(var) if var > 0 else 0.0
    if "f1" in names:
        tp = m[1][1] if k > 1 else 0.0
        fp = sum(m[i][1] for i in range(k) if i != 1) if k > 1 else 0.0
        fn = sum(m[1][j] for j in range(k) if j != 1) if k > 1 else 0.0
        out["f1"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else 0.0
    return out
