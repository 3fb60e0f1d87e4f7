"""A finished (or stopped) run's trained state at a chosen round, rebuilt from its run dir's checkpoints."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from celora.errors import InputError
from celora.fl import checkpoint
from celora.fl.simulation import Simulation
from celora.metrics import best_round
from celora.world import World, build_world


@dataclass
class Trained:
    """A run dir's models at one kept round: its config, world (data, partition, model) and simulation, whose
    `states` hold the global state, each client's personalised state and the private tensors of that round."""

    run_dir: Path
    cfg: DictConfig
    round: int
    world: World
    sim: Simulation
    rows: list[dict]  # metrics.jsonl's rows up to that round (the checkpoint's own)


def kept_rounds(run_dir: Path) -> list[int]:
    """The rounds whose checkpoint the run dir keeps, newest first; refuses a dir that is not a run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir} is not a directory: give the run dir of a `python -m celora` run "
                         "(outputs/<date>/<time>, or one job of multirun/...)")
    kept = checkpoint.rounds(run_dir / "checkpoints")
    if not kept:
        what = "a run dir without checkpoints" if (run_dir / "metrics.jsonl").exists() else "not a run dir"
        raise InputError(f"{run_dir} is {what}: {run_dir / 'checkpoints'} holds no round_<k>.pt. Export reads a "
                         "run's checkpoints; a run finished before checkpoints existed has to run again")
    return kept


def _payload(run_dir: Path, rnd: int) -> dict:
    path = checkpoint.path_of(run_dir / "checkpoints", rnd)
    try:
        return checkpoint.decode(path.read_bytes())
    except (OSError, ValueError) as e:
        raise InputError(f"{path} cannot be read ({e}); export another kept round: "
                         f"{kept_rounds(run_dir)}") from None


def choose(run_dir: Path, which: str) -> dict:
    """The checkpoint payload of round `which`: `last` (the newest intact one: a run killed mid-way, or one
    whose newest file is damaged, gives the round before), `best` (the evaluated round where the run's
    `optimized_metric` is best) or a round number; a round that is not kept is refused, naming those that are."""
    run_dir = Path(run_dir)
    kept = kept_rounds(run_dir)
    if which == "last":
        try:
            return checkpoint.load_latest(run_dir / "checkpoints")
        except checkpoint.CheckpointError as e:
            raise InputError(str(e).replace("Start the run over with resume=never (or another run dir).",
                                            "Nothing of this run can be exported.")) from None
    if which == "best":
        newest = checkpoint.load_latest(run_dir / "checkpoints")
        key = (_run_config(run_dir, newest) or {}).get("optimized_metric")
        rnd = best_round(newest["metrics"], key)
        if rnd is None:
            raise InputError(f"{run_dir}'s metrics have no value of {key or 'global/acc or personal/acc'}: "
                             "no best round to export; use --round last or a round number")
        if rnd not in kept:
            raise InputError(f"the best round of {run_dir} ({key or 'global/acc, else personal/acc'}) is {rnd}, "
                             f"whose checkpoint is not kept (kept: {kept}): the run was made before runs kept "
                             "their best round; use --round with one of those")
        return _payload(run_dir, rnd)
    try:
        rnd = int(which)
    except ValueError:
        raise InputError(f"--round {which!r} is not last, best or a round number") from None
    if rnd not in kept:
        raise InputError(f"round {rnd} of {run_dir} is not kept: a run keeps the checkpoints of its newest two "
                         f"rounds and of its best; use --round with one of {kept}")
    return _payload(run_dir, rnd)


def _run_config(run_dir: Path, payload: dict) -> dict | None:
    """The whole config the run ran under: kept in each checkpoint, or (runs made before that) Hydra's
    .hydra/config.yaml beside them."""
    if payload.get("run_config") is not None:
        return payload["run_config"]
    saved = Path(run_dir) / ".hydra" / "config.yaml"
    if saved.exists():
        return OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
    return None


def open_run(run_dir: str | Path, which: str = "last") -> Trained:
    """The run's models at round `which` (see `choose`), rebuilt on the CPU: the same data, partition, frozen
    factors and head init as the run (from its config and seed), the trained tensors from the checkpoint."""
    run_dir = Path(run_dir)
    payload = choose(run_dir, which)
    config = _run_config(run_dir, payload)
    if config is None:
        raise InputError(f"{run_dir} keeps no config to rebuild the run from (neither its checkpoints nor "
                         ".hydra/config.yaml): a run made by run(cfg, run_dir) before checkpoints kept their "
                         "config; run it again to export it")
    cfg = OmegaConf.create(config)
    # the models are read, not trained: the CPU and fp32 arithmetic are enough, wherever the run trained
    cfg.simulation.accelerator, cfg.simulation.precision = "cpu", "32-true"
    world = build_world(cfg)
    sim = world.simulation(progress=False)
    sim.load_state_dict(payload["simulation"])
    return Trained(run_dir, cfg, payload["round"], world, sim, payload["metrics"])


def metrics_row(trained: Trained) -> dict:
    """The evaluated row of the exported round (or the last evaluated one before it), undefined metrics (NaN in a
    checkpoint's rows) as None, as metrics.jsonl writes them."""
    rows = [r for r in trained.rows if r["round"] <= trained.round]

    def clean(value):
        if isinstance(value, list):
            return [clean(v) for v in value]
        return None if isinstance(value, float) and not math.isfinite(value) else value

    return {k: clean(v) for k, v in (rows[-1] if rows else {}).items()}
