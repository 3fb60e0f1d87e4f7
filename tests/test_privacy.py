"""Privacy: the inversion attack is real, the scores are right, DP clips, adds nothing at zero noise, and accounts like opacus."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from opacus.accountants import RDPAccountant

from celora.privacy.attack import (ImageAttack, TextAttack, labels_from_bias, leaked_tokens, local_update,
                                   total_variation)
from celora.privacy.dp import ClientDP, NoPrivacy, clip_update, epsilon, global_norm
from celora.privacy.scores import position_accuracy, psnr, ssim, token_f1
from conftest import CONF_DIR
from tolerance import gamma

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    from celora.models.text import from_config

    text = from_config("bert", hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                       max_position_embeddings=128)
    model = text.classifier(2, seed=0).eval().requires_grad_(False)
    return text.tokenizer, model


def _batch(tok, texts):
    enc = tok(texts, padding=True, return_tensors="pt")
    special = torch.tensor(tok.all_special_ids)
    free = ~torch.isin(enc["input_ids"], special)
    return enc, free, torch.where(free, tok.pad_token_id, enc["input_ids"])


# -- the attack -------------------------------------------------------------------------------
def test_attack_recovers_the_tokens_of_full_finetuning_batch_of_one(tiny, one_thread):
    tok, model = tiny
    enc, free, template = _batch(tok, ["a gripping , beautifully acted thriller about grief"])
    labels = torch.tensor([1])
    names = [n for n, _ in model.named_parameters()]
    observed = local_update(model, names, dict(enc), labels, steps=1, lr=0.01)

    rec = TextAttack(restarts=1, iterations=60)(model, observed, names, template, enc["attention_mask"], free,
                                                labels, 2, 1, 0.01, torch.Generator().manual_seed(0))

    assert token_f1(rec.ids.tolist(), enc["input_ids"].tolist(), tok.all_special_ids)["f1"] >= 0.8
    assert rec.labels.tolist() == [1]  # inferred from the head bias, not handed over
    assert torch.equal(rec.ids[~free], enc["input_ids"][~free])


class _TinyImageClassifier(torch.nn.Module):
    """A conv layer and a linear head on 8x8 grey images: the smallest model an image attack can face."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.head = torch.nn.Linear(8 * 8 * 8, 10)

    def forward(self, pixel_values):
        return self.head(torch.relu(self.conv(pixel_values)).flatten(1))


def test_image_attack_recovers_a_digit_from_full_finetuning(one_thread):
    from sklearn.datasets import load_digits

    digits = load_digits()
    image = torch.tensor(digits.images[:1], dtype=torch.float32).unsqueeze(1) / 16  # a real 0, in [0, 1]
    label = torch.tensor(digits.target[:1])
    model = _TinyImageClassifier().eval().requires_grad_(False)
    names = [n for n, _ in model.named_parameters()]
    observed = local_update(model, names, {"pixel_values": image}, label, steps=1, lr=0.1)

    rec = ImageAttack(restarts=1, iterations=100)(model, observed, names, tuple(image.shape), label, 10, 1, 0.1,
                                                  torch.Generator().manual_seed(0))

    flat = torch.full_like(image, image.mean().item())  # the best guess without the upload
    assert rec.labels.tolist() == label.tolist()  # inferred from the head bias
    assert psnr(rec.images, image) > psnr(flat, image) + 5
    assert ssim(rec.images, image) > 0.8 > ssim(flat, image)
    assert rec.images.min() >= 0 and rec.images.max() <= 1


def test_total_variation_on_hand_made_images():
    assert total_variation(torch.ones(1, 1, 4, 4)) == 0
    stripes = torch.tensor([[0.0, 1.0, 0.0, 1.0]]).expand(4, 4).reshape(1, 1, 4, 4)
    # every horizontal step is 1, no vertical change; exact: means of 0s and 1s over 12 steps
    assert total_variation(stripes) == 1.0


def test_embedding_rows_leak_exactly_the_batch_tokens(tiny):
    tok, model = tiny
    enc, _, _ = _batch(tok, ["dull and far too long", "the jokes land"])
    names = [n for n, _ in model.named_parameters()]
    observed = local_update(model, names, dict(enc), torch.tensor([0, 1]), steps=1, lr=0.01)
    emb = next(n for n in names if n.endswith("word_embeddings.weight"))
    present = set(enc["input_ids"].flatten().tolist()) - {tok.pad_token_id}  # BERT never moves the padding row
    assert set(leaked_tokens(observed[emb]).tolist()) == present


