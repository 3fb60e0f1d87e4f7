"""A new method is one class and one YAML: an aggregator defined here, its YAML written here, run end to end.

Nothing in celora/ names it: Hydra finds the YAML through `hydra.searchpath` and instantiates the class
from its `_target_`, and the Simulation talks to it only through the Aggregator Protocol."""
from __future__ import annotations

import json

import pytest
import torch

from celora.fl.aggregators import Aggregate, Aggregator
from celora.run import run
from conftest import TINY


class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean (Yin et al., 2018): drop the `trim` largest and smallest values of every
    coordinate across the round's uploads, average the rest. Robust to `trim` arbitrary uploads."""

    seen: list = []  # test instrumentation only: every round's (uploads, result)

    def __init__(self, trim: int = 1):
        if trim < 0:
            raise ValueError(f"aggregator.trim={trim} must be >= 0")
        self.trim = trim

    def __call__(self, uploads, sizes, received=None) -> Aggregate:
        ids = sorted(uploads)
        if len(ids) <= 2 * self.trim:
            raise ValueError(f"aggregator.trim={self.trim} drops every one of {len(ids)} uploads")
        out = {}
        for key in uploads[ids[0]]:
            ranked = torch.stack([uploads[i][key] for i in ids]).sort(dim=0).values
            out[key] = ranked[self.trim: len(ids) - self.trim].mean(dim=0)
        TrimmedMean.seen.append(({i: dict(uploads[i]) for i in ids}, out))
        return Aggregate(out)


@pytest.fixture
def trimmed_mean_yaml(tmp_path):
    root = tmp_path / "my_conf"
    (root / "aggregator").mkdir(parents=True)
    (root / "aggregator" / "trimmed_mean.yaml").write_text(
        f"_target_: {__name__}.TrimmedMean\ntrim: 1  # 3 clients a round: the coordinate-wise median\n")
    return f"hydra.searchpath=[file://{root}]"


def _rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_an_aggregator_from_outside_celora_runs_end_to_end(compose_cfg, tmp_path, trimmed_mean_yaml):
    TrimmedMean.seen.clear()
    cfg = compose_cfg(*TINY, "adapter=tri", "aggregator=trimmed_mean", trimmed_mean_yaml)
    assert cfg.aggregator._target_.endswith("test_extension.TrimmedMean")
    run(cfg, run_dir=tmp_path / "trimmed")
    rows = _rows(tmp_path / "trimmed")
    assert [r["round"] for r in rows] == [0, 1, 2]
    # it was called each round with every client's upload, and its result is what the clients got: with 3
    # uploads and trim 1, exactly the median of each coordinate (no rounding: one value of the three)
    assert len(TrimmedMean.seen) == 2
    for uploads, out in TrimmedMean.seen:
        assert sorted(uploads) == [0, 1, 2]
        for key, value in out.items():
            assert torch.equal(value, torch.stack([u[key] for u in uploads.values()]).median(dim=0).values)
    # the bytes are the wire's, not the method's: the same as FedAvg's on the same adapter
    run(compose_cfg(*TINY, "adapter=tri", "aggregator=fedavg"), run_dir=tmp_path / "fedavg")
    fedavg = _rows(tmp_path / "fedavg")
    assert [r["comm/up_bytes"] for r in rows] == [r["comm/up_bytes"] for r in fedavg]
    assert [r["comm/down_bytes"] for r in rows] == [r["comm/down_bytes"] for r in fedavg]


def test_its_bad_values_are_refused_before_training(compose_cfg, tmp_path, trimmed_mean_yaml):
    from celora.validate import ConfigError

    with pytest.raises(ConfigError, match=r"aggregator.trim=-1 must be >= 0"):
        run(compose_cfg(*TINY, "aggregator=trimmed_mean", "aggregator.trim=-1", trimmed_mean_yaml),
            run_dir=tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()
