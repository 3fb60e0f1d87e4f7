"""A model's adapters as PEFT's LoRA files: every celora adapter is a rank-r LoRA, s·B·C·A = s·(B·C)·A."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from celora.adapters import AdapterConfig, AdapterLayer

PEFT_PREFIX = "base_model.model."  # PeftModel's name for the model it wraps, in its saved keys
WEIGHTS = "adapter_model.safetensors"  # peft.utils.SAFETENSORS_WEIGHTS_NAME
CONFIG = "adapter_config.json"  # peft.utils.CONFIG_NAME


def module_path(model: nn.Module, inner: nn.Module) -> str:
    """The dotted prefix of `inner` in `model` ("" for the model itself, else "backbone." or "lm.")."""
    for name, module in model.named_modules():
        if module is inner:
            return f"{name}." if name else ""
    raise ValueError(f"{type(inner).__name__} is not a module of {type(model).__name__}")


@torch.no_grad()
def lora_tensors(model: nn.Module, pretrained: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """PEFT's saved LoRA tensors of the model's adapters as they stand, keyed against `pretrained` (the Hugging
    Face model inside `model`), and the adapted modules' names relative to it.

    lora_A is A (r x d_in); lora_B is B (d_out x r), times C for a tri adapter, so PEFT's s·lora_B·lora_A is
    celora's s·B·C·A exactly, with the same s = alpha / r. A 1x1 convolution's factors get PEFT's
    (out, in, 1, 1) shapes; GPT-2's Conv1D keeps them (PEFT's fan_in_fan_out transposes only the base weight).
    """
    prefix = module_path(model, pretrained)
    tensors, names = {}, []
    for name, layer in model.named_modules():
        if not isinstance(layer, AdapterLayer):
            continue
        if layer.cohort_size() is not None or layer.merged:
            raise RuntimeError(f"{name}: the adapter holds a stacked cohort or is merged; export needs one model")
        inner = name[len(prefix):]
        a = layer.lora_A.detach()
        b = layer.lora_B.detach() if layer.lora_C is None else layer.lora_B.detach() @ layer.lora_C.detach()
        if isinstance(layer.base_layer, nn.Conv2d):
            a, b = a[:, :, None, None], b[:, :, None, None]
        tensors[f"{PEFT_PREFIX}{inner}.lora_A.weight"] = a.contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{inner}.lora_B.weight"] = b.contiguous().cpu()
        names.append(inner)
    return tensors, names


def lora_config(adapter: AdapterConfig, modules: list[str], base: str, task_type: str | None, conv1d: bool):
    """PEFT's `LoraConfig` for these adapters: the adapted modules by their full names (unambiguous where celora
    matched a suffix), r, alpha (PEFT's scaling is alpha / r, as celora's), the dropout, and the base model's
    hub id or folder."""
    from peft import LoraConfig

    return LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout, target_modules=modules,
                      base_model_name_or_path=base, task_type=task_type, fan_in_fan_out=conv1d, bias="none",
                      inference_mode=True)


def write(folder: Path, tensors: dict[str, torch.Tensor], config) -> None:
    """adapter_model.safetensors and adapter_config.json, as `PeftModel.save_pretrained` writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    config.save_pretrained(str(folder))
