"""Every shipped run config validates, and every scenario script starts (its --help)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fl_offsite import config as configs
from fl_offsite.reference.reproduce import RECIPES, Plan

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = configs.load(path)
    assert cfg.rounds >= 1 and cfg.data.path


@pytest.mark.parametrize("script", sorted(p for p in (ROOT / "simulations").glob("*.py")
                                          if not p.name.startswith("_")), ids=lambda p: p.name)
def test_scenario_scripts_start(script):
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr


def test_offsite_runs_are_named_apart_from_simulate_runs(tmp_path, monkeypatch):
    from fl_offsite.federation.runtime import new_run_dir

    monkeypatch.chdir(tmp_path)
    cfg = configs.load(ROOT / "configs" / "demo.yaml")
    simulate_dir, offsite_dir = new_run_dir(cfg, None), new_run_dir(cfg, None, "offsite")
    assert simulate_dir.parent == offsite_dir.parent == Path("runs")
    assert simulate_dir.name.startswith(f"{cfg.name}-2") and \
        offsite_dir.name.startswith(f"{cfg.name}-offsite-2")
    assert (offsite_dir / "config.yaml").is_file()


@pytest.mark.parametrize("model", sorted(RECIPES))
def test_every_recommended_recipe_makes_valid_emulators(model):
    plan = Plan.for_model(model)
    for distilled in (False, True):
        split = plan.split(model, distilled)
        assert split.distill.data and split.distill.steps > 0
    assert Plan.for_model(model, quick=True).split(model, False).distill.steps <= 10
