"""Exported models (python -m celora.export) against celora's own: PEFT adapters on a fresh base, merged models, heads."""
import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from celora.export import load_classifier
from celora.export.__main__ import main as export_cli
from celora.export.folders import export_run, write
from celora.export.source import open_run
from celora.fl import checkpoint
from celora.run import run
from celora.tensors import load
from tolerance import assert_deep_close

METHODS = ["lora", "ffa_lora", "fedsa_lora", "tri", "tri_svd", "fed_sb", "celora", "celora_local_head", "local",
           "centralized"]
PERSONAL = {"fedsa_lora", "celora", "celora_local_head", "local"}  # each client's model is its own
GLOBAL = set(METHODS) - {"fedsa_lora", "celora_local_head", "local"}  # the server has one model
FP64 = ["model.dtype=fp64", "fl.wire_dtype=fp64", "model.dropout=0"]  # equivalence is checked in fp64
MODELS = {  # two clients, one round: every method's tensors have moved from their start
    "tiny_bert": ["+debug=tiny", "fl.num_clients=2", "fl.sample_fraction=1", "fl.rounds=1"],
    "tiny_llama": ["+debug=tiny_llm", "fl.num_clients=2", "fl.sample_fraction=1", "fl.rounds=1"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(model, method) -> a finished tiny run dir, made on first use."""
    made = {}
    root = tmp_path_factory.mktemp("export_runs")

    def get(model: str, method: str) -> Path:
        if (model, method) not in made:
            from hydra import compose, initialize_config_dir

            from conftest import CONF_DIR

            with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
                cfg = compose("config", overrides=[*MODELS[model], f"method={method}", *FP64])
            made[model, method] = root / f"{model}-{method}"
            run(cfg, run_dir=made[model, method])
        return made[model, method]

    return get


def _inputs(trained, n: int = 2) -> dict:
    batch = trained.sim.collate([trained.sim.train_data[i] for i in range(n)])
    keep = ("input_ids", "attention_mask")
    return {k: v for k, v in batch.items() if k in keep}


def _celora_logits(trained, client, inputs) -> torch.Tensor:
    states = trained.sim.states
    load(trained.sim.model, states.global_model() if client is None else states.of(client))
    with torch.no_grad():
        return trained.sim.model(**inputs)


def _exported_logits(folder: Path, inputs: dict, base_cache: dict) -> torch.Tensor:
    """The folder's logits through peft / transformers alone (plus load_classifier's pooling and head)."""
    from peft import PeftModel
    from transformers import AutoModel, AutoModelForCausalLM

    facts = json.loads((folder / "celora.json").read_text())
    with torch.no_grad():
        if (folder / "head.json").exists():
            if facts["format"] == "peft":
                base = base_cache.setdefault(facts["base_model"], AutoModel.from_pretrained(
                    facts["base_model"], dtype=torch.float64))
                return load_classifier(folder, base=copy.deepcopy(base))(**inputs)
            return load_classifier(folder, dtype=torch.float64)(**inputs)
        if facts["format"] == "peft":
            base = base_cache.setdefault(facts["base_model"], AutoModelForCausalLM.from_pretrained(
                facts["base_model"], dtype=torch.float64))
            return PeftModel.from_pretrained(copy.deepcopy(base), str(folder))(**inputs).logits
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float64)(**inputs).logits


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("method", METHODS)
def test_exported_models_give_celora_s_logits(runs, model, method, one_thread):
    """Every method's global and personal models, exported as PEFT adapters and as merged models, give the
    logits of celora's own model at that round (fp64, DEEP roundings); personal models differ between clients."""
    run_dir = runs(model, method)
    trained, cache = open_run(run_dir), {}
    folders = [f for fmt in ("peft", "merged") for f in write(trained, "all", fmt, None, ["python", "-m", "..."])]
    names = {f.name for f in folders}
    headless = model == "tiny_llama" and method == "celora_local_head"  # an LM has no head to keep at home
    assert ("global" in names) == (method in GLOBAL or headless)
    assert {"client_0", "client_1"} <= names if method in PERSONAL else not any(n.startswith("client_") for n in names)
    inputs = _inputs(trained)
    base_logits = None
    for folder in folders:
        client = json.loads((folder / "celora.json").read_text())["client"]
        want = _celora_logits(trained, client, inputs)
        assert_deep_close(_exported_logits(folder, inputs, cache), want)
        if client == 0:
            base_logits = want
        if client == 1:
            assert not torch.allclose(want, base_logits)  # the two clients' own models differ
    if method in PERSONAL:
        a, b = (load_file(str(run_dir / "export/round_1/peft" / f"client_{i}/adapter_model.safetensors"))
                for i in (0, 1))
        assert any(not torch.equal(a[k], b[k]) for k in a)


def test_the_card_says_what_the_model_is_and_what_it_cost(runs):
    run_dir = runs("tiny_bert", "celora")
    [folder] = export_run(run_dir, models="1")
    facts = json.loads((folder / "celora.json").read_text())
    row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert facts["round"] == 1 and facts["client"] == 1 and facts["format"] == "peft"
    assert facts["uplink_bytes"] == row["comm/up_bytes_cum"] and facts["downlink_bytes"] == row["comm/down_bytes_cum"]
    assert facts["metrics"] == {"personal/acc": row["personal/acc_by_client"][1]}
    card = (folder / "README.md").read_text()
    for said in ("round 1", "Client 1", f"{row['comm/up_bytes_cum']:,} bytes", "python -m celora.export",
                 facts["base_model"], "load_classifier"):
        assert said in card, said
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    assert config["base_model_name_or_path"] == facts["base_model"] == str((run_dir / "export/base").resolve())


def test_a_killed_run_exports_its_newest_intact_checkpoint(runs, tmp_path):
    """A run whose newest checkpoint is cut short (killed while writing, or damaged) exports the round before."""
    from hydra import compose, initialize_config_dir

    from conftest import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*MODELS["tiny_bert"], "fl.rounds=2", "method=tri", *FP64])
    run(cfg, run_dir=tmp_path)
    newest = checkpoint.path_of(tmp_path / "checkpoints", 2)
    newest.write_bytes(newest.read_bytes()[:1000])
    [folder] = export_run(tmp_path, models="global")
    assert json.loads((folder / "celora.json").read_text())["round"] == 1 and folder.parent.parent.name == "round_1"


