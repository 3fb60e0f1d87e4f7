"""What crosses the wire, defined once: the exchanged tensor names, payloads at the wire dtype, bytes."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from celora.adapters import AdapterConfig, factor_names
from celora.errors import ConfigError

# fp64 carries an fp64 model's tensors unrounded (the equivalence tests compare simulation paths in it)
WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
SEED_BYTES = 8  # the 64-bit seed from which every client rebuilds the frozen factors and the head init


def wire_dtype(name: str) -> torch.dtype:
    if name not in WIRE_DTYPES:
        raise ConfigError(f"fl.wire_dtype must be one of {sorted(WIRE_DTYPES)}, got {name!r}")
    return WIRE_DTYPES[name]


@dataclass(frozen=True)
class Exchange:
    """Which trainable tensors are uploaded and aggregated (`shared`) and which stay on the client."""

    shared: tuple[str, ...]
    private: tuple[str, ...]

    @property
    def trainable(self) -> tuple[str, ...]:
        return self.shared + self.private

    @classmethod
    def of(cls, model: nn.Module, adapter: AdapterConfig, communicates: bool = True) -> Exchange:
        head = [n for n, _ in model.named_parameters() if n.startswith("head.")]
        shared = factor_names(model, adapter.shared) + (head if adapter.head == "shared" else [])
        private = factor_names(model, adapter.private) + (head if adapter.head == "local" else [])
        if not communicates:  # local training only: every trained tensor stays home
            shared, private = [], factor_names(model, adapter.trainable) + head
        return cls(tuple(shared), tuple(private))


@dataclass(frozen=True)
class Payload:
    """Tensors as sent: already cast to the wire dtype, so `nbytes` is what the link carries; `dtypes` are
    the sender's, in which the receiver holds them again (the dtype is part of the model, not of the link)."""

    tensors: dict[str, torch.Tensor]
    dtypes: dict[str, torch.dtype]

    @classmethod
    def pack(cls, state: dict[str, torch.Tensor], names: tuple[str, ...], dtype: torch.dtype) -> Payload:
        return cls({n: state[n].detach().to(device="cpu", dtype=dtype).clone() for n in names},
                   {n: state[n].dtype for n in names})

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def unpack(self) -> dict[str, torch.Tensor]:
        return {n: t.to(self.dtypes[n]) for n, t in self.tensors.items()}
