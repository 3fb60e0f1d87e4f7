"""celora's methods as Flower apps: the same numbers in Flower's Simulation Runtime, the wire, bad input, faults."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from celora.fl import faults
from celora.fl.wire import Payload
from celora.flower import client_app, protocol as P
from celora.flower.client import Participant, partition_id
from celora.flower.records import (
    from_record,
    name_bytes,
    record_state,
    record_stats,
    state_record,
    stats_record,
    to_record,
)
from celora.flower.server import serve
from celora.flower.settings import FlowerSettings, check_flower
from celora.flower.simulate import simulate
from celora.metrics import KEYS, OPTIONAL
from celora.run import run
from celora.similarity import ClassStats
from conftest import TINY
from flower_grid import LocalGrid

pytestmark = pytest.mark.usefixtures("one_thread")

# tiny_bert, 3 Dirichlet clients of uneven size, 2 of them a round (partial participation), 2 rounds, fp32,
# every dropout off: what the sequential simulation computes is then a function of the config alone.
SAME = [*TINY, "partition=dirichlet", "partition.alpha=1.0", "fl.sample_fraction=0.67", "model.dropout=0",
        "adapter.dropout=0"]
# FedAdam with FedProx in Ray is `slow` (about 30 s more); the local Grid runs it in every suite (below)
METHODS = ["lora", "fedsa_lora", "tri", "celora", pytest.param("lora_fedadam", marks=pytest.mark.slow)]
# Extra overrides of a method here: FedAdam's moments live on the server, FedProx's anchor on each ClientApp
EXTRA = {"lora_fedadam": ["client.prox_mu=0.1", "server.eta=0.05"], "tri_fedyogi": ["client.prox_mu=0.1"]}
# The Flower path runs the very operations of the sequential one in the same order (the same
# Simulation.train_clients, the same seeds); only the BLAS thread count of a Ray worker may differ from
# this process's, which reorders sums. tests/tolerance.py measured such reorderings in fp32 at K = 40
# unit roundoffs (2.4e-6) of a tensor's norm after two rounds; the bound 1e-5 is above that.
TOL = 1e-5


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def _recording(monkeypatch) -> list[dict]:
    """Every round's uploads as the server screens them (client -> tensors), in either runtime."""
    seen, screen = [], faults.screen

    def recording(uploads, *args, **kwargs):
        seen.append({i: {n: t.clone() for n, t in s.items()} for i, s in uploads.items()})
        return screen(uploads, *args, **kwargs)

    monkeypatch.setattr(faults, "screen", recording)
    return seen


def _assert_same_rows(ours: list[dict], theirs: list[dict]) -> None:
    assert [r["round"] for r in ours] == [r["round"] for r in theirs]
    for row in theirs:  # the one metrics schema
        assert set(KEYS) <= set(row) and set(row) - set(KEYS) <= set(OPTIONAL) | {"personal/acc_by_client"}, row
    for a, b in zip(ours, theirs):
        keys = {k for k in a if not k.startswith("time/")}
        assert keys | {"comm/record_up_bytes", "comm/record_down_bytes"} == {k for k in b if not k.startswith("time/")}
        for k in keys:
            x, y = a[k], b[k]
            if isinstance(x, list):
                assert y == pytest.approx(x, abs=TOL), k
            elif isinstance(x, float) or isinstance(y, float):
                assert (x is None and y is None) or abs(x - y) <= TOL, (a["round"], k, x, y)
            else:
                assert x == y, (a["round"], k, x, y)


def _assert_same_uploads(ours: list[dict], theirs: list[dict]) -> None:
    assert len(ours) == len(theirs) and all(sorted(a) == sorted(b) for a, b in zip(ours, theirs))
    for a, b in zip(ours, theirs):
        for i in a:
            assert sorted(a[i]) == sorted(b[i])
            for n in a[i]:
                scale = max(1.0, float(a[i][n].abs().max()))
                assert float((a[i][n] - b[i][n]).abs().max()) <= TOL * scale, (i, n)




