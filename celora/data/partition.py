"""Split a training set across clients (flwr-datasets partitioners), then each client's share into local train/test."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import datasets
import numpy as np
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
)
from sklearn.model_selection import train_test_split

from celora.data.views import View
from celora.errors import ConfigError, InputError
from celora.seeds import FEATURE_NOISE, PARTITION_REDRAW, VALIDATION, derive_seed

INDEX = "__index__"
FLWR_DRAWS = 10  # DirichletPartitioner's draws per seed before it gives up (fixed in flwr-datasets)


@dataclass
class ClientSplit:
    """One client's rows of `TextData.train`: what it trains on and its own held-out local test; how it sees
    them (`view`: None, as they are) and what partition.json records of its ground truth (`truth`)."""

    train: np.ndarray
    test: np.ndarray
    view: View | None = None
    truth: dict = field(default_factory=dict)


@dataclass
class Partition:
    """Base: subclasses say which rows each client gets; this splits them into local train/test."""

    local_test_fraction: float = 0.2

    def __post_init__(self):
        if not 0 <= self.local_test_fraction < 1:
            raise ConfigError(f"local_test_fraction={self.local_test_fraction} must be in [0, 1): "
                             "a client needs at least one training example.")

    def split(self, dataset: datasets.Dataset, num_clients: int, seed: int,
              label_column: str = "label") -> list[ClientSplit]:
        for column in self._columns(label_column):
            _require_column(dataset, column)
        if not 1 <= num_clients <= len(dataset):
            raise InputError(f"num_clients={num_clients} but the dataset has {len(dataset)} examples; "
                             f"use between 1 and {len(dataset)} clients.")
        # Only the columns partitioners read, plus row numbers to map partitions back to `dataset`.
        light = dataset.select_columns(self._columns(label_column)).add_column(INDEX, np.arange(len(dataset)))
        parts = self._assign(light, num_clients, seed, label_column)
        for cid, rows in enumerate(parts):
            if len(rows) < 2:
                raise InputError(
                    f"client {cid} got {len(rows)} example(s) (a client needs >= 2 for local train and test); "
                    f"use fewer clients{self._hint()}.")
        labels = _column(dataset, label_column)
        views = self.views(num_clients, seed, _num_classes(dataset, labels, label_column))
        truths = self._truths(num_clients)
        out = []
        for cid, rows in enumerate(parts):
            # a client's local test rows are carved on its view's labels (a permutation keeps the strata)
            split = self._local_split(rows, labels, np.random.SeedSequence([seed, cid]))
            split.view = None if views is None or views[cid].plain else views[cid]
            split.truth = {**truths[cid], **({} if views is None else views[cid].truth())}
            out.append(split)
        return out

    def group_of(self, num_clients: int) -> list[int] | None:
        """Client id -> its latent group, where the partition has a ground truth of groups; None otherwise."""
        return None

    def views(self, num_clients: int, seed: int, num_classes: int) -> list[View] | None:
        """Each client's view of its rows (celora.data.views), where the partition gives one; None otherwise."""
        return None

    def group_views(self, num_clients: int, seed: int, num_classes: int) -> list[View] | None:
        """Each latent group's view, where clients of a group share one (the global test set is scored under each,
        global/acc_group<g>); None otherwise."""
        return None

    @property
    def images_only(self) -> bool:
        """Whether its views change pixels, so only image data can be split by it."""
        return False

    @property
    def relabels(self) -> bool:
        """Whether its views change labels, so only data answered by a class id can be split by it."""
        return False

    def _truths(self, num_clients: int) -> list[dict]:
        """Per client: its ground truth beyond its rows and view (e.g. a drawn share), for partition.json."""
        return [{} for _ in range(num_clients)]

    def _columns(self, label_column: str) -> list[str]:
        return [label_column]

    def _hint(self) -> str:
        return ""

    def _assign(self, ds: datasets.Dataset, num_clients: int, seed: int, label_column: str) -> list[np.ndarray]:
        raise NotImplementedError

    def _local_split(self, rows: np.ndarray, labels: np.ndarray, seeds: np.random.SeedSequence) -> ClientSplit:
        rows = np.sort(rows)  # so the split depends on which rows a client has, not their order
        if self.local_test_fraction == 0:
            return ClientSplit(train=rows, test=rows[:0])
        train, test = carve(rows, labels, self.local_test_fraction, int(seeds.generate_state(1)[0]))
        return ClientSplit(train=train, test=test)


