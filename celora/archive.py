"""Finished runs' small files in and out of a results dir kept in git, so a long sweep goes on on another machine.

A sweep dir (multirun/..., outside git) holds each run's checkpoints; what a results dir keeps of a finished
run is small: its Hydra config, metrics.jsonl, summary.json and the other jsonl/json it wrote. `keep` copies
those out, `restore` copies them back into a sweep dir where a run is missing, and a re-launched sweep then
returns those runs at once (run.finished_before: the summary's config is this one), on any machine.

    python -m celora.archive keep multirun/main_table docs/results/main_table/runs
    python -m celora.archive restore docs/results/main_table/runs multirun/main_table
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from celora.fl import checkpoint

SMALL = ("*.json", "*.jsonl", ".hydra/*.yaml")


def finished(root: Path) -> list[Path]:
    """Run dirs at or under `root` that finished (they hold summary.json), outside any W&B dir."""
    return sorted(p.parent for p in root.rglob("summary.json") if "wandb" not in p.relative_to(root).parts)


def _copy_small(src: Path, dst: Path) -> None:
    for pattern in SMALL:
        for f in src.glob(pattern):
            if f.name != "failed.json":
                (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dst / f.relative_to(src))


def keep(sweep: Path, results: Path) -> list[Path]:
    """Copies each finished run's small files from `sweep` to the same relative dir under `results`; a summary
    written before summaries carried their config gets it from the run's last checkpoint."""
    kept = []
    for run in finished(sweep):
        dest = results / run.relative_to(sweep)
        _copy_small(run, dest)
        summary = json.loads((run / "summary.json").read_text())
        if "config" not in summary:
            saved = checkpoint.load_latest(run / "checkpoints")
            if saved is not None:
                summary.pop("config_hash", None)
                summary["config"] = saved["config"]
                (dest / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False))
        kept.append(dest)
    return kept


def restore(results: Path, sweep: Path) -> list[Path]:
    """Copies each kept run back under `sweep` where that run dir has no summary.json; returns those copied.
    A run dir that has one (finished here, maybe under another config) is left alone."""
    copied = []
    for run in finished(results):
        dest = sweep / run.relative_to(results)
        if not (dest / "summary.json").exists():
            _copy_small(run, dest)
            copied.append(dest)
    return copied


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("keep", "restore"))
    ap.add_argument("source", type=Path)
    ap.add_argument("dest", type=Path)
    args = ap.parse_args()
    done = (keep if args.action == "keep" else restore)(args.source, args.dest)
    print(f"{args.action}: {len(done)} finished run(s) {args.source} -> {args.dest}")


if __name__ == "__main__":
    main()
