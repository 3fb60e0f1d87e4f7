"""Named tensors (a model's trainable state, a client's, an upload): the type, copies out of and into a model, the norm."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

State = dict[str, torch.Tensor]  # parameter name -> tensor


def client_dtype(backbone: torch.dtype) -> torch.dtype:
    """What a client's own tensors (adapter factors, a head) are held in: the backbone's dtype, but at least
    fp32. A bf16 backbone halves the frozen weights' memory; what trains and what is exchanged (at
    fl.wire_dtype) keeps fp32 master values, as mixed precision does."""
    return torch.promote_types(backbone, torch.float32)


def snapshot(model: nn.Module, names: Iterable[str]) -> State:
    """Detached CPU copies of the named parameters."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().to("cpu", copy=True) for n in names}


@torch.no_grad()
def load(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copies `state` into the model's parameters of the same names (in place: the model keeps its tensors)."""
    params = dict(model.named_parameters())
    for n, t in state.items():
        params[n].copy_(t)


def global_norm(state: Mapping[str, torch.Tensor], minus: Mapping[str, torch.Tensor] | None = None) -> float:
    """L2 norm of all tensors taken together (of `state - minus`, name by name, when given), in float64."""
    if minus is None:
        return math.sqrt(sum(float(t.double().pow(2).sum()) for t in state.values()))
    return math.sqrt(sum(float((t.double() - minus[n].double()).pow(2).sum()) for n, t in state.items()))
