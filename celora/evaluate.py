"""`python -m celora.evaluate MODEL [overrides]`: an exported model, or any base model zero-shot, scored on any
dataset and task as a run's evaluation scores it (same batching, same metrics schema, one metrics.jsonl row).

MODEL is one of
- an exported folder (`python -m celora.export`: PEFT adapter or merged model, with celora.json): its model;
- an export root holding `global/` and `client_<i>/` folders, with `--clients`: each client's own model on
  that client's own test rows (and the global model on the test split, where there is one);
- `model=<option>` (e.g. `model=smollm2`) or a Hugging Face folder or hub id: the base model, zero-shot.

The overrides are Hydra's, as for `python -m celora` (`dataset=rt_instruct task=instruct fl.num_clients=10
seed=0`): they choose the data, the partition whose clients' test rows the personal metrics use, and the
batching (`client.eval_batch_size`). An exported model's run recorded its own overrides (.hydra/overrides.yaml);
they come first, so with no overrides its partition is the run's.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from omegaconf import DictConfig

from celora.errors import InputError, UserError
from celora.export.adapter import CONFIG, PEFT_PREFIX, WEIGHTS, module_path
from celora.export.classifier import HEAD_CONFIG, HEAD_WEIGHTS
from celora.tensors import snapshot

log = logging.getLogger("celora")


@dataclass
class Source:
    """What MODEL names: the overrides that build its model in celora, and the exported folders (global, per
    client) whose tensors go into it."""

    overrides: list[str]
    global_folder: Path | None = None
    clients: dict[int, Path] = field(default_factory=dict)
    round: int = 0


def _facts(folder: Path) -> dict:
    return json.loads((folder / "celora.json").read_text())


# What an exported model's own overrides set instead of its run's (the model, its adapter) or leave alone here
# (how the run trained and logged): the run's overrides of these keys are dropped.
NOT_THE_RUN_S = ("model", "adapter", "aggregator", "method", "privacy", "logger", "export", "resume", "hydra")


def _run_overrides(facts: dict) -> list[str]:
    """The overrides the exported model's run was launched with (Hydra keeps them beside the run), but those of
    NOT_THE_RUN_S: they keep its data, partition, task, seed and batching."""
    path = Path(facts.get("run_dir", "")) / ".hydra" / "overrides.yaml"
    if not path.exists():
        return []
    from omegaconf import OmegaConf

    def key(override: str) -> str:
        return override.lstrip("+~").split("=", 1)[0].split(".", 1)[0].split("/", 1)[0]

    return [str(o) for o in OmegaConf.load(path) if key(str(o)) not in NOT_THE_RUN_S]


def _model_overrides(folder: Path) -> list[str]:
    """The model and adapter of an exported folder as overrides: its base (or its merged weights) through the
    generic Hugging Face loaders, and a LoRA adapter of the export's rank, scaling and modules."""
    facts = _facts(folder)
    causal = not (folder / HEAD_CONFIG).exists()
    out = [f"model={'hf_causal_lm' if causal else 'hf_encoder'}"]
    out += [f"model.{k}={v}" for k, v in facts.get("model_keys", {}).items() if v is not None]
    if (folder / CONFIG).exists():
        config = json.loads((folder / CONFIG).read_text())
        targets = ",".join(f"'{t}'" for t in sorted(config["target_modules"]))
        out += [f"model.path={config['base_model_name_or_path']}", "adapter=lora", f"adapter.r={config['r']}",
                f"adapter.alpha={config['lora_alpha']}", f"adapter.targets=[{targets}]"]
    else:  # merged: the weights are the folder's own; a zero LoRA B leaves them as they are
        out += [f"model.path={folder.resolve()}", "adapter=lora", f"adapter.targets=[{_any_target(folder)}]"]
    if not causal:
        out.append(f"model.pooling={json.loads((folder / HEAD_CONFIG).read_text())['pooling']}")
    return out


