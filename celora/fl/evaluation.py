"""The task's scores of a model (or of a stacked cohort of models) on held-out indices, and the personal summary."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from celora.data.batches import Collate, Encoded, eval_batches, eval_order
from celora.fl.engine import Engine, autocast
from celora.tasks import Task, subjects
from celora.tasks.classify import Classify


Sums = dict[str, float]  # a task's summed scores: examples, loss, correct, and what else the task counts
Advance = Callable[[int], None]  # told how many rows a batch scored (a progress bar's update)


@torch.no_grad()
def evaluate(model: nn.Module, data: Encoded, indices: Sequence[int], batch_size: int, collate: Collate,
             task: Task | None = None, engine: Engine | None = None, advance: Advance | None = None) -> Sums:
    """The task's scores (default: classification) summed over `indices` on the engine's device and precision
    (default: where the model is, in its own dtype); `task.rates` makes metrics of them. The sums stay on
    the device until the last batch; sums per subject are named by the rows' subjects (`named`)."""
    task = task or Classify()
    model.eval()
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    with autocast(engine):
        for batch in eval_batches(data, indices, batch_size, collate):
            for name, value in task.scores(model, {k: v.to(device) for k, v in batch.items()}).items():
                sums[name] = sums.get(name, 0) + value[0].to(device, torch.float64)
            if advance is not None:
                advance(len(next(iter(batch.values()))))
    return named({name: value.item() for name, value in sums.items()}, data) or {"examples": 0}


@torch.no_grad()
def evaluate_cohort(model: nn.Module, data: Encoded, indices: Sequence[Sequence[int]], batch_size: int,
                    collate: Collate, task: Task | None = None, engine: Engine | None = None,
                    advance: Advance | None = None) -> list[Sums]:
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
    order = [eval_order(data, idx) for idx in indices]
    filler = next(int(o[0]) for o in order if len(o))
    sums: dict[str, torch.Tensor] = {}
    for start in range(0, max(len(o) for o in order), block):
        rows = [o[start:start + block].tolist() for o in order]
        valid = torch.tensor([[j < len(r) for j in range(block)] for r in rows])
        batch = collate([data[i] for r in rows for i in r + [filler] * (block - len(r))])
        with autocast(engine):
            scores = task.scores(model, {name: v.to(device) for name, v in batch.items()}, clients=k,
                                 valid=valid.to(device))
        for name, value in scores.items():
            sums[name] = sums.get(name, 0) + value.to(device, torch.float64)
        if advance is not None:
            advance(int(valid.sum()))
    host = {name: value.tolist() for name, value in sums.items()}  # one read-back for the cohort
    return [named({name: value[c] for name, value in host.items()}, data) for c in range(k)]


def named(sums: Sums, data: Encoded) -> Sums:
    """Sums per subject id named by the rows' subjects, with their categories' (rows with a `subject`, e.g. a
    multiple-choice benchmark's: celora.tasks.subjects); other rows' sums as they are."""
    names = getattr(data, "subject_names", None)
    return sums if names is None else subjects.named(sums, names, data.categories)


def add(parts: Iterable[Sums]) -> Sums:
    """Summed scores of several evaluations (of other rows, or other models) as one."""
    out: Sums = {}
    for sums in parts:
        for name, value in sums.items():
            out[name] = out.get(name, 0.0) + value
    return out


def personal_summary(accs: Sequence[float], sizes: Sequence[int]) -> dict[str, float]:
    """Example-weighted and unweighted mean over clients, and the mean of the worst 10% (at least one)."""
    a = np.asarray(accs, dtype=float)
    w = np.asarray(sizes, dtype=float)
    if w.sum() == 0:  # no client holds a local test row (partition.local_test_fraction=0): nothing to report
        return {"personal/acc": math.nan, "personal/acc_unweighted": math.nan, "personal/acc_worst10": math.nan}
    worst = np.sort(a)[: max(1, math.ceil(0.1 * len(a)))]
    return {
        "personal/acc": float((a * w).sum() / w.sum()),
        "personal/acc_unweighted": float(a.mean()),
        "personal/acc_worst10": float(worst.mean()),
    }
