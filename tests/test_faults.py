"""Faulty clients (NaN, outlying norm, raising) are left out of their round; logging faults never stop a run."""
import json
import logging
import math

import pytest
import torch

from celora.fl import faults, simulation
from celora.run import run
from conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")
PER_CLIENT = 4 * (4 * 8 * 8 + 64 * 2 + 2)  # tri: C on 4 modules + the shared head, fp32


# -- the screening rules, pure -------------------------------------------------------------
def test_nonfinite_names_the_bad_tensors():
    state = {"a": torch.zeros(3), "b": torch.tensor([1.0, math.nan]), "c": torch.tensor([math.inf])}
    assert faults.nonfinite(state) == ["b", "c"]


def test_outliers_are_judged_against_the_median():
    norms = {0: 1.0, 1: 1.2, 2: 0.9, 3: 50.0}
    assert list(faults.outliers(norms, 10)) == [3]
    assert faults.outliers(norms, None) == {} and faults.outliers(norms, 100) == {}
    assert faults.outliers({0: 0.0, 1: 0.0}, 10) == {}  # nobody moved: nothing to compare against


def test_screen_rejects_nonfinite_uploads_private_tensors_and_losses():
    zero = {i: {"w": torch.zeros(2)} for i in range(4)}
    uploads = {0: {"w": torch.ones(2)}, 1: {"w": torch.tensor([1.0, math.inf])}, 2: {"w": torch.ones(2)},
               3: {"w": torch.ones(2)}}
    privates = {0: {"p": torch.zeros(1)}, 1: {}, 2: {"p": torch.tensor([math.nan])}, 3: {}}
    losses = {0: 0.5, 1: 0.5, 2: 0.5, 3: math.nan}
    assert sorted(faults.screen(uploads, privates, zero, None, losses)) == [1, 2, 3]
    assert faults.screen({0: uploads[0]}, {}, zero, None, {0: 0.1}) == {}


# -- in a run --------------------------------------------------------------------------------
def _rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def _corrupt(monkeypatch, bad_clients, rnd, fault):
    """Makes the named clients of round `rnd` come back with NaN, or with an update scaled 1000x."""
    original = simulation.Simulation.train_clients

    def train_clients(self, r, cohort, received):
        out = original(self, r, cohort, received)
        if r != rnd:
            return out
        result = []
        for i, (loss, state) in zip(cohort, out):
            if i in bad_clients:
                sent = received[i]
                state = {n: t * math.nan if fault == "nan" else sent.get(n, t) + 1e3 * (t - sent.get(n, t))
                         for n, t in state.items()}
            result.append((loss, state))
        return result

    monkeypatch.setattr(simulation.Simulation, "train_clients", train_clients)


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_a_nan_client_is_rejected_and_the_run_finishes(compose_cfg, tmp_path, monkeypatch, caplog, mode):
    _corrupt(monkeypatch, {1}, rnd=1, fault="nan")
    with caplog.at_level(logging.WARNING, logger="celora"):
        run(compose_cfg(*TINY, "method=tri", f"simulation={mode}"), run_dir=tmp_path)
    rows = _rows(tmp_path)
    assert [r["fl/rejected_clients"] for r in rows] == [0, 1, 0]
    for row in rows[1:]:
        assert all(row[k] is not None and math.isfinite(row[k])
                   for k in ("train/loss", "global/acc", "global/loss", "personal/loss"))
    assert rows[1]["comm/up_bytes"] == 3 * PER_CLIENT  # the rejected upload was sent all the same
    assert "round 1: client 1's result is rejected: non-finite values" in caplog.text


def test_with_every_client_rejected_the_server_keeps_its_state(compose_cfg, tmp_path, monkeypatch):
    _corrupt(monkeypatch, {0, 1, 2}, rnd=1, fault="nan")
    run(compose_cfg(*TINY, "method=tri"), run_dir=tmp_path)
    rows = _rows(tmp_path)
    assert rows[1]["fl/rejected_clients"] == 3 and rows[1]["train/loss"] is None
    for key in ("global/loss", "personal/loss", "personal/acc_by_client"):
        assert rows[1][key] == rows[0][key], key  # nothing was aggregated: the same models as round 0
    assert rows[2]["fl/rejected_clients"] == 0 and rows[2]["global/loss"] != rows[0]["global/loss"]