def carve(rows: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) of sorted `rows`: `fraction` of them (rounded, at least 1, leaving at least 1) held out,
    stratified by `labels[rows]` where every class can appear on both sides, else a plain seeded split."""
    y = labels[rows]
    n_out = int(np.clip(round(fraction * len(rows)), 1, len(rows) - 1))
    classes, counts = np.unique(y, return_counts=True)
    stratify = counts.min() >= 2 and min(n_out, len(rows) - n_out) >= len(classes)
    kept, out = train_test_split(rows, test_size=n_out, random_state=seed, stratify=y if stratify else None)
    return np.sort(kept), np.sort(out)


def hold_out_validation(splits: list[ClientSplit], labels: np.ndarray, fraction: float,
                        seed: int) -> list[ClientSplit]:
    """Each client's validation split, carved out of its local train (`client.val_fraction`), in the place of
    its local test: a tuning run trains on the rest and is scored on validation rows only, so it never reads
    a test row. Seeded per client (seeds.VALIDATION), independent of the train/test split's draw."""
    out = []
    for cid, s in enumerate(splits):
        if len(s.train) < 2:
            raise InputError(f"client {cid} has {len(s.train)} training example(s): client.val_fraction={fraction} "
                             "needs >= 2 (one to train on, one to validate); use fewer clients or "
                             "client.val_fraction=0")
        train, val = carve(s.train, labels, fraction, derive_seed(seed, VALIDATION, cid) % 2**32)
        out.append(ClientSplit(train=train, test=val, view=s.view, truth=s.truth))
    return out


