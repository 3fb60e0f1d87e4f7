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


def curves(panels: dict[str, tuple[dict, dict]], xlabel: str, ylabel: str, title: str = "", logx: bool = False,
           order: list[str] | None = None):
    """One panel per entry of `panels` (panel title -> (series, flat)), side by side on a shared y axis.
    `series`: one line per label from (x, mean, std) arrays, std shaded; `flat`: labelled horizontal lines
    (methods that send nothing have no point on a log byte axis). `order` fixes each label's colour, so one
    label has one colour across panels and figures; the legend, one for all panels, sits below them."""
    labels = list(dict.fromkeys(n for series, flat in panels.values() for n in [*series, *flat]))
    colour = {name: f"C{i % 10}" for i, name in enumerate(order or labels)}
    fig = Figure(figsize=(1.0 + 5.0 * len(panels), 3.6 + 0.22 * ((len(labels) + 2) // 3)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True, squeeze=False)[0])
    for ax, (name, (series, flat)) in zip(axes, panels.items()):
        for label, (x, mean, std) in series.items():
            ax.plot(x, mean, marker="o", ms=3, color=colour[label], label=label)
            ax.fill_between(x, mean - std, mean + std, color=colour[label], alpha=0.15, lw=0)
        for label, y in flat.items():
            ax.axhline(y, ls="--", lw=1, color=colour[label], label=label)
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_title(name, fontsize="medium")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    if title:
        fig.suptitle(title)
    handles = {}
    for ax in axes:
        handles.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.legend([handles[n] for n in labels], labels, loc="outside lower center", ncols=min(3, len(labels)),
               fontsize="small")
    return fig


def grouped_bars(values: dict[str, dict[str, float]], ylabel: str, title: str = "", ylim: tuple | None = None):
    """Bars of values[group][member]: one cluster per group, one colour per member (e.g. victim x defence)."""
    groups = list(values)
    members = list(dict.fromkeys(m for g in groups for m in values[g]))
    width = 0.8 / max(len(members), 1)
    fig = Figure(figsize=(1.5 + 1.1 * len(groups), 3.4))
    ax = fig.subplots()
    for k, member in enumerate(members):
        x = np.arange(len(groups)) + (k - (len(members) - 1) / 2) * width
        ax.bar(x, [values[g].get(member, np.nan) for g in groups], width, label=member, color=f"C{k % 10}")
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    if title:
        ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def image_grid(rows: dict[str, "np.ndarray"], title: str = ""):
    """One row of images per label (e.g. the originals, then each reconstruction); arrays (N, C, H, W) in [0, 1]."""
    labels = list(rows)
    n = max(len(v) for v in rows.values())
    fig = Figure(figsize=(1.2 + 1.1 * n, 0.4 + 1.1 * len(labels)))
    axes = np.atleast_2d(fig.subplots(len(labels), n, squeeze=False))
    for r, label in enumerate(labels):
        for c in range(n):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            if c < len(rows[label]):
                img = np.asarray(rows[label][c]).transpose(1, 2, 0).clip(0, 1)
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                          vmin=0, vmax=1)
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize="small")
    if title:
        fig.suptitle(title, fontsize="small")
    fig.tight_layout()
    return fig


def frontier(panels: dict[str, tuple], xlabel: str):
    """One panel per metric: points (x, y) coloured by group and tagged, the Pareto front (mask) joined by a
    step line and ringed. `panels`: metric -> (x, y, groups, tags, front)."""
    fig = Figure(figsize=(6.0 * len(panels), 4.4))
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    names = list(dict.fromkeys(g for _, _, groups, _, _ in panels.values() for g in groups))
    colour = {name: f"C{i % 10}" for i, name in enumerate(names)}
    for ax, (metric, (x, y, groups, tags, front)) in zip(axes, panels.items()):
        for name in names:
            k = [i for i, g in enumerate(groups) if g == name]
            order = sorted(k, key=lambda i: x[i])
            ax.plot(x[order], y[order], marker="o", ms=5, lw=0.8, color=colour[name], label=name)
        for i, tag in enumerate(tags):
            if tag:
                ax.annotate(tag, (x[i], y[i]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if front.any():
            order = np.argsort(x[front])
            ax.step(x[front][order], y[front][order], where="post", color="k", lw=1.2, alpha=0.6, label="Pareto front")
            ax.scatter(x[front], y[front], s=90, facecolors="none", edgecolors="k", lw=1.2)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} against uplink")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig
