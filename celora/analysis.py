"""Results as one table: run dirs (a run, a multirun, or a tree of them) to a DataFrame, and its aggregates over seeds."""
from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from celora import plots
from celora.metrics import KEYS

# Columns that describe a run rather than its config or metrics.
RUN_COLUMNS = ("run", "status", "error", "overrides", "path")
ACCURACIES = ("global/acc", "personal/acc", "personal/acc_worst10")


def _natural(path: Path) -> list:
    """Sort key under which multirun job dirs go 0, 1, 2, ..., 10 rather than 0, 1, 10, 2."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.as_posix())]


def find_runs(path: str | Path) -> list[Path]:
    """Every run dir at or under `path`: a dir holding a Hydra `.hydra/config.yaml`, a `metrics.jsonl`
    or a `failed.json`."""
    root = Path(path)
    marks = [p.parent.parent for p in root.rglob(".hydra/config.yaml")]
    marks += [p.parent for name in ("metrics.jsonl", "failed.json") for p in root.rglob(name)]
    return sorted({m for m in marks if "wandb" not in m.relative_to(root).parts}, key=_natural)


def _flatten(node, prefix: str = "") -> dict:
    """Nested config to dotted keys; lists become JSON strings so every value is hashable."""
    if isinstance(node, dict) and node:
        out = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(node, (list, dict)):
        node = json.dumps(node)
    return {prefix[:-1]: node}


def _read_jsonl(path: Path) -> tuple[list[dict], int]:
    """The rows of a jsonl file and the number of unreadable lines (a line being written, say)."""
    rows, bad = [], 0
    for line in path.read_text().splitlines() if path.exists() else ():
        try:
            rows.append(json.loads(line))  # accepts the NaN literals of older runs too
        except json.JSONDecodeError:
            bad += 1
    return rows, bad


def _status(run: Path) -> tuple[str, str | None]:
    if (run / "summary.json").exists():
        return "finished", None
    if (run / "failed.json").exists():
        try:
            return "failed", json.loads((run / "failed.json").read_text())["error"]
        except (json.JSONDecodeError, KeyError):
            return "failed", "unreadable failed.json"
    return "running", None  # or killed without a trace: a process kill leaves nothing to read


def load_run(run: Path, root: Path) -> list[dict]:
    """One dict per evaluated round of one run dir (one row with round NaN when it has none yet)."""
    hydra_dir = run / ".hydra"
    config, choices, overrides = {}, {}, []
    if (hydra_dir / "config.yaml").exists():
        config = yaml.safe_load((hydra_dir / "config.yaml").read_text()) or {}
    if (hydra_dir / "hydra.yaml").exists():
        hydra = yaml.safe_load((hydra_dir / "hydra.yaml").read_text())["hydra"]
        choices = {k: v for k, v in hydra["runtime"]["choices"].items() if not k.startswith("hydra/")}
    if (hydra_dir / "overrides.yaml").exists():
        overrides = yaml.safe_load((hydra_dir / "overrides.yaml").read_text()) or []
    status, error = _status(run)
    rows, bad = _read_jsonl(run / "metrics.jsonl")
    if bad and status == "finished":
        warnings.warn(f"{run}: skipped {bad} unreadable line(s) of metrics.jsonl")
    extra = {}
    if status == "finished":
        try:
            summary = json.loads((run / "summary.json").read_text())
            extra = {k: v for k, v in summary.items() if isinstance(v, (int, float))}  # wall time, parameter counts
        except json.JSONDecodeError:
            warnings.warn(f"{run}: unreadable summary.json (metrics.jsonl still counts)")
    meta = {
        "run": run.relative_to(root).as_posix(), "status": status, "error": error,
        "overrides": " ".join(overrides), "path": str(run.resolve()),
        **choices, **_flatten(config), **extra,
    }
    return [{**meta, **row} for row in rows] or [{**meta, "round": math.nan}]


def load_runs(path: str | Path) -> pd.DataFrame:
    """One row per run and evaluated round under `path`: run columns (`run`, `status`, `error`,
    `overrides`, `path`), the chosen config options (`method`, `adapter`, ...), the flattened config
    (`adapter._target_`, `partition.alpha`, `seed`, ...), every metrics key, and the summary's scalars.

    A run is `finished` (summary.json), `failed` (failed.json, its `error` kept) or `running`; runs not
    finished are kept, with whatever rounds they logged, and named in a warning."""
    root = Path(path)
    runs = find_runs(root)
    if not runs:
        raise FileNotFoundError(f"no run dir (.hydra/config.yaml, metrics.jsonl or failed.json) under {root}")
    df = pd.DataFrame([row for run in runs for row in load_run(run, root)])
    for key in KEYS:  # every schema key is a numeric column; null (undefined) metrics become NaN
        df[key] = pd.to_numeric(df[key], errors="coerce") if key in df else np.nan
    for key in [c for c in df if benchmark_metric(c)]:  # and so is each eval set's and benchmark's metric
        df[key] = pd.to_numeric(df[key], errors="coerce")
    unfinished = df.drop_duplicates("run").query("status != 'finished'")
    if len(unfinished):
        warnings.warn(f"{len(unfinished)} of {df['run'].nunique()} runs under {root} not finished: " + ", ".join(
            f"{r.run} ({r.status}{': ' + r.error if isinstance(r.error, str) else ''})" for r in unfinished.itertuples()))
    front = [c for c in ("run", "status", *choices_of(df), *KEYS) if c in df]  # KEYS opens with round
    return df[front + [c for c in df if c not in front]]


def choices_of(df: pd.DataFrame) -> list[str]:
    """The config-group choice columns (`method`, `adapter`, `partition`, ...): plain names, no dot or slash."""
    return [c for c in df if c not in RUN_COLUMNS and c != "round" and "." not in c and "/" not in c and c != "seed"]


def config_columns(df: pd.DataFrame) -> list[str]:
    """Columns that say how a run was configured: choices and flattened config (seed included)."""
    return [c for c in df if c not in RUN_COLUMNS and c != "round" and "/" not in c]


def swept_keys(df: pd.DataFrame) -> list[str]:
    """The overridden keys whose value differs between runs, seed aside (seeds are replicates).

    A key the others already imply is dropped: e.g. `experiment=compare_adapters` given to some runs
    and not others, when it changes nothing that `method` does not already tell apart, or
    `partition.alpha` when each method ran with one alpha."""
    runs = df.drop_duplicates("run")
    # `+ablation=gmm seed=1` -> ablation, seed: each key names the column it sets
    overridden = {k for line in runs["overrides"] for k in re.findall(r"(?:^|\s)[+~]*([\w./-]+)=", line)}
    keys = sorted(k for k in overridden if k in runs and k != "seed" and not k.startswith("hydra.")
                  and runs[k].nunique(dropna=False) > 1)
    if not overridden:  # runs made without Hydra: whatever config differs
        keys = [c for c in config_columns(runs) if c != "seed" and runs[c].nunique(dropna=False) > 1]
    compared = [c for c in config_columns(runs) if c != "seed" and not c.startswith("logger.")]
    # fewest values first; on a tie a plain key goes before a config-group choice (`method` reads better)
    for key in sorted(keys, key=lambda k: (runs[k].nunique(dropna=False), "." not in k)):
        rest = [k for k in keys if k != key]
        if rest and (runs.groupby(rest, dropna=False)[compared].nunique(dropna=False) <= 1).all().all():
            keys.remove(key)
    return keys


def per_run(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run: its config, the last evaluated round's metrics (none for a run that logged
    none), and `best <metric>` (max over rounds) of each accuracy, with `comm/up_bytes_cum at best` the
    uplink spent when personal/acc peaked."""
    ordered = df.sort_values("round", kind="stable", na_position="first")
    last = ordered.groupby("run", sort=False).tail(1).set_index("run").loc[df["run"].unique()]
    logged = df.dropna(subset=["round"])
    best = logged.groupby("run", sort=False)[list(ACCURACIES)].max().add_prefix("best ")
    peak = logged.loc[logged["personal/acc"].notna()]
    at_peak = peak.loc[peak.groupby("run")["personal/acc"].idxmax()].set_index("run")["comm/up_bytes_cum"]
    out = last.join(best).join(at_peak.rename("comm/up_bytes_cum at best"))
    return out.reset_index()


