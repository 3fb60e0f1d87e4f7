"""experiment=flowertune_general|finance|medical|code: FlowerTune's four LLM challenges. Each preset composes with the
template's settings, and runs one round on tiny_llama from tiny files in the hub sets' schemas (the evaluation sets
prepared by scripts/flowertune_data.py as the presets read them), logging every eval set and the share of the
communication budget used."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from celora.errors import ConfigError
from celora.metrics import Metrics, budget_use
from celora.run import run
from celora.validate import build
from scripts import flowertune_data as prep

pytestmark = pytest.mark.usefixtures("one_thread")

BUDGET = 200_000 * 1024**2  # FlowerTune's CommunicationTracker: 200,000 MB of 1024^2 bytes, both directions
# flwrlabs/flower examples/flowertune-llm-<challenge>: pyproject.toml's dataset.name, README's num-supernodes,
# strategy.fraction-train
TEMPLATE = {"general": ("flwrlabs/alpaca-gpt4", 20, 0.1), "finance": ("flwrlabs/fingpt-sentiment-train", 50, 0.1),
            "medical": ("flwrlabs/medical-meadow-medical-flashcards", 20, 0.1),
            "code": ("flwrlabs/code-alpaca-20k", 10, 0.2)}
EVAL_SETS = {"general": {"mmlu"}, "finance": {"fpb", "fiqa", "tfns"},
             "medical": {"pubmedqa", "medmcqa", "medqa", "careqa"}, "code": set()}
MMLU_SUBJECTS = ["anatomy", "econometrics", "philosophy", "marketing"]  # one of each of FlowerTune's categories


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _train_rows(challenge: str, n: int = 24) -> list[dict]:
    """The hub training sets' schema: instruction, input, output (medical's instruction is one sentence)."""
    words = ["mildly positive", "negative", "neutral"]
    return [{"instruction": "Answer this question truthfully" if challenge == "medical" else f"Task {i}: say it.",
             "input": f"question {i} about item {i % 5}" if challenge == "medical" or i % 2 else "",
             "output": words[i % 3] if challenge == "finance" else f"Item {i} is fine."} for i in range(n)]


def _hub_eval_files(folder: Path) -> dict[str, str]:
    """A few rows of each evaluation set in its hub schema (what scripts/flowertune_data.py reads) and MMLU and
    MedMCQA in theirs (what the presets read from the hub)."""
    n = 8
    return {
        "mmlu": _jsonl(folder / "mmlu.jsonl", [{"question": f"Q{i}?", "subject": MMLU_SUBJECTS[i % 4],
                                                "choices": ["a", "b", "c", "d"], "answer": i % 4} for i in range(n)]),
        "medmcqa": _jsonl(folder / "medmcqa.jsonl", [{"question": f"Q{i}?", "opa": "a", "opb": "b", "opc": "c",
                                                      "opd": "d", "cop": i % 4, "subject_name": "Anatomy",
                                                      "exp": None} for i in range(n)]),
        "fpb": _jsonl(folder / "fpb.jsonl", [{"sentence": f"Profit rose {i}%.", "label": i % 3} for i in range(n)]),
        "fiqa": _jsonl(folder / "fiqa.jsonl", [{"sentence": f"$X up {i}", "sentiment_score": -0.5 + 0.15 * i,
                                                "format": "post" if i % 2 else "headline"} for i in range(n)]),
        "tfns": _jsonl(folder / "tfns.jsonl", [{"text": f"$Y {i}", "label": i % 3} for i in range(n)]),
        "pubmedqa": _jsonl(folder / "pubmedqa.jsonl", [{"QUESTION": f"Does {i} help?", "CONTEXTS": ["One.", "Two."],
                                                        "final_decision": ["yes", "no", "maybe"][i % 3]}
                                                       for i in range(n)]),
        "medqa": _jsonl(folder / "medqa.jsonl", [{"question": f"Q{i}?", "answer": f"v{i % 4}", "options": [
            {"key": k, "value": f"v{j}"} for j, k in enumerate("ABCD")]} for i in range(n)]),
        "careqa": _jsonl(folder / "careqa.jsonl", [{"question": f"Q{i}?", "op1": "a", "op2": "b", "op3": "c",
                                                    "op4": "d", "cop": 1 + i % 4} for i in range(n)]),
    }


def test_the_evaluation_sets_are_asked_as_flowertunes_evaluation_asks_them(tmp_path):
    """Labels, thresholds, instructions and answer indices as FlowerTune's benchmarks.py and utils.py make them."""
    hub = _hub_eval_files(tmp_path / "hub")
    sources = [f"--source={name}={hub[name]}" for name in prep.SETS]
    prep.main(["finance", "medical", "--out", str(tmp_path / "prepared"), *sources])
    read = {name: [json.loads(line) for line in (tmp_path / "prepared" / f"{name}.jsonl").read_text().splitlines()]
            for name in prep.SETS}
    assert len(read["fpb"]) == len(read["fiqa"]) == 2  # FlowerTune's 25% of 8 rows, seed 42
    assert {r["output"] for r in read["fpb"]} <= {"negative", "neutral", "positive"}
    assert [prep.fiqa_label(s) for s in (-0.11, -0.1, 0.0, 0.099, 0.1)] == ["negative", "neutral", "neutral", "neutral",
                                                                          "positive"]
    assert [r["output"] for r in read["tfns"][:3]] == ["negative", "positive", "neutral"]  # bearish, bullish, neutral
    assert all(r["instruction"] == prep.TWEET for r in read["tfns"])
    assert read["pubmedqa"][0] == {"instruction": prep.PUBMEDQA, "input": "One.\nTwo.\nDoes 0 help?", "output": "yes"}
    assert [r["answer"] for r in read["medqa"][:5]] == [0, 1, 2, 3, 0]  # the option whose text is the answer
    assert [r["answer"] for r in read["careqa"][:5]] == [0, 1, 2, 3, 0]  # cop counts from 1
    with pytest.raises(SystemExit, match="SET=FILE"):
        prep.main(["finance", "--source", "nope"])


