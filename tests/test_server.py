"""Server optimizers (server.*) and FedProx (client.prox_mu): hand computations, FedAvg as their special case, bad values."""
import json
import math

import pytest
import torch
from torch import nn

from celora.errors import ConfigError
from celora.fl import simulation
from celora.fl.aggregators import FedAvg
from celora.fl.client import LocalTraining
from celora.fl.personalised import CeLoRA
from celora.fl.server_opt import GLOBAL, ServerOptimizer, server_step
from celora.fl.states import ModelStates
from celora.run import run
from celora.validate import build
from conftest import TINY
from tolerance import DEEP, deep_equal, gamma, unit_roundoff

pytestmark = pytest.mark.usefixtures("one_thread")

# fp64 and every dropout off: two runs that differ only in rounding agree to DEEP roundings (tests/tolerance.py)
FP64 = [*TINY, "model.dropout=0", "model.dtype=fp64", "fl.wire_dtype=fp64", "fl.sample_fraction=0.67"]


# -- the rules, by hand ----------------------------------------------------------------------------
def _hand(rule: str, deltas: list[float], eta: float, b1: float, b2: float, tau: float, x: float = 0.0) -> float:
    """One coordinate through Reddi et al.'s Algorithm 2 (and FedAvgM, server SGD), written out in plain floats."""
    m, v = 0.0, tau * tau
    for d in deltas:
        if rule == "sgd":
            x = x + eta * d
            continue
        if rule == "momentum":
            m = b1 * m + d
            x = x + eta * m
            continue
        m = b1 * m + (1 - b1) * d
        if rule == "adagrad":
            v = v + d * d
        elif rule == "adam":
            v = b2 * v + (1 - b2) * d * d
        else:
            v = v - (1 - b2) * d * d * math.copysign(1.0, v - d * d) if v != d * d else v
        x = x + eta * m / (math.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("rule", ["sgd", "momentum", "adagrad", "adam", "yogi"])
def test_two_rounds_equal_a_hand_computation_on_constructed_uploads(rule):
    opt = ServerOptimizer(rule, eta=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    states = ModelStates({"c": torch.zeros(3, dtype=torch.float64)}, {}, owner=[0, 1])
    aggregate = FedAvg()
    # round 1: client 0 (1 example) and client 1 (3 examples) upload; FedAvg's mean is the pseudo-gradient
    rounds = [({0: [0.1, -0.2, 0.0], 1: [0.3, 0.2, 1e-5]}, {0: 1, 1: 3}),
              ({0: [-0.4, 0.1, 0.0], 1: [0.0, 0.5, -2e-5]}, {0: 2, 1: 2})]
    moments, deltas = {}, [[], [], []]
    for uploads, sizes in rounds:
        sent = {i: dict(states.global_state) for i in uploads}
        base = states.global_state["c"].tolist()
        # what each client uploads: what it was sent plus its own update
        ups = {i: {"c": states.global_state["c"] + torch.tensor(u, dtype=torch.float64)} for i, u in uploads.items()}
        result, moments = server_step(opt, aggregate(ups, sizes, sent), states, sent, moments)
        for k in range(3):
            mean = sum(sizes[i] * (base[k] + uploads[i][k]) for i in uploads) / sum(sizes.values())
            deltas[k].append(mean - base[k])
        states.aggregated(result.global_state, result.personal)
    got = states.global_state["c"]
    for k in range(3):
        want = _hand(rule, deltas[k], 0.1, 0.9, 0.99, 1e-3)
        # the same fp64 formulas in another order: under 64 roundings of terms no larger than 100 (the deltas are
        # below 1, m / (sqrt(v) + tau) below 1 / sqrt(1 - beta2) = 10, eta 0.1)
        assert abs(float(got[k]) - want) <= gamma(64, torch.float64) * 100, (rule, k, float(got[k]), want)
    assert (rule in ("sgd",)) == (moments[GLOBAL] == {})
    if rule in ("adagrad", "adam", "yogi"):
        assert set(moments[GLOBAL]) == {"m", "v"} and moments[GLOBAL]["v"]["c"].dtype == torch.float64


def test_the_adaptive_rules_differ_where_they_should():
    """Adam and Yogi differ from round 2 (v's update), adagrad's v only grows: the hand rules are not all one."""
    deltas = [0.02, -0.05, 0.01]
    values = {r: _hand(r, deltas, 0.1, 0.9, 0.99, 1e-3) for r in ("adagrad", "adam", "yogi")}
    assert len({round(v, 12) for v in values.values()}) == 3


def test_sgd_at_rate_one_is_fedavg_within_one_rounding():
    opt = ServerOptimizer("sgd", eta=1.0)
    x = {"c": torch.randn(200, generator=torch.Generator().manual_seed(0))}
    avg = {"c": x["c"] + 1e-3 * torch.randn(200, generator=torch.Generator().manual_seed(1))}
    states = ModelStates(x, {}, owner=[0])
    result, _ = server_step(opt, FedAvg()({0: avg}, {0: 1}), states, {0: x}, {})
    # fp64 x + (a - x), stored in fp32: within one fp32 spacing of a, not always a itself
    diff = (result.global_state["c"] - avg["c"]).abs()
    assert float(diff.max()) <= float((avg["c"].abs() * 2 * unit_roundoff(torch.float32)).max()) + 1e-12


def test_celora_keeps_one_stream_per_mixed_client_and_sgd_one_is_its_mix():
    torch.manual_seed(0)
    shared = {"c": torch.zeros(4, dtype=torch.float64)}
    states = ModelStates(shared, {}, owner=[0, 1, 2])
    agg = CeLoRA(lam=0.0, gamma=1.0)
    uploads = {i: {"c": torch.randn(4, dtype=torch.float64)} for i in (0, 2)}
    sent = {i: dict(shared) for i in (0, 2)}
    plain = agg(uploads, {0: 5, 2: 7}, sent)
    stepped, moments = server_step(ServerOptimizer("sgd", eta=1.0), plain, states, sent, {})
    for i in (0, 2):  # x_i + (mix_i - sent_i) with x_i = sent_i = 0: the mix itself
        assert torch.allclose(stepped.personal[i]["c"], plain.personal[i]["c"], rtol=4 * unit_roundoff(torch.float64),
                              atol=0)
    _, moments = server_step(ServerOptimizer("adam"), plain, states, sent, {})
    assert sorted(moments, key=str) == [0, 2, GLOBAL]  # client 1 was not mixed: no stream yet
    assert not torch.equal(moments[0]["m"]["c"], moments[2]["m"]["c"])


# -- in a run: FedAvg as the special case, its own path untouched ------------------------------------
def _rows(path):
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
            for line in (path / "metrics.jsonl").read_text().splitlines()]


def _final_global(monkeypatch):
    """Captures every run's server state at its end (the global tensors)."""
    kept = []
    original = simulation.Simulation.run

    def recording(self, *args, **kwargs):
        rows = original(self, *args, **kwargs)
        kept.append({n: t.clone() for n, t in self.global_state.items()})
        return rows

    monkeypatch.setattr(simulation.Simulation, "run", recording)
    return kept


def test_momentum_with_beta_0_and_rate_1_is_fedavg_whose_own_path_is_untouched(compose_cfg, tmp_path, monkeypatch):
    kept = _final_global(monkeypatch)
    with monkeypatch.context() as m:  # FedAvg (server=none) never reaches the server optimizer
        m.setattr(simulation, "server_step", lambda *a, **k: pytest.fail("server=none called the server optimizer"))
        run(compose_cfg(*FP64), run_dir=tmp_path / "fedavg")
    run(compose_cfg(*FP64, "server=momentum", "server.beta1=0", "server.eta=1"), run_dir=tmp_path / "momentum")
    a, b = _rows(tmp_path / "fedavg"), _rows(tmp_path / "momentum")
    assert [r["round"] for r in a] == [r["round"] for r in b] == [0, 1, 2]
    for x, y in zip(a, b):
        for key in x:
            assert deep_equal(x[key], y[key]), (x["round"], key, x[key], y[key])
    for name, t in kept[0].items():  # w + (m - w) is not m, but within DEEP roundings of it after two rounds
        assert (kept[1][name] - t).norm() <= DEEP * unit_roundoff(torch.float64) * t.norm(), name


def test_a_server_rate_other_than_one_changes_the_run(compose_cfg, tmp_path):
    run(compose_cfg(*TINY), run_dir=tmp_path / "a")
    run(compose_cfg(*TINY, "server=sgd", "server.eta=0.5"), run_dir=tmp_path / "b")
    assert _rows(tmp_path / "a")[-1]["global/loss"] != _rows(tmp_path / "b")[-1]["global/loss"]
    assert _rows(tmp_path / "a")[-1]["comm/up_bytes_cum"] == _rows(tmp_path / "b")[-1]["comm/up_bytes_cum"]


# -- FedProx ----------------------------------------------------------------------------------------
def _uploads(monkeypatch):
    seen = []
    original = FedAvg.__call__

    def recording(self, uploads, sizes, received=None):
        seen.append({i: {n: t.clone() for n, t in s.items()} for i, s in uploads.items()})
        return original(self, uploads, sizes, received)

    monkeypatch.setattr(FedAvg, "__call__", recording)
    return seen


def test_prox_mu_0_is_fedavg_exactly_and_a_positive_mu_is_not(compose_cfg, tmp_path, monkeypatch):
    seen = _uploads(monkeypatch)
    run(compose_cfg(*TINY, "method=lora"), run_dir=tmp_path / "fedavg")
    plain = list(seen)
    seen.clear()
    run(compose_cfg(*TINY, "method=lora_fedprox", "client.prox_mu=0"), run_dir=tmp_path / "mu0")
    zero = list(seen)
    seen.clear()
    run(compose_cfg(*TINY, "method=lora_fedprox", "client.prox_mu=5"), run_dir=tmp_path / "mu5")
    assert _rows(tmp_path / "fedavg") == _rows(tmp_path / "mu0")
    for a, b, c in zip(plain, zero, seen):
        for i in a:
            assert all(torch.equal(a[i][n], b[i][n]) for n in a[i])
    moved = lambda ups: sum(float(t.norm()) for u in ups[1:] for s in u.values() for t in s.values())  # noqa: E731
    assert moved(seen) != moved(plain)


def test_the_proximal_term_is_half_mu_times_the_squared_distance_per_client():
    model = nn.Module()
    model.w = nn.Parameter(torch.zeros(2, 3, 4, dtype=torch.float64))  # stacked: 2 clients
    model.b = nn.Parameter(torch.zeros(2, 4, dtype=torch.float64))
    module = LocalTraining(model, ["w", "b"], task=None, optimizer=None, steps=[3, 1], prox_mu=0.5, anchored=["w"])
    anchor = torch.randn(2, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        model.w.copy_(anchor + torch.arange(24, dtype=torch.float64).reshape(2, 3, 4) / 10)
        model.b.copy_(torch.ones(2, 4))
    module.anchors = [(model.w, anchor)]  # as fit() sets them: each client's own slice of what it received
    prox = module.proximal()
    want = [0.25 * float(((model.w[k] - anchor[k]) ** 2).sum().detach()) for k in range(2)]
    assert prox.tolist() == pytest.approx(want, rel=gamma(12, torch.float64))
    prox.sum().backward()  # its gradient is mu (w - w0), each client's own; the unanchored b gets none
    assert torch.allclose(model.w.grad, 0.5 * (model.w - anchor).detach(), rtol=4 * unit_roundoff(torch.float64),
                          atol=0)
    assert model.b.grad is None
    assert LocalTraining(model, ["w"], None, None, prox_mu=0.0, anchored=["w"]).anchored == []  # mu = 0: no term


# -- bad values --------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["server=adam", "server.tau=0"], r"server.tau=0 must be a number > 0"),
    (["server=adam", "server.tau=-1e-3"], r"server.tau=-0.001 must be a number > 0"),
    (["server=yogi", "server.beta1=1"], r"server.beta1=1 must be a number in \[0, 1\)"),
    (["server=adam", "server.beta2=1.5"], r"server.beta2=1.5 must be a number in \[0, 1\)"),
    (["server=sgd", "server.eta=0"], r"server.eta=0 must be a number > 0"),
    (["server.optimizer=adamw"], r"server.optimizer='adamw' must be one of sgd, momentum, adagrad, adam, yogi"),
    (["method=local", "server=adam"], r"server.optimizer=adam steps the server's model .* aggregator \(Local\) has "
                                      r"no server .* use server=none"),
    (["method=centralized", "server=momentum"], r"aggregator \(Centralized\) has no server"),
    (["method=local", "client.prox_mu=0.01"], r"client.prox_mu=0.01 \(FedProx\) .* use client.prox_mu=0"),
    (["client.prox_mu=-1"], r"client.prox_mu=-1 must be a number >= 0"),
])
def test_bad_values_are_refused_by_message(compose_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        build(compose_cfg(*TINY, *overrides))


def test_the_typed_class_refuses_what_a_config_file_cannot_say():
    with pytest.raises(ConfigError, match="server.beta1 must be in"):
        ServerOptimizer("adam", beta1=1.0)
    with pytest.raises(ConfigError, match="server.tau"):
        ServerOptimizer("adam", tau=0.0)
    with pytest.raises(ValueError, match="no step"):
        ServerOptimizer().step({}, {})