def test_export_at_the_end_of_a_run_writes_what_the_command_writes(compose_cfg, tmp_path):
    cfg = compose_cfg(*MODELS["tiny_bert"], "method=tri", "export.at_end=true", "export.models=global")
    run(cfg, run_dir=tmp_path / "run")
    at_end = load_file(str(tmp_path / "run/export/round_1/peft/global/adapter_model.safetensors"))
    [again] = export_run(tmp_path / "run", models="global", out=tmp_path / "again")
    later = load_file(str(again / "adapter_model.safetensors"))
    assert at_end.keys() == later.keys() and all(torch.equal(at_end[k], later[k]) for k in at_end)


def test_a_run_keeps_its_best_round_and_exports_it(compose_cfg, tmp_path):
    """Checkpoints: the newest two and the round of the best optimized_metric; --round best exports that one.
    A rate of 5 makes the loss grow from round 0 on, so the best round is one the newest two are not."""
    cfg = compose_cfg(*MODELS["tiny_bert"], "fl.rounds=3", "fl.eval_every=1", "optimized_metric=global/loss",
                      "client.lr=5")
    run(cfg, run_dir=tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    best = min(rows, key=lambda r: (r["global/loss"], r["round"]))["round"]
    assert best < 2 and checkpoint.rounds(tmp_path / "checkpoints") == [3, 2, best]
    [folder] = export_run(tmp_path, which="best", models="global")
    assert json.loads((folder / "celora.json").read_text())["round"] == best


@pytest.mark.parametrize("args, said", [
    (["{missing}"], "is not a directory"),
    (["{empty}"], "is not a run dir"),
    (["{lora}", "--models", "5"], "client 5 is not a client of this run, which has fl.num_clients=2"),
    (["{lora}", "--round", "7"], "round 7 of .* is not kept: .* use --round with one of \\[1, 0\\]"),
    (["{lora}", "--round", "soon"], "--round 'soon' is not last, best or a round number"),
    (["{fedsa}", "--models", "global"], "no global model, because its private tensors \\(lora_B\\) stay on"),
    (["{lora}", "--models", "personal"], "every client of this run has the global model"),
])
def test_bad_input_gets_one_line_and_exit_code_2(runs, tmp_path, capsys, args, said):
    import re

    (tmp_path / "empty").mkdir()
    dirs = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "lora": runs("tiny_bert", "lora"),
            "fedsa": runs("tiny_bert", "fedsa_lora")}
    argv = [a.format(**dirs) for a in args]
    assert export_cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("celora.export: ") and re.search(said, err) and "Traceback" not in err, err


def test_merged_export_can_be_moved_and_still_loads(runs, tmp_path):
    """A merged folder is self-contained (weights, config, tokenizer): copied elsewhere it loads the same."""
    from transformers import AutoModelForCausalLM

    [folder] = export_run(runs("tiny_llama", "tri"), models="global", fmt="merged")
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    assert (moved / "tokenizer_config.json").exists()
    a = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float64)
    b = AutoModelForCausalLM.from_pretrained(str(moved), dtype=torch.float64)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


# -- python -m celora.evaluate: the exported models scored as a run scores them ------------------------------
SCORES = ("global/acc", "global/loss", "personal/acc", "personal/loss", "personal/acc_by_client")


def _last(run_dir: Path, rnd: int = -1) -> dict:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][rnd]


def _same_scores(got: dict, want: dict, keys=SCORES) -> None:
    from tolerance import deep_equal

    for key in keys:
        assert deep_equal(got[key], want[key]), (key, got[key], want[key])


