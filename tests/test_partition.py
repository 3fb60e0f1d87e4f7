"""Client partitions: coverage, label skew, seeding, local splits and the errors users hit."""
import dataclasses
import warnings
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from flwr_datasets.partitioner import DirichletPartitioner

from celora.data.partition import (
    ClientSplit,
    ConceptShift,
    Dirichlet,
    FeatureNoise,
    Grouped,
    Iid,
    Natural,
    Pathological,
    QuantitySkew,
    RotationGroups,
    label_counts,
)
from celora.data.text import hold_out, rt_reviews, rt_source, take
from tolerance import gamma

CONF = Path(__file__).resolve().parents[1] / "conf" / "partition"
NUM_CLASSES = 3


def synthetic(n: int = 600, num_users: int = 40, seed: int = 0) -> datasets.Dataset:
    """Imbalanced labels (60/30/10%) and a `user` id per row."""
    rng = np.random.default_rng(seed)
    return datasets.Dataset.from_dict({
        "label": rng.choice(NUM_CLASSES, size=n, p=[0.6, 0.3, 0.1]).tolist(),
        "user": rng.integers(num_users, size=n).tolist(),
    })


PARTITIONS = {
    "iid": Iid(),
    "dirichlet": Dirichlet(alpha=0.5, min_partition_size=10),
    "pathological": Pathological(classes_per_client=1),
    "natural": Natural(column="user"),
    "grouped": Grouped(groups=3, skew=0.8),
    "quantity_skew": QuantitySkew(beta=1.0, min_partition_size=10),
    "concept_shift": ConceptShift(groups=2),
    "concept_shift_dirichlet": ConceptShift(groups=3, alpha=0.5),
    "feature_noise": FeatureNoise(sigma=0.2),
    "rotation_groups": RotationGroups(groups=2, alpha=1.0),
}


@pytest.fixture(scope="module")
def data() -> datasets.Dataset:
    return synthetic()


def _rows(splits: list[ClientSplit]) -> list[np.ndarray]:
    return [np.concatenate([s.train, s.test]) for s in splits]


def _same(a: list[ClientSplit], b: list[ClientSplit]) -> bool:
    return all(np.array_equal(x.train, y.train) and np.array_equal(x.test, y.test) for x, y in zip(a, b))


@pytest.mark.parametrize("name", PARTITIONS)
def test_every_index_in_exactly_one_client(data, name):
    splits = PARTITIONS[name].split(data, num_clients=6, seed=0)

    everything = np.concatenate(_rows(splits))
    assert len(splits) == 6
    assert np.array_equal(np.sort(everything), np.arange(len(data)))
    assert all(len(s.train) >= 1 and len(s.test) >= 1 for s in splits)


@pytest.mark.parametrize("name", PARTITIONS)
def test_seed_reproduces_and_changes(data, name):
    partition = PARTITIONS[name]

    a, b, c = (partition.split(data, 6, seed=s) for s in (1, 1, 2))

    assert _same(a, b)
    assert not _same(a, c)


def test_dirichlet_skew_grows_as_alpha_falls():
    data = synthetic(n=3000)  # at alpha=0.1, 3 classes over 5 clients leave some nearly empty
    labels = np.asarray(data["label"][:])
    overall = np.bincount(labels, minlength=NUM_CLASSES) / len(labels)

    def mean_tv(alpha: float) -> float:
        tvs = []
        for seed in range(3):
            for rows in _rows(Dirichlet(alpha=alpha, min_partition_size=2).split(data, 5, seed)):
                p = np.bincount(labels[rows], minlength=NUM_CLASSES) / len(rows)
                tvs.append(0.5 * np.abs(p - overall).sum())
        return float(np.mean(tvs))

    skewed, middle, even = mean_tv(0.1), mean_tv(1.0), mean_tv(10.0)
    assert skewed > middle > even
    assert even < 0.1


@pytest.mark.parametrize("k", [1, 2])
def test_pathological_clients_hold_at_most_k_classes(data, k):
    labels = np.asarray(data["label"][:])

    splits = Pathological(classes_per_client=k).split(data, 6, seed=0)

    assert all(len(np.unique(labels[rows])) <= k for rows in _rows(splits))


def test_natural_never_splits_an_id(data):
    users = np.asarray(data["user"][:])

    splits = Natural(column="user").split(data, 7, seed=0)

    owners = [set(users[rows].tolist()) for rows in _rows(splits)]
    assert len(owners) == 7 and all(owners)
    assert sum(len(o) for o in owners) == len(set().union(*owners)) == 40


