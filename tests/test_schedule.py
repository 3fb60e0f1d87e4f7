"""Client learning-rate schedules over rounds and gradient accumulation: the rate of every round follows the
formula, an accumulated step of k batches of b rows equals one step of k x b rows, clipping once a step."""
import json
import math

import pytest
import torch
from torch import nn

import celora.run
from celora.errors import ConfigError
from celora.fl.client import Fitting, LocalTraining, train_local
from celora.fl.config import lr_factor
from celora.run import run
from celora.tasks.classify import Classify
from celora.validate import build
from celora.world import build_world
from conftest import TINY
from tolerance import assert_deep_close, deep_approx

pytestmark = pytest.mark.usefixtures("one_thread")

C = (1 + math.cos(math.pi / 4)) / 2  # cosine over 4 rounds at p = 1/4 (and 1 - C at p = 3/4)


# -- the formula ----------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule,warmup,min_ratio,want", [
    ("constant", 0, 0.0, [1, 1, 1, 1]),
    ("constant", 2, 0.0, [0.5, 1, 1, 1]),
    ("cosine", 0, 0.0, [C, 0.5, 1 - C, 0]),  # FlowerTune's cosine over rounds: cos(pi t / T)
    ("cosine", 0, 0.1, [0.1 + 0.9 * C, 0.55, 0.1 + 0.9 * (1 - C), 0.1]),
    ("cosine", 2, 0.0, [0.5, 1, 0.5, 0]),  # after warmup p = (t - 2) / 2
    ("linear", 0, 0.0, [0.75, 0.5, 0.25, 0]),
    ("linear", 1, 0.2, [1, 0.2 + 0.8 * 2 / 3, 0.2 + 0.8 / 3, 0.2]),
    ("linear", 4, 0.0, [0.25, 0.5, 0.75, 1]),  # warmup over every round
])
def test_the_rate_of_every_round_is_the_formula(schedule, warmup, min_ratio, want):
    got = [lr_factor(t, 4, schedule, warmup, min_ratio) for t in range(1, 5)]
    assert got == pytest.approx(want, abs=1e-15)

    # round 0 (a benchmark's warm-up round; no run trains in it) is the start of the warmup, or the full rate
    assert lr_factor(0, 4, schedule, warmup, min_ratio) == (0 if warmup else 1)


def test_a_run_sets_and_logs_each_rounds_rate(compose_cfg, tmp_path, monkeypatch):
    seen = []  # the rate of every local fit's optimiser
    configure = LocalTraining.configure_optimizers

    def spy(self):
        optimizer = configure(self)
        seen.append(optimizer.param_groups[0]["lr"])
        return optimizer

    monkeypatch.setattr(LocalTraining, "configure_optimizers", spy)
    run(compose_cfg(*TINY, "fl.rounds=3", "fl.num_clients=2", "client.local_steps=1",
                    "client.lr=0.01", "client.lr_schedule=cosine", "client.lr_warmup_rounds=1",
                    "client.lr_min_ratio=0.1"), run_dir=tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    want = [0.01, 0.01 * 0.55, 0.001]  # warmup to lr at round 1, then cosine from it to 0.1 lr at round 3
    assert [r["round"] for r in rows] == [0, 1, 2, 3] and "train/lr" not in rows[0]  # round 0 trains nothing
    assert [r["train/lr"] for r in rows[1:]] == pytest.approx(want, rel=1e-15)
    assert seen == pytest.approx([w for w in want for _ in range(2)], rel=1e-15)  # both clients, each round


def test_a_bad_schedule_or_accumulation_is_named_before_anything_loads(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(celora.run, "build_world", lambda *a, **k: pytest.fail("data or model loaded"))
    for overrides, message in [
        (["client.grad_accum=0"], "client.grad_accum=0 must be an integer >= 1"),
        (["client.lr_schedule=step"], "client.lr_schedule='step' must be one of constant, cosine, linear"),
        (["client.lr_warmup_rounds=-1"], "client.lr_warmup_rounds=-1 must be an integer >= 0"),
        (["client.lr_min_ratio=2"], "client.lr_min_ratio=2 must be a number in [0, 1]"),
        (["client.lr_schedule=cosine", "client.lr=null", "client.optimizer.lr=0.01"],
         "client.lr_schedule=cosine with client.lr_warmup_rounds=0 schedules client.lr, which is null"),
    ]:
        with pytest.raises(ConfigError) as err:
            run(compose_cfg(*TINY, *overrides), run_dir=tmp_path)
        assert message in str(err.value), str(err.value)


# -- accumulation: the loop, on a linear classifier ------------------------------------------------
class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 2, dtype=torch.float64)

    def forward(self, x):
        return self.head(x)


def _batches(rows: int, size: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(rows, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (rows,), generator=g)
    return [{"x": x[s:s + size], "labels": y[s:s + size]} for s in range(0, rows, size)]


def _fit(batches: list[dict], k: int, clip: float | None, monkeypatch) -> tuple[dict, float, int]:
    torch.manual_seed(1)
    model = Linear()
    clips = []
    monkeypatch.setattr(LocalTraining, "clip", lambda self, engine, opt: clips.append(
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], self.grad_clip)))
    fitting = Fitting(Classify(), lambda params: torch.optim.SGD(params, lr=1.0), clip, grad_accum=k)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = train_local(model, list(before), batches, fitting)
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}, loss, len(clips)


