"""Low-rank emulators: factors on the wire and in memory, computing exactly what their product
computes; per-block ranks chosen by adapter-gradient preservation."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import model_inputs, tiny_model, training_items
from fl_offsite.cli import main
from fl_offsite.emulators.gradient_scores import allocate
from fl_offsite.emulators.lowrank import LowRankCompression
from fl_offsite.emulators.lowrank_layers import LowRankLinear, approximated_block
from fl_offsite.fileio import load_tensors
from fl_offsite.models.families import resolve
from fl_offsite.offsite.bundle import (build_emulated_model, emulated_config, split_state,
                                       write_bundle)
from fl_offsite.offsite.emulated import EmulatedModel
from fl_offsite.offsite.plan import make_plan
from fl_offsite.training.config import TrainConfig
from fl_offsite.training.loop import train

PLAN = make_plan(8, 2, 2, 2)


def dense_equivalent(model, ratio: float):
    """The emulated model with each factorised weight replaced by the product of its factors."""
    arch = resolve(model)
    shared, blocks = split_state(model, arch)
    emulator = {f"{i}.{k}": v for i in PLAN.emulator for k, v in
                approximated_block(arch.blocks(model)[i], blocks[i], ratio).items()}
    adapter = {f"{i}.{k}": v for i in PLAN.adapter for k, v in blocks[i].items()}
    return build_emulated_model(emulated_config(model.config, PLAN), PLAN, shared, emulator,
                                adapter, arch.task)


@pytest.mark.parametrize("family_name", ["llama", "gpt2", "opt", "phi3", "gemma2", "falcon"])
def test_the_factors_compute_what_their_product_computes_and_are_smaller(family_name, tmp_path):
    model = tiny_model(family_name)
    write_bundle(model, PLAN, tmp_path / "dense", "tiny")
    info = write_bundle(model, PLAN, tmp_path / "lowrank", "tiny", None, None,
                        LowRankCompression(rank_ratio=0.25), {})
    assert info.emulator["uncompressed"] == []
    shipped = load_tensors(tmp_path / "lowrank" / "emulator.safetensors")
    assert any(k.endswith("lowrank_a") for k in shipped)
    assert (tmp_path / "lowrank" / "emulator.safetensors").stat().st_size < \
        0.6 * (tmp_path / "dense" / "emulator.safetensors").stat().st_size
    emulated = EmulatedModel(tmp_path / "lowrank")
    held = sum(p.numel() for p in emulated.model.parameters())
    dense_held = sum(p.numel() for p in EmulatedModel(tmp_path / "dense").model.parameters())
    assert held < dense_held and any(isinstance(m, LowRankLinear)
                                     for m in emulated.model.modules())
    inputs = model_inputs(model)
    with torch.no_grad():
        got = emulated.model(**inputs).logits
        expected = dense_equivalent(model, 0.25)(**inputs).logits
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_mixtral_experts_are_said_to_stay_dense(tmp_path):
    info = write_bundle(tiny_model("mixtral"), PLAN, tmp_path / "b", "tiny", None, None,
                        LowRankCompression(rank_ratio=0.25), {})
    assert "mlp.experts.gate_up_proj" in info.emulator["uncompressed"]


def test_training_moves_only_the_adapter_and_leaves_the_factors(tmp_path):
    model = tiny_model("llama")
    write_bundle(model, PLAN, tmp_path / "b", "tiny", None, None,
                 LowRankCompression(rank_ratio=0.25), {})
    emulated = EmulatedModel(tmp_path / "b")
    initial = emulated.prepare("blocks")
    factors = {n: p.clone() for n, p in emulated.model.named_parameters() if "lowrank" in n}
    train(emulated.model, training_items(model), TrainConfig(lr=1e-2, max_steps=3,
                                                             batch_size=4))
    assert all(torch.equal(p, factors[n]) for n, p in emulated.model.named_parameters()
               if n in factors)
    trained = emulated.adapter()
    assert any(not torch.equal(trained.tensors[k], initial.tensors[k]) for k in trained.tensors)


def test_allocation_gives_rank_where_the_gradient_is_sensitive():
    ratios = [0.125, 0.25, 0.5]
    costs = {i: {0.125: 10, 0.25: 20, 0.5: 40} for i in (2, 5)}
    scores = {2: {0.125: 0.99, 0.25: 0.995, 0.5: 0.999},  # barely changes: cheap is enough
              5: {0.125: 0.70, 0.25: 0.90, 0.5: 0.98}}  # the adapter's gradient needs rank
    assert allocate(scores, costs, budget=10 + 20) == {2: 0.125, 5: 0.25}
    assert allocate(scores, costs, budget=10 + 40) == {2: 0.125, 5: 0.5}  # uniform: 2 x 0.25
    assert allocate(scores, costs, budget=2 * 10) == {2: 0.125, 5: 0.125}
    assert set(allocate(scores, costs, budget=1000).values()) == {ratios[-1]}


def test_gradient_allocation_from_the_cli_records_its_scores(tmp_path, capsys):
    out = tmp_path / "bundle"
    assert main(["emulator", "--model", "fl-offsite/tiny-opt", "--out", str(out),
                 "--emulator-layers", "2", "--compression", "lowrank", "--rank-ratio", "0.25",
                 "--allocation", "gradient", "--distill-data", "fl-offsite/pydoc"]) == 0
    assert "uniform + lowrank" in capsys.readouterr().out
    made = json.loads((out / "offsite.json").read_text())["emulator"]["compression"]
    assert set(made["ratios"]) == {"2", "5"}
    for scores in made["gradient_cosine"].values():
        assert scores["1.0"] == pytest.approx(1.0)  # an unchanged block: the same gradient
        assert scores["0.0625"] < scores["0.375"] <= 1.0 + 1e-9


def test_lowrank_settings_without_lowrank_are_refused(tmp_path, capsys):
    assert main(["emulator", "--model", "fl-offsite/tiny-opt", "--out", str(tmp_path / "b"),
                 "--allocation", "gradient"]) == 2
    assert "--compression lowrank or --compression channels" in capsys.readouterr().err
    assert main(["emulator", "--model", "fl-offsite/tiny-opt", "--out", str(tmp_path / "b"),
                 "--compression", "lowrank", "--allocation", "gradient"]) == 2
    assert "distill.data is missing" in capsys.readouterr().err