def test_local_split_is_stratified_with_the_right_fraction(data):
    labels = np.asarray(data["label"][:])

    splits = Iid(local_test_fraction=0.25).split(data, 4, seed=0)

    for s in splits:
        n = len(s.train) + len(s.test)
        assert len(s.test) == round(0.25 * n)
        assert len(np.intersect1d(s.train, s.test)) == 0
        whole = np.bincount(labels[np.concatenate([s.train, s.test])], minlength=NUM_CLASSES)
        held = np.bincount(labels[s.test], minlength=NUM_CLASSES)
        assert np.all(np.abs(held - 0.25 * whole) <= 1)  # a count: each class within one example of 25%


def test_local_split_tolerates_a_singleton_class_and_zero_fraction():
    tiny = datasets.Dataset.from_dict({"label": [0, 0, 0, 0, 1]})

    (plain,) = Iid(local_test_fraction=0.4).split(tiny, 1, seed=0)
    (whole,) = Iid(local_test_fraction=0.0).split(tiny, 1, seed=0)

    assert (len(plain.train), len(plain.test)) == (3, 2)
    assert len(whole.train) == 5 and len(whole.test) == 0


def test_label_counts(data):
    splits = Dirichlet(alpha=1.0).split(data, 5, seed=0)

    counts = label_counts(data, splits, NUM_CLASSES)

    assert [c["client"] for c in counts] == list(range(5))
    assert sum(sum(c["train_counts"]) + sum(c["test_counts"]) for c in counts) == len(data)
    assert all(sum(c["train_counts"]) == c["train_size"] for c in counts)
    totals = np.sum([np.add(c["train_counts"], c["test_counts"]) for c in counts], axis=0)
    assert totals.tolist() == np.bincount(data["label"][:], minlength=NUM_CLASSES).tolist()


def test_more_clients_than_examples(data):
    with pytest.raises(ValueError, match="num_clients=601 but the dataset has 600 examples"):
        Iid().split(data, 601, seed=0)


def test_a_client_with_too_few_examples(data):
    with pytest.raises(ValueError, match=r"client \d+ got [01] example.*fewer clients, a larger alpha"):
        Dirichlet(alpha=0.05, min_partition_size=0).split(data, 50, seed=0)


def test_dirichlet_that_cannot_meet_min_partition_size(data):
    with pytest.raises(ValueError, match="could not give all 50 clients >= 20 examples in 20 draws.*larger max_draws"):
        Dirichlet(alpha=0.05, min_partition_size=20, max_draws=15).split(data, 50, seed=0)


def test_dirichlet_max_draws_must_be_positive():
    with pytest.raises(ValueError, match="partition.max_draws=0 must be >= 1"):
        Dirichlet(max_draws=0)


def _flwr_dirichlet(data, num_clients, seed, **kw):
    """flwr-datasets' DirichletPartitioner on its own: its 10 draws from `seed`."""
    partitioner = DirichletPartitioner(num_clients, "label", seed=seed, **kw)
    partitioner.dataset = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [np.sort(np.asarray(partitioner.load_partition(c)["row"][:])) for c in range(num_clients)]


def test_dirichlet_found_in_flwrs_own_draws_is_flwrs_partition():
    """More redraws change no partition flwr finds by itself: only splits that used to fail are new."""
    data = synthetic(n=3000)
    ours = Dirichlet(alpha=0.3, min_partition_size=10, max_draws=1000).split(data, 5, seed=4)
    theirs = _flwr_dirichlet(data.add_column("row", np.arange(len(data))).select_columns(["label", "row"]),
                             5, 4, alpha=0.3, min_partition_size=10, self_balancing=False)
    for split, rows in zip(ours, theirs):
        assert np.array_equal(np.sort(np.concatenate([split.train, split.test])), rows)


def test_the_main_tables_dirichlet_01_split_partitions_at_every_seed(compose_cfg):
    """conf/split/dirichlet_0.1.yaml over the embedded default's training rows (2 classes, 10 clients) at the
    main table's seeds: every client gets min_partition_size, which flwr's own 10 draws miss at seeds 1 and 2."""
    cfg = compose_cfg("+split=dirichlet_0.1")
    partition = instantiate(cfg.partition)
    assert partition.alpha == 0.1
    for seed in (1, 2, 3):
        train = hold_out(take(rt_reviews(rt_source()), cfg.dataset.limit, seed), cfg.dataset.test_fraction, seed)["train"]
        sizes = [len(s.train) + len(s.test) for s in partition.split(train, cfg.fl.num_clients, seed)]
        assert min(sizes) >= partition.min_partition_size and sum(sizes) == len(train)
        if seed == 1:
            with pytest.raises(ValueError, match="in 10 draws"):
                dataclasses.replace(partition, max_draws=10).split(train, cfg.fl.num_clients, seed)


