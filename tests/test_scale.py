"""Many clients: vectorized server work equals its loop, sampled personal evaluation, idle clients cost their tensors."""
import json
import math
import sys

import numpy as np
import pytest
import torch

from celora.fl.aggregators import weighted_average
from celora.fl.config import FLConfig
from celora.fl.simulation import Simulation
from celora.fl.wire import Payload
from celora.run import run
from celora.similarity import ClassStats, log_expected_kernel, median_bandwidth, mmd2_mixtures, mmd2_table
from conftest import TINY
from tolerance import gamma

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def _stats(g, components, dim, absent=()):
    counts = torch.randint(1, 40, (components,), generator=g).double()
    counts[list(absent)] = 0.0
    return ClassStats(counts, torch.randn(components, dim, generator=g, dtype=F64) * 2,
                      torch.rand(components, dim, generator=g, dtype=F64) + 0.05)


def test_mmd_table_equals_the_pairwise_loop():
    """The tensor table against mmd2_mixtures pair by pair (the loop it replaced), clients with different
    numbers of components (GMMs) and absent classes. Each expected kernel E is exp of a logsumexp of M^2
    terms, each a log weight pair plus a sum of 2d non-negative terms (log1p and the quadratic form), so
    two evaluations of log E differ by at most 2 gamma(2d + M^2 + 4) L, L the largest sum of absolute
    values of those terms; E itself relatively by that much, and MMD^2 = E_ii + E_jj - 2 E_ij absolutely
    by it times E_ii + E_jj + 2 E_ij."""
    g = torch.Generator().manual_seed(3)
    dim = 16
    stats = [_stats(g, m, dim, absent=[0] if i % 3 == 0 else []) for i, m in enumerate([2, 3, 1, 4, 2, 3, 4])]
    length = median_bandwidth(stats)
    table = mmd2_table(stats, length)
    k, m = len(stats), 4
    ref = torch.tensor([[mmd2_mixtures(a, b, length) for b in stats] for a in stats], dtype=F64)
    expected = torch.tensor([[_expected(a, b, length) for b in stats] for a in stats], dtype=F64)
    log_terms = max(_largest_log_terms(a, b, length) for a in stats for b in stats)
    rel = 2 * gamma(2 * dim + m * m + 4, F64) * log_terms
    own = expected.diagonal()
    tol = rel * (own[:, None] + own[None] + 2 * expected)
    assert table.shape == (k, k) and torch.equal(table, table.T) and torch.all(table.diagonal() == 0)
    assert torch.all((table - ref).abs() <= tol), ((table - ref).abs() / tol).max()
    assert ref.max() > 100 * tol.max()  # the distances are far from the rounding they are compared at


def _expected(a, b, length):
    lk = log_expected_kernel(a.means[:, None], a.vars[:, None], b.means[None], b.vars[None], length)
    wa, wb = a.counts / a.counts.sum(), b.counts / b.counts.sum()
    return float((wa[:, None] * wb[None] * lk.exp()).sum())


def _largest_log_terms(a, b, length):
    lk = log_expected_kernel(a.means[:, None], a.vars[:, None], b.means[None], b.vars[None], length)
    present = (a.counts > 0)[:, None] & (b.counts > 0)[None]
    lw = (a.counts / a.counts.sum()).log()[:, None] + (b.counts / b.counts.sum()).log()[None]
    return float((lw.abs() - lk)[present].max())  # -lk: the sum of its non-negative terms, halved


def test_weighted_average_equals_the_loop():
    """One contraction over the stacked states against the per-client sum it replaced, in float64: each an
    n-term sum in its own order, within gamma(n) sum_k |w_k x_k| of the exact, so of each other by twice."""
    g = torch.Generator().manual_seed(4)
    states = [{"a": torch.randn(5, 3, generator=g, dtype=F64), "b": torch.randn(7, generator=g, dtype=F64)}
              for _ in range(9)]
    sizes = [int(x) for x in torch.randint(1, 100, (9,), generator=g)]
    ours = weighted_average(states, sizes)
    w = torch.tensor(sizes, dtype=F64) / sum(sizes)
    for key in states[0]:
        loop = sum(wk * s[key] for wk, s in zip(w, states))
        bound = 2 * gamma(len(states) + 1, F64) * sum(wk * s[key].abs() for wk, s in zip(w, states))
        assert ours[key].dtype == F64 and torch.all((ours[key] - loop).abs() <= bound)
    half = weighted_average([{k: v.float() for k, v in s.items()} for s in states], sizes)
    assert all(t.dtype == torch.float32 for t in half.values())


def test_eval_clients_are_drawn_once_from_their_own_stream():
    fl = FLConfig(num_clients=50, eval_clients=7)
    chosen = fl.evaluated(seed=0)
    assert chosen == fl.evaluated(seed=0) == sorted(set(chosen)) and len(chosen) == 7
    assert chosen != FLConfig(num_clients=50, eval_clients=7).evaluated(seed=1)
    assert FLConfig(num_clients=5, eval_clients="all").evaluated(0) == list(range(5))
    for bad, message in ((0, "positive number"), ("some", "positive number"), (True, "positive number"),
                         (51, "more than fl.num_clients=50")):
        with pytest.raises(ValueError, match=message):
            FLConfig(num_clients=50, eval_clients=bad)


