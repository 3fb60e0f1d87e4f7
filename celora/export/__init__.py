"""Trained models out of a run: PEFT adapters, merged Hugging Face models, and the classifier head's loader.

`python -m celora.export RUN_DIR` writes them (celora.export.folders); `load_classifier(folder)` rebuilds an
exported classifier's scoring model without the rest of celora's run machinery.
"""
from celora.export.classifier import load_classifier

__all__ = ["load_classifier"]
