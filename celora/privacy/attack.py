"""Gradient inversion by an honest-but-curious server: replay the client's local steps on dummy inputs until they match its upload."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.func import functional_call

from celora.tensors import State


def local_update(model: nn.Module, names: list[str], inputs: dict[str, Tensor], labels: Tensor, steps: int,
                 lr: float, create_graph: bool = False) -> State:
    """upload - received after `steps` plain SGD steps on one batch (mean cross-entropy), computed functionally.

    The client runs it on its real batch; the attacker runs the same code on dummy inputs with
    `create_graph=True`, so the simulated update is differentiable in those inputs. `labels` are
    class ids or (B, K) probabilities. Tensors the inputs do not reach (the word embeddings when
    `inputs_embeds` is given) get no update and are left out of the result.
    """
    start = dict(model.named_parameters())
    params = {n: start[n].detach().requires_grad_(True) for n in names}
    current = dict(params)
    for _ in range(steps):
        loss = F.cross_entropy(functional_call(model, current, (), inputs), labels)
        grads = torch.autograd.grad(loss, [current[n] for n in names], create_graph=create_graph,
                                    allow_unused=True)
        current = {n: current[n] if g is None else current[n] - lr * g for n, g in zip(names, grads)}
        if not create_graph:
            current = {n: t.detach().requires_grad_(True) for n, t in current.items()}
    moved = {n: current[n] - params[n] for n in names if current[n] is not params[n]}
    return moved if create_graph else {n: t.detach() for n, t in moved.items()}


def cosine_distance(simulated: State, observed: State) -> Tensor:
    """Mean over the tensors both updates have of 1 - cos (inverting gradients' objective, per tensor).

    Per tensor rather than over the concatenation: otherwise the largest tensors, which barely
    depend on the input (e.g. the head), decide alone.
    """
    names = [n for n in simulated if n in observed]
    return torch.stack([1 - F.cosine_similarity(simulated[n].flatten(), observed[n].flatten().to(simulated[n].dtype),
                                                dim=0) for n in names]).mean()


def leaked_tokens(embedding_update: Tensor) -> Tensor:
    """Token ids whose word-embedding row the update moved: exactly the tokens in the batch under SGD.

    With DP noise every row moves; rows then count as leaked when their norm exceeds twice the
    median row norm (the noise floor, since most of the vocabulary is absent from a batch).
    """
    norms = embedding_update.norm(dim=1)
    return torch.nonzero(norms > 2 * norms.median()).flatten()


def labels_from_bias(bias_update: Tensor, mean_probs: Tensor, lr: float, steps: int, batch: int) -> Tensor:
    """Label multiset from the head bias's update (iDLG / LLG style), as sorted class ids.

    Under SGD the bias moves by -lr * sum over steps of mean_i (p_i - onehot(y_i)), so the
    fraction of class c is update_c / (lr * steps) + mean p_c; the attacker estimates mean p
    with the model's prediction on its dummy batch. Fractions are rounded to counts summing to
    `batch` (largest remainder).
    """
    frac = (bias_update.double() / (lr * steps) + mean_probs.double()).clamp_min(0)
    share = frac / frac.sum().clamp_min(1e-12) * batch
    counts = share.floor().long()
    counts[torch.argsort(share - counts, descending=True)[: batch - int(counts.sum())]] += 1
    return torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)


def nearest_tokens(x: Tensor, table: Tensor, candidates: Tensor, required: Tensor) -> Tensor:
    """Token id per row of x (P, d): the nearest candidate embedding, every `required` token used at least once.

    An assignment problem: P positions against the required tokens (each taken once) plus
    P - len(required) wildcard slots that cost the distance to the nearest candidate. With more
    required tokens than positions each position takes a distinct one of them.
    """
    dist = torch.cdist(x.double(), table[candidates].double())
    nearest = candidates[dist.argmin(1)]
    if required.numel() == 0:
        return nearest
    to_required = torch.cdist(x.double(), table[required].double())
    wild = max(len(x) - len(required), 0)
    cost = torch.cat([to_required, dist.min(1).values.unsqueeze(1).expand(-1, wild)], dim=1)
    rows, cols = linear_sum_assignment(cost.numpy())
    out = nearest.clone()
    taken = torch.as_tensor(cols) < len(required)
    out[torch.as_tensor(rows)[taken]] = required[torch.as_tensor(cols)[taken]]
    return out


def total_variation(images: Tensor) -> Tensor:
    """Mean absolute difference between neighbouring pixels of (B, C, H, W) images: the natural-image prior."""
    return ((images[..., 1:, :] - images[..., :-1, :]).abs().mean()
            + (images[..., :, 1:] - images[..., :, :-1]).abs().mean())


def _match(update: Callable[[Tensor, Tensor, bool], State], observed: State, x: Tensor, step_size: float,
           labels: Tensor | None, num_classes: int, iterations: int, lr: float, generator: torch.Generator,
           prior: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Adam on the dummy input `x` (and soft labels when `labels` is None) to minimise the cosine distance
    between the replayed update and the observed one, plus `prior(x)`. Returns (x, label logits)."""
    x = x.requires_grad_(True)
    # drawn on the host from the seeded generator (the same numbers on every device), then moved
    label_logits = torch.randn(x.shape[0], num_classes, generator=generator).to(x.device).requires_grad_(True)
    # label logits live on another scale than the inputs: their own step size
    groups = [{"params": [x], "lr": lr * step_size}]
    groups += [{"params": [label_logits], "lr": lr}] if labels is None else []
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iterations)
    for _ in range(iterations):
        targets = label_logits.softmax(-1) if labels is None else labels
        loss = cosine_distance(update(x, targets, True), observed)
        if prior is not None:
            loss = loss + prior(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return x.detach(), label_logits.detach()


def _bias_name(model: nn.Module) -> str | None:
    """The task head's bias, whose update gives the labels away; None for models without one (CLIP)."""
    head = getattr(model, "head", None)
    bias = getattr(head, "bias", None)
    return next((n for n, p in model.named_parameters() if p is bias), None) if bias is not None else None


def _eager(model: nn.Module) -> None:
    """Plain attention everywhere: fused attention kernels have no double backward, which matching an update needs."""
    for module in model.modules():
        if hasattr(module, "set_attn_implementation") and getattr(module, "config", None) is not None:
            module.set_attn_implementation("eager")


@dataclass
class Reconstruction:
    ids: Tensor  # (B, L) token ids, the known special tokens in place
    labels: Tensor  # (B,)
    loss: float  # cosine distance of the decoded batch's update to the observed one
    candidates: int  # size of the vocabulary the decoder chose from


@dataclass
class TextAttack:
    """Optimise continuous input embeddings so the replayed update matches the observed one.

    The attacker knows the model at the start of the round (backbone, frozen factors, head), the
    client's procedure (SGD steps and learning rate), each sequence's length and its special tokens
    ([CLS], [SEP], padding); it searches the other positions. Labels come from the head bias's
    update when the upload has it (`labels_from_bias`), else they are optimised jointly as soft
    labels (DLG); `infer_labels: false` hands the attacker the true labels. Each restart starts
    from random embeddings; after `iterations` Adam steps the embeddings are decoded to the nearest
    vocabulary token per position and the restart whose decoded batch matches best is kept. When
    the upload contains the word-embedding matrix (full fine-tuning) the decoder only chooses among
    the leaked tokens. `ImageAttack` is the same search over pixels.
    """

    restarts: int = 2
    iterations: int = 200
    lr: float = 0.1  # Adam step, in units of the word embeddings' standard deviation
    infer_labels: bool = True

    def __post_init__(self):
        if self.restarts < 1 or self.iterations < 1 or not self.lr > 0:
            raise ValueError("attack.restarts >= 1, attack.iterations >= 1 and attack.lr > 0 are required")

    def __call__(self, model: nn.Module, observed: State, names: list[str], template: Tensor,
                 attention_mask: Tensor, free: Tensor, labels: Tensor, num_classes: int, steps: int,
                 client_lr: float, generator: torch.Generator) -> Reconstruction:
        """`template`: (B, L) ids whose non-`free` positions (special tokens) the attacker knows; `labels`
        are only used when `infer_labels` is off. `names`: the tensors the client trains."""
        _eager(model)
        table = model.backbone.get_input_embeddings().weight
        emb_name = next(n for n, p in model.named_parameters() if p is table)
        table = table.detach()
        everything = torch.arange(table.shape[0], device=table.device)
        special = template[~free].unique()
        leaked = leaked_tokens(observed[emb_name]) if emb_name in observed else everything[:0]
        leaked = leaked[~torch.isin(leaked, special)]
        # the leaked tokens are the batch's vocabulary; nothing leaked (no embedding in the upload,
        # or nothing stood out of the noise): the whole vocabulary
        candidates = leaked if leaked.numel() else everything[~torch.isin(everything, special)]
        scale = table.std().item()
        fixed, mask = table[template], free.unsqueeze(-1)

        def update(x: Tensor, targets: Tensor, create_graph: bool) -> State:
            inputs = {"inputs_embeds": torch.where(mask, x, fixed), "attention_mask": attention_mask}
            return local_update(model, names, inputs, targets, steps, client_lr, create_graph)

        bias = _bias_name(model)
        best = None
        for _ in range(self.restarts):
            x = scale * torch.randn(fixed.shape, generator=generator).to(fixed.device)
            known = labels if not self.infer_labels else None
            if self.infer_labels and bias in observed:
                with torch.no_grad():
                    probs = model(inputs_embeds=torch.where(mask, x, fixed),
                                  attention_mask=attention_mask).softmax(-1).mean(0)
                known = labels_from_bias(observed[bias], probs, client_lr, steps, len(template))
            x, label_logits = _match(update, observed, x, scale, known, num_classes, self.iterations, self.lr,
                                     generator)
            with torch.no_grad():
                ids = template.clone()
                ids[free] = nearest_tokens(x[free], table, candidates, leaked)
                guess = label_logits.argmax(-1) if known is None else known
            decoded = cosine_distance(update(table[ids], guess, False), observed).item()
            if best is None or decoded < best.loss:
                best = Reconstruction(ids, guess, decoded, candidates.numel())
        return best


@dataclass
class ImageReconstruction:
    images: Tensor  # (B, C, H, W) in [0, 1]
    labels: Tensor  # (B,)
    loss: float  # cosine distance of the reconstruction's update to the observed one


@dataclass
class ImageAttack:
    """Inverting gradients on pixels (Geiping et al., 2020): the TextAttack search with pixels in place of
    embeddings, a total-variation prior of weight `tv`, and no decoding step.

    Pixels are optimised in [0, 1] through a sigmoid and mapped to the model's input by `normalize`
    (the data's own normalisation, known to the attacker); labels as in TextAttack. The restart
    whose update matches best is kept.
    """

    restarts: int = 2
    iterations: int = 200
    lr: float = 0.1  # Adam step on the pixels' logits
    tv: float = 1e-2
    infer_labels: bool = True
    input_name: str = "pixel_values"

    def __post_init__(self):
        if self.restarts < 1 or self.iterations < 1 or not self.lr > 0 or self.tv < 0:
            raise ValueError("attack.restarts >= 1, attack.iterations >= 1, attack.lr > 0 and attack.tv >= 0 "
                             "are required")

    def __call__(self, model: nn.Module, observed: State, names: list[str], shape: tuple[int, ...],
                 labels: Tensor, num_classes: int, steps: int, client_lr: float, generator: torch.Generator,
                 normalize: Callable[[Tensor], Tensor] = lambda images: images) -> ImageReconstruction:
        """`shape`: the batch's (B, C, H, W), known to the attacker; `labels` only used when `infer_labels` is off."""
        _eager(model)
        def inputs(z: Tensor) -> dict[str, Tensor]:
            return {self.input_name: normalize(torch.sigmoid(z))}

        def update(z: Tensor, targets: Tensor, create_graph: bool) -> State:
            return local_update(model, names, inputs(z), targets, steps, client_lr, create_graph)

        bias = _bias_name(model)
        best = None
        for _ in range(self.restarts):
            z = torch.randn(shape, generator=generator).to(next(model.parameters()).device)
            known = labels if not self.infer_labels else None
            if self.infer_labels and bias in observed:
                with torch.no_grad():
                    probs = model(**inputs(z)).softmax(-1).mean(0)
                known = labels_from_bias(observed[bias], probs, client_lr, steps, shape[0])
            z, label_logits = _match(update, observed, z, 1.0, known, num_classes, self.iterations, self.lr,
                                     generator, prior=lambda v: self.tv * total_variation(torch.sigmoid(v)))
            guess = label_logits.argmax(-1) if known is None else known
            loss = cosine_distance(update(z, guess, False), observed).item()
            if best is None or loss < best.loss:
                best = ImageReconstruction(torch.sigmoid(z), guess, loss)
        return best
