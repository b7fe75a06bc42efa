"""Split, bundle, adapter and plug-in mechanics on every architecture in the table."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file

from fl_offsite.offsite import adapter as adapters
from fl_offsite.models.families import resolve
from fl_offsite.offsite.bundle import split_state, write_bundle
from fl_offsite.offsite.emulated import EmulatedModel, bundle_adapter
from fl_offsite.errors import UserError
from fl_offsite.offsite.plan import LayerPlan, make_plan
from fl_offsite.training.config import TrainConfig
from fl_offsite.training.loop import train

from conftest import model_inputs, tiny_model, training_items


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


# --- plan -----------------------------------------------------------------------------------

def test_uniform_drop_matches_the_papers_opt_1_3b_choice():
    plan = make_plan(24, 2, 2, 8)
    assert plan.emulator == (2, 5, 7, 10, 13, 16, 18, 21)
    assert plan.adapter == (0, 1, 22, 23)
    assert plan.notation() == "2-8-2"


def test_uniform_drop_keeps_first_and_last_middle_block():
    for k in range(2, 9):
        plan = make_plan(12, 2, 2, k)
        assert plan.emulator[0] == 2 and plan.emulator[-1] == 9 and len(plan.emulator) == k


def test_drop_ratio():
    assert len(make_plan(24, 2, 2, drop_ratio=0.6).emulator) == 8


@pytest.mark.parametrize("kwargs, field", [
    (dict(adapter_bottom=4, adapter_top=4, emulator_layers=1), "adapter_bottom + adapter_top"),
    (dict(adapter_bottom=2, adapter_top=2, emulator_layers=5), "emulator_layers"),
    (dict(adapter_bottom=2, adapter_top=2, emulator_layers=0), "emulator_layers"),
    (dict(adapter_bottom=0, adapter_top=0, emulator_layers=2), "adapter_bottom/adapter_top"),
    (dict(adapter_bottom=2, adapter_top=2, drop_ratio=1.5), "drop_ratio"),
])
def test_impossible_layer_counts_are_refused(kwargs, field):
    with pytest.raises(UserError, match=field.replace("+", r"\+")):
        make_plan(8, **kwargs)


# --- the table --------------------------------------------------------------------------------

def test_table_locates_every_part(family):
    model = tiny_model(family)
    arch = resolve(model)
    assert len(arch.blocks(model)) == 8
    named = arch.embeddings + arch.final_norm + arch.head
    assert arch.embeddings and arch.final_norm and arch.head
    shared, _ = split_state(model, arch)
    # everything outside the blocks belongs to a part the table names
    for name in shared:
        assert any(name.startswith(p + ".") for p in named), name


def test_an_architecture_without_blocks_says_what_is_missing():
    class Odd(torch.nn.Module):
        config = type("C", (), {"model_type": "odd"})()

    with pytest.raises(UserError) as err:
        resolve(Odd())
    msg = str(err.value)
    assert "'odd'" in msg and "no ModuleList of length num_hidden_layers" in msg and \
        "--family" in msg and "family: key" in msg and "\n" not in msg


# --- bundle -----------------------------------------------------------------------------------

def test_per_layer_attention_kinds_follow_the_blocks_they_belong_to(tmp_path):
    """Gemma 3 interleaves sliding-window and full attention per layer (``layer_types``): the
    emulated model's config is sliced with the plan, so a kept block keeps its own kind."""
    model = tiny_model("gemma3_text")
    kinds = model.config.layer_types
    full_block = kinds.index("full_attention")
    plan = LayerPlan(depth=8, bottom=(0, 1), emulator=(3, full_block), top=(6, 7), spans=(2, 2))
    write_bundle(model, plan, tmp_path / "b", "tiny")
    emulated = EmulatedModel(tmp_path / "b")
    assert emulated.model.config.layer_types == [kinds[i] for i in plan.order]
    blocks = resolve(emulated.model).blocks(emulated.model)
    assert [b.self_attn.layer_type for b in blocks] == [kinds[i] for i in plan.order]
    assert not blocks[plan.order.index(full_block)].self_attn.is_sliding


def test_emulator_keeping_every_middle_block_reproduces_the_full_model(family, tmp_path):
    model = tiny_model(family)
    write_bundle(model, make_plan(8, 2, 2, 4), tmp_path / "b", "tiny")
    emulated = EmulatedModel(tmp_path / "b")
    inputs = model_inputs(model)
    if family == "mixtral":  # grouped expert matmuls round differently per tensor layout
        torch.testing.assert_close(logits(emulated.model, inputs), logits(model, inputs),
                                   rtol=0, atol=1e-6)
    else:
        assert torch.equal(logits(emulated.model, inputs), logits(model, inputs))


def test_no_tensor_of_a_dropped_block_is_in_the_bundle(family, tmp_path):
    model = tiny_model(family)
    arch = resolve(model)
    plan = make_plan(8, 2, 2, 2)
    write_bundle(model, plan, tmp_path / "b", "tiny")
    _, blocks = split_state(model, arch)
    dropped = [t for i in plan.dropped for t in blocks[i].values()]
    stored = {}
    for file in (tmp_path / "b").glob("*.safetensors"):
        stored.update({f"{file.name}:{k}": v for k, v in load_file(file).items()})
    for key in stored:
        if not key.startswith("shared"):
            assert int(key.split(":")[1].split(".")[0]) in plan.order, key
    for secret in dropped:
        for key, tensor in stored.items():
            assert not (tensor.shape == secret.shape and torch.equal(tensor, secret)), key
    meta = json.loads((tmp_path / "b" / "offsite.json").read_text())
    assert meta["plan"]["emulator"] == list(plan.emulator)
    assert meta["source_model"] == "tiny" and len(meta["bundle_hash"]) == 64


def test_a_modified_bundle_is_refused(tmp_path):
    model = tiny_model("opt")
    write_bundle(model, make_plan(8, 2, 2, 2), tmp_path / "b", "tiny")
    tensors = load_file(tmp_path / "b" / "emulator.safetensors")
    first = next(iter(tensors))
    tensors[first] = tensors[first] + 1
    from safetensors.torch import save_file
    save_file(tensors, tmp_path / "b" / "emulator.safetensors")
    with pytest.raises(UserError, match="hash"):
        EmulatedModel(tmp_path / "b")


def test_failed_bundle_write_leaves_nothing(tmp_path):
    model = tiny_model("opt")
    with pytest.raises(UserError):
        write_bundle(model, make_plan(12, 2, 2, 2), tmp_path / "b", "tiny")
    assert list(tmp_path.iterdir()) == []


# --- plug-in ----------------------------------------------------------------------------------

def test_plugging_the_untouched_adapter_reproduces_the_model_exactly(family, tmp_path):
    model = tiny_model(family)
    write_bundle(model, make_plan(8, 2, 2, 2), tmp_path / "b", "tiny")
    inputs = model_inputs(model)
    before = logits(model, inputs)
    plugged = adapters.plug(tiny_model(family), resolve(model), bundle_adapter(tmp_path / "b"))
    assert torch.equal(logits(plugged, inputs), before)


@pytest.mark.parametrize("kind", ["blocks", "lora", "bitfit"])
def test_after_training_exactly_the_adapter_blocks_differ(family, kind, tmp_path):
    model = tiny_model(family)
    arch = resolve(model)
    plan = make_plan(8, 2, 2, 2)
    write_bundle(model, plan, tmp_path / "b", "tiny")
    emulated = EmulatedModel(tmp_path / "b")
    if kind == "bitfit" and not any(n.endswith("bias") for n, _ in arch.blocks(model)[0]
                                    .named_parameters()):
        with pytest.raises(UserError, match="no tensors for 'bitfit'"):
            emulated.prepare(kind)
        return
    initial = emulated.prepare(kind, seed=0)
    frozen_before = {n: p.clone() for n, p in emulated.model.named_parameters()
                     if not p.requires_grad}
    train(emulated.model, training_items(model), TrainConfig(lr=1e-2, max_steps=3, batch_size=4))
    for n, p in emulated.model.named_parameters():  # the emulator stayed frozen
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n
    trained = emulated.adapter()
    assert set(trained.tensors) == set(initial.tensors)
    if kind == "lora":
        assert all("lora_" in k for k in trained.tensors)
    if kind == "bitfit":
        assert all(k.endswith(".bias") for k in trained.tensors)
    trained.save(tmp_path / "a.safetensors")
    reloaded = adapters.Adapter.load(tmp_path / "a.safetensors")

    original = tiny_model(family)
    _, before = split_state(original, arch)
    plugged = adapters.plug(tiny_model(family), arch, reloaded)
    _, after = split_state(plugged, resolve(plugged))
    changed = {i for i in before for k in before[i] if not torch.equal(before[i][k], after[i][k])}
    assert changed == set(plan.adapter)
    assert not any("lora" in n for n, _ in plugged.named_parameters())
    if kind == "lora":  # nothing of peft is left: the same model takes the next round's
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            adapters.plug(plugged, arch, reloaded)


