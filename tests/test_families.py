"""Every model family the adapters attach to, on tiny random configs, for every adapter variant.

For each case of TEST_CASES (BERT, RoBERTa, LLaMA, Qwen2, GPT-2 Conv1D, ViT, both CLIP towers,
1x1 convolutions) and each variant of VARIANTS (lora, ffa_lora, fedsa_lora, tri with random
and svd init):
- injecting leaves the output unchanged (the zero factor starts at zero);
- the zero factor gets a non-zero gradient in every layer at step 0 (for tri: C, with A and B
  frozen; METHOD.md section 1: a zero frozen B could never learn);
- AdamW steps change exactly the tensors of `Exchange.trainable`, nothing else in the state;
- merge then unmerge restores W0, and the merged output equals the unmerged one;
- the seed alone fixes the frozen factors (svd: W0 alone);
- text classifiers ignore padded positions (mean pooling; `last` pooling for decoders);
- too large an r, or targets matching nothing, fail with a ValueError that says why.
Plus: our LoRA layer's output equals peft's given the same A and B (BERT Linear, GPT-2 Conv1D).
"""
from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from celora.adapters import AdapterConfig, AdapterLayer, adapter_layers, inject, merge, unmerge
from celora.adapters.layer import base_weight_matrix, is_adaptable
from celora.fl.client import set_trainable
from celora.fl.wire import Exchange
from celora.models.classifier import Classifier
from celora.models.backbone import DEFAULT_TARGETS
from celora.models.text import from_config
from tolerance import assert_deep_close, deep_tol, gamma

R, ALPHA, CLASSES, BATCH, SEQ, IMAGE = 4, 8.0, 3, 3, 8, 16
SEED = 1234

VOCAB = 1000  # token ids are drawn at random below, so the tokenizer's 30k vocabulary is not needed
# A few small layers, hidden 32; 37 (intermediate) is deliberately not a multiple of anything.
TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
            max_position_embeddings=32, vocab_size=VOCAB)
DECODER = dict(TEXT, num_key_value_heads=1)  # grouped-query attention: v_proj is 32 -> 16, not square
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
              image_size=IMAGE, patch_size=8, num_channels=3)


# ---------------------------------------------------------------- models


