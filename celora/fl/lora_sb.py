"""Fed-SB's round 0: the frozen factors of a tri adapter from the clients' full-weight gradients (LoRA-SB init).

Fed-SB (Singhal, Ponkshe, Vartak, Vepakomma: "Fed-SB: A Silver Bullet for Extreme Communication Efficiency and
Performance in (Private) Federated LoRA Fine-Tuning", arXiv 2502.15436) trains, as CE-LoRA's `tri` does, only
the r x r matrix between two frozen factors, and averages it exactly with FedAvg. Its factors come from
LoRA-SB (arXiv 2411.19557): the truncated SVD of the first full fine-tuning update. Here, as the method says:

1. every client computes the gradient of the task loss with respect to each adapted module's full weight W0,
   on one seeded batch of its own training rows (seeds.LORA_SB_BATCH), and uploads it at fl.wire_dtype;
2. the server averages them weighted by the clients' training examples, takes the truncated SVD
   G = U S V^T of each module's mean, and sends back A = V_r^T (r x d_in) and B = U_r (d_out x r);
3. the run proceeds as `tri` + FedAvg: C starts at zero (round 0 is the pretrained model, as for every
   method of the table; LoRA-SB's own R = S_r / s would start from a one-step update instead).

Orthonormal A and B, as `tri`'s seeded init, keep ||dW/dC_ij|| = s, so C's learning rates carry over. The
uploads are d_out x d_in values per module and client, the honest cost of this initialisation
(`round_zero_bytes` says how many); both directions are counted in round 0's comm/up_bytes and comm/down_bytes.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from celora.adapters import adapter_layers
from celora.adapters.layer import as_matrix, base_weight_matrix
from celora.data.batches import Collate, Encoded, train_loader
from celora.fl.engine import Engine, autocast
from celora.seeds import LORA_SB_BATCH, derive_seed
from celora.tasks import Task
from celora.tensors import State


def layer_names(model: nn.Module) -> list[str]:
    """The adapted modules' names, in module order (the keys of the gradients and of the factors)."""
    layers = set(map(id, adapter_layers(model)))
    return [n for n, m in model.named_modules() if id(m) in layers]


def client_gradient(model: nn.Module, task: Task, data: Encoded, rows: Sequence[int], batch_size: int,
                    seed: int, client: int, collate: Collate, engine: Engine | None = None) -> State:
    """Module name -> the gradient of the task loss w.r.t. its full base weight (d_out x d_in), on one seeded
    batch of `rows` (a smaller client: all its rows), in training mode with seeded dropout. The model is left as
    it was: no weight changes, no grad, the same requires_grad flags."""
    names = layer_names(model)
    modules = dict(model.named_modules())
    weights = [modules[n].base_layer.weight for n in names]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
        w.grad = None
    size = min(batch_size, len(rows))
    batch = next(iter(train_loader(data, rows, size, 1, derive_seed(seed, LORA_SB_BATCH, client), collate)))
    device = weights[0].device
    model.train()
    try:
        gpus = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=gpus), autocast(engine):  # dropout seeded too; the run's RNG untouched
            torch.manual_seed(derive_seed(seed, LORA_SB_BATCH, client))
            loss = task.loss(model, {k: v.to(device) for k, v in batch.items()})
        loss.backward()
        out = {}
        for n in names:
            layer = modules[n].base_layer
            out[n] = weight_gradient(layer).detach().to(torch.float32).cpu().clone()
    finally:
        for w in weights:
            w.grad = None
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.eval()
    return out


def weight_gradient(layer: nn.Module) -> torch.Tensor:
    """The gradient of a base layer's weight, in base_weight_matrix's (d_out, d_in) layout."""
    if layer.weight.grad is None:
        raise RuntimeError(f"a {type(layer).__name__} got no gradient: the module is off the task's forward path; "
                           "leave it out of adapter.targets")
    return as_matrix(layer, layer.weight.grad)


def mean_gradient(grads: dict[int, State], examples: dict[int, int]) -> State:
    """The example-weighted mean over clients of each module's gradient (float64)."""
    total = sum(examples[i] for i in grads)
    names = next(iter(grads.values())).keys()
    return {n: sum(grads[i][n].double() * (examples[i] / total) for i in sorted(grads)) for n in names}


def factors(mean: State, ranks: dict[str, int]) -> State:
    """`<module>.lora_A` = V_r^T and `<module>.lora_B` = U_r of each module's truncated SVD, signs fixed so that
    each column of U_r has a positive largest entry (the factors depend on the gradient alone)."""
    out = {}
    for name, g in mean.items():
        r = ranks[name]
        u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
        u, vh = u[:, :r], vh[:r]
        pivot = u.abs().argmax(dim=0)
        sign = torch.sign(u[pivot, torch.arange(r)])
        sign[sign == 0] = 1
        out[f"{name}.lora_A"] = (vh * sign.unsqueeze(1)).contiguous()
        out[f"{name}.lora_B"] = (u * sign.unsqueeze(0)).contiguous()
    return out


def ranks(model: nn.Module) -> dict[str, int]:
    modules = dict(model.named_modules())
    return {n: modules[n].r for n in layer_names(model)}


@torch.no_grad()
def install(model: nn.Module, state: State) -> None:
    """Writes the factors into the model's frozen lora_A / lora_B (in their own dtype and device)."""
    params = dict(model.named_parameters())
    for name, value in state.items():
        params[name].copy_(value.to(params[name].dtype))


def round_zero_bytes(model: nn.Module, clients: int, value_bytes: int) -> tuple[int, int]:
    """(uplink, downlink) bytes of Fed-SB's round 0 for `clients` clients: each uploads every adapted module's
    d_out x d_in gradient and receives its r x d_in A and d_out x r B, `value_bytes` per value."""
    up = down = 0
    for layer in adapter_layers(model):
        d_out, d_in = base_weight_matrix(layer.base_layer).shape
        up += d_out * d_in
        down += layer.r * (d_in + d_out)
    return clients * up * value_bytes, clients * down * value_bytes
