"""model.dropout and model.dtype on every backbone config: what they set, what null keeps, what is refused."""
import json

import pytest
import torch
from torch import nn

from celora.models.backbone import set_config_dropout
from celora.run import run
from celora.schema import make
from celora.validate import ConfigError, build
from conftest import CONF_DIR, TINY

TINY_MODELS = ["tiny_bert", "tiny_vit", "tiny_clip"]


def _modules(backbone) -> nn.Module:
    return getattr(backbone, "backbone", None) or backbone.model


def _dropouts(module: nn.Module) -> list[float]:
    return [m.p for m in module.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]


def _config_dropouts(config, prefix="") -> dict[str, float]:
    out = {}
    for key, value in vars(config).items():
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):
            out.update(_config_dropouts(value, f"{prefix}{key}."))
        elif isinstance(value, float) and ("dropout" in key or "pdrop" in key):
            out[prefix + key] = value
    return out


@pytest.mark.parametrize("name", TINY_MODELS)
def test_dropout_sets_every_probability(compose_cfg, name):
    off = make(compose_cfg(f"model={name}", "model.dropout=0").model)
    assert set(_config_dropouts(_modules(off).config).values()) <= {0.0}
    assert set(_dropouts(_modules(off))) <= {0.0}
    some = make(compose_cfg(f"model={name}", "model.dropout=0.3").model)
    values = _config_dropouts(_modules(some).config)
    assert values and set(values.values()) == {0.3}, values
    assert set(_dropouts(_modules(some))) <= {0.3}


@pytest.mark.parametrize("name,overrides,expected", [
    ("tiny_bert", [], {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}),  # BERT's defaults
    ("tiny_vit", ["+model.hidden_dropout_prob=0.2"], {"hidden_dropout_prob": 0.2, "attention_probs_dropout_prob": 0.0}),
])
def test_null_keeps_the_models_own_dropout(compose_cfg, name, overrides, expected):
    own = make(compose_cfg(f"model={name}", *overrides).model)
    values = _config_dropouts(_modules(own).config)
    assert {k: values[k] for k in expected} == expected


def test_dropout_reaches_sub_configs():
    from transformers import CLIPConfig

    config = CLIPConfig(text_config={"hidden_size": 8, "num_attention_heads": 2},
                        vision_config={"hidden_size": 8, "num_attention_heads": 2})
    keys = set_config_dropout(config, 0.25)
    assert "text_config.attention_dropout" in keys and "vision_config.attention_dropout" in keys
    assert config.text_config.attention_dropout == config.vision_config.attention_dropout == 0.25
    assert set_config_dropout(config, None) == []


@pytest.mark.parametrize("name", TINY_MODELS)
def test_fp64_holds_the_backbone_the_head_and_the_inputs_in_fp64(compose_cfg, name):
    backbone = make(compose_cfg(f"model={name}", "model.dtype=fp64").model)
    names = ["a", "b"] if name == "tiny_clip" else None
    model = backbone.classifier(2, seed=0, label_names=names)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    if name != "tiny_bert":
        rows = [(torch.zeros(3, 32, 32, dtype=torch.uint8), 0)]
        assert backbone.collate()(rows)["pixel_values"].dtype == torch.float64


@pytest.mark.parametrize("override,key", [("model.dtype=fp16", "model.dtype"), ("model.dropout=1.5", "model.dropout")])
def test_bad_values_are_refused_before_any_work(compose_cfg, override, key):
    with pytest.raises(ConfigError, match=key):
        build(compose_cfg(*TINY, override))


def test_every_model_config_has_the_keys():
    for path in sorted((CONF_DIR / "model").glob("*.yaml")):
        text = path.read_text()
        assert "\ndtype: fp32" in text and "\ndropout: null" in text, path.name


def _metrics(compose_cfg, tmp_path, *overrides):
    run(compose_cfg(*TINY, "partition=dirichlet", "fl.num_clients=4", "fl.sample_fraction=0.75", *overrides),
        run_dir=tmp_path)
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_with_dropout_on_parallel_draws_other_masks_than_sequential(compose_cfg, tmp_path):
    """The condition of "parallel equals sequential" (README, docs/parallel.md): every dropout off. With it on,
    a cohort's batch has another shape than each client's (K clients' rows, padded to the longest), so the
    same seeded generator draws other masks and the runs are two samples of the same training."""
    common = ("model.dtype=fp64", "fl.wire_dtype=fp64", "model.dropout=0.1")
    seq = _metrics(compose_cfg, tmp_path / "seq", *common)
    par = _metrics(compose_cfg, tmp_path / "par", *common, "simulation=parallel", "simulation.cohort_size=all")
    assert seq[0]["global/loss"] == par[0]["global/loss"]  # round 0 trains nothing: no dropout drawn yet
    # in fp64 a difference beyond 1e-6 relative is not rounding (tests/tolerance.py: DEEP u = 1.1e-10)
    assert abs(seq[-1]["train/loss"] - par[-1]["train/loss"]) > 1e-6 * abs(seq[-1]["train/loss"])
