"""The run's one device and precision: the model never moves after placement, one Fabric per run, bf16."""
import json

import lightning as L
import lightning.pytorch
import pytest
import torch
from torch import nn

from celora.fl import engine as engine_module
from celora.fl.engine import Engine, check_engine
from celora.run import run
from conftest import TINY
from tolerance import unit_roundoff

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


class Moves:
    """Records every nn.Module.to / .cpu / .cuda call made after the engine placed the model."""

    def __init__(self, monkeypatch):
        self.calls, self.placed, self.fabrics = [], 0, 0
        for name in ("to", "cpu", "cuda"):
            original = getattr(nn.Module, name)

            def patched(module, *args, _original=original, _name=name, **kwargs):
                if self.placed:
                    self.calls.append((type(module).__name__, _name, args, kwargs))
                return _original(module, *args, **kwargs)

            monkeypatch.setattr(nn.Module, name, patched)
        place = Engine.place

        def placing(engine, model):
            out = place(engine, model)
            self.placed += 1
            return out

        monkeypatch.setattr(Engine, "place", placing)
        init = L.Fabric.__init__

        def counting(fabric, *args, **kwargs):
            self.fabrics += 1
            init(fabric, *args, **kwargs)

        monkeypatch.setattr(L.Fabric, "__init__", counting)

        def no_trainer(*args, **kwargs):
            raise AssertionError("a Lightning Trainer was made: each fit would set up again and move the model")

        monkeypatch.setattr(lightning.pytorch.Trainer, "__init__", no_trainer)


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh)")


@pytest.mark.parametrize("accelerator", ["cpu", pytest.param("gpu", marks=GPU)])
@pytest.mark.parametrize("simulation", ["sequential", "parallel"])
def test_model_stays_on_its_device_and_one_fabric_serves_the_run(compose_cfg, tmp_path, monkeypatch, simulation,
                                                                 accelerator):
    """Placed once, never moved again (Lightning's Trainer teardown used to call .cpu() after every fit), by
    one Fabric for training, data statistics (celora) and evaluation of every client of every round."""
    moves = Moves(monkeypatch)
    seen = {}
    from celora.fl.simulation import Simulation

    original_run = Simulation.run

    def run_and_look(sim, *args, **kwargs):
        before = {n: p.data_ptr() for n, p in sim.model.named_parameters()}
        out = original_run(sim, *args, **kwargs)
        seen["devices"] = {p.device for p in sim.model.parameters()}
        seen["engine"] = sim.engine.device
        seen["same_storage"] = all(before[n] == p.data_ptr() for n, p in sim.model.named_parameters())
        return out

    monkeypatch.setattr(Simulation, "run", run_and_look)
    run(compose_cfg(*TINY, f"simulation={simulation}", "aggregator=celora", "fl.num_clients=4",
                    f"simulation.accelerator={accelerator}"), run_dir=tmp_path)
    assert moves.placed == 1 and moves.fabrics == 1
    assert moves.calls == []
    assert seen["devices"] == {seen["engine"]} and seen["same_storage"]
    assert seen["engine"].type == ("cuda" if accelerator == "gpu" else "cpu")
    assert len(_rows(tmp_path)) == 3  # rounds 0, 1, 2: 8 client fits and 12 personal evaluations on one Fabric


def test_engine_names_and_machine_are_checked():
    with pytest.raises(ValueError, match="simulation.precision='fp16' must be one of"):
        check_engine("cpu", "fp16")
    with pytest.raises(ValueError, match="simulation.accelerator='tpu' must be one of"):
        check_engine("tpu", "32-true")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="16-mixed needs a CUDA device.*bf16-mixed"):
            check_engine("cpu", "16-mixed")
        with pytest.raises(ValueError, match="no CUDA device"):
            check_engine("gpu", "32-true")


def test_config_errors_name_precision(compose_cfg, tmp_path):
    from celora.validate import ConfigError, build

    with pytest.raises(ConfigError, match="simulation.precision='bf16' must be one of"):
        build(compose_cfg(*TINY, "simulation.precision=bf16"))


