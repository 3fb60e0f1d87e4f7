"""Which uploads give a client's batch away: gradient inversion against each victim x defence x batch size."""
from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from celora.adapters import AdapterConfig, inject
from celora.data import load
from celora.fl.engine import Engine
from celora.fl.wire import Exchange
from celora.plots import grouped_bars
from celora.privacy.attack import local_update
from celora.schema import make

log = logging.getLogger("celora.attack")


def seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def victim(base: nn.Module, adapter: AdapterConfig | None, targets: list[str], seed: int):
    """(model, trained names, uploaded names); no adapter means full fine-tuning: everything trained and sent."""
    model = copy.deepcopy(base).eval().requires_grad_(False)
    if adapter is None:
        names = [n for n, _ in model.named_parameters()]
        return model, names, names
    inject(model, adapter, adapter.targets or targets, seed=seed)
    exchange = Exchange.of(model, adapter)
    return model, list(exchange.trainable), list(exchange.shared)


def pick_batches(pool: np.ndarray, batch_sizes, num_batches: int, seed: int) -> dict:
    """Seeded disjoint batches of example indices per batch size, drawn from `pool`."""
    pool = np.random.default_rng(seed).permutation(pool)
    out, start = {}, 0
    for bs in batch_sizes:
        out[bs] = [pool[start + k * bs: start + (k + 1) * bs].tolist() for k in range(num_batches)]
        start += bs * num_batches
    if start > len(pool):
        raise ValueError(f"{len(pool)} eligible test examples cannot fill {num_batches} batch(es) of each size "
                         f"{list(batch_sizes)}; lower num_batches or batch_sizes")
    return out


def selected(specs, only: list[str]) -> dict:
    """The entries of `specs` that `only` names; all of them when it names none of them."""
    picked = {name: spec for name, spec in specs.items() if name in only}
    return picked or dict(specs)


