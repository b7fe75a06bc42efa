"""The model owner builds a bundle from the checkpoint's files without loading the model: the
same bytes as loading it, and the shards of dropped blocks are never opened."""

from __future__ import annotations

import filecmp
import json

import pytest

from conftest import tiny_model
from fl_offsite.emulators.channels import ChannelPruning
from fl_offsite.emulators.int8 import Int8Compression
from fl_offsite.emulators.pipeline import SplitConfig
from fl_offsite.errors import UserError
from fl_offsite.models.loading import load_model
from fl_offsite.offsite.bundle import write_bundle
from fl_offsite.offsite.owner import build_bundle
from fl_offsite.offsite.plan import make_plan
from fl_offsite.offsite.streaming import INDEX_FILE

BUNDLE_FILES = ("config.json", "emulator.safetensors", "adapter.safetensors",
                "shared.safetensors")
# transformers renames these on load (legacy names, fused MoE experts): the owner loads them
LOADED_WHOLE = {"gpt_neox", "mixtral", "vit"}


def sharded_checkpoint(family: str, path, shard_size: str = "20KB"):
    tiny_model(family).save_pretrained(path, max_shard_size=shard_size)
    assert (path / INDEX_FILE).is_file()
    return str(path)


@pytest.mark.parametrize("compression", [None, "int8", "channels"])
def test_a_bundle_read_in_parts_is_the_bundle_of_the_loaded_model(family, compression,
                                                                   tmp_path):
    checkpoint = sharded_checkpoint(family, tmp_path / "checkpoint")
    method = {"int8": Int8Compression(), "channels": ChannelPruning(importance="weights"),
              None: None}[compression]
    said: list[str] = []
    streamed = build_bundle(checkpoint, tmp_path / "streamed",
                            SplitConfig(emulator_layers=2, compression=method), log=said.append)
    loaded = write_bundle(load_model(checkpoint), make_plan(8, 2, 2, 2), tmp_path / "loaded",
                          checkpoint, None, None, method, {})
    assert (streamed.bundle_hash, streamed.source_hash) == (loaded.bundle_hash,
                                                            loaded.source_hash)
    for name in BUNDLE_FILES:
        assert filecmp.cmp(tmp_path / "streamed" / name, tmp_path / "loaded" / name,
                           shallow=False), name
    read_whole = any("loading the whole model" in line for line in said)
    assert read_whole == (family in LOADED_WHOLE), said


def test_shards_holding_only_dropped_blocks_are_never_opened(tmp_path):
    checkpoint = tmp_path / "checkpoint"
    sharded_checkpoint("llama", checkpoint, shard_size="8KB")  # about a block per file
    plan = make_plan(8, 2, 2, 2)
    reference = write_bundle(load_model(str(checkpoint)), plan, tmp_path / "loaded",
                             str(checkpoint), None)
    weight_map = json.loads((checkpoint / INDEX_FILE).read_text())["weight_map"]
    needed = {f for name, f in weight_map.items()
              if not name.startswith("model.layers.")
              or int(name.split(".")[2]) in plan.order}
    unneeded = set(weight_map.values()) - needed
    assert unneeded, "the shards are too coarse for this test"
    for shard in unneeded:  # anything that opened them now fails
        (checkpoint / shard).write_bytes(b"not a safetensors file")
    said: list[str] = []
    streamed = build_bundle(str(checkpoint), tmp_path / "streamed",
                            SplitConfig(emulator_layers=2), log=said.append)
    assert streamed.bundle_hash == reference.bundle_hash
    assert any(f"from {len(needed)} of {len(set(weight_map.values()))} checkpoint files" in line
               for line in said), said


def test_a_half_precision_bundle_read_in_parts_matches_the_loaded_one(tmp_path):
    checkpoint = sharded_checkpoint("llama", tmp_path / "checkpoint")
    streamed = build_bundle(checkpoint, tmp_path / "streamed", SplitConfig(emulator_layers=2),
                            dtype="float16")
    loaded = write_bundle(load_model(checkpoint, "float16"), make_plan(8, 2, 2, 2),
                          tmp_path / "loaded", checkpoint, None)
    assert streamed.bundle_hash == loaded.bundle_hash


def test_a_checkpoint_that_disagrees_with_its_config_is_one_line_and_writes_nothing(tmp_path):
    checkpoint = tmp_path / "checkpoint"
    sharded_checkpoint("llama", checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config["intermediate_size"] = 48
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"--model: .* holds model\.layers\.\d+\.mlp\.\w+\.weight "
                                        r"with shape .* config\.json says"):
        build_bundle(str(checkpoint), tmp_path / "bundle", SplitConfig(emulator_layers=2))
    assert not (tmp_path / "bundle").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]
