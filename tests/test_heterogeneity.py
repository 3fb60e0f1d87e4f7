"""Non-IID beyond label skew: each partition's ground truth, the views runs read, the group oracle, refusals."""
import json

import datasets
import numpy as np
import pytest
import torch

from celora.data.partition import ConceptShift, FeatureNoise, QuantitySkew, RotationGroups, _apportion, label_counts
from celora.data.views import View, Viewed
from celora.errors import ConfigError, InputError
from celora.fl import simulation
from celora.fl.aggregators import FedAvg, GroupOracle
from celora.run import run
from celora.seeds import FEATURE_NOISE, derive_seed
from celora.validate import build
from celora.world import build_world
from conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")
IMAGES = ["model=tiny_vit", "dataset=digits"]


def labels(n: int, classes: int, seed: int = 0) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"label": np.random.default_rng(seed).integers(classes, size=n).tolist()})


# -- each partition's ground truth is what its YAML says -----------------------------------------------
def test_quantity_skew_sizes_follow_the_drawn_shares_and_partition_json_keeps_them(compose_cfg, tmp_path):
    data = labels(1000, 3)
    partition = QuantitySkew(beta=0.5, min_partition_size=10)
    splits = partition.split(data, 8, seed=3)
    sizes = np.array([len(s.train) + len(s.test) for s in splits])
    shares = np.array([s.truth["share"] for s in splits])
    assert shares.sum() == pytest.approx(1.0, abs=1e-12) and sizes.sum() == 1000
    assert np.array_equal(sizes, _apportion(1000, shares))  # round(p_i n), largest remainder
    assert sizes.min() >= 10 and sizes.max() > 3 * sizes.min()  # skewed at beta 0.5
    again = partition.split(data, 8, seed=3)
    assert [s.truth for s in again] == [s.truth for s in splits]
    with pytest.raises(InputError, match="quantity skew Dir\\(beta=0.05\\) gave some .* fewer than"):
        QuantitySkew(beta=0.05, min_partition_size=100, max_draws=3).split(data, 8, seed=0)
    run(compose_cfg(*TINY, "partition=quantity_skew", "partition.min_partition_size=5"), run_dir=tmp_path)
    recorded = json.loads((tmp_path / "partition.json").read_text())["clients"]
    assert [c["train_size"] + c["test_size"] for c in recorded] == _apportion(
        300 - 30, np.array([c["truth"]["share"] for c in recorded])).tolist()  # dataset.limit 300, a tenth is test


def test_concept_shift_permutes_each_groups_labels_exactly(compose_cfg):
    world = build_world(compose_cfg(*TINY, "partition=concept_shift", "fl.num_clients=4"))
    data = world.run_data()
    raw_train, raw_test = world.data.encoded("train"), world.data.encoded("test")
    assert world.parts.partition.group_of(4) == [0, 0, 1, 1]
    for i, (split, viewed) in enumerate(zip(world.splits, data.splits)):
        flip = i >= 2  # two classes: group 1 flips them
        assert split.view == (View(label_map=(1, 0)) if flip else None) and split.truth["group"] == int(flip)
        for raw_rows, rows in ((split.train, viewed.train), (split.test, viewed.test)):
            assert len(rows) == len(raw_rows)
            for r, v in zip(raw_rows, rows):
                assert data.train[v][0] == raw_train[r][0]  # the same input ...
                assert data.train[v][1] == (1 - raw_train[r][1] if flip else raw_train[r][1])  # ... its group's label
    assert len(data.test_groups) == 2  # the global test set under each group's labels
    for g, rows in enumerate(data.test_groups):
        assert [data.test[v][1] for v in rows] == [(1 - y if g else y) for _, y in (raw_test[r] for r in range(len(raw_test)))]
    counts = [c["train_counts"] for c in label_counts(world.data.train, world.splits, 2)]
    for i, split in enumerate(world.splits):  # partition.json counts the labels the client sees
        y = np.asarray(world.data.train["label"][:])[split.train]
        assert counts[i] == np.bincount(1 - y if i >= 2 else y, minlength=2).tolist()


