"""A family override reaches the data owners through the bundle, with nothing registered."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import tiny_model
from fl_offsite.cli import main

OVERRIDE = {"blocks": ["model.layers"], "embeddings": ["model.embed_tokens"],
            "final_norm": ["model.norm"], "head": ["lm_head"], "lora_targets": ["o_proj"]}


def test_the_bundle_carries_the_model_owners_family_to_a_fresh_process(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "model")
    assert main(["emulator", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "b"),
                 "--emulator-layers", "2", "--family", json.dumps(OVERRIDE)]) == 0
    meta = json.loads((tmp_path / "b" / "offsite.json").read_text())
    assert meta["family"]["lora_targets"] == ["o_proj"]
    # a data owner's process (as a Ray worker or SuperNode would be): the table says q_proj and
    # v_proj for llama, the bundle says o_proj, and nothing is registered there
    probe = ("from fl_offsite.offsite.emulated import EmulatedModel\n"
             f"e = EmulatedModel({str(tmp_path / 'b')!r})\n"
             "adapter = e.prepare('lora')\n"
             "print(sorted({k.split('.')[-4] for k in adapter.tensors}))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().splitlines()[-1] == "['o_proj']"


def test_a_bad_family_is_one_line(tmp_path, capsys):
    tiny_model("llama").save_pretrained(tmp_path / "model")
    for bad, field in (("{not json", "--family: not JSON"), ('{"blockz": []}', "family:")):
        assert main(["emulator", "--model", str(tmp_path / "model"), "--out",
                     str(tmp_path / "b"), "--family", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and field in err and "\n" not in err
    assert not (tmp_path / "b").exists()
