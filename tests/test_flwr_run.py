"""`flwr run .` runs the same apps through Flower's own runner and local SuperLink."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from fl_offsite.cli import main
from fl_offsite.federation.superlink import stop_superlinks, superlinks_of

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]


def test_flwr_run_trains_and_writes_the_run_directory(tmp_path):
    home = Path(tempfile.mkdtemp(prefix="flo-home-"))  # short: Ray's socket paths live here
    out = tmp_path / "run"
    env = {**os.environ, "FLWR_HOME": str(home), "RAY_TMPDIR": str(home / "ray"),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    (home / "ray").mkdir()
    try:
        proc = subprocess.run(
            ["flwr", "run", ".", "--stream", "--federation-config",
             "num-supernodes=2 client-resources-num-cpus=1", "--run-config",
             f"rounds=1 num_clients=2 clients_per_round=2 out='{out}'"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert "round 1/1" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["rounds"][0]["clients_ok"] == 2
        assert summary["rounds"][0]["plugin"]["ppl"] < summary["zero_shot"]["ppl"]
        assert len(superlinks_of(home)) == 1  # flwr run leaves its local SuperLink running
        assert main(["stop-superlink", "--flwr-home", str(home)]) == 0
        assert superlinks_of(home) == []
    finally:
        stop_superlinks(home)
        shutil.rmtree(home, ignore_errors=True)
