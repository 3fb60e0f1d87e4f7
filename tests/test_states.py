"""One home for every client's model (fl.states.ModelStates): its rules, and runs that equal the code before it."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from celora.fl.states import ModelStates
from celora.run import run
from tolerance import DEEP, unit_roundoff

FIXTURES = Path(__file__).parent / "fixtures" / "client_home"
CASES = json.loads((FIXTURES / "cases.json").read_text())
META = json.loads((FIXTURES / "meta.json").read_text())


def _t(v):
    return torch.tensor([float(v)])


def test_a_client_model_is_what_it_received_and_its_own_tensors():
    states = ModelStates({"c": _t(0)}, {"head": _t(9)}, owner=[0, 1, 2])
    assert states.of(1) == {"c": _t(0), "head": _t(9)}
    states.aggregated({"c": _t(1)}, {0: {"c": _t(5)}})
    states.trained(2, {"head": _t(7)})
    assert states.received(0)["c"] == 5 and states.received(1)["c"] == 1  # personalised, else the global
    assert states.of(2) == {"c": _t(1), "head": _t(7)} and states.own(0)["head"] == 9
    states.aggregated(None, {1: {"c": _t(3)}})  # nothing shared: the global state stays; 0 keeps its own
    assert states.global_state["c"] == 1 and states.received(0)["c"] == 5 and states.received(1)["c"] == 3


def test_the_one_model_exists_only_where_nothing_trained_stays_home():
    assert ModelStates({"c": _t(0)}, {}, owner=[0, 1]).global_model() == {"c": _t(0)}
    assert ModelStates({"c": _t(0)}, {"head": _t(1)}, owner=[0, 1]).global_model() is None  # FedSA-LoRA, local heads
    pooled = ModelStates({}, {"w": _t(2)}, owner=[0, 0, 0], pooled=True)  # centralized: one trainer for all
    pooled.trained(0, {"w": _t(4)})
    assert pooled.global_model() == {"w": _t(4)} and pooled.of(2) == {"w": _t(4)}
    assert ModelStates({}, {"w": _t(2)}, owner=[0], pooled=True).global_model() == {"w": _t(2)}  # even of one


def test_checkpoint_state_keeps_the_older_keys_and_round_trips():
    states = ModelStates({"c": _t(0)}, {"head": _t(1)}, owner=[0, 1])
    states.aggregated({"c": _t(2)}, {1: {"c": _t(3)}})
    states.trained(0, {"head": _t(4)})
    saved = states.state_dict()
    assert set(saved) == {"global", "personal", "private"}  # what checkpoints held before ModelStates
    again = ModelStates({"c": _t(0)}, {"head": _t(1)}, owner=[0, 1])
    again.load_state_dict(saved)
    assert [again.of(i) for i in (0, 1)] == [states.of(i) for i in (0, 1)]


def _same_machine() -> bool:
    return torch.__version__ == META["torch"] and torch.backends.cpu.get_cpu_capability() == META["cpu_capability"]


def _assert_rows_equal(got: list[dict], want: list[dict]) -> None:
    """Every key but time/* equal: exactly on the machine the fixtures were written on; elsewhere (other kernels
    round differently) numbers within DEEP fp32 roundings of their size (tests/tolerance.py), the rest equal."""
    tol = DEEP * unit_roundoff(torch.float32)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        keys = {k for k in b if not k.startswith("time/")}
        assert keys == {k for k in a if not k.startswith("time/")}, (a["round"], keys ^ set(a))
        for k in sorted(keys):
            if _same_machine() or not isinstance(b[k], (float, list)) or k.startswith(("comm/", "fl/")):
                assert a[k] == b[k], (a["round"], k, a[k], b[k])
            else:
                x, y = (a[k], b[k]) if isinstance(b[k], list) else ([a[k]], [b[k]])
                assert all(p == q or math.isclose(p, q, rel_tol=tol, abs_tol=tol) for p, q in zip(x, y)), (k, x, y)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("case", sorted(CASES))
def test_runs_equal_the_code_before_model_states(compose_cfg, tmp_path, one_thread, case):
    """Every method (and parallel cohorts, partial sampling, DP, a causal LM) gives the metrics.jsonl the round
    loop gave before the clients' models moved into one object (fixtures written at e75a958)."""
    run(compose_cfg(*CASES[case]), run_dir=tmp_path)
    _assert_rows_equal(_rows(tmp_path / "metrics.jsonl"), _rows(FIXTURES / f"{case}.jsonl"))


def test_a_checkpoint_of_the_older_code_resumes_to_its_numbers(compose_cfg, tmp_path, one_thread):
    """The round-1 checkpoint written by the code before ModelStates (FedSA-LoRA: private B per client in it)
    resumes here to that run's own round 2."""
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(FIXTURES / "fedsa_lora_round_00001.pt", tmp_path / "checkpoints" / "round_00001.pt")
    run(compose_cfg("+debug=tiny", "method=fedsa_lora", "fl.sample_fraction=0.67"), run_dir=tmp_path)
    _assert_rows_equal(_rows(tmp_path / "metrics.jsonl"), _rows(FIXTURES / "fedsa_lora_resumed.jsonl"))
