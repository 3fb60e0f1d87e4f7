"""Fair comparison: validation splits (client.val_fraction), the tuned presets, Fed-SB's round 0 (lora_sb)."""
import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from celora.adapters import adapter_layers
from celora.adapters.layer import base_weight_matrix
from celora.fl import lora_sb
from celora.run import run
from celora.validate import ConfigError, build
from celora.world import build_world
from conftest import CONF_DIR, TINY

pytestmark = pytest.mark.usefixtures("one_thread")
R, HIDDEN, MODULES, CLIENTS = 8, 64, 4, 3  # tiny_bert: 2 layers x (query, value), hidden 64; 3 clients


def _tune():
    spec = importlib.util.spec_from_file_location("tune", CONF_DIR.parent / "scripts" / "tune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- client.val_fraction ---------------------------------------------------------------------
def test_val_fraction_zero_keeps_the_splits_and_scores_the_test_split(compose_cfg):
    cfg = compose_cfg(*TINY)
    world = build_world(cfg)
    direct = world.parts.partition.split(world.data.train, 3, cfg.seed)
    assert world.validation is None
    assert all(np.array_equal(a.train, b.train) and np.array_equal(a.test, b.test)
               for a, b in zip(world.splits, direct))
    sim = world.simulation()
    assert len(sim.test_data) == len(world.data.test) and list(sim.test_rows) == list(range(len(world.data.test)))


def test_validation_rows_come_out_of_train_and_never_touch_test(compose_cfg):
    plain = build_world(compose_cfg(*TINY))
    world = build_world(compose_cfg(*TINY, "client.val_fraction=0.25"))
    labels = np.asarray(world.data.train["label"][:])
    for before, after in zip(plain.splits, world.splits):
        val, train = after.test, after.train
        assert not set(val) & set(train) and not set(val) & set(before.test) and not set(train) & set(before.test)
        assert sorted({*val, *train}) == sorted(before.train)
        assert len(val) == round(0.25 * len(before.train))
        assert set(labels[val]) == set(labels[before.train])  # stratified: every class of the client is in it
    sim = world.simulation()
    assert sim.test_data is not None and len(sim.test_data) == len(world.data.train)  # train rows, not test ones
    assert sorted(sim.test_rows) == sorted(np.concatenate([s.test for s in world.splits]))
    again = build_world(compose_cfg(*TINY, "client.val_fraction=0.25"))
    assert all(np.array_equal(a.test, b.test) for a, b in zip(world.splits, again.splits))


def test_a_tuning_run_says_it_is_scored_on_validation(compose_cfg, tmp_path):
    run(compose_cfg(*TINY, "client.val_fraction=0.25", "fl.rounds=1"), run_dir=tmp_path)
    part = json.loads((tmp_path / "partition.json").read_text())
    assert part["scored_on"] == "validation" and all(c["test_size"] > 0 for c in part["clients"])


@pytest.mark.parametrize("value", ["1.0", "-0.1"])
def test_val_fraction_outside_the_unit_interval_is_refused(compose_cfg, value):
    with pytest.raises(ConfigError, match="client.val_fraction"):
        build(compose_cfg(*TINY, f"client.val_fraction={value}"))


# -- tuned presets ---------------------------------------------------------------------------
TUNED = sorted(p.stem for p in (CONF_DIR / "method" / "tuned").glob("*.yaml"))


@pytest.mark.parametrize("name", TUNED)
def test_each_committed_tuned_preset_is_its_method_at_one_rate(compose_cfg, name):
    tuned, base = compose_cfg(f"method=tuned/{name}"), compose_cfg(f"method={name}")
    assert tuned.adapter == base.adapter and tuned.aggregator == base.aggregator
    assert tuned.client.lr != base.client.lr or tuned.client.lr == 2e-3
    assert tuned.client.optimizer.lr == tuned.client.lr and tuned.client.val_fraction == 0  # tests score test rows


@pytest.mark.parametrize("method", ["celora", "fed_sb", "ffa_lora"])
def test_the_written_tuned_preset_composes_to_the_chosen_rate(tmp_path, method):
    conf = shutil.copytree(CONF_DIR, tmp_path / "conf")
    (conf / "method" / "tuned").mkdir(exist_ok=True)
    (conf / "method" / "tuned" / f"{method}.yaml").write_text(_tune().tuned_yaml(method, 5e-3, 0.8))
    with initialize_config_dir(str(conf), version_base="1.3"):
        tuned = compose("config", overrides=[f"method=tuned/{method}"])
        base = compose("config", overrides=[f"method={method}"])
    assert tuned.client.lr == 5e-3 and tuned.adapter == base.adapter and tuned.aggregator == base.aggregator


def test_choose_picks_the_best_validation_rate_and_names_incomplete_methods(tmp_path, monkeypatch):
    tune = _tune()
    rates = (1e-3, 2e-3, 5e-3)
    monkeypatch.setattr(tune, "grid", lambda method: rates)
    accs = {"lora": (0.6, 0.7, 0.65), "tri": (0.7, 0.8, 0.8), "celora": (0.9,), "ffa_lora": (0.5, 0.6, 0.7)}
    for method, values in accs.items():
        for lr, acc in zip(rates, values):
            d = tmp_path / "runs" / method / f"lr={lr:g}"
            (d / ".hydra").mkdir(parents=True)
            (d / ".hydra" / "config.yaml").write_text(f"client: {{lr: {lr}, val_fraction: 0.2}}\n")
            (d / ".hydra" / "hydra.yaml").write_text(f"hydra: {{runtime: {{choices: {{method: {method}}}}}}}\n")
            (d / "metrics.jsonl").write_text(json.dumps({"round": 15, "personal/acc": acc}) + "\n")
            (d / "summary.json").write_text(json.dumps({"time/total_s": 1800}))
    monkeypatch.setattr(tune, "method_file", lambda m: CONF_DIR / "method" / f"{m}.yaml")
    methods = [*accs, "fed_sb"]
    (tmp_path / "tuned").mkdir()
    (tmp_path / "tuned" / "celora.yaml").write_text("client: {lr: 0.1}\n")  # an earlier choice its runs no longer make
    md = tune.choose(tmp_path / "no-sweep-here", tmp_path / "runs", tmp_path / "tuned", tmp_path / "tuning.md", methods)
    table, missing = tune.choices(tmp_path / "runs", methods)
    chosen = dict(zip(table["method"], table["chosen lr"]))
    assert chosen == {"lora": 2e-3, "tri": 2e-3}  # a tie goes to the smaller rate
    assert sorted(missing) == ["celora (1 rates finished; to run: 0.002, 0.005)",
                               "fed_sb (0 rates finished; to run: 0.001, 0.002, 0.005)",  # never run: named too
                               "ffa_lora (3 rates finished; to run: 0.01)"]  # its best is the largest tried
    assert "celora" in md and "ffa_lora" in md and "fed_sb" in md and "10 runs, 5.0 h of run time" in md
    assert "lr: 0.002" in (tmp_path / "tuned" / "lora.yaml").read_text()
    assert not (tmp_path / "tuned" / "celora.yaml").exists() and not (tmp_path / "tuned" / "ffa_lora.yaml").exists()
    assert set(table["note"]) == {""}  # inner choices


def test_a_choice_at_the_limit_of_the_grid_is_marked(tmp_path, monkeypatch):
    tune = _tune()
    monkeypatch.setattr(tune, "grid", lambda method: (0.1, 0.2))
    monkeypatch.setattr(tune, "finished_scores", lambda root: {"lora": {0.1: 0.6, 0.2: 0.7}})
    table, missing = tune.choices(tmp_path, ["lora"])
    assert not missing and list(table["chosen lr"]) == [0.2]  # LIMITS: the grid grows no further
    assert list(table["note"]) == ["at the limit of the rates tried"]


def test_a_grid_grows_past_a_best_rate_at_its_edge_within_limits(monkeypatch):
    tune = _tune()
    monkeypatch.setattr(tune, "grid", lambda method: (5e-4, 1e-3, 2e-3))
    assert tune.wanted("lora", {}) == [5e-4, 1e-3, 2e-3]
    assert tune.wanted("lora", {5e-4: 0.7, 1e-3: 0.8}) == [2e-3]  # the grid first
    assert tune.wanted("lora", {5e-4: 0.7, 1e-3: 0.8, 2e-3: 0.75}) == []  # an inner best: done
    assert tune.wanted("lora", {5e-4: 0.7, 1e-3: 0.75, 2e-3: 0.8}) == [5e-3]  # up the 1-2-5 series
    assert tune.wanted("lora", {5e-4: 0.7, 1e-3: 0.75, 2e-3: 0.8, 5e-3: 0.9}) == [1e-2]
    assert tune.wanted("lora", {5e-4: 0.9, 1e-3: 0.8, 2e-3: 0.8}) == [2e-4]  # and down
    assert tune.wanted("lora", {5e-4: 0.8, 1e-3: 0.8, 2e-3: 0.7}) == [2e-4]  # a tie goes to the smaller rate
    assert tune.wanted("lora", {1e-5: 0.9, 5e-4: 0.7, 1e-3: 0.6, 2e-3: 0.5}) == []  # at the limit
    assert tune.wanted("lora", {5e-4: 0.1, 1e-3: 0.2, 2e-3: 0.3, 0.2: 0.4}) == []
    assert tune.best_rate({0.1: 0.5, 0.01: 0.5, 0.05: 0.4}) == 0.01


# -- Fed-SB ----------------------------------------------------------------------------------
def _fed_sb(compose_cfg, *extra):
    world = build_world(compose_cfg(*TINY, "method=fed_sb", *extra))
    return world, world.simulation()


def test_lora_sb_factors_are_the_truncated_svd_of_the_weighted_mean_gradient(compose_cfg):
    world, sim = _fed_sb(compose_cfg)
    up, down = sim.init_factors()
    # the same clients' gradients, computed one by one on an untouched world, and weighted by hand
    other = build_world(compose_cfg(*TINY, "method=fed_sb"))
    osim = other.simulation()
    grads = [lora_sb.client_gradient(other.model, osim.fitting.task, osim.train_data, s.train, 8, 0, i, osim.collate)
             for i, s in enumerate(other.splits)]
    sizes = np.array([len(s.train) for s in other.splits], dtype=float)
    params = dict(world.model.named_parameters())
    for name in grads[0]:
        mean = sum(g[name].double() * n for g, n in zip(grads, sizes / sizes.sum()))
        a, b = params[f"{name}.lora_A"].double(), params[f"{name}.lora_B"].double()
        eye = torch.eye(R, dtype=torch.float64)
        assert torch.allclose(a @ a.T, eye, atol=1e-6) and torch.allclose(b.T @ b, eye, atol=1e-6)
        s = torch.linalg.svdvals(mean)
        # B^T G A^T is diag(top-r singular values): the factors span G's top-r singular subspaces
        core = b.T @ mean @ a.T
        assert torch.allclose(core, torch.diag(s[:R]), atol=1e-5 * s[0].item())
    first = f"{next(iter(grads[0]))}.lora_A"  # the untouched world still holds tri's seeded placeholder
    assert not torch.allclose(params[first], dict(other.model.named_parameters())[first])


def test_lora_sb_init_is_deterministic_and_one_for_every_client(compose_cfg):
    (_, a), (_, b) = _fed_sb(compose_cfg), _fed_sb(compose_cfg)
    a.init_factors(), b.init_factors()
    assert a.frozen.keys() == b.frozen.keys() and all(torch.equal(a.frozen[k], b.frozen[k]) for k in a.frozen)
    assert len(a.frozen) == 2 * MODULES  # one A and one B per module, sent alike to every client


def test_lora_sb_round_zero_bytes_equal_the_formula(compose_cfg, tmp_path):
    run(compose_cfg(*TINY, "method=fed_sb", "fl.wire_dtype=bf16"), run_dir=tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    values_up = MODULES * HIDDEN * HIDDEN          # each client: a 64 x 64 gradient per module
    values_down = MODULES * R * (HIDDEN + HIDDEN)  # each client: A (8 x 64) and B (64 x 8) per module
    assert rows[0]["comm/up_bytes"] == CLIENTS * values_up * 2
    assert rows[0]["comm/down_bytes"] == 8 * CLIENTS + CLIENTS * values_down * 2
    per_round = 2 * (MODULES * R * R + HIDDEN * 2 + 2)  # then C and the head, as tri + FedAvg
    assert rows[1]["comm/up_bytes"] == CLIENTS * per_round
    world = build_world(compose_cfg(*TINY, "method=fed_sb"))
    assert lora_sb.round_zero_bytes(world.model, CLIENTS, 2) == (CLIENTS * values_up * 2, CLIENTS * values_down * 2)
    assert all(base_weight_matrix(layer.base_layer).shape == (HIDDEN, HIDDEN) for layer in adapter_layers(world.model))


def test_lora_sb_leaves_the_base_weights_and_flags_untouched(compose_cfg):
    world, sim = _fed_sb(compose_cfg)
    before = {n: p.detach().clone() for n, p in world.model.named_parameters() if "lora_" not in n}
    flags = {n: p.requires_grad for n, p in world.model.named_parameters()}
    sim.init_factors()
    after = dict(world.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert flags == {n: p.requires_grad for n, p in world.model.named_parameters()}


def test_lora_sb_factors_survive_a_checkpoint(compose_cfg):
    _, sim = _fed_sb(compose_cfg)
    sim.init_factors()
    world, fresh = _fed_sb(compose_cfg)
    fresh.load_state_dict(sim.state_dict())
    params = dict(world.model.named_parameters())
    assert all(torch.equal(params[n].detach(), v.to(params[n].dtype)) for n, v in sim.frozen.items())


@pytest.mark.parametrize("extra, match", [
    (["method=fed_sb", "aggregator=local"], "aggregator"),
    (["adapter=lora", "adapter.init=lora_sb"], "tri"),
    (["method=fed_sb", "privacy=client"], "privacy"),
])
def test_lora_sb_in_a_setting_it_cannot_run_is_refused(compose_cfg, extra, match):
    with pytest.raises(ConfigError, match=match):
        build(compose_cfg(*TINY, *extra))


# -- the report: paired differences, the frontier -------------------------------------------
def test_pareto_keeps_the_points_nothing_beats():
    from celora.analysis import pareto

    x = np.array([1, 2, 3, 4, 4, 10.0])
    y = np.array([0.5, 0.7, 0.6, 0.8, 0.8, 0.75])
    assert pareto(x, y).tolist() == [True, True, False, True, True, False]  # equal points both stay


def _runs():
    import pandas as pd

    rows = []
    acc = {"celora": (0.80, 0.82, 0.81), "lora": (0.78, 0.79, 0.77), "tri": (0.70, 0.71, 0.72),
           "centralized": (0.95, 0.95, 0.95)}
    for split, shift in (("a", 0.0), ("b", -0.1)):
        for method, values in acc.items():
            for seed, v in zip((1, 2, 3), values):
                v = v + (shift if method == "celora" else 0)
                rows.append({"split": split, "method": f"tuned/{method}", "seed": seed, "personal/acc": v,
                             "global/acc": v - 0.01, "comm/up_bytes_cum": {"lora": 2e7}.get(method, 1e6) * seed})
    return pd.DataFrame(rows)


def test_paired_differences_against_the_best_baseline_of_each_split():
    from celora.analysis import paired

    table = paired(_runs(), ["split"], "method", ["tuned/celora"], exclude=("tuned/centralized",))
    assert table["best baseline"].tolist() == ["tuned/lora", "tuned/lora"]  # centralized is no baseline
    a, b = table.to_dict("records")
    assert a["difference mean"] == pytest.approx(0.03) and a["n"] == 3 and a["verdict"] == "win"
    assert b["difference mean"] == pytest.approx(-0.07) and b["verdict"] == "loss"
    assert a["per seed"] == "1: +0.020, 2: +0.030, 3: +0.040"


def test_paired_without_a_split_key_compares_over_all_runs_as_one_split():
    from celora.analysis import paired

    one = _runs()[lambda d: d.split == "b"].drop(columns="split")  # e.g. report.py on one split's dir, --by method
    (row,) = paired(one, [], "method", ["tuned/celora"], exclude=("tuned/centralized",)).to_dict("records")
    assert row["best baseline"] == "tuned/lora" and row["difference mean"] == pytest.approx(-0.07)


def test_paired_within_a_byte_budget_takes_the_best_baseline_that_sends_no_more():
    from celora.analysis import paired

    runs = _runs()[lambda d: d.split == "a"]  # lora: 40 MB, celora and tri: 2 MB on average
    (row,) = paired(runs, ["split"], "method", ["tuned/celora"], exclude=("tuned/centralized",),
                    budget="comm/up_bytes_cum").to_dict("records")
    assert row["best baseline"] == "tuned/tri" and row["difference mean"] == pytest.approx(0.10)
    assert row["comm/up_bytes_cum baseline"] <= row["comm/up_bytes_cum ours"] == 2e6
    cheaper = runs.assign(**{"comm/up_bytes_cum": runs["comm/up_bytes_cum"] * (1 + (runs.method == "tuned/tri"))})
    assert paired(cheaper, ["split"], "method", ["tuned/celora"], exclude=("tuned/centralized",),
                  budget="comm/up_bytes_cum").empty  # no baseline within the budget: no row


def test_paired_skips_an_arm_without_the_metric_and_a_seed_the_baseline_lacks():
    """global/acc: a local head has no global model (NaN), so no row, not a 'tie' of NaN differences."""
    import math

    import pandas as pd

    from celora.analysis import paired

    runs = _runs()[lambda d: d.split == "a"]
    head = runs[runs.method == "tuned/celora"].assign(method="tuned/celora_local_head", **{"global/acc": math.nan})
    runs = pd.concat([runs, head], ignore_index=True)
    runs.loc[(runs.method == "tuned/lora") & (runs.seed == 3), "global/acc"] = math.nan  # the baseline lacks seed 3
    table = paired(runs, ["split"], "method", ["tuned/celora", "tuned/celora_local_head"], "global/acc",
                   exclude=("tuned/centralized",))
    (row,) = table.to_dict("records")
    assert row["method"] == "tuned/celora" and row["n"] == 2 and row["per seed"] == "1: +0.020, 2: +0.030"


def test_frontier_figure_has_a_panel_per_accuracy_and_marks_the_front():
    from celora.analysis import frontier

    fig = frontier(_runs()[lambda d: d.split == "a"], ["method", "seed"])
    axes = fig.get_axes()
    assert [ax.get_ylabel() for ax in axes] == ["personal/acc", "global/acc"]
    assert all("Pareto front" in [line.get_label() for line in ax.get_lines()] for ax in axes)
    assert all(ax.get_xscale() == "log" for ax in axes)


def test_lora_sb_is_refused_by_the_flower_apps_with_the_command_that_runs_it(compose_cfg):
    from celora.flower.settings import check_flower

    cfg = compose_cfg(*TINY, "method=fed_sb")
    with pytest.raises(ValueError, match="python -m celora"):
        check_flower(cfg, build(cfg).aggregator)


def test_a_relaunched_tuning_sweep_returns_its_finished_runs(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "celora", "-m", "experiment=tune", *TINY, "partition=dirichlet", "method=tri",
           "client.lr=1e-3,2e-3", f"hydra.sweep.dir={tmp_path}"]
    first = subprocess.run(cmd, cwd=CONF_DIR.parent, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.glob("lr=*")) == ["lr=0.001", "lr=0.002"]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("lr=*/metrics.jsonl")}
    again = subprocess.run(cmd, cwd=CONF_DIR.parent, capture_output=True, text=True, timeout=600)
    said = again.stdout + again.stderr
    assert again.returncode == 0 and said.count("nothing to do") == 2, said[-2000:]
    assert {p: p.stat().st_mtime_ns for p in before} == before  # not one metrics row rewritten
    part = json.loads((tmp_path / "lr=0.001" / "partition.json").read_text())
    assert part["scored_on"] == "validation"


def test_kept_runs_restored_on_another_machine_are_not_rerun(compose_cfg, tmp_path):
    from celora import archive

    cfg = compose_cfg(*TINY)
    first = run(cfg, run_dir=tmp_path / "sweep" / "a")
    legacy = json.loads((tmp_path / "sweep" / "a" / "summary.json").read_text())
    legacy.pop("config")  # as written before summaries carried it: the checkpoint supplies it
    (tmp_path / "sweep" / "a" / "summary.json").write_text(json.dumps(legacy))
    kept = archive.keep(tmp_path / "sweep", tmp_path / "results")
    assert kept == [tmp_path / "results" / "a"] and not (tmp_path / "results" / "a" / "checkpoints").exists()
    assert json.loads((kept[0] / "summary.json").read_text())["config"] == first["config"]

    assert archive.restore(tmp_path / "results", tmp_path / "fresh") == [tmp_path / "fresh" / "a"]
    rows = (tmp_path / "fresh" / "a" / "metrics.jsonl").read_text()
    again = run(cfg, run_dir=tmp_path / "fresh" / "a")  # no checkpoint there: the summary says it is done
    assert again["last"] == first["last"] and (tmp_path / "fresh" / "a" / "metrics.jsonl").read_text() == rows
    assert not (tmp_path / "fresh" / "a" / "checkpoints").exists()
    assert archive.restore(tmp_path / "results", tmp_path / "fresh") == []  # a finished dir is left alone
    other = run(compose_cfg(*TINY, "client.lr=1e-3"), run_dir=tmp_path / "fresh" / "a")  # another config: it runs
    assert other["config"] != first["config"] and (tmp_path / "fresh" / "a" / "checkpoints").exists()


@pytest.mark.parametrize("method", ["tri", "celora", "lora", "ffa_lora", "fed_sb"])
def test_a_frontier_run_at_r8_is_the_main_tables_dirichlet_05_seed_1_run(tmp_path, method):
    """scripts/main_table.sh takes these runs from the frontier instead of running them twice."""
    from celora.run import result_config

    conf = shutil.copytree(CONF_DIR, tmp_path / "conf")
    (conf / "method" / "tuned").mkdir(exist_ok=True)
    (conf / "method" / "tuned" / f"{method}.yaml").write_text(_tune().tuned_yaml(method, 5e-3, 0.8))
    with initialize_config_dir(str(conf), version_base="1.3"):
        front = compose("config", overrides=["experiment=frontier", f"method=tuned/{method}", "adapter.r=8"])
        table = compose("config", overrides=["experiment=main_table", "+split=dirichlet_0.5",
                                             f"method=tuned/{method}", "seed=1"])
        other = compose("config", overrides=["experiment=main_table", "+split=dirichlet_0.1",
                                             f"method=tuned/{method}", "seed=1"])
    assert result_config(front) == result_config(table) != result_config(other)


# -- a server optimizer's or FedProx's second rate (scripts/tune.py server) ------------------------
def _server_runs(root, method, key, accs):
    for x, acc in accs.items():
        d = root / method / f"{key.rsplit('.', 1)[-1]}={x:g}"
        (d / ".hydra").mkdir(parents=True)
        section, leaf = key.split(".")
        client = {"lr": 0.002, "val_fraction": 0.2, **({leaf: x} if section == "client" else {})}
        config = {"client": client, **({section: {leaf: x}} if section != "client" else {})}
        (d / ".hydra" / "config.yaml").write_text(json.dumps(config))
        (d / ".hydra" / "hydra.yaml").write_text(f"hydra: {{runtime: {{choices: {{method: {method}}}}}}}\n")
        (d / "metrics.jsonl").write_text(json.dumps({"round": 15, "personal/acc": acc}) + "\n")
        (d / "summary.json").write_text(json.dumps({"time/total_s": 600}))


def test_server_choose_writes_both_rates_and_the_preset_composes_to_them(tmp_path):
    tune = _tune()
    conf = shutil.copytree(CONF_DIR, tmp_path / "conf")
    tuned = conf / "method" / "tuned"
    _server_runs(tmp_path / "runs", "lora_fedadam", "server.eta", {5e-3: 0.70, 1e-2: 0.74, 2e-2: 0.72})
    _server_runs(tmp_path / "runs", "tri_fedprox", "client.prox_mu", {1e-3: 0.6, 1e-2: 0.65, 1e-1: 0.62})
    _server_runs(tmp_path / "runs", "tri_fedavgm", "server.eta", {0.2: 0.5, 0.5: 0.6, 1.0: 0.7})  # best at the edge
    methods = ["lora_fedadam", "tri_fedprox", "tri_fedavgm"]
    md = tune.choose_server(tmp_path / "none", tmp_path / "runs", tuned, tmp_path / "t.md", methods)
    assert "tri_fedavgm (3 rates finished; to run: 2)" in md and not (tuned / "tri_fedavgm.yaml").exists()
    with initialize_config_dir(str(conf), version_base="1.3"):
        adam = compose("config", overrides=["method=tuned/lora_fedadam"])
        prox = compose("config", overrides=["method=tuned/tri_fedprox"])
        base_lora = compose("config", overrides=["method=tuned/lora"])
        base_tri = compose("config", overrides=["method=tuned/tri"])
    assert adam.server.optimizer == "adam" and adam.server.eta == 1e-2 and adam.client.lr == base_lora.client.lr
    assert adam.adapter == base_lora.adapter and adam.aggregator == base_lora.aggregator
    assert prox.client.prox_mu == 1e-2 and prox.server.optimizer is None and prox.client.lr == base_tri.client.lr
    assert tune.wanted("x", {0.2: 0.5, 0.5: 0.6, 1.0: 0.7}, tune.SERVER_AXES["fedavgm"]) == [2.0]
    with pytest.raises(SystemExit, match="is not <base>_<variant>"):
        tune.split_variant("lora")
