"""A model owner whose full model does not fit: accelerate offloads blocks to disk for the
forward passes, the bundle's tensors come from the checkpoint, and the bundle is the one a
fully loaded model gives."""

from __future__ import annotations

import re

import torch

from fl_offsite.cli import main
from fl_offsite.fileio import load_tensors
from fl_offsite.models.families import resolve
from fl_offsite.models.offload import load_offloaded
from fl_offsite.models.loading import load_model
from fl_offsite.offsite.bundle import keyed, split_state

EMULATOR = ["--model", "fl-offsite/tiny-opt", "--emulator-layers", "2", "--layer-selection",
            "similarity", "--distill-steps", "4", "--distill-eval-every", "2",
            "--distill-data", "fl-offsite/pydoc"]
FILES = ("emulator.safetensors", "adapter.safetensors", "shared.safetensors")


def test_an_offloaded_owner_builds_the_bundle_a_loaded_model_builds(tmp_path, capsys):
    assert main(["emulator", *EMULATOR, "--out", str(tmp_path / "loaded")]) == 0
    capsys.readouterr()
    assert main(["emulator", *EMULATOR, "--out", str(tmp_path / "offloaded"),
                 "--max-memory", "cpu=1MB"]) == 0  # tiny-opt is 1.2 MB: most blocks on disk
    placed = re.search(r"(\d+) of (\d+) modules offloaded to disk", capsys.readouterr().err)
    assert placed and int(placed[1]) >= 4
    for name in FILES:
        loaded, streamed = (load_tensors(tmp_path / d / name) for d in ("loaded", "offloaded"))
        assert loaded.keys() == streamed.keys()
        assert all(torch.equal(loaded[k], streamed[k]) for k in loaded)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loaded", "offloaded"]  # no leftovers


def test_an_offloaded_model_reads_only_the_blocks_asked_for(tmp_path):
    model = load_offloaded("fl-offsite/tiny-opt", "float32", None, {"cpu": "1MB"}, tmp_path)
    assert "disk" in model.hf_device_map.values()
    shared, blocks = split_state(model, resolve(model))
    full_shared, full_blocks = split_state(load_model("fl-offsite/tiny-opt"), resolve(model))
    picked = keyed(blocks, [3, 6])
    assert set(blocks.read) == {3, 6}
    assert all(torch.equal(v, keyed(full_blocks, [3, 6])[k]) for k, v in picked.items())
    assert shared.keys() == full_shared.keys()


def test_a_malformed_memory_limit_is_refused(tmp_path, capsys):
    assert main(["emulator", *EMULATOR, "--out", str(tmp_path / "b"),
                 "--max-memory", "gpu=3"]) == 2
    assert "--max-memory: 'gpu=3' is not DEVICE=SIZE" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
