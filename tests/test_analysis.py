"""Sweeps and analysis: one tiny joblib multirun (2 methods x 2 seeds), read by load_runs, the report and the notebook."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from celora.analysis import load_runs, majority_accuracy, per_run, results, swept_keys
from celora.metrics import KEYS
from celora.run import run
from conftest import CONF_DIR, TINY

ROOT = Path(__file__).resolve().parents[1]
METHODS, SEEDS, ROUNDS = ("lora", "celora"), (0, 1), (0, 1, 2)


def _env(**extra) -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """4 tiny jobs, 2 at a time in the joblib launcher's worker processes, each into its own run dir."""
    out = tmp_path_factory.mktemp("sweep") / "multirun"
    cmd = [sys.executable, "-m", "celora", "-m", *TINY, f"method={','.join(METHODS)}",
           f"seed={','.join(map(str, SEEDS))}", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
           f"hydra.sweep.dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_joblib_multirun_gives_each_job_its_dir_and_metrics(sweep):
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    for job in jobs:
        rows = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == list(ROUNDS)
        assert (job / "summary.json").exists() and (job / ".hydra" / "config.yaml").exists()
        assert "JoblibLauncher" in (job / ".hydra" / "hydra.yaml").read_text()
    assert {(job / "weights.jsonl").exists() for job in jobs} == {True, False}  # celora's jobs only


@pytest.mark.parametrize("launcher, target", [("joblib", "JoblibLauncher"), ("slurm", "SlurmLauncher")])
def test_launcher_configs_compose(launcher, target):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}", "experiment=main_table"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    assert cfg.hydra.sweeper.params["+split"] == "dirichlet_0.1,dirichlet_0.5,grouped"
    assert cfg.hydra.sweeper.params.seed == "1,2,3"  # seed 0 chose the learning rates


def test_load_runs_one_row_per_run_and_round(sweep):
    df = load_runs(sweep)
    assert len(df) == len(METHODS) * len(SEEDS) * len(ROUNDS)
    assert {"run", "status", "method", "adapter._target_", "partition._target_", "seed", *KEYS} <= set(df)
    assert set(df["status"]) == {"finished"}
    assert df.groupby(["method", "seed"]).size().to_dict() == {(m, s): 3 for m in METHODS for s in SEEDS}
    assert set(df.loc[df["method"] == "celora", "adapter._target_"]) == {"celora.adapters.AdapterConfig"}
    assert swept_keys(df) == ["method"]
    table = results(df)
    assert set(table["method"]) == set(METHODS) and list(table["n"]) == [2, 2]
    assert {"personal acc final mean", "personal acc best std", "uplink MB final mean"} <= set(table)


def test_swept_keys_leave_out_seed_constants_and_implied_keys():
    import pandas as pd

    df = pd.DataFrame({
        "run": ["0", "1", "2", "3"],
        "overrides": ["method=lora experiment=a seed=0", "method=lora experiment=a seed=1",
                      "method=tri partition.alpha=0.5 seed=0", "+method=tri partition.alpha=0.5 seed=1"],
        "method": ["lora", "lora", "tri", "tri"], "experiment": ["a", "a", None, None],
        "adapter.name": ["lora", "lora", "tri", "tri"], "partition.alpha": [0.5] * 4, "seed": [0, 1, 0, 1],
    })
    assert swept_keys(df) == ["method"]  # experiment=a changes nothing method does not; alpha is constant
    df["partition.alpha"] = [0.1, 0.1, 0.5, 0.5]
    df["overrides"] = [o + " partition.alpha=0.1" * (i < 2) for i, o in enumerate(df["overrides"])]
    assert swept_keys(df) == ["method"]  # alpha goes with method here: one of them tells the groups apart
    df["partition.alpha"] = [0.1, 0.5, 0.1, 0.5]
    assert swept_keys(df) == ["method", "partition.alpha"]


