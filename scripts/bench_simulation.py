"""Train throughput and peak memory: sequential vs parallel simulation vs centralized, as a markdown table;
or, with several --clients, seconds per round (train, server, evaluation) and peak memory as clients grow.

    .venv/bin/python -m scripts.bench_simulation          # from the repo root: tiny_bert and minilm on the CPU
    .venv/bin/python -m scripts.bench_simulation --accelerator gpu --precisions 32-true bf16-mixed \
        --models minilm smollm2 --clients 32 --cohorts 1 8 32 all
    .venv/bin/python -m scripts.bench_simulation --models smollm2 --clients 4 --cohorts 2 all --batch 4 --steps 2
    .venv/bin/python -m scripts.bench_simulation --clients 10,100,1000 --per-round 10   # the scaling table
    .venv/bin/python -m scripts.bench_simulation --flower   # FedIT: celora sequential, parallel, and in Flower

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
CAUSAL_DATA = ["dataset=rt_instruct", "task=instruct"]


def measure(model: str, mode: str, cohort: str, clients: int, steps: int, batch: int, rounds: int,
            accelerator: str, precision: str = "32-true") -> dict:
    """Builds the run's objects as celora.run does, then times `rounds` training rounds after a warm-up one."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from celora.adapters import inject
    from celora.data import load
    from celora.fl.client import set_trainable
    from celora.fl.config import FLConfig
    from celora.fl.setup import Method, RunData
    from celora.schema import make
    from celora.seeds import FROZEN_FACTORS, derive_seed
    from celora.fl.wire import Exchange

    central = mode == "centralized"
    overrides = [
        f"model={model}", "partition=iid", f"fl.num_clients={clients}", f"dataset.limit={clients * 100}",
        f"client.local_steps={steps}", "logger=none", "simulation.progress=false",
        f"simulation.accelerator={accelerator}", f"simulation.precision={precision}",
        # centralized: one trainer on the pooled data, a round of `steps` batches of N x b
        f"client.batch_size={batch * clients if central else batch}",
        f"fl.sample_fraction={1 / clients if central else 1.0}",
        f"aggregator={'centralized' if central else 'fedavg'}",
        f"simulation={'parallel' if mode == 'parallel' else 'sequential'}",
        *([f"simulation.cohort_size={cohort}"] if mode == "parallel" else []),
        *(CAUSAL_DATA if model in CAUSAL else []),
    ]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    torch.manual_seed(cfg.seed)
    backbone = make(cfg.model)
    data = load(make(cfg.dataset), backbone.data_args(), cfg.seed)
    splits = instantiate(cfg.partition).split(data.train, clients, cfg.seed)
    net = backbone.classifier(data.num_classes, seed=cfg.seed)
    adapter = instantiate(cfg.adapter)
    inject(net, adapter, adapter.targets or backbone.default_targets, seed=derive_seed(cfg.seed, FROZEN_FACTORS))
    aggregator = instantiate(cfg.aggregator)
    client = instantiate(cfg.client)
    fl = FLConfig(num_clients=clients, rounds=rounds + 1, sample_fraction=cfg.fl.sample_fraction)
    method = Method(net, Exchange.of(net, adapter, aggregator.communicates), aggregator, make(cfg.task))
    rows = RunData(data.encoded("train"), data.encoded("test"), splits, backbone.collate(), data.num_classes)
    sim = instantiate(cfg.simulation)(method, rows, fl, client, cfg.seed)
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
    """One row per setting; the ratios are to the sequential and centralized rows of the same model, device
    and precision, measured in the same run."""
    lines = ["| model | device | precision | setting | samples/s | tokens/s | peak memory (MB) | x sequential | "
             "x centralized |", "|---|---|---|---|---|---|---|---|---|"]
    for group in dict.fromkeys((r["model"], r["accelerator"], r["precision"]) for r in results):
        rows = [r for r in results if (r["model"], r["accelerator"], r["precision"]) == group]
        seq = next(r["samples_per_s"] for r in rows if r["mode"] == "sequential")
        cen = next(r["samples_per_s"] for r in rows if r["mode"] == "centralized")
        for r in rows:
            name = r["mode"] + (f" K={r['cohort']}" if r["mode"] == "parallel" else "")
            tokens = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "-"  # images have no tokens
            lines.append(f"| {r['model']} | {r['accelerator']} | {r['precision']} | {name} | {r['samples_per_s']:.0f} | "
                         f"{tokens} | {r['peak_mb']:.0f} | {r['samples_per_s'] / seq:.2f} | "
                         f"{r['samples_per_s'] / cen:.2f} |")
    return "\n".join(lines)


