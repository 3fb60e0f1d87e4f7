"""Sentence pairs, GLUE as its papers run it (columns, labels, evaluation split, metrics) and the paper's GLUE
setting, offline: GLUE-schema parquet files written here, tiny random BERT and RoBERTa models."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from sklearn.metrics import f1_score, matthews_corrcoef
from torch import nn

from celora.data.batches import Collate
from celora.data.glue import TASKS
from celora.errors import InputError, MissingFile
from celora.run import run
from celora.tasks.classify import Classify
from conftest import CONF_DIR, TINY

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "the cat sat on a mat while dogs ran in parks and birds sang over tall green trees".split()


def _sentence(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, rng.integers(4, 12)))


def write_glue(folder: Path, task: str, train: int = 60, evaluation: int = 20, seed: int = 0) -> Path:
    """`folder/<task>/<split>-00000-of-00001.parquet` in GLUE's schema (the task's text columns, an int64
    label, an int32 idx), as the hub's nyu-mll/glue repository lays them out; the test split labelled -1."""
    spec, rng = TASKS[task], np.random.default_rng(seed)
    (folder / task).mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), (spec.eval_split, evaluation), ("test", 10)):
        rows = {spec.text: [_sentence(rng) for _ in range(n)]}
        if spec.pair:
            rows[spec.pair] = [_sentence(rng) for _ in range(n)]
        labels = rng.integers(0, len(spec.labels), n) if split != "test" else np.full(n, -1)
        rows.update(label=labels.astype("int64"), idx=np.arange(n, dtype="int32"))
        pd.DataFrame(rows).to_parquet(folder / task / f"{split}-00000-of-00001.parquet")
    return folder


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_pair_is_the_tokenizers_pair_and_truncates_as_configured(tmp_path):
    """dataset=hf with text_pair_column: each row's ids are the tokenizer's pair encoding of its two texts,
    truncated to model.max_length by pair_truncation (only_first keeps the second text whole, only_second the
    first); BERT's segment ids reach the batch, a one-type model's not; a cut that cannot fit is named."""
    from celora.data.text import hf
    from celora.models.text import from_config

    rng = np.random.default_rng(0)
    first = [" ".join(rng.choice(WORDS, 9)) for _ in range(12)]
    second = [" ".join(rng.choice(WORDS, 9)) for _ in range(12)]
    pd.DataFrame({"s1": first, "s2": second, "label": [0, 1, 1] * 4}).to_csv(tmp_path / "pairs.csv", index=False)
    tok = from_config("bert", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64).tokenizer
    common = dict(tokenizer=tok, max_length=16, seed=0, path="csv", data_files={"train": str(tmp_path / "pairs.csv")},
                  split_test=None, text_column="s1", text_pair_column="s2", label_column="label",
                  test_fraction=0.25, cache_dir=str(tmp_path / "cache"))
    for how in ("longest_first", "only_first", "only_second"):
        data = hf(**common, pair_truncation=how)
        assert len(data.train) == 9
        for row in data.train:
            want = tok(row["text"], row["text_pair"], truncation=how, max_length=16)
            assert row["input_ids"] == want["input_ids"] and row["token_type_ids"] == want["token_type_ids"]
            assert len(row["input_ids"]) == 16 and set(row["token_type_ids"]) == {0, 1}
            kept = tok.decode(row["input_ids"], skip_special_tokens=True)
            assert (row["text"] in kept, row["text_pair"] in kept) == {
                "longest_first": (False, False), "only_first": (False, True), "only_second": (True, False)}[how]
    rows = [data.encoded("train")[i] for i in range(3)]
    assert "token_type_ids" in Collate(0)(rows) and "token_type_ids" not in Collate(0, segments=False)(rows)
    with pytest.raises(InputError, match=r"\['nope'\].*dataset.text_pair_column"):
        hf(**{**common, "text_pair_column": "nope"})
    pd.DataFrame({"s1": ["cats"] * 4, "s2": [" ".join(WORDS)] * 4, "label": [0, 1] * 2}).to_csv(
        tmp_path / "long.csv", index=False)
    with pytest.raises(InputError, match="pair_truncation=only_first cannot fit.*longest_first"):
        hf(**{**common, "data_files": {"train": str(tmp_path / "long.csv")}}, pair_truncation="only_first")


