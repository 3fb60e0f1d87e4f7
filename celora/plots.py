"""Figures of runs (weight heatmap, partition histogram, curves over rounds and bytes) for W&B, the report and notebooks.

Plain `Figure` objects, not pyplot: no backend or global state, so a training job, a script and a
notebook can all make them (`fig.savefig(...)`, `wandb.Image(fig)`, or display in a notebook)."""
from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure


def heatmap(matrix, ids: list[int], title: str):
    """A labelled heatmap figure of a client x client matrix (rows receive, columns give)."""
    fig = Figure(figsize=(1.2 + 0.45 * len(ids), 1.0 + 0.4 * len(ids)))
    ax = fig.subplots()
    im = ax.imshow(matrix, cmap="viridis", vmin=0)
    ax.set_xticks(range(len(ids)), ids)
    ax.set_yticks(range(len(ids)), ids)
    ax.set_xlabel("client j")
    ax.set_ylabel("client i")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def partition_histogram(partition: dict, title: str = "train labels per client"):
    """Stacked bars of each client's local train label counts (the content of partition.json)."""
    clients = partition["clients"]
    counts = np.array([c["train_counts"] for c in clients])
    names = partition.get("label_names") or [str(k) for k in range(counts.shape[1])]
    fig = Figure(figsize=(1.5 + 0.35 * len(clients), 3.2))
    ax = fig.subplots()
    bottom = np.zeros(len(clients))
    for k, name in enumerate(names):
        ax.bar(range(len(clients)), counts[:, k], bottom=bottom, label=name)
        bottom += counts[:, k]
    groups = partition.get("groups")
    ax.set_xticks(range(len(clients)),
                  [f"{c['client']}\ng{g}" for c, g in zip(clients, groups)] if groups else [c["client"] for c in clients])
    ax.set_xlabel("client" + (" (latent group)" if groups else ""))
    ax.set_ylabel("train examples")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def curves(series: dict[str, tuple], xlabel: str, ylabel: str, title: str = "", logx: bool = False,
           flat: dict[str, float] | None = None, order: list[str] | None = None):
    """One line per label from (x, mean, std) arrays, std shaded; `flat` draws labelled horizontal lines
    (methods that send nothing have no point on a log byte axis). `order` fixes each label's colour,
    so one label has one colour across figures."""
    flat = flat or {}
    colour = {name: f"C{i % 10}" for i, name in enumerate(order or [*series, *flat])}
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    for name, (x, mean, std) in series.items():
        ax.plot(x, mean, marker="o", ms=3, color=colour[name], label=name)
        ax.fill_between(x, mean - std, mean + std, color=colour[name], alpha=0.15, lw=0)
    for name, y in flat.items():
        ax.axhline(y, ls="--", lw=1, color=colour[name], label=name)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig
