"""MLP channel pruning: smaller layers on the wire and in memory that drop exactly the missing
channels; blocks without a separate MLP are said to be unpruned; distilling the pruned layers
(gradient allocation and refusals: test_allocation.py)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import model_inputs, tiny_model, training_items
from fl_offsite.cli import main
from fl_offsite.emulators.channels import ChannelPruning
from fl_offsite.emulators.channels_layers import mlp_layers, mlp_width
from fl_offsite.emulators.int8_layers import as_linear_weight
from fl_offsite.fileio import load_tensors
from fl_offsite.models.families import resolve
from fl_offsite.offsite.bundle import write_bundle
from fl_offsite.offsite.emulated import EmulatedModel
from fl_offsite.offsite.plan import make_plan
from fl_offsite.training.config import TrainConfig
from fl_offsite.training.loop import train

PLAN = make_plan(8, 2, 2, 2)
EVERY_MIDDLE_BLOCK = make_plan(8, 2, 2, 4)


def pruned_bundle(model, plan, out, keep_ratio: float):
    method = ChannelPruning(keep_ratio=keep_ratio, importance="weights")
    method.fit(model, resolve(model), plan, None, None, 0)
    return write_bundle(model, plan, out, "tiny", None, None, method, {})


def linear(block, name):
    module = block.get_submodule(name)
    return as_linear_weight(module, module.weight)


@pytest.mark.parametrize("family_name", ["opt", "gpt2", "bloom", "llama", "qwen3", "gemma2",
                                         "falcon", "gptj", "olmo2", "stablelm", "gpt_neox"])
def test_keeping_every_channel_reproduces_the_full_model(family_name, tmp_path):
    model = tiny_model(family_name)
    pruned_bundle(model, EVERY_MIDDLE_BLOCK, tmp_path / "b", keep_ratio=1.0)
    inputs = model_inputs(model)
    with torch.no_grad():
        got = EmulatedModel(tmp_path / "b").model(**inputs).logits
        expected = model(**inputs).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family_name", ["llama", "gpt2", "opt", "falcon"])
def test_pruned_layers_are_smaller_and_drop_exactly_the_missing_channels(family_name, tmp_path):
    model = tiny_model(family_name)
    width, arch = mlp_width(model.config), resolve(model)
    info = pruned_bundle(model, PLAN, tmp_path / "pruned", keep_ratio=0.5)
    dense_info = write_bundle(model, PLAN, tmp_path / "dense", "tiny")
    assert info.emulator["uncompressed"] == []
    assert dense_info.emulator["share_of_middle"] == 0.5  # 2 of 4 like-shaped middle blocks
    assert info.emulator["share_of_middle"] < 0.5
    assert (tmp_path / "pruned" / "emulator.safetensors").stat().st_size < \
        0.8 * (tmp_path / "dense" / "emulator.safetensors").stat().st_size
    pruned, dense = EmulatedModel(tmp_path / "pruned"), EmulatedModel(tmp_path / "dense")
    with torch.no_grad():
        for index in PLAN.emulator:
            position = PLAN.order.index(index)
            small, big = arch.blocks(pruned.model)[position], arch.blocks(dense.model)[position]
            inputs, outputs = mlp_layers(big, width)
            assert inputs and outputs
            assert all(linear(small, n).shape[0] == width // 2 for n in inputs)
            kept_columns = linear(small, outputs[0]).T
            assert kept_columns.shape[0] == width // 2
            # which of the original channels survived: their output columns are in the bundle
            original = linear(big, outputs[0]).T
            survived = torch.tensor([any(torch.equal(c, k) for k in kept_columns)
                                     for c in original])
            assert int(survived.sum()) == width // 2
            for name in outputs:  # the dense block without the others' contribution
                module = big.get_submodule(name)
                as_linear_weight(module, module.weight)[:, ~survived] = 0.0
        inputs = model_inputs(model)
        assert torch.allclose(pruned.model(**inputs).logits, dense.model(**inputs).logits,
                              atol=1e-5, rtol=1e-5)
    held = sum(p.numel() for p in pruned.model.parameters())
    assert held < sum(p.numel() for p in dense.model.parameters())


@pytest.mark.parametrize("family_name, left", [("phi3", "mlp.gate_up_proj.weight"),
                                               ("mixtral", "mlp.experts.gate_up_proj")])
def test_a_block_without_a_separate_mlp_is_shipped_unpruned_and_listed(family_name, left,
                                                                      tmp_path):
    model = tiny_model(family_name)
    info = pruned_bundle(model, PLAN, tmp_path / "b", keep_ratio=0.5)
    assert left in info.emulator["uncompressed"]
    inputs = model_inputs(model)
    with torch.no_grad():
        assert torch.isfinite(EmulatedModel(tmp_path / "b").model(**inputs).logits).all()


def test_training_moves_only_the_adapter_through_a_pruned_emulator(tmp_path):
    model = tiny_model("llama")
    pruned_bundle(model, PLAN, tmp_path / "b", keep_ratio=0.25)
    emulated = EmulatedModel(tmp_path / "b")
    initial = emulated.prepare("blocks")
    frozen = {n: p.clone() for n, p in emulated.model.named_parameters() if not p.requires_grad}
    train(emulated.model, training_items(model), TrainConfig(lr=1e-2, max_steps=3, batch_size=4))
    assert all(torch.equal(p, frozen[n]) for n, p in emulated.model.named_parameters()
               if n in frozen)
    trained = emulated.adapter()
    assert any(not torch.equal(trained.tensors[k], initial.tensors[k]) for k in trained.tensors)


def test_distilling_after_pruning_trains_the_pruned_layers(tmp_path, capsys):
    common = ["emulator", "--model", "fl-offsite/tiny-opt", "--emulator-layers", "4",
              "--compression", "channels", "--keep-ratio", "0.5", "--importance", "weights",
              "--distill-data", "fl-offsite/pydoc"]
    assert main([*common, "--out", str(tmp_path / "pruned")]) == 0
    assert main([*common, "--out", str(tmp_path / "distilled"), "--distill-steps", "6",
                 "--distill-eval-every", "3", "--distill-lr", "1e-3",
                 "--distill-after-compression"]) == 0
    assert "uniform + distilled + channels" in capsys.readouterr().out
    made = json.loads((tmp_path / "distilled" / "offsite.json").read_text())["emulator"]
    assert made["distill"]["held_out_best"]["nmse"] < made["distill"]["held_out_before"]["nmse"]
    pruned, distilled = (load_tensors(tmp_path / name / "emulator.safetensors")
                         for name in ("pruned", "distilled"))
    assert pruned.keys() == distilled.keys()
    assert all(pruned[k].shape == distilled[k].shape for k in pruned)  # pruned once, not twice
    assert any(not torch.equal(pruned[k], distilled[k]) for k in pruned)
    assert main(["evaluate", "--bundle", str(tmp_path / "distilled"), "--data",
                 "fl-offsite/pydoc", "--block-size", "32", "--max-examples", "8",
                 "--out", str(tmp_path / "metrics.json")]) == 0
