"""An exported model's card (its README.md): what it is, where it came from, how good it was and what it cost."""
from __future__ import annotations


def _bytes(n) -> str:
    return "unknown" if n is None else f"{n:,} bytes ({n / 1e6:.3f} MB)"


def _how_to_load(facts: dict) -> str:
    head = facts.get("labels") is not None
    if facts["format"] == "peft" and not head:
        return ("```python\nfrom transformers import AutoModelForCausalLM\nfrom peft import PeftModel\n\n"
                f"base = AutoModelForCausalLM.from_pretrained(\"{facts['base_model']}\")\n"
                "model = PeftModel.from_pretrained(base, \"<this folder>\")\n```")
    if facts["format"] == "merged" and not head:
        return ("```python\nfrom transformers import AutoModelForCausalLM\n\n"
                "model = AutoModelForCausalLM.from_pretrained(\"<this folder>\")\n```")
    return ("```python\nfrom celora.export import load_classifier\n\n"
            "model = load_classifier(\"<this folder>\")  # backbone, pooling and head: logits = model(**inputs)\n```\n\n"
            "The task head (pooling + a linear layer) has no transformers class: it is `head.safetensors` with "
            f"`head.json`. Classes: {', '.join(map(str, facts['labels']))}.")


def card(facts: dict) -> str:
    """README.md of one exported folder, from its celora.json facts."""
    who = "the global model (the server's aggregate)" if facts["client"] is None else \
        f"client {facts['client']}'s personal model (what it last received and its own tensors)"
    metrics = "\n".join(f"| `{k}` | {'-' if v is None else f'{v:.4f}' if isinstance(v, float) else v} |"
                        for k, v in facts["metrics"].items()) or "| (not evaluated) | |"
    return f"""---
library_name: {'peft' if facts['format'] == 'peft' else 'transformers'}
base_model: {facts['base_model']}
tags: [celora, federated-learning, lora]
---

# {facts['model']}: {facts['method']}, round {facts['round']}

{who.capitalize()}, trained by federated fine-tuning with celora ({facts['method']}), exported at round
{facts['round']} as {'a PEFT LoRA adapter' if facts['format'] == 'peft' else 'a merged Hugging Face model'}.

- Base model: `{facts['base_model']}` ({facts['model_option']})
- Adapter: {facts['adapter']['name']}, r = {facts['adapter']['r']}, alpha = {facts['adapter']['alpha']} (every celora
  adapter is a rank-r LoRA: a tri adapter's s·B·C·A is exported as lora_B = B·C, lora_A = A)
- Seed: {facts['seed']}

## Metrics at round {facts['evaluated_round']}

| metric | value |
|---|---|
{metrics}

## What it cost

Bytes the federation sent up to round {facts['round']}, all clients together: uplink {_bytes(facts['uplink_bytes'])},
downlink {_bytes(facts['downlink_bytes'])}.

## How to load it

{_how_to_load(facts)}

## How it was made

    {facts['command']}

from the run dir `{facts['run_dir']}`.
"""
