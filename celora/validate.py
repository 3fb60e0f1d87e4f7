"""Checks a composed config before any work: every key against its declared type (celora.schema), then builds its
cheap typed parts (each checks itself) and how they combine."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal, get_args

from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from celora import evalsets, schema
from celora.adapters import AdapterConfig
from celora.data.partition import Partition
from celora.errors import ConfigError
from celora.fl.aggregators import Aggregator
from celora.fl.cohorts import check_cohort_size
from celora.fl.config import ClientConfig, FLConfig
from celora.fl.engine import check_engine
from celora.fl.server_opt import ServerOptimizer
from celora.fl.wire import wire_dtype
from celora.metrics import check_objective
from celora.models.backbone import check_dropout, check_quantize, torch_dtype
from celora.privacy.dp import Privacy
from celora.schema import Range, make
from celora.tasks import Task

Resume = Literal["auto", "never", "force"]
RESUME_MODES = get_args(Resume)
@dataclass
class ExportSettings:
    """`export.*`: the models a run writes when it ends, as `python -m celora.export RUN_DIR` would (its options of
    the same names); they change no number of the run."""

    at_end: bool = False  # off: a run of 1,000 clients would write 1,000 small folders nobody asked for
    format: Literal["peft", "merged"] = "peft"
    models: str = "all"  # global | personal | all | client ids such as 0,3,7
    round: str = "last"  # last | best | a round number


# The top-level keys and the plain nodes that no `_target_` declares (celora.schema reads the groups' own);
# None: a node checked where it is used (flower.*: celora.flower.settings).
PLAIN = {
    "seed": Annotated[int, Range(ge=0)],
    "resume": Annotated[Resume, "auto continues from the run dir's checkpoint, never starts over, force continues "
                                "even if the config changed"],
    "optimized_metric": str | None,
    "fl": FLConfig,
    "server": ServerOptimizer,  # a group of plain nodes (conf/server/): server=adam sets the keys of this one node
    "flower": None,
    "export": ExportSettings,
    "eval_sets": None,  # checked by celora.evalsets.check
}
# The defaults of the top-level keys that are no node's field (a run made before one existed is the same run).
PLAIN_DEFAULTS = {"eval_sets": {}}


def declared_default(config: dict, key: str):
    """The default the code declares for a dotted key of a resolved config: the parameter default of its node's
    `_target_`, or the field default of a plain node (PLAIN); checkpoint.UNSET where none is declared (a key a
    loader passes on through **kwargs, a key of no node)."""
    import dataclasses
    import inspect

    from celora.fl.checkpoint import UNSET

    *path, leaf = key.split(".")
    if not path and leaf in PLAIN_DEFAULTS:
        return PLAIN_DEFAULTS[leaf]
    node = config
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict):
        return UNSET
    if node.get("_target_"):
        try:
            found = schema.declared(node["_target_"]).default(leaf)
        except Exception:  # noqa: BLE001  (a target that no longer imports declares nothing)
            return UNSET
        return UNSET if found is inspect.Parameter.empty else found
    plain = PLAIN.get(path[0]) if len(path) == 1 else None
    if dataclasses.is_dataclass(plain):
        field = next((f for f in dataclasses.fields(plain) if f.name == leaf), None)
        if field is not None and field.default is not dataclasses.MISSING:
            return field.default
    return UNSET


@dataclass
class Parts:
    """The typed pieces of a run that need neither data nor a model."""

    fl: FLConfig
    client: ClientConfig
    adapter: AdapterConfig
    partition: Partition
    aggregator: Aggregator
    privacy: Privacy
    simulation: Callable  # the Simulation class with its config bound (Hydra `_partial_`)
    task: Task
    server: ServerOptimizer = None  # what the server does with the aggregate (server.*); None: as it is

    def __post_init__(self):
        self.server = self.server or ServerOptimizer()


def fl_config(cfg: DictConfig) -> FLConfig:
    """The federation's settings, interpolations resolved (experiments set e.g. eval_every: ${fl.rounds})."""
    return FLConfig(**{**OmegaConf.to_container(cfg.fl, resolve=True), "wire_dtype": wire_dtype(cfg.fl.wire_dtype)})


def _reason(e: Exception) -> str:
    """The message of the error a part raised (Hydra wraps it in an InstantiationException)."""
    while isinstance(e, InstantiationException) and e.__cause__ is not None:
        e = e.__cause__
    return str(e).strip()


