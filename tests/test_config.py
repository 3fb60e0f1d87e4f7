"""Every option of every config group composes and instantiates; presets and experiments resolve."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from celora.adapters import AdapterConfig
from celora.schema import make
from celora.validate import fl_config
from conftest import CONF_DIR


def _tune_methods():
    import ast

    tree = ast.parse((CONF_DIR.parent / "scripts" / "tune.py").read_text())
    return next(ast.literal_eval(n.value) for n in tree.body
                if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "METHODS")


TUNE_METHODS = _tune_methods()


def options(group):
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _compose(*overrides, hydra=False):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def test_every_group_has_options():
    for group in ("dataset", "partition", "model", "adapter", "aggregator", "simulation", "logger", "method"):
        assert options(group), group


@pytest.mark.parametrize("name", options("adapter"))
def test_adapters_instantiate_and_validate(name):
    adapter = instantiate(_compose(f"adapter={name}").adapter)
    assert isinstance(adapter, AdapterConfig) and adapter.name == name
    assert set(adapter.shared) <= set(adapter.trainable)


@pytest.mark.parametrize("name", options("aggregator"))
def test_aggregators_instantiate(name):
    agg = instantiate(_compose(f"aggregator={name}").aggregator)
    assert callable(agg) and isinstance(agg.communicates, bool)


@pytest.mark.parametrize("name", options("partition"))
def test_partitions_instantiate(name):
    part = instantiate(_compose(f"partition={name}").partition)
    assert hasattr(part, "split") and 0 <= part.local_test_fraction < 1


@pytest.mark.parametrize("name", options("logger"))
def test_loggers_instantiate(name, tmp_path):
    sink = instantiate(_compose(f"logger={name}").logger)
    for method in ("log", "log_config", "finish"):
        assert callable(getattr(sink, method))


@pytest.mark.parametrize("name", options("simulation"))
def test_simulations_instantiate(name):
    factory = instantiate(_compose(f"simulation={name}").simulation)
    assert callable(factory)


def _saved(model_name: str, folder: Path) -> Path:
    """A tiny random model of the family saved as a local folder, the way a user points model.path at one."""
    spec = make(_compose(f"model={model_name}").model)
    net = next(getattr(spec, a) for a in ("model", "lm", "backbone") if hasattr(spec, a))  # CLIP, causal LM, encoder
    net.save_pretrained(folder)
    if hasattr(spec, "tokenizer"):
        spec.tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", options("model"))
def test_models_instantiate(name, tmp_path):
    from celora.models.text import minilm_folder

    folders = {"hf_encoder": lambda: minilm_folder(), "vit": lambda: _saved("tiny_vit", tmp_path / "vit"),
               "clip": lambda: _saved("tiny_clip", tmp_path / "clip"),
               "hf_causal_lm": lambda: _saved("tiny_llama", tmp_path / "llm")}
    extra = [f"model.path={folders[name]()}"] if name in folders else []
    extra += ["model.image_size=32"] if name == "efficientnet_lite0" else []
    spec = make(_compose(f"model={name}", *extra).model)
    assert spec.default_targets and callable(spec.collate())
    model = spec.classifier(3, seed=0, label_names=["a", "b", "c"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(n.startswith("head.") for n in trainable)  # the backbone is frozen; only a head (if any) trains
    args = spec.data_args()
    if "tokenizer" in args:  # text: a dataset loader gets the tokenizer and the length
        assert args["tokenizer"].pad_token_id is not None and args["max_length"] > 0
    else:  # images: the resolution to resize to once
        assert set(args) == {"image_size"} and args["image_size"] > 0


def _text_args():
    from celora.models.text import from_config

    return from_config("bert", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32).data_args() | {"max_length": 32}


@pytest.mark.parametrize("name", options("dataset"))
def test_datasets_instantiate(name, tmp_path):
    from celora.data import load

    instruct = name in ("rt_instruct", "party_instruct", "instruct_mix", "hf_instruct", "multiple_choice")  # LLMs' data
    extra = [f"dataset.cache_dir={tmp_path / 'cache'}"] if name in ("hf", "rotten_tomatoes", "hf_image") or instruct else []
    image = name in ("mnist", "fashion_mnist", "digits", "hf_image")
    if name == "hf_instruct":
        rows = tmp_path / "alpaca.jsonl"
        rows.write_text("".join(f'{{"instruction": "Say {i}.", "input": "", "output": "{i}"}}\n' for i in range(40)))
        extra += ["dataset.path=json", f"dataset.data_files=[{rows}]"]
    elif name == "multiple_choice":  # MMLU's schema, two subjects
        rows = tmp_path / "mmlu.jsonl"
        rows.write_text("".join(f'{{"question": "{i} + 1?", "choices": ["{i}", "{i + 1}"], "answer": 1, '
                                f'"subject": "{("algebra", "arithmetic")[i % 2]}"}}\n' for i in range(40)))
        extra += ["dataset.path=json", f"dataset.data_files=[{rows}]"]
    elif name == "hf":
        csv = tmp_path / "reviews.csv"
        csv.write_text("text,label\n" + "".join(f"review {i} {'good' if i % 2 else 'bad'},{i % 2}\n" for i in range(40)))
        extra += ["dataset.path=csv", f"dataset.data_files=[{csv}]", "dataset.split_test=null"]
    elif name == "glue":  # GLUE's schema in a local folder laid out as the hub's repository
        from test_glue import write_glue

        extra += [f"dataset.path={write_glue(tmp_path / 'glue', 'sst2')}", f"dataset.cache_dir={tmp_path / 'cache'}"]
    elif name == "hf_image":
        from PIL import Image

        for label in ("bad", "good"):
            (tmp_path / "pics" / label).mkdir(parents=True)
            for i in range(20):
                Image.new("L", (9, 9), 40 if label == "bad" else 200).save(tmp_path / "pics" / label / f"{i}.png")
        extra += ["dataset.path=imagefolder", f"dataset.data_dir={tmp_path / 'pics'}", "dataset.split_test=null"]
    else:
        extra += ["dataset.limit=200"]
    loader = make(_compose(f"dataset={name}", *extra).dataset)
    if instruct:
        from celora.models.llm import tiny_llama

        args = tiny_llama().data_args()
    else:
        args = {"image_size": 16} if image else _text_args()
    data = load(loader, args, seed=0)
    classes = {"mnist": 10, "fashion_mnist": 10, "digits": 10, "instruct_mix": 4, "hf_instruct": 1,
               "multiple_choice": 2}
    assert data.num_classes == classes.get(name, 2) and data.answers == ("tokens" if instruct else "classes")
    assert len(data.train) > len(data.test) > 0 and len(data.label_names) == data.num_classes
    rows = data.encoded("train")
    assert len(rows) == len(data.train) and rows.classes[0] == data.train["label"][0]
    if not instruct:
        assert rows[0][1] == data.train["label"][0]
    if image:
        assert data.train_pixels.shape[1:][-2:] == (16, 16)
    else:
        assert {"input_ids", "label"} <= set(data.train.column_names)


VARIANTS = {"fedavgm": "momentum", "fedadagrad": "adagrad", "fedadam": "adam", "fedyogi": "yogi", "fedprox": None}


@pytest.mark.parametrize("name", options("method"))
def test_method_presets_pick_adapter_and_aggregator(name):
    cfg = _compose(f"method={name}")
    adapter = instantiate(cfg.adapter)
    agg = instantiate(cfg.aggregator)
    base, _, variant = name.rpartition("_")
    if variant in VARIANTS:  # a base method with a server optimizer or FedProx: the base's adapter and aggregator
        plain = _compose(f"method={base}")
        assert OmegaConf.to_container(cfg.adapter) == OmegaConf.to_container(plain.adapter)
        assert OmegaConf.to_container(cfg.aggregator) == OmegaConf.to_container(plain.aggregator)
        assert cfg.server.optimizer == VARIANTS[variant] and plain.server.optimizer is None
        assert (cfg.client.prox_mu > 0) == (variant == "fedprox") and plain.client.prox_mu == 0
    elif name in ("local", "centralized"):
        assert not agg.communicates
    elif name == "celora":  # the tri adapter with personalised aggregation
        assert adapter.name == "tri" and agg.data_stats is not None
    elif name == "celora_local_head":  # CE-LoRA, each client keeping its own task head
        assert adapter.name == "tri" and adapter.head == "local" and agg.data_stats is not None
    elif name == "group_oracle":  # LoRA, FedAvg within the partition's true latent groups (a reference)
        assert adapter.name == "lora" and agg.personalised and agg.needs_groups and agg.communicates
    elif name == "tri_svd":  # frozen factors from W0's SVD, FedAvg
        assert adapter.name == "tri" and adapter.init == "svd" and agg.communicates and agg.data_stats is None
    elif name == "fed_sb":  # frozen factors from round 0's gradients (LoRA-SB), FedAvg
        assert adapter.name == "tri" and adapter.init == "lora_sb" and agg.communicates and agg.data_stats is None
    else:
        assert adapter.name == name and agg.communicates


def test_command_line_group_beats_preset():
    # `method=local adapter=tri`: local training of the tri adapter
    cfg = _compose("method=local", "adapter=tri")
    assert cfg.adapter.name == "tri" and cfg.aggregator._target_.endswith("Local")


@pytest.mark.parametrize("name", options("experiment"))
def test_experiments_compose(name):
    cfg = _compose(f"experiment={name}", hydra=True)
    fl_config(cfg)  # typed and validated, interpolations resolved
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert params, "an experiment file declares its sweep"
    for key, values in params.items():
        group = key.lstrip("+")
        if (CONF_DIR / group).is_dir():
            for value in str(values).split(","):
                if group == "method" and value.startswith("tuned/"):
                    # written by `scripts/tune.py choose` once a method's tuning has finished: its base
                    # preset must exist and the tuning must cover it
                    base = value.removeprefix("tuned/")
                    committed = (CONF_DIR / "method" / "tuned" / f"{base}.yaml").exists()  # server-choose's, or by hand
                    assert (CONF_DIR / "method" / f"{base}.yaml").exists() and (base in TUNE_METHODS or committed), value
                    continue
                assert (CONF_DIR / group / f"{value}.yaml").exists(), (key, value)


def test_default_is_the_embedded_experiment():
    cfg = _compose()
    assert cfg.model._target_.endswith("minilm") and cfg.dataset._target_.endswith("rotten_tomatoes")
    assert cfg.fl.num_clients == 10 and cfg.logger.mode == "offline"
    assert Path(CONF_DIR / "config.yaml").exists()


@pytest.mark.parametrize("name", options("ablation"))
def test_ablation_presets_instantiate(name):
    from celora.fl.personalised import CeLoRA

    agg = instantiate(_compose("experiment=ablate_weights", f"+ablation={name}").aggregator)
    assert isinstance(agg, CeLoRA)
    assert (agg.data_stats is None) == (agg.lam == 0)


def test_every_model_dataset_and_task_option_declares_what_it_answers():
    from celora.schema import ANSWER_GROUPS, Answers, options

    for group in ANSWER_GROUPS:
        for name, body in options(group).items():
            assert body.get("answers") in Answers.__args__, f"conf/{group}/{name}.yaml: answers: classes | tokens"


def test_every_option_fits_its_declared_types():
    from itertools import zip_longest

    from celora import help, schema
    from celora.validate import PLAIN

    main, optional = help.groups()  # config.yaml's groups, and those added with +group= (not a script's)
    presets = ("method", "experiment")  # set keys of other groups: one at a time
    one_each = [[f"{g}={name}" for name in schema.options(g) if not name.startswith("common/")]  # (a shared part)
                for g in main if g not in presets]
    runs = [[o for o in combo if o] for combo in zip_longest(*one_each)]  # an option of every group at once
    runs += [[f"{g}={name}"] for g in presets for name in schema.options(g)]
    runs += [[*(["experiment=ablate_weights"] if g == "ablation" else []), f"+{g}={name}"]
             for g in optional for name in schema.options(g)]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        for overrides in runs:
            cfg = compose("config", overrides=overrides)
            assert not [p.message for p in schema.problems(cfg, PLAIN) if p.key], overrides


@pytest.mark.parametrize("overrides,task", [
    (["+debug=tiny"], "Classify"),  # a classifier: classify
    (["+debug=tiny", "model=tiny_llama", "dataset=rt_instruct"], "Instruct"),  # a causal LM: instruct
    (["+debug=tiny", "model=tiny_llama", "dataset=rt_instruct", "task=instruct"], "Instruct"),
    (["experiment=llm_default"], "Instruct"),
])
def test_the_task_follows_the_model(compose_cfg, overrides, task):
    from celora.validate import build

    cfg = compose_cfg(*overrides)
    assert cfg.task._target_.endswith(task)
    if overrides[0] == "+debug=tiny":
        assert type(build(cfg).task).__name__ == task


def test_a_task_set_against_the_model_is_refused_before_anything_loads(compose_cfg, tmp_path, monkeypatch):
    import celora.run
    from celora.run import run
    from celora.validate import ConfigError

    monkeypatch.setattr(celora.run, "build_world", lambda *a, **k: pytest.fail("data or model loaded"))
    cfg = compose_cfg("+debug=tiny", "model=tiny_llama", "dataset=rt_instruct", "task=classify")
    assert cfg.task._target_.endswith("Classify")  # the command line still wins
    with pytest.raises(ConfigError, match=r"model=tiny_llama answers in tokens, dataset=rt_instruct answers in "
                                          r"tokens, task=classify answers in classes: they must agree .* use "
                                          r"task=instruct \(or leave task= out"):
        run(cfg, run_dir=tmp_path)


def test_runs_kept_in_docs_results_still_count_as_finished():
    """Keys added to conf/ since (e.g. answers) change no kept run: one of each results folder is still finished
    under today's config, so re-running its sweep trains nothing (run.finished_before)."""
    import yaml

    from celora.run import finished_before, result_config

    results = CONF_DIR.parent / "docs" / "results"
    kept = {}
    for summary in sorted(results.rglob("summary.json")):
        kept.setdefault(summary.relative_to(results).parts[0], summary.parent)
    assert kept
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        for run_dir in kept.values():
            overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
            assert finished_before(run_dir, result_config(compose("config", overrides=overrides))), run_dir