@pytest.mark.parametrize("task", sorted(TASKS))
def test_each_glue_task_runs_a_round_on_local_parquet_files(task, compose_cfg, tmp_path):
    """Every task composes and trains one round from a local GLUE folder: evaluated on its labelled evaluation
    split (never the unlabelled test), with its classes in GLUE's order and the metrics GLUE reports for it."""
    write_glue(tmp_path / "glue", task)
    cfg = compose_cfg(*TINY, "dataset=glue", f"dataset.task={task}", f"dataset.path={tmp_path / 'glue'}",
                      f"dataset.cache_dir={tmp_path / 'cache'}", "dataset.limit=null", "fl.rounds=1")
    run(cfg, run_dir=tmp_path / "run")
    last = _metrics(tmp_path / "run")[-1]
    extra = set(TASKS[task].metrics)
    for name in ("mcc", "f1"):
        assert (f"global/{name}" in last and f"personal/{name}" in last) == (name in extra), name
        if name in extra:
            assert -1 <= last[f"global/{name}"] <= 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert all(f"global/{m}" in summary["last"] for m in extra)


def test_the_evaluation_split_and_the_classes_follow_glue(tmp_path):
    """MNLI is scored on validation_matched (or the split named), its three classes in GLUE's order; a split
    labelled -1 (GLUE's test) or a folder without the task's files is refused by a message naming the fix."""
    from celora.data.glue import glue
    from celora.models.text import from_config

    tok = from_config("bert", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64).tokenizer
    folder = write_glue(tmp_path / "glue", "mnli", train=30, evaluation=12)
    common = dict(tokenizer=tok, max_length=32, seed=0, path=str(folder), cache_dir=str(tmp_path / "cache"))
    data = glue(task="mnli", **common)
    assert data.label_names == ["entailment", "neutral", "contradiction"] and len(data.test) == 12
    want = pd.read_parquet(folder / "mnli" / "validation_matched-00000-of-00001.parquet")
    assert sorted(data.test["text"]) == sorted(want["premise"]) and data.metrics == ()
    with pytest.raises(InputError, match=r"outside the 3 classes.*-1.*dataset.split_test"):
        glue(task="mnli", eval_split="test", **common)
    with pytest.raises(MissingFile, match=r"no rte/train-\*.parquet"):
        glue(task="rte", **common)
    with pytest.raises(InputError, match="stsb is a regression task"):
        glue(task="stsb", **common)


class _Fixed(nn.Module):
    """A 'model' whose logits are fixed per row: one-hot on the prediction given for each row id."""

    def __init__(self, predictions: list[int], classes: int):
        super().__init__()
        self.logits = torch.nn.functional.one_hot(torch.tensor(predictions), classes).double()

    def forward(self, input_ids, **_):
        return self.logits[input_ids[:, 0]]


