"""Flower ServerApp: the model owner, for ``flwr run .`` and deployments.

The run config (``[tool.flwr.app.config]`` in pyproject.toml, ``--run-config``) holds the
path of a YAML config under ``config`` and any dotted overrides of its keys; ``out`` names the
run directory (default ``runs/<name>-<timestamp>``).
"""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from .federation.runtime import config_from_run_config, new_run_dir, preflight
from .federation.server import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, out = config_from_run_config(dict(context.run_config))
    preflight(cfg, simulation=False)
    run_federation(grid, cfg, new_run_dir(cfg, out))
