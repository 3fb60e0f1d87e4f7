"""The backbone interface, and what every loader shares: default targets, the weights' dtype, the dropout."""
from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal, Protocol

import torch
from torch import nn

from celora.errors import ConfigError, MissingFile
from celora.schema import Range

# Modules adapted by default, by `model_type` (LoRA's usual query + value attention projections).
DEFAULT_TARGETS = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "vit": ["q_proj", "v_proj"],  # transformers 5 renamed ViT's query/value to q_proj/v_proj
    "clip": ["q_proj", "v_proj"],  # both towers
    "clip_vision_model": ["q_proj", "v_proj"],
    "clip_text_model": ["q_proj", "v_proj"],
    # EfficientNet-Lite: the pointwise (1x1) convolutions of every MBConv block, `_expand_conv` (C -> 6C,
    # absent in block 0) and `_project_conv` (6C -> C'): 31 layers.
    "efficientnet_lite": ["_expand_conv", "_project_conv"],
}


class Backbone(Protocol):
    """A loaded pretrained (or tiny random) network and what the run needs of it (`model` config group).

    Subclass it for `default_targets`; a new architecture is a loader function returning one of these
    and a YAML under conf/model/ naming the loader (`_target_`), with its `dtype` and `dropout` keys.
    """

    model_type: str  # transformers' config.model_type, or the family's own name: picks DEFAULT_TARGETS
    answers = "classes"  # what its model outputs score: "classes" (logits over labels) or "tokens" (a causal LM)
    # The hub id or folder the weights were loaded from, as the user named it; None where the weights were made
    # here (a random tiny model, a checkpoint converted from GGUF, a model shipped inside a package): an export
    # then writes the base model once as a Hugging Face folder (celora.export).
    source: str | None = None

    @property
    def pretrained(self) -> nn.Module | None:
        """The Hugging Face model inside (a transformers PreTrainedModel, the module an adapter export is keyed
        against and PEFT adapts); None for a network transformers does not know."""
        return None

    def save_pretrained(self, folder) -> None:
        """Writes the backbone as a Hugging Face folder (weights, config, and the tokenizer where it has one),
        loadable by transformers alone."""
        model = self.pretrained
        if model is None:
            raise ConfigError(f"model_type={self.model_type!r} is not a Hugging Face model, so it has no folder "
                              "format to export; export works for text encoders and causal LMs (docs/export.md)")
        model.save_pretrained(folder)
        tokenizer = getattr(self, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    @property
    def default_targets(self) -> list[str] | None:
        """The modules adapted when adapter.targets is null."""
        return DEFAULT_TARGETS.get(self.model_type)

    def data_args(self) -> dict:
        """What the dataset loader needs from the model: a tokenizer and max_length, or an image_size."""
        ...

    def collate(self) -> Callable[[list], dict[str, torch.Tensor]]:
        """Rows of the encoded data -> a batch of model inputs with `labels` (with a `pad_id` for cohorts)."""
        ...

    def classifier(self, num_classes: int, seed: int, label_names: list[str] | None = None) -> nn.Module:
        """The frozen backbone under the task's trainable head (seeded), as one module whose forward maps a
        batch's inputs to logits and whose `features(**inputs)` gives what the head sees (the data
        statistics' input)."""
        ...

# fp64 is for numerical checks (the equivalence tests compare simulation paths in it); fp32 is the default;
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}  # bf16: large LLMs on a GPU
# What every loader's keys take (conf/model/*.yaml; celora.schema checks them before anything loads):
Dtype = Literal["fp32", "fp64", "bf16"]  # the names of DTYPES
Dropout = Annotated[float, Range(ge=0, lt=1), "null keeps the checkpoint's own dropout"] | None
Positive = Annotated[int, Range(ge=1)]  # a length or a resolution
# The frozen base's linear weights held in 4-bit NF4 (QLoRA) or 8-bit by bitsandbytes (the `quant` extra); the
# adapters, the head and what is sent stay in the client dtype (fp32).
Quantize = Literal["nf4", "int8"] | None
QUANT_PIP = "pip install -e '.[quant]' (bitsandbytes; `make setup` installs it)"
# Config keys of transformers models that hold a probability of dropping something while training:
# dropout of activations and attention weights, GPT-2's *_pdrop, stochastic depth (drop_path_rate), layerdrop.
_DROP_KEYS = ("dropout", "pdrop", "drop_path", "layerdrop")


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"model.dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def check_dropout(p: float | None) -> None:
    if p is not None and not (isinstance(p, int | float) and 0 <= p < 1):
        raise ConfigError(f"model.dropout={p!r} must be in [0, 1), or null to keep the checkpoint's own values")


