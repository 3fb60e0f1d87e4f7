"""Learning rates chosen on validation data: one sweep per method, then the choice as conf/method/tuned/<method>.yaml.

    python scripts/tune.py run [--methods celora tri ...] [--root multirun/tune] [-- more overrides]
    python scripts/tune.py choose [--root multirun/tune] [--runs docs/results/tuning/runs]
    python scripts/tune.py server --methods lora_fedadam tri_fedavgm ... [-- more overrides]
    python scripts/tune.py server-choose --methods lora_fedadam tri_fedavgm ...

`server` and `server-choose` tune a method that adds a server optimizer or FedProx to a base method
(`<base>_<variant>`, conf/method/): its second rate alone, on a 1-D grid (server.eta, or client.prox_mu for
FedProx), at the base method's tuned client rate (conf/method/tuned/<base>.yaml, so `choose` comes first). The
runs, their kept copies and the choice follow the same rules as the client rate's (under multirun/tune_server and
docs/results/tuning_server/runs); the choice is conf/method/tuned/<method>.yaml with both rates and the table
docs/results/tuning_server.md.

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
from typing import NamedTuple

import pandas as pd
import yaml

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


class Axis(NamedTuple):
    """A rate that a sweep tunes: its key, first grid, the series a grid grows by and its limits."""

    key: str
    grid: tuple[float, ...]
    series: tuple[float, ...] = SERIES
    limits: tuple[float, float] = LIMITS

    @property
    def short(self) -> str:
        return self.key.rsplit(".", 1)[-1]


CLIENT_LR = Axis("client.lr", GRID)
# The second rate of a method that adds a server optimizer or FedProx to a base method (<base>_<variant>).
SERVER_AXES = {
    "fedavgm": Axis("server.eta", (0.2, 0.5, 1.0), limits=(0.01, 5.0)),  # eta / (1 - beta1) scales the step
    "fedadagrad": Axis("server.eta", (5e-3, 1e-2, 2e-2), limits=(1e-4, 0.5)),  # about each coordinate's step
    "fedadam": Axis("server.eta", (5e-3, 1e-2, 2e-2), limits=(1e-4, 0.5)),
    "fedyogi": Axis("server.eta", (5e-3, 1e-2, 2e-2), limits=(1e-4, 0.5)),
    "fedprox": Axis("client.prox_mu", (1e-3, 1e-2, 1e-1), limits=(1e-4, 1.0)),  # Li et al.'s range
}


def split_variant(method: str) -> tuple[str, str]:
    """(base method, variant) of a server-optimizer or FedProx method name, e.g. lora_fedadam -> (lora, fedadam)."""
    base, _, variant = method.rpartition("_")
    if not base or variant not in SERVER_AXES:
        raise SystemExit(f"{method} is not <base>_<variant> with a variant of {', '.join(SERVER_AXES)} "
                         "(e.g. lora_fedadam); `run` tunes a method's client rate")
    return base, variant


def tuned_client_lr(base: str, conf: Path) -> float:
    """The base method's chosen client rate (its tuned preset)."""
    path = conf / f"{base}.yaml"
    if not path.exists():
        raise SystemExit(f"no {path}: tune the base method's client rate first "
                         f"(python scripts/tune.py run --methods {base} && python scripts/tune.py choose)")
    return float(yaml.safe_load(path.read_text())["client"]["lr"])


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b))


def best_rate(scores: dict[float, float]) -> float:
    """The rate of the highest score; a tie goes to the smaller rate."""
    rates = sorted(scores)
    return rates[max(range(len(rates)), key=lambda k: (scores[rates[k]], -k))]


