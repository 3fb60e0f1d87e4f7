"""Batches for training and evaluation: encoded rows (token ids or pixels), collators, seeded local sampling, eval order."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

IGNORE = -100  # the target of a position no loss covers (a prompt, padding)


class Encoded(torch.utils.data.Dataset):
    """Token ids and labels held as Python lists: row access without Arrow overhead per item. A row is
    (ids, label), or (ids, label, segment ids) where the data has `token_type_ids` (BERT's sentence pairs)."""

    def __init__(self, dataset, label_column: str = "label"):
        self.input_ids = list(dataset["input_ids"])
        self.labels = list(dataset[label_column])
        types = "token_type_ids" in getattr(dataset, "column_names", dataset)  # a datasets.Dataset, or a dict of columns
        self.token_type_ids = list(dataset["token_type_ids"]) if types else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        if self.token_type_ids is not None:
            return self.input_ids[i], self.labels[i], self.token_type_ids[i]
        return self.input_ids[i], self.labels[i]

    @property
    def classes(self) -> list[int]:
        """Each row's class id (what partitions and the data statistics group by)."""
        return self.labels

    def lengths(self, indices: Sequence[int]) -> np.ndarray:
        return np.array([len(self.input_ids[i]) for i in indices])


class AnswerRows(Encoded):
    """Instruction rows of a causal LM: token ids, their targets (the answer's ids, IGNORE on the prompt), the
    class id (`labels`) and, with a closed answer set, the token ids of the row's options: its own where the
    data has `option_ids` (a multiple-choice row's letters), else its task's. Where the data has a `subject`
    column (a ClassLabel) a row also gives its subject id; `subject_names` and `categories` (category -> its
    subjects' names) name the per-subject scores (celora.tasks.subjects)."""

    def __init__(self, dataset, options: list[list[list[int]]] | None = None,
                 categories: dict[str, list[str]] | None = None):
        super().__init__(dataset)
        self.targets = list(dataset["targets"])
        self.tasks = list(dataset["task"])
        self.options = options
        columns = getattr(dataset, "column_names", dataset)  # a datasets.Dataset, or a dict of columns
        self.own_options = list(dataset["option_ids"]) if "option_ids" in columns else None
        self.subjects = list(dataset["subject"]) if "subject" in columns else None
        self.subject_names = dataset.features["subject"].names if self.subjects is not None else None
        self.categories = categories or {}

    def __getitem__(self, i: int):
        if self.own_options is not None:
            options = self.own_options[i]
        else:
            options = None if self.options is None else self.options[self.tasks[i]]
        row = (self.input_ids[i], self.targets[i], options)
        return row if self.subjects is None else (*row, self.subjects[i])


def right_pad(seqs: Sequence[Sequence[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [n, longest] right-padded with `value`, attention mask [n, longest]) of token id lists."""
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for k, row in enumerate(seqs):
        ids[k, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[k, : len(row)] = 1
    return ids, mask


class Collate:
    """Right-pads a list of (ids, label) or (ids, label, segment ids) to the batch's longest sequence; segment ids
    become `token_type_ids` where `segments` (a backbone with segment embeddings), else they are dropped."""

    def __init__(self, pad_id: int, segments: bool = True):
        self.pad_id = pad_id
        self.segments = segments

    def __call__(self, rows):
        ids, mask = right_pad([r[0] for r in rows], self.pad_id)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([r[1] for r in rows])}
        if self.segments and len(rows[0]) == 3:  # a sentence pair's segments (padding is segment 0, as the tokenizer pads)
            batch["token_type_ids"] = right_pad([r[2] for r in rows], 0)[0]
        return batch


class Pixels(torch.utils.data.Dataset):
    """uint8 images (N, C, H, W) and labels as tensors; a row is a view of the stored image, never a copy."""

    def __init__(self, pixels: torch.Tensor, labels: Sequence[int]):
        if len(pixels) != len(labels):
            raise ValueError(f"{len(pixels)} images but {len(labels)} labels")
        self.pixels = pixels
        self.labels = list(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.pixels[i], self.labels[i]

    @property
    def classes(self) -> list[int]:
        return self.labels

    def lengths(self, indices: Sequence[int]) -> np.ndarray:
        """Every image has the same size: evaluation keeps the given order."""
        return np.zeros(len(indices), dtype=np.int64)


class ImageCollate:
    """Stacks uint8 images into normalised `pixel_values` of the model's dtype, repeating a grey channel to
    `channels`.

    `pad_id` exists for the cohort concatenation's sake (it fills `input_ids`); images have none.
    """

    pad_id = 0

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels: int = 3,
                 dtype: torch.dtype = torch.float32):
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean {list(mean)} and std {list(std)} need one value per channel ({channels})")
        self.channels, self.dtype = channels, dtype
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, rows):
        x = torch.stack([p for p, _ in rows]).float().div_(255)
        if x.shape[1] != self.channels:
            if x.shape[1] != 1:
                raise ValueError(f"images have {x.shape[1]} channels, the model takes {self.channels}")
            x = x.expand(-1, self.channels, -1, -1)
        pixels = ((x - self.mean) / self.std).to(self.dtype)  # normalised in fp32, then the model's dtype
        return {"pixel_values": pixels, "labels": torch.tensor([y for _, y in rows])}


def train_loader(data: Encoded, indices: Sequence[int], batch_size: int, steps: int,
                 seed: int, collate: Collate) -> DataLoader:
    """Exactly `steps` batches drawn without replacement, reshuffling each pass over the client's data."""
    subset = torch.utils.data.Subset(data, list(indices))
    gen = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(subset, replacement=False, num_samples=steps * batch_size, generator=gen)
    return DataLoader(subset, batch_size=batch_size, sampler=sampler, collate_fn=collate, drop_last=True)


def eval_order(data: Encoded, indices: Sequence[int]) -> np.ndarray:
    """The indices sorted by length (stable): the order of eval_batches."""
    idx = np.asarray(indices, dtype=np.int64)
    return idx[np.argsort(data.lengths(idx), kind="stable")]


def eval_batches(data: Encoded, indices: Sequence[int], batch_size: int, collate: Collate):
    """Batches sorted by length (less padding); order does not change accuracy or mean loss."""
    idx = eval_order(data, indices)
    for start in range(0, len(idx), batch_size):
        yield collate([data[i] for i in idx[start:start + batch_size]])


class AnswerCollate:
    """Right-pads instruction rows (ids, targets[, options[, subject]]) of a causal LM. `labels` holds a token id
    at every answer position and IGNORE elsewhere (the prompt; padding too), so the loss covers the answers only.
    Rows with options (a closed answer set, token ids each) also give `options`: [rows, options, longest],
    IGNORE-padded (a row with fewer options has all-IGNORE ones, which are never picked); rows with a subject id
    give `subject`: [rows]."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows):
        for row in rows:
            if len(row[1]) != len(row[0]):
                raise ValueError(f"a row has {len(row[0])} token ids but {len(row[1])} labels")
        ids, mask = right_pad([r[0] for r in rows], self.pad_id)
        labels, _ = right_pad([r[1] for r in rows], IGNORE)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        options = [r[2] if len(r) > 2 else None for r in rows]
        if any(o is not None for o in options):
            if any(o is None for o in options):
                raise ValueError("some rows of the batch have answer options and some have none")
            width = max(len(t) for o in options for t in o)
            batch["options"] = torch.full((len(rows), max(map(len, options)), width), IGNORE, dtype=torch.long)
            for k, o in enumerate(options):
                for j, t in enumerate(o):
                    batch["options"][k, j, :len(t)] = torch.tensor(t, dtype=torch.long)
        if len(rows[0]) > 3:
            batch["subject"] = torch.tensor([r[3] for r in rows], dtype=torch.long)
        return batch
