"""celora's methods as Flower apps (the optional extra: `pip install -e '.[flower]'`, i.e. flwr[simulation]).

`client_app(cfg)` and `server_app(cfg, out_dir)` build a ClientApp and a ServerApp from the composed
Hydra config `python -m celora` runs; `celora.flower.app` holds the two for `flwr run`, which compose
it from the run config's `overrides`. Recipes: docs/flower.md.
"""
try:
    import flwr  # noqa: F401
except ImportError as e:  # the extra is optional: say how to get it
    raise ImportError("celora.flower needs Flower: pip install -e '.[flower]' (flwr[simulation])") from e

from celora.flower.client import client_app
from celora.flower.server import server_app

__all__ = ["client_app", "server_app"]