@pytest.mark.parametrize("challenge", sorted(TEMPLATE))
def test_each_preset_composes_with_the_templates_settings(challenge, compose_cfg):
    cfg = compose_cfg(f"experiment=flowertune_{challenge}")
    path, clients, fraction = TEMPLATE[challenge]
    assert (cfg.dataset.path, cfg.fl.num_clients, cfg.fl.sample_fraction) == (path, clients, fraction)
    assert (cfg.fl.rounds, cfg.client.local_steps, cfg.client.batch_size, cfg.client.grad_accum) == (200, 10, 16, 1)
    assert (cfg.client.lr, cfg.client.lr_schedule, cfg.client.lr * cfg.client.lr_min_ratio) == (5e-5, "cosine",
                                                                                                pytest.approx(1e-6))
    assert (cfg.model.path, cfg.model.quantize, cfg.model.gradient_checkpointing) == ("mistralai/Mistral-7B-v0.3",
                                                                                      "nf4", True)
    assert (cfg.adapter.r, cfg.adapter.alpha, cfg.adapter.dropout) == (32, 64, 0.075)
    assert set(cfg.eval_sets) == EVAL_SETS[challenge] and cfg.fl.comm_budget_bytes == BUDGET
    assert build(cfg).fl.clients_per_round == max(2, round(clients * fraction))  # Flower samples at least 2


@pytest.mark.parametrize("challenge", sorted(TEMPLATE))
def test_each_preset_runs_a_round_and_logs_its_sets_and_its_budget(challenge, compose_cfg, tmp_path, caplog):
    hub = _hub_eval_files(tmp_path / "hub")
    prepared = tmp_path / "prepared"
    if challenge in prep.CHALLENGES:
        prep.main([challenge, "--out", str(prepared), *[f"--source={name}={hub[name]}" for name in prep.SETS]])
    files = {"mmlu": hub["mmlu"], "medmcqa": hub["medmcqa"], **{n: str(prepared / f"{n}.jsonl") for n in prep.SETS}}
    # tiny_llama at width 64: room for the preset's rank 32, and the 64-feature blocks of bitsandbytes' CPU NF4
    overrides = [f"experiment=flowertune_{challenge}", "model=tiny_llama", "~model.path", "+model.hidden_size=64",
                 "+model.intermediate_size=128", "model.max_length=128", "dataset.path=json",
                 f"dataset.cache_dir={tmp_path / 'cache'}",
                 f"dataset.data_files={{train: {_jsonl(tmp_path / 'train.jsonl', _train_rows(challenge))}}}",
                 "fl.num_clients=3", "fl.rounds=1", "client.local_steps=1", "client.batch_size=2",
                 "task.max_new_tokens=2", "logger=none", "simulation.progress=false"]
    for name in EVAL_SETS[challenge]:
        overrides += [f"eval_sets.{name}.dataset.path=json", f"eval_sets.{name}.dataset.name=null",
                      f"eval_sets.{name}.dataset.data_files={{{'test' if name == 'mmlu' else 'train'}: {files[name]}}}",
                      f"eval_sets.{name}.dataset.cache_dir={tmp_path / 'cache'}"]
        overrides += [] if name == "mmlu" else [f"+eval_sets.{name}.limit=4"]  # MMLU: each category's question
    if challenge == "medical":
        overrides.append("eval_sets.medmcqa.dataset.split_train=train")  # the hub's is validation
    with caplog.at_level(logging.INFO, logger="celora"):
        summary = run(compose_cfg(*overrides), run_dir=tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    last = rows[-1]
    for name in EVAL_SETS[challenge]:
        assert 0 <= last[f"eval/{name}/acc"] <= 1 and last[f"eval/{name}/ppl"] > 1, name
    if challenge == "general":  # FlowerTune's three MMLU numbers
        assert all(0 <= last[f"eval/mmlu/acc/category/{c}"] <= 1 for c in ("stem", "social_sciences", "humanities"))
    used = last["comm/up_bytes_cum"] + last["comm/down_bytes_cum"]
    assert used > 0 and summary["comm/budget_share"] == used / BUDGET and summary["comm/budget_bytes"] == BUDGET
    assert f"round 1: uplink+downlink {used / 1e9:.3f} GB of budget 209.715 GB" in caplog.text


def test_without_a_budget_nothing_is_logged_or_kept_and_a_bad_one_is_refused(compose_cfg, tmp_path, caplog):
    row = {"round": 3, "comm/up_bytes_cum": 3e9, "comm/down_bytes_cum": 1e9}
    assert budget_use(row, 8e9) == {"comm/budget_bytes": 8e9, "comm/budget_used_bytes": 4e9, "comm/budget_share": 0.5}
    with caplog.at_level(logging.INFO, logger="celora"):
        Metrics(tmp_path).log(row)
        assert "budget" not in caplog.text
        Metrics(tmp_path, comm_budget_bytes=8e9).log(row)
    assert "round 3: uplink+downlink 4.000 GB of budget 8.000 GB (50.00%)" in caplog.text
    assert compose_cfg().fl.comm_budget_bytes is None
    with pytest.raises(ConfigError, match="fl.comm_budget_bytes"):
        build(compose_cfg("+debug=tiny", "fl.comm_budget_bytes=0"))
