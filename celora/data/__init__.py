"""Datasets (load, clean, tokenise or resize) and their federated partitions."""
from __future__ import annotations

import inspect
from collections.abc import Callable

from celora.errors import InputError


def load(loader: Callable, inputs: dict, seed: int):
    """Calls a dataset loader (a `_partial_` config node) with what the model gives it.

    A text model gives `tokenizer` and `max_length`, an image model `image_size`; a loader of the
    other modality does not take them, which is said here rather than as a bare TypeError.
    """
    params = inspect.signature(loader).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in inputs if k not in params and not takes_all]
    if unknown:
        func = getattr(loader, "func", loader)
        raise InputError(
            f"the dataset {func.__module__}.{func.__name__} does not take {unknown}, which the model gives: "
            "model and dataset are of different modalities (a text model needs a text dataset such as "
            "rotten_tomatoes or hf; an image model (efficientnet_lite0, vit, clip) an image dataset such as "
            "fashion_mnist, mnist, digits or hf_image)")
    return loader(**inputs, seed=seed)
