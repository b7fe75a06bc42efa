"""Every shipped run config validates, and every scenario script starts (its --help)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fl_offsite import config as configs

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
