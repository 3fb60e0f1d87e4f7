"""Parallel simulation equals sequential: metrics and exchanged tensors; per-client clipping and masking."""
import json

import pytest
import torch

from celora.fl import simulation
from celora.adapters import stacked
from celora.fl.client import clip_per_client, client_slices, restore_slices
from celora.run import run
from conftest import TINY
from tolerance import DEEP, assert_deep_close, deep_equal, gamma, unit_roundoff

# fp64 (see tests/tolerance.py: DEEP), every dropout off; 4 Dirichlet clients of uneven size, 3 of them a round (partial participation),
# at most 3 local steps but no more than 0.4 epochs, so small clients stop early and are masked.
EQUAL = [
    *TINY, "partition=dirichlet", "partition.alpha=0.5", "fl.num_clients=4", "fl.sample_fraction=0.75",
    "client.local_steps=3", "client.max_epochs=0.4", "model.dropout=0", "model.dtype=fp64", "fl.wire_dtype=fp64",
]
ADAPTERS = ["lora", "ffa_lora", "fedsa_lora", "tri"]
AGGREGATORS = ["fedavg", "celora"]


class Recorder:
    """Wraps an aggregator and keeps every round's uploads: the tensors that cross the wire."""

    def __init__(self, inner, uploads: list):
        self.inner, self.uploads = inner, uploads

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, uploads, sizes, received=None):
        self.uploads.append({i: {n: t.clone() for n, t in s.items()} for i, s in uploads.items()})
        return self.inner(uploads, sizes, received)


