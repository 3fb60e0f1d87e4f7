"""The apps `flwr run` loads (pyproject [tool.flwr.app.components]): the config comes from the run config's
`overrides` (Hydra overrides, as on `python -m celora`'s command line) and the run dir from `out-dir`."""
from celora.flower import client_app, server_app

clientapp = client_app()
serverapp = server_app()
