"""A Flower run's own settings (`flower.*`), and the Hydra config its apps compose from a run config's overrides."""
from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from celora.errors import ConfigError, MissingFile

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the checkout's conf/ (celora is installed with -e)
UNSUPPORTED = {"Centralized": "the centralized reference pools every client's rows in one trainer",
               "Local": "local training sends nothing, so there is no federation to run"}


@dataclass
class FlowerSettings:
    """How celora runs in Flower's runtimes; none of it changes a number of the run."""

    client_resources: dict = field(default_factory=lambda: {"num_cpus": 2, "num_gpus": 0.0})
    ray_init_args: dict = field(default_factory=dict)  # e.g. {address: auto}: join a running Ray cluster
    connect_timeout_s: float = 300.0  # the ServerApp waits this long for fl.num_clients SuperNodes
    reply_timeout_s: float | None = None  # a client silent this long is left out of the round (null: wait)

    def __post_init__(self):
        self.client_resources = dict(self.client_resources)
        self.ray_init_args = dict(self.ray_init_args)
        bad = sorted(set(self.client_resources) - {"num_cpus", "num_gpus"})
        if bad:
            raise ConfigError(f"flower.client_resources has unknown keys {bad}: it takes num_cpus and num_gpus "
                             "(e.g. flower.client_resources.num_gpus=0.25: four ClientApps share a GPU)")
        for key, value in self.client_resources.items():
            if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
                raise ConfigError(f"flower.client_resources.{key} must be a number >= 0, got {value!r}")
        if not self.connect_timeout_s > 0:
            raise ConfigError(f"flower.connect_timeout_s must be > 0, got {self.connect_timeout_s}")
        if self.reply_timeout_s is not None and not self.reply_timeout_s > 0:
            raise ConfigError(f"flower.reply_timeout_s must be > 0 or null (wait for every reply), "
                             f"got {self.reply_timeout_s}")

    @classmethod
    def of(cls, cfg: DictConfig) -> FlowerSettings:
        node = cfg.get("flower")
        return cls(**OmegaConf.to_container(node, resolve=True)) if node is not None else cls()

    def backend_config(self) -> dict:
        """The Simulation Runtime's backend config (Ray)."""
        return {"client_resources": dict(self.client_resources), "init_args": dict(self.ray_init_args)}


def check_flower(cfg: DictConfig, aggregator) -> FlowerSettings:
    """What a Flower run needs beyond celora's own checks: its settings, and an aggregator that federates."""
    why = UNSUPPORTED.get(type(aggregator).__name__)
    if why is not None or aggregator.pooled or not aggregator.communicates:
        raise ConfigError(f"aggregator={type(aggregator).__name__} does not run in Flower: "
                         f"{why or 'it has no federation'}; run it with `python -m celora` (same config)")
    if cfg.adapter.get("init") == "lora_sb":
        raise ConfigError("adapter.init=lora_sb (method=fed_sb) has a round of gradient uploads that the Flower "
                         "apps do not carry yet; run it with `python -m celora` (same config)")
    return FlowerSettings.of(cfg)


def compose(overrides: str | list[str] = "") -> DictConfig:
    """The config `python -m celora <overrides>` would run, from conf/ (what `flwr run` apps start from)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    if not CONF_DIR.is_dir():
        raise MissingFile(f"celora's conf/ is not at {CONF_DIR}: install celora from a checkout "
                                "(pip install -e '.[flower]') on every node")
    args = shlex.split(overrides) if isinstance(overrides, str) else list(overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=args)
