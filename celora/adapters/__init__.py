"""Adapters: the tri-matrix CE-LoRA layer and the LoRA-family baselines on the same code."""
from celora.adapters.config import AdapterConfig
from celora.adapters.inject import (
                                    adapter_layers,
                                    factor_names,
                                    inject,
                                    is_factor,
                                    merge,
                                    silent_layers,
                                    unmerge,
)
from celora.adapters.layer import AdapterLayer
from celora.adapters.stacking import StackedLinear, cohort_size, stacked

__all__ = ["AdapterConfig", "AdapterLayer", "StackedLinear", "adapter_layers", "cohort_size", "factor_names",
           "inject", "is_factor", "merge", "silent_layers", "stacked", "unmerge"]