def test_load_runs_reports_a_crashed_and_a_running_run(sweep, tmp_path, compose_cfg):
    for job in ("0", "1"):
        shutil.copytree(sweep / job, tmp_path / job)
    with pytest.raises(ValueError):
        run(compose_cfg(*TINY, "adapter.r=100"), run_dir=tmp_path / "2")  # fails after partition.json
    assert "ValueError" in json.loads((tmp_path / "2" / "failed.json").read_text())["error"]
    shutil.copytree(sweep / "2", tmp_path / "3")  # still running: no summary, a line half written
    (tmp_path / "3" / "summary.json").unlink()
    lines = (tmp_path / "3" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "3" / "metrics.jsonl").write_text("\n".join(lines[:-1] + [lines[-1][:20]]))

    with pytest.warns(UserWarning, match=r"2 of 4 runs .* not finished: 2 \(failed: ValueError.*\), 3 \(running\)"):
        df = load_runs(tmp_path)
    status = df.drop_duplicates("run").set_index("run")["status"].to_dict()
    assert status == {"0": "finished", "1": "finished", "2": "failed", "3": "running"}
    assert df.loc[df["run"] == "2", "round"].isna().all()  # one row, nothing logged
    assert list(df.loc[df["run"] == "3", "round"]) == [0, 1]
    assert results(df[df["status"] == "finished"], by=["method"])["n"].sum() == 2


def test_figures_take_a_panel_per_value_of_the_first_of_several_keys(sweep):
    """`--by split method` on the main table: one panel per split, one line per method, one colour per method in
    every panel. Here: a panel per method, a line per seed, each line the run's own logged accuracy."""
    from celora.analysis import accuracy_by_round, accuracy_vs_bytes

    df = load_runs(sweep)
    for figure in (accuracy_by_round, accuracy_vs_bytes):
        fig = figure(df, "personal/acc", ["method", "seed"])
        axes = fig.get_axes()
        assert sorted(ax.get_title() for ax in axes) == ["method=celora", "method=lora"]
        assert [t.get_text() for t in fig.legends[0].get_texts()] == ["0", "1"]
        for ax in axes:
            method = ax.get_title().removeprefix("method=")
            lines = {line.get_label(): line for line in ax.get_lines()}
            assert sorted(lines) == ["0", "1"]
            for seed, line in lines.items():
                rows = df[(df["method"] == method) & (df["seed"] == int(seed))].dropna(subset=["personal/acc"])
                if figure is accuracy_vs_bytes:
                    rows = rows[rows["comm/up_bytes_cum"] > 0]
                assert list(line.get_ydata()) == list(rows["personal/acc"])
        colours = {(ax.get_title(), line.get_label()): line.get_color() for ax in axes for line in ax.get_lines()}
        assert colours[("method=lora", "0")] == colours[("method=celora", "0")] != colours[("method=lora", "1")]
        one = figure(df, "personal/acc", ["method"])
        assert len(one.get_axes()) == 1 and [t.get_text() for t in one.legends[0].get_texts()] == list(METHODS)


