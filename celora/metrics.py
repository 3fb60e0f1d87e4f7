"""One metrics schema, round as the step: written to metrics.jsonl and to W&B; summary of last and best."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

KEYS = (
    "round", "global/acc", "global/loss", "personal/acc", "personal/acc_unweighted",
    "personal/acc_worst10", "personal/loss", "train/loss", "comm/up_bytes", "comm/down_bytes",
    "comm/up_bytes_cum", "comm/down_bytes_cum", "fl/clients", "time/round_s",
)


def _clean(value):
    """NaN is not JSON: undefined metrics (e.g. global accuracy with private tensors) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def summarize(rows: list[dict]) -> dict:
    """`last` row, and for each accuracy (max) and loss (min) key its best value and round."""
    best, best_round = {}, {}
    for key in rows[-1] if rows else ():
        higher = key.endswith("acc") or "/acc_" in key
        lower = key.endswith("loss")
        if not (higher or lower):
            continue
        vals = [(r[key], r["round"]) for r in rows if r.get(key) is not None]
        if vals:
            v, rnd = (max if higher else min)(vals, key=lambda t: t[0])
            best[key], best_round[key] = v, rnd
    return {"last": rows[-1] if rows else {}, "best": best, "best_round": best_round}


def heatmap(matrix, ids: list[int], title: str):
    """A labelled heatmap figure of a client x client matrix (rows receive, columns give)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * len(ids), 1.0 + 0.4 * len(ids)))
    im = ax.imshow(matrix, cmap="viridis", vmin=0)
    ax.set_xticks(range(len(ids)), ids)
    ax.set_yticks(range(len(ids)), ids)
    ax.set_xlabel("client j")
    ax.set_ylabel("client i")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


class NullSink:
    def log(self, row: dict) -> None: ...
    def log_config(self, config: dict) -> None: ...
    def log_matrix(self, name: str, rnd: int, ids: list[int], matrix) -> None: ...
    def finish(self, summary: dict) -> None: ...


class WandbSink:
    """Weights & Biases, offline by default (sync later with `wandb sync`); failures only warn."""

    def __init__(self, project: str = "celora", mode: str = "offline", entity: str | None = None,
                 group: str | None = None, name: str | None = None, tags: list[str] | None = None,
                 dir: str | None = None):
        self.kwargs = dict(project=project, mode=mode, entity=entity, group=group, name=name,
                           tags=list(tags or []), dir=dir)
        self.run = None

    def log_config(self, config: dict) -> None:
        try:
            import wandb

            self.run = wandb.init(config=config, reinit="finish_previous", **self.kwargs)
        except Exception as e:  # a logging fault must never cost the run
            warnings.warn(f"W&B disabled for this run: {e}")

    def log(self, row: dict) -> None:
        if self.run is not None:
            try:
                scalars = {k: v for k, v in row.items() if k != "round" and isinstance(v, (int, float))}
                self.run.log(scalars, step=row["round"])
            except Exception as e:
                warnings.warn(f"W&B log failed (metrics.jsonl still has it): {e}")

    def log_matrix(self, name: str, rnd: int, ids: list[int], matrix) -> None:
        if self.run is not None:
            try:
                import matplotlib.pyplot as plt
                import wandb

                fig = heatmap(matrix, ids, f"{name}, round {rnd}")
                self.run.log({f"matrix/{name}": wandb.Image(fig)}, step=rnd)
                plt.close(fig)
            except Exception as e:
                warnings.warn(f"W&B image log failed ({name}.jsonl still has it): {e}")

    def finish(self, summary: dict) -> None:
        if self.run is not None:
            try:
                for k, v in summary.get("best", {}).items():
                    self.run.summary[f"best/{k}"] = v
                self.run.finish()
            except Exception as e:
                warnings.warn(f"W&B finish failed: {e}")
            self.run = None


class Metrics:
    """Appends rows to metrics.jsonl (always) and forwards them to a sink."""

    def __init__(self, run_dir: Path, sink=None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.sink = sink or NullSink()
        self.rows: list[dict] = []

    def log(self, row: dict) -> None:
        row = {k: _clean(v) for k, v in row.items()}
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.sink.log(row)

    def log_matrix(self, name: str, rnd: int, ids: list[int], matrix) -> None:
        """A client x client matrix (aggregation weights, data distances) to `<name>.jsonl` and the sink."""
        rows = [[float(v) for v in r] for r in matrix.tolist()]
        with (self.path.parent / f"{name}.jsonl").open("a") as f:
            f.write(json.dumps({"round": rnd, "clients": list(ids), "matrix": rows}) + "\n")
        self.sink.log_matrix(name, rnd, ids, rows)
