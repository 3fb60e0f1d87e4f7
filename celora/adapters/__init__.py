"""Adapters: the tri-matrix CE-LoRA layer and the LoRA-family baselines on the same code."""
from celora.adapters.config import AdapterConfig
from celora.adapters.inject import adapter_layers, cohort_size, factor_names, inject, merge, silent_layers, unmerge
from celora.adapters.layer import AdapterLayer

__all__ = ["AdapterConfig", "AdapterLayer", "adapter_layers", "cohort_size", "factor_names", "inject", "merge", "silent_layers",
           "unmerge"]
