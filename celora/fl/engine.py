"""The run's one device and precision: a single Lightning Fabric, made once per run, that every phase runs on."""
from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext

import lightning as L
import torch
from torch import nn

from celora.errors import ConfigError

for _name in ("lightning", "lightning.pytorch", "lightning.fabric"):
    logging.getLogger(_name).setLevel(logging.ERROR)  # Fabric's start-up notes are not the run's log

ACCELERATORS = ("cpu", "gpu", "cuda", "auto")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")  # Lightning's names


def resolve(accelerator: str) -> str:
    """The device an accelerator name picks on this machine: `gpu` or `cpu` (auto: the GPU where torch sees one)."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "gpu"
    return "cpu"


def check_engine(accelerator: str, precision: str) -> None:
    """The accelerator and precision names, and what this machine can do with them."""
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"simulation.accelerator={accelerator!r} must be one of {ACCELERATORS}")
    if precision not in PRECISIONS:
        raise ConfigError(f"simulation.precision={precision!r} must be one of {PRECISIONS} (Lightning's names): "
                         "32-true trains and evaluates in fp32, bf16-mixed and 16-mixed under autocast")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"simulation.accelerator={accelerator} but this machine has no CUDA device visible to "
                         "torch; use simulation.accelerator=cpu (or auto)")
    cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if precision == "16-mixed" and not cuda:
        raise ConfigError("simulation.precision=16-mixed needs a CUDA device (a gradient scaler guards fp16's "
                         "range there); on the CPU use simulation.precision=bf16-mixed or 32-true")


class Engine:
    """Where and in what precision a run computes: one device, picked once, for training, evaluation, data
    statistics and the attack.

    The backbone is moved there once (`place`) and stays; client tensors move in and uploads move out
    as the small tensors they are. Fabric gives the device, autocast, the backward pass (with fp16's
    gradient scaler), unscaling before clipping and the optimiser step; the loop itself is
    `LocalTraining.fit`, the one place where the loss and the step are defined.
    """

    def __init__(self, accelerator: str = "cpu", precision: str = "32-true"):
        check_engine(accelerator, precision)
        self.accelerator, self.precision = resolve(accelerator), precision
        self.fabric = L.Fabric(accelerator="cuda" if self.accelerator == "gpu" else "cpu", devices=1,
                               precision=precision)

    @property
    def device(self) -> torch.device:
        return self.fabric.device

    def place(self, model: nn.Module) -> nn.Module:
        """Moves the model to the run's device, once; it stays there for the whole run."""
        return model.to(self.device)

    def autocast(self) -> AbstractContextManager:
        """The precision's forward context (autocast for the mixed precisions; nothing for 32-true)."""
        return self.fabric.autocast()

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A batch's tensors on the run's device (non-blocking where the host memory allows it)."""
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def unscale(self, optimizer) -> None:
        """fp16's gradient scaler divides the gradients back before they are clipped (a no-op otherwise)."""
        self.fabric.strategy.precision.unscale_gradients(getattr(optimizer, "optimizer", optimizer))

    def __repr__(self) -> str:
        return f"Engine(device={self.device}, precision={self.precision})"


def autocast(engine: Engine | None) -> AbstractContextManager:
    """The engine's precision context; none without an engine (the model computes in its own dtype)."""
    return nullcontext() if engine is None else engine.autocast()
