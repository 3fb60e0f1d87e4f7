"""Causal-LM instruction tuning through the whole run, on tiny_llama and instruct_mix: every method, parallel
equals sequential, resume after a kill, the data statistics of the prompt, Alpaca-format user data."""
import json

import pytest
import torch

from celora.data.batches import IGNORE
from celora.run import run
from tolerance import DEEP, deep_approx, deep_equal, unit_roundoff

pytestmark = pytest.mark.usefixtures("one_thread")

LLM = ["+debug=tiny_llm"]  # conf/debug/tiny_llm.yaml
# fp64 (tests/tolerance.py: DEEP), every dropout off, clients of uneven local steps (at most 0.4 epochs)
EQUAL = [*LLM, "model.dropout=0", "model.dtype=fp64", "fl.wire_dtype=fp64", "client.local_steps=3",
         "client.max_epochs=0.4"]


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


METHODS = ["lora", "ffa_lora", "fedsa_lora", "tri", "tri_svd", "celora", "local", "centralized"]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_instruction_data(compose_cfg, tmp_path, method):
    summary = run(compose_cfg(*LLM, f"method={method}"), run_dir=tmp_path)
    rows = _rows(tmp_path)
    assert [r["round"] for r in rows] == [0, 1, 2]
    last = summary["last"]
    assert 0 <= last["personal/acc"] <= 1 and last["personal/ppl"] > 1 and last["train/tokens"] > 0
    assert last["time/train_tokens_per_s"] > 0 and rows[0]["round"] == 0 and "train/tokens" not in rows[0]
    if method in ("local", "fedsa_lora"):  # private tensors: no one global model
        assert last["global/acc"] is None and last["global/ppl"] is None
    else:
        assert 0 <= last["global/acc"] <= 1 and last["global/ppl"] > 1
    if method in ("local", "centralized"):  # nothing crosses a wire
        assert last["comm/up_bytes_cum"] == 0
    else:
        assert last["comm/up_bytes"] > 0


def test_dp_and_a_bf16_wire_on_instruction_data(compose_cfg, tmp_path):
    plain = run(compose_cfg(*LLM, "method=tri"), run_dir=tmp_path / "plain")
    dp = run(compose_cfg(*LLM, "method=tri", "privacy=client", "privacy.noise_multiplier=0.5",
                         "fl.wire_dtype=bf16"), run_dir=tmp_path / "dp")
    assert dp["last"]["privacy/epsilon"] > 0 and dp["last"]["train/loss"] != plain["last"]["train/loss"]
    # bf16 on the wire: half of fp32's bytes for the same values, every round
    assert dp["last"]["comm/up_bytes"] * 2 == plain["last"]["comm/up_bytes"]


@pytest.mark.parametrize("aggregator", ["fedavg", "celora"])
@pytest.mark.parametrize("adapter", ["lora", "tri"])
def test_parallel_equals_sequential_on_instruction_data(compose_cfg, tmp_path, adapter, aggregator):
    common = (f"adapter={adapter}", f"aggregator={aggregator}")
    run(compose_cfg(*EQUAL, *common, "simulation=sequential"), run_dir=tmp_path / "seq")
    # a round's 3 clients: a stacked pair of (often) different tasks and prompt lengths, then one
    run(compose_cfg(*EQUAL, *common, "simulation=parallel", "simulation.cohort_size=2"), run_dir=tmp_path / "par")
    seq, par = _rows(tmp_path / "seq"), _rows(tmp_path / "par")
    assert [r["round"] for r in seq] == [r["round"] for r in par] == [0, 1, 2]
    for a, b in zip(seq, par):
        for key in a:
            if not key.startswith("time/"):
                assert deep_equal(a[key], b[key]), (a["round"], key, a[key], b[key])
    # the bound: within 1e-5 (DEEP roundings of fp64 are 1.1e-10)
    assert DEEP * unit_roundoff(torch.float64) < 1e-5