def _run(compose_cfg, tmp_path, monkeypatch, *overrides):
    recorded = {"uploads": [], "steps": []}
    original = simulation.Simulation.train_round

    def train_round(self, rnd):
        if not isinstance(self.aggregator, Recorder):
            self.aggregator = Recorder(self.aggregator, recorded["uploads"])
        recorded["steps"].append([self.local_steps(i) for i in range(len(self.trainers))])
        return original(self, rnd)

    monkeypatch.setattr(simulation.Simulation, "train_round", train_round)
    run(compose_cfg(*EQUAL, *overrides), run_dir=tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return rows, recorded


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("aggregator", AGGREGATORS)
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_parallel_equals_sequential(compose_cfg, tmp_path, monkeypatch, adapter, aggregator):
    _assert_parallel_equals_sequential(compose_cfg, tmp_path, monkeypatch, f"adapter={adapter}",
                                       f"aggregator={aggregator}")


def test_parallel_equals_sequential_with_fedprox_and_a_server_optimizer(compose_cfg, tmp_path, monkeypatch):
    """FedProx's anchor is each client's own received tensors (A; FedSA-LoRA's private B has none), in a stacked
    cohort its own slice; mu = 2 moves the uploads far more than the rounding the comparison allows."""
    common = ("method=fedsa_lora", "server=adam", "server.eta=0.05")
    seq = _assert_parallel_equals_sequential(compose_cfg, tmp_path, monkeypatch, *common, "client.prox_mu=2")
    _, without = _run(compose_cfg, tmp_path / "mu0", monkeypatch, *common, "simulation=sequential")
    last, other = seq["uploads"][-1], without["uploads"][-1]
    assert max(float((last[i][n] - other[i][n]).norm() / other[i][n].norm()) for i in last for n in last[i]
               ) > 1e3 * DEEP * unit_roundoff(torch.float64)  # the term is there, far above the comparison's rounding


def test_parallel_equals_sequential_under_concept_shift(compose_cfg, tmp_path, monkeypatch):
    """Each client of a stacked cohort reads its own view of the rows (its group's labels) and the global model is
    scored under every group's (global/acc_group<g>), as one client at a time does."""
    _assert_parallel_equals_sequential(compose_cfg, tmp_path, monkeypatch, "method=celora", "partition=concept_shift",
                                       "partition.alpha=0.5")


def _assert_parallel_equals_sequential(compose_cfg, tmp_path, monkeypatch, *common):
    seq, seq_rec = _run(compose_cfg, tmp_path / "seq", monkeypatch, *common, "simulation=sequential")
    # cohorts of 2: a round's 3 clients train as a stacked pair, then a stacked cohort of one
    par, par_rec = _run(compose_cfg, tmp_path / "par", monkeypatch, *common, "simulation=parallel",
                        "simulation.cohort_size=2")
    assert len(set(seq_rec["steps"][0])) > 1, "the clients should run different numbers of local steps"
    assert [r["round"] for r in par] == [r["round"] for r in seq] == [0, 1, 2]
    for a, b in zip(seq, par):
        for key in a:
            if not key.startswith("time/"):
                assert deep_equal(a[key], b[key]), (a["round"], key, a[key], b[key])
    assert [sorted(u) for u in seq_rec["uploads"]] == [sorted(u) for u in par_rec["uploads"]]
    for rnd, (us, up) in enumerate(zip(seq_rec["uploads"], par_rec["uploads"]), start=1):
        # the same sums in another order (batched matmuls), carried through AdamW: DEEP roundings of the norm
        for i in us:
            for name, t in us[i].items():
                assert t.dtype == torch.float64
                assert (up[i][name] - t).norm() <= DEEP * unit_roundoff(t.dtype) * t.norm(), (rnd, i, name)
    return seq_rec


def test_parallel_all_clients_in_one_cohort(compose_cfg, tmp_path, monkeypatch):
    seq, _ = _run(compose_cfg, tmp_path / "seq", monkeypatch, "method=celora", "fl.sample_fraction=1.0")
    par, _ = _run(compose_cfg, tmp_path / "par", monkeypatch, "method=celora", "fl.sample_fraction=1.0",
                  "simulation=parallel", "simulation.cohort_size=all")
    for a, b in zip(seq, par):
        assert deep_equal([a["train/loss"], a["global/loss"], a["personal/loss"]],
                      [b["train/loss"], b["global/loss"], b["personal/loss"]])
        assert a["personal/acc_by_client"] == b["personal/acc_by_client"]


def test_clipping_is_per_client():
    torch.manual_seed(0)
    grads = [torch.randn(3, 4, 5), torch.randn(3, 7)]
    grads[0][1] *= 1e-3  # client 1's gradient is small: left alone, while clients 0 and 2 are scaled down
    params = [torch.zeros_like(g, requires_grad=True) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    clip_per_client(params, max_norm=1.0)
    for k in range(3):
        own = [torch.zeros_like(g[k], requires_grad=True) for g in grads]
        for p, g in zip(own, grads):
            p.grad = g[k].clone()
        torch.nn.utils.clip_grad_norm_(own, 1.0)
        # each side is within gamma(n + 3) of g / |g| relatively: the n-term sum of squares errs by gamma(n),
        # its square root by half that plus one rounding, the division and the product one rounding each
        rel = 2 * gamma(sum(g[k].numel() for g in grads) + 3, torch.float32)
        for p, o in zip(params, own):
            torch.testing.assert_close(p.grad[k], o.grad, rtol=rel, atol=0)
    # clipped to norm 1 / (1 + 1e-6 / |g|): torch's (and our) 1e-6 guard, plus the rounding above
    g0 = torch.linalg.vector_norm(torch.cat([g[0].flatten() for g in grads])).item()
    rel = 1e-6 / g0 + 2 * gamma(sum(g[0].numel() for g in grads) + 3, torch.float32)
    assert torch.linalg.vector_norm(torch.cat([p.grad[0].flatten() for p in params])) == pytest.approx(1.0, rel=rel)


def test_masked_client_keeps_tensors_and_optimiser_state():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(2, 3))
    opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.1)
    for step in range(3):
        done = [1] if step >= 1 else []  # client 1 ran one step; clients 0 goes on
        kept = client_slices(opt, done)
        before = (p.detach().clone(), {k: v.clone() for k, v in opt.state.get(p, {}).items()})
        p.grad = torch.ones_like(p)  # a non-zero gradient, and weight decay: AdamW would move client 1
        opt.step()
        restore_slices(kept, done)
        assert not torch.equal(p[0], before[0][0])
        if done:
            assert torch.equal(p[1], before[0][1])
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(opt.state[p][key][1], before[1][key][1])