@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_local_test_fraction_out_of_range(fraction):
    with pytest.raises(ValueError, match=r"local_test_fraction=.* must be in \[0, 1\)"):
        Iid(local_test_fraction=fraction)


def test_natural_with_fewer_ids_than_clients(data):
    with pytest.raises(ValueError, match="'user' has 40 distinct ids, fewer than num_clients=41"):
        Natural(column="user").split(data, 41, seed=0)


@pytest.mark.parametrize("partition, label_column", [(Natural(column="movie"), "label"), (Iid(), "stars")])
def test_unknown_column(data, partition, label_column):
    with pytest.raises(ValueError, match="unknown column '(movie|stars)'; the dataset has"):
        partition.split(data, 4, seed=0, label_column=label_column)


def test_pathological_leaving_a_class_unassigned(data):
    with pytest.raises(ValueError, match=r"classes \[2\] are held by no client"):
        Pathological(classes_per_client=1).split(data, 2, seed=0)


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_configs_instantiate_and_split(data, path):
    cfg = OmegaConf.load(path)
    if "column" in cfg:
        cfg.column = "user"
    # 6: divisible by grouped.yaml's 2 groups; a preset with its own clients and classes gets its own
    clients = sum(cfg.clients_per_group) if OmegaConf.is_list(cfg.get("clients_per_group")) else 6
    if cfg.get("class_groups"):
        data = balanced(60, 1 + max(c for cs in cfg.class_groups for c in cs))

    splits = instantiate(cfg).split(data, clients, seed=0)

    assert len(splits) == clients
    assert np.array_equal(np.sort(np.concatenate(_rows(splits))), np.arange(len(data)))


def balanced(n_per_class: int, num_classes: int) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"label": np.repeat(np.arange(num_classes), n_per_class).tolist()})


