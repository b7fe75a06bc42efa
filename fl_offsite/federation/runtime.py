"""Setting up a run: where its config comes from and where its files go."""

from __future__ import annotations

import time
from pathlib import Path

from .. import config as configs
from ..errors import UserError


def new_run_dir(cfg: configs.Config, out: str | Path | None) -> Path:
    """A fresh run directory holding the resolved config (refuses to reuse a non-empty one)."""
    run_dir = Path(out) if out else Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"--out: {run_dir} already exists and is not empty; choose a new "
                        "run directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(configs.dump(cfg))
    return run_dir


def config_from_run_config(run_config: dict) -> tuple[configs.Config, str | None]:
    """Flower run config -> (Config, run dir): ``config`` names the YAML, the rest override it."""
    overrides = dict(run_config)
    path = overrides.pop("config", None) or None
    out = overrides.pop("out", None) or None
    overrides = {k: (None if v == "" else v) for k, v in overrides.items()}
    return configs.load(path, overrides), out
