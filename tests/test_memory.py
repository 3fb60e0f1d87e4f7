"""Memory options of the backbone: gradient checkpointing, 4-bit / 8-bit frozen weights (bitsandbytes), refusals."""
import json
import math

import pytest
import torch

from celora.run import run
from tolerance import deep_equal, dot_bound, unit_roundoff

FP64 = ["model.dtype=fp64", "fl.wire_dtype=fp64", "model.dropout=0"]
LLM = ["+debug=tiny_llm", "fl.rounds=1", "method=lora"]
# bitsandbytes' CPU kernels take 4-bit blocks of 64 input features: a tiny LLaMA as wide as that
WIDE = ["+model.hidden_size=64", "+model.intermediate_size=128"]


def _rows(path):
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
            for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("simulation", ["sequential", "parallel"])
def test_checkpointing_changes_no_number(compose_cfg, tmp_path, one_thread, simulation):
    """transformers' gradient checkpointing recomputes the activations in the backward pass: the same gradients,
    so the same run (fp64: every metric within DEEP roundings), one client at a time and stacked."""
    common = [*LLM, *FP64, f"simulation={simulation}"]
    run(compose_cfg(*common), run_dir=tmp_path / "off")
    run(compose_cfg(*common, "model.gradient_checkpointing=true"), run_dir=tmp_path / "on")
    off, on = _rows(tmp_path / "off"), _rows(tmp_path / "on")
    assert len(off) == len(on) and all(deep_equal(on[r][k], off[r][k]) for r in range(len(off)) for k in off[r])


def test_checkpointing_is_on_in_training_only(compose_cfg):
    from celora.schema import make

    def on(lm) -> bool:
        return lm.is_activation_checkpointing if hasattr(lm, "is_activation_checkpointing") else lm.is_gradient_checkpointing

    assert on(make(compose_cfg(*LLM, "model.gradient_checkpointing=true").model).lm)
    assert not on(make(compose_cfg(*LLM).model).lm)