# -- the same numbers in Flower's Simulation Runtime (Ray) -----------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_flower_simulation_equals_sequential(method, compose_cfg, tmp_path, monkeypatch):
    cfg = compose_cfg(*SAME, f"method={method}", *EXTRA.get(method, []))
    seen = _recording(monkeypatch)
    run(cfg, tmp_path / "sequential")
    sequential_uploads = list(seen)
    seen.clear()
    summary = simulate(cfg, tmp_path / "flower")
    ours, theirs = _rows(tmp_path / "sequential"), _rows(tmp_path / "flower")
    _assert_same_rows(ours, theirs)
    _assert_same_uploads(sequential_uploads, seen)
    assert summary["last"]["round"] == cfg.fl.rounds and summary["params/shared_per_client"] > 0
    if method == "celora":  # the data summaries came by message and gave the same distances
        d_seq = json.loads((tmp_path / "sequential" / "data_distance.jsonl").read_text())["matrix"]
        d_fl = json.loads((tmp_path / "flower" / "data_distance.jsonl").read_text())["matrix"]
        assert torch.tensor(d_fl) == pytest.approx(torch.tensor(d_seq), abs=TOL)
    # Flower's count_bytes of the same messages: celora's count plus the tensors' names, per message
    names = sum(len(n) for n in sequential_uploads[0][min(sequential_uploads[0])])
    for a, b in zip(ours[1:], theirs[1:]):
        assert b["comm/record_up_bytes"] == a["comm/up_bytes"] + names * (a["fl/clients"] - a["fl/rejected_clients"])
        assert b["comm/record_down_bytes"] == a["comm/down_bytes"] + names * a["fl/clients"]
    stats_names = len("counts") + len("means") + len("vars")
    expected_round0 = ours[0]["comm/up_bytes"] + (stats_names * cfg.fl.num_clients if method == "celora" else 0)
    assert theirs[0]["comm/record_up_bytes"] == expected_round0


# -- in one process, through a Grid: faults and bad input --------------------------------------------
def _local(cfg, configs=None, fault=lambda m, i: None):
    configs = configs or [{P.PARTITION_ID: i, P.NUM_PARTITIONS: cfg.fl.num_clients} for i in range(cfg.fl.num_clients)]
    return LocalGrid(client_app(cfg), configs, fault)


def _sequential_then_grid(cfg, tmp_path, monkeypatch):
    """Runs `cfg` sequentially, then through a local Grid, and checks that both give the same rows and uploads;
    returns (the grid, the sequential run's uploads)."""
    seen = _recording(monkeypatch)
    run(cfg, tmp_path / "sequential")
    sequential_uploads = list(seen)
    seen.clear()
    grid = _local(cfg)
    serve(grid, cfg, tmp_path / "flower")
    _assert_same_rows(_rows(tmp_path / "sequential"), _rows(tmp_path / "flower"))
    _assert_same_uploads(sequential_uploads, seen)
    return grid, sequential_uploads


def test_the_local_grid_gives_the_sequential_numbers(compose_cfg, tmp_path, monkeypatch):
    """The Grid contract alone (no Ray): every message and reply is Flower's, every number is celora's."""
    grid, _ = _sequential_then_grid(compose_cfg(*SAME, "method=fedsa_lora", "fl.rounds=3"), tmp_path, monkeypatch)
    # FedSA-LoRA's B never left a node: no message carries a lora_B
    assert not any("lora_B" in name for m in grid.sent + grid.replies if not m.has_error()
                   for record in m.content.array_records.values() for name in record)
    assert any(P.PRIVATE in c.state for c in grid.contexts.values())


@pytest.mark.parametrize("method", ["lora_fedadam", "tri_fedyogi"])
def test_server_optimizers_and_fedprox_through_the_grid_give_the_sequential_numbers(method, compose_cfg, tmp_path,
                                                                                     monkeypatch):
    """The ServerApp steps the aggregate with the simulation's server optimizer, each ClientApp trains with the
    simulation's proximal term: the same rows and uploads as `python -m celora` (the moments never travel)."""
    cfg = compose_cfg(*SAME, f"method={method}", "fl.rounds=3", *EXTRA[method])
    grid, sequential_uploads = _sequential_then_grid(cfg, tmp_path, monkeypatch)
    names = {name for m in grid.sent + grid.replies if not m.has_error() for record in m.content.array_records.values()
             for name in record}
    shared = {n for upload in sequential_uploads for state in upload.values() for n in state}
    assert names == shared  # the exchanged tensors and nothing else: no moment crosses the wire


def _round_of(message) -> int | None:
    config = message.content.config_records.get(P.CONFIG)
    return int(config[P.ROUND]) if config is not None and P.ROUND in config else None


@pytest.mark.parametrize("fault", ["error", "silent"])
def test_a_failed_or_silent_client_is_rejected_and_the_round_goes_on(fault, compose_cfg, tmp_path):
    cfg = compose_cfg(*TINY, "method=tri", "flower.reply_timeout_s=5")

    def fail(message, client):
        return fault if (message.metadata.message_type == "train" and _round_of(message) == 1 and client == 1) else None

    serve(_local(cfg, fault=fail), cfg, tmp_path)
    rows = _rows(tmp_path)
    one, two = rows[1], rows[2]
    assert one["fl/clients"] == 3 and one["fl/rejected_clients"] == 1 and two["fl/rejected_clients"] == 0
    assert one["comm/up_bytes"] == 2 * two["comm/up_bytes"] / 3  # two uploads arrived, and were counted
    assert math.isfinite(one["train/loss"]) and rows[-1]["round"] == cfg.fl.rounds


def test_a_client_rejected_by_screening_keeps_its_old_private_tensors(compose_cfg, tmp_path, monkeypatch):
    """FedSA-LoRA: the server rejects client 0's round-1 upload; its B trained that round must not be kept,
    as in the simulation (the node learns it from `last-accepted`)."""
    cfg = compose_cfg(*SAME, "method=fedsa_lora", "fl.rounds=2", "fl.sample_fraction=1.0")
    screen = faults.screen

    def reject_first(uploads, privates, received, ratio, losses=None):
        out = screen(uploads, privates, received, ratio, losses)
        return {**out, 0: "test"} if reject_first.round == 1 else out

    def counting(*a, **k):
        reject_first.round += 1
        return reject_first(*a, **k)

    for target in ("sequential", "flower"):
        reject_first.round = 0
        monkeypatch.setattr(faults, "screen", counting)
        if target == "sequential":
            run(cfg, tmp_path / target)
        else:
            serve(_local(cfg), cfg, tmp_path / target)
    ours, theirs = _rows(tmp_path / "sequential"), _rows(tmp_path / "flower")
    assert ours[1]["fl/rejected_clients"] == 1
    _assert_same_rows(ours, theirs)


def test_node_config_errors_name_the_fix():
    def ctx(config):
        return Context(run_id=1, node_id=7, node_config=config, state=RecordDict(), run_config={})

    assert partition_id(ctx({"partition-id": 2, "num-partitions": 3}), 3) == 2
    assert partition_id(ctx({"partition-id": "1"}), 3) == 1  # a deployment's node config may give text
    with pytest.raises(ValueError, match=r"no partition-id .*--node-config \"partition-id=<i> num-partitions=3\""):
        partition_id(ctx({"num-partitions": 3}), 3)
    with pytest.raises(ValueError, match=r"partition-id=3 names no client .* i in 0\.\.2"):
        partition_id(ctx({"partition-id": 3, "num-partitions": 3}), 3)
    with pytest.raises(ValueError, match="partition-id=-1 names no client"):
        partition_id(ctx({"partition-id": -1}), 3)
    with pytest.raises(ValueError, match="'x' is not an integer"):
        partition_id(ctx({"partition-id": "x"}), 3)
    with pytest.raises(ValueError, match="num-partitions=5 but the run partitions its data among fl.num_clients=3"):
        partition_id(ctx({"partition-id": 0, "num-partitions": 5}), 3)


@pytest.mark.parametrize("configs, match", [
    ([{"partition-id": 0}, {"partition-id": 1}, {"num-partitions": 3}], "refused the run: .*no partition-id"),
    ([{"partition-id": 0}, {"partition-id": 1}, {"partition-id": 7}], "refused the run: .*partition-id=7 names no"),
    ([{"partition-id": 0}, {"partition-id": 1}, {"partition-id": 1}], "both have partition-id=1"),
])
def test_the_server_stops_on_a_bad_supernode(configs, match, compose_cfg, tmp_path):
    cfg = compose_cfg(*TINY)
    with pytest.raises(RuntimeError, match=match):
        serve(_local(cfg, configs), cfg, tmp_path)


def test_the_server_waits_for_every_client(compose_cfg, tmp_path):
    cfg = compose_cfg(*TINY, "flower.connect_timeout_s=0.5")
    with pytest.raises(TimeoutError, match="2 SuperNode.* fl.num_clients=3: start one SuperNode per client"):
        serve(_local(cfg, [{"partition-id": 0}, {"partition-id": 1}]), cfg, tmp_path)


def test_pending_private_tensors_are_kept_only_when_accepted(compose_cfg):
    who = Participant(compose_cfg(*TINY, "method=fedsa_lora"))
    start = who.sim.states.own(0)
    trained = {n: t + 1 for n, t in start.items()}
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})

    def pend(rnd):
        context.state[P.PENDING] = state_record(trained)
        context.state[P.PENDING_ROUND] = ConfigRecord({P.ROUND: rnd})

    pend(1)
    kept = who.private(0, context, last_accepted=-1)  # round 1 was rejected: the start stays
    assert all(torch.equal(kept[n], start[n]) for n in start) and P.PENDING not in context.state
    pend(2)
    kept = who.private(0, context, last_accepted=2)
    assert all(torch.equal(kept[n], trained[n]) for n in start) and P.PENDING not in context.state
    assert all(torch.equal(who.private(0, context, last_accepted=2)[n], trained[n]) for n in start)


# -- the wire ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_records_carry_the_payload_exactly(dtype):
    state = {"layer.C": torch.randn(4, 4), "head.bias": torch.randn(2), "scalar": torch.randn(())}
    names = tuple(state)
    payload = Payload.pack(state, names, dtype)
    record = to_record(payload)
    assert record.count_bytes() == payload.nbytes + name_bytes(record) == payload.nbytes + sum(map(len, names))
    back = from_record(record, {n: torch.float32 for n in names}, names)
    assert all(torch.equal(back.tensors[n], payload.tensors[n]) and back.tensors[n].dtype == dtype for n in names)
    assert all(back.unpack()[n].dtype == torch.float32 for n in names)
    kept = record_state(state_record(state))
    assert all(torch.equal(kept[n], state[n]) for n in names)


def test_records_refuse_what_this_run_does_not_exchange():
    record = to_record(Payload.pack({"a": torch.ones(2)}, ("a",), torch.float32))
    with pytest.raises(ValueError, match=r"missing \['b'\], unexpected \['a'\].*same config"):
        from_record(record, {"b": torch.float32}, ("b",))
    numpy = ArrayRecord({"a": Array(torch.ones(2).numpy())})
    with pytest.raises(ValueError, match="serialised as 'numpy.ndarray'.*celora.flower"):
        from_record(numpy, {"a": torch.float32}, ("a",))