def aggregate(runs: pd.DataFrame, by: list[str], values: list[str]) -> pd.DataFrame:
    """Mean, std and n of `values` over the runs (seeds) of each `by` group, columns `<value> mean|std|n`."""
    grouped = runs.assign(_all="all").groupby(by or ["_all"], dropna=False, sort=False)[values]
    stats = grouped.agg(["mean", "std", "count"])
    stats.columns = [f"{v} {'n' if s == 'count' else s}" for v, s in stats.columns]
    return stats.reset_index().drop(columns="_all", errors="ignore")


TABLE = {  # table column: (per-run column, scale, digits shown)
    "global acc final": ("global/acc", 1, 3), "global acc best": ("best global/acc", 1, 3),
    "personal acc final": ("personal/acc", 1, 3), "personal acc best": ("best personal/acc", 1, 3),
    "worst-10% personal final": ("personal/acc_worst10", 1, 3),
    "uplink MB final": ("comm/up_bytes_cum", 1e-6, 3), "uplink MB at best personal": ("comm/up_bytes_cum at best", 1e-6, 3),
    "values sent / client / round": ("params/shared_per_client", 1, 0), "wall min": ("time/total_s", 1 / 60, 1),
}


def results(df: pd.DataFrame, by: list[str] | None = None) -> pd.DataFrame:
    """The results table of the finished runs: per `by` group (default: the swept keys) the seeds' mean,
    std and n of final and best accuracy, cumulative uplink and cost, columns `<name> mean|std`, `n`."""
    by = swept_keys(df) if by is None else by
    runs = per_run(df[df["status"] == "finished"])
    cols = {name: (col, scale) for name, (col, scale, _) in TABLE.items() if col in runs}
    cols.update({f"{col} final": (col, 1) for col in runs if benchmark_metric(col)})
    runs = runs.assign(**{name: runs[col] * scale for name, (col, scale) in cols.items()})
    stats = aggregate(runs, by, list(cols))
    n = stats[[f"{name} n" for name in cols]].max(axis=1)  # runs in the group (a metric may be undefined)
    stats = stats.drop(columns=[f"{name} n" for name in cols])
    stats.insert(len(by), "n", n.astype(int))
    return stats


