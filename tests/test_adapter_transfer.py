"""benchmarks/adapter_transfer.py: its "adapter" row is the plug-in `fl-offsite evaluate` gives,
and each half plugged alone is a different model from the whole adapter and from zero-shot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fl_offsite.cli import main

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "adapter_transfer.py"
DATA = ["--data", "fl-offsite/devil", "--block-size", "64"]


def test_the_transfer_table_plugs_in_what_the_cli_plugs_in(tmp_path):
    bundle, adapter = tmp_path / "b", tmp_path / "a.safetensors"
    assert main(["emulator", "--model", "fl-offsite/tiny-opt", "--out", str(bundle),
                 "--emulator-layers", "2"]) == 0
    assert main(["train", "--bundle", str(bundle), *DATA, "--max-steps", "4", "--lr", "3e-3",
                 "--batch-size", "4", "--out", str(adapter)]) == 0
    assert main(["evaluate", "--model", "fl-offsite/tiny-opt", "--adapter", str(adapter), *DATA,
                 "--max-examples", "16", "--out", str(tmp_path / "plug.json")]) == 0
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", "fl-offsite/tiny-opt",
                           "--adapter", str(adapter), "--reference", str(adapter), *DATA,
                           "--max-eval", "16", "--out", str(tmp_path / "t.json")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "t.json").read_text())
    ppl = {r["variant"]: r["ppl"] for r in result["rows"]}
    assert result["bottom_blocks"] == [0, 1]
    assert ppl["adapter"] == pytest.approx(json.loads((tmp_path / "plug.json").read_text())["ppl"],
                                           rel=1e-6)
    # the reference is the adapter itself here: mixing halves gives the adapter back
    assert ppl["reference"] == ppl["adapter bottom + reference top"] == ppl["adapter"]
    for half in ("adapter bottom only", "adapter top only", "adapter update x0.5"):
        assert len({round(ppl[half], 6), round(ppl["adapter"], 6),
                    round(ppl["zero-shot"], 6)}) == 3
    assert "adapter top only" in proc.stdout
