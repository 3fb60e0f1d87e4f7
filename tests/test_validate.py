"""Config validation: every problem named with its key and fix, all at once, before any data or model is loaded."""
import pytest
import torch

from celora.run import run
from celora.validate import ConfigError, build
from conftest import TINY

# (overrides, what the message must say): the key, the bad value or the rule, and the fix
CASES = [
    (["adapter.r=0"], r"adapter.r must be >= 1, got 0"),
    (["adapter.alpha=-1"], r"adapter.alpha must be > 0, got -1"),
    (["adapter.dropout=1.5"], r"adapter.dropout must be in \[0, 1\)"),
    (["fl.sample_fraction=1.5"], r"fl.sample_fraction must be in \(0, 1\], got 1.5"),
    (["fl.num_clients=0"], r"fl.num_clients must be >= 1, got 0"),
    (["fl.wire_dtype=fp8"], r"fl.wire_dtype must be one of \['bf16', 'fp16', 'fp32', 'fp64'\], got 'fp8'"),
    (["fl.on_client_error=ignore"], r"fl.on_client_error must be one of \('skip', 'raise'\)"),
    (["fl.max_update_norm_ratio=0.5"], r"fl.max_update_norm_ratio must be > 1 \(e.g. 10\) or null"),
    (["client.lr=0"], r"client.lr=0 must be > 0"),
    (["client.local_steps=0"], r"client.local_steps must be >= 1, got 0"),
    (["client.grad_clip=0"], r"client.grad_clip must be > 0, or null to turn clipping off"),
    (["partition=dirichlet", "partition.alpha=0"], r"partition.alpha=0 must be > 0"),
    (["partition.local_test_fraction=1"], r"partition: local_test_fraction=1 must be in \[0, 1\)"),
    (["dataset.test_fraction=0"], r"dataset.test_fraction=0 must be a number in \(0, 1\)"),
    (["dataset.limit=40", "fl.num_clients=50"],
     r"fl.num_clients=50 needs at least 100 examples .* dataset.limit=40; use fl.num_clients <= 20"),
    (["partition=grouped", "fl.num_clients=3"], r"num_clients=3 is not divisible by groups=2; use a multiple of 2"),
    (["aggregator=celora", "aggregator.lam=2"], r"aggregator.lam must be in \[0, 1\]"),
    (["simulation=parallel", "simulation.cohort_size=0"],
     r"simulation.cohort_size must be a positive integer or 'all'"),
    (["dataset=hf"], r"dataset.path has no value .* set it"),
    (["resume=maybe"], r"resume='maybe' must be one of auto, never, force: auto continues from the run dir's"),
    (["seed=-1"], r"seed=-1 must be an integer >= 0"),
    (["optimized_metric=personal/accuracy"], r"optimized_metric='personal/accuracy' is not a metric of the schema"),
    (["optimized_metric=best/nope"], r"optimized_metric='best/nope' is not a metric of the schema"),
    # combinations that cannot work in this code
    (["method=celora", "privacy=client"], r"privacy.mode=central calibrates .* \(CeLoRA\) .* use privacy.mode=local"),
    (["method=local", "privacy=client"], r"aggregator \(Local\) uploads nothing .* use privacy=none"),
    (["method=centralized", "privacy=client"], r"aggregator \(Centralized\) uploads nothing .* use privacy=none"),
    (["fl.max_update_norm_ratio=10", "fl.sample_fraction=0.5"],
     r"needs at least 3 clients a round, but this config samples 2; raise fl.sample_fraction"),
]


