"""Setting up a run: where its config comes from and where its files go."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from .. import config as configs
from ..errors import UserError


def preflight(cfg: configs.Config, simulation: bool = True) -> None:
    """Every check that can fail before anything is written: a bad run leaves no run dir."""
    from ..training import data
    from ..offsite.bundle import read_info
    from ..models.loading import load_config
    from ..offsite.plan import make_plan
    from .simulation import check_resources

    if simulation:
        check_resources(cfg)
    cfg.strategy.check(cfg.clients_per_round)
    with _as_config_key("--model", "model"):
        depth = load_config(cfg.model).num_hidden_layers
    if cfg.bundle:
        with _as_config_key("--bundle", "bundle"):
            read_info(cfg.bundle)
    else:
        make_plan(depth, cfg.split.adapter_bottom, cfg.split.adapter_top,
                  cfg.split.emulator_layers, cfg.split.drop_ratio)
    for split in ("train", cfg.data.eval_split):
        with _as_config_key("--data", "data.path"):
            rows = len(data.load_split(cfg.data.path, split))
        if rows == 0:
            raise UserError(f"data.path: {cfg.data.path} split {split!r} is empty")
    if simulation and cfg.ray_address is None:  # all data owners share this machine
        from .memory import check_simulation
        check_simulation(cfg)
    if cfg.split.distill.data and (not cfg.bundle or cfg.realign.every):
        try:
            data.load_split(cfg.split.distill.data, "train")
        except UserError as exc:
            raise UserError(f"split.distill.data: {exc}".replace("--data: ", "")) from None


@contextlib.contextmanager
def _as_config_key(flag: str, key: str):
    """The library names the command-line flag; in a run config the user wrote ``key``."""
    try:
        yield
    except UserError as exc:
        message = str(exc)
        raise UserError(key + message[len(flag):] if message.startswith(flag) else message) \
            from None


def new_run_dir(cfg: configs.Config, out: str | Path | None, kind: str = "") -> Path:
    """A fresh run directory holding the resolved config (refuses to reuse a non-empty one);
    by default ``runs/<name>[-<kind>]-<timestamp>``."""
    default = "-".join(filter(None, [cfg.name, kind, time.strftime("%Y%m%d-%H%M%S")]))
    run_dir = Path(out) if out else Path("runs") / default
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"--out: {run_dir} already exists and is not empty; choose a new "
                        "run directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(configs.dump(cfg))
    return run_dir


def resume_config(run_dir: Path, overrides: dict) -> configs.Config:
    """The config of an interrupted run, with ``overrides`` (e.g. more rounds) applied."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"--resume: {run_dir} is not a run directory (no config.yaml)")
    return configs.load(path, overrides, "--set")


def check_resumable(run_dir: Path, cfg: configs.Config) -> None:
    """Refuse, before anything is written, a run directory this config cannot continue."""
    from ..offsite.bundle import read_info
    from . import checkpoint

    bundle = Path(cfg.bundle) if cfg.bundle else Path(run_dir) / "bundle"
    checkpoint.check(Path(run_dir), checkpoint.fingerprint(cfg, read_info(bundle).bundle_hash))


def config_from_run_config(run_config: dict) -> tuple[configs.Config, str | None]:
    """Flower run config -> (Config, run dir): ``config`` names the YAML, the rest override it."""
    overrides = dict(run_config)
    path = overrides.pop("config", None) or None
    out = overrides.pop("out", None) or None
    overrides = {k: (None if v == "" else v) for k, v in overrides.items()}
    return configs.load(_app_path(path) if path else None, overrides), out


def _app_path(path: str) -> Path:
    """A relative config path as given, or else beside the project (a deployed ServerApp runs
    in the SuperLink's directory, not the project's)."""
    given = Path(path)
    beside_project = Path(__file__).resolve().parents[2] / given
    return beside_project if not given.is_absolute() and not given.exists() and \
        beside_project.exists() else given