class TinyCNN(nn.Module):
    """3x3 stem, then a 1x1 expand / project pair (MobileNet style) and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.expand = nn.Conv2d(16, 32, 1)
        self.project = nn.Conv2d(32, 16, 1)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(pixel_values))
        h = h + self.project(F.relu(self.expand(h)))
        return self.head(h.mean((2, 3)))


def _text(model_type: str, pooling: str = "mean", **config) -> nn.Module:
    return from_config(model_type, pooling=pooling, seed=0, **config).classifier(CLASSES, seed=0)


def _vit() -> nn.Module:
    torch.manual_seed(0)
    backbone = transformers.ViTModel(transformers.ViTConfig(**VISION), add_pooling_layer=False)
    return Classifier(backbone, VISION["hidden_size"], CLASSES, pooling="cls")


def _clip() -> nn.Module:
    torch.manual_seed(0)
    text = dict(TEXT, vocab_size=99, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = {k: v for k, v in VISION.items() if k != "num_channels"}
    return transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN()


# ---------------------------------------------------------------- inputs, outputs, losses


def _text_inputs(gen: torch.Generator, vocab: int = VOCAB) -> dict:
    ids = torch.randint(3, vocab, (BATCH, SEQ), generator=gen)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, -3:] = 0  # right padding, so `last` pooling must find the last real token
    return {"input_ids": ids, "attention_mask": mask}


def _image_inputs(gen: torch.Generator) -> dict:
    return {"pixel_values": torch.randn(BATCH, 3, IMAGE, IMAGE, generator=gen)}


def _clip_inputs(gen: torch.Generator) -> dict:
    return {**_text_inputs(gen, vocab=99), **_image_inputs(gen)}


def _logits(model, inputs) -> torch.Tensor:
    return model(**inputs)


def _ce_loss(model, inputs, gen) -> torch.Tensor:
    labels = torch.randint(0, CLASSES, (BATCH,), generator=gen)
    return F.cross_entropy(model(**inputs), labels)


def _clip_embeds(model, inputs) -> torch.Tensor:
    # both towers: the text and the image embedding (before normalisation)
    text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    image = model.get_image_features(pixel_values=inputs["pixel_values"])
    text = text if torch.is_tensor(text) else text.pooler_output
    image = image if torch.is_tensor(image) else image.pooler_output
    return torch.cat([text, image], dim=-1)


def _clip_loss(model, inputs, gen) -> torch.Tensor:
    return model(**inputs, return_loss=True).loss  # contrastive: gradients reach both towers


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    targets: tuple[str, ...]
    n_adapted: int  # adapter layers the targets must produce
    inputs: Callable[[torch.Generator], dict]
    output: Callable = _logits
    loss: Callable = _ce_loss
    base_type: str = "Linear"  # the wrapped layer's class (Conv1D: transposed weight)
    needs: str = ""  # a transformers class this case needs (skipped where the installed version lacks it)


TEST_CASES = [
    Case("bert", functools.partial(_text, "bert", **TEXT), tuple(DEFAULT_TARGETS["bert"]), 4, _text_inputs),
    Case("roberta", functools.partial(_text, "roberta", **TEXT), tuple(DEFAULT_TARGETS["roberta"]), 4,
         _text_inputs),
    Case("llama", functools.partial(_text, "llama", pooling="last", **DECODER), tuple(DEFAULT_TARGETS["llama"]),
         4, _text_inputs),
    Case("qwen2", functools.partial(_text, "qwen2", pooling="last", **DECODER), tuple(DEFAULT_TARGETS["qwen2"]),
         4, _text_inputs, needs="Qwen2Config"),
    Case("gpt2", functools.partial(_text, "gpt2", pooling="last", n_embd=32, n_layer=2, n_head=2,
                                   n_positions=32, vocab_size=VOCAB),
         tuple(DEFAULT_TARGETS["gpt2"]), 2, _text_inputs, base_type="Conv1D"),
    Case("vit", _vit, tuple(DEFAULT_TARGETS["vit"]), 4, _image_inputs),
    Case("clip", _clip, tuple(DEFAULT_TARGETS["clip"]), 8, _clip_inputs, _clip_embeds, _clip_loss),
    Case("conv1x1", _cnn, ("expand", "project"), 2, _image_inputs, base_type="Conv2d"),
]
CASES = {c.name: c for c in TEST_CASES}

VARIANTS = {
    "lora": dict(trainable=["A", "B"], shared=["A", "B"]),
    "ffa_lora": dict(trainable=["B"], shared=["B"]),
    "fedsa_lora": dict(trainable=["A", "B"], shared=["A"]),
    "tri_random": dict(zero="C", trainable=["C"], shared=["C"], init="random"),
    "tri_svd": dict(zero="C", trainable=["C"], shared=["C"], init="svd"),
}


def _params(cases):
    return [
        pytest.param(c, id=c.name, marks=pytest.mark.skipif(
            bool(c.needs) and not hasattr(transformers, c.needs), reason=f"transformers has no {c.needs}"))
        for c in cases
    ]


by_case = pytest.mark.parametrize("case", _params(TEST_CASES))
by_text_case = pytest.mark.parametrize("case", _params(c for c in TEST_CASES if c.inputs is _text_inputs))
by_variant = pytest.mark.parametrize("variant", list(VARIANTS))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core box spinning threads
    make this file several times slower; restored afterwards for the other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def adapter_cfg(variant: str, **overrides) -> AdapterConfig:
    return AdapterConfig(name=variant, **{"r": R, "alpha": ALPHA, **VARIANTS[variant], **overrides})


@functools.lru_cache(maxsize=None)
def _prototype(name: str) -> nn.Module:
    return CASES[name].build().eval()


def fresh(case: Case) -> nn.Module:
    """An identical, untouched copy of the case's tiny model (built once, copied per test)."""
    return copy.deepcopy(_prototype(case.name))


def injected(case: Case, variant: str, seed: int = SEED, model: nn.Module | None = None):
    model = fresh(case) if model is None else model
    cfg = adapter_cfg(variant)
    names = inject(model, cfg, list(case.targets), seed)
    exchange = Exchange.of(model, cfg)
    set_trainable(model, exchange.trainable)
    return model, cfg, names, exchange