def _require_column(dataset: datasets.Dataset, column: str) -> None:
    if column not in dataset.column_names:
        raise InputError(f"unknown column {column!r}; the dataset has {dataset.column_names}. A dataset=hf or "
                         f"hf_image source keeps its id column only when named: dataset.group_column={column}.")


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
    """Per class, client shares drawn from Dir(alpha): smaller alpha, more label skew.

    Drawn again until every client has `min_partition_size` examples, up to `max_draws` draws: flwr-datasets'
    DirichletPartitioner makes 10 draws from the run's seed, then 10 from each further seed derived from it
    (seeds.PARTITION_REDRAW). A partition found in the first 10 draws is flwr's own, whatever `max_draws` is.
    A skewed split of few classes over many clients (alpha = 0.1, 2 classes, 10 clients) needs many draws:
    the result is Dir(alpha) conditioned on the minimum size, as flwr's own redraws already make it."""

    alpha: float = 0.5
    min_partition_size: int = 10
    self_balancing: bool = False
    max_draws: int = 1000

    def __post_init__(self):
        super().__post_init__()
        if not self.alpha > 0:
            raise ConfigError(f"partition.alpha={self.alpha} must be > 0 (0.1: strongly skewed, 10: near IID).")
        if self.min_partition_size < 0:
            raise ConfigError(f"partition.min_partition_size={self.min_partition_size} must be >= 0.")
        if self.max_draws < 1:
            raise ConfigError(f"partition.max_draws={self.max_draws} must be >= 1 (flwr draws 10 per seed).")

    def _hint(self) -> str:
        return ", a larger alpha, or a larger min_partition_size"

    def _assign(self, ds, num_clients, seed, label_column):
        seeds = -(-self.max_draws // FLWR_DRAWS)
        for attempt in range(seeds):
            draw_seed = seed if attempt == 0 else derive_seed(seed, PARTITION_REDRAW, attempt) % 2**32
            partitioner = DirichletPartitioner(num_clients, label_column, alpha=float(self.alpha),
                                               min_partition_size=self.min_partition_size,
                                               self_balancing=self.self_balancing, seed=draw_seed)
            try:
                # flwr warns on each of its redraws; only the final outcome matters here.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return _indices(partitioner, ds, num_clients)
            except ValueError as err:
                last = err
        raise InputError(
            f"Dirichlet(alpha={self.alpha}) could not give all {num_clients} clients "
            f">= {self.min_partition_size} examples in {seeds * FLWR_DRAWS} draws ({last}); use fewer clients, "
            f"a larger alpha, a smaller min_partition_size, or a larger max_draws.") from last


@dataclass
class Pathological(Partition):
    """Each client holds only `classes_per_client` classes."""

    classes_per_client: int = 1
    class_assignment_mode: str = "first-deterministic"

    def __post_init__(self):
        super().__post_init__()
        if self.classes_per_client < 1:
            raise ConfigError(f"partition.classes_per_client={self.classes_per_client} must be >= 1.")

    def _assign(self, ds, num_clients, seed, label_column):
        partitioner = PathologicalPartitioner(num_clients, label_column, self.classes_per_client,
                                              class_assignment_mode=self.class_assignment_mode, seed=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unassigned classes are reported below as an error
            parts = _indices(partitioner, ds, num_clients)
        labels = _column(ds, label_column)
        unused = sorted(set(labels.tolist()) - {y for rows in parts for y in labels[rows].tolist()})
        if unused:
            raise InputError(f"classes {unused} are held by no client, so their examples would be dropped; "
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
            raise InputError(f"column {self.column!r} has {len(unique)} distinct ids, fewer than "
                             f"num_clients={num_clients}; use at most {len(unique)} clients.")
        # GroupedNaturalIdPartitioner fixes ids per group (not the number of groups) and is unseeded,
        # so ids are dealt to clients by a seeded permutation instead.
        owner = dict(zip(np.random.default_rng(seed).permutation(unique).tolist(),
                         np.arange(len(unique)) % num_clients))
        client = np.array([owner[i] for i in ids.tolist()])
        return [np.flatnonzero(client == cid) for cid in range(num_clients)]


@dataclass
class Grouped(Partition):
    """Clients in latent groups that share a label distribution: a known ground truth for personalisation.

    Group g owns some classes (`class_groups`; default: class c belongs to group c % groups). Its label
    distribution puts mass `skew` uniformly over its own classes and `1 - skew` uniformly over the rest.
    Each class's examples (seeded shuffle) go to the groups in proportion to their demand for it (its
    share in the group's distribution times the group's number of clients), so no example is dropped;
    each group's examples are then dealt IID (seeded) to its clients. `clients_per_group` is one number
    for every group, or a list with one per group (e.g. [4, 3, 3]: 10 clients in 3 tasks). Clients are
    numbered group-major; `group_of` gives each client's group. A group's realised shares equal its
    distribution exactly when the classes are balanced and every group owns equally many classes
    (e.g. 2 classes, 2 groups); otherwise they follow it approximately.
    """

    groups: int = 2
    clients_per_group: int | list[int] | None = None
    skew: float = 0.9
    class_groups: list[list[int]] | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.groups < 1:
            raise ConfigError(f"groups={self.groups} must be >= 1.")
        if self.clients_per_group is not None and not isinstance(self.clients_per_group, int):
            self.clients_per_group = [int(m) for m in self.clients_per_group]  # Hydra passes ListConfig
            if len(self.clients_per_group) != self.groups:
                raise ConfigError(f"clients_per_group={self.clients_per_group} has {len(self.clients_per_group)} "
                                 f"entries but groups={self.groups}; give one number per group, or one for all.")
        sizes = self.clients_per_group if isinstance(self.clients_per_group, list) else [self.clients_per_group]
        if self.clients_per_group is not None and min(sizes) < 1:
            raise ConfigError(f"clients_per_group={self.clients_per_group} must be >= 1, or null to use "
                             "num_clients / groups.")
        if not 0 <= self.skew <= 1:
            raise ConfigError(f"skew={self.skew} must be in [0, 1]: the share of a group's examples "
                             "drawn from its own classes.")
        if self.class_groups is not None:
            # Plain lists of ints (Hydra passes ListConfig).
            self.class_groups = [[int(c) for c in owned] for owned in self.class_groups]
            if len(self.class_groups) != self.groups:
                raise ConfigError(f"class_groups has {len(self.class_groups)} entries but groups={self.groups}; "
                                 "give one list of classes per group.")
            empty = [g for g, owned in enumerate(self.class_groups) if not owned]
            if empty:
                raise ConfigError(f"class_groups gives group(s) {empty} no class; each group must own >= 1 class.")
            owned = [c for cs in self.class_groups for c in cs]
            twice = sorted({c for c in owned if owned.count(c) > 1})
            if twice:
                raise ConfigError(f"class(es) {twice} appear in more than one group of class_groups; "
                                 "every class must be owned by exactly one group.")
            if min(owned) < 0:
                raise ConfigError(f"class_groups holds negative class ids {sorted(c for c in owned if c < 0)}; "
                                 "classes are label ids 0, 1, ...")

    def _hint(self) -> str:
        return ", fewer groups, or a lower skew"

    def _group_sizes(self, num_clients: int) -> list[int]:
        """Clients in each group."""
        return group_sizes(self.groups, self.clients_per_group, num_clients)

    def group_of(self, num_clients: int) -> list[int]:
        """Client id -> group id (group-major: clients 0..m-1 are group 0, m..2m-1 group 1, ...)."""
        return [g for g, m in enumerate(self._group_sizes(num_clients)) for _ in range(m)]

    def _owners(self, num_classes: int) -> list[list[int]]:
        if self.class_groups is None:
            if self.groups > num_classes:
                raise InputError(f"groups={self.groups} but the task has {num_classes} classes, and each group "
                                 f"needs at least one class of its own; use at most {num_classes} groups, or set "
                                 "class_groups (one list of class ids per group, every class in exactly one "
                                 "list) to say which classes each group owns.")
            return [list(range(g, num_classes, self.groups)) for g in range(self.groups)]
        owned = {c for cs in self.class_groups for c in cs}
        missing = sorted(set(range(num_classes)) - owned)
        if missing:
            raise InputError(f"class(es) {missing} are owned by no group in class_groups={self.class_groups}; "
                             "every class must be owned by exactly one group.")
        return self.class_groups

    def distributions(self, num_classes: int) -> np.ndarray:
        """groups x num_classes: each group's target label distribution."""
        q = np.zeros((self.groups, num_classes))
        for g, own in enumerate(self._owners(num_classes)):
            others = num_classes - len(own)
            q[g] = (1 - self.skew) / others if others else 0.0
            q[g, own] = (self.skew if others else 1.0) / len(own)
        return q

    def _assign(self, ds, num_clients, seed, label_column):
        sizes = np.array(self._group_sizes(num_clients), dtype=float)
        labels = _column(ds, label_column)
        if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            raise InputError(f"Grouped needs integer class ids >= 0 in column {label_column!r}.")
        feature = ds.features[label_column]
        num_classes = max(int(labels.max()) + 1, getattr(feature, "num_classes", 0) or 0)
        if self.class_groups is not None:
            top = max(c for cs in self.class_groups for c in cs)
            if isinstance(feature, datasets.ClassLabel) and top >= feature.num_classes:
                raise InputError(f"class_groups names class {top} but {label_column!r} has "
                                 f"{feature.num_classes} classes (0..{feature.num_classes - 1}).")
            num_classes = max(num_classes, top + 1)
        q = self.distributions(num_classes)
        rng = np.random.default_rng(seed)
        rows = [[] for _ in range(self.groups)]
        for c in range(num_classes):
            members = rng.permutation(np.flatnonzero(labels == c))
            # demand = share x clients; relative to group 0, so equal groups weigh exactly q[:, c]
            counts = _apportion(len(members), q[:, c] * (sizes / sizes[0]))
            for g, part in enumerate(np.split(members, np.cumsum(counts)[:-1])):
                rows[g].append(part)
        parts = []
        for g in range(self.groups):
            mine = rng.permutation(np.concatenate(rows[g]))
            parts.extend(np.array_split(mine, int(sizes[g])))
        return parts


def _num_classes(dataset: datasets.Dataset, labels: np.ndarray, label_column: str) -> int:
    feature = dataset.features.get(label_column) if hasattr(dataset, "features") else None
    declared = getattr(feature, "num_classes", 0) or 0
    return max(declared, int(labels.max()) + 1 if len(labels) and np.issubdtype(labels.dtype, np.integer) else 0)


def group_sizes(groups: int, clients_per_group: int | list[int] | None, num_clients: int) -> list[int]:
    """Clients in each latent group: num_clients / groups each (null), one number for all, or one per group."""
    if clients_per_group is None:
        if num_clients % groups:
            raise ConfigError(f"num_clients={num_clients} is not divisible by groups={groups}; use a "
                              f"multiple of {groups} clients, change groups, or set clients_per_group "
                              f"so that groups * clients_per_group = num_clients (or a list, one per group).")
        return [num_clients // groups] * groups
    if isinstance(clients_per_group, list):
        if sum(clients_per_group) != num_clients:
            raise ConfigError(f"clients_per_group={clients_per_group} adds up to "
                              f"{sum(clients_per_group)} but num_clients={num_clients}; make them agree.")
        return list(clients_per_group)
    if groups * clients_per_group != num_clients:
        raise ConfigError(f"groups={groups} * clients_per_group={clients_per_group} = "
                          f"{groups * clients_per_group} but num_clients={num_clients}; set "
                          f"clients_per_group to num_clients / groups, set it to null, or change groups.")
    return [clients_per_group] * groups


def _check_groups(groups: int, clients_per_group) -> int | list[int] | None:
    """The checked `clients_per_group` (plain ints: Hydra passes a ListConfig)."""
    if groups < 1:
        raise ConfigError(f"partition.groups={groups} must be >= 1.")
    if clients_per_group is None:
        return None
    if not isinstance(clients_per_group, int):
        clients_per_group = [int(m) for m in clients_per_group]
        if len(clients_per_group) != groups:
            raise ConfigError(f"partition.clients_per_group={clients_per_group} has {len(clients_per_group)} entries "
                              f"but groups={groups}; give one number per group, or one for all.")
    if min(clients_per_group if isinstance(clients_per_group, list) else [clients_per_group]) < 1:
        raise ConfigError(f"partition.clients_per_group={clients_per_group} must be >= 1, or null to use "
                          "num_clients / groups.")
    return clients_per_group


@dataclass
class QuantitySkew(Partition):
    """Client sizes from Dir(beta) over the clients (NIID-Bench's quantity skew, Li et al. 2022), labels IID.

    The shares p ~ Dir(beta, ..., beta) are drawn from the run's seed and each client gets round(p_i n) rows
    (largest remainder) of a seeded shuffle, so its labels follow the whole set's. Drawn again until every
    client has `min_partition_size` rows, up to `max_draws` draws. partition.json records each client's share."""

    beta: float = 0.5
    min_partition_size: int = 10
    max_draws: int = 1000
    shares: np.ndarray | None = field(default=None, init=False, repr=False)  # the last split's drawn shares

    def __post_init__(self):
        super().__post_init__()
        if not self.beta > 0:
            raise ConfigError(f"partition.beta={self.beta} must be > 0 (0.1: a few clients hold most rows, 10: "
                              "near equal sizes).")
        if self.min_partition_size < 2:
            raise ConfigError(f"partition.min_partition_size={self.min_partition_size} must be >= 2 (a client needs "
                              "a row to train on and one to test).")
        if self.max_draws < 1:
            raise ConfigError(f"partition.max_draws={self.max_draws} must be >= 1.")

    def _assign(self, ds, num_clients, seed, label_column):
        n = len(ds)
        rng = np.random.default_rng(seed)
        order = rng.permutation(n)
        for _ in range(self.max_draws):
            shares = rng.dirichlet(np.full(num_clients, float(self.beta)))
            sizes = _apportion(n, shares)
            if sizes.min() >= self.min_partition_size:
                self.shares = shares
                return np.split(order, np.cumsum(sizes)[:-1])
        raise InputError(f"quantity skew Dir(beta={self.beta}) gave some of the {num_clients} clients fewer than "
                         f"partition.min_partition_size={self.min_partition_size} of {n} rows in {self.max_draws} "
                         "draws; use fewer clients, a larger beta, a smaller min_partition_size or a larger max_draws.")

    def _truths(self, num_clients):
        return [{"share": float(p)} for p in self.shares]


@dataclass
class _Based(Partition):
    """A partition over an IID split (alpha null) or a Dirichlet(alpha) label-skewed one."""

    alpha: float | None = None
    min_partition_size: int = 10

    def __post_init__(self):
        super().__post_init__()
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError(f"partition.alpha={self.alpha} must be > 0, or null for an IID split underneath.")

    def _base(self) -> Partition:
        if self.alpha is None:
            return Iid(self.local_test_fraction)
        return Dirichlet(self.local_test_fraction, alpha=self.alpha, min_partition_size=self.min_partition_size)

    def _assign(self, ds, num_clients, seed, label_column):
        return self._base()._assign(ds, num_clients, seed, label_column)


@dataclass
class _GroupedViews(_Based):
    """Latent groups of clients (group-major: clients 0..m-1 are group 0, ...), each with its own view."""

    groups: int = 2
    clients_per_group: int | list[int] | None = None

    def __post_init__(self):
        super().__post_init__()
        self.clients_per_group = _check_groups(self.groups, self.clients_per_group)

    def group_of(self, num_clients: int) -> list[int]:
        return [g for g, m in enumerate(group_sizes(self.groups, self.clients_per_group, num_clients))
                for _ in range(m)]

    def views(self, num_clients, seed, num_classes):
        per_group = self.group_views(num_clients, seed, num_classes)
        return [per_group[g] for g in self.group_of(num_clients)]

    def _truths(self, num_clients):
        return [{"group": g} for g in self.group_of(num_clients)]


@dataclass
class ConceptShift(_GroupedViews):
    """Concept shift: the same inputs, another label per latent group (as in IFCA, Ghosh et al. 2020).

    Group g sees class c as permutations[g][c]; by default group g shifts the class ids by g
    ((c + g) mod classes: with two classes, group 1 flips them). A client's train and local test rows carry
    its group's labels; the global test set is scored under every group's labels (global/acc_group<g>, and
    global/acc over all of them). Underneath: an IID split (alpha null) or Dirichlet(alpha)."""

    permutations: list[list[int]] | None = None

    @property
    def relabels(self) -> bool:
        return True

    def __post_init__(self):
        super().__post_init__()
        if self.permutations is not None:
            self.permutations = [[int(c) for c in p] for p in self.permutations]
            if len(self.permutations) != self.groups:
                raise ConfigError(f"partition.permutations has {len(self.permutations)} entries but groups="
                                  f"{self.groups}; give one permutation of the class ids per group.")
            for g, p in enumerate(self.permutations):
                if sorted(p) != list(range(len(p))):
                    raise ConfigError(f"partition.permutations[{g}]={p} is not a permutation of 0..{len(p) - 1}.")

    def group_views(self, num_clients, seed, num_classes):
        if self.permutations is None:
            if self.groups > num_classes:
                raise InputError(f"concept_shift with groups={self.groups} but {num_classes} classes: shifting the "
                                 f"class ids gives only {num_classes} distinct labelings; use at most {num_classes} "
                                 "groups or set partition.permutations (one permutation per group).")
            maps = [[(c + g) % num_classes for c in range(num_classes)] for g in range(self.groups)]
        else:
            wrong = [g for g, p in enumerate(self.permutations) if len(p) != num_classes]
            if wrong:
                raise InputError(f"partition.permutations[{wrong[0]}] has {len(self.permutations[wrong[0]])} entries "
                                 f"but the task has {num_classes} classes; give a permutation of 0..{num_classes - 1}.")
            maps = self.permutations
        return [View(label_map=None if list(m) == sorted(m) else tuple(m)) for m in maps]  # identity: as they are


@dataclass
class RotationGroups(_GroupedViews):
    """Feature shift by latent group (IFCA's rotated images): group g sees its images rotated by angles[g]
    degrees (multiples of 90, exact); by default 360 g / groups (groups of 1, 2 or 4). Images only."""

    angles: list[int] | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.angles is None:
            if 360 % self.groups or (360 // self.groups) % 90:
                raise ConfigError(f"rotation_groups with groups={self.groups} has no default angles (360 g / groups "
                                  "is not a multiple of 90); set partition.angles, one multiple of 90 per group.")
        else:
            self.angles = [int(a) for a in self.angles]
            if len(self.angles) != self.groups:
                raise ConfigError(f"partition.angles has {len(self.angles)} entries but groups={self.groups}; "
                                  "give one angle per group.")
            bad = [a for a in self.angles if a % 90]
            if bad:
                raise ConfigError(f"partition.angles {bad} are not multiples of 90: rotations are exact quarter "
                                  "turns (no interpolation).")

    @property
    def images_only(self) -> bool:
        return True

    def group_views(self, num_clients, seed, num_classes):
        angles = self.angles or [360 * g // self.groups for g in range(self.groups)]
        return [View(angle=a % 360) for a in angles]


@dataclass
class FeatureNoise(_Based):
    """Noise-based feature imbalance (NIID-Bench, Li et al. 2022): client i adds Gaussian noise of std
    sigma * i / num_clients (on the [0, 1] pixel scale) to its images, drawn once per (client, row) from the
    run's seed. Underneath: an IID split (alpha null) or Dirichlet(alpha). Images only."""

    sigma: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        if not self.sigma >= 0:
            raise ConfigError(f"partition.sigma={self.sigma} must be >= 0 (the noise std of the last client).")

    @property
    def images_only(self) -> bool:
        return True

    def views(self, num_clients, seed, num_classes):
        return [View(noise_std=self.sigma * i / num_clients, noise_seed=derive_seed(seed, FEATURE_NOISE, i))
                for i in range(num_clients)]


def _apportion(total: int, weights: np.ndarray) -> np.ndarray:
    """Split `total` into integers proportional to `weights` (largest remainder; ties to lower index)."""
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:total - counts.sum()]] += 1
    return counts


def label_counts(dataset: datasets.Dataset, splits: list[ClientSplit], num_classes: int,
                 label_column: str = "label") -> list[dict]:
    """Per client: sizes and per-class counts of local train and test (for partition.json and the log)."""
    labels = _column(dataset, label_column)

    def seen(rows: np.ndarray, view: View | None) -> np.ndarray:  # the labels as the client sees them
        y = labels[rows]
        return y if view is None or view.label_map is None else np.asarray(view.label_map)[y]

    return [{"client": cid, "train_size": len(s.train), "test_size": len(s.test),
             "train_counts": np.bincount(seen(s.train, s.view), minlength=num_classes).tolist(),
             "test_counts": np.bincount(seen(s.test, s.view), minlength=num_classes).tolist(),
             **({"truth": s.truth} if s.truth else {})}
            for cid, s in enumerate(splits)]


def partition_summary(counts: list[dict]) -> str:
    """label_counts in one log line (partition.json keeps the whole table): how many clients, their train and
    test sizes and how many classes each client's train rows hold, as min / median / max."""
    if not counts:
        return "partition: no clients"

    def spread(values: list[int]) -> str:
        return f"{min(values)} / {np.median(values):g} / {max(values)}"

    classes = [int(np.count_nonzero(c["train_counts"])) for c in counts]
    return (f"partition: {len(counts)} clients; train rows (min / median / max) {spread([c['train_size'] for c in counts])}"
            f", test rows {spread([c['test_size'] for c in counts])}, classes per client {spread(classes)} of "
            f"{len(counts[0]['train_counts'])}; every client's label counts are in partition.json")
