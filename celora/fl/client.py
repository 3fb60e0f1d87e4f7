"""Local training of one client's tensors with Lightning (the backbone is shared and frozen)."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

for _name in ("lightning", "lightning.pytorch", "lightning.fabric"):
    logging.getLogger(_name).setLevel(logging.ERROR)  # one Trainer per client fit: keep the log quiet


class LocalTraining(L.LightningModule):
    """Cross-entropy on the client's batches, optimising only its trainable tensors."""

    def __init__(self, model: nn.Module, trainable: Iterable[str],
                 optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]):
        super().__init__()
        self.model = model
        self.trainable = set(trainable)
        self.optimizer_factory = optimizer
        self.losses: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        loss = F.cross_entropy(self.model(**inputs), batch["labels"])
        self.losses.append(loss.detach())
        return loss

    def configure_optimizers(self):
        params = [p for n, p in self.model.named_parameters() if n in self.trainable]
        return self.optimizer_factory(params)


def set_trainable(model: nn.Module, trainable: Iterable[str]) -> None:
    names = set(trainable)
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)


def train_local(model: nn.Module, trainable: Iterable[str], batches, optimizer, *,
                grad_clip: float | None, accelerator: str = "cpu") -> float:
    """One client's local steps; returns its mean training loss. The optimiser state is fresh each round."""
    module = LocalTraining(model, trainable, optimizer)
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        gradient_clip_val=grad_clip, gradient_clip_algorithm="norm", num_sanity_val_steps=0,
    )
    model.train()  # Lightning keeps submodules' modes; dropout is on while training
    trainer.fit(module, train_dataloaders=batches)
    model.eval()
    return torch.stack(module.losses).mean().item()
