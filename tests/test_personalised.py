"""CE-LoRA's server: gamma = 0 is FedAvg, rows on the simplex, the right inputs reach the solver, e2e bytes."""
import json

import pytest
import torch

from celora.fl.aggregators import FedAvg
from celora.fl.data_stats import DataStats
from celora.fl.personalised import CeLoRA
from celora.run import run
from conftest import TINY
from tolerance import simplex_sum_tol, spacing


def _uploads(k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ups = {i: {"x.lora_C": torch.randn(3, 3, generator=g), "head.weight": torch.randn(2, 3, generator=g)}
           for i in range(k)}
    received = {i: {n: torch.zeros_like(t) for n, t in s.items()} for i, s in ups.items()}
    sizes = {i: 10 * (i + 1) for i in range(k)}
    return ups, sizes, received


def _data_distance(k, seed=1):
    d = torch.rand(k, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    d = (d + d.T) / 2
    d.fill_diagonal_(0)
    return d


def _celora(data_distance, **kwargs) -> CeLoRA:
    """CeLoRA as prepare() leaves it: the data-space distances known (here given, not computed from stats)."""
    aggregator = CeLoRA(**kwargs)
    aggregator.data_distance = data_distance
    return aggregator


def test_gamma_zero_is_fedavg_for_every_client():
    ups, sizes, received = _uploads()
    fedavg = FedAvg()(ups, sizes).global_state
    out = _celora(_data_distance(4), gamma=0.0)(ups, sizes, received)
    for i in ups:
        for n in fedavg:
            # the weights are p itself; mix and FedAvg sum in another order in float64 (far inside a float32
            # spacing) and round back to float32: the same float or a neighbour
            assert torch.all((out.personal[i][n] - fedavg[n]).abs() <= spacing(fedavg[n]))
    assert all(torch.equal(out.global_state[n], fedavg[n]) for n in fedavg)


@pytest.mark.parametrize("solver", ["simplex", "softmax"])
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_weight_rows_are_on_the_simplex(solver, lam):
    ups, sizes, received = _uploads(6, seed=3)
    data = _data_distance(6)
    out = _celora(data, lam=lam, solver=solver, gamma=2.0, tau=0.2)(ups, sizes, received)
    w = out.weights
    assert w.shape == (6, 6) and out.ids == list(range(6))
    # inputs p - gamma / 2 D, D mixing the data distances and parameter distances in [0, 1]
    magnitude = 0.0 if solver == "softmax" else 1 + 2.0 / 2 * max(float(data.max()), 1.0)
    assert (w >= 0).all() and ((w.sum(1) - 1).abs() <= simplex_sum_tol(6, magnitude)).all()


def test_large_gamma_with_data_only_keeps_each_client_to_its_nearest():
    ups, sizes, received = _uploads(4)
    d = torch.tensor([[0, .1, 1, 1], [.1, 0, 1, 1], [1, 1, 0, .1], [1, 1, .1, 0]], dtype=torch.float64)
    w = _celora(d, lam=1.0, gamma=10.0)(ups, sizes, received).weights
    assert w[:2, 2:].sum() == 0 and w[2:, :2].sum() == 0


def test_param_space_update_vs_weights_uses_received():
    ups, sizes, _ = _uploads(3)
    shifted = {i: {n: t + 5.0 for n, t in s.items()} for i, s in ups.items()}  # received far from uploads
    a = CeLoRA(lam=0.0, gamma=1.0, param_space="update")(ups, sizes, shifted).weights
    b = CeLoRA(lam=0.0, gamma=1.0, param_space="weights")(ups, sizes, shifted).weights
    assert not torch.allclose(a, b)


def test_lam_zero_needs_no_data_stats_and_bad_values_are_named():
    assert CeLoRA(lam=0.0).data_stats is None and CeLoRA(lam=0.5).data_stats is not None
    for kwargs, msg in [({"lam": 1.5}, "aggregator.lam"), ({"solver": "qp"}, "aggregator.solver"),
                        ({"param_space": "grad"}, "aggregator.param_space"), ({"tau": 0}, "aggregator.tau")]:
        with pytest.raises(ValueError, match=msg):
            CeLoRA(**kwargs)
    with pytest.raises(ValueError, match="kind=gaussian only"):
        DataStats(kind="gmm", dp_epsilon=1.0)


@pytest.mark.parametrize("extra", [[], ["aggregator.data_stats.kind=gmm"], ["aggregator.data_stats.dp_epsilon=1.0"]])
def test_celora_run_counts_data_stats_and_personal_downlink(compose_cfg, tmp_path, extra):
    cfg = compose_cfg(*TINY, "method=celora", *extra)
    run(cfg, run_dir=tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    d, classes, clients = 64, 2, 3
    if "aggregator.data_stats.kind=gmm" in extra:  # up to 2 components per class
        assert 0 < rows[0]["comm/up_bytes"] <= clients * 2 * classes * (1 + 2 * d) * 4
    else:  # count, mean, variance per class, fp32
        assert rows[0]["comm/up_bytes"] == clients * classes * (1 + 2 * d) * 4
    assert ("privacy/stats_sigma" in rows[0]) == bool(extra and "dp_epsilon" in extra[0])
    shared = 4 * 8 * 8 + 64 * 2 + 2  # C on 4 modules + the shared head
    for row in rows[1:]:
        assert row["comm/up_bytes"] == row["comm/down_bytes"] == clients * shared * 4
    weights = [json.loads(line) for line in (tmp_path / "weights.jsonl").read_text().splitlines()]
    assert [w["round"] for w in weights] == [1, 2]
    # data distances normalised to at most 1, parameter distances in [0, 1]; JSON keeps float64 exactly
    magnitude = 1 + cfg.aggregator.gamma / 2
    for w in weights:
        m = torch.tensor(w["matrix"], dtype=torch.float64)
        assert ((m.sum(1) - 1).abs() <= simplex_sum_tol(3, magnitude)).all()
    dd = json.loads((tmp_path / "data_distance.jsonl").read_text())
    assert torch.tensor(dd["matrix"]).max() == 1.0


def test_grouped_clients_weight_their_own_group(compose_cfg, tmp_path):
    """Two clearly different groups (90% positive vs 90% negative): each client's weight stays inside."""
    cfg = compose_cfg(*TINY, "method=celora", "partition=grouped", "partition.skew=0.95", "fl.num_clients=6",
                      "dataset.limit=480", "fl.rounds=3", "fl.eval_every=3")
    run(cfg, run_dir=tmp_path)
    groups = json.loads((tmp_path / "partition.json").read_text())["groups"]
    assert groups == [0, 0, 0, 1, 1, 1]
    for line in (tmp_path / "weights.jsonl").read_text().splitlines():
        rec = json.loads(line)
        ids, w = rec["clients"], torch.tensor(rec["matrix"])
        for row, i in enumerate(ids):
            own = sum(w[row, col] for col, j in enumerate(ids) if groups[j] == groups[i])
            assert own >= 0.8, (rec["round"], i, w[row])
