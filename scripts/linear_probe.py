"""Linear probe of the frozen backbone on a run's own data and partition: the floor that fine-tuning must clear.

Composes the same config as `python -m celora` (so `experiment=vision_default` means the same data,
resolution and clients), embeds every example once with the frozen pretrained backbone (the pooled
features the head sees), then fits multinomial logistic regression on them:

- global: one head on the union of the clients' training rows, scored on the held-out test split
  (and on each client's local test split: the personal accuracy of that one model);
- local: one head per client on its own training rows, scored on its own local test split (the
  frozen-backbone counterpart of `method=local`).

    .venv/bin/python scripts/linear_probe.py experiment=vision_default
    .venv/bin/python scripts/linear_probe.py experiment=vision_default partition=fashion_tasks

Writes `probe.json` into `outputs/probe/<date>/<time>/` (or `out=DIR`) and prints the accuracies.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from sklearn.linear_model import LogisticRegression

from celora.data import load
from celora.data.batches import eval_batches
from celora.fl.evaluation import personal_summary
from celora.schema import make

CONF = Path(__file__).resolve().parents[1] / "conf"


@torch.no_grad()
def embed(model, data, indices, collate, batch_size: int = 256) -> np.ndarray:
    """Pooled features of the frozen backbone, in the order of `indices`."""
    model.eval()
    out = [model.features(**{k: v for k, v in b.items() if k != "labels"})
           for b in eval_batches(data, indices, batch_size, collate)]
    return torch.cat(out).double().numpy() if out else np.zeros((0, 0))


def fit(x: np.ndarray, y: np.ndarray, c: float, seed: int):
    """A multinomial logistic-regression head; a client holding one class predicts it."""
    if len(np.unique(y)) == 1:
        label = y[0]
        return lambda z: np.full(len(z), label)
    clf = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x, y)
    return clf.predict


def probe(overrides: list[str], c: float = 1.0, out: str | None = None) -> dict:
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    backbone = make(cfg.model)
    data = load(make(cfg.dataset), backbone.data_args(), cfg.seed)
    splits = instantiate(cfg.partition).split(data.train, cfg.fl.num_clients, cfg.seed)
    model = backbone.classifier(data.num_classes, seed=cfg.seed, label_names=data.label_names)
    train, test, collate = data.encoded("train"), data.encoded("test"), backbone.collate()
    labels = np.asarray(train.labels)
    test_labels = np.asarray(test.labels)

    feats = embed(model, train, np.arange(len(train)), collate)  # every training row once
    test_feats = embed(model, test, np.arange(len(test)), collate)
    pooled = np.concatenate([s.train for s in splits])
    head = fit(feats[pooled], labels[pooled], c, cfg.seed)
    global_acc = float((head(test_feats) == test_labels).mean())
    shared, local, sizes = [], [], []
    for s in splits:
        y = labels[s.test]
        shared.append(float((head(feats[s.test]) == y).mean()))
        local.append(float((fit(feats[s.train], labels[s.train], c, cfg.seed)(feats[s.test]) == y).mean()))
        sizes.append(len(s.test))
    result = {
        "overrides": overrides, "C": c, "train_examples": int(len(pooled)), "test_examples": int(len(test)),
        "global/acc": global_acc,
        "global_head/personal": personal_summary(shared, sizes),
        "local_heads/personal": personal_summary(local, sizes),
        "local_heads/acc_by_client": local,
        "time/total_s": time.perf_counter() - t0,
    }
    folder = Path(out or time.strftime("outputs/probe/%Y-%m-%d/%H-%M-%S"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "probe.json").write_text(json.dumps(result, indent=1))
    print(f"linear probe ({len(pooled)} training examples, {len(test)} test): global acc {global_acc:.4f}; "
          f"personal acc: global head {result['global_head/personal']['personal/acc']:.4f}, local heads "
          f"{result['local_heads/personal']['personal/acc']:.4f} -> {folder / 'probe.json'}")
    return result


def main(argv: list[str]) -> None:
    c = float(next((a.split("=", 1)[1] for a in argv if a.startswith("C=")), 1.0))
    out = next((a.split("=", 1)[1] for a in argv if a.startswith("out=")), None)
    probe([a for a in argv if not a.startswith(("C=", "out="))], c=c, out=out)


if __name__ == "__main__":
    main(sys.argv[1:])
