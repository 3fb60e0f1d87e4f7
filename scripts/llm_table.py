"""The docs/llm.md table of an `experiment=llm_compare` multirun (one or more sweep dirs), as markdown.

    .venv/bin/python scripts/llm_table.py multirun/<date>/<time> [more sweep dirs]

Per method: zero-shot (round 0) and final global and personal answer accuracy, the best over evaluated
rounds, answer perplexity (zero-shot on the clients' local test rows; final global and personal), values sent per client and round, total uplink, wall time; for
aggregator=celora runs on a partition with groups, the mean share of a client's aggregation weight that
stays inside its own task (celora.analysis.group_weight_share, last round) against FedAvg's share.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd

from celora.analysis import group_weight_share, load_runs


def _f(x, digits=3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def table(paths: list[str]) -> str:
    df = pd.concat([load_runs(p) for p in paths], ignore_index=True)
    df = df[df["status"] == "finished"]
    lines = ["| method | global acc: zero-shot / final / best | personal acc: zero-shot / final / best | "
             "answer ppl: zero-shot / final global / final personal | values / client / round | uplink MB | wall min | "
             "own-task weight share (FedAvg's) |", "|---|---|---|---|---|---|---|---|"]
    for _, rows in df.groupby("path", sort=False):  # run names repeat across sweep dirs
        rows = rows.sort_values("round")
        first, last = rows.iloc[0], rows.iloc[-1]
        share = "-"
        if (Path(last["path"]) / "weights.jsonl").exists():  # personalised weights were logged
            shares = group_weight_share(last["path"])
            final = shares[shares["round"] == shares["round"].max()]
            share = f"{final['own'].mean():.2f} ({final['fedavg'].mean():.2f})"
        lines.append(
            f"| {last['method']} | {_f(first['global/acc'])} / {_f(last['global/acc'])} / "
            f"{_f(rows['global/acc'].max())} | {_f(first['personal/acc'])} / {_f(last['personal/acc'])} / "
            f"{_f(rows['personal/acc'].max())} | {_f(first.get('personal/ppl'), 2)} / {_f(last.get('global/ppl'), 2)} / {_f(last.get('personal/ppl'), 2)} | "
            f"{int(last['params/shared_per_client']):,} | {last['comm/up_bytes_cum'] / 1e6:.3f} | "
            f"{last['time/total_s'] / 60:.1f} | {share} |")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+")
    print(table(ap.parse_args().paths))
