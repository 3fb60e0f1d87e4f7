"""A celora run in Flower's Simulation Runtime: the ServerApp in this process, ClientApps on Ray actors."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from celora.flower import client_app, server_app
from celora.flower.settings import check_flower
from celora.validate import build

log = logging.getLogger("celora")


def simulate(cfg: DictConfig, run_dir: str | Path | None = None) -> dict:
    """Runs `cfg` with one virtual SuperNode per client (flower.client_resources each); returns summary.json."""
    from flwr.simulation import run_simulation

    from celora.run import _run_dir

    parts = build(cfg)  # every config problem before Ray starts
    logging.getLogger("flwr").setLevel(logging.INFO)  # Flower's debug lines are not the run's log
    settings = check_flower(cfg, parts.aggregator)
    out = _run_dir(run_dir)
    (out / "summary.json").unlink(missing_ok=True)
    run_simulation(server_app(cfg, out), client_app(cfg), num_supernodes=parts.fl.num_clients,
                   backend_config=settings.backend_config())
    path = out / "summary.json"
    if not path.exists():
        raise RuntimeError(f"the Flower simulation ended without a summary in {out}: see the log above")
    return json.loads(path.read_text())
