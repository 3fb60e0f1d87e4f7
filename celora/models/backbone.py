"""What every backbone loader shares: the dtype its weights are held in and the dropout it trains with."""
from __future__ import annotations

import torch
from torch import nn

# fp64 is for numerical checks (the equivalence tests compare simulation paths in it); fp32 is the default.
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
# Config keys of transformers models that hold a probability of dropping something while training:
# dropout of activations and attention weights, GPT-2's *_pdrop, stochastic depth (drop_path_rate), layerdrop.
_DROP_KEYS = ("dropout", "pdrop", "drop_path", "layerdrop")


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def check_dropout(p: float | None) -> None:
    if p is not None and not (isinstance(p, int | float) and 0 <= p < 1):
        raise ValueError(f"model.dropout={p!r} must be in [0, 1), or null to keep the checkpoint's own values")


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
