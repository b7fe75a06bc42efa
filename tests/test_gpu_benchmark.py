"""benchmarks/gpu.py, the script a user with a CUDA machine runs: on a host without one it
refuses in one line, and with --allow-cpu its every step (bf16 efficiency of all four
configurations, the 4-data-owner simulation) runs and writes its table's JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def test_without_cuda_it_refuses_in_one_line():
    if torch.cuda.is_available():
        pytest.skip("this host has a CUDA device: the refusal does not apply")
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().startswith("gpu: no CUDA device") and "--allow-cpu" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_every_step_runs_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--allow-cpu", "--repeats", "1",
                           "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["efficiency"]) == {"full", "full_lora", "offsite", "offsite_lora"}
    offsite = result["efficiency"]["offsite"]
    assert offsite["trainable_params"] < result["efficiency"]["full"]["trainable_params"]
    assert all(r["tokens_per_s"] > 0 for r in result["efficiency"].values())
    sim = result["simulation"]
    assert len(sim["round_s"]) == 2 and sim["plugin_ppl"] < sim["zero_shot_ppl"]
    assert "offsite_lora" in proc.stdout and "simulation: 4 data owners" in proc.stdout