def test_report_writes_table_csv_and_plots(sweep, tmp_path):
    proc = subprocess.run([sys.executable, "scripts/report.py", str(sweep), "--out", str(tmp_path)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("| method | n | global acc final")
    for name in ("results.md", "results.csv", "runs.csv", "accuracy_by_round.png", "accuracy_vs_bytes.png",
                 "partition.png", "weights.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    lines = (tmp_path / "results.md").read_text().splitlines()
    assert sum(line.startswith("| ") for line in lines) == 1 + len(METHODS)  # the header, one row a method
    seconds = sum(json.loads(p.read_text())["time/total_s"] for p in sweep.rglob("summary.json"))
    assert lines[-1] == f"{len(METHODS) * len(SEEDS)} runs, {seconds / 3600:.1f} h of run time in all (the sum of their time/total_s)."


def test_report_paired_against_the_best_baseline_and_within_its_bytes(sweep, tmp_path):
    import pandas as pd

    proc = subprocess.run([sys.executable, "scripts/report.py", str(sweep), "--by", "method", "--paired", "--out", str(tmp_path)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = pd.read_csv(tmp_path / "paired.csv").to_dict("records")
    final = per_run(load_runs(sweep)).groupby("method")["personal/acc"].mean()  # the last round's, mean over seeds
    assert row["method"] == "celora" and row["best baseline"] == "lora" and row["n"] == len(SEEDS)
    assert row["difference mean"] == pytest.approx(final["celora"] - final["lora"], rel=1e-12)
    # celora sends fewer bytes than lora, the only baseline: nothing to pair within its budget
    assert "No baseline sends as few bytes as ours." in (tmp_path / "paired.md").read_text()
    assert not (tmp_path / "paired_bytes.csv").exists()
    prior = [majority_accuracy(next(p.parent for p in sweep.rglob("summary.json")
                                    if json.loads(p.read_text())["config"]["seed"] == s)) for s in SEEDS]
    mean, std = np.mean(prior), np.std(prior, ddof=1)
    assert f"reaches on its local test rows: all {mean:.3f} ± {std:.3f} (n = {len(SEEDS)})." in (tmp_path / "paired.md").read_text()


def test_majority_accuracy_is_each_clients_commonest_train_class_on_its_test_rows(tmp_path):
    clients = [{"train_counts": [8, 2], "test_counts": [3, 1]}, {"train_counts": [1, 9], "test_counts": [2, 2]},
               {"train_counts": [0, 0, 5], "test_counts": [1, 0, 0]}]
    (tmp_path / "partition.json").write_text(json.dumps({"clients": clients}))
    assert majority_accuracy(tmp_path) == (3 + 2 + 0) / (4 + 4 + 1)  # example-weighted, as personal/acc


def test_notebook_executes(sweep, tmp_path, monkeypatch):
    import nbclient
    import nbformat

    for key, value in _env(CELORA_RUNS=str(sweep)).items():
        monkeypatch.setenv(key, value)  # the kernel inherits them
    nb = nbformat.read(ROOT / "notebooks" / "analysis.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4  # by round, against bytes, partition, weights


class _FakeWandb:
    """Stands in for wandb.init's run: records init arguments, logged rows and images, summary."""

    class Image:
        def __init__(self, fig):
            self.fig = fig

    def __init__(self):
        self.inits, self.logged, self.summary, self.finished = [], [], {}, 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, row, step=None):
        self.logged.append((step, row))

    def finish(self):
        self.finished += 1


def test_wandb_gets_config_rows_images_summary_and_sweep_group(tmp_path, monkeypatch):
    import numpy as np
    import wandb

    from celora.metrics import Metrics, WandbSink, summarize

    fake = _FakeWandb()
    monkeypatch.setattr(wandb, "init", fake.init)
    monkeypatch.setattr(wandb, "Image", _FakeWandb.Image)
    (tmp_path / "partition.json").write_text(json.dumps({"label_names": ["neg", "pos"], "groups": None, "clients": [
        {"client": i, "train_counts": [5 + i, 7 - i]} for i in range(3)]}))
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):  # as inside a multirun job
        hydra = compose("config", overrides=["hydra.mode=MULTIRUN", "hydra.sweep.dir=multirun/sweep_x"],
                        return_hydra_config=True)
    hydra.hydra.job.override_dirname = "method=celora,seed=0"
    HydraConfig.instance().set_config(hydra)
    try:
        sink = WandbSink(dir=str(tmp_path))
        metrics = Metrics(tmp_path, sink)
        sink.log_config({"seed": 0})
    finally:
        HydraConfig.instance().cfg = None
    for rnd, acc in enumerate((0.5, 0.8, 0.7)):
        metrics.log({"round": rnd, "personal/acc": acc, "global/acc": float("nan"), "comm/up_bytes_cum": 10 * rnd})
        if rnd:
            metrics.log_matrix("weights", rnd, [0, 1, 2], np.eye(3))
    summary = {**summarize(metrics.rows), "time/total_s": 1.5}
    sink.finish(summary)

    (init,) = fake.inits
    assert init["mode"] == "offline" and init["config"] == {"seed": 0} and init["dir"] == str(tmp_path)
    assert init["group"] == "multirun/sweep_x" and init["name"] == "method=celora,seed=0"
    images = {k: v for _, row in fake.logged for k, v in row.items() if isinstance(v, _FakeWandb.Image)}
    assert set(images) == {"partition/train_labels", "matrix/weights"}
    assert [step for step, row in fake.logged if "personal/acc" in row] == [0, 1, 2]
    steps = [step for step, _ in fake.logged]
    assert steps == sorted(steps)  # W&B drops a row whose step goes back
    assert fake.summary["last/personal/acc"] == 0.7 and fake.summary["best/personal/acc"] == 0.8
    assert fake.summary["best_round/personal/acc"] == 1 and fake.summary["time/total_s"] == 1.5
    assert "last/global/acc" not in fake.summary and fake.finished == 1  # undefined stays out


def test_grouped_bars_and_image_grid_draw_what_they_are_given():
    import numpy as np

    from celora.plots import grouped_bars, image_grid

    fig = grouped_bars({"full": {"none": 1.0, "dp": 0.5}, "tri": {"none": 0.0}}, "F1")
    heights = [p.get_height() for p in fig.axes[0].patches]  # member by member: none (full, tri), dp (full, tri)
    assert heights[:3] == [1.0, 0.0, 0.5] and np.isnan(heights[3])  # the missing tri/dp bar is a gap
    grid = image_grid({"original": np.zeros((3, 1, 8, 8)), "full": np.ones((2, 3, 8, 8))})
    assert len(grid.axes) == 2 * 3 and sum(len(ax.images) for ax in grid.axes) == 5


def test_group_weight_share(tmp_path):
    from celora.analysis import group_weight_share

    clients = [{"client": i, "train_size": n} for i, n in enumerate([10, 30, 20, 40])]
    (tmp_path / "partition.json").write_text(json.dumps({"groups": [0, 0, 1, 1], "clients": clients}))
    rows = [{"round": 1, "clients": [0, 1, 2], "matrix": [[0.5, 0.3, 0.2], [0.1, 0.8, 0.1], [0.4, 0.4, 0.2]]},
            {"round": 2, "clients": [1, 3], "matrix": [[1.0, 0.0], [0.25, 0.75]]}]
    (tmp_path / "weights.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    share = group_weight_share(tmp_path)

    assert share["own"].tolist() == pytest.approx([0.8, 0.9, 0.2, 1.0, 0.75])
    # FedAvg: the own group's share of the round's examples (round 1: 10 + 30 of 60; round 2: 30 of 70, 40 of 70)
    assert share["fedavg"].tolist() == pytest.approx([40 / 60, 40 / 60, 20 / 60, 30 / 70, 40 / 70])
    assert share["group"].tolist() == [0, 0, 1, 0, 1]
    (tmp_path / "partition.json").write_text(json.dumps({"groups": None, "clients": clients}))
    with pytest.raises(ValueError, match="no latent groups"):
        group_weight_share(tmp_path)


def test_a_celora_arm_with_a_server_optimizer_or_fedprox_is_ours_and_a_lora_one_a_baseline():
    import importlib.util

    spec = importlib.util.spec_from_file_location("report", Path(__file__).parents[1] / "scripts" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    names = ["tuned/celora", "tuned/celora_fedadam", "celora_local_head_fedprox", "tuned/lora_fedadam", "lora",
             "tuned/tri_fedavgm", "celora_extra"]
    assert report.arms(names, report.OURS) == ["tuned/celora", "tuned/celora_fedadam", "celora_local_head_fedprox"]
    assert report.arms(names, ("lora",)) == ["tuned/lora_fedadam", "lora"]
