"""Local DP-SGD (dp.mode: dpsgd): exact per-example gradients, noise, accounting, config."""

from __future__ import annotations

import json
import math

import pytest
import torch
from opacus.grad_sample.grad_sample_module import GradSampleHooks

from conftest import tiny_model, training_items
from fl_offsite import config as configs
from fl_offsite.training import dpsgd
from fl_offsite.offsite.adapter import lora_config, prepare
from fl_offsite.models.families import resolve
from fl_offsite.offsite.bundle import write_bundle
from fl_offsite.training.data import collate
from fl_offsite.offsite.emulated import EmulatedModel
from fl_offsite.errors import UserError
from fl_offsite.models.loading import load_model, load_processor
from fl_offsite.offsite.plan import make_plan
from fl_offsite.training.config import TrainConfig
from fl_offsite.training.loop import train

# Opacus' hooks on the first adapter block, whose input needs no gradient (expected)
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """The packaged tiny OPT as a 2-2-2 bundle, and its tokenizer's pad id."""
    out = tmp_path_factory.mktemp("dpsgd") / "bundle"
    model = load_model("fl-offsite/tiny-opt")
    write_bundle(model, make_plan(8, 2, 2, 2), out, "fl-offsite/tiny-opt",
                 load_processor("fl-offsite/tiny-opt"))
    return out


def no_dropout(model):
    """Training mode (Opacus' hooks record only then) with every dropout at 0, so a batch and
    each example alone run through the same function."""
    for module in model.train().modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    return model


def per_example_grads(model, items, wrap=True):
    """Opacus' per-example gradients of the trainable tensors (before any clipping)."""
    params = [p for p in model.parameters() if p.requires_grad]
    size = dpsgd._BatchSize()
    owners = dpsgd._wrap(model, size) if wrap else []
    hooks = GradSampleHooks(model, strict=False)
    try:
        size.value = len(items)
        losses = dpsgd.per_example_loss(model, collate(items))
        (losses.sum() / len(items)).backward()
        return [p.grad_sample.detach().clone() for p in params]
    finally:
        hooks.cleanup()
        dpsgd._unwrap(owners)
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("family, kind", [("opt", "blocks"), ("opt", "lora"), ("opt", "bitfit"),
                                          ("gpt2", "blocks"), ("llama", "blocks"),
                                          ("vit", "blocks")])
def test_per_example_gradients_match_autograd_on_each_example(family, kind):
    model = no_dropout(tiny_model(family))
    arch = resolve(model)
    prepare(model, arch, tuple(range(8)), (0, 1, 6, 7), kind,
            lora_config(arch) if kind == "lora" else None)
    items = training_items(model, 4)
    batched = per_example_grads(model, items)
    params = [p for p in model.parameters() if p.requires_grad]
    for i, item in enumerate(items):
        alone = torch.autograd.grad(dpsgd.per_example_loss(model, collate([item])).sum(), params)
        for got, want in zip(batched, alone):
            assert got.shape[0] == len(items)
            assert torch.allclose(got[i], want, atol=1e-5, rtol=1e-4)
    assert not any("inner" in name for name, _ in model.named_modules())  # wrappers are gone


def test_opt_hides_the_batch_from_opacus_without_the_wrapper():
    model = no_dropout(tiny_model("opt"))
    prepare(model, resolve(model), tuple(range(8)), (0, 7), "blocks")
    items = training_items(model, 3)
    shapes = {g.shape[0] for g in per_example_grads(model, items, wrap=False)}
    assert shapes != {3}  # fc1 / fc2 / final_layer_norm see (batch x positions) rows