def test_killed_and_resumed_equals_uninterrupted(compose_cfg, tmp_path):
    from test_resume import _killed
    from test_resume import _rows as untimed

    cfg = compose_cfg(*LLM, "fl.rounds=3", "method=celora")
    run(cfg, run_dir=tmp_path / "whole")
    _killed(cfg, tmp_path / "resumed", at_round=2)
    assert [r["round"] for r in untimed(tmp_path / "resumed")] == [0, 1, 2]
    run(cfg, run_dir=tmp_path / "resumed")
    assert untimed(tmp_path / "resumed") == untimed(tmp_path / "whole")


def test_the_data_statistics_summarise_the_prompt_only():
    from celora.models.llm import tiny_llama
    from celora.tasks.instruct import Instruct

    backbone = tiny_llama(dtype="fp64")
    model, collate = backbone.classifier(0, seed=0), backbone.collate()
    tok = backbone.tokenizer
    prompt = tok("Is it good? Yes it is", add_special_tokens=False).input_ids
    rows = [(prompt + a, [IGNORE] * len(prompt) + a) for a in (tok(" positive").input_ids + [2], [5, 6, 7, 2])]
    batch = collate(rows)
    feats = Instruct().features(model, batch)
    # the mean of the prompt's hidden states, by hand; the answers (and padding) change nothing
    hidden = model.hidden(batch["input_ids"][:1, :len(prompt)], batch["attention_mask"][:1, :len(prompt)])
    for row in feats:
        for got, want in zip(row.tolist(), hidden[0].mean(0).tolist()):
            assert got == deep_approx(want)


# ---------------------------------------------------------------- Alpaca-format user data


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


ALPACA = [{"instruction": f"Add {i} and {i + 1}.", "input": "" if i % 2 else "Show only the number.",
           "output": str(2 * i + 1)} for i in range(30)]


def test_hf_instruct_loads_a_jsonl_in_alpaca_format(tmp_path):
    from celora.data.instruct import hf_instruct
    from celora.models.llm import tiny_llama

    tok = tiny_llama().tokenizer
    _write_jsonl(tmp_path / "a.jsonl", ALPACA)
    data = hf_instruct(tokenizer=tok, max_length=64, seed=0, path="json",
                       data_files={"train": str(tmp_path / "a.jsonl")}, cache_dir=str(tmp_path / "cache"))
    assert len(data.train) + len(data.test) == 30 and data.label_names == ["all"] and data.options is None
    row = data.train[0]
    source = next(r for r in ALPACA if r["output"] == row["answer"])
    assert row["prompt"] == source["instruction"] + (f"\n\n{source['input']}" if source["input"] else "")
    ids, targets, options = data.encoded("train")[0]
    answer = [t for t in targets if t != IGNORE]
    assert tok.decode(answer[:-1]) == row["answer"] and answer[-1] == tok.eos_token_id and options is None
    assert ids[-len(answer):] == answer and len(ids) <= 64


