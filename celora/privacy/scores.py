"""How much of a batch a reconstruction recovered: token F1 and position accuracy for text, PSNR and SSIM for images."""
from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)


def token_f1(recovered: Sequence[Sequence[int]], original: Sequence[Sequence[int]],
             special: Collection[int] = ()) -> dict[str, float]:
    """Precision, recall and F1 of the multiset of non-special tokens of the whole batch.

    The order of sequences in a batch is not observable, so the batch is scored as one bag.
    """
    skip = set(special)
    rec = Counter(t for seq in recovered for t in seq if t not in skip)
    orig = Counter(t for seq in original for t in seq if t not in skip)
    hit = sum((rec & orig).values())
    precision = hit / max(sum(rec.values()), 1)
    recall = hit / max(sum(orig.values()), 1)
    f1 = 2 * precision * recall / (precision + recall) if hit else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def position_accuracy(recovered: Sequence[Sequence[int]], original: Sequence[Sequence[int]],
                      special: Collection[int] = ()) -> float:
    """Fraction of non-special original positions holding the right token, under the best pairing of sequences."""
    skip = set(special)
    hits = np.zeros((len(recovered), len(original)))
    for i, rec in enumerate(recovered):
        for j, orig in enumerate(original):
            hits[i, j] = sum(a == b for a, b in zip(rec, orig) if b not in skip)
    rows, cols = linear_sum_assignment(-hits)
    total = sum(t not in skip for seq in original for t in seq)
    return float(hits[rows, cols].sum() / max(total, 1))


def psnr(images: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio (dB) of a batch of images in [0, data_range], averaged over the batch."""
    return float(peak_signal_noise_ratio(images, reference, data_range=data_range, reduction="elementwise_mean",
                                         dim=tuple(range(1, images.dim()))))


def ssim(images: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> float:
    """Structural similarity of (N, C, H, W) images in [0, data_range], averaged over the batch."""
    return float(structural_similarity_index_measure(images, reference, data_range=data_range))
