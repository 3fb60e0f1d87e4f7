"""Local training with Lightning: one client on the model's own tensors, or a cohort of clients stacked."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from celora.adapters import stacked
from celora.data.batches import IGNORE
from celora.tasks import Task
from celora.tensors import State

for _name in ("lightning", "lightning.pytorch", "lightning.fabric"):
    logging.getLogger(_name).setLevel(logging.ERROR)  # one Trainer per client fit: keep the log quiet


class Tokens:
    """A count of the input tokens local training has processed (rows of clients still stepping only)."""

    def __init__(self):
        self.count = 0

    def take(self) -> int:
        """The count since the last take."""
        n, self.count = self.count, 0
        return n


@dataclass
class Fitting:
    """How every local fit of a run goes: the task's loss, the optimiser, clipping, the device."""

    task: Task
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]  # params -> optimiser (Hydra `_partial_`)
    grad_clip: float | None = None
    accelerator: str = "cpu"
    tokens: Tokens = field(default_factory=Tokens)


class LocalTraining(L.LightningModule):
    """The task's loss on a cohort's batches, optimising only its trainable tensors.

    Sequential is a cohort of one on the model's own tensors. A stacked cohort of K clients
    holds each trainable tensor as (K, ...) and sees K clients' rows per batch, client-major;
    the loss is the sum of each client's mean loss, so each client's gradient is its own.
    Clipping is per client, and a client past its `steps` is masked: its tensors and its
    optimiser state stay as they were after its last step.
    """

    def __init__(self, model: nn.Module, trainable: Iterable[str], task: Task,
                 optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
                 steps: Sequence[int] | None = None, on_first_backward: Callable[[nn.Module], None] | None = None,
                 tokens: Tokens | None = None):
        super().__init__()
        self.tokens = tokens or Tokens()
        self.model = model
        self.trainable = set(trainable)
        self.task = task
        self.optimizer_factory = optimizer
        self.steps = list(steps) if steps is not None else None  # None: not stacked
        self.losses: list[torch.Tensor] = []
        self.on_first_backward = on_first_backward  # sees the model's gradients once, before clipping

    def training_step(self, batch, batch_idx):
        per_client = self.task.loss(self.model, batch, clients=len(self.steps) if self.steps else 1)
        self.losses.append(per_client.detach())
        if self.steps is None:
            if "attention_mask" in batch:
                self.tokens.count += int(batch["attention_mask"].sum())
            return per_client[0]
        active = torch.tensor([batch_idx < s for s in self.steps], device=per_client.device)
        if "attention_mask" in batch:
            self.tokens.count += int((batch["attention_mask"].view(len(self.steps), -1).sum(1) * active).sum())
        return (per_client * active).sum()

    def on_after_backward(self):
        if self.on_first_backward is not None:
            self.on_first_backward(self.model)
            self.on_first_backward = None

    def client_losses(self) -> list[float]:
        """Each client's mean training loss over the steps it ran."""
        losses = torch.stack(self.losses)
        steps = self.steps or [len(losses)]
        return [losses[:s, k].mean().item() for k, s in enumerate(steps)]

    def configure_optimizers(self):
        params = [p for n, p in self.model.named_parameters() if n in self.trainable]
        return self.optimizer_factory(params)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.steps is None:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if gradient_clip_val:
            clip_per_client([p for g in optimizer.param_groups for p in g["params"]], gradient_clip_val)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        done = [k for k, s in enumerate(self.steps or []) if batch_idx >= s]
        kept = client_slices(optimizer, done)
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        restore_slices(kept, done)


