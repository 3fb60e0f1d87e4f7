"""Seeded, stratified subsets and held-out splits of a labelled dataset, as row numbers (text and images alike)."""
from __future__ import annotations

from typing import Annotated

import numpy as np
from sklearn.model_selection import train_test_split

from celora.errors import ConfigError, InputError
from celora.schema import Range

# What every loader's keys take (conf/dataset/*.yaml; celora.schema checks them before anything loads):
TestFraction = Annotated[float, Range(gt=0, lt=1), "the share held out for the global test"]
Limit = Annotated[int, Range(ge=1), "null takes all of it"] | None  # a stratified subset of this many examples


def take(labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """Row numbers of a seeded subset of `limit` examples with the label proportions of the whole."""
    rows = np.arange(len(labels))
    if limit is None or limit == len(labels):
        return rows
    if not 0 < limit <= len(labels):
        raise InputError(f"limit={limit} but the data has {len(labels)} examples; "
                         f"use a limit in [1, {len(labels)}] or limit=null for all of it.")
    kept, _ = stratified(labels, rows, limit, seed)
    return kept


def stratified(labels: np.ndarray, rows: np.ndarray, size: int | float, seed: int):
    """(picked rows: `size` of them, or that fraction rounded up; the rest), stratified by label where every
    class can appear on both sides, each in row order."""
    y = labels[rows]
    _, counts = np.unique(y, return_counts=True)
    n = size if isinstance(size, int) else int(np.ceil(size * len(rows)))
    ok = counts.min() >= 2 and min(n, len(rows) - n) >= len(counts)
    rest, picked = train_test_split(rows, test_size=size, random_state=seed, stratify=y if ok else None)
    return np.sort(picked), np.sort(rest)


def split(labels: np.ndarray, rows: np.ndarray, test_fraction: float, seed: int):
    """(train rows, held-out test rows): a stratified `test_fraction` of `rows`, rounded up, held out."""
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction={test_fraction} must be in (0, 1).")
    test, train = stratified(labels, rows, test_fraction, seed)
    return train, test


def limits(y_train: np.ndarray, y_test: np.ndarray, limit: int | None, seed: int):
    """Rows of a given train/test pair; `limit` counts both, each keeping its share of the whole."""
    if limit is None:
        return np.arange(len(y_train)), np.arange(len(y_test))
    total = len(y_train) + len(y_test)
    if not 2 <= limit <= total:
        raise InputError(f"limit={limit} but the data has {total} examples; "
                         f"use a limit in [2, {total}] or limit=null for all of it.")
    n_test = max(1, round(limit * len(y_test) / total))
    return take(y_train, limit - n_test, seed), take(y_test, n_test, seed)
