"""eval_sets: other data scored at every evaluation by the global model and, where asked, by each client's own;
logged as eval/<set>/<metric>, read by celora.analysis; bad sets refused before anything loads."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from celora import analysis
from celora.errors import ConfigError, InputError
from celora.evalsets import scored
from celora.run import run
from celora.validate import build
from conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")

SAME = ["+dataset@eval_sets.same.dataset=rotten_tomatoes", "eval_sets.same.dataset.limit=300"]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method, personal_differs", [("lora", False), ("celora", True)])
def test_a_set_equal_to_the_test_split_scores_what_the_run_scores(method, personal_differs, compose_cfg, tmp_path):
    """The run's own dataset as an eval set (its test split, all rows): every round's eval/same/<metric> is the
    run's global/<metric>, exactly; its personal scores are the clients' own models on those rows, which are the
    global model's for FedAvg with a shared head and each client's own mix (other numbers) for CE-LoRA."""
    cfg = compose_cfg(*TINY, f"method={method}", *SAME, "+eval_sets.same.personal=true")
    run(cfg, run_dir=tmp_path / "run")
    rows = _rows(tmp_path / "run")
    assert len(rows) == 3
    for row in rows:
        for metric in ("acc", "loss"):
            assert row[f"eval/same/{metric}"] == row[f"global/{metric}"], (row["round"], metric)
        assert (row["eval/same/personal/acc"] != row["eval/same/acc"] or
                row["eval/same/personal/loss"] != row["eval/same/loss"]) == (personal_differs and row["round"] > 0)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["best"]["eval/same/acc"] == max(r["eval/same/acc"] for r in rows)
    assert summary["best"]["eval/same/loss"] == min(r["eval/same/loss"] for r in rows)
    df = analysis.load_runs(tmp_path / "run")
    assert df["eval/same/personal/acc"].tolist() == [r["eval/same/personal/acc"] for r in rows]
    assert "eval/same/acc final mean" in analysis.results(df, [])


def test_a_causal_lm_set_of_other_data_is_scored_with_its_own_task_settings(compose_cfg, tmp_path):
    """+debug=tiny_llm (instruct_mix) scoring party_instruct's rows as an eval set, twice: by likelihood and by
    generation (the set's own task.accuracy); a method without a global model logs NaN (null) for the global
    scores and the clients' own for the personal ones."""
    cfg = compose_cfg("+debug=tiny_llm", "method=local", "fl.rounds=1",
                      "+dataset@eval_sets.party.dataset=party_instruct", "+eval_sets.party.limit=12",
                      "+eval_sets.party.personal=true",
                      "+dataset@eval_sets.party_gen.dataset=party_instruct", "+eval_sets.party_gen.limit=12",
                      "+eval_sets.party_gen.task.accuracy=generate", "+eval_sets.party_gen.task.max_new_tokens=3")
    run(cfg, run_dir=tmp_path / "run")
    last = _rows(tmp_path / "run")[-1]
    assert last["eval/party/acc"] is None and last["eval/party/ppl"] is None  # no global model
    assert 0 <= last["eval/party/personal/acc"] <= 1 and last["eval/party/personal/ppl"] > 1
    assert "eval/party_gen/personal/acc" not in last and last["eval/party_gen/acc"] is None


def test_the_scored_rows_are_a_seeded_subset_of_the_split():
    class Data:
        train, test = list(range(30)), list(range(10))

        def encoded(self, split):
            return split

    whole = scored(Data(), "all", None, seed=0)
    assert [(name, len(rows)) for name, rows in whole] == [("train", 30), ("test", 10)]
    some = scored(Data(), "all", 8, seed=0)
    again = scored(Data(), "all", 8, seed=0)
    assert sum(len(r) for _, r in some) == 8 and all(np.array_equal(a[1], b[1]) for a, b in zip(some, again))
    assert all(np.all(np.diff(r) > 0) for _, r in some) and scored(Data(), "test", 3, 1)[0][1].max() < 10
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(some, scored(Data(), "all", 8, seed=1)))