def test_an_accumulated_step_is_one_step_of_all_its_rows_clipped_once(monkeypatch):
    whole, whole_loss, _ = _fit(_batches(12, 6), 1, None, monkeypatch)  # 2 steps of 6 rows
    parts, parts_loss, _ = _fit(_batches(12, 2), 3, None, monkeypatch)  # 2 steps of 3 batches of 2 rows
    for n in whole:
        assert_deep_close(parts[n], whole[n])
    assert parts_loss == deep_approx(whole_loss)
    # clipped once a step, on the accumulated gradient: SGD at lr 1 moves by it, scaled as torch's clip_grad_norm_
    # scales it to norm 1e-3 (max_norm / (norm + 1e-6)); clipping each batch's part would move it elsewhere
    grad, _, _ = _fit(_batches(6, 6), 1, None, monkeypatch)
    step, _, clips = _fit(_batches(6, 2), 3, 1e-3, monkeypatch)
    norm = torch.linalg.vector_norm(torch.cat([d.flatten() for d in grad.values()]))
    assert clips == 1 and norm > 1e-3
    for n in grad:
        assert_deep_close(step[n], grad[n] * (1e-3 / (norm + 1e-6)))


# -- accumulation end to end: classification and a causal LM, sequential and stacked ------------------
FP64 = ["model.dtype=fp64", "fl.wire_dtype=fp64", "model.dropout=0", "partition=dirichlet", "partition.alpha=0.5",
        "client.local_steps=3", "client.grad_clip=0.01"]  # a clip that binds: once a step or never the same
TASKS = {  # (overrides, b): uneven clients, so max_epochs stops some early and a stacked cohort masks them
    "classify": ([*TINY, "fl.num_clients=4", "fl.sample_fraction=0.75", "client.max_epochs=0.4"], 4),
    "instruct": (["+debug=tiny_llm", "client.max_epochs=0.5"], 2),
}


def _round_one(compose_cfg, *overrides):
    """Round 1's local fits of the sampled clients: (client -> (loss, trained tensors), their local steps)."""
    cfg = compose_cfg(*overrides)
    sim = build_world(cfg, build(cfg)).simulation()
    sampled = sim.sample()
    sent = {i: sim.downlink(i) for i in sampled}
    trained, failed = sim.train_sampled(1, sampled, sent, {i: p.unpack() for i, p in sent.items()})
    assert not failed, failed
    return trained, [sim.local_steps(i) for i in sampled]


@pytest.mark.parametrize("simulation", ["sequential", "parallel"])
@pytest.mark.parametrize("task", sorted(TASKS))
def test_accumulated_steps_equal_steps_of_all_their_rows(compose_cfg, task, simulation):
    overrides, b = TASKS[task]
    common = [*overrides, *FP64, f"simulation={simulation}"]
    whole, steps = _round_one(compose_cfg, *common, f"client.batch_size={2 * b}")
    parts, same_steps = _round_one(compose_cfg, *common, f"client.batch_size={b}", "client.grad_accum=2")
    assert steps == same_steps and len(set(steps)) > 1, steps  # a step of 2 x b rows either way; some stop early
    assert sorted(parts) == sorted(whole)
    for i, (loss, state) in whole.items():
        assert parts[i][0] == deep_approx(loss)
        for n, t in state.items():
            assert t.dtype == torch.float64
            assert_deep_close(parts[i][1][n], t)