def _bf16_bound(model: nn.Module) -> float:
    """First-order relative error of a forward pass under bf16 autocast: each matmul rounds its inputs to bf16
    (relative u each) and accumulates in fp32, and LayerNorm (kept in fp32 by autocast) renormalises each
    block, so the errors of the m matmuls along the path add up with unit amplification: m u. m counts
    every nn.Linear and convolution (adapter factors are separate matmuls inside AdapterLayer: 3 more each) and the two
    attention matmuls of every layer."""
    linears = sum(isinstance(m, nn.Linear | nn.Conv2d) for m in model.modules())
    adapters = sum(type(m).__name__ == "AdapterLayer" for m in model.modules())
    layers = model.backbone.config.num_hidden_layers
    return (linears + 3 * adapters + 2 * layers) * unit_roundoff(torch.bfloat16)


def test_bf16_mixed_forward_is_within_the_bf16_bound_and_flips_only_near_ties(compose_cfg):
    from hydra.utils import instantiate

    from celora.adapters import inject
    from celora.data import load
    from celora.data.batches import eval_batches
    from celora.schema import make

    cfg = compose_cfg(*TINY, "adapter=tri", "model.dropout=0")
    backbone = make(cfg.model)
    data = load(make(cfg.dataset), backbone.data_args(), 0)
    model = backbone.classifier(data.num_classes, seed=0)
    inject(model, instantiate(cfg.adapter), backbone.default_targets, seed=1)
    with torch.no_grad():  # C = 0 at init would leave the adapter path out of the comparison
        for name, p in model.named_parameters():
            if name.endswith("lora_C"):
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    model.eval()
    test = data.encoded("test")
    batch = next(iter(eval_batches(test, range(len(test)), len(test), backbone.collate())))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    seen = []
    handles = [m.register_forward_hook(lambda mod, i, o: seen.append(o.dtype))
               for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        fp32 = model(**inputs)
        assert set(seen) == {torch.float32}
        seen.clear()
        with Engine("cpu", "bf16-mixed").autocast():
            bf16 = model(**inputs).float()
    for h in handles:
        h.remove()
    assert set(seen) == {torch.bfloat16}, "autocast must run every linear map in bf16"
    err = (bf16 - fp32).abs().max()
    bound = _bf16_bound(model) * fp32.abs().max()
    assert err <= bound, (err, bound)
    assert err > 0  # bf16 did compute something else
    # accuracy can change only on rows whose fp32 margin is within twice the bound of a tie
    margin = (fp32[:, 1] - fp32[:, 0]).abs()
    flipped = fp32.argmax(1) != bf16.argmax(1)
    assert torch.all(margin[flipped] <= 2 * bound)


def test_bf16_mixed_run_tracks_fp32_within_the_bound(compose_cfg, tmp_path, monkeypatch):
    """End to end (tiny_vit on digits, which a tiny random model learns): bf16-mixed trains as fp32 does.

    - Updates: each client's first-round update (upload minus what it received) within m u of fp32's
      update in norm. Plain SGD, whose update is lr times the sum of the step gradients, so it carries
      the gradients' relative error (the forward bound m u, to first order) unamplified; AdamW divides
      by sqrt(v), which amplifies the relative error of near-zero gradients without bound. An update that
      bf16 failed to make (or made wrong) is off by its whole norm. (Measured: 0.006 to 0.008 of the norm,
      against m u = 0.12.)
    - Losses: every evaluated loss within 2 m u max|logit| of fp32's: cross-entropy moves by at most
      2 max_c |d logit_c| (its gradient in the logits is p - onehot, of L1 norm <= 2), and a logit by at
      most the forward bound (max|logit| is the largest the fp32 run scored, recorded here)."""
    from celora.fl.aggregators import FedAvg
    from celora.tasks import classify

    largest, updates = [0.0], {}
    widened, aggregate = classify.widened, FedAvg.__call__

    def recording(logits):
        largest[0] = max(largest[0], float(logits.abs().max()))
        return widened(logits)

    def keep_updates(key):
        def call(agg, uploads, sizes, received=None):
            updates.setdefault(key, {i: torch.cat([(u[n] - received[i][n]).flatten() for n in sorted(u)])
                                     for i, u in uploads.items()})
            return aggregate(agg, uploads, sizes, received)
        return call

    common = (*TINY, "model=tiny_vit", "dataset=digits", "model.dropout=0", "client.optimizer._target_=torch.optim.SGD",
              "~client.optimizer.weight_decay", "client.lr=0.5", "client.local_steps=10", "fl.rounds=3",
              "fl.eval_every=3")
    monkeypatch.setattr(classify, "widened", recording)
    monkeypatch.setattr(FedAvg, "__call__", keep_updates("fp32"))
    run(compose_cfg(*common), run_dir=tmp_path / "fp32")
    monkeypatch.setattr(classify, "widened", widened)
    monkeypatch.setattr(FedAvg, "__call__", keep_updates("bf16"))
    run(compose_cfg(*common, "simulation.precision=bf16-mixed"), run_dir=tmp_path / "bf16")
    fp32, bf16 = _rows(tmp_path / "fp32"), _rows(tmp_path / "bf16")
    from hydra.utils import instantiate

    from celora.adapters import inject
    from celora.schema import make

    cfg = compose_cfg(*common)
    backbone = make(cfg.model)
    model = backbone.classifier(10, seed=0)
    inject(model, instantiate(cfg.adapter), backbone.default_targets, seed=1)
    rel = _bf16_bound(model)
    for i, ours in updates["fp32"].items():
        assert (updates["bf16"][i] - ours).norm() <= rel * ours.norm(), i
    bound = 2 * rel * largest[0]
    for a, b in zip(fp32, bf16):
        for key in ("global/loss", "personal/loss"):
            assert abs(a[key] - b[key]) <= bound, (a["round"], key, a[key], b[key], bound)
    assert fp32[-1]["global/loss"] < fp32[0]["global/loss"] and bf16[-1]["global/loss"] < bf16[0]["global/loss"]
    # the uploads, the wire and the client tensors keep fp32 under bf16-mixed: the same bytes
    assert [r["comm/up_bytes"] for r in fp32] == [r["comm/up_bytes"] for r in bf16]


def test_bf16_backbone_keeps_client_tensors_in_fp32(compose_cfg, tmp_path, monkeypatch):
    """model.dtype=bf16 holds the frozen backbone in bf16; adapter factors and the head stay fp32, so what is
    trained and what is sent (fl.wire_dtype=fp32) are unchanged in size."""
    from celora.fl.simulation import Simulation

    seen = {}
    original = Simulation.run

    def look(sim, *args, **kwargs):
        out = original(sim, *args, **kwargs)
        params = dict(sim.model.named_parameters())
        seen["client"] = {params[n].dtype for n in sim.exchange.trainable}
        seen["frozen"] = {p.dtype for n, p in params.items() if n not in sim.exchange.trainable and "lora_" not in n}
        seen["global"] = {t.dtype for t in sim.global_state.values()}
        return out

    monkeypatch.setattr(Simulation, "run", look)
    run(compose_cfg(*TINY, "model.dtype=bf16", "simulation.precision=bf16-mixed", "adapter=tri"), run_dir=tmp_path)
    assert seen == {"client": {torch.float32}, "frozen": {torch.bfloat16}, "global": {torch.float32}}
    rows = _rows(tmp_path)
    assert all(r["personal/loss"] == r["personal/loss"] for r in rows)  # finite, not NaN


def test_engine_module_defaults_to_a_cpu_fp32_engine():
    e = Engine()
    assert e.device == torch.device("cpu") and e.precision == "32-true"
    assert engine_module.autocast(None).__class__.__name__ == "nullcontext"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine auto picks the GPU: the CPU case is this one")
def test_auto_is_the_cpu_here_names_it_and_keeps_every_number(compose_cfg, tmp_path, caplog):
    """simulation.accelerator=auto, the default, on a machine without a GPU: the log names the CPU, the metrics
    equal accelerator=cpu's, and both are the same run (the kept runs of docs/results, made with cpu, stay
    finished: their config is what auto resolves to here)."""
    import logging

    from celora.run import result_config

    with caplog.at_level(logging.INFO, logger="celora"):
        run(compose_cfg(*TINY, "simulation.accelerator=auto"), run_dir=tmp_path / "auto")
    assert "device cpu, precision 32-true (simulation.accelerator=auto)" in caplog.text
    run(compose_cfg(*TINY, "simulation.accelerator=cpu"), run_dir=tmp_path / "cpu")
    rows = [[{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
             for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("auto", "cpu")]
    assert rows[0] == rows[1]
    assert result_config(compose_cfg(*TINY)) == result_config(compose_cfg(*TINY, "simulation.accelerator=cpu"))
    assert compose_cfg(*TINY).simulation.accelerator == "auto"  # the default
