"""Local training with Lightning: one client on the model's own tensors, or a cohort of clients stacked."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from celora.adapters import stacked
from celora.data.batches import IGNORE
from celora.fl.engine import Engine
from celora.tasks import Task
from celora.tensors import State


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
    """How every local fit of a run goes: the task's loss, the optimiser, clipping, the device and precision,
    the batches of a step and the round's rate (`lr_scale` times the optimiser's own: the schedule's factor)."""

    task: Task
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]  # params -> optimiser (Hydra `_partial_`)
    grad_clip: float | None = None
    engine: Engine = field(default_factory=Engine)  # the run's one Fabric: made once, shared by every fit
    tokens: Tokens = field(default_factory=Tokens)
    grad_accum: int = 1  # batches whose gradients make one optimiser step
    lr_scale: float = 1.0
    prox_mu: float = 0.0  # FedProx: mu/2 ||w - w_received||^2 over the `anchored` tensors joins each step's loss
    anchored: tuple[str, ...] = ()  # the client's shared trained tensors (what it received and sends back)


class LocalTraining(L.LightningModule):
    """The task's loss on a cohort's batches, optimising only its trainable tensors: the one place where the
    loss and the step are defined.

    Sequential is a cohort of one on the model's own tensors. A stacked cohort of K clients
    holds each trainable tensor as (K, ...) and sees K clients' rows per batch, client-major;
    the loss is the sum of each client's mean loss, so each client's gradient is its own.
    Clipping is per client, and a client past its `steps` is masked: its tensors and its
    optimiser state stay as they were after its last step.

    A step takes `grad_accum` = k batches (`steps` counts steps, so a client reads steps x k batches). It
    equals one step on their rows together: each batch's loss is its summed loss over the count the whole
    step's loss is a mean over (`Task.loss_count`: rows, or a causal LM's answer tokens, summed over the k
    batches and known from them before the first forward pass), its gradients add up in `.grad`, and the
    step is clipped once, after the k-th backward pass.

    FedProx (`prox_mu` > 0, Li et al. 2020): each client's loss of a step gains mu/2 ||w - w0||^2 over its
    `anchored` tensors, w0 their values when the fit starts (what the client received; in a stacked cohort
    each client's own slice). It joins the first batch of a step, so an accumulated step adds it once. The
    logged training loss is the task's alone (comparable across methods). mu = 0 adds nothing at all.

    `fit` drives it with the run's Lightning Fabric (`Engine`), not a `Trainer`: a Trainer made per
    fit costs its set-up inside every client of every round, and its teardown moves the whole
    module, backbone included, back to the CPU after each fit. Fabric is set up once per run and
    leaves the model where it is; it supplies the device, autocast, the backward pass and the
    optimiser step in the run's precision, and the loop below is all there is of the step. No step
    reads a value back to the host: the per-client losses are gathered once, after the fit.
    """

    def __init__(self, model: nn.Module, trainable: Iterable[str], task: Task,
                 optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
                 steps: Sequence[int] | None = None, on_first_backward: Callable[[nn.Module], None] | None = None,
                 tokens: Tokens | None = None, grad_clip: float | None = None, grad_accum: int = 1,
                 lr_scale: float = 1.0, prox_mu: float = 0.0, anchored: Iterable[str] = ()):
        super().__init__()
        self.tokens = tokens or Tokens()
        self.model = model
        self.trainable = set(trainable)
        self.task = task
        self.optimizer_factory = optimizer
        self.grad_clip = grad_clip
        self.steps = list(steps) if steps is not None else None  # None: not stacked
        self.grad_accum, self.lr_scale = grad_accum, lr_scale
        self.prox_mu = prox_mu
        self.anchored = [n for n in anchored if n in self.trainable] if prox_mu > 0 else []
        self.anchors: list[tuple[nn.Parameter, torch.Tensor]] = []  # (tensor, its value at the fit's start)
        self.losses: list[torch.Tensor] = []  # [clients] a step: each client's loss of the step
        self.parts: list[torch.Tensor] = []  # the same, of each batch of the step so far
        self.on_first_backward = on_first_backward  # sees the model's gradients once, before clipping
        self.active: torch.Tensor | None = None  # [steps, K] on the device: which clients still step

    @property
    def clients(self) -> int:
        return len(self.steps) if self.steps else 1

    def training_step(self, batch, step: int, total: torch.Tensor | None = None, first: bool = True):
        """The loss to differentiate of one batch of step `step`. total=None: each client's mean loss on
        it (a step of one batch); else each client's summed loss over `total` ([clients]: its count in the
        whole accumulated step), so the step's batches add up to its mean over all of them. The step's
        `first` batch carries the proximal term, where there is one."""
        if total is None:
            per_client = self.task.loss(self.model, batch, clients=self.clients)
        else:
            per_client = self.task.loss_sum(self.model, batch, clients=self.clients) / total
        self.parts.append(per_client.detach())
        if self.anchors and first:
            per_client = per_client + self.proximal()
        if self.steps is None:
            return per_client[0]
        return (per_client * self.active[step]).sum()

    def proximal(self) -> torch.Tensor:
        """[clients] mu/2 ||w - w0||^2 of each client over the anchored tensors (a stacked tensor's leading dim is
        its clients)."""
        if self.steps is None:
            sq = sum((p - a).pow(2).sum() for p, a in self.anchors).reshape(1)
        else:
            sq = sum((p - a).pow(2).flatten(1).sum(1) for p, a in self.anchors)
        return 0.5 * self.prox_mu * sq

    def count_tokens(self, batch: dict[str, torch.Tensor], step: int) -> None:
        """The input tokens of the clients still stepping, counted on the host batch (no device read-back)."""
        mask = batch.get("attention_mask")
        if mask is None:
            return
        if self.steps is None:
            self.tokens.count += int(mask.sum())
        else:
            per_client = mask.reshape(len(self.steps), -1).sum(1)
            self.tokens.count += int(sum(n for n, s in zip(per_client.tolist(), self.steps) if step < s))

    def configure_optimizers(self):
        params = [p for n, p in self.model.named_parameters() if n in self.trainable]
        optimizer = self.optimizer_factory(params)
        for group in optimizer.param_groups:  # the round's rate (x 1.0 is exact: without a schedule, its own)
            group["lr"] = group["lr"] * self.lr_scale
        return optimizer

    def clip(self, engine: Engine, optimizer) -> None:
        """torch's clip_grad_norm_ over the trainable tensors, or per client for a stacked cohort."""
        engine.unscale(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if self.steps is None:
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        else:
            clip_per_client(params, self.grad_clip)

    def fit(self, engine: Engine, batches: Iterable[dict[str, torch.Tensor]]) -> None:
        """One pass over `batches` on the engine's device and precision; the optimiser state is fresh."""
        optimizer = engine.fabric.setup_optimizers(self.configure_optimizers())
        if self.steps is not None:
            t = torch.arange(max(self.steps)).unsqueeze(1)
            self.active = (t < torch.tensor(self.steps).unsqueeze(0)).to(engine.device)
        self.model.train()  # dropout is on while training
        params = dict(self.model.named_parameters())
        self.anchors = [(params[n], params[n].detach().clone()) for n in self.anchored]
        try:
            for step, micro in enumerate(accumulated(batches, self.grad_accum)):
                optimizer.zero_grad(set_to_none=True)
                # what the step's loss is a mean over, from its host batches: no device read-back
                total = None if self.grad_accum == 1 else sum(
                    self.task.loss_count(b, clients=self.clients) for b in micro).clamp_min(1).to(engine.device)
                self.parts = []
                for j, batch in enumerate(micro):
                    self.count_tokens(batch, step)
                    with engine.autocast():
                        loss = self.training_step(engine.to_device(batch), step, total, first=j == 0)
                    engine.fabric.backward(loss)
                    if self.on_first_backward is not None:
                        self.on_first_backward(self.model)
                        self.on_first_backward = None
                self.losses.append(sum(self.parts[1:], self.parts[0]))
                if self.grad_clip:  # once a step, on the accumulated gradient
                    self.clip(engine, optimizer)
                done = [k for k, s in enumerate(self.steps or []) if step >= s]
                kept = client_slices(optimizer, done)
                optimizer.step()
                restore_slices(kept, done)
            optimizer.zero_grad(set_to_none=True)  # no gradient outlives the fit
        finally:
            self.anchors = []
            self.model.eval()

    def client_losses(self) -> list[float]:
        """Each client's mean training loss over the steps it ran (read back once, after the fit)."""
        losses = torch.stack(self.losses).double().cpu()
        steps = self.steps or [len(losses)]
        return [losses[:s, k].mean().item() for k, s in enumerate(steps)]


def accumulated(batches: Iterable[dict[str, torch.Tensor]], k: int):
    """The batches in consecutive lists of k: one optimiser step each (a last, shorter list if they run out)."""
    step = []
    for batch in batches:
        step.append(batch)
        if len(step) == k:
            yield step
            step = []
    if step:
        yield step


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


def train_local(model: nn.Module, trainable: Iterable[str], batches, fitting: Fitting,
                on_first_backward: Callable[[nn.Module], None] | None = None) -> float:
    """One client's local steps on the model's own tensors; returns its mean training loss.

    The optimiser state is fresh each round.
    """
    module = LocalTraining(model, trainable, fitting.task, fitting.optimizer, on_first_backward=on_first_backward,
                           tokens=fitting.tokens, grad_clip=fitting.grad_clip, grad_accum=fitting.grad_accum,
                           lr_scale=fitting.lr_scale, prox_mu=fitting.prox_mu, anchored=fitting.anchored)
    module.fit(fitting.engine, batches)
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
                               fitting.tokens, fitting.grad_clip, fitting.grad_accum, fitting.lr_scale,
                               fitting.prox_mu, fitting.anchored)
        # each client reads steps x grad_accum batches; one past its steps stays masked for all of a step's
        module.fit(fitting.engine, CohortBatches(loaders, [s * fitting.grad_accum for s in steps], pad_id))
        finals = [{n: params[n].detach()[k].to("cpu", copy=True) for n in states[0]} for k in range(len(states))]
    return module.client_losses(), finals
