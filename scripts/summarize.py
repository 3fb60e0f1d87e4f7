"""Print a markdown table (last and best accuracy, uplink bytes) of the runs under a directory.

    python scripts/summarize.py multirun/2026-11-25/10-00-00 [--by method]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def _fmt(v, digits=3):
    return "-" if v is None or v != v else f"{v:.{digits}f}"  # None or NaN: undefined


def rows(root: Path, by: str):
    for summary in sorted(root.rglob("summary.json")):
        run = summary.parent
        cfg = yaml.safe_load((run / ".hydra" / "config.yaml").read_text()) if (run / ".hydra").exists() else {}
        overrides = (run / ".hydra" / "overrides.yaml")
        label = next((o.split("=", 1)[1] for o in (yaml.safe_load(overrides.read_text()) if overrides.exists() else [])
                      if o.split("=", 1)[0].lstrip("+") == by), cfg.get("adapter", {}).get("name", run.name))
        s = json.loads(summary.read_text())
        last, best = s["last"], s["best"]
        yield {
            by: label,
            "global acc last / best": f"{_fmt(last.get('global/acc'))} / {_fmt(best.get('global/acc'))}",
            "personal acc last / best": f"{_fmt(last.get('personal/acc'))} / {_fmt(best.get('personal/acc'))}",
            "worst-10% personal (last)": _fmt(last.get("personal/acc_worst10")),
            "uplink values / client / round": f"{s['params/shared_per_client']:,}",
            "uplink per round (MB)": f"{last['comm/up_bytes'] / 1e6:.3f}",
            "uplink total (MB)": f"{last['comm/up_bytes_cum'] / 1e6:.3f}",
            "wall (s)": f"{s['time/total_s']:.0f}",
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--by", default="method", help="the override that names each run")
    args = ap.parse_args()
    table = list(rows(args.root, args.by))
    if not table:
        raise SystemExit(f"no summary.json under {args.root}")
    keys = list(table[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in table:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
