"""The task's scores of a model (or of a stacked cohort of models) on held-out indices, and the personal summary."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from celora.data.batches import Collate, Encoded, eval_batches
from celora.tasks import Task
from celora.tasks.classify import Classify


@torch.no_grad()
def evaluate(model: nn.Module, data: Encoded, indices: Sequence[int], batch_size: int, collate: Collate,
             task: Task | None = None) -> tuple[float, float, int]:
    """(accuracy, mean loss, number of examples) under `task` (default: classification)."""
    task = task or Classify()
    model.eval()
    device = next(model.parameters()).device
    correct, loss, n = 0, 0.0, 0
    for batch in eval_batches(data, indices, batch_size, collate):
        scores = task.scores(model, {k: v.to(device) for k, v in batch.items()})
        loss += scores["loss"][0].item()
        correct += scores["correct"][0].item()
        n += int(scores["examples"][0])
    return correct / max(n, 1), loss / max(n, 1), n


@torch.no_grad()
def evaluate_cohort(model: nn.Module, data: Encoded, indices: Sequence[Sequence[int]], batch_size: int,
                    collate: Collate, task: Task | None = None) -> list[tuple[float, float, int]]:
    """evaluate() for K clients at once: the model holds their K stacked states, client k sees indices[k].

    Each pass takes the next block of ceil(batch_size / K) examples of every client's length-sorted
    split (about batch_size rows in all); clients with fewer left fill their block with a repeat
    of a real row that is not counted.
    """
    task = task or Classify()
    model.eval()
    device = next(model.parameters()).device
    k = len(indices)
    block = max(1, math.ceil(batch_size / k))
    order = [np.asarray(idx)[np.argsort(data.lengths(idx), kind="stable")] if len(idx) else np.array([], dtype=int)
             for idx in indices]
    filler = next(int(o[0]) for o in order if len(o))
    correct, loss = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    for start in range(0, max(len(o) for o in order), block):
        rows = [o[start:start + block].tolist() for o in order]
        valid = torch.tensor([[j < len(r) for j in range(block)] for r in rows])
        batch = collate([data[i] for r in rows for i in r + [filler] * (block - len(r))])
        scores = task.scores(model, {name: v.to(device) for name, v in batch.items()}, clients=k, valid=valid)
        loss += scores["loss"]
        correct += scores["correct"]
    sizes = [len(o) for o in order]
    return [(correct[c].item() / max(n, 1), loss[c].item() / max(n, 1), n) for c, n in enumerate(sizes)]


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
