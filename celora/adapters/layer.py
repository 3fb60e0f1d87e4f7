"""Low-rank adapter layer: h = W0 x + s * B [C] A x around an untouched base linear map."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from celora.adapters.config import AdapterConfig
from celora.tensors import client_dtype


def is_quantized(base: nn.Module) -> bool:
    """A bitsandbytes layer (model.quantize): its weight is packed 4-bit (with a quant_state) or int8 (with SCB)."""
    w = base.weight
    return getattr(w, "quant_state", None) is not None or getattr(w, "SCB", None) is not None


def base_weight_matrix(base: nn.Module) -> torch.Tensor:
    """The base map as a (d_out, d_in) matrix view, whatever the layer's own layout; a quantized layer's weights
    dequantized into a new float matrix (what its forward multiplies by, up to its compute dtype's rounding)."""
    w = base.weight
    if getattr(w, "quant_state", None) is not None:  # 4-bit NF4 / FP4
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(w.data, w.quant_state)
    if getattr(w, "SCB", None) is not None:  # LLM.int8(): int8 rows, one absmax scale each
        return w.data.float() * (w.SCB.float() / 127).unsqueeze(1)
    return as_matrix(base, w)


def as_matrix(base: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """`w`, shaped as `base`'s weight (the weight itself, or its gradient), as a (d_out, d_in) view."""
    if isinstance(base, nn.Linear):
        return w
    if isinstance(base, nn.Conv2d):  # 1x1 convolution: (out, in, 1, 1)
        return w.view(w.shape[0], w.shape[1])
    if type(base).__name__ == "Conv1D":  # GPT-2: y = x @ W + b with W (d_in, d_out)
        return w.T
    raise TypeError(f"cannot adapt a {type(base).__name__}; supported: Linear, Conv1D (GPT-2), 1x1 Conv2d")


def _project(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """h @ w.T; a factor stacked per client, (K, out, in), maps h viewed as (K, rows, in) by one batched matmul."""
    return F.linear(h, w) if w.dim() == 2 else torch.matmul(h, w.mT)


def is_adaptable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
        return True
    return (
        isinstance(module, nn.Conv2d)
        and module.kernel_size == (1, 1)
        and module.groups == 1
        and module.stride == (1, 1)
        # padding would grow the output with border pixels the pointwise adapter path does not produce
        and module.padding in ((0, 0), "valid", "same")
    )


def _orthonormal_rows(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """rows x cols with orthonormal rows (rows <= cols), from a seeded Gaussian via QR."""
    g = torch.randn(cols, rows, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(g)  # q: cols x rows, orthonormal columns
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # unique QR, so the seed alone fixes q
    return q.T.contiguous()


class AdapterLayer(nn.Module):
    """Wraps `base_layer` (left untouched) and adds s * B C A x, or s * B A x without C.

    Tensors are named `lora_A` (r x d_in), `lora_B` (d_out x r) and `lora_C` (r x r); the
    common `lora_` prefix is how the rest of the code finds adapter tensors.
    """

    def __init__(self, base_layer: nn.Module, cfg: AdapterConfig, gen: torch.Generator):
        super().__init__()
        self.base_layer = base_layer
        self.r = cfg.r
        self.scaling = cfg.alpha / cfg.r
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.merged = False
        w0 = base_weight_matrix(base_layer).detach()
        d_out, d_in = w0.shape
        if cfg.r > min(d_out, d_in):
            raise ValueError(
                f"adapter.r={cfg.r} is larger than a target layer ({d_out} x {d_in}); "
                f"use adapter.r <= {min(d_out, d_in)} or target other modules"
            )
        a, b = self._init_factors(w0, cfg, gen)
        dtype, device = client_dtype(w0.dtype), w0.device  # a bf16 backbone keeps fp32 factors
        self.lora_A = nn.Parameter(a.to(device=device, dtype=dtype))
        self.lora_B = nn.Parameter(b.to(device=device, dtype=dtype))
        if cfg.tri:
            self.lora_C = nn.Parameter(torch.zeros(cfg.r, cfg.r, device=device, dtype=dtype))
        else:
            self.register_parameter("lora_C", None)

    @staticmethod
    def _init_factors(w0: torch.Tensor, cfg: AdapterConfig, gen: torch.Generator):
        d_out, d_in = w0.shape
        r = cfg.r
        if cfg.init == "svd":
            # LoRA-XS variant: A = top-r right singular vectors, B = top-r left singular vectors
            # times the singular values divided by their mean, so one unit of C moves the
            # weights by about s (like `random`) while keeping W0's relative directions.
            u, sv, vh = torch.linalg.svd(w0.double(), full_matrices=False)
            a = vh[:r]
            b = u[:, :r] * (sv[:r] / sv[:r].mean())
        elif cfg.tri:
            # Orthonormal rows of A and columns of B: dW/dC_ij = s * B[:, i] A[j, :] then has
            # Frobenius norm exactly s, the same order as LoRA's dW/dB_ij = s * A[j, :]
            # (norm ~ 1/sqrt(3) under Kaiming-uniform A), so learning rates carry over.
            a = _orthonormal_rows(r, d_in, gen)
            b = _orthonormal_rows(r, d_out, gen).T
        else:
            # Standard LoRA (as peft): A ~ Kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(d_in), 1/sqrt(d_in)).
            bound = 1.0 / math.sqrt(d_in)
            a = (torch.rand(r, d_in, generator=gen, dtype=torch.float64) * 2 - 1) * bound
            b = torch.randn(d_out, r, generator=gen, dtype=torch.float64) / math.sqrt(d_out)
        if cfg.zero == "B":
            b = torch.zeros_like(b)
        return a, b

    def delta_weight(self) -> torch.Tensor:
        """s * B C A (or s * B A) as a (d_out, d_in) matrix."""
        inner = self.lora_A if self.lora_C is None else self.lora_C @ self.lora_A
        return self.scaling * (self.lora_B @ inner)

    def cohort_size(self) -> int | None:
        """K when some factor carries K clients' copies along a leading dim (parallel simulation), else None."""
        stacked = [p.shape[0] for p in (self.lora_A, self.lora_B, self.lora_C) if p is not None and p.dim() == 3]
        return stacked[0] if stacked else None

    def _low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """s * B C A x on channels-last input; cost O(r (d_in + d_out)) per row, never forms dW.

        With stacked factors the rows of x are K clients' blocks, client-major, and client k's
        factors act on block k only; frozen (unstacked) factors are shared by all blocks.
        """
        k, shape = self.cohort_size(), x.shape
        h = self.dropout(x).to(self.lora_A.dtype)  # a no-op unless the backbone is held in bf16
        if k is not None:
            h = h.reshape(k, -1, shape[-1])
        h = _project(h, self.lora_A)
        if self.lora_C is not None:
            h = _project(h, self.lora_C)
        out = (_project(h, self.lora_B) * self.scaling).to(x.dtype)
        return out if k is None else out.reshape(*shape[:-1], out.shape[-1])

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return out
        if isinstance(self.base_layer, nn.Conv2d):
            return out + self._low_rank(x.movedim(1, -1)).movedim(-1, 1)
        return out + self._low_rank(x)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight (for fast evaluation); exact inverse: unmerge. A quantized base
        cannot take it (its weights are packed): export merges into the unquantized base instead."""
        if is_quantized(self.base_layer):
            raise ValueError("a quantized base layer (model.quantize) cannot merge its adapter in place; "
                             "python -m celora.export --format merged folds it into the unquantized weights")
        if not self.merged:
            base_weight_matrix(self.base_layer).add_(self.delta_weight().to(self.base_layer.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            base_weight_matrix(self.base_layer).sub_(self.delta_weight().to(self.base_layer.weight.dtype))
            self.merged = False
