"""A frozen pretrained backbone, a pooling rule and a linear task head, as one module."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn
from transformers import PreTrainedModel

from celora.errors import ConfigError
from celora.models.backbone import Backbone
from celora.tensors import client_dtype

Pooling = Literal["mean", "cls", "last"]  # `last`: the last non-padding token (decoders)
POOLINGS = get_args(Pooling)


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """(batch, seq, hidden) -> (batch, hidden). `last` takes the last non-padding token (decoders)."""
    if how == "cls":
        return hidden[:, 0]
    if mask is None:
        return hidden.mean(1) if how == "mean" else hidden[:, -1]
    if how == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    if how == "last":
        # right padding: index of the last 1 in each row
        idx = (mask.long().cumsum(1).argmax(1))
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    raise ConfigError(f"pooling must be one of {POOLINGS}, got {how!r}")


@dataclass
class HeadOnTop(Backbone):
    """A backbone whose classifier is a seeded linear head on its pooled hidden states (text and image
    encoders). Subclasses add their own fields keyword-only (`@dataclass(kw_only=True)`)."""

    backbone: nn.Module
    hidden_size: int
    model_type: str
    pooling: str = "mean"
    source: str | None = None  # the hub id or folder it came from (Backbone.source)

    @property
    def pretrained(self) -> nn.Module | None:
        return self.backbone if isinstance(self.backbone, PreTrainedModel) else None

    def classifier(self, num_classes: int, seed: int, label_names: list[str] | None = None) -> Classifier:
        """`label_names` are not needed by a linear head (a CLIP model's prompts use them)."""
        return Classifier.frozen(self.backbone, self.hidden_size, num_classes, self.pooling, seed)


class Classifier(nn.Module):
    """logits = head(pool(backbone(inputs))). The head is an ordinary trainable tensor pair."""

    def __init__(self, backbone: nn.Module, hidden_size: int, num_classes: int, pooling: str = "mean"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"model.pooling must be one of {POOLINGS}, got {pooling!r}")
        self.backbone = backbone
        self.pooling = pooling
        self.head = nn.Linear(hidden_size, num_classes)

    def features(self, **inputs) -> torch.Tensor:
        out = self.backbone(**inputs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return pool(hidden, inputs.get("attention_mask"), self.pooling)

    def forward(self, **inputs) -> torch.Tensor:
        feats = self.features(**inputs)
        return self.head(feats.to(self.head.weight.dtype))  # a no-op unless the backbone is held in bf16

    @classmethod
    def frozen(cls, backbone: nn.Module, hidden_size: int, num_classes: int, pooling: str, seed: int) -> Classifier:
        """The backbone frozen under a fresh head seeded by `seed`: identical on every client given the seed."""
        torch.manual_seed(seed)
        model = cls(backbone, hidden_size, num_classes, pooling)
        # drawn in fp32 (the same numbers), held as the backbone (at least fp32: client_dtype)
        model.head.to(client_dtype(next(backbone.parameters()).dtype))
        model.backbone.requires_grad_(False)
        return model
