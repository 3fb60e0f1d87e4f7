"""A classifier's task head beside its exported backbone, and `load_classifier`, which rebuilds the scoring model.

celora's classifier is pooling (mean, CLS or last token) of the backbone's last hidden states and one
linear layer. transformers has no class for that (BERT's sequence classifier, for one, puts a dense + tanh
pooler before its linear layer), so PEFT's `modules_to_save`, which keeps a trained module of the wrapped
model, has no module to keep it in. The head goes into its own `head.safetensors` with `head.json` (pooling,
classes), and `load_classifier(folder)` puts pooling and head back on the exported backbone.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

HEAD_WEIGHTS, HEAD_CONFIG = "head.safetensors", "head.json"


def write_head(folder: Path, head: nn.Linear, pooling: str, label_names: list[str] | None) -> None:
    """head.safetensors (`weight`, `bias`) and head.json (pooling, number and names of the classes)."""
    save_file({"weight": head.weight.detach().cpu().contiguous(), "bias": head.bias.detach().cpu().contiguous()},
              str(folder / HEAD_WEIGHTS), metadata={"format": "pt"})
    (folder / HEAD_CONFIG).write_text(json.dumps(
        {"pooling": pooling, "num_classes": head.out_features, "label_names": label_names}, indent=1))


class ExportedClassifier(nn.Module):
    """logits = head(pool(backbone(**inputs).last_hidden_state)): celora's classifier on an exported backbone."""

    def __init__(self, backbone: nn.Module, head: nn.Linear, pooling: str, label_names: list[str] | None):
        super().__init__()
        self.backbone, self.head, self.pooling, self.label_names = backbone, head, pooling, label_names

    def forward(self, **inputs) -> torch.Tensor:
        from celora.models.classifier import pool

        out = self.backbone(**inputs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return self.head(pool(hidden, inputs.get("attention_mask"), self.pooling).to(self.head.weight.dtype))


def load_classifier(folder: str | Path, base: nn.Module | str | None = None, dtype: torch.dtype | None = None,
                    ) -> ExportedClassifier:
    """The scoring model of an exported classifier folder: a PEFT adapter folder on its base (`base`, a model
    or a folder; default: the one adapter_config.json names), or a merged folder on its own weights; then
    the folder's pooling and head. `dtype` loads the weights in that dtype (default: as saved)."""
    from transformers import AutoModel

    folder = Path(folder)
    if not (folder / HEAD_CONFIG).exists():
        raise FileNotFoundError(f"{folder} has no {HEAD_CONFIG}: it is not an exported classifier (a causal LM's "
                                "folder loads with transformers and peft alone)")
    spec = json.loads((folder / HEAD_CONFIG).read_text())
    kwargs = {} if dtype is None else {"dtype": dtype}
    if (folder / "adapter_config.json").exists():
        from peft import PeftConfig, PeftModel

        if base is None or isinstance(base, (str, Path)):
            base = AutoModel.from_pretrained(str(base or PeftConfig.from_pretrained(str(folder)).base_model_name_or_path),
                                             **kwargs)
        backbone = PeftModel.from_pretrained(base, str(folder))
    else:
        backbone = AutoModel.from_pretrained(str(folder), **kwargs)
    weights = load_file(str(folder / HEAD_WEIGHTS))
    head = nn.Linear(weights["weight"].shape[1], spec["num_classes"], dtype=weights["weight"].dtype)
    head.load_state_dict(weights)
    return ExportedClassifier(backbone, head, spec["pooling"], spec.get("label_names")).eval()