def test_sampled_personal_evaluation_changes_no_training_number(compose_cfg, tmp_path, monkeypatch):
    """fl.eval_clients=3 of 6: the same 3 clients at every evaluation, the count in every row and the
    summary, and every number of training (losses, global metrics, bytes) the same as evaluating all 6."""
    evaluated = []
    original = Simulation.personal_state

    def recording(sim, i):
        evaluated.append(i)
        return original(sim, i)

    monkeypatch.setattr(Simulation, "personal_state", recording)
    common = (*TINY, "fl.num_clients=6", "fl.sample_fraction=0.5", "aggregator=celora")
    full = run(compose_cfg(*common), run_dir=tmp_path / "all")
    all_ids, evaluated[:] = list(evaluated), []
    part = run(compose_cfg(*common, "fl.eval_clients=3"), run_dir=tmp_path / "three")
    chosen = FLConfig(num_clients=6, eval_clients=3).evaluated(0)
    assert all_ids == list(range(6)) * 3
    assert evaluated == chosen * 3  # rounds 0, 1, 2: the same clients each time
    assert part["last"]["personal/clients"] == 3 and full["last"]["personal/clients"] == 6
    for a, b in zip(_rows(tmp_path / "all"), _rows(tmp_path / "three")):
        for key in a:
            if key.startswith(("train/", "global/", "comm/", "fl/")) and not key.endswith("per_s"):
                assert a[key] == b[key], (a["round"], key)
        assert b["personal/acc_by_client"] == [a["personal/acc_by_client"][i] for i in chosen]


def _footprint(obj, seen: set) -> int:
    """Bytes reachable from obj: Python objects by sys.getsizeof, tensors and arrays by their storage,
    each counted once; modules (the shared backbone) and the data are not the clients' and are skipped."""
    from torch import nn

    from celora.data.batches import Encoded

    if id(obj) in seen or isinstance(obj, (nn.Module, Encoded, type)) or callable(obj) and not hasattr(obj, "__dict__"):
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        key = ("storage", obj.untyped_storage().data_ptr())
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, np.ndarray):
        return obj.nbytes + sys.getsizeof(obj) if obj.base is None else _footprint(obj.base, seen)
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        return size + sum(_footprint(k, seen) + _footprint(v, seen) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set)):
        return size + sum(_footprint(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return size + _footprint(vars(obj), seen)
    return size


def _own_bytes(sim: Simulation) -> float:
    """The mean bytes of a client's own state: its train and test row indices and its private tensors."""
    seen: set = set()
    total = sum(_footprint(c.train, seen) + _footprint(c.test, seen) for c in sim.clients)
    total += sum(_footprint(t, seen) for private in sim.states.private for t in private.values())
    return total / len(sim.clients)


def test_an_idle_client_costs_its_own_tensors_and_a_small_constant(compose_cfg, tmp_path, monkeypatch):
    """The simulation's memory beyond the backbone and the data, at 40 and at 400 clients (fedsa_lora: a
    private B per client, 4 trained a round): per extra client at most its own row indices and tensors plus
    1 KiB of Python objects; no per-client loader, optimiser, copy of the data or of the backbone."""
    sizes, own = {}, {}
    original = Simulation.run

    def measure(sim, *args, **kwargs):
        out = original(sim, *args, **kwargs)
        n = len(sim.clients)
        sizes[n], own[n] = _footprint(sim, set()), _own_bytes(sim)
        return out

    monkeypatch.setattr(Simulation, "run", measure)
    for n in (40, 400):
        run(compose_cfg(*TINY, "adapter=fedsa_lora", f"fl.num_clients={n}", f"fl.sample_fraction={4 / n}",
                        "dataset.limit=1200", "fl.rounds=1", "fl.eval_clients=4"), run_dir=tmp_path / str(n))
    per_client = (sizes[400] - sizes[40]) / 360
    assert per_client <= own[400] + 1024, (per_client, own)  # measured: 568 bytes against 370 + 1024


def test_a_round_touches_only_its_sampled_clients(compose_cfg, tmp_path, monkeypatch):
    """What a round sends (and so trains and aggregates) is the sampled clients' only: 2 payloads (down and
    up) per sampled client, whether there are 20 clients or 200."""
    packed = []
    original = Payload.pack.__func__

    def counting(cls, *args, **kwargs):
        packed.append(1)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(Payload, "pack", classmethod(counting))
    counts = {}
    for n in (20, 200):
        packed.clear()
        run(compose_cfg(*TINY, f"fl.num_clients={n}", f"fl.sample_fraction={5 / n}", "dataset.limit=1000",
                        "fl.rounds=2", "fl.eval_clients=5"), run_dir=tmp_path / str(n))
        counts[n] = len(packed)
    assert counts[20] == counts[200] == 2 * 5 * 2


def test_a_thousand_clients_ten_a_round(compose_cfg, tmp_path):
    """tiny_bert on 1,000 IID clients of the whole training split (8 or 9 reviews each), 10 a round, 50 of
    them evaluated: it runs, and its rows say so."""
    summary = run(compose_cfg(*TINY, "fl.num_clients=1000", "fl.sample_fraction=0.01", "dataset.limit=null",
                              "fl.eval_clients=50", "fl.rounds=1"), run_dir=tmp_path)
    rows = _rows(tmp_path)
    assert [r["fl/clients"] for r in rows] == [0, 10]
    assert summary["last"]["personal/clients"] == 50 and len(summary["last"]["personal/acc_by_client"]) == 50
    assert all(math.isfinite(r["personal/acc"]) and r["time/eval_s"] > 0 for r in rows)
    assert rows[1]["time/train_s"] > 0 and rows[1]["time/server_s"] >= 0
