"""CLIP as a zero-shot classifier over class prompts, fine-tuned contrastively (any local folder or hub id, tiny random configs)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoTokenizer, CLIPConfig, CLIPModel

from celora.adapters import cohort_size
from celora.errors import ConfigError, InputError
from celora.models.backbone import Dropout, Dtype, Positive, Quantize, load_pretrained, random_init
from celora.models.text import minilm_folder
from celora.models.vision import PixelInputs, processor_stats

transformers.logging.set_verbosity_error()

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]  # OpenAI CLIP's preprocessing
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PROMPT = "a photo of a {label}."


def _embedding(out) -> torch.Tensor:
    """get_text_features / get_image_features return a tensor or (transformers 5) an output with pooler_output."""
    return out if torch.is_tensor(out) else out.pooler_output


class ZeroShotClassifier(nn.Module):
    """logits[i, c] = logit_scale * cos(image embedding of i, text embedding of class c's prompt).

    The text side goes through the text tower, with its adapters, on every forward, so cross-entropy
    over these logits is CLIP's contrastive image-to-text loss with the class prompts as the texts,
    and its gradient reaches both towers. Evaluation is the same forward: zero-shot argmax over the
    prompts. There is no head: the classes are the prompts (the `adapter.head` policy has nothing to
    act on). `features()` (the data statistics' input) is the normalised image embedding.

    In a stacked cohort of K clients (parallel simulation) the prompts are run K times, client-major,
    so client k's text-tower adapters embed the prompts its images are compared with.
    """

    def __init__(self, clip: CLIPModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                 interpolate: bool = False):
        super().__init__()
        self.clip = clip
        self.interpolate = interpolate
        self.register_buffer("prompt_ids", prompt_ids, persistent=False)
        self.register_buffer("prompt_mask", prompt_mask, persistent=False)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.clip.get_image_features(pixel_values=pixel_values, interpolate_pos_encoding=self.interpolate)
        return F.normalize(_embedding(out), dim=-1)

    def prompt_features(self, copies: int = 1) -> torch.Tensor:
        """(copies x classes, dim) normalised text embeddings of the class prompts, copy-major."""
        ids, mask = self.prompt_ids.repeat(copies, 1), self.prompt_mask.repeat(copies, 1)
        return F.normalize(_embedding(self.clip.get_text_features(input_ids=ids, attention_mask=mask)), dim=-1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        k = cohort_size(self) or 1
        image = self.features(pixel_values)
        text = self.prompt_features(k)
        dim = image.shape[-1]
        logits = torch.matmul(image.view(k, -1, dim), text.view(k, -1, dim).mT) * self.clip.logit_scale.exp()
        return logits.reshape(-1, logits.shape[-1])


@dataclass
class ClipModel(PixelInputs):
    """A loaded CLIP model (a `Backbone`), its tokenizer and image preprocessing; `classifier()` builds the
    zero-shot classifier over the task's class prompts (`prompt` with `{label}` replaced by each label name)."""

    model: CLIPModel
    tokenizer: object
    image_size: int
    prompt: str = PROMPT
    mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    std: list[float] = field(default_factory=lambda: list(CLIP_STD))
    model_type: str = "clip"
    channels: int = 3

    def __post_init__(self):
        if "{label}" not in self.prompt:
            raise ConfigError(f"model.prompt={self.prompt!r} must contain {{label}}, e.g. {PROMPT!r}")

    @property
    def weights(self) -> nn.Module:
        return self.model

    def prompts(self, label_names: list[str]) -> list[str]:
        return [self.prompt.format(label=name) for name in label_names]

    def classifier(self, num_classes: int, seed: int, label_names: list[str] | None = None) -> ZeroShotClassifier:
        """`seed` is unused: nothing is initialised at random (the classes are the prompts)."""
        if label_names is None or len(label_names) != num_classes:
            raise InputError(f"a CLIP classifier needs one label name per class ({num_classes}), got {label_names}")
        enc = self.tokenizer(self.prompts(label_names), padding=True, truncation=True,
                             max_length=self.model.config.text_config.max_position_embeddings, return_tensors="pt")
        for p in self.model.parameters():
            p.requires_grad_(False)
        interpolate = self.image_size != self.model.config.vision_config.image_size
        return ZeroShotClassifier(self.model, enc["input_ids"], enc["attention_mask"], interpolate).eval()


def clip(path: str, image_size: Positive | None = None, prompt: str = PROMPT, tokenizer: str | None = None,
         dtype: Dtype = "fp32", dropout: Dropout = None, gradient_checkpointing: bool = False, quantize: Quantize = None, **config) -> ClipModel:
    """Any CLIP checkpoint from a local folder or (with a network) a hub id; `image_size` other than its own
    interpolates the vision tower's position embeddings; `dropout` (not None) sets every dropout
    probability of both towers, `dtype` the weights' dtype."""
    model = load_pretrained(path, CLIPModel, CLIPConfig, dtype, dropout, gradient_checkpointing, quantize, **config)
    stats = processor_stats(path)
    return ClipModel(model.eval(), AutoTokenizer.from_pretrained(tokenizer or path),
                     image_size or model.config.vision_config.image_size, prompt,
                     stats.get("image_mean", CLIP_MEAN), stats.get("image_std", CLIP_STD))


def clip_from_config(text: dict, vision: dict, projection_dim: Positive = 16, prompt: str = PROMPT, seed: int = 0,
                     tokenizer: str | None = None, dtype: Dtype = "fp32", dropout: Dropout = None,
                     gradient_checkpointing: bool = False, quantize: Quantize = None) -> ClipModel:
    """A randomly initialised CLIP (tiny configs for tests). The tokenizer defaults to MiniLM's (offline); the
    text tower's vocabulary follows it and its pooled token is the tokenizer's [SEP] (end of text)."""
    tok = AutoTokenizer.from_pretrained(tokenizer or str(minilm_folder()))
    eos = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    text = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "bos_token_id": tok.cls_token_id or eos,
            "eos_token_id": eos, **dict(text)}
    cfg = CLIPConfig(text_config=text, vision_config=dict(vision), projection_dim=projection_dim)
    model = random_init(CLIPModel, cfg, seed, dtype, dropout, gradient_checkpointing, quantize)
    return ClipModel(model.eval(), tok, cfg.vision_config.image_size, prompt)
