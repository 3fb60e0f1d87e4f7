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
from celora.data.batches import Collate
from celora.fl.wire import Exchange
from celora.plots import grouped_bars
from celora.privacy.attack import local_update
from celora.privacy.scores import position_accuracy, token_f1

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


def pick_batches(lengths: np.ndarray, batch_sizes, num_batches: int, max_tokens: int, seed: int) -> dict:
    """Seeded disjoint batches of example indices per batch size, among examples of at most max_tokens tokens."""
    pool = np.random.default_rng(seed).permutation(np.flatnonzero(lengths <= max_tokens))
    out, start = {}, 0
    for bs in batch_sizes:
        out[bs] = [pool[start + k * bs: start + (k + 1) * bs].tolist() for k in range(num_batches)]
        start += bs * num_batches
    return out


def table(rows: list[dict], batch_sizes) -> str:
    """Markdown: mean token F1 / position accuracy per victim and defence, one column pair per batch size."""
    head = "| upload | defence | values sent | epsilon (one upload) | " + " | ".join(
        f"F1 (B={b}) | pos. acc (B={b})" for b in batch_sizes) + " |"
    lines = [head, "|" + "---|" * (4 + 2 * len(batch_sizes))]
    for key in dict.fromkeys((r["victim"], r["defence"]) for r in rows):
        mine = [r for r in rows if (r["victim"], r["defence"]) == key]
        eps = mine[0]["epsilon"]
        cells = []
        for b in batch_sizes:
            sel = [r for r in mine if r["batch_size"] == b]
            cells += [f"{np.mean([r['f1'] for r in sel]):.2f}", f"{np.mean([r['position_acc'] for r in sel]):.2f}"]
        eps_s = "-" if eps is None else f"{eps:.3g}"
        lines.append(f"| {key[0]} | {key[1]} | {mine[0]['values']:,} | {eps_s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare(cfg: DictConfig, out: Path) -> list[dict]:
    """Attacks every victim x defence on the same batches; writes results.jsonl, texts.md and table.md."""
    torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    backbone = instantiate(cfg.model)
    tok = backbone.tokenizer
    data = instantiate(cfg.dataset)(tokenizer=tok, max_length=backbone.max_length, seed=cfg.seed)
    attack = instantiate(cfg.attack)
    base = backbone.classifier(data.num_classes, seed=cfg.seed)
    collate, special = Collate(tok.pad_token_id), torch.tensor(tok.all_special_ids)
    ids_all, labels_all = list(data.test["input_ids"]), list(data.test["label"])
    batches = pick_batches(np.array([len(x) for x in ids_all]), cfg.batch_sizes, cfg.num_batches,
                           cfg.max_tokens, seed_of(cfg.seed, 7))
    steps, lr = cfg.client.local_steps, cfg.client.lr
    rows, texts = [], ["# Reconstructions\n"]
    for vname, vspec in cfg.victims.items():
        model, trained, uploaded = victim(base, instantiate(vspec) if vspec is not None else None,
                                          backbone.default_targets, seed_of(cfg.seed, 2))
        start = {n: p.detach().clone() for n, p in model.named_parameters() if n in uploaded}
        for dname, dspec in cfg.defences.items():
            for bs, chosen in batches.items():
                for k, idx in enumerate(chosen):
                    t0 = time.perf_counter()
                    batch = collate([(ids_all[i], labels_all[i]) for i in idx])
                    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
                    delta = local_update(model, trained, inputs, batch["labels"], steps, lr)
                    upload = {n: start[n] + delta[n] for n in uploaded}
                    # one client, one round; local noise, so sampling amplifies nothing
                    privacy = instantiate(dspec)(sample_rate=1.0)
                    gen = torch.Generator().manual_seed(seed_of(cfg.seed, 8, bs, k))
                    sent, metrics = privacy({0: upload}, {0: start}, {0: bs}, gen)
                    observed = {n: sent[0][n] - start[n] for n in uploaded}
                    free = ~torch.isin(batch["input_ids"], special)
                    template = torch.where(free, tok.pad_token_id, batch["input_ids"])
                    rec = attack(model, observed, trained, template, batch["attention_mask"], free,
                                 batch["labels"], data.num_classes, steps, lr, gen)
                    truth, guess = batch["input_ids"].tolist(), rec.ids.tolist()
                    f1 = token_f1(guess, truth, tok.all_special_ids)
                    row = {"victim": vname, "defence": dname, "batch_size": bs, "batch": k, "examples": idx,
                           "values": sum(t.numel() for t in observed.values()),
                           "f1": f1["f1"], "precision": f1["precision"], "recall": f1["recall"],
                           "position_acc": position_accuracy(guess, truth, tok.all_special_ids),
                           "label_acc": float(sorted(rec.labels.tolist()) == sorted(batch["labels"].tolist())),
                           "match_loss": rec.loss, "candidates": rec.candidates,
                           "epsilon": metrics.get("privacy/epsilon"),
                           "update_norm": metrics.get("privacy/update_norm"),
                           "seconds": time.perf_counter() - t0}
                    rows.append(row)
                    with open(out / "results.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
                    log.info("%s %s B=%d #%d: F1 %.2f pos %.2f (%.0f s)", vname, dname, bs, k, row["f1"],
                             row["position_acc"], row["seconds"])
                    texts.append(f"\n## {vname}, {dname}, batch size {bs}, batch {k} (F1 {row['f1']:.2f})\n")
                    for t, g in zip(tok.batch_decode(truth, skip_special_tokens=True),
                                    tok.batch_decode(guess, skip_special_tokens=True)):
                        texts.append(f"- original:      {t}\n- reconstructed: {g}\n")
    (out / "texts.md").write_text("".join(texts))
    (out / "table.md").write_text(table(rows, list(cfg.batch_sizes)))
    figure(rows, "f1", "token-recovery F1").savefig(out / "scores.png", dpi=120)
    return rows


def figure(rows: list[dict], metric: str, label: str):
    """Mean `metric` per upload (cluster) and defence x batch size (bar)."""
    values: dict[str, dict[str, float]] = {}
    for r in rows:
        values.setdefault(r["victim"], {}).setdefault(f"{r['defence']}, B={r['batch_size']}", []).append(r[metric])
    means = {v: {k: float(np.mean(x)) for k, x in d.items()} for v, d in values.items()}
    return grouped_bars(means, label, "what one upload gives away", ylim=(0, 1.05))


@hydra.main(config_path="../conf", config_name="privacy_attack", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    out = Path(HydraConfig.get().runtime.output_dir)
    log.info("config:\n%s", OmegaConf.to_yaml(cfg))
    compare(cfg, out)
    print((out / "table.md").read_text())
    print(f"results, texts and table in {out}")


if __name__ == "__main__":
    main()