def set_config_dropout(config, p: float | None) -> list[str]:
    """Sets every dropout probability of a transformers config, sub-configs included (CLIP's towers), to p
    before the model is built; returns the keys set. p=None changes nothing."""
    check_dropout(p)
    if p is None:
        return []
    done = []
    for key, value in list(vars(config).items()):
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):  # a sub-config
            done += [f"{key}.{k}" for k in set_config_dropout(value, p)]
        elif isinstance(value, float) and any(part in key for part in _DROP_KEYS):
            setattr(config, key, float(p))
            done.append(key)
    return done


def set_module_dropout(module: nn.Module, p: float | None) -> None:
    """Sets p on every nn.Dropout of an already built module (the ones a config does not reach)."""
    check_dropout(p)
    if p is None:
        return
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = float(p)


def check_quantize(quantize: str | None, dtype: str = "fp32") -> None:
    """model.quantize: a known kind, bitsandbytes installed, and a compute dtype bitsandbytes has kernels for."""
    import importlib.util

    if quantize is None:
        return
    if quantize not in ("nf4", "int8"):
        raise ConfigError(f"model.quantize={quantize!r} must be nf4, int8 or null")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"model.quantize={quantize} needs bitsandbytes, which is not installed: {QUANT_PIP}; "
                          "or model.quantize=null")
    if dtype == "fp64":
        raise ConfigError(f"model.quantize={quantize} computes in model.dtype, and bitsandbytes has no fp64 kernels: "
                          "use model.dtype=fp32 (or bf16 on a GPU), or model.quantize=null")


def quantization_config(quantize: str | None, dtype: str):
    """transformers' BitsAndBytesConfig for `quantize` (None: no quantization), computing in `dtype`."""
    if quantize is None:
        return None
    from transformers import BitsAndBytesConfig

    check_quantize(quantize, dtype)
    if quantize == "nf4":  # QLoRA: NF4 weights, double quantization of their scales
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch_dtype(dtype))
    return BitsAndBytesConfig(load_in_8bit=True)


def _device_map() -> dict:
    """Where bitsandbytes puts a quantized model: its weights are packed for one device when loaded."""
    return {"": 0 if torch.cuda.is_available() else "cpu"}


def with_memory_options(model: nn.Module, gradient_checkpointing: bool) -> nn.Module:
    """transformers' own gradient checkpointing, non-reentrant (the frozen backbone's inputs need no gradient
    for it): activations are recomputed in the backward pass instead of kept, layer by layer.

    A 4-bit layer of bitsandbytes (0.50) repacks its weights, on a CPU with AVX512-BF16, into an inference-only
    layout the first time it runs without gradients (an evaluation), after which no gradient flows through it
    (its gemv kernel has no autograd): a federated run evaluates between rounds of training, so the repacking
    is switched off."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    if gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"model.gradient_checkpointing=true: {type(model).__name__} does not support gradient "
                              "checkpointing in transformers; set model.gradient_checkpointing=false")
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def load_pretrained(path: str, model_class, config_class, dtype: Dtype, dropout: Dropout,
                    gradient_checkpointing: bool = False, quantize: Quantize = None, **config) -> nn.Module:
    """A transformers checkpoint from a local folder or (with a network) a hub id, its config overridden by
    `config` (e.g. num_hidden_layers=2), every dropout set to `dropout` (not None), weights in `dtype` (the
    linear layers' frozen weights quantized by bitsandbytes with `quantize`), gradient checkpointing on with
    `gradient_checkpointing`."""
    import os
    import re

    if not (os.path.isdir(path) or re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not path.startswith(".")):
        raise MissingFile(f"model.path={path!r} is neither a local folder nor a hub id (owner/name)")
    cfg = config_class.from_pretrained(path, **config)
    set_config_dropout(cfg, dropout)
    quantized = quantization_config(quantize, dtype)
    extra = {} if quantized is None else {"quantization_config": quantized, "device_map": _device_map()}
    model = model_class.from_pretrained(path, config=cfg, dtype=torch_dtype(dtype), **extra)
    set_module_dropout(model, dropout)
    return with_memory_options(model, gradient_checkpointing)


def random_init(build: Callable[[object], nn.Module], config, seed: int, dtype: Dtype, dropout: Dropout,
                gradient_checkpointing: bool = False, quantize: Quantize = None) -> nn.Module:
    """`build(config)` with seeded random weights (tiny configs for tests), every dropout set to `dropout`
    (not None), weights in `dtype`; `quantize` and `gradient_checkpointing` as in load_pretrained (a quantized
    random model is built, then loaded back through bitsandbytes as a checkpoint is)."""
    set_config_dropout(config, dropout)
    torch.manual_seed(seed)
    model = build(config).to(torch_dtype(dtype))
    set_module_dropout(model, dropout)
    if quantize is not None:
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            model = type(model).from_pretrained(folder, dtype=torch_dtype(dtype), device_map=_device_map(),
                                                quantization_config=quantization_config(quantize, dtype))
        set_module_dropout(model, dropout)
    return with_memory_options(model, gradient_checkpointing)