def scale(model: str, clients: int, per_round: int, rounds: int, steps: int, batch: int, method: str,
          eval_clients: str, accelerator: str, precision: str, limit: int | None = None) -> dict:
    """One whole run (celora.run) of `clients` IID clients, `per_round` of them a round, every round evaluated
    (personal evaluation of `eval_clients`); its rows' time breakdown, averaged over rounds 1.., and round 0."""
    import tempfile

    from hydra import compose, initialize_config_dir

    from celora.run import run

    overrides = [
        f"model={model}", "partition=iid", f"fl.num_clients={clients}", f"fl.sample_fraction={per_round / clients}",
        f"dataset.limit={'null' if limit is None else limit}", f"fl.rounds={rounds}", "fl.eval_every=1", f"fl.eval_clients={eval_clients}",
        f"client.local_steps={steps}", f"client.batch_size={batch}", "logger=none", "simulation.progress=false",
        f"simulation.accelerator={accelerator}", f"simulation.precision={precision}", f"method={method}",
        *(CAUSAL_DATA if model in CAUSAL else []),
    ]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    with tempfile.TemporaryDirectory() as out:
        run(cfg, run_dir=out)
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    later = rows[1:]
    mean = lambda key: sum(r[key] for r in later) / len(later)  # noqa: E731
    return {"round_s": mean("time/round_s"), "train_s": mean("time/train_s"), "server_s": mean("time/server_s"),
            "eval_s": mean("time/eval_s"), "round0_s": rows[0]["time/round_s"],
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def scale_table(results: list[dict]) -> str:
    first = results[0]
    lines = ["| clients | per round | s / round | train | server | evaluation | round 0 (s) | peak RSS (MB) | "
             f"x {first['clients']} clients |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['clients']} | {r['per_round']} | {r['round_s']:.2f} | {r['train_s']:.2f} | "
                     f"{r['server_s']:.3f} | {r['eval_s']:.2f} | {r['round0_s']:.1f} | {r['peak_mb']:.0f} | "
                     f"{r['round_s'] / first['round_s']:.2f} |")
    return "\n".join(lines)


# FedIT (LoRA r = 8 on query + value) on MiniLM-L6: 10 clients, 5 a round, 10 local steps of batch 16; evaluated at
# round 0 and at the last round only, so the difference of two round counts leaves training rounds alone.
FEDIT = ["model=minilm", "method=lora", "adapter.r=8", "fl.num_clients=10", "fl.sample_fraction=0.5",
         "client.local_steps=10", "client.batch_size=16", "dataset.limit=2000", "fl.eval_every=1000",
         "logger=none", "simulation.progress=false"]
ENGINES = {  # name -> command (before the overrides)
    "celora sequential": ["-m", "celora", "simulation=sequential"],
    "celora parallel (K=all)": ["-m", "celora", "simulation=parallel"],
    "Flower, num_cpus=2 (1 actor)": ["-m", "celora.flower", "flower.client_resources.num_cpus=2"],
    "Flower, num_cpus=1 (2 actors)": ["-m", "celora.flower", "flower.client_resources.num_cpus=1"],
}


def whole_run(command: list[str], rounds: int, out: str) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB of the whole process tree, Ray's workers included) of one run."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *command, *FEDIT, f"fl.rounds={rounds}", f"hydra.run.dir={out}"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    peak, root = 0, psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]  # Ray's GCS, raylet and workers descend from the driver
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.2)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{command} {rounds} rounds failed:\n{proc.stderr.read()[-3000:]}")
    return seconds, peak / 2**20