def _shares(labels: np.ndarray, rows: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(labels[rows], minlength=num_classes) / len(rows)


def test_grouped_clients_follow_their_groups_label_distribution():
    data = balanced(1000, 2)
    labels = np.asarray(data["label"][:])
    partition = Grouped(groups=2, skew=0.9)

    splits = partition.split(data, 8, seed=0)
    groups = partition.group_of(8)

    for s, g in zip(splits, groups):
        assert _shares(labels, s.train, 2)[g] > 0.8
    # All data used and, with balanced classes, each group is exactly 90% its own class.
    for g in range(2):
        rows = np.concatenate([r for r, h in zip(_rows(splits), groups) if h == g])
        # exact: counts of exactly 9/10 and 1/10 of the rows divide to the floats nearest 0.9 and 0.1
        assert np.array_equal(_shares(labels, rows, 2), [0.9, 0.1] if g == 0 else [0.1, 0.9])


def test_grouped_same_group_alike_other_groups_differ():
    data = balanced(1000, 10)
    labels = np.asarray(data["label"][:])
    class_groups = [[0, 2, 3, 4, 6], [5, 7, 9], [1, 8]]
    partition = Grouped(groups=3, clients_per_group=3, skew=0.9, class_groups=class_groups)

    shares = [_shares(labels, rows, 10) for rows in _rows(partition.split(data, 9, seed=0))]
    groups = partition.group_of(9)

    def tv(i, j):
        return 0.5 * np.abs(shares[i] - shares[j]).sum()

    same = [tv(i, j) for i in range(9) for j in range(i) if groups[i] == groups[j]]
    other = [tv(i, j) for i in range(9) for j in range(i) if groups[i] != groups[j]]
    assert max(same) < 0.15  # sampling noise over 10 classes
    assert min(other) > 0.6
    for p, g in zip(shares, groups):
        assert p[class_groups[g]].sum() > 0.75  # groups own 5, 3, 2 classes: about 0.94, 0.87, 0.82


def test_grouped_on_imbalanced_classes_uses_all_data_and_stays_skewed(data):
    labels = np.asarray(data["label"][:])
    partition = Grouped(groups=3, skew=0.9)  # class c owned by group c: 60/30/10% of the data

    splits = partition.split(data, 6, seed=0)

    assert np.array_equal(np.sort(np.concatenate(_rows(splits))), np.arange(len(data)))
    for rows, g in zip(_rows(splits), partition.group_of(6)):
        p = _shares(labels, rows, NUM_CLASSES)
        assert p.argmax() == g and p[g] > 0.6


def test_grouped_distributions():
    q = Grouped(groups=2, skew=0.9, class_groups=[[0, 2, 3], [1]]).distributions(4)

    # two roundings of values <= 1 (1 - skew, then / n) against the literal's one: within gamma(3)
    tol = gamma(3, torch.float64)
    assert np.allclose(q, [[0.3, 0.1, 0.3, 0.3], [0.1 / 3, 0.9, 0.1 / 3, 0.1 / 3]], rtol=0, atol=tol)
    assert np.array_equal(Grouped(groups=1).distributions(3), np.full((1, 3), 1 / 3))  # exact: the same 1 / 3


@pytest.mark.parametrize("partition", [Grouped(groups=3), Grouped(groups=3, clients_per_group=2)])
def test_grouped_group_of_is_group_major(partition):
    assert partition.group_of(6) == [0, 0, 1, 1, 2, 2]


def test_grouped_seed_reproduces_and_changes():
    data = balanced(100, 2)
    partition = Grouped(groups=2, skew=0.7)

    a, b, c = (partition.split(data, 4, seed=s) for s in (3, 3, 4))

    assert _same(a, b)
    assert not _same(a, c)


def test_grouped_num_clients_not_divisible(data):
    with pytest.raises(ValueError, match="num_clients=5 is not divisible by groups=2.*clients_per_group"):
        Grouped(groups=2).split(data, 5, seed=0)


def test_grouped_clients_per_group_mismatch(data):
    partition = Grouped(groups=2, clients_per_group=3)
    message = r"groups=2 \* clients_per_group=3 = 6 but num_clients=4; set clients_per_group to num_clients / groups"

    with pytest.raises(ValueError, match=message):
        partition.split(data, 4, seed=0)
    with pytest.raises(ValueError, match=message):
        partition.group_of(4)


def test_grouped_more_groups_than_classes(data):
    with pytest.raises(ValueError, match="groups=4 but the task has 3 classes.*at least one class.*set class_groups"):
        Grouped(groups=4).split(data, 4, seed=0)


@pytest.mark.parametrize("class_groups, message", [
    ([[0, 1], [1, 2]], r"class\(es\) \[1\] appear in more than one group"),
    ([[0, 1], []], r"group\(s\) \[1\] no class; each group must own >= 1 class"),
    ([[0, 1, 2]], "class_groups has 1 entries but groups=2"),
])
def test_grouped_bad_class_groups(class_groups, message):
    with pytest.raises(ValueError, match=message):
        Grouped(groups=2, class_groups=class_groups)


def test_grouped_class_owned_by_no_group(data):
    with pytest.raises(ValueError, match=r"class\(es\) \[1\] are owned by no group"):
        Grouped(groups=2, class_groups=[[0], [2]]).split(data, 2, seed=0)


@pytest.mark.parametrize("skew", [-0.1, 1.5])
def test_grouped_skew_out_of_range(skew):
    with pytest.raises(ValueError, match=r"skew=.* must be in \[0, 1\]"):
        Grouped(skew=skew)


def test_grouped_unequal_groups_get_data_in_proportion_to_their_clients():
    # Fashion-MNIST's three tasks on 10 clients: 4 / 3 / 3 (conf/partition/fashion_tasks.yaml)
    data = balanced(2000, 10)
    labels = np.asarray(data["label"][:])
    class_groups = [[0, 2, 4, 6], [5, 7, 9], [1, 3, 8]]
    partition = Grouped(groups=3, clients_per_group=[4, 3, 3], skew=0.9, class_groups=class_groups)

    splits = partition.split(data, 10, seed=0)
    groups = partition.group_of(10)

    assert groups == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert np.array_equal(np.sort(np.concatenate(_rows(splits))), np.arange(len(data)))
    sizes = [len(rows) for rows in _rows(splits)]
    assert max(sizes) - min(sizes) <= 0.15 * np.mean(sizes)  # a client's share does not depend on its group's size
    for rows, g in zip(_rows(splits), groups):
        assert _shares(labels, rows, 10)[class_groups[g]].sum() > 0.8


def test_grouped_clients_per_group_list_is_checked():
    with pytest.raises(ValueError, match=r"clients_per_group=\[4, 3\] has 2 entries but groups=3"):
        Grouped(groups=3, clients_per_group=[4, 3])
    with pytest.raises(ValueError, match=r"must be >= 1"):
        Grouped(groups=2, clients_per_group=[2, 0])
    with pytest.raises(ValueError, match=r"adds up to 10 but num_clients=9"):
        Grouped(groups=3, clients_per_group=[4, 3, 3]).group_of(9)