def test_labels_from_bias_counts_the_classes():
    # 3 of class 2 and 1 of class 0 in a batch of 4; model predicts uniformly over 3 classes
    probs = torch.full((3,), 1 / 3)
    frac = torch.tensor([0.25, 0.0, 0.75])
    update = -0.1 * 2 * (probs - frac)  # two SGD steps at lr 0.1, predictions unchanged
    assert labels_from_bias(update, probs, lr=0.1, steps=2, batch=4).tolist() == [0, 2, 2, 2]


def test_local_update_is_minus_lr_times_the_gradient(tiny):
    tok, model = tiny
    enc, _, _ = _batch(tok, ["fine"])
    names = ["head.weight", "head.bias"]
    update = local_update(model, names, dict(enc), torch.tensor([0]), steps=1, lr=0.5)
    m = model.requires_grad_(False)
    m.head.requires_grad_(True)
    torch.nn.functional.cross_entropy(m(**enc), torch.tensor([0])).backward()
    # the update is (b - 0.5 g) - b in float32: two roundings, each of at most u (|b| + |0.5 g|)
    bound = gamma(3, torch.float32) * (m.head.bias.abs() + 0.5 * m.head.bias.grad.abs())
    assert ((update["head.bias"] + 0.5 * m.head.bias.grad).abs() <= bound).all()
    m.head.requires_grad_(False)
    m.head.zero_grad(set_to_none=True)


