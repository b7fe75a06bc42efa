"""Low-rank emulators: factors on the wire and in memory, computing exactly what their product
computes (gradient allocation, shared with channel pruning: test_allocation.py)."""

from __future__ import annotations

import pytest
import torch

from conftest import model_inputs, tiny_model, training_items
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