def wanted(method: str, scores: dict[float, float], axis: Axis | None = None) -> list[float]:
    """The rates still to run for `method`, given the validation scores of those finished: the grid's missing
    rates; then, while the best rate is the largest (smallest) one run, the next rate of the 1-2-5 series beyond
    it, up to the axis's limits, so that the choice is never at the edge of what was tried. `axis`: the rate
    tuned (default the client rate, on the method's grid)."""
    axis = axis or Axis(CLIENT_LR.key, grid(method))
    missing = [lr for lr in axis.grid if not any(_same(lr, done) for done in scores)]
    if missing:
        return missing
    best, low, high = best_rate(scores), min(scores), max(scores)
    if best == high and high * (1 + 1e-9) < axis.limits[1]:
        return [min(r for r in axis.series if r > high * (1 + 1e-9))]
    if best == low and low * (1 - 1e-9) > axis.limits[0]:
        return [max(r for r in axis.series if r < low * (1 - 1e-9))]
    return []


def scores_of(runs: pd.DataFrame, key: str = CLIENT_LR.key) -> dict[str, dict[float, float]]:
    """method -> {rate: last-round validation METRIC} of the finished tuning runs (per_run()'s rows); the rate is
    the config key `key`."""
    runs = runs[(runs["status"] == "finished") & runs[METRIC].notna()]
    if "client.val_fraction" in runs:
        runs = runs[runs["client.val_fraction"] > 0]  # only runs scored on validation rows choose
    if key not in runs:
        return {}
    return {method: dict(zip(group[key].astype(float), group[METRIC].astype(float)))
            for method, group in runs.groupby("method", sort=False)}


def finished_scores(root: Path, key: str = CLIENT_LR.key) -> dict[str, dict[float, float]]:
    try:
        return scores_of(analysis.per_run(analysis.load_runs(root)), key)
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
    return write_table("Validation personal accuracy (last round) per learning rate, seed 0, client.val_fraction=0.2, "
                       "Dirichlet(0.5), 1 seed. Reproduce: `python scripts/tune.py run && python scripts/tune.py "
                       "choose`.", table, runs, missing, out)


def write_table(head: str, table: pd.DataFrame, runs: Path, missing: list[str], out: Path) -> str:
    """The tuning table as markdown: `head`, the table, the kept runs' time, the methods not chosen yet; written to
    `out` and returned."""
    md = [head, ""]
    if len(table):
        md += [analysis.frame_markdown(table), "", analysis.run_time(analysis.per_run(analysis.load_runs(runs)))]
    if missing:
        md += ["", "Not chosen yet: " + ", ".join(missing)]
    text = "\n".join(md) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def launch_server(methods: list[str], root: Path, runs: Path, conf: Path, extra: list[str]) -> None:
    """Each method's second rate on its axis (SERVER_AXES), at its base method's tuned client rate."""
    restored = archive.restore(runs, root)
    if restored:
        print(f"restored {len(restored)} finished run(s) from {runs}", flush=True)
    for method in methods:
        base, variant = split_variant(method)
        if not method_file(method).exists():
            raise SystemExit(f"no conf/method/{method}.yaml")
        axis, lr = SERVER_AXES[variant], tuned_client_lr(base, conf)
        asked: list[float] = []
        while todo := wanted(method, finished_scores(root / method, axis.key).get(method, {}), axis):
            if todo == asked:
                raise SystemExit(f"{method}: {axis.key}={', '.join(f'{x:g}' for x in todo)} ran but gave no finished "
                                 f"run with a {METRIC}; see its run dir under {root / method}")
            asked = todo
            cmd = [sys.executable, "-m", "celora", "-m", "experiment=tune", f"method={method}", f"client.lr={lr:g}",
                   f"{axis.key}=" + ",".join(f"{x:g}" for x in todo), f"hydra.sweep.dir={root}/{method}",
                   f"hydra.sweep.subdir='{axis.short}=${{{axis.key}}}'", *extra]
            print("$", " ".join(cmd), flush=True)
            try:
                subprocess.run(cmd, check=True, cwd=ROOT)
            finally:
                archive.keep(root, runs)