@pytest.mark.parametrize("classes", [2, 3])
def test_mcc_and_f1_from_summed_confusion_counts_equal_scikit_learn(classes):
    """Fixed predictions scored in batches of 7, and as a stacked cohort of 2 clients with padded rows: the pooled
    confusion counts give scikit-learn's Matthews correlation and F1 of class 1 (binary), whatever the grouping."""
    rng = np.random.default_rng(classes)
    n = 40
    truth, predicted = rng.integers(0, classes, n), rng.integers(0, classes, n)
    predicted[:12] = truth[:12]  # correlated, so the coefficient is far from 0
    model = _Fixed(predicted.tolist(), classes)
    task = Classify(["mcc", "f1"] if classes == 2 else ["mcc"])
    batch = lambda rows: {"input_ids": torch.tensor(rows).unsqueeze(1), "labels": torch.tensor(truth[rows])}  # noqa: E731
    sums: dict[str, float] = {}
    for start in range(0, n, 7):
        for name, v in task.scores(model, batch(list(range(start, min(start + 7, n))))).items():
            sums[name] = sums.get(name, 0) + float(v.sum())
    got = task.rates(sums)
    assert got["mcc"] == pytest.approx(matthews_corrcoef(truth, predicted), abs=1e-12)
    assert abs(got["mcc"]) > 0.1 and got["acc"] == pytest.approx(np.mean(truth == predicted))
    if classes == 2:
        assert got["f1"] == pytest.approx(f1_score(truth, predicted), abs=1e-12)
    # a stacked cohort: client 0 rows 0-19, client 1 rows 20-39 of which the last 5 are padding (not counted)
    rows = list(range(40))
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, 15:] = False
    per_client = task.scores(model, batch(rows), clients=2, valid=valid)
    pooled = {name: float(v.sum()) for name, v in per_client.items()}
    kept = np.r_[0:35]
    assert task.rates(pooled)["mcc"] == pytest.approx(matthews_corrcoef(truth[kept], predicted[kept]), abs=1e-12)
    assert pooled["examples"] == 35


def test_metrics_follow_the_dataset_unless_named():
    task = Classify()
    assert task.metrics == ("acc", "loss")
    task.bind(None, SimpleNamespace(metrics=("mcc",)))
    assert task.metrics == ("acc", "loss", "mcc")
    named = Classify(["f1"])
    named.bind(None, SimpleNamespace(metrics=("mcc",)))
    assert named.metrics == ("acc", "loss", "f1")
    assert Classify().rates({"examples": 2, "loss": 1.0, "correct": 1}) == {"acc": 0.5, "loss": 0.5}


def test_paper_glue_runs_a_round_on_a_tiny_roberta(compose_cfg, tmp_path):
    """experiment=paper_glue as the paper ran it (10 clients, Dirichlet(1.0), every client a round, CLS pooling),
    on a tiny random RoBERTa saved as a folder and local GLUE files: one round of each method of its sweep."""
    from celora.models.text import from_config

    spec = from_config("roberta", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       max_position_embeddings=80)
    spec.backbone.save_pretrained(tmp_path / "roberta")
    spec.tokenizer.save_pretrained(tmp_path / "roberta")
    write_glue(tmp_path / "glue", "rte", train=400, evaluation=40)
    cfg = compose_cfg("experiment=paper_glue", "dataset.task=rte", f"dataset.path={tmp_path / 'glue'}",
                      f"model.path={tmp_path / 'roberta'}", "model.max_length=48",
                      f"dataset.cache_dir={tmp_path / 'cache'}", "logger=none", "simulation.progress=false")
    assert (cfg.fl.num_clients, cfg.fl.rounds, cfg.fl.sample_fraction, cfg.partition.alpha) == (10, 100, 1.0, 1.0)
    sweep = OmegaConf.load(CONF_DIR / "experiment" / "paper_glue.yaml").hydra.sweeper.params.method
    assert cfg.model.pooling == "cls" and sweep == "lora,tri,celora"
    for method in ("lora", "tri", "celora"):
        short = compose_cfg("experiment=paper_glue", f"method={method}", "dataset.task=rte",
                            f"dataset.path={tmp_path / 'glue'}", f"model.path={tmp_path / 'roberta'}",
                            "model.max_length=48", f"dataset.cache_dir={tmp_path / 'cache'}", "logger=none",
                            "simulation.progress=false", "fl.rounds=1", "fl.eval_every=1", "client.local_steps=1",
                            "partition.min_partition_size=5")
        run(short, run_dir=tmp_path / method)
        rows = _metrics(tmp_path / method)
        assert [r["round"] for r in rows] == [0, 1] and rows[-1]["fl/clients"] == 10
        assert rows[-1]["comm/up_bytes"] > 0