def test_an_outlying_update_is_rejected_when_asked(compose_cfg, tmp_path, monkeypatch):
    _corrupt(monkeypatch, {2}, rnd=2, fault="huge")
    run(compose_cfg(*TINY, "method=tri", "fl.max_update_norm_ratio=10"), run_dir=tmp_path / "checked")
    assert [r["fl/rejected_clients"] for r in _rows(tmp_path / "checked")] == [0, 0, 1]
    run(compose_cfg(*TINY, "method=tri"), run_dir=tmp_path / "unchecked")  # off by default: finite, so kept
    assert [r["fl/rejected_clients"] for r in _rows(tmp_path / "unchecked")] == [0, 0, 0]


def _failing(monkeypatch, bad_client, rnd):
    original = simulation.Simulation._batches

    def batches(self, r, i):
        if (r, i) == (rnd, bad_client):
            raise RuntimeError("out of memory (injected)")
        return original(self, r, i)

    monkeypatch.setattr(simulation.Simulation, "_batches", batches)


@pytest.mark.parametrize("mode", ["simulation=sequential", "simulation=parallel"])
def test_a_client_that_raises_is_skipped_without_losing_its_cohort(compose_cfg, tmp_path, monkeypatch, caplog, mode):
    _failing(monkeypatch, bad_client=1, rnd=1)
    calls = []
    original = simulation.Simulation.train_clients
    monkeypatch.setattr(simulation.Simulation, "train_clients",
                        lambda self, r, cohort, rec: calls.append((r, list(cohort))) or original(self, r, cohort, rec))
    with caplog.at_level(logging.WARNING, logger="celora"):
        run(compose_cfg(*TINY, "method=tri", mode), run_dir=tmp_path)  # parallel: all 3 in one cohort
    rows = _rows(tmp_path)
    assert [r["fl/rejected_clients"] for r in rows] == [0, 1, 0]
    assert rows[1]["comm/up_bytes"] == 2 * PER_CLIENT  # a client that failed sent nothing
    assert "client 1's local training raised RuntimeError: out of memory (injected)" in caplog.text
    if mode.endswith("parallel"):  # the failed cohort is re-run one client at a time
        assert [c for r, c in calls if r == 1] == [[0, 1, 2], [0], [1], [2]]


def test_on_client_error_raise_and_a_round_where_every_client_fails(compose_cfg, tmp_path, monkeypatch):
    _failing(monkeypatch, bad_client=1, rnd=1)
    with pytest.raises(RuntimeError, match="out of memory"):
        run(compose_cfg(*TINY, "fl.on_client_error=raise"), run_dir=tmp_path / "raise")
    monkeypatch.setattr(simulation.Simulation, "_batches", lambda self, r, i: 1 / 0)
    with pytest.raises(RuntimeError, match="round 1: the local training of every client raised"):
        run(compose_cfg(*TINY), run_dir=tmp_path / "all")


# -- logging faults ------------------------------------------------------------------------
class _BrokenWandbRun:
    summary: dict = {}

    def log(self, *a, **k):
        raise OSError("No space left on device")

    def finish(self):
        raise OSError("No space left on device")


def test_wandb_faults_only_warn(compose_cfg, tmp_path, monkeypatch, caplog):
    import wandb

    from celora import plots

    for figure in ("heatmap", "partition_histogram"):  # drawing is not what this tests, and it is slow
        monkeypatch.setattr(plots, figure, lambda *a, **k: None)
    monkeypatch.setattr(wandb, "init", lambda **k: _BrokenWandbRun())
    with caplog.at_level(logging.WARNING, logger="celora"):
        run(compose_cfg(*TINY, "logger=wandb"), run_dir=tmp_path / "log")
    assert {r.getMessage().split(":")[0] for r in caplog.records} >= {"W&B log failed (metrics.jsonl still has it)",
                                                              "W&B image log failed (the run dir still has its data)",
                                                              "W&B finish failed"}
    assert [r["round"] for r in _rows(tmp_path / "log")] == [0, 1, 2]
    assert (tmp_path / "log" / "summary.json").exists()

    def refuse(**kwargs):
        raise ConnectionError("wandb.init timed out")

    monkeypatch.setattr(wandb, "init", refuse)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="celora"):
        run(compose_cfg(*TINY, "logger=wandb"), run_dir=tmp_path / "init")
    assert "W&B disabled for this run: wandb.init timed out" in caplog.text
    assert [r["round"] for r in _rows(tmp_path / "init")] == [0, 1, 2]