def test_training_is_deterministic_for_a_seed(tmp_path):
    model = tiny_model("gpt2")
    write_bundle(model, make_plan(8, 2, 2, 2), tmp_path / "b", "tiny")
    results = []
    for _ in range(2):
        emulated = EmulatedModel(tmp_path / "b")
        emulated.prepare("lora", seed=3)
        train(emulated.model, training_items(model), TrainConfig(lr=1e-2, max_steps=3,
                                                                 batch_size=2), seed=5)
        results.append(emulated.adapter().tensors)
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


@pytest.fixture
def opt_bundle(tmp_path):
    model = tiny_model("opt")
    write_bundle(model, make_plan(8, 2, 2, 2), tmp_path / "b", "tiny")
    return model, bundle_adapter(tmp_path / "b")


@pytest.mark.parametrize("corrupt, message", [
    (lambda t: t.pop(next(iter(t))), "missing keys"),
    (lambda t: t.__setitem__("5.extra.weight", torch.zeros(1)), "unexpected keys"),
    (lambda t: t.__setitem__(next(iter(t)), torch.zeros(3, 3)), "shape"),
    (lambda t: t.__setitem__(k := next(iter(t)), t[k].double()), "float64"),
])
def test_plug_refuses_an_adapter_that_does_not_fit(opt_bundle, corrupt, message):
    model, adapter = opt_bundle
    corrupt(adapter.tensors)
    with pytest.raises(UserError, match=message):
        adapters.plug(model, resolve(model), adapter)


def test_plug_refuses_an_adapter_of_another_model(opt_bundle):
    _, adapter = opt_bundle
    other = tiny_model("opt", seed=9)
    with pytest.raises(UserError, match="source hash"):
        adapters.plug(other, resolve(other), adapter)


def test_fedprox_term_keeps_the_adapter_near_its_start(tmp_path):
    model = tiny_model("opt")
    write_bundle(model, make_plan(8, 2, 2, 2), tmp_path / "b", "tiny")
    distances = {}
    for mu in (0.0, 1e4):
        emulated = EmulatedModel(tmp_path / "b")
        start = emulated.prepare("blocks").tensors
        train(emulated.model, training_items(model), TrainConfig(lr=1e-2, max_steps=5,
                                                                 batch_size=4), prox_mu=mu)
        end = emulated.adapter().tensors
        distances[mu] = sum(float((end[k] - start[k]).pow(2).sum()) for k in start) ** 0.5
    assert distances[1e4] < 0.5 * distances[0.0]


def test_half_precision_bundles_train_like_float32_and_return_their_dtype(tmp_path):
    """A float16 or bfloat16 bundle trains through float32 master weights under autocast: the
    adapter moves as the float32 bundle's does (AdamW on float16 weights gives NaN), comes back
    in the bundle's dtype, leaves the frozen parts untouched, and plugs into a model of that
    dtype only."""
    model = tiny_model("llama")
    items = training_items(model)
    deltas = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        # one set of weights for every dtype: float16-rounded, then cast
        write_bundle(tiny_model("llama").to(torch.float16).to(dtype), make_plan(8, 2, 2, 2),
                     tmp_path / str(dtype), "tiny")
        emulated = EmulatedModel(tmp_path / str(dtype))
        start = emulated.prepare("blocks").tensors
        trainable = {n for n, p in emulated.model.named_parameters() if p.requires_grad}
        frozen = {k: v.clone() for k, v in emulated.model.state_dict().items()
                  if k not in trainable}
        stats = train(emulated.model, items, TrainConfig(max_steps=3, batch_size=4, lr=1e-3))
        assert math.isfinite(stats["train_loss"])
        end = emulated.adapter().tensors
        assert {t.dtype for t in end.values()} == {dtype}
        assert all(torch.equal(emulated.model.state_dict()[k], v) for k, v in frozen.items())
        deltas[dtype] = torch.cat([(end[k].float() - start[k].float()).flatten() for k in start])
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.cosine_similarity(deltas[dtype], deltas[torch.float32], dim=0) > 0.95
    trained = emulated.adapter()
    with pytest.raises(UserError, match="bfloat16, the model is loaded as torch.float32; load "
                                        "it with the bundle's --dtype"):
        adapters.plug(tiny_model("llama"), resolve(model), trained)
    plugged = adapters.plug(tiny_model("llama").to(torch.float16).to(torch.bfloat16),
                            resolve(model), trained)
    assert all(p.dtype == torch.bfloat16 for p in plugged.parameters())
