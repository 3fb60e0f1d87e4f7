"""Resume: a run SIGKILLed mid-way and resumed equals an uninterrupted one; corrupt, changed, finished checkpoints."""
import json
import logging
import multiprocessing
import os
import re
import signal

import pytest

from celora.fl import checkpoint, simulation
from celora.run import run
from conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")

# 4 rounds evaluated every 2, 2 of 3 clients a round, dropout on, DP noise: every piece of state that
# moves between rounds (client sampler, server and client tensors, accountant) must survive the kill.
BASE = [*TINY, "fl.rounds=4", "fl.eval_every=2", "fl.sample_fraction=0.67", "privacy=client",
        "privacy.noise_multiplier=0.3", "privacy.clip_norm=0.5"]
MODES = {
    # personalised weights (per-client C~, data distances, weights.jsonl), clients' own noise
    "sequential": ["simulation=sequential", "method=celora", "privacy.mode=local"],
    # private B on every client, stacked cohorts of 2 (a pair, then one), server-side noise
    "parallel": ["simulation=parallel", "simulation.cohort_size=2", "method=fedsa_lora", "privacy.mode=central"],
    # FedAdam on CE-LoRA's mixes: the server's moments, one stream per mixed client and the global one, and FedProx
    "server": ["simulation=sequential", "method=celora_fedadam", "privacy.mode=local", "client.prox_mu=0.1"],
}


def _lines(path):
    return path.read_text().splitlines() if path.exists() else []


def _rows(run_dir):
    """metrics.jsonl without wall-clock keys: everything else must be equal, to the last bit."""
    rows = [json.loads(line) for line in _lines(run_dir / "metrics.jsonl")]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def _killed(cfg, run_dir, at_round):
    """Runs `cfg` in a forked process that SIGKILLs itself when about to checkpoint round `at_round`,
    i.e. after that round's metrics row was written: the worst moment, as for a pre-emption."""
    def child():
        save = checkpoint.save

        def dying(directory, rnd, payload, **kwargs):
            if rnd == at_round:
                os.kill(os.getpid(), signal.SIGKILL)
            return save(directory, rnd, payload, **kwargs)

        checkpoint.save = dying  # in the child only
        run(cfg, run_dir=run_dir)
        os._exit(0)

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(300)
    assert process.exitcode == -signal.SIGKILL