def test_stats_records_cost_what_celora_counts():
    stats = ClassStats(torch.tensor([3.0, 0.0]), torch.randn(2, 5, dtype=torch.float64),
                       torch.rand(2, 5, dtype=torch.float64) + 0.1)
    record = stats_record(stats, torch.float32)
    assert record.count_bytes() == stats.nbytes(4) + name_bytes(record)
    back = record_stats(record)
    assert torch.equal(back.means, stats.means.float().double()) and back.counts.dtype == torch.float64


# -- settings --------------------------------------------------------------------------------------
def test_flower_settings_and_methods_are_checked(compose_cfg):
    with pytest.raises(ValueError, match="unknown keys \\['gpus'\\].*num_gpus=0.25"):
        FlowerSettings(client_resources={"gpus": 1})
    with pytest.raises(ValueError, match="num_gpus must be a number >= 0"):
        FlowerSettings(client_resources={"num_gpus": -1})
    with pytest.raises(ValueError, match="reply_timeout_s must be > 0 or null"):
        FlowerSettings(reply_timeout_s=0)
    from hydra.utils import instantiate

    for method in ("centralized", "local"):
        cfg = compose_cfg(*TINY, f"method={method}")
        with pytest.raises(ValueError, match="does not run in Flower.*python -m celora"):
            check_flower(cfg, instantiate(cfg.aggregator))
    cfg = compose_cfg(*TINY, "flower.client_resources.num_gpus=0.25")
    assert FlowerSettings.of(cfg).backend_config()["client_resources"] == {"num_cpus": 2, "num_gpus": 0.25}


def test_the_command_line_refuses_a_reference_method_before_ray_starts(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "celora.flower", *TINY, "method=centralized",
                           f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "does not run in Flower" in proc.stderr
    assert "Ray" not in proc.stderr and "ray" not in proc.stdout


# -- Flower's Deployment Runtime on 127.0.0.1 (minutes: a ClientApp process per message imports torch) --------
@pytest.mark.slow
def test_deployment_on_this_machine_equals_sequential(compose_cfg, tmp_path):
    """scripts/flower_deploy.sh: one SuperLink, three SuperNodes, `flwr run .`; the run dir matches `python -m celora`."""
    cfg = compose_cfg(*TINY)
    run(cfg, tmp_path / "sequential")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(["bash", str(root / "scripts" / "flower_deploy.sh"), str(tmp_path / "deploy"), *TINY],
                          capture_output=True, text=True, timeout=1200, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _assert_same_rows(_rows(tmp_path / "sequential"), _rows(tmp_path / "deploy"))


def test_the_flower_benchmark_table(monkeypatch):
    """scripts/bench_simulation.py --flower on a tiny workload: one row per engine, rounds from the difference of two
    round counts, ratios to celora sequential measured in the same run. The Flower engines' command is
    `python -m celora.flower`, whose runs the equivalence tests above check; here they are left out for CI's time
    (a whole Flower run costs a Ray start) and celora sequential stands in for the table's mechanics."""
    import scripts.bench_simulation as bench

    flower = {k: v for k, v in bench.ENGINES.items() if k.startswith("Flower")}
    assert [v[:2] for v in flower.values()] == [["-m", "celora.flower"]] * 2
    assert {v[2] for v in flower.values()} == {"flower.client_resources.num_cpus=2", "flower.client_resources.num_cpus=1"}
    monkeypatch.setattr(bench, "FEDIT", [*TINY, "logger=none", "model.dropout=0"])
    sequential = {"celora sequential": bench.ENGINES["celora sequential"]}
    monkeypatch.setattr(bench, "ENGINES", sequential)
    lines = bench.flower_bench(1, 2).splitlines()
    assert lines[0].startswith("| engine | s / round | whole run of 1 round(s)") and len(lines) == 2 + 1
    [row] = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    # a tiny round is shorter than the noise of a process start, so its seconds are only checked to be numbers
    assert row[0] == "celora sequential" and row[5] == "1.00" and math.isfinite(float(row[1])) and float(row[3]) > 0
    assert 0 <= float(row[4]) <= 1  # the final global accuracy of the 2-round run