def test_dpsgd_trains_reports_epsilon_and_leaves_the_model_clean(tiny_bundle):
    emulated = EmulatedModel(tiny_bundle)
    start = emulated.prepare("blocks").tensors
    items = training_items(emulated.model, 40)
    stats = {}
    for steps in (2, 6):
        stats[steps] = dpsgd.train_dpsgd(emulated.model, items,
                                         TrainConfig(lr=1e-3, max_steps=steps, batch_size=8),
                                         noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)
    spent = stats[6]["dp"]
    assert spent["steps"] == 6 and spent["sample_rate"] == pytest.approx(1 / 5)  # 8 of 40
    assert 0 < stats[2]["dp"]["epsilon"] < spent["epsilon"] < math.inf
    assert math.isfinite(stats[6]["train_loss"]) and stats[6]["examples"] == 40
    end = emulated.adapter().tensors
    assert all(not torch.equal(end[k], start[k]) for k in start)
    for _, p in emulated.model.named_parameters():  # no Opacus state is left on the model
        assert not hasattr(p, "grad_sample") and not hasattr(p, "summed_grad") and p.grad is None
    assert not any("inner" in name for name, _ in emulated.model.named_modules())
    assert not any(m._forward_hooks or m._backward_hooks for m in emulated.model.modules())
    train(emulated.model, items, TrainConfig(lr=1e-3, max_steps=1, batch_size=8))  # plain again


def test_noise_is_what_makes_the_updates_differ(tiny_bundle):
    """Identical examples: without noise AdamW's first step moves each coordinate by the sign of
    the clipped gradient whatever the sampled batch; with noise, two runs with the same seed
    differ (the noise comes from the OS's entropy)."""
    items = training_items(load_model("fl-offsite/tiny-opt"), 1) * 32
    directions, epsilons = {}, {}
    for z in (0.0, 0.0, 2.0, 2.0):
        emulated = EmulatedModel(tiny_bundle)
        start = emulated.prepare("blocks").tensors
        stats = dpsgd.train_dpsgd(emulated.model, items,
                                  TrainConfig(lr=1e-3, max_steps=1, batch_size=8),
                                  noise_multiplier=z, max_grad_norm=0.5, delta=1e-5)
        end = emulated.adapter().tensors
        directions.setdefault(z, []).append(torch.cat([(end[k] - start[k]).sign().flatten()
                                                       for k in sorted(start)]))
        epsilons[z] = stats["dp"]["epsilon"]

    def disagree(a, b):
        return float((a != b).float().mean())

    assert disagree(*directions[0.0]) < 0.01  # only coordinates at rounding level
    assert disagree(*directions[2.0]) > 0.3 and disagree(directions[0.0][0],
                                                          directions[2.0][0]) > 0.3
    assert epsilons[0.0] == math.inf and 0 < epsilons[2.0] < math.inf


@pytest.mark.parametrize("z", [0.0, 1.0])
def test_an_empty_poisson_batch_still_takes_its_noise_step(tiny_bundle, monkeypatch, z):
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    monkeypatch.setattr(UniformWithReplacementSampler, "__iter__", lambda self: iter([[]]))
    emulated = EmulatedModel(tiny_bundle)
    start = emulated.prepare("blocks").tensors
    stats = dpsgd.train_dpsgd(emulated.model, training_items(emulated.model, 8),
                              TrainConfig(lr=1e-2, max_steps=1, batch_size=4),
                              noise_multiplier=z, max_grad_norm=1.0, delta=1e-5)
    assert stats["dp"]["steps"] == 1 and math.isnan(stats["train_loss"])
    end = emulated.adapter().tensors
    moved = [not torch.equal(end[k], start[k]) for k in start]
    assert all(moved) if z else not any(moved)  # noise only: nothing moves without it


def test_fedprox_term_still_applies(tiny_bundle):
    items = training_items(load_model("fl-offsite/tiny-opt"), 24)
    distances = {}
    for mu in (0.0, 1e4):
        emulated = EmulatedModel(tiny_bundle)
        start = emulated.prepare("blocks").tensors
        dpsgd.train_dpsgd(emulated.model, items, TrainConfig(lr=1e-2, max_steps=5, batch_size=8),
                          noise_multiplier=0.0, max_grad_norm=1.0, delta=1e-5, prox_mu=mu)
        end = emulated.adapter().tensors
        distances[mu] = sum(float((end[k] - start[k]).pow(2).sum()) for k in start) ** 0.5
    assert distances[1e4] < 0.5 * distances[0.0]


