"""Learning rates chosen on validation data: one sweep per method, then the choice as conf/method/tuned/<method>.yaml.

    python scripts/tune.py run [--methods celora tri ...] [--root multirun/tune] [-- more overrides]
    python scripts/tune.py choose [--root multirun/tune] [--runs docs/results/tuning/runs]

`run` launches `python -m celora -m experiment=tune method=<m> client.lr=<grid>` for each method: every run
holds out a fifth of each client's local train (client.val_fraction=0.2) and is scored on those rows only,
at seed 0. Each rate has its own run dir (multirun/tune/<method>/lr=<rate>), so a stopped tuning is
re-launched with the same command and its finished runs return at once; an interrupted one resumes from
its last round's checkpoint. Each finished run's small files (config, metrics, summary) are kept under
docs/results/tuning/runs/ (celora.archive), which is in git: `run` restores them into the sweep dir first, so on
a fresh clone only the rates not yet finished anywhere are run.

A choice is never at the edge of the rates tried: while a method's best rate is its largest (smallest), `run`
goes on with the next rate of the 1-2-5 series beyond it (up to 0.2, down to 1e-5).

`choose` reads the finished runs, picks per method the rate of the highest last-round validation personal
accuracy (a tie goes to the smaller rate), writes conf/method/tuned/<method>.yaml (so `method=tuned/celora`
reproduces it) and the table docs/results/tuning.md. A method with a rate still to run is left out, named (and
an earlier preset of it removed); a choice at LIMITS, where a grid stops growing, is marked in the table.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd

from celora import analysis, archive

ROOT = Path(__file__).resolve().parents[1]
GRID = (5e-4, 1e-3, 2e-3, 5e-3, 1e-2)
TRI_GRID = (5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2)  # C (r x r, between orthonormal factors) has its own scale
METHODS = ("celora", "tri", "lora", "fedsa_lora", "ffa_lora", "local", "centralized", "fed_sb", "celora_local_head")
METRIC = "personal/acc"  # on validation rows in these runs


def method_file(method: str) -> Path:
    return ROOT / "conf" / "method" / f"{method}.yaml"


def is_tri(method: str) -> bool:
    """Whether the method trains a tri adapter's C (its config, or the adapter it overrides to, says zero: C)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"method={method}"]).adapter.zero == "C"


def grid(method: str) -> tuple[float, ...]:
    return TRI_GRID if is_tri(method) else GRID


SERIES = tuple(float(f"{m}e{e}") for e in range(-6, 1) for m in (1, 2, 5))  # the 1-2-5 rates a grid grows by
LIMITS = (1e-5, 0.2)  # a grid grows no further than this


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b))


def best_rate(scores: dict[float, float]) -> float:
    """The rate of the highest score; a tie goes to the smaller rate."""
    rates = sorted(scores)
    return rates[max(range(len(rates)), key=lambda k: (scores[rates[k]], -k))]


def wanted(method: str, scores: dict[float, float]) -> list[float]:
    """The rates still to run for `method`, given the validation scores of those finished: the grid's missing
    rates; then, while the best rate is the largest (smallest) one run, the next rate of the 1-2-5 series beyond
    it, up to LIMITS, so that the choice is never at the edge of what was tried."""
    missing = [lr for lr in grid(method) if not any(_same(lr, done) for done in scores)]
    if missing:
        return missing
    best, low, high = best_rate(scores), min(scores), max(scores)
    if best == high and high * (1 + 1e-9) < LIMITS[1]:
        return [min(r for r in SERIES if r > high * (1 + 1e-9))]
    if best == low and low * (1 - 1e-9) > LIMITS[0]:
        return [max(r for r in SERIES if r < low * (1 - 1e-9))]
    return []


def scores_of(runs: pd.DataFrame) -> dict[str, dict[float, float]]:
    """method -> {rate: last-round validation METRIC} of the finished tuning runs (per_run()'s rows)."""
    runs = runs[(runs["status"] == "finished") & runs[METRIC].notna()]
    if "client.val_fraction" in runs:
        runs = runs[runs["client.val_fraction"] > 0]  # only runs scored on validation rows choose
    return {method: dict(zip(group["client.lr"].astype(float), group[METRIC].astype(float)))
            for method, group in runs.groupby("method", sort=False)}


def finished_scores(root: Path) -> dict[str, dict[float, float]]:
    try:
        return scores_of(analysis.per_run(analysis.load_runs(root)))
    except FileNotFoundError:  # nothing run yet
        return {}


