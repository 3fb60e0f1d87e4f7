"""The columns a run reads from a user's data: missing or empty values refused (or dropped), one class refused, labels to ids."""
from __future__ import annotations

import logging
from collections.abc import Mapping

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from celora.errors import InputError

log = logging.getLogger(__name__)
SHOWN = 5  # row numbers shown per column in an error


def missing_rows(ds: datasets.Dataset, column: str) -> np.ndarray:
    """Row numbers (0-based, in the split) whose value in `column` is missing: null, NaN, an empty or
    whitespace-only string, or an image with neither bytes nor a path. Read as Arrow: nothing is decoded."""
    values = ds.select_columns([column]).with_format("arrow")[:][column]
    bad = pc.is_null(values, nan_is_null=True)
    kind = values.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        bad = pc.or_(bad, pc.fill_null(pc.equal(pc.utf8_trim_whitespace(values), ""), False))
    elif pa.types.is_struct(kind) and {"bytes", "path"} <= {kind.field(i).name for i in range(kind.num_fields)}:
        empty = pc.and_(pc.is_null(pc.struct_field(values, "bytes")), pc.is_null(pc.struct_field(values, "path")))
        bad = pc.or_(bad, pc.fill_null(empty, False))
    return np.flatnonzero(np.asarray(bad.to_numpy(zero_copy_only=False), dtype=bool))


def drop_or_refuse(splits: Mapping[str, datasets.Dataset], columns: Mapping[str, str], drop: bool,
                   source: str) -> dict[str, datasets.Dataset]:
    """The splits without rows that miss a value in any of `columns` (name -> the config key that names
    it), when `drop`; otherwise one ValueError naming each affected column, how many rows, the first row
    numbers, and the fixes."""
    found = {split: {c: missing_rows(ds, c) for c in columns} for split, ds in splits.items()}
    problems = [(split, c, rows) for split, by_column in found.items() for c, rows in by_column.items() if len(rows)]
    if not problems:
        return dict(splits)
    if not drop:
        lines = [f"  - column {c!r} ({columns[c]}): {len(rows):,} of {len(splits[split]):,} rows of split "
                 f"{split!r} are missing or empty (rows {', '.join(map(str, rows[:SHOWN]))}"
                 f"{', ...' if len(rows) > SHOWN else ''})" for split, c, rows in problems]
        raise InputError(
            f"{source} has missing or empty values in the columns this run reads:\n" + "\n".join(lines) +
            "\nRow numbers count from 0 within the split (in a CSV with a header, row k is on line k + 2). Fill "
            "the values in the data, drop those rows, or set dataset.drop_missing=true to drop them when loading.")
    out = {}
    for split, ds in splits.items():
        bad = np.unique(np.concatenate([found[split][c] for c in columns]))
        if len(bad):
            named = ", ".join(f"{c!r}: {len(found[split][c]):,}" for c in columns if len(found[split][c]))
            log.warning("%s: dropped %d of %d rows of split %r with missing or empty values (%s; "
                        "dataset.drop_missing=true)", source, len(bad), len(ds), split, named)
            ds = ds.select(np.setdiff1d(np.arange(len(ds)), bad))
        if len(ds) == 0:
            raise InputError(f"{source}: every row of split {split!r} misses a value in {list(columns)}; "
                             "nothing is left to train on. Check the column names (dataset.*_column).")
        out[split] = ds
    return out


def label_name(value) -> str:
    """A label value as its class name; integral floats (a numeric column that once held blanks) as ints."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def label_vocabulary(splits: list[datasets.Dataset], column: str) -> list:
    """The distinct label values of all splits, sorted: class k is the k-th (one vocabulary for every split)."""
    return sorted({v for ds in splits for v in ds.unique(column)})


def require_two_classes(labels: np.ndarray, names: list[str], column: str, key: str, split: str,
                        source: str) -> None:
    """A classifier needs two classes: refuse a training split whose label column holds one."""
    present = np.unique(labels)
    if len(present) < 2:
        only = names[int(present[0])] if len(present) else None
        raise InputError(
            f"{source}: column {column!r} ({key}) holds a single class, {only!r}, in all {len(labels):,} rows of "
            f"split {split!r}: a classifier needs at least two. Check that {key} names the label column and that "
            "the data holds every class (dataset.limit keeps the label proportions of the whole).")