def test_epsilon_composes_over_rounds():
    one = dpsgd.epsilon([(1.0, 0.1, 10)], 1e-5)
    assert dpsgd.epsilon([], 1e-5) == 0.0
    assert one < dpsgd.epsilon([(1.0, 0.1, 10), (1.0, 0.1, 10)], 1e-5) == \
        pytest.approx(dpsgd.epsilon([(1.0, 0.1, 20)], 1e-5))
    assert dpsgd.epsilon([(2.0, 0.1, 10)], 1e-5) < one
    assert dpsgd.epsilon([(1.0, 0.1, 10), (0.0, 0.1, 1)], 1e-5) == math.inf


BASE = {"model": "fl-offsite/tiny-opt", "data": {"path": "fl-offsite/pydoc"}}


@pytest.mark.parametrize("extra, field", [
    ({"train": {"grad_accum": 2}}, "train.grad_accum"),
    ({"train": {"mixed_precision": "bf16"}}, "train.mixed_precision"),
])
def test_combinations_dpsgd_cannot_account_are_refused(extra, field):
    with pytest.raises(UserError) as error:
        configs.load(None, {**BASE, "dp": {"mode": "dpsgd"}, **extra})
    message = str(error.value)
    assert field in message and "\n" not in message and "dpsgd" in message
    configs.load(None, {**BASE, **extra})  # fine without dpsgd


def test_dp_modes():
    assert configs.load(None, BASE).dp.mode == "update" and not configs.load(None, BASE).dp.active
    assert configs.load(None, {**BASE, "dp": {"mode": "dpsgd"}}).dp.active
    with pytest.raises(UserError, match="dp.mode"):
        configs.load(None, {**BASE, "dp": {"mode": "local"}})
    for kind in ("lora", "bitfit"):  # both train through Opacus' hooks
        configs.load(None, {**BASE, "dp": {"mode": "dpsgd"}, "tuning": {"kind": kind}})


@pytest.mark.slow
def test_a_dpsgd_federation_reports_each_data_owners_epsilon(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fl_offsite.federation.runtime import new_run_dir
    from fl_offsite.federation.simulation import simulate

    cfg = configs.load(None, {
        "model": "fl-offsite/tiny-opt", "num_clients": 2, "clients_per_round": 2, "rounds": 2,
        "split": {"emulator_layers": 2}, "tuning": {"kind": "lora"},
        "data": {"path": "fl-offsite/pydoc", "block_size": 32, "max_eval_examples": 10},
        "train": {"lr": 0.01, "max_steps": 2, "batch_size": 4},
        "dp": {"mode": "dpsgd", "noise_multiplier": 1.0, "max_grad_norm": 0.5}})
    run_dir = tmp_path / "run"
    summary = simulate(cfg, new_run_dir(cfg, run_dir))
    first, second = (r["dp"] for r in summary["rounds"])
    for dp in (first, second):
        assert dp["mode"] == "dpsgd" and set(dp["owners"]) == {"0", "1"}
        assert dp["epsilon"] == max(o["epsilon"] for o in dp["owners"].values())
        assert all(o["steps"] == 2 and 0 < o["sample_rate"] < 1 for o in dp["owners"].values())
        # the model owner's recount agrees with the data owners' own accountants
        assert dp["epsilon_run"] == pytest.approx(dp["epsilon"], rel=1e-9)
    assert 0 < first["epsilon"] < second["epsilon"] < math.inf
    assert all(r["updated"] and r["update_norm"] > 0 for r in summary["rounds"])
    assert json.loads((run_dir / "summary.json").read_text())["rounds"][1]["dp"] == second
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("privacy/epsilon")] == \
        pytest.approx([first["epsilon"], second["epsilon"]])
    assert "privacy/epsilon_run" in events.Tags()["scalars"]