def choose_server(root: Path, runs: Path, conf: Path, out: Path, methods: list[str]) -> str:
    """Per method: its second rate's validation accuracies, the choice as conf/method/tuned/<method>.yaml (the base's
    client rate and the chosen second rate) and the table `out`."""
    if root.exists():
        archive.keep(root, runs)
    rows, missing = [], []
    for method in methods:
        base, variant = split_variant(method)
        axis, lr = SERVER_AXES[variant], tuned_client_lr(base, conf)
        scores = finished_scores(runs, axis.key).get(method, {})
        todo = wanted(method, scores, axis)
        if todo:
            missing.append(f"{method} ({len(scores)} rates finished; to run: {', '.join(f'{x:g}' for x in todo)})")
            continue
        best = best_rate(scores)
        edge = "at the limit of the rates tried" if best in (min(scores), max(scores)) else ""
        rows.append({"method": method, "client.lr": lr, "tuned": axis.key, "chosen": best,
                     f"val {METRIC}": scores[best], "rates run": len(scores), "note": edge,
                     **{f"{x:g}": scores[x] for x in sorted(scores)}})
        body = [line for line in method_file(method).read_text().splitlines()
                if not line.startswith("#") and line.strip()]
        section, key = axis.key.split(".")
        client = [f"  lr: {lr:g}"] + ([f"  {key}: {best:g}"] if section == "client" else [])
        body = [line for line in body if not (section == "client" and line.strip().startswith(f"{key}:"))]
        if body and body[-1].strip() == "client:":
            body = body[:-1]
        text = "\n".join([
            "# @package _global_",
            f"# {method} at the rates scripts/tune.py chose: client.lr {lr:g} (the tuned {base}'s), {axis.key} {best:g}",
            f"# (validation personal accuracy {scores[best]:.4f}, client.val_fraction=0.2, seed 0, Dirichlet(0.5));",
            "# written by `python scripts/tune.py server-choose`.",
            *[line for line in body if line.strip() != "# @package _global_"],
            "", "client:", *client, *([f"{section}:", f"  {key}: {best:g}"] if section != "client" else []), ""])
        conf.mkdir(parents=True, exist_ok=True)
        (conf / f"{method}.yaml").write_text(text)
    table = pd.DataFrame(rows)
    if len(table):
        rates = sorted((c for c in table.columns if c[0].isdigit()), key=float)
        table = table[[c for c in table.columns if not c[0].isdigit()] + rates]
    return write_table("Validation personal accuracy (last round) per server rate (server.eta; client.prox_mu for "
                       "FedProx) at the base method's tuned client rate, seed 0, client.val_fraction=0.2, Dirichlet(0.5), "
                       f"1 seed. Reproduce: `python scripts/tune.py server --methods {' '.join(methods)} && python "
                       f"scripts/tune.py server-choose --methods {' '.join(methods)}`.", table, runs, missing, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("run", "choose", "server", "server-choose"))
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--root", type=Path, default=ROOT / "multirun" / "tune", help="the sweeps' dir (outside git)")
    ap.add_argument("--runs", type=Path, default=ROOT / "docs" / "results" / "tuning" / "runs",
                    help="where finished runs are kept, in git (what choose reads)")
    ap.add_argument("--conf", type=Path, default=ROOT / "conf" / "method" / "tuned")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "tuning.md")
    args, extra = ap.parse_known_args()
    extra = [e for e in extra if e != "--"]
    if args.action.startswith("server"):  # their own dirs unless given
        given = set(sys.argv)
        args.root = args.root if "--root" in given else ROOT / "multirun" / "tune_server"
        args.runs = args.runs if "--runs" in given else ROOT / "docs" / "results" / "tuning_server" / "runs"
        args.out = args.out if "--out" in given else ROOT / "docs" / "results" / "tuning_server.md"
        if "--methods" not in given:
            raise SystemExit(f"{args.action} needs --methods, e.g. --methods lora_fedadam tri_fedavgm")
    if args.action == "run":
        launch(args.methods, args.root, args.runs, extra)
    elif args.action == "choose":
        print(choose(args.root, args.runs, args.conf, args.out, args.methods))
    elif args.action == "server":
        launch_server(args.methods, args.root, args.runs, args.conf, extra)
    else:
        print(choose_server(args.root, args.runs, args.conf, args.out, args.methods))


if __name__ == "__main__":
    main()