def test_stacked_cohort_matches_each_model_and_restores_it(compose_cfg):
    from hydra.utils import instantiate

    from celora.adapters import inject
    from celora.schema import make

    cfg = compose_cfg(*EQUAL, "adapter=tri")  # fp64: a whole model's output, compared at DEEP roundings
    backbone = make(cfg.model)
    model = backbone.classifier(2, seed=0)
    inject(model, instantiate(cfg.adapter), backbone.default_targets, seed=1)
    names = [n for n, _ in model.named_parameters() if "lora_C" in n or n.startswith("head.")]
    originals = {n: p for n, p in model.named_parameters()}
    states = [{n: torch.randn_like(originals[n]) * 0.1 for n in names} for _ in range(3)]
    ids = torch.randint(1000, 2000, (3 * 2, 7))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    model.eval()
    with torch.no_grad(), stacked(model, states) as params:
        assert params[names[0]].shape[0] == 3
        together = model(**inputs)
    with torch.no_grad():
        for k, state in enumerate(states):
            for n in names:
                originals[n].copy_(state[n])
            alone = model(input_ids=ids[2 * k: 2 * k + 2], attention_mask=inputs["attention_mask"][:2])
            assert_deep_close(together[2 * k: 2 * k + 2], alone)
    assert all(p is originals[n] for n, p in model.named_parameters())  # the model's own tensors are back


def test_cohort_size_is_checked(compose_cfg, tmp_path):
    with pytest.raises(ValueError, match="cohort_size"):
        run(compose_cfg(*TINY, "simulation=parallel", "simulation.cohort_size=0"), run_dir=tmp_path)


def test_benchmark_prints_its_table():
    """scripts/bench_simulation.py end to end on a tiny setting: one row per setting, ratios to its own rows."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "scripts.bench_simulation", "--models", "tiny_bert", "tiny_llama",
                          "--clients", "4",
                          "--cohorts", "2", "all", "--steps", "1"], capture_output=True, text=True, cwd=root,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    def printed(a, b):
        # a ratio printed to 0.01 (+-0.005) of speeds printed to whole samples/s (each +-0.5)
        return pytest.approx(a / b, abs=0.005 + (a / b) * (0.5 / (a - 0.5) + 0.5 / (b - 0.5)))

    for model in ("tiny_bert", "tiny_llama"):  # a classifier, and a causal LM on instruction data
        rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith(f"| {model} ")]
        assert [r[3].strip() for r in rows] == ["sequential", "parallel K=2", "parallel K=all", "centralized"]
        assert {(r[1].strip(), r[2].strip()) for r in rows} == {("cpu", "32-true")}
        speed = {r[3].strip(): float(r[4]) for r in rows}
        for r in rows:
            setting, ratio_seq, ratio_cen = r[3].strip(), float(r[7]), float(r[8])
            assert float(r[5]) > 0 and float(r[6]) > 0  # tokens/s, peak memory
            assert ratio_seq == printed(speed[setting], speed["sequential"])
            assert ratio_cen == printed(speed[setting], speed["centralized"])


def test_benchmark_scaling_table():
    """--clients N1,N2: one row per number of clients, the round's time split into train, server and
    evaluation (each at most the round's), and the ratio to the first row."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "scripts.bench_simulation", "--models", "tiny_bert", "--clients", "4,40",
                          "--per-round", "2", "--rounds", "2", "--steps", "1", "--batch", "4", "--limit", "400",
                          "--eval-clients", "4"], capture_output=True, text=True, cwd=root,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.stdout.splitlines()
            if line.startswith("| ") and line[2].isdigit()]
    assert [r[:2] for r in rows] == [["4", "2"], ["40", "2"]]
    for r in rows:
        total, parts = float(r[2]), [float(x) for x in r[3:6]]
        assert all(x >= 0 for x in parts) and sum(parts) <= total + 0.015  # printed to 0.01 s (server 0.001)
        assert float(r[7]) > 0
    assert rows[0][8] == "1.00"
