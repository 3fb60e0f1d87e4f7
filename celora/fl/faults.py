"""Screening of client results before aggregation: non-finite tensors and outlying update norms (pure)."""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from celora.tensors import State, global_norm


def nonfinite(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding a NaN or an infinity."""
    return [n for n, t in state.items() if not bool(torch.isfinite(t).all())]


def outliers(norms: Mapping[int, float], max_ratio: float | None) -> dict[int, str]:
    """Clients whose update norm exceeds max_ratio x the median of the round's norms, with the reason.

    The median, not the mean, so one huge update cannot hide itself by raising the reference. It
    needs a few clients to mean anything: with two, neither norm can exceed twice their median.
    """
    if max_ratio is None or not norms:
        return {}
    median = float(np.median(list(norms.values())))
    if median <= 0:
        return {}
    return {i: f"update norm {v:.3g} > {max_ratio:g} x the round's median {median:.3g}"
            for i, v in sorted(norms.items()) if v > max_ratio * median}


def screen(uploads: Mapping[int, State], privates: Mapping[int, State], received: Mapping[int, State],
           max_norm_ratio: float | None, losses: Mapping[int, float] | None = None) -> dict[int, str]:
    """Client id -> why its result is rejected this round, for every client that fails a check.

    A result is rejected when its training loss or anything it trained (the upload as sent, its
    private tensors) is not finite, or, with `max_norm_ratio` set, when its upload's update norm
    is an outlier among the finite ones.
    """
    rejected = {}
    for i in sorted(uploads):
        bad = nonfinite(uploads[i]) + nonfinite(privates.get(i, {}))
        if bad:
            rejected[i] = f"non-finite values in {bad[:3]}{' ...' if len(bad) > 3 else ''}"
        elif losses is not None and not math.isfinite(losses[i]):
            rejected[i] = f"non-finite training loss {losses[i]}"
    norms = {i: global_norm(uploads[i], minus=received[i]) for i in uploads if i not in rejected and uploads[i]}
    rejected.update(outliers(norms, max_norm_ratio))
    return dict(sorted(rejected.items()))
