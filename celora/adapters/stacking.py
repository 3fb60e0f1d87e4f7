"""Parallel cohorts: K clients' adapter factors (and trained linear maps) stacked along a leading client dim."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from celora.adapters.inject import adapter_layers
from celora.adapters.layer import AdapterLayer
from celora.tensors import State


def cohort_size(model: nn.Module) -> int | None:
    """K while a parallel cohort's stacked factors are in the model (see stacked), else None."""
    for layer in adapter_layers(model):
        k = layer.cohort_size()
        if k is not None:
            return k
    return None


@contextmanager
def stacked(model: nn.Module, states: Sequence[State]) -> Iterator[dict[str, nn.Parameter]]:
    """Holds K clients' copies of the named tensors in the model, stacked along a leading dim.

    Adapter factors are swapped for (K, ...) parameters in their layer; a trained nn.Linear (the
    head) is swapped for a StackedLinear. The backbone is untouched and shared; everything is put
    back on exit. Yields the stacked parameters by name.
    """
    params = dict(model.named_parameters())
    names = list(states[0])

    def stack(name: str) -> nn.Parameter:
        ref = params[name]
        return nn.Parameter(torch.stack([s[name] for s in states]).to(device=ref.device, dtype=ref.dtype))

    out, undo = {}, []
    for owner_name in dict.fromkeys(n.rpartition(".")[0] for n in names):
        owner = model.get_submodule(owner_name)
        mine = [n for n in names if n.rpartition(".")[0] == owner_name]
        if isinstance(owner, AdapterLayer):
            for n in mine:
                attr = n.rpartition(".")[2]
                undo.append((owner, attr, getattr(owner, attr)))
                out[n] = stack(n)
                setattr(owner, attr, out[n])
        elif isinstance(owner, nn.Linear):
            weight = stack(f"{owner_name}.weight") if f"{owner_name}.weight" in mine else owner.weight.expand(
                len(states), *owner.weight.shape)
            bias = owner.bias
            if f"{owner_name}.bias" in mine:
                bias = stack(f"{owner_name}.bias")
            elif bias is not None:
                bias = bias.detach().expand(len(states), *bias.shape)
            out.update({n: t for n, t in ((f"{owner_name}.weight", weight), (f"{owner_name}.bias", bias)) if n in mine})
            parent_name, _, child = owner_name.rpartition(".")
            parent = model.get_submodule(parent_name)
            undo.append((parent, child, owner))
            setattr(parent, child, StackedLinear(weight, bias))
        else:
            raise TypeError(f"cannot stack {mine}: parallel simulation stacks adapter factors and nn.Linear "
                            f"tensors, not a {type(owner).__name__}")
    try:
        yield out
    finally:
        for module, attr, original in reversed(undo):
            setattr(module, attr, original)


class StackedLinear(nn.Module):
    """A linear map with K clients' (weight, bias) along a leading dim: row block k of the input uses client k's.

    Stands in for a trained nn.Linear (the task head) while a cohort trains in parallel.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = weight  # (K, out, in)
        self.bias = bias  # (K, out) or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.weight.shape[0]
        out = torch.matmul(x.reshape(k, -1, x.shape[-1]), self.weight.mT)
        if self.bias is not None:
            out = out + self.bias.unsqueeze(1)
        return out.reshape(*x.shape[:-1], out.shape[-1])
