"""Attach adapter layers to a model by module name, and list which tensors each rule covers."""
from __future__ import annotations

import torch
from torch import nn

from celora.adapters.config import AdapterConfig
from celora.adapters.layer import AdapterLayer, is_adaptable
from celora.errors import InputError

PREFIX = "lora_"  # every adapter tensor's name ends in lora_A / lora_B / lora_C


def is_factor(name: str) -> bool:
    """Whether a parameter name is an adapter factor's (A, B or C), not the head's or the backbone's."""
    return name.rpartition(".")[2].startswith(PREFIX)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def adaptable_names(model: nn.Module) -> list[str]:
    """Short names (last component) of the linear-like modules a target may name."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and is_adaptable(m)})


ALL_LINEAR = "all-linear"  # every linear map of the network but its output layer (an LM's lm_head, our head)
OUTPUT_LAYERS = ("lm_head", "head")


def _all_linear(name: str, module: nn.Module) -> bool:
    return is_adaptable(module) and name.rsplit(".", 1)[-1] not in OUTPUT_LAYERS


def inject(model: nn.Module, cfg: AdapterConfig, targets: list[str] | str, seed: int) -> list[str]:
    """Replace every module matching a target by an AdapterLayer around it; returns their names.
    `targets="all-linear"` (or ["all-linear"]) takes every linear map but the output layer.

    Factors are drawn from one generator seeded by `seed` (the 64-bit value the server sends
    once), in module order, so every client that runs this builds identical A and B.
    """
    gen = torch.Generator().manual_seed(seed)
    targets = [targets] if isinstance(targets, str) else list(targets)
    every = targets == [ALL_LINEAR]
    hits = [
        (n, m) for n, m in model.named_modules()
        if n and not isinstance(m, AdapterLayer) and (_all_linear(n, m) if every else any(_matches(n, t) for t in targets))
    ]
    if not hits:
        raise InputError(
            f"adapter.targets={list(targets)} match no module of {type(model).__name__}; "
            f"its linear modules are: {adaptable_names(model)}"
        )
    unusable = [n for n, m in hits if not is_adaptable(m)]
    if unusable:
        raise InputError(
            f"adapter.targets match modules that are not linear maps: {unusable[:5]}; "
            f"pick among: {adaptable_names(model)}"
        )
    # build every layer before swapping any in: a refused one (e.g. r too large) leaves the model untouched
    layers = [(name, AdapterLayer(module, cfg, gen)) for name, module in hits]
    for name, layer in layers:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
    return [n for n, _ in hits]


def factor_names(model: nn.Module, factors: list[str]) -> list[str]:
    """Full parameter names of the given adapter factors (e.g. ["C"]) in module order."""
    suffixes = tuple(f".{PREFIX}{f}" for f in factors)
    return [n for n, _ in model.named_parameters() if n.endswith(suffixes)]


def adapter_layers(model: nn.Module) -> list[AdapterLayer]:
    return [m for m in model.modules() if isinstance(m, AdapterLayer)]


def silent_layers(model: nn.Module, trainable) -> list[str]:
    """Names of the adapter layers whose trainable factors all hold a zero or absent gradient, read after a
    backward pass: modules off the task's forward path (a BERT pooler under mean pooling), whose factors
    would be trained and sent for nothing. A layer with no trainable factor is not counted."""
    names = set(trainable)
    out = []
    for name, layer in model.named_modules():
        if isinstance(layer, AdapterLayer):
            mine = [p for n, p in layer.named_parameters(prefix=name, recurse=False) if n in names]
            if mine and all(p.grad is None or not bool(p.grad.any()) for p in mine):
                out.append(name)
    return out


def merge(model: nn.Module) -> None:
    for layer in adapter_layers(model):
        layer.merge()


def unmerge(model: nn.Module) -> None:
    for layer in adapter_layers(model):
        layer.unmerge()