@pytest.mark.parametrize("overrides,message", CASES, ids=[" ".join(o) for o, _ in CASES])
def test_each_problem_is_named_with_its_fix(compose_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        build(compose_cfg(*TINY, *overrides))


# A value of the wrong type, out of its declared range, a key no callable takes, a name outside a closed set:
# refused by the declared types (celora.schema) before any data or model loads, naming the full key, the value
# and what is allowed or meant. (Overrides Hydra cannot compose at all, e.g. fl.roundz=3: tests/test_cli.py.)
TYPED = [
    (["fl.rounds=ten"], "fl.rounds='ten' must be an integer, e.g. fl.rounds=15"),
    (["client.batch_size=1.5"], "client.batch_size=1.5 must be an integer, e.g. client.batch_size=16"),
    (["client.lr=fast"], "client.lr='fast' must be a number, or null"),
    (["model.max_length=abc"], "model.max_length='abc' must be an integer >= 1, e.g. model.max_length=64"),
    (["simulation.progress=maybe"], "simulation.progress='maybe' must be true or false"),
    (["fl.sample_fraction=2"], "fl.sample_fraction must be in (0, 1], got 2"),
    (["dataset.limit=0"], "dataset.limit=0 must be an integer >= 1, or null"),
    (["dataset.test_fraction=1.5"], "dataset.test_fraction=1.5 must be a number in (0, 1), e.g. dataset.test_fraction=0.1"),
    (["model.dropout=1.5"], "model.dropout=1.5 must be a number in [0, 1), or null"),
    (["model.dtype=fp8"], "model.dtype='fp8' must be one of fp32, fp64, bf16"),
    (["model=tiny_llama", "dataset=rt_instruct", "task.accuracy=guess"],
     "task.accuracy='guess' must be one of likelihood, generate"),
    (["+client.batchsize=8"], "client.batchsize=8 is not a key of client; did you mean client.batch_size?"),
    (["+fl.roundz=3"], "fl.roundz=3 is not a key of fl; did you mean fl.rounds?"),
    (["+seeed=1"], "seeed=1 is not a key of the config; did you mean seed?"),
    (["aggregator=celora", "+aggregator.data_stats.kindd=gmm"],
     "aggregator.data_stats.kindd='gmm' is not a key of aggregator.data_stats; did you mean aggregator.data_stats.kind?"),
    (["+dataset.limt=5"], "dataset.limt=5 is not a key of dataset=rotten_tomatoes; did you mean dataset.limit?"),
    (["dataset.answers=words"], "dataset.answers='words' must be one of classes, tokens"),
    # a value that interpolates a bad one is not a second problem
    (["fl.rounds=ten", "fl.eval_every=${fl.rounds}"], "fl.rounds='ten' must be an integer"),
]


@pytest.mark.parametrize("overrides,message", TYPED, ids=[" ".join(o) for o, _ in TYPED])
def test_a_wrong_type_range_or_key_is_named_before_anything_loads(compose_cfg, tmp_path, monkeypatch, overrides,
                                                                     message):
    import celora.run

    monkeypatch.setattr(celora.run, "build_world", lambda *a, **k: pytest.fail("data or model loaded"))
    with pytest.raises(ConfigError) as err:
        run(compose_cfg(*TINY, *overrides), run_dir=tmp_path)
    said = str(err.value)
    assert said.startswith("invalid config (1 problem):\n  - ") and message in said, said


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_without_one(compose_cfg):
    with pytest.raises(ConfigError, match="simulation.accelerator=gpu but this machine has no CUDA device"):
        build(compose_cfg(*TINY, "simulation.accelerator=gpu"))


def test_every_problem_in_one_error_before_any_work(compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"invalid config \(3 problems\)") as err:
        run(compose_cfg(*TINY, "adapter.r=0", "client.lr=-1", "fl.sample_fraction=2"), run_dir=tmp_path)
    assert all(key in str(err.value) for key in ("adapter.r", "client.lr", "fl.sample_fraction"))
    assert not (tmp_path / "partition.json").exists()  # written once the data is loaded: it never was


@pytest.mark.parametrize("overrides", [
    ["adapter=fedsa_lora", "aggregator=celora"],  # private B with personalised A: supported
    ["method=celora", "privacy=client", "privacy.mode=local"],
    ["method=centralized", "fl.max_update_norm_ratio=10", "fl.sample_fraction=0.3"],  # one pooled trainer
    ["partition=grouped", "fl.num_clients=4"],
])
def test_valid_combinations_pass(compose_cfg, overrides):
    build(compose_cfg(*TINY, *overrides))


# Problems that need the data or the model's shapes: found where those are first known, before training.
@pytest.mark.parametrize("overrides,message", [
    (["adapter.targets=[nope]"], r"adapter.targets=\['nope'\] match no module .* its linear modules are: .*query"),
    (["adapter.r=100"], r"adapter.r=100 is larger than a target layer \(64 x 64\); use adapter.r <= 64"),
    # 300 examples pass the early check (2 per client) but 270 are left for training after the global test
    (["fl.num_clients=140"], r"client \d+ got 1 example\(s\) \(a client needs >= 2 for local train and test\); "
                             r"use fewer clients"),
    (["partition=dirichlet", "partition.alpha=0.01", "partition.min_partition_size=0", "fl.num_clients=40"],
     r"client \d+ got [01] example\(s\) .* use fewer clients, a larger alpha, or a larger min_partition_size"),
])
def test_data_and_shape_problems_are_named_before_training(compose_cfg, tmp_path, monkeypatch, overrides, message):
    from celora.fl import simulation

    monkeypatch.setattr(simulation.Simulation, "run", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(ValueError, match=message):
        run(compose_cfg(*TINY, *overrides), run_dir=tmp_path)
