"""Harmonizers: an untrained one changes nothing, distillation trains them, the data owner's
emulator runs them (frozen), and one that cannot be trained is refused."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import model_inputs, tiny_model, training_items
from fl_offsite.cli import main
from fl_offsite.emulators.harmonizer import PREFIX, BottleneckHarmonizer
from fl_offsite.fileio import load_tensors, save_tensors
from fl_offsite.models.families import resolve
from fl_offsite.offsite.bundle import keyed, split_state, write_bundle
from fl_offsite.offsite.emulated import EmulatedModel
from fl_offsite.offsite.plan import make_plan
from fl_offsite.training.config import TrainConfig
from fl_offsite.training.loop import train

PLAN = make_plan(8, 2, 2, 2)  # middle blocks 2..5: 2 stands in for 2-4, 5 for itself


@pytest.mark.parametrize("family_name", ["llama", "opt", "gpt2", "falcon", "gemma2"])
def test_an_untrained_harmonizer_leaves_the_emulator_unchanged(family_name, tmp_path):
    model = tiny_model(family_name)
    added = BottleneckHarmonizer(width=4).initial(model.config.hidden_size, PLAN)
    assert {k.split(".", 1)[0] for k in added} == {"2"}  # only the block with a dropped span
    emulator = {**keyed(split_state(model, resolve(model))[1], PLAN.emulator), **added}
    write_bundle(model, PLAN, tmp_path / "harmonized", "tiny", emulator=emulator)
    write_bundle(model, PLAN, tmp_path / "plain", "tiny")
    harmonized = EmulatedModel(tmp_path / "harmonized").model
    assert hasattr(resolve(harmonized).blocks(harmonized)[2], "harmonizer")
    inputs = model_inputs(model)
    with torch.no_grad():
        expected = EmulatedModel(tmp_path / "plain").model(**inputs).logits
        assert torch.equal(harmonized(**inputs).logits, expected)


def test_distillation_trains_harmonizers_that_the_data_owner_runs_frozen(tmp_path, capsys):
    out = tmp_path / "bundle"
    assert main(["emulator", "--model", "fl-offsite/tiny-opt", "--out", str(out),
                 "--emulator-layers", "2", "--harmonizer-width", "8", "--distill-steps", "6",
                 "--distill-data", "fl-offsite/pydoc", "--distill-eval-every", "3",
                 "--distill-lr", "1e-3"]) == 0
    assert "uniform + harmonizers + distilled" in capsys.readouterr().out
    made = json.loads((out / "offsite.json").read_text())["emulator"]
    tensors = load_tensors(out / "emulator.safetensors")
    harmonizer = {k: v for k, v in tensors.items() if f".{PREFIX}" in k}
    assert {int(k.split(".", 1)[0]) for k in harmonizer} == set(made["harmonizer"]["blocks"])
    assert made["harmonizer"]["parameters"] == sum(v.numel() for v in harmonizer.values())
    assert made["distill"]["best_step"] > 0
    assert all(v.abs().sum() > 0 for k, v in harmonizer.items() if "expand" in k)

    emulated = EmulatedModel(out)
    without = tmp_path / "without"
    without.mkdir()
    for f in out.iterdir():
        (without / f.name).write_bytes(f.read_bytes())
    save_tensors(without / "emulator.safetensors",
                 {k: v for k, v in tensors.items() if k not in harmonizer})
    inputs = model_inputs(emulated.model)
    with torch.no_grad():  # the trained harmonizers are part of what the data owner runs
        assert not torch.allclose(emulated.model(**inputs).logits,
                                  EmulatedModel(without, verify=False).model(**inputs).logits)

    initial = emulated.prepare("blocks")
    frozen = {n: p.clone() for n, p in emulated.model.named_parameters() if not p.requires_grad}
    assert any(PREFIX in n for n in frozen)
    train(emulated.model, training_items(emulated.model), TrainConfig(lr=1e-2, max_steps=2,
                                                                       batch_size=4))
    assert all(torch.equal(p, frozen[n]) for n, p in emulated.model.named_parameters()
               if n in frozen)
    trained = emulated.adapter()
    assert any(not torch.equal(trained.tensors[k], initial.tensors[k]) for k in trained.tensors)
    assert not any(PREFIX in k for k in trained.tensors)  # nothing of it goes back


def test_a_harmonizer_without_distillation_is_refused(tmp_path, capsys):
    assert main(["emulator", "--model", "fl-offsite/tiny-opt", "--out", str(tmp_path / "b"),
                 "--harmonizer-width", "8"]) == 2
    assert "harmonizer: is trained by distillation" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
