"""Accuracy per subject and per category of subjects (a multiple-choice benchmark's breakdown): each client's
counts per subject id of a batch, named by the data's subjects with each category's counts added, and their
rates.

The names, in a task's summed scores and then in the metrics (logged as global/... and personal/...):

    correct@<id>, examples@<id>               Instruct.scores, from the batch's `subject` ids
    correct@<subject>, examples@<subject>     named(): what evaluation sums and the simulation pools
    correct@category/<c>, examples@category/<c>
    acc/<subject>, acc/category/<c>           rates(): where a subject or category has examples
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

CATEGORY = "category/"  # the prefix of a category's counts and accuracy


def counts(correct: torch.Tensor, subject: torch.Tensor, valid: torch.Tensor, clients: int) -> dict[str, torch.Tensor]:
    """Each client's `correct@<id>` and `examples@<id>` ([clients]) for every subject id among the counted rows.
    `correct`, `subject`: [rows], client-major; `valid`: [clients, rows per client], the rows that count."""
    valid = valid.reshape(-1).to(subject.device)
    correct = correct.to(subject.device)
    out = {}
    for s in subject[valid].unique().tolist():
        rows = (subject == s) & valid
        out[f"examples@{s}"] = rows.view(clients, -1).sum(1)
        out[f"correct@{s}"] = (rows & correct).view(clients, -1).sum(1)
    return out


def named(sums: Mapping[str, float], names: Sequence[str], categories: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """`sums` with each `<what>@<id>` as `<what>@<subject>` (`names[id]`) and, for each category, the sums of its
    subjects present as `<what>@category/<category>`; the other sums as they are."""
    out = {}
    for key, value in sums.items():
        what, at, subject = key.partition("@")
        out[f"{what}@{names[int(subject)]}" if at else key] = value
    for category, members in categories.items():
        for what in ("correct", "examples"):
            found = [out[f"{what}@{m}"] for m in members if f"{what}@{m}" in out]
            if found:
                out[f"{what}@{CATEGORY}{category}"] = sum(found)
    return out


def rates(sums: Mapping[str, float]) -> dict[str, float]:
    """`acc/<name>` = correct@<name> / examples@<name> for every subject and category with examples."""
    return {f"acc/{key[len('examples@'):]}": sums.get(f"correct@{key[len('examples@'):]}", 0) / n
            for key, n in sums.items() if key.startswith("examples@") and n > 0}
