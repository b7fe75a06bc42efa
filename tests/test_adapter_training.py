"""benchmarks/adapter_training.py: its control trains as `fl-offsite train` does, and a held
half stays pristine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fl_offsite.cli import main

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
DATA = ["--data", "fl-offsite/devil", "--block-size", "64"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "bundle"
    assert main(["emulator", "--model", "fl-offsite/tiny-opt", "--out", str(out),
                 "--emulator-layers", "2"]) == 0
    return out


def test_the_control_variant_plugs_in_what_the_cli_trains(bundle, tmp_path):
    adapter = tmp_path / "a.safetensors"
    assert main(["train", "--bundle", str(bundle), *DATA, "--max-examples", "24",
                 "--epochs", "1", "--lr", "3e-3", "--batch-size", "4", "--out", str(adapter)]) == 0
    assert main(["evaluate", "--model", "fl-offsite/tiny-opt", "--adapter", str(adapter), *DATA,
                 "--max-examples", "16", "--out", str(tmp_path / "plug.json")]) == 0
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "adapter_training.py"),
                           "--bundle", str(bundle), "--model", "fl-offsite/tiny-opt", *DATA,
                           "--max-examples", "24", "--batch-size", "4", "--lr", "3e-3",
                           "--max-eval", "16", "--variants", "control,hold-1.0",
                           "--out", str(tmp_path / "t.json")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = {r["variant"]: r for r in json.loads((tmp_path / "t.json").read_text())["rows"]}
    cli = json.loads((tmp_path / "plug.json").read_text())["ppl"]
    assert rows["control"]["plugin"]["ppl"] == pytest.approx(cli, rel=1e-5)
    assert rows["hold-1.0"]["plugin"]["ppl"] != pytest.approx(cli, rel=1e-5)


def test_a_held_half_is_not_updated(bundle):
    sys.path.insert(0, str(BENCHMARKS))
    from adapter_training import parse_variant, train_adapter
    from fl_offsite.models.loading import load_processor
    from fl_offsite.offsite.emulated import EmulatedModel
    from fl_offsite.training import data

    items = data.prepare("fl-offsite/devil", "train", load_processor("fl-offsite/tiny-opt"), 64,
                         4).train_items
    emulated = EmulatedModel(bundle)
    before = emulated.prepare("blocks")
    settings = parse_variant("hold-1.0-lr-1e-2", 3e-4)
    assert settings["hold"] == 1.0 and settings["lr"] == 1e-2
    train_adapter(emulated, items, batch_size=4, pad_id=1, **settings)  # one step
    after = emulated.adapter()
    changed = {int(k.split(".")[0]) for k in before.tensors
               if not torch.equal(before.tensors[k], after.tensors[k])}
    assert changed in ({0, 1}, {6, 7}), changed  # one half trained, the other pristine
