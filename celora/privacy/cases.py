"""One batch of the privacy comparison per modality: which examples, the attack on an upload, its scores, what a person looks at."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from celora.privacy.attack import ImageAttack, State, TextAttack
from celora.privacy.scores import position_accuracy, psnr, ssim, token_f1


@dataclass
class Outcome:
    scores: dict[str, float]  # the case's `metrics` and more
    labels: Tensor  # the labels the attacker settled on
    loss: float  # how well its reconstruction's update matches the observed one
    original: object  # what the client had, and what the attacker made of it, in the case's own form
    reconstruction: object


@dataclass
class TextCase(TextAttack):
    """Text: reviews of at most `max_tokens` tokens; token F1 and position accuracy; texts side by side."""

    max_tokens: int = 32
    metrics = ("f1", "position_acc")

    def eligible(self, data) -> np.ndarray:
        return np.flatnonzero(data.lengths(range(len(data))) <= self.max_tokens)

    def on_batch(self, model: nn.Module, observed: State, names: list[str], batch: dict[str, Tensor],
                 num_classes: int, steps: int, client_lr: float, generator: torch.Generator,
                 backbone) -> Outcome:
        tok = backbone.tokenizer
        ids, special = batch["input_ids"], tok.all_special_ids
        free = ~torch.isin(ids, torch.tensor(special, device=ids.device))
        template = torch.where(free, tok.pad_token_id, ids)  # the attacker knows lengths and special tokens
        rec = self(model, observed, names, template, batch["attention_mask"], free, batch["labels"], num_classes,
                   steps, client_lr, generator)
        truth, guess = ids.tolist(), rec.ids.tolist()
        f1 = token_f1(guess, truth, special)
        scores = {"f1": f1["f1"], "precision": f1["precision"], "recall": f1["recall"],
                  "position_acc": position_accuracy(guess, truth, special), "candidates": rec.candidates}
        return Outcome(scores, rec.labels.cpu(), rec.loss, tok.batch_decode(truth, skip_special_tokens=True),
                       tok.batch_decode(guess, skip_special_tokens=True))

    @staticmethod
    def write(outcomes: list[tuple[dict, Outcome]], out: Path) -> None:
        """texts.md: each original beside its reconstruction."""
        lines = ["# Reconstructions\n"]
        for key, o in outcomes:
            lines.append(f"\n## {key['victim']}, {key['defence']}, batch size {key['batch_size']}, batch {key['batch']} "
                         f"(F1 {o.scores['f1']:.2f})\n")
            lines += [f"- original:      {t}\n- reconstructed: {g}\n" for t, g in zip(o.original, o.reconstruction)]
        (out / "texts.md").write_text("".join(lines))


@dataclass
class ImageCase(ImageAttack):
    """Images: any test image; PSNR and SSIM against the originals in [0, 1]; a PNG grid of them all."""

    metrics = ("psnr", "ssim")

    def eligible(self, data) -> np.ndarray:
        return np.arange(len(data))

    def on_batch(self, model: nn.Module, observed: State, names: list[str], batch: dict[str, Tensor],
                 num_classes: int, steps: int, client_lr: float, generator: torch.Generator,
                 backbone) -> Outcome:
        collate = backbone.collate()
        device = batch["pixel_values"].device
        mean, std, channels = collate.mean.to(device), collate.std.to(device), collate.channels
        truth = batch["pixel_values"] * std + mean  # back to [0, 1]
        if channels > 1 and torch.allclose(truth, truth[:, :1].expand_as(truth), atol=1e-5):
            truth = truth[:, :1]  # grey images repeated by the collator: the attacker searches one channel

        def normalize(images: Tensor) -> Tensor:  # the data's own pipeline, known to the attacker
            return (images.expand(-1, channels, -1, -1) - mean) / std

        rec = self(model, observed, names, tuple(truth.shape), batch["labels"], num_classes, steps, client_lr,
                   generator, normalize=normalize)
        flat = torch.full_like(truth, truth.mean().item())  # the best guess without the upload: the mean intensity
        scores = {"psnr": psnr(rec.images, truth), "ssim": ssim(rec.images, truth),
                  "psnr_flat": psnr(flat, truth), "ssim_flat": ssim(flat, truth)}
        return Outcome(scores, rec.labels.cpu(), rec.loss, truth.cpu(), rec.images.cpu())

    @staticmethod
    def write(outcomes: list[tuple[dict, Outcome]], out: Path) -> None:
        """reconstructions_b<B>.png: per batch size, a row of the originals, then one row per upload x defence."""
        from celora.plots import image_grid

        by_size: dict[int, dict[str, dict[int, np.ndarray]]] = {}
        for key, o in outcomes:
            rows = by_size.setdefault(key["batch_size"], {})
            rows.setdefault("original", {})[key["batch"]] = o.original.numpy()
            rows.setdefault(f"{key['victim']}, {key['defence']}", {})[key["batch"]] = o.reconstruction.numpy()
        for size, rows in by_size.items():
            rows = {label: np.concatenate([batches[k] for k in sorted(batches)]) for label, batches in rows.items()}
            grid = image_grid(rows, f"B={size}: original, then reconstructions")
            grid.savefig(out / f"reconstructions_b{size}.png", dpi=100)