def launch(methods: list[str], root: Path, runs: Path, extra: list[str]) -> None:
    restored = archive.restore(runs, root)
    if restored:
        print(f"restored {len(restored)} finished run(s) from {runs}", flush=True)
    for method in methods:
        if not method_file(method).exists():
            raise SystemExit(f"no conf/method/{method}.yaml; methods: {sorted(p.stem for p in method_file('x').parent.glob('*.yaml'))}")
        asked: list[float] = []
        while todo := wanted(method, finished_scores(root / method).get(method, {})):
            if todo == asked:
                raise SystemExit(f"{method}: client.lr={', '.join(f'{lr:g}' for lr in todo)} ran but gave no finished "
                                 f"run with a {METRIC}; see its run dir under {root / method}")
            asked = todo
            cmd = [sys.executable, "-m", "celora", "-m", "experiment=tune", f"method={method}",
                   "client.lr=" + ",".join(f"{lr:g}" for lr in todo), f"hydra.sweep.dir={root}/{method}", *extra]
            print("$", " ".join(cmd), flush=True)
            try:
                subprocess.run(cmd, check=True, cwd=ROOT)
            finally:  # what finished is kept, even when a later rate fails or the sweep is stopped
                archive.keep(root, runs)


def choices(root: Path, methods: list[str] = list(METHODS)) -> tuple[pd.DataFrame, list[str]]:
    """Per method: every rate's validation accuracy and the chosen one. Also the methods not complete: none
    of its runs finished, a rate of the grid not finished, or a best rate at the edge of those run (wanted())."""
    rows, missing = [], []
    found = finished_scores(root)
    for method in methods:
        scores = found.get(method, {})
        todo = wanted(method, scores)
        if todo:
            missing.append(f"{method} ({len(scores)} rates finished; to run: {', '.join(f'{lr:g}' for lr in todo)})")
            continue
        best = best_rate(scores)
        # wanted() stops growing a grid at LIMITS: a best rate there is a choice at the edge, said so
        edge = "at the limit of the rates tried" if best in (min(scores), max(scores)) else ""
        rows.append({"method": method, "chosen lr": best, f"val {METRIC}": scores[best], "rates run": len(scores),
                     "note": edge, **{f"{lr:g}": scores[lr] for lr in sorted(scores)}})
    table = pd.DataFrame(rows)
    rates = sorted((c for c in table.columns if c[0].isdigit()), key=float)  # one rate column each, in order
    return table[[c for c in table.columns if not c[0].isdigit()] + rates], missing


def tuned_yaml(method: str, lr: float, acc: float) -> str:
    """The method's own preset with its chosen rate: comment, the preset's lines, client.lr."""
    body = [line for line in method_file(method).read_text().splitlines() if not line.startswith("#")]
    return "\n".join([
        "# @package _global_",
        f"# {method} at the learning rate scripts/tune.py chose: {lr:g} (validation personal accuracy {acc:.4f},",
        "# client.val_fraction=0.2, seed 0, Dirichlet(0.5)); written by `python scripts/tune.py choose`.",
        *[line for line in body if line.strip() != "# @package _global_"],
        "", "client:", f"  lr: {lr:g}", ""])


def choose(root: Path, runs: Path, conf: Path, out: Path, methods: list[str] = list(METHODS)) -> str:
    if root.exists():
        archive.keep(root, runs)
    table, missing = choices(runs, methods)
    conf.mkdir(parents=True, exist_ok=True)
    for row in table.to_dict("records"):
        (conf / f"{row['method']}.yaml").write_text(tuned_yaml(row["method"], row["chosen lr"], row[f"val {METRIC}"]))
    chosen = set(table["method"]) if len(table) else set()
    for method in set(methods) - chosen:  # a preset of an earlier choice that its runs no longer make: gone, not stale
        stale = conf / f"{method}.yaml"
        if stale.exists():
            stale.unlink()
            print(f"removed {stale}: its tuning is not complete", file=sys.stderr)
    md = ["Validation personal accuracy (last round) per learning rate, seed 0, client.val_fraction=0.2, "
          "Dirichlet(0.5), 1 seed. Reproduce: `python scripts/tune.py run && python scripts/tune.py choose`.", ""]
    if len(table):
        md.append(analysis.frame_markdown(table))
        md += ["", analysis.run_time(analysis.per_run(analysis.load_runs(runs)))]
    if missing:
        md += ["", "Not chosen yet: " + ", ".join(missing)]
    text = "\n".join(md) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("run", "choose"))
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--root", type=Path, default=ROOT / "multirun" / "tune", help="the sweeps' dir (outside git)")
    ap.add_argument("--runs", type=Path, default=ROOT / "docs" / "results" / "tuning" / "runs",
                    help="where finished runs are kept, in git (what choose reads)")
    ap.add_argument("--conf", type=Path, default=ROOT / "conf" / "method" / "tuned")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "tuning.md")
    args, extra = ap.parse_known_args()
    extra = [e for e in extra if e != "--"]
    if args.action == "run":
        launch(args.methods, args.root, args.runs, extra)
    else:
        print(choose(args.root, args.runs, args.conf, args.out, args.methods))


if __name__ == "__main__":
    main()
