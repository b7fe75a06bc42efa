"""The one call every scenario here makes: a config (file + overrides) run as a simulation."""

from __future__ import annotations

from pathlib import Path

from fl_offsite import config as configs
from fl_offsite.federation.runtime import new_run_dir, preflight
from fl_offsite.federation.simulation import simulate

ROOT = Path(__file__).resolve().parents[1]


def run(config: str, overrides: dict | None = None, out: str | Path | None = None) -> dict:
    """Load ``config`` (relative to the project) with ``overrides``, check it, simulate it;
    returns the run's summary (also in its run directory)."""
    cfg = configs.load(ROOT / config, overrides or {})
    preflight(cfg)
    run_dir = new_run_dir(cfg, out)
    summary = simulate(cfg, run_dir)
    summary["run_dir"] = str(run_dir)
    return summary


def final(summary: dict) -> tuple[str, float, float]:
    """(metric name, final plug-in value, zero-shot value) of a run summary."""
    metric = summary["main_metric"]
    return metric, summary["rounds"][-1]["plugin"][metric], summary["zero_shot"][metric]