def _layer_pair(quantize: str):
    """One q_proj of a tiny LLaMA loaded quantized, the same layer in fp32, and a LoRA adapter (non-zero B)
    around each, with the same factors."""
    from celora.adapters import AdapterConfig, AdapterLayer
    from celora.models.llm import tiny_llama

    full = tiny_llama(hidden_size=64, intermediate_size=128).lm.model.layers[0].self_attn.q_proj
    packed = tiny_llama(hidden_size=64, intermediate_size=128, quantize=quantize).lm.model.layers[0].self_attn.q_proj
    cfg = AdapterConfig(r=4, alpha=8, zero="B")
    a, b = AdapterLayer(full, cfg, torch.Generator().manual_seed(0)), AdapterLayer(packed, cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        a.lora_B.normal_(generator=torch.Generator().manual_seed(1))
        b.lora_B.copy_(a.lora_B)
    return a, b


def _grad_b(layer, x: torch.Tensor) -> torch.Tensor:
    """dL/dB for L = ||h||^2 / 2, h the layer's output: s (h (A x)^T) summed over the rows of x."""
    layer.zero_grad()
    (layer(x).pow(2).sum() / 2).backward()
    return layer.lora_B.grad.clone()


def test_an_nf4_base_gives_the_adapter_the_gradient_of_its_dequantized_weights():
    """A 4-bit NF4 base (QLoRA) trains the adapter against its dequantized weights W~, computed in fp32:

    - dL/dB = s sum_rows h (A x)^T, h = W~ x + s B A x: with the fp32 layer holding W~ itself, both compute the
      same sums in another order, so they agree to a dot product's rounding bound (Higham: gamma(n) times the
      magnitude, n = d_in + r terms for h, then the rows of x) — tests/tolerance.dot_bound;
    - against the unquantized W, the difference is the quantization's: s sum_rows (W~ - W) x (A x)^T exactly, so
      ||dL/dB(W~) - dL/dB(W)||_F <= s sum_rows ||(W~ - W) x|| ||A x|| (plus the same rounding bound)."""
    from celora.adapters.layer import base_weight_matrix

    full, packed = _layer_pair("nf4")
    w, w_q = full.base_layer.weight.detach().clone(), base_weight_matrix(packed.base_layer)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    got = _grad_b(packed, x)
    with torch.no_grad():
        full.base_layer.weight.copy_(w_q)  # the fp32 layer with the dequantized weights
    same = _grad_b(full, x)
    with torch.no_grad():
        ax = (x @ full.lora_A.T).abs()
        h_mag = x.abs() @ w_q.abs().T + full.scaling * ax @ full.lora_B.abs().T  # |terms| of each h entry
        rounding = dot_bound(64 + 4, h_mag, torch.float32)  # bound on |h~ - h| entrywise
        bound = full.scaling * (rounding.T @ ax + dot_bound(5, h_mag.T @ ax, torch.float32))
    assert torch.all((got - same).abs() <= 2 * bound), float(((got - same).abs() / bound).max())
    with torch.no_grad():
        full.base_layer.weight.copy_(w)
    exact = _grad_b(full, x)
    with torch.no_grad():
        quantization = full.scaling * sum(float(((w_q - w) @ x[i]).norm() * (full.lora_A @ x[i]).norm()) for i in range(5))
    assert 0 < float((got - exact).norm()) <= quantization + 2 * float(bound.norm())


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_svd_factors_of_a_quantized_base_are_those_of_its_dequantized_weights(quantize):
    """adapter.init=svd (tri_svd) reads W0 through base_weight_matrix: on a 4-bit or 8-bit base its A and B are
    the fp32 layer's with the dequantized weights W~ put in, exactly (the same SVD of the same matrix); Fed-SB's
    gradient of W0 is refused instead (test_bad_memory_options_are_refused_before_anything_loads)."""
    from celora.adapters import AdapterConfig, AdapterLayer
    from celora.adapters.layer import base_weight_matrix
    from celora.models.llm import tiny_llama

    full = tiny_llama(hidden_size=64, intermediate_size=128).lm.model.layers[0].self_attn.q_proj
    packed = tiny_llama(hidden_size=64, intermediate_size=128, quantize=quantize).lm.model.layers[0].self_attn.q_proj
    w_q = base_weight_matrix(packed).detach().float().clone()
    assert not torch.equal(w_q, full.weight.detach())  # quantization moved the weights
    with torch.no_grad():
        full.weight.copy_(w_q)
    cfg = AdapterConfig(name="tri", r=4, alpha=8, init="svd", zero="C", trainable=["C"], shared=["C"])
    a, b = (AdapterLayer(layer, cfg, torch.Generator().manual_seed(0)) for layer in (full, packed))
    assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_a_quantized_backbone_trains_on_the_cpu_and_exports_against_the_unquantized_base(compose_cfg, tmp_path,
                                                                                        quantize):
    """A round with a 4-bit or 8-bit frozen base, evaluated before and after (the evaluation must not stop
    gradients flowing, as bitsandbytes' CPU inference repacking would), then the adapters exported: the base the
    export names is the unquantized model, and the adapter holds the run's trained factors."""
    from safetensors.torch import load_file

    from celora.export.folders import export_run
    from celora.export.source import open_run

    cfg = compose_cfg(*LLM, *WIDE, f"model.quantize={quantize}", "method=tri", "fl.rounds=2")
    run(cfg, run_dir=tmp_path)
    rows = _rows(tmp_path)
    assert all(math.isfinite(r["train/loss"]) for r in rows[1:]) and rows[1]["fl/rejected_clients"] == 0
    trained = open_run(tmp_path)
    c = next(t for n, t in trained.sim.states.global_state.items() if n.endswith("lora_C"))
    assert c.abs().sum() > 0  # C starts at zero: the rounds trained it
    [folder] = export_run(tmp_path, models="global")
    base = json.loads((tmp_path / "export/base/config.json").read_text())
    assert "quantization_config" not in base
    weights = load_file(str(tmp_path / "export/base/model.safetensors"))
    assert all(t.is_floating_point() for t in weights.values())
    assert len(load_file(str(folder / "adapter_model.safetensors"))) == 2 * 4  # A and B·C of 4 modules


@pytest.mark.parametrize("overrides, said", [
    (["model.quantize=nf4", "model.dtype=fp64"], "bitsandbytes has no fp64 kernels"),
    (["model.quantize=nf4", "method=fed_sb"], "adapter.init=lora_sb .* model.quantize=nf4 base holds packed"),
    (["model.quantize=nf8"], "model.quantize='nf8' must be one of nf4, int8, or null"),
    (["model.gradient_checkpointing=sometimes"], "model.gradient_checkpointing='sometimes' must be true or false"),
])
def test_bad_memory_options_are_refused_before_anything_loads(compose_cfg, overrides, said):
    import re

    from celora.validate import ConfigError, build

    with pytest.raises(ConfigError) as caught:
        build(compose_cfg(*LLM, *overrides))
    assert re.search(said, str(caught.value)), str(caught.value)


def test_nf4_without_bitsandbytes_says_how_to_install_it(compose_cfg, monkeypatch):
    import importlib.util

    from celora.validate import ConfigError, build

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match=r"model.quantize=nf4 needs bitsandbytes, which is not installed: "
                                          r"pip install -e '.\[quant\]'"):
        build(compose_cfg(*LLM, "model.quantize=nf4"))


def test_a_network_transformers_does_not_know_refuses_the_memory_options(compose_cfg, tmp_path):
    from celora.errors import InputError

    with pytest.raises(InputError, match="efficientnet_lite0 is not a transformers model, so neither gradient "
                                         "checkpointing nor bitsandbytes quantization applies"):
        run(compose_cfg("+debug=tiny", "model=efficientnet_lite0", "dataset=digits",
                        "model.gradient_checkpointing=true"), run_dir=tmp_path)