# -- scores -----------------------------------------------------------------------------------
def test_token_f1_on_hand_made_cases():
    special = [101, 102, 0]
    # one wrong token of three: precision = recall = 2/3
    assert token_f1([[101, 5, 6, 7, 102]], [[101, 5, 6, 8, 102]], special)["f1"] == pytest.approx(2 / 3)
    # a multiset: two 5s recovered where only one exists counts once
    out = token_f1([[5, 5, 6]], [[5, 6, 6, 7]], special)
    assert out["precision"] == pytest.approx(2 / 3) and out["recall"] == pytest.approx(2 / 4)
    assert out["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    # the order of sequences in a batch does not matter; special tokens and padding never count
    assert token_f1([[101, 7, 102, 0], [101, 5, 6, 102]], [[101, 5, 6, 102], [101, 7, 102, 0]], special)["f1"] == 1
    assert token_f1([[101, 102]], [[101, 9, 102]], special)["f1"] == 0


def test_position_accuracy_pairs_sequences_best():
    special = [101, 102, 0]
    original = [[101, 5, 6, 102], [101, 7, 8, 9]]
    assert position_accuracy([[101, 7, 8, 1], [101, 5, 6, 102]], original, special) == pytest.approx(4 / 5)
    assert position_accuracy([[101, 6, 5, 102], [101, 9, 8, 7]], original, special) == pytest.approx(1 / 5)


def test_psnr_and_ssim_on_hand_made_images():
    ref = torch.zeros(2, 1, 16, 16)
    # MSE 0.01 on a [0, 1] range: PSNR = 10 log10(1 / 0.01) = 20 dB
    # float32: the mean of 256 squares per image errs by gamma(256 + 2) relatively (0.1 itself, its square),
    # and 10 log10 turns a relative error e of the MSE into at most (10 / ln 10) e dB
    assert psnr(ref + 0.1, ref) == pytest.approx(20.0, abs=10 / math.log(10) * gamma(16 * 16 + 2, torch.float32))
    img = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    # exact: with x = y the numerator's 2 mu_x mu_y, 2 sigma_xy are the denominator's mu_x^2 + mu_y^2,
    # sigma_x^2 + sigma_y^2 operation for operation, so every local ratio is 1
    assert ssim(img, img) == 1.0
    assert ssim(1 - img, img) < 0


# -- differential privacy ---------------------------------------------------------------------
def _round(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    received = {i: {"w": torch.randn(8, 4, generator=g), "b": torch.randn(4, generator=g)} for i in range(n)}
    uploads = {i: {k: v + (i + 1) * torch.randn(v.shape, generator=g) for k, v in received[i].items()}
               for i in range(n)}
    return uploads, received, {i: 10 * (i + 1) for i in range(n)}


def test_clip_update_bounds_the_norm_and_keeps_small_updates():
    update = {"a": torch.full((3,), 4.0), "b": torch.tensor([3.0])}
    clipped, norm = clip_update(update, 2.0)
    assert norm == math.sqrt(3 * 16 + 9)  # exact: the squares sum to 57 exactly, then one correctly rounded sqrt
    # rescaled to 2: the norm and the rescaled norm each within gamma(n + 3) (n = 4 squares)
    assert global_norm(clipped) == pytest.approx(2.0, rel=2 * gamma(4 + 3, torch.float32))
    kept, _ = clip_update(update, 100.0)
    assert all(torch.equal(kept[n], update[n]) for n in update)


@pytest.mark.parametrize("mode", ["central", "local"])
def test_clipping_bounds_every_upload_of_a_round(mode):
    uploads, received, sizes = _round()
    out, metrics = ClientDP(clip_norm=0.5, noise_multiplier=0.0, mode=mode)(
        uploads, received, sizes, torch.Generator().manual_seed(0))
    for i in uploads:
        # clipped to 0.5 within 2 gamma(n + 3), then received + update - received rounds each element twice,
        # by at most u (|received| + |update|): a norm of at most 2 u (|received| + 0.5)
        size = sum(t.numel() for t in received[i].values())
        slack = 0.5 * 2 * gamma(size + 3, torch.float32) + gamma(2, torch.float32) * (global_norm(received[i]) + 0.5)
        assert global_norm({n: out[i][n] - received[i][n] for n in out[i]}) <= 0.5 + slack
    assert metrics["privacy/clipped_fraction"] == 1.0


@pytest.mark.parametrize("mode", ["central", "local"])
def test_zero_noise_and_no_clipping_is_the_identity(mode):
    uploads, received, sizes = _round()
    out, _ = ClientDP(clip_norm=1e9, noise_multiplier=0.0, mode=mode)(
        uploads, received, sizes, torch.Generator().manual_seed(0))
    assert all(torch.equal(out[i][n], uploads[i][n]) for i in uploads for n in uploads[i])
    same, metrics = NoPrivacy()(uploads, received, sizes, torch.Generator())
    assert same is uploads and metrics == {}


def test_central_noise_reaches_the_weighted_average_once():
    uploads, received, sizes = _round(n=3)
    zero = {i: {n: t.clone() for n, t in received[i].items()} for i in received}  # updates of zero
    out, _ = ClientDP(clip_norm=2.0, noise_multiplier=0.5, mode="central")(
        zero, received, sizes, torch.Generator().manual_seed(1))
    noise = [{n: out[i][n] - received[i][n] for n in out[i]} for i in out]
    # every client carries the same draw z, so a size-weighted mean carries exactly it; each client's
    # (received + z) - received is within 2 u (|received| + |z|) of z elementwise
    for i, z in enumerate(noise):
        for n in z:
            bound = gamma(2, torch.float32) * (received[0][n].abs() + received[i][n].abs() + 2 * noise[0][n].abs())
            assert ((noise[0][n] - z[n]).abs() <= bound).all()
    big = ClientDP(clip_norm=2.0, noise_multiplier=0.5, mode="central")
    zeros = {0: {"x": torch.zeros(20000)}, 1: {"x": torch.zeros(20000)}}
    drawn, _ = big(zeros, zeros, {0: 1, 1: 3}, torch.Generator().manual_seed(2))
    # sigma * S * max w; 20,000 draws: a sample std's relative s.e. is 1 / sqrt(2 x 20,000) = 0.5%, 3% is 6 s.e.
    assert drawn[0]["x"].std().item() == pytest.approx(0.5 * 2.0 * 3 / 4, rel=0.03)


def test_epsilon_equals_opacus_called_directly():
    # exact: the same accountant calls with the same arguments
    direct = RDPAccountant()
    for _ in range(7):
        direct.step(noise_multiplier=1.1, sample_rate=0.3)
    assert epsilon(1.1, 0.3, 7, 1e-5) == direct.get_epsilon(1e-5)

    dp = ClientDP(clip_norm=1.0, noise_multiplier=1.1, mode="central", delta=1e-5, sample_rate=0.3)
    uploads, received, sizes = _round()
    for _ in range(7):
        _, metrics = dp(uploads, received, sizes, torch.Generator().manual_seed(0))
    assert metrics["privacy/epsilon"] == direct.get_epsilon(1e-5)
    local = RDPAccountant()
    local.step(noise_multiplier=1.1, sample_rate=1.0)  # local noise: the server knows whom it sampled
    assert ClientDP(1.0, 1.1, mode="local", sample_rate=0.3)(uploads, received, sizes, torch.Generator())[1][
        "privacy/epsilon"] == local.get_epsilon(1e-5)
    assert epsilon(0.0, 0.3, 1, 1e-5) == math.inf and epsilon(1.0, 0.3, 0, 1e-5) == 0.0


def test_dp_config_is_checked():
    with pytest.raises(ValueError, match="privacy.mode"):
        ClientDP(1.0, 1.0, mode="server")
    with pytest.raises(ValueError, match="clip_norm"):
        ClientDP(0.0, 1.0)


# -- configs and the comparison script --------------------------------------------------------
@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF_DIR / "privacy").glob("*.yaml")))
def test_privacy_options_instantiate(name, compose_cfg):
    privacy = instantiate(compose_cfg(f"privacy={name}").privacy)(sample_rate=0.5)
    uploads, received, sizes = _round()
    out, metrics = privacy(uploads, received, sizes, torch.Generator().manual_seed(0))
    assert set(out) == set(uploads) and all(isinstance(v, float) for v in metrics.values())