def build(cfg: DictConfig) -> Parts:
    """The run's typed parts, or a ConfigError listing every problem at once (so a sweep of typos
    is fixed in one go, not one failed job at a time). Checks that need the data or the model's
    shapes (more clients than examples, rank larger than a layer, unknown targets) happen where
    those are first known, still before any training."""
    problems: list[str] = []
    missing = sorted(OmegaConf.missing_keys(cfg))
    problems += [f"{key} has no value (??? in its config file): set it, e.g. `{key}=...` on the command line"
                 for key in missing]
    declared = schema.problems(cfg, PLAIN)  # types, ranges, unknown keys; model, dataset and task answers
    problems += [p.message for p in declared]
    unfit = {p.key.split(".")[0] for p in declared if p.key} | {key.split(".")[0] for key in missing}

    def part(group: str, make: Callable):
        if group in unfit:  # its own problem is said above; building it would only repeat it less clearly
            return None
        try:
            return make()
        except Exception as e:  # each part's own check names its key; collect them all
            reason = _reason(e)
            problems.append(reason if group in reason else f"{group}: {reason}")
            return None

    fl = part("fl", lambda: fl_config(cfg))
    client = part("client", lambda: make(cfg.client))
    adapter = part("adapter", lambda: make(cfg.adapter))
    partition = part("partition", lambda: make(cfg.partition))
    aggregator = part("aggregator", lambda: make(cfg.aggregator))
    server = part("server", lambda: ServerOptimizer(**OmegaConf.to_container(cfg.get("server") or {}, resolve=True)))
    rate = fl.clients_per_round / fl.num_clients if fl else 1.0
    privacy = part("privacy", lambda: make(cfg.privacy)(sample_rate=rate))
    simulation = part("simulation", lambda: make(cfg.simulation))
    task = part("task", lambda: make(cfg.task))
    part("simulation", lambda: check_cohort_size(cfg.simulation.get("cohort_size")))
    part("simulation", lambda: check_engine(cfg.simulation.get("accelerator", "cpu"),
                                            cfg.simulation.get("precision", "32-true")))

    part("optimized_metric", lambda: check_objective(cfg.get("optimized_metric"), list(cfg.get("eval_sets") or {})))
    problems += evalsets.check(cfg)
    model = cfg.get("model", {})
    part("model", lambda: torch_dtype(model.get("dtype", "fp32")))
    part("model", lambda: check_dropout(model.get("dropout")))
    part("model", lambda: check_quantize(model.get("quantize"), model.get("dtype", "fp32")))

    limit = cfg.get("dataset", {}).get("limit")
    if fl and "dataset" not in unfit and isinstance(limit, int) and 2 * fl.num_clients > limit:
        problems.append(f"fl.num_clients={fl.num_clients} needs at least {2 * fl.num_clients} examples (2 per client, "
                        f"for its local train and test) but dataset.limit={limit}; use fl.num_clients <= "
                        f"{max(1, limit // 2)} or a larger dataset.limit")
    if fl and partition is not None:
        groups = part("partition", lambda: partition.group_of(fl.num_clients))
        if aggregator is not None and aggregator.needs_groups:
            if groups is None:
                problems.append(f"the aggregator ({type(aggregator).__name__}) averages within the partition's true "
                                f"latent groups, but partition ({type(partition).__name__}) has none; use "
                                "partition=grouped, concept_shift or rotation_groups")
            else:
                aggregator.groups = list(groups)

    # How the parts combine: each rule reads what the parts declare, never their names.
    if privacy is not None and aggregator is not None:
        agg = type(aggregator).__name__
        if privacy.active and not aggregator.communicates:
            problems.append(f"privacy ({type(privacy).__name__}) protects uploads, but the aggregator ({agg}) "
                            "uploads nothing (local or centralized training), so an epsilon would describe no "
                            "release; use privacy=none")
        if privacy.mode == "central" and aggregator.personalised:
            problems.append(f"privacy.mode=central calibrates the server's noise to the size-weighted average, but "
                            f"the aggregator ({agg}) sends each client its own mix of the uploads, which that "
                            "noise does not cover; use privacy.mode=local")
    if aggregator is not None and (aggregator.pooled or not aggregator.communicates):
        agg = type(aggregator).__name__
        if server is not None and server.active:
            problems.append(f"server.optimizer={server.optimizer} steps the server's model with the round's aggregate, "
                            f"but the aggregator ({agg}) has no server and no aggregate (local or centralized "
                            "training); use server=none")
        if client is not None and client.prox_mu > 0:
            problems.append(f"client.prox_mu={client.prox_mu} (FedProx) pulls a client towards what it received from "
                            f"the server, but the aggregator ({agg}) sends nothing (local or centralized training); "
                            "use client.prox_mu=0")
    if adapter is not None and adapter.init == "lora_sb" and aggregator is not None:
        if aggregator.pooled or not aggregator.communicates:
            problems.append(f"adapter.init=lora_sb (Fed-SB) averages the clients' round-0 gradients on a server, but the "
                            f"aggregator ({type(aggregator).__name__}) has none; use aggregator=fedavg (method=fed_sb)")
        if privacy is not None and privacy.active:
            problems.append("adapter.init=lora_sb uploads each client's full-weight gradient in round 0, which "
                            "privacy=client does not cover; use privacy=none or another adapter.init")
    if adapter is not None and adapter.init == "lora_sb" and model.get("quantize") is not None:
        problems.append(f"adapter.init=lora_sb (Fed-SB) takes the gradient of the full weights W0, which a "
                        f"model.quantize={model.get('quantize')} base holds packed, with no gradient of its own; use "
                        "model.quantize=null, or adapter.init=svd (its A and B come from the dequantized W0)")
    if fl and fl.max_update_norm_ratio is not None and fl.clients_per_round < 3 and not (
            aggregator is not None and aggregator.pooled):
        problems.append(f"fl.max_update_norm_ratio compares each update with the round's median, which needs at "
                        f"least 3 clients a round, but this config samples {fl.clients_per_round}; raise "
                        "fl.sample_fraction or set fl.max_update_norm_ratio=null")

    if problems:
        raise ConfigError(f"invalid config ({len(problems)} problem{'s' * (len(problems) > 1)}):\n"
                          + "\n".join(f"  - {p}" for p in problems))
    return Parts(fl, client, adapter, partition, aggregator, privacy, simulation, task, server)
