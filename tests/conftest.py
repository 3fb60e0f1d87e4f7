"""Shared fixtures: the config dir, and a tiny composed config for end-to-end runs."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONF_DIR = (Path(__file__).resolve().parents[1] / "conf").resolve()

# Shrinks the embedded default to seconds: tiny random BERT, a few hundred reviews, 3 clients.
TINY = ["+debug=tiny"]  # conf/debug/tiny.yaml: tiny_bert, 300 examples, 3 IID clients, 2 rounds, no logger


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run no faster on two threads, and much slower when the cores are shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def compose_cfg():
    from hydra import compose, initialize_config_dir

    def _compose(*overrides):
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=list(overrides))

    return _compose
