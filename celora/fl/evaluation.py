"""Accuracy and loss of a model on held-out indices, and the personal summary over clients."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from celora.data.batches import Collate, Encoded, eval_batches


@torch.no_grad()
def evaluate(model: nn.Module, data: Encoded, indices: Sequence[int], batch_size: int,
             collate: Collate) -> tuple[float, float, int]:
    """(accuracy, mean cross-entropy, number of examples)."""
    model.eval()
    device = next(model.parameters()).device
    correct, loss, n = 0, 0.0, 0
    for batch in eval_batches(data, indices, batch_size, collate):
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        logits = model(**batch)
        loss += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += (logits.argmax(-1) == labels).sum().item()
        n += len(labels)
    return correct / max(n, 1), loss / max(n, 1), n


def personal_summary(accs: Sequence[float], sizes: Sequence[int]) -> dict[str, float]:
    """Example-weighted and unweighted mean over clients, and the mean of the worst 10% (at least one)."""
    a = np.asarray(accs, dtype=float)
    w = np.asarray(sizes, dtype=float)
    worst = np.sort(a)[: max(1, math.ceil(0.1 * len(a)))]
    return {
        "personal/acc": float((a * w).sum() / w.sum()),
        "personal/acc_unweighted": float(a.mean()),
        "personal/acc_worst10": float(worst.mean()),
    }