def flower_bench(low: int, high: int) -> str:
    """Seconds per round of each engine: (T(high rounds) - T(low rounds)) / (high - low), start-up and the two
    evaluations cancelling; peak memory of the longer run; ratios to celora sequential, all in this run."""
    import tempfile

    rows = []
    for name, command in ENGINES.items():
        with tempfile.TemporaryDirectory() as out:
            t_low, _ = whole_run(command, low, f"{out}/low")
            t_high, peak = whole_run(command, high, f"{out}/high")
            summary = json.loads((Path(out) / "high" / "summary.json").read_text())
        rows.append((name, (t_high - t_low) / (high - low), t_low, peak, summary["last"].get("global/acc")))
        print(f"{name}: {rows[-1][1]:.2f} s a round", file=sys.stderr)
    seq = rows[0][1]
    lines = [f"| engine | s / round | whole run of {low} round(s) (s) | peak memory (MB) | global/acc after {high} | "
             "x celora sequential (speed) |", "|---|---|---|---|---|---|"]
    for name, per_round, t_low, peak, acc in rows:
        lines.append(f"| {name} | {per_round:.2f} | {t_low:.1f} | {peak:.0f} | {acc:.4f} | {seq / per_round:.2f} |")
    return "\n".join(lines)


def _child(kind: str, setting: dict) -> dict:
    """Measures one setting in a process of its own (so its peak memory is its own)."""
    out = subprocess.run([sys.executable, "-m", "scripts.bench_simulation", f"--{kind}", json.dumps(setting)],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        sys.exit(f"{setting} failed:\n{out.stderr[-3000:]}")
    return {**setting, **json.loads(out.stdout.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny_bert", "minilm"])
    ap.add_argument("--clients", default="32", help="N (the throughput table), or N1,N2,... (the scaling table)")
    ap.add_argument("--cohorts", nargs="+", default=["1", "4", "8", "16", "all"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 2], help="local steps per model (last repeats)")
    ap.add_argument("--rounds", type=int, default=1, help="timed rounds after the warm-up one (scaling: rounds)")
    ap.add_argument("--accelerator", nargs="+", default=["cpu"], help="devices to measure: cpu, gpu, auto")
    ap.add_argument("--precisions", nargs="+", default=["32-true"], help="32-true, bf16-mixed, 16-mixed")
    ap.add_argument("--per-round", type=int, default=10, help="scaling: clients sampled a round")
    ap.add_argument("--method", default="lora", help="scaling: the method preset (conf/method: lora, celora, ...)")
    ap.add_argument("--eval-clients", default="all", help="scaling: fl.eval_clients")
    ap.add_argument("--limit", type=int, help="scaling: dataset.limit (default: the whole dataset)")
    ap.add_argument("--flower", action="store_true", help="FedIT on MiniLM: celora sequential, parallel and Flower")
    ap.add_argument("--flower-rounds", type=int, nargs=2, default=[1, 3], help="--flower: the two round counts")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a JSON setting measured in this process
    ap.add_argument("--scale-one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(**json.loads(args.one))))
        return
    if args.scale_one:
        one = json.loads(args.scale_one)
        print(json.dumps(scale(**one)))
        return
    if args.flower:
        print(flower_bench(*args.flower_rounds))
        return
    counts = [int(n) for n in args.clients.split(",")]
    if len(counts) > 1:
        results = []
        for n in counts:
            one = dict(model=args.models[0], clients=n, per_round=args.per_round, rounds=args.rounds,
                       steps=args.steps[0], batch=args.batch, method=args.method, eval_clients=args.eval_clients,
                       accelerator=args.accelerator[0], precision=args.precisions[0], limit=args.limit)
            results.append(_child("scale-one", one))
            print(f"{n} clients: {results[-1]['round_s']:.2f} s a round", file=sys.stderr)
        print(scale_table(results))
        return
    results = []
    for m, model in enumerate(args.models):
        steps = args.steps[min(m, len(args.steps) - 1)]
        settings = [("sequential", "")] + [("parallel", k) for k in args.cohorts] + [("centralized", "")]
        for accelerator in args.accelerator:
            for precision in args.precisions:
                for mode, cohort in settings:
                    one = dict(model=model, mode=mode, cohort=cohort, clients=counts[0], steps=steps,
                               batch=args.batch, rounds=args.rounds, accelerator=accelerator, precision=precision)
                    results.append(_child("one", one))
                    print(f"{model} {accelerator} {precision} {mode} {cohort}: "
                          f"{results[-1]['samples_per_s']:.0f} samples/s", file=sys.stderr)
    print(table(results))


if __name__ == "__main__":
    main()
