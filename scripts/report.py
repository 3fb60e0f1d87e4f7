"""Report on the runs under a directory: results table over seeds (markdown + CSV) and plots (PNG).

    python scripts/report.py multirun/2026-11-25/10-00-00 [--out DIR] [--by method partition.alpha]
                             [--metric personal/acc] [--run 3] [--paired] [--frontier]

Writes into --out (default PATH/report): results.md and results.csv (per group of the swept config
keys, seeds aggregated: mean, std, n of final and best accuracy and of cumulative uplink), runs.csv
(one row per run, with its status), accuracy_by_round.png, accuracy_vs_bytes.png, and for one run
(--run, default the first finished one that has aggregation weights) partition.png and weights.png.
The markdown table is printed too.

--paired (the main table: --by split method) adds paired.md / paired.csv: each CE-LoRA arm (--ours, default
celora and celora_local_head, tuned or not) against the best other method of its split (centralized, the
pooled upper bound, is not a baseline), per seed, mean ± std, a paired t-test and a win / tie / loss verdict;
then the same against the best baseline that sends no more uplink bytes (paired_bytes.csv),
and (for personal/acc) the label prior per split: each client predicting its commonest train class.
--frontier (--by method adapter.r) adds frontier.png: personal and global accuracy against total uplink
bytes, one point per run, the Pareto front marked, and frontier.md (the points, front ones marked).
--summaries copies each finished run's small files (config, metrics, summary.json) into --out/runs/<run>/
(celora.archive: what a results dir in git keeps of runs whose sweep dir is not, and restores from).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from celora import analysis, archive


def pick_run(df: pd.DataFrame, run: str | None) -> Path:
    """The dir of run `run` (its `run` id or a path), else the first finished run with weights.jsonl."""
    if run is not None:
        hit = df.loc[df["run"] == run, "path"]
        return Path(hit.iloc[0]) if len(hit) else Path(run)
    dirs = [Path(p) for p in df.loc[df["status"] == "finished", "path"].unique()] or [Path(df["path"].iloc[0])]
    return next((d for d in dirs if (d / "weights.jsonl").exists()), dirs[0])


OURS = ("celora", "celora_local_head")
NOT_BASELINES = ("centralized", "group_oracle")  # references: the pooled data, the true groups (no real server has either)


VARIANTS = ("fedavgm", "fedadagrad", "fedadam", "fedyogi", "fedprox")  # <method>_<variant>: a server optimizer or FedProx


def arms(names, bare: tuple[str, ...]) -> list[str]:
    """The values of a method column that are one of `bare`, tuned (`tuned/<name>`) or not, with a server optimizer
    or FedProx (`<name>_fedadam`, docs/server.md) or without."""
    def base(name: str) -> str:
        name = name.removeprefix("tuned/")
        stem, _, variant = name.rpartition("_")
        return stem if variant in VARIANTS else name
    return [n for n in names if base(str(n)) in bare]


def paired_report(runs: pd.DataFrame, by: list[str], metric: str, ours: tuple[str, ...], out: Path) -> str:
    arm = "method" if "method" in by else by[-1]
    split = [k for k in by if k != arm]
    names = runs[arm].unique()
    args = (runs, split, arm, arms(names, ours), metric, tuple(arms(names, NOT_BASELINES)))
    table = analysis.paired(*args)
    table.to_csv(out / "paired.csv", index=False)
    md = (f"Paired against the best baseline of each split ({metric}, last round; ours - best, per seed; "
          "verdict: paired t-test p < 0.05, else tie). The best baseline is picked on these same rows (highest mean), "
          "which favours it: a win is conservative. With n = 3 seeds, p < 0.05 needs |t| > 4.30.\n\n" + analysis.frame_markdown(table, digits=3))
    if "comm/up_bytes_cum" in runs:
        cheap = analysis.paired(*args, budget="comm/up_bytes_cum")
        md += ("\n\nPaired against the best baseline that sends **no more uplink bytes** (mean total over seeds; "
               "a method that sends nothing, such as `local`, competes with every arm), the same test:\n\n")
        if cheap.empty:
            md += "No baseline sends as few bytes as ours."
        else:
            cheap.to_csv(out / "paired_bytes.csv", index=False)
            mb = {f"uplink MB {w}": cheap.pop(f"comm/up_bytes_cum {w}") / 1e6 for w in ("ours", "baseline")}
            md += analysis.frame_markdown(cheap.assign(**mb), digits=3)
    prior = analysis.majority_by_split(runs, split) if metric == "personal/acc" and "path" in runs else pd.DataFrame()
    if len(prior):
        md += ("\n\nNo training at all, each client predicting the commonest class of its own train rows "
               "(`analysis.majority_accuracy`, from partition.json), reaches on its local test rows: " +
               "; ".join(f"{analysis.label(row, split)} {row['majority acc mean']:.3f}"
                         + (f" ± {row['majority acc std']:.3f}" if row["majority acc n"] > 1 else "")
                         + f" (n = {int(row['majority acc n'])})" for _, row in prior.iterrows()) + ".")
    (out / "paired.md").write_text(md + "\n")
    return md


def frontier_report(runs: pd.DataFrame, by: list[str], out: Path) -> str:
    analysis.frontier(runs, by).savefig(out / "frontier.png", dpi=100)
    cols = [*by, "seed", "comm/up_bytes_cum", "personal/acc", "global/acc"]
    table = runs[[c for c in cols if c in runs]].sort_values("comm/up_bytes_cum").reset_index(drop=True)
    sent = table["comm/up_bytes_cum"] > 0
    for metric in ("personal/acc", "global/acc"):
        front = np.zeros(len(table), bool)
        ok = sent & table[metric].notna()
        front[ok.to_numpy()] = analysis.pareto(table.loc[ok, "comm/up_bytes_cum"], table.loc[ok, metric])
        table[f"front ({metric})"] = np.where(front, "yes", "")
    table["uplink MB"] = table.pop("comm/up_bytes_cum") / 1e6
    md = analysis.frame_markdown(table, digits=4)
    (out / "frontier.md").write_text(md + "\n")
    return md


def report(path: Path, out: Path, by: list[str] | None, metric: str, run: str | None,
           paired: bool = False, frontier: bool = False, ours: tuple[str, ...] = OURS,
           summaries: bool = False) -> str:
    """Writes the report files into `out`; returns the markdown."""
    df = analysis.load_runs(path)
    finished = df[df["status"] == "finished"]
    if finished.empty:
        raise SystemExit(f"no finished run under {path}: " + ", ".join(df["run"].unique()))
    by = analysis.swept_keys(finished) if by is None else by
    out.mkdir(parents=True, exist_ok=True)

    table = analysis.results(finished, by)
    table.to_csv(out / "results.csv", index=False)
    runs = analysis.per_run(df)
    runs[[c for c in ("run", "status", "error", *by, "seed", "round", *analysis.ACCURACIES, "comm/up_bytes_cum")
          if c in runs]].to_csv(out / "runs.csv", index=False)
    others = runs[runs["status"] != "finished"]
    md = analysis.markdown(table)
    if len(others):
        md += "\n\nNot in the table: " + ", ".join(f"run {r.run} ({r.status})" for r in others.itertuples())
    done = analysis.per_run(finished)
    md += "\n\n" + analysis.run_time(done)
    (out / "results.md").write_text(md + "\n")
    if paired:
        md += "\n\n" + paired_report(done, by, metric, ours, out)
    if frontier:
        md += "\n\n" + frontier_report(done, by, out)
    if summaries:
        archive.keep(path, out / "runs")

    figures = {
        "accuracy_by_round": analysis.accuracy_by_round(finished, metric, by),
        "accuracy_vs_bytes": analysis.accuracy_vs_bytes(finished, metric, by),
    }
    chosen = pick_run(df, run)
    if (chosen / "partition.json").exists():
        figures["partition"] = analysis.partition_histogram(chosen)
    if (chosen / "weights.jsonl").exists():
        figures["weights"] = analysis.weights_heatmap(chosen)
    for name, fig in figures.items():
        fig.savefig(out / f"{name}.png", dpi=100)
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", type=Path, help="a run dir, a multirun dir, or a tree of them")
    ap.add_argument("--out", type=Path, help="where the report goes (default PATH/report)")
    ap.add_argument("--by", nargs="+", help="config keys to group by (default: the swept keys)")
    ap.add_argument("--metric", default="personal/acc", help="the accuracy the plots show")
    ap.add_argument("--run", help="the run (id as in runs.csv, or a dir) whose partition and weights are drawn")
    ap.add_argument("--paired", action="store_true", help="paired differences to the best baseline per split")
    ap.add_argument("--ours", nargs="+", default=list(OURS), help="the arms --paired compares (default: %(default)s)")
    ap.add_argument("--frontier", action="store_true", help="accuracy against uplink with the Pareto front")
    ap.add_argument("--summaries", action="store_true", help="copy each run's summary.json into OUT/runs/")
    args = ap.parse_args()
    print(report(args.path, args.out or args.path / "report", args.by, args.metric, args.run,
                 args.paired, args.frontier, tuple(args.ours), args.summaries))


if __name__ == "__main__":
    main()