def test_default_run_has_no_privacy(compose_cfg):
    assert compose_cfg().privacy._target_ == "celora.privacy.dp.NoPrivacy"


def _attack_script():
    spec = importlib.util.spec_from_file_location("attack_script", ROOT / "scripts" / "attack.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def _comparison(tmp_path, *overrides):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("privacy_attack", overrides=["attack.iterations=2", "batch_sizes=[1,2]", "~victims.ffa_lora",
                                                   "~defences.dp_strong", *overrides])
    return _attack_script().compare(cfg, tmp_path / "out")


def _check_rows(rows, tmp_path, metrics, baseline=False):
    assert {(r["victim"], r["defence"], r["batch_size"]) for r in rows} == {
        (v, d, b) for v in ("lora", "tri", "full") for d in ("none", "dp_weak") for b in (1, 2)}
    assert all(r["epsilon"] is None for r in rows if r["defence"] == "none")
    assert all(all(m in r for m in metrics) for r in rows)
    values = {r["victim"]: r["values"] for r in rows}
    assert values["tri"] < values["lora"] < values["full"]  # C (+ head) < A, B (+ head) < everything
    saved = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(saved) == len(rows)
    table = (tmp_path / "out" / "table.md").read_text()
    assert table.count("\n") == 2 + 6 + baseline and all(f"{m} (B=2)" in table for m in metrics)
    assert ("no upload" in table) == baseline
    assert (tmp_path / "out" / "scores.png").stat().st_size > 0


def test_comparison_script_runs_end_to_end(tmp_path, one_thread):
    rows = _comparison(tmp_path, "model=tiny_bert", "dataset.limit=300", f"dataset.cache_dir={tmp_path / 'cache'}")

    _check_rows(rows, tmp_path, ("f1", "position_acc"))
    assert all(0 <= r["f1"] <= 1 and 0 <= r["position_acc"] <= 1 for r in rows)
    assert "reconstructed:" in (tmp_path / "out" / "texts.md").read_text()


def test_only_attacks_the_named_victims_and_defences(tmp_path, one_thread):
    rows = _comparison(tmp_path, "model=tiny_bert", "dataset.limit=300", f"dataset.cache_dir={tmp_path / 'cache'}",
                       "only=[tri,none]")
    assert {(r["victim"], r["defence"]) for r in rows} == {("tri", "none")} and len(rows) == 2
    rows = _comparison(tmp_path / "v", "model=tiny_bert", "dataset.limit=300",
                       f"dataset.cache_dir={tmp_path / 'cache'}", "only=[full]")  # every defence of one victim
    assert {(r["victim"], r["defence"]) for r in rows} == {("full", "none"), ("full", "dp_weak")}
    with pytest.raises(ValueError, match=r"only=\['nope'\] names no victim"):
        _comparison(tmp_path / "x", "model=tiny_bert", "dataset.limit=300", "only=[tri,nope]")


