"""Checkpoint files: round trip, atomic and checksummed, the last two kept, fallback, safe loading, config diffs."""
import json
import logging
import math
import pickle
import re

import pytest
import torch

from celora.fl import checkpoint


def _payload(rnd):
    return {"round": rnd, "state": {"x.lora_C": torch.randn(3, 3)}, "rows": [{"round": 0, "acc": 0.5, "loss": None}],
            "nan": math.nan, "big": str(2**100), "ids": {0: torch.arange(3)}}


def test_round_trip_keeps_tensors_and_plain_values(tmp_path):
    saved = _payload(4)
    checkpoint.save(tmp_path, 4, saved)
    loaded = checkpoint.load_latest(tmp_path)
    assert torch.equal(loaded["state"]["x.lora_C"], saved["state"]["x.lora_C"])
    assert torch.equal(loaded["ids"][0], saved["ids"][0])
    assert loaded["rows"] == saved["rows"] and loaded["big"] == saved["big"] and math.isnan(loaded["nan"])
    assert [p.name for p in tmp_path.iterdir()] == ["round_00004.pt"]  # no temporary file left behind


def test_only_the_newest_two_are_kept(tmp_path):
    for rnd in range(5):
        checkpoint.save(tmp_path, rnd, _payload(rnd))
    assert checkpoint.rounds(tmp_path) == [4, 3]
    assert checkpoint.load_latest(tmp_path)["round"] == 4


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_a_damaged_latest_falls_back_to_the_previous_with_a_warning(tmp_path, damage, caplog):
    checkpoint.save(tmp_path, 1, _payload(1))
    checkpoint.save(tmp_path, 2, _payload(2))
    path = checkpoint.path_of(tmp_path, 2)
    data = path.read_bytes()
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data = data[:-10] + bytes([data[-10] ^ 1]) + data[-9:]
    else:
        data = b""
    path.write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="celora"):
        assert checkpoint.load_latest(tmp_path)["round"] == 1
    assert re.search(r"round_00002.pt.*resuming from round_00001.pt", caplog.text)


def test_no_usable_checkpoint_says_so_and_how_to_start_over(tmp_path):
    assert checkpoint.load_latest(tmp_path / "missing") is None
    checkpoint.save(tmp_path, 3, _payload(3))
    checkpoint.path_of(tmp_path, 3).write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointError, match=r"no usable checkpoint.*round_00003.pt.*resume=never"):
        checkpoint.load_latest(tmp_path)


class Gadget:
    """An object a pickle could run code through; a checkpoint must never load one."""

    def __reduce__(self):
        return (print, ("loaded arbitrary code",))


def test_loading_refuses_anything_but_tensors_and_plain_types(tmp_path):
    # A well-formed file (right checksum) whose payload holds an arbitrary object: weights_only refuses it.
    path = checkpoint.path_of(tmp_path, 0)
    tmp_path.mkdir(exist_ok=True)
    path.write_bytes(checkpoint.encode({"round": 0, "x": Gadget()}))
    with pytest.raises(checkpoint.CheckpointError, match="round_00000.pt"):
        checkpoint.load_latest(tmp_path)
    with pytest.raises(pickle.UnpicklingError):
        checkpoint.decode(path.read_bytes())


def test_clear_removes_every_checkpoint(tmp_path):
    for rnd in range(2):
        checkpoint.save(tmp_path, rnd, _payload(rnd))
    checkpoint.clear(tmp_path)
    assert checkpoint.rounds(tmp_path) == [] and checkpoint.load_latest(tmp_path) is None


def test_config_fingerprint_and_differences():
    old = {"seed": 0, "client": {"lr": 0.002, "optimizer": {"lr": 0.002}}, "adapter": {"targets": None}}
    new = {"seed": 0, "client": {"lr": 0.01, "optimizer": {"lr": 0.01}}, "adapter": {"targets": ["query"]},
           "fl": {"max_update_norm_ratio": 10}}
    assert checkpoint.fingerprint(old) == checkpoint.fingerprint(dict(reversed(list(old.items()))))
    assert checkpoint.fingerprint(old) != checkpoint.fingerprint(new)
    assert checkpoint.differences(old, new) == [
        ("adapter.targets", None, ["query"]), ("client.lr", 0.002, 0.01), ("client.optimizer.lr", 0.002, 0.01),
        ("fl.max_update_norm_ratio", "<unset>", 10)]
    assert checkpoint.differences(old, old) == []


def test_added_keys_are_all_a_config_may_gain_and_still_be_the_same_run():
    old = {"seed": 0, "client": {"lr": 0.002}}
    grown = {"seed": 0, "client": {"lr": 0.002, "val_fraction": 0}, "flower": {"connect_timeout_s": 300}}
    assert checkpoint.added_keys(old, old) == []
    assert checkpoint.added_keys(old, grown) == ["client.val_fraction", "flower.connect_timeout_s"]
    assert checkpoint.added_keys(old, {**grown, "seed": 1}) is None  # a changed value
    assert checkpoint.added_keys(grown, old) is None  # removed keys


def _stats_config(dp_epsilon, **more):
    return {"seed": 0, "aggregator": {"data_stats": {"dp_epsilon": dp_epsilon, "dp_delta": 1e-5, **more}}}


@pytest.mark.parametrize("dp_epsilon", [1.0, None])
def test_a_key_declared_before_is_added_only_at_its_old_value(dp_epsilon):
    # Saved before dp_mechanism existed: those runs drew the classic mechanism's noise.
    old = _stats_config(dp_epsilon)
    key = "aggregator.data_stats.dp_mechanism"
    assert checkpoint.BEFORE[key].value == "classic"
    assert checkpoint.added_keys(old, _stats_config(dp_epsilon, dp_mechanism="classic")) == [key]
    analytic = checkpoint.added_keys(old, _stats_config(dp_epsilon, dp_mechanism="analytic"))
    # With DP the new default is other noise, another run; without DP the key draws nothing: the same run
    # (so the kept runs of docs/results/, all without DP, are not trained again).
    assert analytic == (None if dp_epsilon is not None else [key])
    # Saved with the key: its value is compared as any other's.
    assert checkpoint.added_keys(_stats_config(dp_epsilon, dp_mechanism="classic"),
                                 _stats_config(dp_epsilon, dp_mechanism="analytic")) is None
    # A key not in BEFORE beside it keeps the ordinary rule.
    grown = _stats_config(dp_epsilon, dp_mechanism="classic")
    grown["client"] = {"val_fraction": 0}
    assert checkpoint.added_keys(old, grown) == ["aggregator.data_stats.dp_mechanism", "client.val_fraction"]


def test_an_old_dp_run_resumes_and_is_finished_under_classic_only(tmp_path):
    from celora.run import finished_before, resume_point

    old = _stats_config(1.0)
    checkpoint.save(tmp_path / "checkpoints", 2, {"round": 2, "config": old,
                                                  "config_hash": checkpoint.fingerprint(old)})
    (tmp_path / "summary.json").write_text(json.dumps({"last": {}, "config": old}))
    classic, analytic = _stats_config(1.0, dp_mechanism="classic"), _stats_config(1.0, dp_mechanism="analytic")
    assert resume_point(tmp_path / "checkpoints", "auto", classic)["round"] == 2
    assert finished_before(tmp_path, classic) == {"last": {}, "config": old}
    with pytest.raises(ValueError, match=r"another config \(aggregator.data_stats.dp_mechanism: '<unset>' -> "
                                         r"'analytic'\)"):
        resume_point(tmp_path / "checkpoints", "auto", analytic)
    assert finished_before(tmp_path, analytic) is None
