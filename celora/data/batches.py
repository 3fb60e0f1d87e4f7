"""Batches for training and evaluation: seeded local sampling, dynamic padding, length-sorted eval."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler


class Encoded(torch.utils.data.Dataset):
    """Token ids and labels held as Python lists: row access without Arrow overhead per item."""

    def __init__(self, dataset, label_column: str = "label"):
        self.input_ids = list(dataset["input_ids"])
        self.labels = list(dataset[label_column])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.input_ids[i], self.labels[i]

    def lengths(self, indices: Sequence[int]) -> np.ndarray:
        return np.array([len(self.input_ids[i]) for i in indices])


class Collate:
    """Right-pads a list of (ids, label) to the batch's longest sequence."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows):
        longest = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for k, (row, _) in enumerate(rows):
            ids[k, : len(row)] = torch.tensor(row)
            mask[k, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([y for _, y in rows])}


def train_loader(data: Encoded, indices: Sequence[int], batch_size: int, steps: int,
                 seed: int, collate: Collate) -> DataLoader:
    """Exactly `steps` batches drawn without replacement, reshuffling each pass over the client's data."""
    subset = torch.utils.data.Subset(data, list(indices))
    gen = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(subset, replacement=False, num_samples=steps * batch_size, generator=gen)
    return DataLoader(subset, batch_size=batch_size, sampler=sampler, collate_fn=collate, drop_last=True)


def eval_batches(data: Encoded, indices: Sequence[int], batch_size: int, collate: Collate):
    """Batches sorted by length (less padding); order does not change accuracy or mean loss."""
    idx = np.asarray(indices)
    idx = idx[np.argsort(data.lengths(idx), kind="stable")]
    for start in range(0, len(idx), batch_size):
        yield collate([data[i] for i in idx[start:start + batch_size]])