def test_hf_instruct_runs_a_federation_with_generated_answers(compose_cfg, tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", ALPACA)
    summary = run(compose_cfg(*LLM, "dataset=hf_instruct", "dataset.path=json", "partition=iid",
                              f"dataset.data_files={{train: {tmp_path / 'a.jsonl'}}}", "task.accuracy=generate",
                              "task.max_new_tokens=3", "dataset.limit=null", f"dataset.cache_dir={tmp_path / 'cache'}"),
                  run_dir=tmp_path / "run")
    assert 0 <= summary["last"]["personal/acc"] <= 1 and summary["last"]["global/ppl"] > 1


def test_hf_instruct_refuses_malformed_rows_by_message(tmp_path):
    from celora.data.instruct import hf_instruct
    from celora.models.llm import tiny_llama

    tok = tiny_llama().tokenizer
    load = lambda name, **kw: hf_instruct(tokenizer=tok, max_length=kw.pop("max_length", 64), seed=0,  # noqa: E731
                                          path="json", data_files={"train": str(tmp_path / name)},
                                          cache_dir=str(tmp_path / "cache"), **kw)
    missing = [dict(r) for r in ALPACA]
    missing[3]["output"] = None
    missing[7]["instruction"] = "  "
    _write_jsonl(tmp_path / "missing.jsonl", missing)
    with pytest.raises(ValueError, match=r"column 'output' \(dataset.output_column\): 1 of 30 rows.*rows 3\b"):
        load("missing.jsonl")
    assert len(load("missing.jsonl", drop_missing=True).train) + len(load("missing.jsonl", drop_missing=True).test) == 28
    long = [dict(r) for r in ALPACA]
    long[5]["output"] = "many words " * 40
    _write_jsonl(tmp_path / "long.jsonl", long)
    with pytest.raises(ValueError, match=r"answers of rows \[\d+\] take up to \d+ tokens.*model.max_length=64"):
        load("long.jsonl")
    _write_jsonl(tmp_path / "renamed.jsonl", [{"prompt": r["instruction"], "output": r["output"]} for r in ALPACA])
    with pytest.raises(ValueError, match=r"column\(s\) \['instruction'\] not in json.*dataset.instruction_column"):
        load("renamed.jsonl")
    with pytest.raises(ValueError, match=r"dataset.input_column='input' is not a column"):
        load("renamed.jsonl", instruction_column="prompt")
    with pytest.raises(ValueError, match=r"not among dataset.options=\['1', '3'\]"):
        load("a.jsonl" if (tmp_path / "a.jsonl").exists() else _write_jsonl(tmp_path / "a.jsonl", ALPACA) or "a.jsonl",
             options=["1", "3"])


def test_options_and_prompt_cut_on_the_embedded_sources(tmp_path):
    from celora.data.instruct import PARTY_ANSWERS, RT_ANSWERS, instruct_mix, party_instruct
    from celora.models.llm import tiny_llama

    tok = tiny_llama().tokenizer
    mix = instruct_mix(tokenizer=tok, max_length=128, seed=0, limit=40, cache_dir=str(tmp_path))
    assert mix.label_names == RT_ANSWERS + PARTY_ANSWERS
    rows = mix.encoded("train")
    for i in range(len(rows)):
        ids, targets, options = rows[i]
        task = rows.tasks[i]
        assert task == rows.classes[i] // 2  # classes are task-major
        assert [t for t in targets if t != IGNORE] in options and len(options) == 2
        assert options == mix.options[task]
    short = party_instruct(tokenizer=tok, max_length=72, seed=0, limit=40, cache_dir=str(tmp_path))
    assert max(len(x) for x in short.train["input_ids"]) <= 72 and any(short.train["prompt_cut"])


def test_instruction_data_under_a_classifier_is_refused_with_the_reason(compose_cfg, tmp_path):
    # declared in the options' YAML (answers): refused before anything loads
    with pytest.raises(ValueError, match=r"model=tiny_bert answers in classes, dataset=rt_instruct answers in tokens"):
        run(compose_cfg("+debug=tiny", "dataset=rt_instruct", f"dataset.cache_dir={tmp_path}"), run_dir=tmp_path / "a")
    # an option that does not declare it (a user's own YAML): refused once loading says so, named the same way
    with pytest.raises(ValueError, match=r"no EOS token.*instruction data is for causal LMs"):
        run(compose_cfg("+debug=tiny", "dataset=rt_instruct", "~dataset.answers", f"dataset.cache_dir={tmp_path}"),
            run_dir=tmp_path / "a")
    with pytest.raises(ValueError, match=r"dataset=rt_instruct answers in tokens, task=classify answers in classes: "
                                         r"they must agree"):
        run(compose_cfg(*LLM, "task=classify", "~task.answers", "dataset=rt_instruct", "partition=iid",
                        f"dataset.cache_dir={tmp_path}"), run_dir=tmp_path / "b")