@pytest.mark.parametrize("overrides, message", [
    (["+debug=tiny_llm", "+dataset@eval_sets.rt.dataset=rotten_tomatoes"],
     r"eval_sets.rt.dataset answers in classes but the run's model \(model=tiny_llama\) answers in tokens"),
    ([*TINY, *SAME, "+eval_sets.same.personal=maybe"], r"eval_sets.same.personal='maybe' must be true or false"),
    ([*TINY, *SAME, "+eval_sets.same.split=validation"], r"eval_sets.same.split='validation' must be one of"),
    ([*TINY, *SAME, "+eval_sets.same.task.accuracy=generate"],
     r"eval_sets.same.task sets \['accuracy'\], which the run's task .* does not take"),
    ([*TINY, "+eval_sets.empty.limit=3"], r"eval_sets.empty needs a dataset option: e.g. \+dataset@eval_sets.empty"),
    ([*TINY, *SAME, "+eval_sets.same.limt=3"], r"eval_sets.same.limt=3 is not a key .*did you mean eval_sets.same.limit"),
    ([*TINY, *SAME, "optimized_metric=eval/other/acc"], r"optimized_metric='eval/other/acc' is not a metric"),
])
def test_a_bad_set_is_refused_before_anything_loads(overrides, message, compose_cfg):
    with pytest.raises(ConfigError, match=message):
        build(compose_cfg(*overrides))


def test_a_set_of_other_classes_is_refused_by_name(compose_cfg, tmp_path):
    """A classification set whose classes are not the run's (in the run's order) cannot be scored by its head."""
    csv = tmp_path / "other.csv"
    csv.write_text("text,label\n" + "".join(f"text {i},{'cat' if i % 2 else 'dog'}\n" for i in range(40)))
    cfg = compose_cfg(*TINY, "+dataset@eval_sets.pets.dataset=hf", "eval_sets.pets.dataset.path=csv",
                      f"eval_sets.pets.dataset.data_files=[{csv}]", "eval_sets.pets.dataset.split_test=null",
                      f"eval_sets.pets.dataset.cache_dir={tmp_path / 'cache'}")
    assert build(cfg) is not None and OmegaConf.select(cfg, "optimized_metric") is None
    with pytest.raises(InputError, match=r"eval_sets.pets: its classes \['cat', 'dog'\] are not the run's "
                                         r"\['rotten', 'fresh'\]"):
        run(cfg, run_dir=tmp_path / "run")
    assert build(compose_cfg(*TINY, *SAME, "optimized_metric=best/eval/same/acc")) is not None
    for subject in ("global/acc/anatomy", "best/personal/acc/category/stem"):  # a benchmark's per-subject keys
        assert build(compose_cfg(*TINY, f"optimized_metric={subject}")) is not None
    with pytest.raises(ConfigError, match="optimized_metric='global/acc/' is not a metric"):
        build(compose_cfg(*TINY, "optimized_metric=global/acc/"))


def test_the_unseen_speakers_file_holds_no_row_and_no_speaker_of_the_training_data():
    """scripts/unseen_speakers.py (the measured eval set of docs/benchmarks.md): none of its sentences is a row of
    instruct_mix as llm_default loads it (train or test), and none of its speakers said any sentence that is."""
    from celora.data.instruct import convention_sentences, instruct_mix, party_source
    from celora.models.llm import tiny_llama
    from scripts.unseen_speakers import QUESTION, seen_speakers, unseen_rows

    rows = unseen_rows(limit=200, seed=0, rows=200, draw_seed=0)
    mix = instruct_mix(tokenizer=tiny_llama().tokenizer, max_length=128, seed=0, limit=200)
    trained = set(mix.train["text"]) | set(mix.test["text"])
    sentences = [r["question"][len(QUESTION.format(sentence="")):] for r in rows]
    assert len(rows) == 200 and not trained & set(sentences)
    speakers_of = {}
    sentences_all = convention_sentences(party_source())
    for text, speaker in zip(sentences_all["text"], sentences_all["speaker"]):
        speakers_of.setdefault(text, speaker)
    in_mix = {speakers_of[t] for t in trained if t in speakers_of}
    assert len(in_mix) > 50 and in_mix == seen_speakers(200, 0)  # the mix's convention rows, found by their text
    assert not in_mix & {r["speaker"] for r in rows}


def test_clients_without_local_test_rows_train_and_report_no_personal_score(compose_cfg, tmp_path):
    """partition.local_test_fraction=0 (FlowerTune's clients train on their whole share): the run trains and
    its global scores stand; the personal ones are undefined (null), not a crash or a 0."""
    run(compose_cfg(*TINY, "partition.local_test_fraction=0", "fl.rounds=1"), run_dir=tmp_path / "run")
    last = _rows(tmp_path / "run")[-1]
    assert 0 <= last["global/acc"] <= 1 and last["personal/acc"] is None and last["personal/loss"] is None
    assert last["personal/acc_by_client"] == [None, None, None]
