"""Property tests: partitioners place every example exactly once; aggregation weights live on the simplex."""
import datasets
import numpy as np
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from celora.data.partition import Dirichlet, Grouped, Iid, Natural, Pathological
from celora.fl.aggregators import FedAvg, weighted_average
from celora.fl.faults import outliers
from celora.fl.personalised import CeLoRA
from celora.similarity import project_simplex, simplex_weights, softmax_weights
from tolerance import simplex_sum_tol, spacing

FEW = settings(max_examples=20, deadline=None)


def _dataset(n: int, classes: int, seed: int, ids: int = 5) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(classes), rng.integers(0, classes, n - classes)])  # every class present
    return datasets.Dataset.from_dict({"label": rng.permutation(labels).tolist(),
                                       "movie": rng.integers(0, ids, n).tolist()})


PARTITIONS = {
    "iid": st.just(Iid()),
    "dirichlet": st.builds(Dirichlet, alpha=st.floats(0.05, 10), min_partition_size=st.integers(0, 4),
                           local_test_fraction=st.sampled_from([0.0, 0.2, 0.5])),
    "pathological": st.builds(Pathological, classes_per_client=st.integers(1, 3)),
    "natural": st.just(Natural(column="movie")),
    "grouped": st.builds(Grouped, groups=st.just(2), skew=st.floats(0, 1)),
}


@pytest.mark.parametrize("kind", sorted(PARTITIONS))
@FEW
@given(data=st.data(), n=st.integers(12, 300), classes=st.integers(2, 4), clients=st.integers(1, 6),
       seed=st.integers(0, 2**31 - 1))
def test_every_example_is_placed_exactly_once(kind, data, n, classes, clients, seed):
    partition = data.draw(PARTITIONS[kind])
    if kind == "grouped":
        clients = 2 * max(1, clients // 2)  # the groups share the clients evenly
    ds = _dataset(n, classes, seed, ids=max(clients, 5))
    try:
        splits = partition.split(ds, clients, seed)
    except ValueError as e:  # a split that cannot be made must say why and what to change
        event("refused: " + type(partition).__name__)
        assert "use " in str(e) or "must" in str(e), str(e)
        return
    placed = np.concatenate([np.concatenate([s.train, s.test]) for s in splits])
    assert len(splits) == clients
    assert np.array_equal(np.sort(placed), np.arange(n))  # each index once: none lost, none twice
    assert all(len(s.train) >= 1 for s in splits)


@FEW
@given(k=st.integers(1, 6), shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), seed=st.integers(0, 10**6),
       sizes=st.lists(st.integers(1, 10**4), min_size=6, max_size=6), scale=st.floats(1e-3, 1e3))
def test_fedavg_of_identical_inputs_is_the_input(k, shape, seed, sizes, scale):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale
    uploads = {i: {"w": x.clone()} for i in range(k)}
    out = FedAvg()(uploads, {i: sizes[i] for i in range(k)}).global_state["w"]
    assert torch.equal(out, x)


@FEW
@given(k=st.integers(1, 6), seed=st.integers(0, 10**6), sizes=st.lists(st.integers(1, 10**4), min_size=6, max_size=6))
def test_weighted_average_is_a_convex_combination(k, seed, sizes):
    g = torch.Generator().manual_seed(seed)
    states = [{"w": torch.randn(5, generator=g)} for _ in range(k)]
    out = weighted_average(states, sizes[:k])["w"]
    stacked = torch.stack([s["w"] for s in states])
    # accumulated in float64 (within gamma(k + 1) max|x| of the exact convex combination), then rounded
    # to float32: within one float32 spacing of max|x| of [min, max]
    slack = spacing(stacked.abs().max(0).values)
    assert (out >= stacked.min(0).values - slack).all() and (out <= stacked.max(0).values + slack).all()


def _inputs(k, seed):
    g = torch.Generator().manual_seed(seed)
    d = torch.rand(k, k, generator=g, dtype=torch.float64)
    d = ((d + d.T) / 2).fill_diagonal_(0)
    p = torch.rand(k, generator=g, dtype=torch.float64) + 1e-3
    return d, p / p.sum()


def _on_simplex(w, magnitude):
    """Non-negative rows summing to 1 within the rounding of weights from inputs of size <= magnitude."""
    return bool((w >= 0).all()) and bool(((w.sum(-1) - 1).abs() <= simplex_sum_tol(w.shape[-1], magnitude)).all())


@FEW
@given(k=st.integers(1, 8), seed=st.integers(0, 10**6), gamma=st.floats(0, 100), tau=st.floats(1e-3, 10))
def test_weight_rows_are_on_the_simplex(k, seed, gamma, tau):
    d, p = _inputs(k, seed)
    assert _on_simplex(simplex_weights(d, p, gamma), 1 + gamma / 2)  # inputs p - gamma / 2 D, D in [0, 1]
    assert _on_simplex(softmax_weights(d, p, tau), 0.0)


@FEW
@given(v=st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=10))
def test_projection_lands_on_the_simplex_and_stays(v):
    w = project_simplex(torch.tensor([v], dtype=torch.float64))
    assert _on_simplex(w, max(abs(x) for x in v))
    # w sums to 1 only to its rounding, so projecting again moves it by that plus the projection's rounding
    assert torch.all((project_simplex(w) - w).abs() <= (w.sum() - 1).abs() + simplex_sum_tol(len(v), 1.0))


@FEW
@given(k=st.integers(1, 5), seed=st.integers(0, 10**6), solver=st.sampled_from(["simplex", "softmax"]),
       lam=st.floats(0, 1), gamma=st.floats(0, 10))
def test_personalised_mix_of_identical_uploads_is_the_upload(k, seed, solver, lam, gamma):
    d, _ = _inputs(k, seed)
    c = torch.randn(3, 3, generator=torch.Generator().manual_seed(seed))
    uploads = {i: {"m.lora_C": c.clone()} for i in range(k)}
    received = {i: {"m.lora_C": torch.zeros(3, 3)} for i in range(k)}
    aggregator = CeLoRA(lam=lam, solver=solver, gamma=gamma)
    aggregator.data_distance = d  # as prepare() leaves it
    result = aggregator(uploads, {i: i + 1 for i in range(k)}, received)
    assert _on_simplex(result.weights, 1 + gamma / 2)  # D mixes distances in [0, 1]
    for state in result.personal.values():
        # sum_j w_ij c in float64 is c times a row sum within simplex_sum_tol + gamma(k) of 1 (far inside a
        # float32 spacing), rounded back to float32: c itself or a neighbour
        assert torch.all((state["m.lora_C"] - c).abs() <= spacing(c))


@FEW
@given(norms=st.dictionaries(st.integers(0, 20), st.floats(0, 1e6), min_size=1, max_size=10),
       ratio=st.floats(1.01, 100))
def test_outliers_are_a_minority_above_the_median(norms, ratio):
    out = outliers(norms, ratio)
    median = float(np.median(list(norms.values())))
    assert all(norms[i] > ratio * median for i in out)
    assert len(out) < len(norms) / 2 + 1  # never the majority: the median itself is never rejected
