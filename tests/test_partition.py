"""Client partitions: coverage, label skew, seeding, local splits and the errors users hit."""
from pathlib import Path

import datasets
import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from celora.data.partition import ClientSplit, Dirichlet, Iid, Natural, Pathological, label_counts

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
        assert np.all(np.abs(held - 0.25 * whole) <= 1)


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
    with pytest.raises(ValueError, match="could not give all 50 clients >= 20 examples"):
        Dirichlet(alpha=0.05, min_partition_size=20).split(data, 50, seed=0)


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

    splits = instantiate(cfg).split(data, 3, seed=0)

    assert np.array_equal(np.sort(np.concatenate(_rows(splits))), np.arange(len(data)))