@torch.no_grad()
def clip_per_client(params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ for each client on its own: the norm of client k's slices of all tensors."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.linalg.vector_norm(torch.stack([g.flatten(1).norm(dim=1) for g in grads]), dim=0)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *[1] * (g.dim() - 1)))
    return norms


def client_slices(optimizer: torch.optim.Optimizer, clients: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of the given clients' slices of every stacked tensor and its per-element optimiser state."""
    if not clients:
        return []
    kept = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = [v for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v) and v.shape == p.shape]
            kept += [(t, t.detach()[clients].clone()) for t in (p, *state)]
    return kept


@torch.no_grad()
def restore_slices(kept: list[tuple[torch.Tensor, torch.Tensor]], clients: list[int]) -> None:
    for t, old in kept:
        t[clients] = old


def set_trainable(model: nn.Module, trainable: Iterable[str]) -> None:
    names = set(trainable)
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)


class CohortBatches:
    """K clients' batches concatenated client-major, padded to the cohort's longest sequence.

    A client that has run its steps repeats its last batch: its rows keep every block the same
    size, and LocalTraining masks them out of the loss and the update.
    """

    def __init__(self, loaders: Sequence[Iterable[dict]], steps: Sequence[int], pad_id: int):
        self.loaders, self.steps, self.pad_id = loaders, list(steps), pad_id

    def __len__(self) -> int:
        return max(self.steps)

    def __iter__(self):
        its = [iter(loader) for loader in self.loaders]
        last: list[dict] = [{} for _ in its]
        for t in range(len(self)):
            last = [next(it) if t < s else b for it, s, b in zip(its, self.steps, last)]
            yield concat(last, self.pad_id)


def concat(batches: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Row-wise concatenation; every dimension after the rows is right-padded to the longest (`input_ids` with
    pad_id, `attention_mask` with 0, anything else, such as a causal LM's token targets and options, with
    IGNORE); images (`pixel_values`) all have one size and are concatenated as they are."""
    out = {}
    for key in batches[0]:
        parts = [b[key] for b in batches]
        if key != "pixel_values" and parts[0].dim() >= 2:
            fill = {"input_ids": pad_id, "attention_mask": 0}.get(key, IGNORE)
            shape = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
            parts = [F.pad(p, [x for d in reversed(range(1, p.dim())) for x in (0, shape[d - 1] - p.shape[d])],
                           value=fill) for p in parts]
        out[key] = torch.cat(parts)
    return out


def _fit(module: LocalTraining, batches, grad_clip: float | None, accelerator: str) -> None:
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        gradient_clip_val=grad_clip, gradient_clip_algorithm="norm", num_sanity_val_steps=0,
    )
    module.model.train()  # Lightning keeps submodules' modes; dropout is on while training
    trainer.fit(module, train_dataloaders=batches)
    module.model.eval()


def train_local(model: nn.Module, trainable: Iterable[str], batches, fitting: Fitting,
                on_first_backward: Callable[[nn.Module], None] | None = None) -> float:
    """One client's local steps on the model's own tensors; returns its mean training loss.

    The optimiser state is fresh each round.
    """
    module = LocalTraining(model, trainable, fitting.task, fitting.optimizer, on_first_backward=on_first_backward,
                           tokens=fitting.tokens)
    _fit(module, batches, fitting.grad_clip, fitting.accelerator)
    return module.client_losses()[0]


def train_cohort(model: nn.Module, trainable: Sequence[str], states: Sequence[State],
                 loaders: Sequence[Iterable[dict]], steps: Sequence[int], fitting: Fitting, pad_id: int,
                 on_first_backward: Callable[[nn.Module], None] | None = None) -> tuple[list[float], list[State]]:
    """K clients' local steps in one batched pass over the shared backbone.

    `states[k]` holds client k's starting trainable tensors; returns each client's mean training
    loss and its trained tensors (on CPU). The optimiser state is fresh each round.
    """
    with stacked(model, states) as params:
        module = LocalTraining(model, trainable, fitting.task, fitting.optimizer, steps, on_first_backward,
                               fitting.tokens)
        _fit(module, CohortBatches(loaders, steps, pad_id), fitting.grad_clip, fitting.accelerator)
        finals = [{n: params[n].detach()[k].to("cpu", copy=True) for n in states[0]} for k in range(len(states))]
    return module.client_losses(), finals
