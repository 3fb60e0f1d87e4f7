"""Split a training set across clients (flwr-datasets partitioners), then each client's share into local train/test."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import datasets
import numpy as np
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner, PathologicalPartitioner
from sklearn.model_selection import train_test_split

INDEX = "__index__"


@dataclass
class ClientSplit:
    """One client's rows of `TextData.train`: what it trains on and its own held-out local test."""

    train: np.ndarray
    test: np.ndarray


@dataclass
class Partition:
    """Base: subclasses say which rows each client gets; this splits them into local train/test."""

    local_test_fraction: float = 0.2

    def __post_init__(self):
        if not 0 <= self.local_test_fraction < 1:
            raise ValueError(f"local_test_fraction={self.local_test_fraction} must be in [0, 1): "
                             "a client needs at least one training example.")

    def split(self, dataset: datasets.Dataset, num_clients: int, seed: int,
              label_column: str = "label") -> list[ClientSplit]:
        for column in self._columns(label_column):
            _require_column(dataset, column)
        if not 1 <= num_clients <= len(dataset):
            raise ValueError(f"num_clients={num_clients} but the dataset has {len(dataset)} examples; "
                             f"use between 1 and {len(dataset)} clients.")
        # Only the columns partitioners read, plus row numbers to map partitions back to `dataset`.
        light = dataset.select_columns(self._columns(label_column)).add_column(INDEX, np.arange(len(dataset)))
        parts = self._assign(light, num_clients, seed, label_column)
        for cid, rows in enumerate(parts):
            if len(rows) < 2:
                raise ValueError(
                    f"client {cid} got {len(rows)} example(s) (a client needs >= 2 for local train and test); "
                    f"use fewer clients{self._hint()}.")
        labels = _column(dataset, label_column)
        return [self._local_split(rows, labels, np.random.SeedSequence([seed, cid]))
                for cid, rows in enumerate(parts)]

    def _columns(self, label_column: str) -> list[str]:
        return [label_column]

    def _hint(self) -> str:
        return ""

    def _assign(self, ds: datasets.Dataset, num_clients: int, seed: int, label_column: str) -> list[np.ndarray]:
        raise NotImplementedError

    def _local_split(self, rows: np.ndarray, labels: np.ndarray, seeds: np.random.SeedSequence) -> ClientSplit:
        rows = np.sort(rows)  # so the split depends on which rows a client has, not their order
        labels = labels[rows]
        if self.local_test_fraction == 0:
            return ClientSplit(train=rows, test=rows[:0])
        n_test = int(np.clip(round(self.local_test_fraction * len(rows)), 1, len(rows) - 1))
        classes, counts = np.unique(labels, return_counts=True)
        # Stratify only where every class can appear on both sides; otherwise a plain seeded split.
        stratify = counts.min() >= 2 and min(n_test, len(rows) - n_test) >= len(classes)
        train, test = train_test_split(rows, test_size=n_test, random_state=int(seeds.generate_state(1)[0]),
                                       stratify=labels if stratify else None)
        return ClientSplit(train=np.sort(train), test=np.sort(test))


def _require_column(dataset: datasets.Dataset, column: str) -> None:
    if column not in dataset.column_names:
        raise ValueError(f"unknown column {column!r}; the dataset has {dataset.column_names}.")


def _column(ds: datasets.Dataset, name: str) -> np.ndarray:
    # A full slice is read in one go; `np.asarray(ds[name])` walks a datasets 4.x Column row by row.
    return np.asarray(ds[name][:])


def _indices(partitioner: Partitioner, ds: datasets.Dataset, num_clients: int) -> list[np.ndarray]:
    partitioner.dataset = ds
    return [_column(partitioner.load_partition(cid), INDEX).astype(np.int64) for cid in range(num_clients)]


@dataclass
class Iid(Partition):
    """Uniformly random, equal-sized shares."""

    def _assign(self, ds, num_clients, seed, label_column):
        # IidPartitioner cuts contiguous shards and takes no seed, so the rows are shuffled first.
        return _indices(IidPartitioner(num_clients), ds.shuffle(seed=seed), num_clients)


@dataclass
class Dirichlet(Partition):
    """Per class, client shares drawn from Dir(alpha): smaller alpha, more label skew."""

    alpha: float = 0.5
    min_partition_size: int = 10
    self_balancing: bool = False

    def _hint(self) -> str:
        return ", a larger alpha, or a larger min_partition_size"

    def _assign(self, ds, num_clients, seed, label_column):
        partitioner = DirichletPartitioner(num_clients, label_column, alpha=float(self.alpha),
                                           min_partition_size=self.min_partition_size,
                                           self_balancing=self.self_balancing, seed=seed)
        try:
            # flwr warns on each of its up-to-10 redraws; only the final outcome matters here.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return _indices(partitioner, ds, num_clients)
        except ValueError as err:
            raise ValueError(
                f"Dirichlet(alpha={self.alpha}) could not give all {num_clients} clients "
                f">= {self.min_partition_size} examples ({err}); use fewer clients, a larger alpha, "
                f"or a smaller min_partition_size.") from err


@dataclass
class Pathological(Partition):
    """Each client holds only `classes_per_client` classes."""

    classes_per_client: int = 1
    class_assignment_mode: str = "first-deterministic"

    def _assign(self, ds, num_clients, seed, label_column):
        partitioner = PathologicalPartitioner(num_clients, label_column, self.classes_per_client,
                                              class_assignment_mode=self.class_assignment_mode, seed=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unassigned classes are reported below as an error
            parts = _indices(partitioner, ds, num_clients)
        labels = _column(ds, label_column)
        unused = sorted(set(labels.tolist()) - {y for rows in parts for y in labels[rows].tolist()})
        if unused:
            raise ValueError(f"classes {unused} are held by no client, so their examples would be dropped; "
                             f"use at least as many clients as classes, or more classes_per_client.")
        return parts


@dataclass
class Natural(Partition):
    """Groups a natural id (e.g. the movie) into exactly `num_clients` clients; an id never spans two."""

    column: str = "movie"

    def _columns(self, label_column):
        return [label_column, self.column]

    def _assign(self, ds, num_clients, seed, label_column):
        ids = _column(ds, self.column)
        unique = np.unique(ids)
        if len(unique) < num_clients:
            raise ValueError(f"column {self.column!r} has {len(unique)} distinct ids, fewer than "
                             f"num_clients={num_clients}; use at most {len(unique)} clients.")
        # GroupedNaturalIdPartitioner fixes ids per group (not the number of groups) and is unseeded,
        # so ids are dealt to clients by a seeded permutation instead.
        owner = dict(zip(np.random.default_rng(seed).permutation(unique).tolist(),
                         np.arange(len(unique)) % num_clients))
        client = np.array([owner[i] for i in ids.tolist()])
        return [np.flatnonzero(client == cid) for cid in range(num_clients)]


def label_counts(dataset: datasets.Dataset, splits: list[ClientSplit], num_classes: int,
                 label_column: str = "label") -> list[dict]:
    """Per client: sizes and per-class counts of local train and test (for partition.json and the log)."""
    labels = _column(dataset, label_column)
    return [{"client": cid, "train_size": len(s.train), "test_size": len(s.test),
             "train_counts": np.bincount(labels[s.train], minlength=num_classes).tolist(),
             "test_counts": np.bincount(labels[s.test], minlength=num_classes).tolist()}
            for cid, s in enumerate(splits)]