@pytest.mark.parametrize("mode", sorted(MODES))
def test_killed_and_resumed_equals_uninterrupted(compose_cfg, tmp_path, mode):
    cfg = compose_cfg(*BASE, *MODES[mode])
    whole = run(cfg, run_dir=tmp_path / "whole")

    _killed(cfg, tmp_path / "resumed", at_round=2)
    killed = _rows(tmp_path / "resumed")
    assert [r["round"] for r in killed] == [0, 2]  # round 2 was logged, its checkpoint never written
    assert checkpoint.rounds(tmp_path / "resumed" / "checkpoints") == [1, 0]
    assert not (tmp_path / "resumed" / "summary.json").exists()

    resumed = run(cfg, run_dir=tmp_path / "resumed")  # the same dir: resume=auto
    assert _rows(tmp_path / "resumed") == _rows(tmp_path / "whole")
    assert [r["round"] for r in _rows(tmp_path / "whole")] == [0, 2, 4]
    for name in ("weights.jsonl", "data_distance.jsonl"):
        assert _lines(tmp_path / "resumed" / name) == _lines(tmp_path / "whole" / name), name
    untimed = lambda row: {k: v for k, v in row.items() if not k.startswith("time/")}  # noqa: E731
    assert untimed(resumed["last"]) == untimed(whole["last"])
    assert resumed["best"] == whole["best"] and resumed["best_round"] == whole["best_round"]
    assert _rows(tmp_path / "whole")[-1]["privacy/epsilon"] > 0


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished 3-round run (kept read-only: tests copy it)."""
    from hydra import compose, initialize_config_dir

    from conftest import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, "fl.rounds=3"])
    path = tmp_path_factory.mktemp("finished")
    run(cfg, run_dir=path)
    return path


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_corrupted_latest_checkpoint_falls_back_and_still_gives_the_same_run(compose_cfg, tmp_path, finished, caplog):
    run_dir = _copy(finished, tmp_path / "run")
    (run_dir / "summary.json").unlink()  # stopped before its summary: it resumes from its checkpoints
    latest = checkpoint.path_of(run_dir / "checkpoints", 3)
    latest.write_bytes(latest.read_bytes()[:-100])  # a write cut short
    with caplog.at_level(logging.WARNING, logger="celora"):
        run(compose_cfg(*TINY, "fl.rounds=3"), run_dir=run_dir)
    assert re.search(r"round_00003.pt: checksum mismatch.*resuming from round_00002.pt", caplog.text)
    assert _rows(run_dir) == _rows(finished)
    assert checkpoint.rounds(run_dir / "checkpoints") == [3, 2]


def test_a_finished_run_is_not_redone(compose_cfg, tmp_path, finished, monkeypatch):
    run_dir = _copy(finished, tmp_path / "run")

    def never(*a, **k):
        raise AssertionError("a finished run loads no model and trains nothing")

    monkeypatch.setattr(simulation.Simulation, "__init__", never)
    summary = run(compose_cfg(*TINY, "fl.rounds=3", "logger=wandb"), run_dir=run_dir)  # logging is not results
    assert summary == json.loads((finished / "summary.json").read_text())


def _without(config: dict, dotted: str) -> dict:
    """`config` as it was before the key `dotted` existed."""
    import copy

    old = copy.deepcopy(config)
    *path, last = dotted.split(".")
    node = old
    for part in path:
        node = node[part]
    del node[last]
    return old


def test_a_run_finished_before_a_key_was_added_is_not_redone(compose_cfg, tmp_path, finished, monkeypatch, caplog):
    run_dir = _copy(finished, tmp_path / "run")
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["config"] = _without(summary["config"], "client.val_fraction")
    (run_dir / "summary.json").write_text(json.dumps(summary))
    import shutil

    shutil.rmtree(run_dir / "checkpoints")  # as a run kept in git and restored: its summary alone says it is done

    def never(*a, **k):
        raise AssertionError("a finished run loads no model and trains nothing")

    monkeypatch.setattr(simulation.Simulation, "__init__", never)
    with caplog.at_level("WARNING", logger="celora"):
        assert run(compose_cfg(*TINY, "fl.rounds=3"), run_dir=run_dir) == summary
    assert "before the config had client.val_fraction" in caplog.text
    summary["config"]["client"]["lr"] = 0.01  # a changed value is another run: it trains (and is refused here)
    (run_dir / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(AssertionError, match="loads no model"):
        run(compose_cfg(*TINY, "fl.rounds=3"), run_dir=run_dir)


def test_a_checkpoint_from_before_a_key_was_added_resumes(compose_cfg, tmp_path, finished, caplog):
    run_dir = _copy(finished, tmp_path / "run")
    (run_dir / "summary.json").unlink()
    checkpoint.clear(run_dir / "checkpoints")
    saved = checkpoint.load_latest(finished / "checkpoints")
    old = _without(saved["config"], "client.val_fraction")
    checkpoint.save(run_dir / "checkpoints", saved["round"], {**saved, "config": old,
                                                               "config_hash": checkpoint.fingerprint(old)})
    with caplog.at_level("WARNING", logger="celora"):
        run(compose_cfg(*TINY, "fl.rounds=3"), run_dir=run_dir)
    assert "checkpoint from before the config had client.val_fraction" in caplog.text
    assert _rows(run_dir) == _rows(finished)


def test_a_changed_config_is_refused_naming_the_keys(compose_cfg, tmp_path, finished):
    run_dir = _copy(finished, tmp_path / "run")
    with pytest.raises(ValueError, match=r"another config \(client.lr: 0.002 -> 0.01; client.optimizer.lr: 0.002 "
                                         r"-> 0.01\).*resume=force.*resume=never"):
        run(compose_cfg(*TINY, "fl.rounds=3", "client.lr=0.01"), run_dir=run_dir)
    assert _rows(run_dir) == _rows(finished)  # untouched


def test_force_goes_on_under_the_new_config(compose_cfg, tmp_path, finished, caplog):
    run_dir = _copy(finished, tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="celora"):
        run(compose_cfg(*TINY, "fl.rounds=4", "resume=force"), run_dir=run_dir)
    assert re.search(r"resume=force.*fl.rounds: 3 -> 4", caplog.text)
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4] and rows[:4] == _rows(finished)


def test_never_starts_over(compose_cfg, tmp_path, finished):
    run_dir = _copy(finished, tmp_path / "run")
    run(compose_cfg(*TINY, "fl.rounds=1", "client.lr=0.01", "resume=never"), run_dir=run_dir)
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1] and rows[1] != _rows(finished)[1]
    assert checkpoint.rounds(run_dir / "checkpoints") == [1, 0]  # the old run's rounds 2 and 3 are gone