def benchmark_metric(column: str) -> bool:
    """A metric of an eval set (eval/<set>/...) or a benchmark's beside accuracy (GLUE's mcc, f1): a column of
    the results table where the runs have it."""
    return column.startswith("eval/") or column.split("/")[-1] in ("mcc", "f1") and "/" in column


def run_time(runs: pd.DataFrame) -> str:
    """What a table cost, as a sentence: its runs (per_run()'s rows) and their summed wall time (time/total_s)."""
    seconds = runs["time/total_s"].sum() if "time/total_s" in runs else 0.0
    return f"{len(runs)} runs, {seconds / 3600:.1f} h of run time in all (the sum of their time/total_s)."


def markdown(table: pd.DataFrame) -> str:
    """`results()` as a markdown table, `mean ± std` per cell (the mean alone for one seed, `-` if undefined)."""
    names = [c[: -len(" mean")] for c in table if c.endswith(" mean")]
    keys = [c for c in table if not c.endswith((" mean", " std"))]

    def cell(name, mean, std):
        if mean != mean:
            return "-"
        digits = 0 if float(mean).is_integer() else TABLE.get(name, (None, None, 3))[2]
        return f"{mean:,.{digits}f}" + ("" if std != std or std == 0 else f" ± {std:,.{digits}f}")

    lines = ["| " + " | ".join(keys + names) + " |", "|" + "---|" * (len(keys) + len(names))]
    for _, r in table.iterrows():
        cells = [str(r[k]) for k in keys] + [cell(m, r[f"{m} mean"], r[f"{m} std"]) for m in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(runs: pd.DataFrame, split: list[str], arm: str, ours: list[str], metric: str = "personal/acc",
           exclude: tuple[str, ...] = (), budget: str | None = None) -> pd.DataFrame:
    """Each of `ours` against the best other arm of each split, seed by seed.

    `runs` is per_run()'s table (one row per finished run). Per `split` group, the best baseline is the arm
    (a value of column `arm`, none of `ours` or `exclude`) of highest mean `metric` over seeds; with `budget`
    (a column, e.g. `comm/up_bytes_cum`) only arms whose mean `budget` is at most ours' compete: the best
    method that sends no more bytes. The rows give ours - best on the seeds where both have the metric: its
    mean, std and n, each seed's difference, a paired t-test's p (n >= 2) and a verdict: `win` or `loss`
    where p < 0.05, else `tie`."""
    from scipy.stats import ttest_rel

    out = []
    groups = runs.groupby(split, dropna=False, sort=False) if split else [((), runs)]  # no split key: one split
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        means = group.groupby(arm)[metric].mean()
        others = means.drop([a for a in (*ours, *exclude) if a in means.index]).dropna()
        cost = group.groupby(arm)[budget].mean() if budget else None
        for mine in ours:  # an arm without the metric (no global model: a local head) has no row
            own = group[group[arm] == mine].set_index("seed")[metric].dropna()
            rivals = others[cost[others.index] <= cost.get(mine, np.nan)] if budget else others
            if own.empty or rivals.empty:
                continue
            best = rivals.idxmax()
            base = group[group[arm] == best].set_index("seed")[metric].dropna()
            seeds = sorted(set(own.index) & set(base.index))
            if not seeds:
                continue
            diff = own.loc[seeds] - base.loc[seeds]
            p = float(ttest_rel(own.loc[seeds], base.loc[seeds]).pvalue) if len(seeds) >= 2 and diff.std() > 0 else math.nan
            verdict = "tie" if not p < 0.05 else ("win" if diff.mean() > 0 else "loss")
            out.append({**dict(zip(split, key)), arm: mine, "best baseline": best, f"{metric} ours": own.loc[seeds].mean(),
                        f"{metric} baseline": base.loc[seeds].mean(), "difference mean": diff.mean(),
                        "difference std": diff.std(), "n": len(seeds),
                        "per seed": ", ".join(f"{s}: {d:+.3f}" for s, d in zip(seeds, diff)), "p": p, "verdict": verdict,
                        **({f"{budget} ours": cost[mine], f"{budget} baseline": cost[best]} if budget else {})})
    return pd.DataFrame(out)


def pareto(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mask of the points no other point beats: at most its bytes `x` and more accuracy `y`, or fewer bytes
    and at least its accuracy."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    beaten = ((x[None, :] <= x[:, None]) & (y[None, :] > y[:, None])) | ((x[None, :] < x[:, None]) & (y[None, :] >= y[:, None]))
    return ~beaten.any(axis=1)


def frontier(runs: pd.DataFrame, by: list[str], metrics=("personal/acc", "global/acc")):
    """Figure: each `metric` (a panel) against total uplink bytes (log x), a point per run labelled by `by`,
    the Pareto front of each panel marked. `runs` is per_run()'s table; runs that send nothing are left out."""
    runs = runs[runs["comm/up_bytes_cum"] > 0]
    panels = {}
    for metric in metrics:
        have = runs[runs[metric].notna()] if metric in runs else runs.iloc[:0]
        x, y = have["comm/up_bytes_cum"].to_numpy(float), have[metric].to_numpy(float)
        groups = [label(r, by[:1]) for _, r in have.iterrows()]
        tags = [", ".join(f"{k.rsplit('.', 1)[-1]}={r[k]}" for k in by[1:]) for _, r in have.iterrows()]
        panels[metric] = (x, y, groups, tags, pareto(x, y) if len(x) else np.zeros(0, bool))
    return plots.frontier(panels, "total uplink bytes (all clients, all rounds)")


def frame_markdown(df: pd.DataFrame, digits: int = 4) -> str:
    """Any DataFrame as a markdown table: floats to `digits` significant digits, NaN as `-`."""
    def cell(v):
        if isinstance(v, float):
            return "-" if v != v else f"{v:.{digits}g}"
        return str(v)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def label(row, by: list[str]) -> str:
    """`method=lora, partition.alpha=0.1`, or the single key's value alone."""
    if len(by) == 1:
        return str(row[by[0]])
    return ", ".join(f"{k}={row[k]}" for k in by) or "all"


def over_rounds(df: pd.DataFrame, y: str, x: str = "round", by: list[str] | None = None) -> dict[str, tuple]:
    """Per `by` group, `(x, mean of y, std of y)` over the seeds at each round: the input of `plots.curves`."""
    by = swept_keys(df) if by is None else by
    logged = df.dropna(subset=["round", y])
    out = {}
    for _, group in logged.assign(_all="all").groupby(by or ["_all"], dropna=False, sort=False):
        stats = group.groupby("round").agg(x=(x, "mean"), mean=(y, "mean"), std=(y, "std")).fillna({"std": 0})
        out[label(group.iloc[0], by)] = (stats["x"].to_numpy(), stats["mean"].to_numpy(), stats["std"].to_numpy())
    return out


def facets(df: pd.DataFrame, by: list[str] | None = None) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """The panels of a figure: with two or more `by` keys, one panel per value of the first (e.g. a split)
    and the lines grouped by the rest (the methods); with one key or none, a single panel. Returns
    (panel title -> its rows, the keys that tell lines apart)."""
    by = swept_keys(df) if by is None else list(by)
    if len(by) < 2:
        return {"": df}, by
    head, rest = by[0], by[1:]
    return {f"{head}={value}": rows for value, rows in df.groupby(head, dropna=False, sort=True)}, rest


def accuracy_by_round(df: pd.DataFrame, y: str = "personal/acc", by: list[str] | None = None):
    """Figure: `y` against round, one line per group, mean ± std over seeds (a panel per value of the first
    of several `by` keys)."""
    panels, rest = facets(df, by)
    series = {name: (over_rounds(rows, y, by=rest), {}) for name, rows in panels.items()}
    return plots.curves(series, "round", y, title=f"{y} by round", order=_line_order(df, rest))


def accuracy_vs_bytes(df: pd.DataFrame, y: str = "personal/acc", by: list[str] | None = None):
    """Figure: `y` against cumulative uplink bytes (log x); groups that send nothing are a dashed line at
    their final `y` (a panel per value of the first of several `by` keys)."""
    panels, rest = facets(df, by)
    out = {}
    for name, rows in panels.items():
        series, flat = {}, {}
        for line, (x, mean, std) in over_rounds(rows, y, x="comm/up_bytes_cum", by=rest).items():
            sent = x > 0
            if sent.any():
                series[line] = (x[sent], mean[sent], std[sent])
            else:
                flat[line] = mean[-1]
        out[name] = (series, flat)
    return plots.curves(out, "cumulative uplink bytes (all clients)", y, title=f"{y} against uplink (dashed: no uplink)",
                        logx=True, order=_line_order(df, rest))


def _line_order(df: pd.DataFrame, by: list[str]) -> list[str]:
    """Every line's label over all panels, in order of first appearance: one label, one colour everywhere."""
    rows = df.drop_duplicates(subset=by) if by else df.head(1)
    return [label(row, by) for _, row in rows.iterrows()]


def weights_heatmap(run: str | Path, rnd: int | None = None):
    """Figure: the aggregation-weight matrix of a run dir (aggregator=celora) at round `rnd` (default: last)."""
    rows, _ = _read_jsonl(Path(run) / "weights.jsonl")
    if not rows:
        raise FileNotFoundError(f"{run} has no weights.jsonl (only aggregator=celora writes one)")
    row = rows[-1] if rnd is None else next(r for r in rows if r["round"] == rnd)
    return plots.heatmap(np.array(row["matrix"]), row["clients"], f"aggregation weights, round {row['round']}")


def partition_histogram(run: str | Path):
    """Figure: the train label counts per client of a run dir (its partition.json)."""
    return plots.partition_histogram(json.loads((Path(run) / "partition.json").read_text()))


def majority_accuracy(run: str | Path) -> float:
    """The personal accuracy of no training at all: each client predicts the commonest class of its own train
    rows on its local test rows, example-weighted over clients as `personal/acc` is. The label prior that a
    personalised method has to beat on a label-skewed split; from the run dir's partition.json."""
    clients = json.loads((Path(run) / "partition.json").read_text())["clients"]
    right = sum(c["test_counts"][int(np.argmax(c["train_counts"]))] for c in clients)
    return right / sum(sum(c["test_counts"]) for c in clients)


def majority_by_split(runs: pd.DataFrame, split: list[str]) -> pd.DataFrame:
    """`majority_accuracy` per split (mean, std and n over its seeds), from per_run()'s table (`path`):
    runs of one split and seed share a partition, so each seed counts once."""
    have = runs[[Path(p, "partition.json").exists() for p in runs["path"]]].drop_duplicates([*split, "seed"])
    have = have.assign(**{"majority acc": [majority_accuracy(p) for p in have["path"]]})
    return aggregate(have, split, ["majority acc"])


def group_weight_share(run: str | Path) -> pd.DataFrame:
    """How much of its aggregation weight each client puts on clients of its own latent group, per round.

    From a run dir of `aggregator=celora` on a partition with groups (`partition.json` has `groups`):
    one row per round and sampled client with `own` = sum of w_ij over this round's clients j in i's
    group (i included), and `fedavg` = what FedAvg's size-proportional weights would give it (the
    own group's share of the round's training examples): `own` above `fedavg` means the weights
    found the groups.
    """
    part = json.loads((Path(run) / "partition.json").read_text())
    if part.get("groups") is None:
        raise ValueError(f"{run}'s partition has no latent groups (use partition=grouped, concept_shift, "
                         "rotation_groups or fashion_tasks)")
    groups = np.asarray(part["groups"])
    sizes = np.array([c["train_size"] for c in part["clients"]], dtype=float)
    rows, _ = _read_jsonl(Path(run) / "weights.jsonl")
    if not rows:
        raise FileNotFoundError(f"{run} has no weights.jsonl (only aggregator=celora writes one)")
    out = []
    for r in rows:
        ids = np.asarray(r["clients"])
        w = np.asarray(r["matrix"])
        p = sizes[ids] / sizes[ids].sum()
        for k, i in enumerate(ids):
            mine = groups[ids] == groups[i]
            out.append({"round": r["round"], "client": int(i), "group": int(groups[i]),
                        "own": float(w[k, mine].sum()), "fedavg": float(p[mine].sum())})
    return pd.DataFrame(out)