def test_concept_shift_default_shifts_and_explicit_permutations():
    data = labels(600, 3)
    shifted = ConceptShift(groups=3).split(data, 6, seed=0)
    assert [s.view.label_map if s.view else None for s in shifted] == [None, None, (1, 2, 0), (1, 2, 0), (2, 0, 1),
                                                                     (2, 0, 1)]
    own = ConceptShift(groups=2, permutations=[[2, 0, 1], [0, 1, 2]]).split(data, 4, seed=0)
    assert [s.view.label_map if s.view else None for s in own] == [(2, 0, 1), (2, 0, 1), None, None]
    with pytest.raises(InputError, match="groups=4 but 3 classes"):
        ConceptShift(groups=4).split(data, 4, seed=0)
    with pytest.raises(ConfigError, match=r"permutations\[1\]=\[0, 0\] is not a permutation"):
        ConceptShift(groups=2, permutations=[[1, 0], [0, 0]])


def test_feature_noise_levels_per_client_drawn_once_per_row():
    n, clients = 20, 4
    pixels = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8)
    from celora.data.batches import Pixels

    raw = Pixels(pixels, [0] * n)
    splits = FeatureNoise(sigma=0.4).split(labels(n, 1), clients, seed=5)
    viewed = Viewed(raw, [s.view or View() for s in splits])
    for i, s in enumerate(splits):
        std = 0.4 * i / clients
        assert (s.view is None) == (i == 0) and (s.truth.get("noise_std", 0.0) == pytest.approx(std))
        for r in range(n):
            x = viewed[viewed.rows(i, [r])[0]][0]
            if i == 0:
                assert torch.equal(x, pixels[r]) and x.dtype == torch.uint8  # client 0 sees its images as they are
                continue
            gen = torch.Generator().manual_seed(derive_seed(derive_seed(5, FEATURE_NOISE, i), FEATURE_NOISE, r))
            assert torch.equal(x, pixels[r].float() + 255.0 * std * torch.randn(pixels[r].shape, generator=gen))
            assert torch.equal(x, viewed[viewed.rows(i, [r])[0]][0])  # the same noise at every read
    other = Viewed(raw, [s.view or View() for s in FeatureNoise(sigma=0.4).split(labels(n, 1), clients, seed=6)])
    assert not torch.equal(viewed[viewed.rows(3, [0])[0]][0], other[other.rows(3, [0])[0]][0])  # seeded by the run