def test_image_comparison_runs_end_to_end(tmp_path, one_thread):
    rows = _comparison(tmp_path, "attack_case=image", "model=tiny_vit", "dataset=digits", "dataset.limit=300")

    _check_rows(rows, tmp_path, ("psnr", "ssim"), baseline=True)
    for size in (1, 2):  # the flat baseline depends on the batch only: the same for every upload and defence
        assert len({(r["psnr_flat"], r["ssim_flat"]) for r in rows if r["batch_size"] == size}) == 1
    assert all(r["psnr"] > 0 and -1 <= r["ssim"] <= 1 for r in rows)
    for size in (1, 2):  # originals + 3 uploads x 2 defences, one column per image of the batch
        assert (tmp_path / "out" / f"reconstructions_b{size}.png").stat().st_size > 0


# -- DP inside a federated run ----------------------------------------------------------------
def _metrics(compose_cfg, out, *overrides):
    from celora.run import run
    from conftest import TINY

    run(compose_cfg(*TINY, "adapter=tri", *overrides), out)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _same(a, b):
    keep = lambda k: not k.startswith(("time/", "privacy/"))  # noqa: E731
    return [{k: v for k, v in r.items() if keep(k)} for r in a] == [{k: v for k, v in r.items() if keep(k)} for r in b]


@pytest.mark.parametrize("mode", ["central", "local"])
def test_dp_without_noise_or_clipping_reproduces_the_plain_run(compose_cfg, tmp_path, mode):
    plain = _metrics(compose_cfg, tmp_path / "plain")
    dp = _metrics(compose_cfg, tmp_path / "dp", "privacy=client", "privacy.noise_multiplier=0",
                  "privacy.clip_norm=1e9", f"privacy.mode={mode}")
    assert _same(plain, dp)
    assert all(r["privacy/clipped_fraction"] == 0 for r in dp[1:])


def test_every_update_the_aggregator_sees_is_clipped(compose_cfg, tmp_path, monkeypatch):
    from celora.fl.aggregators import FedAvg

    seen, call = [], FedAvg.__call__

    def spy(self, uploads, sizes, received, **kw):
        for i in uploads:
            norm = global_norm({n: uploads[i][n].double() - received[i][n].double() for n in uploads[i]})
            # clipping to s within 2 gamma(size + 3), then the float32 rounding of received + update,
            # at most u (|received| + |update|) an element (as in test_clipping_bounds_every_upload_of_a_round)
            size = sum(t.numel() for t in uploads[i].values())
            slack = 2 * s * gamma(size + 3, torch.float32) + gamma(2, torch.float32) * (global_norm(received[i]) + s)
            seen.append(norm - slack)
        return call(self, uploads, sizes, received, **kw)

    monkeypatch.setattr(FedAvg, "__call__", spy)
    s = 1e-2
    rows = _metrics(compose_cfg, tmp_path / "dp", "privacy=client", "privacy.noise_multiplier=0",
                    f"privacy.clip_norm={s}", "client.lr=0.05")
    assert len(seen) == 2 * 3  # rounds x clients
    assert max(seen) <= s  # each norm less its rounding slack
    assert rows[-1]["privacy/clipped_fraction"] > 0  # the bound was active, not vacuous
    assert rows[-1]["privacy/update_norm"] > s


def test_run_reports_the_accountants_epsilon(compose_cfg, tmp_path):
    rows = _metrics(compose_cfg, tmp_path / "dp", "privacy=client", "privacy.noise_multiplier=1.5",
                    "fl.sample_fraction=0.67")  # 2 of 3 clients a round
    for r in rows[1:]:
        # exact: the same accountant calls, and JSON keeps a float64 exactly
        assert r["privacy/epsilon"] == epsilon(1.5, 2 / 3, r["round"], 1e-5)
    assert rows[2]["privacy/epsilon"] > rows[1]["privacy/epsilon"]