def table(rows: list[dict], batch_sizes, metrics) -> str:
    """Markdown: mean scores per victim and defence, one column per metric and batch size."""
    head = "| upload | defence | values sent | epsilon (one upload) | " + " | ".join(
        f"{m} (B={b})" for b in batch_sizes for m in metrics) + " |"
    lines = [head, "|" + "---|" * (4 + len(metrics) * len(batch_sizes))]
    for key in dict.fromkeys((r["victim"], r["defence"]) for r in rows):
        mine = [r for r in rows if (r["victim"], r["defence"]) == key]
        eps = mine[0]["epsilon"]
        cells = [f"{np.mean([r[m] for r in mine if r['batch_size'] == b]):.2f}" for b in batch_sizes for m in metrics]
        eps_s = "-" if eps is None else f"{eps:.3g}"
        lines.append(f"| {key[0]} | {key[1]} | {mine[0]['values']:,} | {eps_s} | " + " | ".join(cells) + " |")
    if rows and all(f"{m}_flat" in rows[0] for m in metrics):  # what a guess without any upload scores
        cells = [f"{np.mean([r[m + '_flat'] for r in rows if r['batch_size'] == b]):.2f}"
                 for b in batch_sizes for m in metrics]
        lines.append("| (flat image at the batch's mean: no upload) | - | 0 | - | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare(cfg: DictConfig, out: Path) -> list[dict]:
    """Attacks every victim x defence on the same batches; writes results.jsonl, table.md, scores.png and what
    a person looks at (texts.md, or reconstructions_b<B>.png for images)."""
    torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    backbone = make(cfg.model)
    data = load(make(cfg.dataset), backbone.data_args(), cfg.seed)
    case = instantiate(cfg.attack)  # the attack and what belongs to its modality (celora.privacy.cases)
    base = backbone.classifier(data.num_classes, seed=cfg.seed, label_names=data.label_names)
    engine = Engine(cfg.get("accelerator", "cpu"))  # the attack runs where the simulation would: one device
    engine.place(base)
    collate, test = backbone.collate(), data.encoded("test")
    batches = pick_batches(case.eligible(test), cfg.batch_sizes, cfg.num_batches, seed_of(cfg.seed, 7))
    steps, lr = cfg.client.local_steps, cfg.client.lr
    rows, outcomes = [], []
    only = list(cfg.get("only") or ())
    unknown = set(only) - set(cfg.victims) - set(cfg.defences)
    if unknown:
        raise ValueError(f"only={sorted(unknown)} names no victim ({list(cfg.victims)}) or defence "
                         f"({list(cfg.defences)})")
    victims, defences = selected(cfg.victims, only), selected(cfg.defences, only)
    for vname, vspec in victims.items():
        model, trained, uploaded = victim(base, instantiate(vspec) if vspec is not None else None,
                                          backbone.default_targets, seed_of(cfg.seed, 2))
        start = {n: p.detach().clone() for n, p in model.named_parameters() if n in uploaded}
        for dname, dspec in defences.items():
            for bs, chosen in batches.items():
                for k, idx in enumerate(chosen):
                    t0 = time.perf_counter()
                    batch = engine.to_device(collate([test[i] for i in idx]))
                    inputs = {n: v for n, v in batch.items() if n != "labels"}
                    delta = local_update(model, trained, inputs, batch["labels"], steps, lr)
                    upload = {n: start[n] + delta[n] for n in uploaded}
                    # one client, one round; local noise, so sampling amplifies nothing
                    privacy = instantiate(dspec)(sample_rate=1.0)
                    gen = torch.Generator().manual_seed(seed_of(cfg.seed, 8, bs, k))
                    # the defence acts on the upload as it leaves the client: on the host, as in the simulation
                    host = lambda state: {n: t.cpu() for n, t in state.items()}  # noqa: E731
                    sent, metrics = privacy({0: host(upload)}, {0: host(start)}, {0: bs}, gen)
                    observed = {n: sent[0][n].to(engine.device) - start[n] for n in uploaded}
                    outcome = case.on_batch(model, observed, trained, batch, data.num_classes, steps, lr, gen,
                                            backbone)
                    key = {"victim": vname, "defence": dname, "batch_size": bs, "batch": k}
                    row = {**key, "examples": idx, "values": sum(t.numel() for t in observed.values()),
                           **outcome.scores,
                           "label_acc": float(sorted(outcome.labels.tolist()) == sorted(batch["labels"].tolist())),
                           "match_loss": outcome.loss, "epsilon": metrics.get("privacy/epsilon"),
                           "update_norm": metrics.get("privacy/update_norm"), "seconds": time.perf_counter() - t0}
                    rows.append(row)
                    outcomes.append((key, outcome))
                    with open(out / "results.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
                    log.info("%s %s B=%d #%d: %s (%.0f s)", vname, dname, bs, k,
                             ", ".join(f"{m} {row[m]:.2f}" for m in case.metrics), row["seconds"])
    case.write(outcomes, out)
    (out / "table.md").write_text(table(rows, list(cfg.batch_sizes), case.metrics))
    figure(rows, case.metrics[0]).savefig(out / "scores.png", dpi=120)
    return rows


def figure(rows: list[dict], metric: str):
    """Mean `metric` per upload (cluster) and defence x batch size (bar)."""
    values: dict[str, dict[str, list]] = {}
    for r in rows:
        values.setdefault(r["victim"], {}).setdefault(f"{r['defence']}, B={r['batch_size']}", []).append(r[metric])
    means = {v: {k: float(np.mean(x)) for k, x in d.items()} for v, d in values.items()}
    label = {"f1": "token-recovery F1", "psnr": "PSNR (dB)"}.get(metric, metric)
    return grouped_bars(means, label, "what one upload gives away", ylim=(0, 1.05) if metric == "f1" else None)


@hydra.main(config_path="../conf", config_name="privacy_attack", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    out = Path(HydraConfig.get().runtime.output_dir)
    log.info("config:\n%s", OmegaConf.to_yaml(cfg))
    compare(cfg, out)
    print((out / "table.md").read_text())
    print(f"results, texts and table in {out}")


if __name__ == "__main__":
    from celora import cli

    cli.main(main, config_name="privacy_attack", program="python scripts/attack.py")  # a user's mistake in one line