def test_rotation_groups_turn_each_groups_images_by_its_angle():
    pixels = torch.arange(2 * 1 * 3 * 3, dtype=torch.uint8).reshape(2, 1, 3, 3)
    from celora.data.batches import Pixels

    splits = RotationGroups(groups=4).split(labels(40, 1), 4, seed=0)
    assert [s.truth["group"] for s in splits] == [0, 1, 2, 3]
    viewed = Viewed(Pixels(pixels, [0, 0]), [s.view or View() for s in splits])
    for g, angle in enumerate((0, 90, 180, 270)):
        assert (splits[g].view.angle if splits[g].view else 0) == angle
        assert torch.equal(viewed[viewed.rows(g, [1])[0]][0], torch.rot90(pixels[1], angle // 90, dims=(-2, -1)))
    with pytest.raises(ConfigError, match="not multiples of 90"):
        RotationGroups(groups=2, angles=[0, 45])
    with pytest.raises(ConfigError, match="groups=3 has no default angles"):
        RotationGroups(groups=3)


# -- composes where it applies, refused where it does not -------------------------------------------------
@pytest.mark.parametrize("overrides", [
    ["partition=quantity_skew", "partition.min_partition_size=5"],
    ["partition=concept_shift", "fl.num_clients=4", "method=celora", "simulation=parallel"],
    ["partition=concept_shift", "partition.alpha=1.0", "fl.num_clients=4", "client.val_fraction=0.2"],
    [*IMAGES, "partition=concept_shift", "fl.num_clients=4"],
    [*IMAGES, "partition=rotation_groups", "fl.num_clients=4", "method=fedsa_lora"],
    [*IMAGES, "partition=feature_noise", "partition.sigma=0.5", "simulation=parallel"],
    [*IMAGES, "partition=quantity_skew", "partition.min_partition_size=5"],
])
def test_every_new_partition_runs_with_the_data_it_supports(compose_cfg, tmp_path, overrides):
    summary = run(compose_cfg(*TINY, "fl.rounds=1", *overrides), run_dir=tmp_path)
    grouped = any(o in overrides for o in ("partition=concept_shift", "partition=rotation_groups"))
    last = summary["last"]
    assert ("global/acc_group0" in last and "global/acc_group1" in last) == grouped
    if last["global/acc"] is None:  # no one model (FedSA-LoRA's private B): no group's score either
        assert not grouped or last["global/acc_group0"] is None
    elif grouped and not any("val_fraction" in o for o in overrides):  # the test set under each group's view: the mean
        assert last["global/acc"] == pytest.approx((last["global/acc_group0"] + last["global/acc_group1"]) / 2,
                                                   abs=1e-12)


@pytest.mark.parametrize("overrides, message", [
    (["partition=feature_noise"], r"partition \(FeatureNoise\) adds noise to or rotates each client's images, but the "
                                  r"dataset .* gives token ids"),
    (["partition=rotation_groups", "fl.num_clients=4"], r"RotationGroups.*gives token ids"),
    (["model=tiny_llama", "dataset=instruct_mix", "task=instruct", "partition=concept_shift", "fl.num_clients=4",
      "dataset.limit=null"], r"permutes each group's class labels, but the dataset .* is answered in tokens"),
])
def test_a_partition_is_refused_where_it_does_not_apply(compose_cfg, overrides, message):
    with pytest.raises(InputError, match=message):
        build_world(compose_cfg(*TINY, *overrides))


def test_the_group_oracle_needs_latent_groups(compose_cfg):
    with pytest.raises(ConfigError, match=r"GroupOracle\) averages within the partition's true latent groups, but "
                                          r"partition \(Iid\) has none"):
        build(compose_cfg(*TINY, "method=group_oracle"))
    assert build(compose_cfg(*TINY, "method=group_oracle", "partition=concept_shift",
                             "fl.num_clients=4")).aggregator.groups == [0, 0, 1, 1]


# -- the group oracle is FedAvg on each group's clients alone -------------------------------------------
FP64 = [*TINY, "model.dropout=0", "model.dtype=fp64", "fl.wire_dtype=fp64", "fl.sample_fraction=1",
        "fl.num_clients=4", "partition=concept_shift", "fl.rounds=2"]


def test_the_group_oracle_equals_fedavg_run_separately_on_each_group(compose_cfg):
    world = build_world(compose_cfg(*FP64, "method=group_oracle"))
    oracle = world.simulation(progress=False)
    oracle.run()
    groups = world.parts.partition.group_of(4)
    for g in (0, 1):
        members = [i for i in range(4) if groups[i] == g]
        alone = build_world(compose_cfg(*FP64, "method=lora"))

        class GroupAlone(simulation.Simulation):  # every round samples the group's clients, with their own ids
            def sample(self):
                return list(members)

        sim = alone.simulation(cls=GroupAlone, progress=False)
        assert isinstance(sim.aggregator, FedAvg) and not isinstance(sim.aggregator, GroupOracle)
        sim.run()
        for i in members:  # exactly: the same uploads, the same example-weighted mean, in the same order
            mine = oracle.states.received(i)
            assert sorted(mine) == sorted(sim.global_state)
            assert all(torch.equal(mine[n], sim.global_state[n]) for n in mine), (g, i)
            assert mine[next(iter(mine))].dtype == torch.float64
    a, b = oracle.states.received(0), oracle.states.received(2)
    assert any(not torch.equal(a[n], b[n]) for n in a)  # the two groups' models differ