def _any_target(folder: Path) -> str:
    """A merged model needs no adapter, but every celora model has one: LoRA on the model family's default
    targets (B = 0, so the weights act unchanged)."""
    from transformers import AutoConfig

    from celora.models.backbone import DEFAULT_TARGETS

    kind = AutoConfig.from_pretrained(str(folder)).model_type
    if kind not in DEFAULT_TARGETS:
        raise InputError(f"{folder}: no default adapter targets for model_type={kind!r}")
    return ",".join(DEFAULT_TARGETS[kind])


def describe(model: str, clients: bool) -> Source:
    """MODEL (see the module's doc) as the overrides and folders that rebuild it."""
    path = Path(model)
    if model.startswith("model="):
        return Source([model])
    if clients:
        if not path.is_dir():
            raise InputError(f"--clients needs an export root (with client_<i>/ folders), not {model}")
        found = {int(p.name.split("_", 1)[1]): p for p in path.glob("client_*") if (p / "celora.json").exists()}
        glob = path / "global" if (path / "global" / "celora.json").exists() else None
        if not found:
            raise InputError(f"{model} holds no exported client_<i>/ folder: export personal models first "
                             "(python -m celora.export RUN_DIR --models personal)")
        first = found[min(found)]
        facts = _facts(first)
        return Source([*_run_overrides(facts), *_model_overrides(first)], glob, found, facts["round"])
    if (path / "celora.json").exists():
        facts = _facts(path)
        return Source([*_run_overrides(facts), *_model_overrides(path)], path, {}, facts["round"])
    if path.is_dir() and not (path / "config.json").exists():
        raise InputError(f"{model} is neither an exported folder (no celora.json) nor a Hugging Face model folder "
                         "(no config.json)")
    return Source(["model=hf_causal_lm", f"model.path={path.resolve() if path.exists() else model}"])


@torch.no_grad()
def load_export(model: torch.nn.Module, pretrained: torch.nn.Module, folder: Path) -> None:
    """An exported folder's adapter (PEFT keys) and head into celora's model with a LoRA adapter of the same
    rank and modules; a merged folder's weights are already the model's own."""
    from safetensors.torch import load_file

    params = dict(model.named_parameters())
    prefix = module_path(model, pretrained)
    if (folder / WEIGHTS).exists():
        for key, value in load_file(str(folder / WEIGHTS)).items():
            inner, factor = key[len(PEFT_PREFIX):].rsplit(".", 2)[0], key.rsplit(".", 2)[1]
            target = params.get(f"{prefix}{inner}.{factor}")
            if target is None:
                raise InputError(f"{folder}: {key} names no adapted module of the model")
            target.copy_(value.reshape(target.shape))
    if (folder / HEAD_WEIGHTS).exists():
        for name, value in load_file(str(folder / HEAD_WEIGHTS)).items():
            target = params[f"head.{name}"]
            if target.shape != value.shape:
                raise InputError(f"{folder}'s head scores {value.shape[0]} classes, but the dataset chosen has "
                                 f"{target.shape[0]}: evaluate a classifier on a dataset of its own labels")
            target.copy_(value)