@pytest.mark.parametrize("model", sorted(MODELS))
def test_an_exported_global_model_scores_as_the_run_scored_it(runs, model):
    """lora (every client has the global model): its PEFT and merged exports, evaluated on the run's data and
    partition, give the run's last row (global and personal metrics)."""
    from celora.evaluate import evaluate_model

    run_dir = runs(model, "lora")
    same_run = [*MODELS[model], "fl.wire_dtype=fp64"]
    for fmt in ("peft", "merged"):
        [folder] = export_run(run_dir, models="global", fmt=fmt)
        _same_scores(evaluate_model(str(folder), same_run), _last(run_dir))


def test_each_client_s_exported_model_scores_on_its_own_rows(runs):
    """celora on tiny_llama: --clients scores client_<i>/ on client i's test rows, and global/ on the test split:
    the run's personal accuracy of every client and its global metrics."""
    from celora.evaluate import evaluate_model

    run_dir = runs("tiny_llama", "celora")
    [root] = {f.parent for f in export_run(run_dir, models="all")}
    _same_scores(evaluate_model(str(root), [*MODELS["tiny_llama"], "fl.wire_dtype=fp64"], clients=True),
                 _last(run_dir))


def test_a_base_model_scores_zero_shot_as_round_0(runs):
    """model=tiny_llama, no adapter: the run's round 0 (B = 0 is the pretrained model) on its first rows too."""
    from celora.evaluate import evaluate_model

    run_dir = runs("tiny_llama", "lora")
    row = evaluate_model("model=tiny_llama", [*MODELS["tiny_llama"], *FP64])
    _same_scores(row, _last(run_dir, 0))
    few = evaluate_model("model=tiny_llama", [*MODELS["tiny_llama"], *FP64], rows=3)
    assert set(few) == {"round", "global/acc", "global/loss", "global/ppl", "time/eval_s"}


def test_evaluate_refuses_what_is_not_a_model_in_one_line(tmp_path, capsys):
    from celora.evaluate import main

    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert main([str(tmp_path / "empty"), "--clients"]) == 2
    assert main(["model=tiny_lama"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("celora.evaluate: ") and "neither an exported folder" in err[0]
    assert "holds no exported client_<i>/ folder" in err[1]
    assert "did you mean model=tiny_llama" in err[2] and not any("Traceback" in line for line in err)


@pytest.mark.slow
def test_lm_evaluation_harness_scores_an_export_as_celora_evaluate_does(tmp_path, monkeypatch):
    """lm-eval (the `lmeval` extra; `make test-all` installs it) on an exported tiny_llama adapter, offline, over a
    local multiple-choice task of the run's first 24 test questions: the accuracy of celora.evaluate on the same
    rows. lm-eval is set up to ask as a run asks: the chat template, and each option's tokens then EOS."""
    import datasets
    import lm_eval
    from lm_eval.tasks import TaskManager

    from celora.data.instruct import RT_ANSWERS
    from celora.evaluate import prepare, score
    from conftest import CONF_DIR

    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", False)  # no download count sent anywhere
    overrides = ["+debug=tiny_llm", "dataset=rt_instruct", "dataset.limit=240", "partition=iid", "fl.rounds=1",
                 "method=lora"]
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        run(compose("config", overrides=overrides), run_dir=tmp_path / "run")
    [folder] = export_run(tmp_path / "run", models="global")
    n = 24
    prepared = prepare(str(folder), overrides)
    ours = score(prepared, rows=n)["global/acc"]
    rows = prepared.world.data.test.select(range(n))
    eos = prepared.world.backbone.tokenizer.eos_token
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "choices": [a + eos for a in RT_ANSWERS], "label": int(y)}) + "\n"
                            for p, y in zip(rows["prompt"], rows["label"])))
    task = {"task": "celora_rt", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{prompt}}",
            "doc_to_choice": "{{choices}}", "doc_to_target": "label", "metric_list": [{"metric": "acc"}]}
    facts = json.loads((folder / "celora.json").read_text())
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={facts['base_model']},peft={folder}",
                                  tasks=[task], task_manager=TaskManager(), device="cpu", batch_size=4,
                                  apply_chat_template=True, log_samples=True)
    theirs = out["results"]["celora_rt"]["acc,none"]
    assert theirs == pytest.approx(ours, abs=0.5 / n)  # the same count of right answers out of n
    # and the same questions right: each row scored alone by celora's evaluation, and by lm-eval
    from celora.fl.evaluation import evaluate
    from celora.tensors import load

    sim = prepared.sim
    load(sim.model, sim.states.global_model())
    right = [evaluate(sim.model, sim.test_data, [i], 1, sim.collate, sim.fitting.task)["correct"] for i in range(n)]
    samples = sorted(out["samples"]["celora_rt"], key=lambda s: s["doc_id"])
    assert [s["acc"] for s in samples] == right and 0 < sum(right) < n, right
