"""A run's global and personal models written out: PEFT adapter folders or merged Hugging Face folders, each with
its model card."""
from __future__ import annotations

import json
import logging
import shlex
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from celora.adapters import AdapterLayer
from celora.adapters.layer import as_matrix
from celora.errors import InputError
from celora.export import adapter as peft_files
from celora.export.card import card
from celora.export.classifier import write_head
from celora.export.source import Trained, metrics_row, open_run
from celora.files import atomic_folder
from celora.schema import choice, make
from celora.tensors import load

log = logging.getLogger("celora")
FORMATS = ("peft", "merged")
GLOBAL = "global"


def client_folder(i: int) -> str:
    return f"client_{i}"


def select(trained: Trained, models: str) -> list[int | None]:
    """The models `--models` names: None for the global model, client ids for personal ones.

    `global`: the server's one model (refused where trained tensors stay on the clients); `personal`: every
    client's own model (refused where each is the global one); `all`: what the method has of both; or
    client ids, `0,3,7`, whose own models are exported even where they equal the global one."""
    states, n = trained.sim.states, trained.sim.fl.num_clients
    has_global = states.global_model() is not None
    personalised = not states.pooled and (bool(states.private_names) or trained.sim.aggregator.personalised)
    if models == GLOBAL:
        if not has_global:
            raise InputError(f"--models global: this run has no global model, because {_private(trained)} stay on "
                             "the clients; export --models personal (or client ids)")
        return [None]
    if models == "personal":
        if not personalised:
            raise InputError("--models personal: every client of this run has the global model (the server sends "
                             "all of them the same state and nothing trained stays on a client); export --models "
                             "global, or name client ids (0,1,...) for copies")
        return list(range(n))
    if models == "all":
        return ([None] if has_global else []) + (list(range(n)) if personalised else [])
    try:
        ids = [int(x) for x in models.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--models {models!r} is not global, personal, all or client ids such as 0,3,7") from None
    bad = [i for i in ids if not 0 <= i < n]
    if bad or not ids:
        raise InputError(f"--models {models!r}: client {bad[0] if bad else '(none)'} is not a client of this run, "
                         f"which has fl.num_clients={n} (ids 0 to {n - 1})")
    return sorted(set(ids))


def _private(trained: Trained) -> str:
    names = sorted({n.rpartition(".")[2] for n in trained.sim.states.private_names})
    return "its private tensors (" + ", ".join(names) + ")"


def base_of(trained: Trained, root: Path) -> str:
    """What adapter_config.json names as the base model: the user's hub id or folder, or, for weights made
    here (a random tiny model, SmolLM2 converted from GGUF, a packaged model), a Hugging Face folder written
    once under the export root (`base/`)."""
    backbone = trained.world.backbone
    if backbone.source is not None:
        path = Path(backbone.source)
        return str(path.resolve()) if path.exists() else backbone.source
    folder = root / "base"
    if not (folder / "config.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        # a fresh load, unquantized: the weights before adapters, as peft loads them for any run
        atomic_folder(folder, make(trained.cfg.model, quantize=None).save_pretrained)
    return str(folder.resolve())


@torch.no_grad()
def merged_state(model: nn.Module, pretrained: nn.Module, base: nn.Module, w0: dict[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
    """The base model's state dict (`w0`, of `base`: the unquantized architecture without adapters) with every
    adapter of the run's `model` folded in, W0 + s·B·C·A, into new tensors. W0 comes from the unquantized base, so
    a run with model.quantize merges into full-precision weights."""
    prefix = peft_files.module_path(model, pretrained)
    layers = {name[len(prefix):]: layer for name, layer in model.named_modules() if isinstance(layer, AdapterLayer)}
    out = {}
    for key, value in w0.items():
        path, _, leaf = key.rpartition(".")
        if leaf == "weight" and path in layers:
            value = value.clone()
            as_matrix(base.get_submodule(path), value).add_(layers[path].delta_weight().to(value.dtype))
        out[key] = value
    return out


def _write_model(trained: Trained, folder: Path, fmt: str, base: str | None,
                 fresh: tuple[nn.Module, dict] | None) -> None:
    """One model (already loaded into the run's model) as a PEFT or a merged folder, head included; `fresh` is the
    merged format's base architecture and its W0."""
    backbone, model = trained.world.backbone, trained.sim.model
    pretrained = backbone.pretrained
    if fmt == "peft":
        tensors, modules = peft_files.lora_tensors(model, pretrained)
        conv1d = any(type(m.base_layer).__name__ == "Conv1D" for m in model.modules() if isinstance(m, AdapterLayer))
        task_type = "CAUSAL_LM" if backbone.answers == "tokens" else "FEATURE_EXTRACTION"
        peft_files.write(folder, tensors, peft_files.lora_config(trained.world.parts.adapter, modules, base,
                                                                 task_type, conv1d))
    else:
        base_model, w0 = fresh
        base_model.load_state_dict(merged_state(model, pretrained, base_model, w0))
        folder.mkdir(parents=True, exist_ok=True)
        base_model.save_pretrained(folder)
        if getattr(backbone, "tokenizer", None) is not None:
            backbone.tokenizer.save_pretrained(folder)
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        write_head(folder, head, model.pooling, trained.world.data.label_names)


def export_run(run_dir: str | Path, which: str = "last", models: str = "all", fmt: str = "peft",
               out: str | Path | None = None, command: Sequence[str] | None = None) -> list[Path]:
    """Writes the models of `run_dir` at round `which` as `fmt` folders under `out` (default
    <run_dir>/export/round_<k>/<fmt>): `global/` and `client_<i>/`, each with README.md (the model card) and
    celora.json (the same facts, for programs). Returns the folders written."""
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r} is not one of {FORMATS}")
    command = list(command) if command is not None else [
        "python", "-m", "celora.export", str(run_dir), "--round", which, "--models", models, "--format", fmt]
    t0 = time.perf_counter()
    trained = open_run(run_dir, which)
    log.info("rebuilt %s at round %d in %.1f s", run_dir, trained.round, time.perf_counter() - t0)
    return write(trained, models, fmt, out, command)


def write(trained: Trained, models: str, fmt: str, out: str | Path | None, command: Sequence[str]) -> list[Path]:
    """export_run on a run already opened at its round (several formats of one round share the opening)."""
    t0 = time.perf_counter()
    run_dir = trained.run_dir
    if trained.world.backbone.pretrained is None:
        raise InputError(f"model_type={trained.world.backbone.model_type!r} is not a Hugging Face model: PEFT and "
                         "transformers cannot load it, so there is no folder to export (text encoders and causal "
                         "LMs export; docs/export.md)")
    chosen = select(trained, models)
    export_root = Path(run_dir) / "export"
    root = Path(out) if out is not None else export_root / f"round_{trained.round}" / fmt
    base = base_of(trained, export_root) if fmt == "peft" else None
    fresh = None
    if fmt == "merged":  # the base without adapters and unquantized, its weights kept aside: W0 of every merge
        base_model = make(trained.cfg.model, quantize=None).pretrained
        fresh = (base_model, {k: v.clone() for k, v in base_model.state_dict().items()})
    row = metrics_row(trained)
    written = []
    for i in chosen:
        states = trained.sim.states
        load(trained.sim.model, states.global_model() if i is None else states.of(i))
        folder = root / (GLOBAL if i is None else client_folder(i))
        if folder.exists():
            shutil.rmtree(folder)  # an export of the same round and models again: the same content, rewritten
        _write_model(trained, folder, fmt, base, fresh)
        facts = _facts(trained, i, fmt, base, row, shlex.join(command))
        (folder / "celora.json").write_text(json.dumps(facts, indent=1))
        (folder / "README.md").write_text(card(facts))
        written.append(folder)
    log.info("exported %d model(s) of %s, round %d, as %s folders under %s in %.1f s", len(written), run_dir,
             trained.round, fmt, root, time.perf_counter() - t0)
    return written


def _facts(trained: Trained, i: int | None, fmt: str, base: str | None, row: dict, command: str) -> dict:
    """What the model card says, as data: what the model is, where it came from, how good, and at what cost."""
    sim, cfg = trained.sim, trained.cfg
    if i is None:
        metrics = {k: v for k, v in row.items() if k.startswith("global/")}
    else:
        by_client = dict(zip(sim.evaluated, row.get("personal/acc_by_client") or []))
        metrics = {"personal/acc": by_client.get(i)}
    return {
        "model": GLOBAL if i is None else client_folder(i),
        "client": i,
        "format": fmt,
        "round": trained.round,
        "evaluated_round": row.get("round"),
        "method": method_name(trained),
        "base_model": base if base is not None else trained.world.backbone.source,
        "model_option": _model_option(trained),
        # what the generic loaders (hf_causal_lm, hf_encoder) need to read the folder as the run did
        "model_keys": {k: trained.cfg.model.get(k) for k in ("max_length", "dtype") if k in trained.cfg.model},
        "adapter": {"name": trained.world.parts.adapter.name, "r": trained.world.parts.adapter.r,
                    "alpha": trained.world.parts.adapter.alpha},
        "metrics": metrics,
        "uplink_bytes": row.get("comm/up_bytes_cum"),
        "downlink_bytes": row.get("comm/down_bytes_cum"),
        "seed": cfg.seed,
        "run_dir": str(Path(trained.run_dir).resolve()),
        "command": command,
        "labels": trained.world.data.label_names if getattr(trained.sim.model, "head", None) is not None else None,
    }


def _recorded_choice(trained: Trained, group: str) -> str | None:
    """The option of `group` Hydra recorded for the run (.hydra/hydra.yaml), where the run came from the CLI."""
    hydra = Path(trained.run_dir) / ".hydra" / "hydra.yaml"
    if not hydra.exists():
        return None
    from omegaconf import OmegaConf

    found = OmegaConf.select(OmegaConf.load(hydra), f"hydra.runtime.choices.{group}")
    return None if found in (None, "null", "None") else str(found)


def _model_option(trained: Trained) -> str:
    recorded = _recorded_choice(trained, "model")
    return f"model={recorded}" if recorded else choice(trained.cfg, "model")


def method_name(trained: Trained) -> str:
    """The run's `method=` choice where Hydra recorded it, else its adapter and aggregator."""
    recorded = _recorded_choice(trained, "method")
    if recorded:
        return f"method={recorded}"
    return f"adapter={trained.world.parts.adapter.name}, aggregator={type(trained.sim.aggregator).__name__}"
