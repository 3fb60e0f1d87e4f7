"""Report on the runs under a directory: results table over seeds (markdown + CSV) and plots (PNG).

    python scripts/report.py multirun/2026-11-25/10-00-00 [--out DIR] [--by method partition.alpha]
                             [--metric personal/acc] [--run 3]

Writes into --out (default PATH/report): results.md and results.csv (per group of the swept config
keys, seeds aggregated: mean, std, n of final and best accuracy and of cumulative uplink), runs.csv
(one row per run, with its status), accuracy_by_round.png, accuracy_vs_bytes.png, and for one run
(--run, default the first finished one that has aggregation weights) partition.png and weights.png.
The markdown table is printed too.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from celora import analysis


def pick_run(df: pd.DataFrame, run: str | None) -> Path:
    """The dir of run `run` (its `run` id or a path), else the first finished run with weights.jsonl."""
    if run is not None:
        hit = df.loc[df["run"] == run, "path"]
        return Path(hit.iloc[0]) if len(hit) else Path(run)
    dirs = [Path(p) for p in df.loc[df["status"] == "finished", "path"].unique()] or [Path(df["path"].iloc[0])]
    return next((d for d in dirs if (d / "weights.jsonl").exists()), dirs[0])


def report(path: Path, out: Path, by: list[str] | None, metric: str, run: str | None) -> str:
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
    (out / "results.md").write_text(md + "\n")

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
    args = ap.parse_args()
    print(report(args.path, args.out or args.path / "report", args.by, args.metric, args.run))


if __name__ == "__main__":
    main()
