"""Train throughput and peak memory: sequential vs parallel simulation vs centralized, as a markdown table.

    .venv/bin/python -m scripts.bench_simulation          # from the repo root: tiny_bert and minilm on the CPU
    .venv/bin/python -m scripts.bench_simulation --accelerator gpu --clients 64 --cohorts 1 4 8 16 32 all
    .venv/bin/python -m scripts.bench_simulation --models smollm2 --clients 4 --cohorts 2 all --batch 4 --steps 2

Every setting runs in its own process (so its peak memory is its own) on the same samples: N clients
(IID, all sampled every round) x `steps` local steps x batch b. Centralized trains one model on the
pooled data at the same total batch N x b for the same number of steps. One warm-up round is not timed.
A causal LM (smollm2, tiny_llama, hf_causal_lm) trains on dataset=rt_instruct with task=instruct; tokens/s
counts the input tokens of local training (prompt and answer, padding not counted).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
CAUSAL = ("smollm2", "tiny_llama", "hf_causal_lm")  # trained on instruction data


def measure(model: str, mode: str, cohort: str, clients: int, steps: int, batch: int, rounds: int,
            accelerator: str) -> dict:
    """Builds the run's objects as celora.run does, then times `rounds` training rounds after a warm-up one."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from celora.adapters import inject
    from celora.data import load
    from celora.fl.client import set_trainable
    from celora.fl.config import FLConfig
    from celora.seeds import FROZEN_FACTORS, derive_seed
    from celora.fl.wire import Exchange

    central = mode == "centralized"
    overrides = [
        f"model={model}", "partition=iid", f"fl.num_clients={clients}", f"dataset.limit={clients * 100}",
        f"client.local_steps={steps}", "logger=none", "simulation.progress=false",
        f"simulation.accelerator={accelerator}",
        # centralized: one trainer on the pooled data, a round of `steps` batches of N x b
        f"client.batch_size={batch * clients if central else batch}",
        f"fl.sample_fraction={1 / clients if central else 1.0}",
        f"aggregator={'centralized' if central else 'fedavg'}",
        f"simulation={'parallel' if mode == 'parallel' else 'sequential'}",
        *([f"simulation.cohort_size={cohort}"] if mode == "parallel" else []),
        *(["dataset=rt_instruct", "task=instruct"] if model in CAUSAL else []),
    ]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    torch.manual_seed(cfg.seed)
    backbone = instantiate(cfg.model)
    data = load(instantiate(cfg.dataset), backbone.data_args(), cfg.seed)
    splits = instantiate(cfg.partition).split(data.train, clients, cfg.seed)
    net = backbone.classifier(data.num_classes, seed=cfg.seed)
    adapter = instantiate(cfg.adapter)
    inject(net, adapter, adapter.targets or backbone.default_targets, seed=derive_seed(cfg.seed, FROZEN_FACTORS))
    aggregator = instantiate(cfg.aggregator)
    client = instantiate(cfg.client)
    fl = FLConfig(num_clients=clients, rounds=rounds + 1, sample_fraction=cfg.fl.sample_fraction)
    sim = instantiate(cfg.simulation)(
        model=net, exchange=Exchange.of(net, adapter, aggregator.communicates), aggregator=aggregator,
        train=data.encoded("train"), test=data.encoded("test"), splits=splits, fl=fl, client=client,
        seed=cfg.seed, collate=backbone.collate(), task=instantiate(cfg.task))
    set_trainable(net, sim.exchange.trainable)
    cuda = accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available())
    sim.train_round(0)  # warm-up
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    tokens = sum(sim.train_round(rnd).get("train/tokens", 0) for rnd in range(1, rounds + 1))
    seconds = time.perf_counter() - t0
    samples = rounds * clients * batch * steps
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds, "peak_mb": peak / 2**20,
            "samples": samples}


def table(results: list[dict]) -> str:
    lines = ["| model | setting | samples/s | tokens/s | peak memory (MB) | x sequential | x centralized |",
             "|---|---|---|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == model]
        seq = next(r["samples_per_s"] for r in rows if r["mode"] == "sequential")
        cen = next(r["samples_per_s"] for r in rows if r["mode"] == "centralized")
        for r in rows:
            name = r["mode"] + (f" K={r['cohort']}" if r["mode"] == "parallel" else "")
            tokens = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "-"  # images have no tokens
            lines.append(f"| {model} | {name} | {r['samples_per_s']:.0f} | {tokens} | {r['peak_mb']:.0f} | "
                         f"{r['samples_per_s'] / seq:.2f} | {r['samples_per_s'] / cen:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny_bert", "minilm"])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--cohorts", nargs="+", default=["1", "4", "8", "16", "all"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 2], help="local steps per model (last repeats)")
    ap.add_argument("--rounds", type=int, default=1, help="timed rounds after the warm-up one")
    ap.add_argument("--accelerator", default="cpu")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a JSON setting measured in this process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(**json.loads(args.one))))
        return
    results = []
    for m, model in enumerate(args.models):
        steps = args.steps[min(m, len(args.steps) - 1)]
        settings = [("sequential", "")] + [("parallel", k) for k in args.cohorts] + [("centralized", "")]
        for mode, cohort in settings:
            one = dict(model=model, mode=mode, cohort=cohort, clients=args.clients, steps=steps, batch=args.batch,
                       rounds=args.rounds, accelerator=args.accelerator)
            out = subprocess.run([sys.executable, "-m", "scripts.bench_simulation", "--one", json.dumps(one)],
                                 capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                sys.exit(f"{model} {mode} {cohort} failed:\n{out.stderr[-3000:]}")
            results.append({**one, **json.loads(out.stdout.strip().splitlines()[-1])})
            print(f"{model} {mode} {cohort}: {results[-1]['samples_per_s']:.0f} samples/s", file=sys.stderr)
    print(table(results))


if __name__ == "__main__":
    main()