def compose(overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from celora.schema import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def evaluate_model(model: str, overrides: list[str] = (), clients: bool = False, rows: int | None = None,
                   progress: bool = False) -> dict:
    """The metrics row of MODEL (see the module's doc) under `overrides`: global/* of its model on the test
    split (only its first `rows` rows, and no personal metrics, where `rows` is given), personal/* of each
    client's model on its own test rows (the one model for all, or with `clients` each one's own)."""
    return score(prepare(model, overrides, clients, progress), rows)


@dataclass
class Prepared:
    """MODEL in the run's machinery, with nothing to train: the world (data, partition, model), the simulation
    whose states hold MODEL's tensors, and what MODEL is."""

    world: object
    sim: object
    source: Source
    clients: bool


def prepare(model: str, overrides: list[str] = (), clients: bool = False, progress: bool = False) -> Prepared:
    """MODEL (see the module's doc) built and loaded under `overrides`, ready to `score`."""
    from celora.world import build_world

    source = describe(model, clients)
    # one model, scored as is: its tensors stay where they are put, none is private, nothing is trained
    fixed = ["aggregator=fedavg", "adapter.head=shared", "adapter.init=random", "privacy=none", "logger=none",
             "simulation.cohort_size=null", f"simulation.progress={str(progress).lower()}"]
    cfg = compose([*source.overrides, *overrides, *fixed])
    world = build_world(cfg)
    sim = world.simulation()
    pretrained = world.backbone.pretrained
    shared = sim.exchange.shared

    def state_of(folder: Path | None):
        if folder is not None:
            load_export(sim.model, pretrained, folder)
        return snapshot(sim.model, shared)

    start = state_of(None)  # the base model's own: LoRA's B = 0
    scored = state_of(source.global_folder) if source.global_folder is not None or not clients else start
    personal = {i: state_of(folder) for i, folder in source.clients.items()}
    sim.states.aggregated(scored, personal)
    return Prepared(world, sim, source, clients)


def score(prepared: Prepared, rows: int | None = None) -> dict:
    """evaluate_model's row, of a prepared model."""
    sim, source, clients = prepared.sim, prepared.source, prepared.clients
    t0 = time.perf_counter()
    if rows is not None:
        if not 0 < rows <= len(sim.test_data):
            raise InputError(f"--rows {rows}: the test split has {len(sim.test_data)} rows")
        sim.test_rows, sim.evaluated = range(rows), []
        out = _global_only(sim)
    else:
        out = sim.evaluate()
    if clients and source.global_folder is None:
        out = {k: (None if k.startswith("global/") else v) for k, v in out.items()}
    return {"round": source.round, **{k: _clean(v) for k, v in out.items()}, "time/eval_s": time.perf_counter() - t0}


def _global_only(sim) -> dict:
    from celora.fl.evaluation import evaluate

    task = sim.fitting.task
    from celora.tensors import load

    state = sim.states.global_model()
    load(sim.model, state)
    sums = evaluate(sim.model, sim.test_data, sim.test_rows, sim.client.eval_batch_size, sim.collate, task,
                    sim.engine)
    out = {f"global/{k}": v for k, v in task.rates(sums).items()}
    for scored in sim.data.eval_sets:  # eval_sets of the overrides: global only, as --rows is
        out.update(sim.evaluate_set(replace(scored, personal=False), state))
    return out


def _clean(value):
    if isinstance(value, float) and value != value:
        return None
    return value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m celora.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="an exported folder, an export root (--clients), model=<option>, or a Hugging "
                                  "Face folder or hub id")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m celora")
    ap.add_argument("--clients", action="store_true", help="each client_<i>/ folder on its own client's test rows")
    ap.add_argument("--rows", type=int, help="score the global model on the first N rows of the test split only")
    ap.add_argument("--out", help="where metrics.jsonl goes (default: outputs/evaluate/<date>/<time>)")
    args = ap.parse_intermixed_args(argv)  # overrides before and after the flags, as python -m celora takes them
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out or time.strftime("outputs/evaluate/%Y-%m-%d/%H-%M-%S"))
    try:
        row = evaluate_model(args.model, args.overrides, args.clients, args.rows, progress=sys.stderr.isatty())
    except UserError as e:
        print(f"celora.evaluate: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # Hydra's own composition errors, said as python -m celora says them
        from celora.cli import user_message

        said = user_message(e, args.overrides)
        if said is None:
            raise
        print(f"celora.evaluate: {said}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    (out / "evaluation.json").write_text(json.dumps({"model": args.model, "overrides": args.overrides,
                                                     "clients": args.clients, "rows": args.rows}, indent=1))
    print(json.dumps(row))
    log.info("-> %s", out / "metrics.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