def _layers(model) -> dict[str, AdapterLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


# ---------------------------------------------------------------- default targets


@by_case
def test_default_targets_attach_to_the_family(case):
    model, cfg, names, _ = injected(case, "lora")
    layers = _layers(model)
    assert sorted(layers) == sorted(names) and len(names) == case.n_adapted
    assert all(type(m.base_layer).__name__ == case.base_type for m in layers.values())
    assert all(n.rsplit(".", 1)[-1] in case.targets for n in names)
    if case.name == "clip":  # both towers
        assert sum(n.startswith("vision_model.") for n in names) == case.n_adapted // 2
        assert sum(n.startswith("text_model.") for n in names) == case.n_adapted // 2


def test_vit_default_targets_are_its_transformers5_attention_projections():
    # transformers 5 renamed ViT's attention to q_proj / k_proj / v_proj / o_proj
    names = {n.rsplit(".", 1)[-1] for n, _ in _prototype("vit").named_modules()}
    assert set(DEFAULT_TARGETS["vit"]) <= names


@by_text_case
def test_padding_does_not_change_the_logits(case):
    # masked (right-padded) positions must not reach the pooled features: mean pooling skips them,
    # decoders' `last` pooling takes the last real token
    inputs = case.inputs(torch.Generator().manual_seed(6))
    other = dict(inputs, input_ids=inputs["input_ids"].clone())
    other["input_ids"][inputs["attention_mask"] == 0] = 3
    model = fresh(case)
    with torch.no_grad():  # exact: a masked key's softmax weight underflows to exactly 0, so it adds
        # exactly nothing to the same-shaped sums, and pooling multiplies padded rows by exactly 0
        assert torch.equal(case.output(model, other), case.output(model, inputs))


# ---------------------------------------------------------------- 1. identity at injection


@by_variant
@by_case
def test_injection_keeps_the_output(case, variant):
    gen = torch.Generator().manual_seed(0)
    inputs = case.inputs(gen)
    model = fresh(case)
    with torch.no_grad():
        before = case.output(model, inputs)
        model, cfg, _, _ = injected(case, variant, model=model)
        after = case.output(model, inputs)
    assert torch.equal(after, before)  # exact: a product with a zero factor is exactly 0, and W0 x + 0 = W0 x
    for layer in adapter_layers(model):  # the zero factor is zero, the others are not
        for f in ("A", "B", "C") if cfg.tri else ("A", "B"):
            t = getattr(layer, f"lora_{f}")
            assert (t.abs().max() == 0) == (f == cfg.zero), f


# ---------------------------------------------------------------- 2. the zero factor learns from step 0


@by_variant
@by_case
def test_zero_factor_has_a_nonzero_gradient_at_step_0(case, variant):
    gen = torch.Generator().manual_seed(1)
    model, cfg, _, _ = injected(case, variant)
    case.loss(model, case.inputs(gen), gen).backward()
    for name, layer in _layers(model).items():
        grad = getattr(layer, f"lora_{cfg.zero}").grad
        assert grad is not None and grad.abs().max() > 0, f"{name}.lora_{cfg.zero} gets no gradient"
        if cfg.tri:  # A and B are frozen: no gradient is even computed for them
            assert layer.lora_A.grad is None and layer.lora_B.grad is None


# ---------------------------------------------------------------- 3. a step changes exactly the declared tensors


@by_variant
@by_case
def test_training_changes_exactly_the_trainable_tensors(case, variant):
    gen = torch.Generator().manual_seed(2)
    model, cfg, _, exchange = injected(case, variant)
    trainable = set(exchange.trainable)
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    start = {k: v.clone() for k, v in model.state_dict().items()}
    # no weight decay, so every change below is the gradient's doing
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    model.train()

    def step() -> set[str]:
        opt.zero_grad()
        case.loss(model, case.inputs(gen), gen).backward()
        opt.step()
        return {k for k, v in model.state_dict().items() if not torch.equal(v, start[k])}

    changed = step()
    zero = {n for n in trainable if n.endswith(f".lora_{cfg.zero}")}
    head = {n for n in trainable if n.startswith("head.")}
    assert changed <= trainable, f"frozen tensors changed: {sorted(changed - trainable)[:5]}"
    # the zero factor and the head move at once; LoRA's A only after B has left zero
    assert zero | head <= changed, sorted(zero | head - changed)[:5]
    changed = step()
    assert changed == trainable, (sorted(changed - trainable)[:5], sorted(trainable - changed)[:5])


# ---------------------------------------------------------------- 4. merge / unmerge


def _expected_merged(layer: AdapterLayer, w0: torch.Tensor, magnitude: bool = False) -> torch.Tensor:
    """W0 + s B [C] A in the base layer's own layout, written out independently of the layer code.

    With `magnitude`, |W0| + |s| |B| [|C|] |A| instead: the sizes that bound its rounding error."""
    a, b, c = (None if t is None else t.abs() if magnitude else t for t in (layer.lora_A, layer.lora_B, layer.lora_C))
    w0 = w0.abs() if magnitude else w0
    inner = a if c is None else c @ a
    delta = (abs(layer.scaling) if magnitude else layer.scaling) * b @ inner  # (d_out, d_in)
    base = layer.base_layer
    if type(base).__name__ == "Conv1D":  # weight is (d_in, d_out)
        return w0 + delta.T
    if isinstance(base, nn.Conv2d):  # weight is (d_out, d_in, 1, 1)
        return w0 + delta[:, :, None, None]
    return w0 + delta


def merge_bound(layer: AdapterLayer, w0: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on how far two evaluations of W0 + s B [C] A, in any order, can be apart.

    Each evaluation: the products B (C A) are two length-r reductions (Higham, eq. 3.13: |fl(XY) - XY|
    <= gamma_n |X| |Y|, chained), then one rounding for s and one for + W0, so it errs by at most
    gamma(2r + 2) (|W0| + |s| |B| |C| |A|). Two evaluations differ by at most twice that."""
    r = layer.lora_A.shape[0]
    return 2 * gamma(2 * r + 2, w0.dtype) * _expected_merged(layer, w0, magnitude=True)


def _within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> None:
    excess = (actual - expected).abs() - bound
    assert excess.max() <= 0, f"{excess.max():.3g} beyond the rounding bound"


def _double_inputs(inputs: dict) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}


@by_variant
@by_case
def test_merge_then_unmerge_restores_w0(case, variant):
    # in fp64: whole-model outputs are too deep to bound operation by operation, and in fp64 DEEP
    # roundings (tests/tolerance.py) are still 1e-10 of their size; the weights get an exact bound
    gen = torch.Generator().manual_seed(3)
    inputs = _double_inputs(case.inputs(gen))
    model, cfg, _, _ = injected(case, variant)
    model.double()
    layers = adapter_layers(model)
    with torch.no_grad():  # make the zero factor non-zero, or merging would be a no-op
        for layer in layers:
            t = getattr(layer, f"lora_{cfg.zero}")
            t.copy_(0.1 * torch.randn(t.shape, generator=gen, dtype=t.dtype))
        w0 = [layer.base_layer.weight.clone() for layer in layers]
        unmerged = case.output(model, inputs)
        merge(model)
        merge(model)  # idempotent: merging twice adds the update once
        assert all(layer.merged for layer in layers)
        for layer, w in zip(layers, w0):
            assert not torch.equal(layer.base_layer.weight, w)
            _within(layer.base_layer.weight, _expected_merged(layer, w), merge_bound(layer, w))
        merged = case.output(model, inputs)
        unmerge(model)
        assert not any(layer.merged for layer in layers)
        for layer, w in zip(layers, w0):
            # (W0 + D) - D: the merge's error plus the subtraction's, each within merge_bound
            _within(layer.base_layer.weight, w, 2 * merge_bound(layer, w))
        restored = case.output(model, inputs)
    assert_deep_close(merged, unmerged)
    assert_deep_close(restored, unmerged)


# ---------------------------------------------------------------- 5. the seed fixes the frozen factors


@by_variant
@by_case
def test_seed_fixes_the_factors(case, variant):
    cfg = adapter_cfg(variant)
    factors = [f for f in ("A", "B", "C") if f != cfg.zero and (f != "C" or cfg.tri)]

    def draw(seed):
        model, *_ = injected(case, variant, seed=seed)
        return [{f: getattr(m, f"lora_{f}").detach() for f in factors} for m in adapter_layers(model)]

    first, again, other = draw(7), draw(7), draw(8)
    for a, b, c in zip(first, again, other):
        for f in factors:
            assert torch.equal(a[f], b[f]), f"same seed, different {f}"
            if cfg.init == "svd":  # from W0 alone: the seed plays no part (0 bytes sent)
                assert torch.equal(a[f], c[f]), f"svd {f} depends on the seed"
            else:
                assert not torch.equal(a[f], c[f]), f"different seeds, same {f}"


# ---------------------------------------------------------------- 6. errors that say why


def _linear_names(model: nn.Module) -> set[str]:
    names = set()
    for n, m in model.named_modules():
        one_by_one = isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
        if n and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D" or one_by_one):
            names.add(n.rsplit(".", 1)[-1])
    return names


@by_case
def test_rank_larger_than_a_layer_is_refused(case):
    model = fresh(case)
    smallest = min(
        min(base_weight_matrix(m).shape) for n, m in model.named_modules()
        if n and n.rsplit(".", 1)[-1] in case.targets
    )
    cfg = adapter_cfg("tri_random", r=smallest + 1)
    with pytest.raises(ValueError, match=rf"adapter.r={smallest + 1} is larger than a target layer"):
        inject(model, cfg, list(case.targets), SEED)
    assert adapter_layers(model) == []  # a refused injection leaves the model as it was


@by_case
def test_targets_matching_nothing_list_the_linear_modules(case):
    model = fresh(case)
    with pytest.raises(ValueError, match="match no module") as err:
        inject(model, adapter_cfg("lora"), ["no_such_module"], SEED)
    expected = _linear_names(model)
    assert set(case.targets) <= expected
    for name in expected:
        assert repr(name) in str(err.value), f"{name} missing from: {err.value}"


def test_conv1x1_only_pointwise_convolutions_are_adaptable():
    model = fresh(CASES["conv1x1"])
    with pytest.raises(ValueError, match="not linear maps"):  # the 3x3 stem
        inject(model, adapter_cfg("lora"), ["stem"], SEED)
    assert not is_adaptable(nn.Conv2d(4, 4, 1, stride=2))
    assert not is_adaptable(nn.Conv2d(4, 4, 1, groups=2))
    assert not is_adaptable(nn.Conv2d(4, 4, 1, padding=1))  # output grows, the adapter's would not
    assert is_adaptable(nn.Conv2d(4, 4, 1, padding="same"))


# ---------------------------------------------------------------- peft equivalence


def _peft_pair(backbone: nn.Module, targets: list[str], fan_in_fan_out: bool):
    import peft

    ours = copy.deepcopy(backbone)
    names = inject(ours, adapter_cfg("lora"), targets, SEED)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in adapter_layers(ours):  # B non-zero, or both sides would just be the base model
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=gen))
    theirs = peft.get_peft_model(copy.deepcopy(backbone), peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=targets, lora_dropout=0.0, fan_in_fan_out=fan_in_fan_out))
    with torch.no_grad():
        for name in names:
            mine, peft_layer = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
            assert peft_layer.scaling["default"] == mine.scaling
            peft_layer.lora_A["default"].weight.copy_(mine.lora_A)
            peft_layer.lora_B["default"].weight.copy_(mine.lora_B)
    return ours.eval(), theirs.eval(), names


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft on transformers 5
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_lora_layer_equals_peft(family):
    # in fp64, for the same reason as the merge test: the outputs are whole-model computations
    case = CASES[family]
    backbone = copy.deepcopy(_prototype(family).backbone).double()
    ours, theirs, names = _peft_pair(backbone, list(case.targets), fan_in_fan_out=family == "gpt2")
    assert type(ours.get_submodule(names[0]).base_layer).__name__ == case.base_type
    inputs = case.inputs(torch.Generator().manual_seed(5))
    w0 = {name: ours.get_submodule(name).base_layer.weight.clone() for name in names}
    with torch.no_grad():
        base = backbone(**inputs).last_hidden_state
        mine = ours(**inputs).last_hidden_state
        peft_out = theirs(**inputs).last_hidden_state
        # the adapters do something: far more than the rounding the comparison below allows
        assert (mine - base).abs().max() > 1e3 * deep_tol(float(base.abs().max()), base.dtype)
        assert_deep_close(mine, peft_out)
        merge(ours)  # and the merged weights agree, in the layer's own (transposed for Conv1D) layout
        theirs.merge_adapter()
        for name in names:
            layer = ours.get_submodule(name)
            _within(layer.base_layer.weight, theirs.base_model.model.get_submodule(name).base_layer.weight,
                    merge_bound(layer, w0[name]))
