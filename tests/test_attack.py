"""The privacy harness: attacks train what they say, with the honest adapter's budget, and its
plug-in is exactly the honest data owner's."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_model, training_items
from fl_offsite.cli import main
from fl_offsite.offsite.attack import ATTACKS, attacks_for, continuations
from fl_offsite.offsite.bundle import write_bundle
from fl_offsite.offsite.emulated import EmulatedModel
from fl_offsite.offsite.plan import make_plan
from fl_offsite.training.config import TrainConfig

TRAIN = ["--max-steps", "3", "--lr", "2e-3", "--block-size", "64", "--batch-size", "4"]


@pytest.mark.parametrize("name, emulator_moves", [("adapter only", False),
                                                   ("every weight", True),
                                                   ("own generations", True)])
def test_an_attack_trains_exactly_what_it_says(name, emulator_moves, tmp_path):
    model = tiny_model("llama")
    plan = make_plan(8, 2, 2, 2)
    write_bundle(model, plan, tmp_path / "b", "tiny")
    emulated = EmulatedModel(tmp_path / "b")
    before = {n: p.detach().clone() for n, p in emulated.model.named_parameters()}
    attacked = ATTACKS[name](emulated, training_items(model), TrainConfig(lr=1e-2, max_steps=3,
                                                                          batch_size=4), 0, 0)
    moved = {n for n, p in attacked.named_parameters() if not torch.equal(p, before[n])}
    adapter_positions = {plan.order.index(i) for i in plan.adapter}

    def position(name: str) -> int | None:
        return int(name.split(".")[2]) if name.startswith("model.layers.") else None

    assert any(position(n) in adapter_positions for n in moved)  # the adapter always trains
    outside = {n for n in moved if position(n) not in adapter_positions}
    assert bool(outside) == emulator_moves
    if emulator_moves:
        assert any("embed_tokens" in n for n in outside)
        assert any(position(n) is not None for n in outside)  # the emulator blocks


def test_the_emulators_rewrites_keep_each_prompt_and_train_only_on_what_it_wrote(tmp_path):
    model = tiny_model("llama")
    write_bundle(model, make_plan(8, 2, 2, 2), tmp_path / "b", "tiny")
    emulated = EmulatedModel(tmp_path / "b")
    g = torch.Generator().manual_seed(0)
    text = [{"input_ids": (ids := torch.randint(3, 60, (12,), generator=g)), "labels": ids}
            for _ in range(3)]
    choice = [{"input_ids": (ids := torch.randint(3, 60, (n,), generator=g)),
               "labels": torch.cat([torch.full((5,), -100), ids[5:]])} for n in (9, 9, 11)]
    written = continuations(emulated.model, text + choice, pad_id=0, seed=0, batch_size=2)
    assert len(written) == 6
    by_prompt = sorted((len(w["input_ids"]), int((w["labels"] == -100).sum())) for w in written)
    assert by_prompt == [(9, 5), (9, 5), (11, 5), (12, 3), (12, 3), (12, 3)]
    originals = {tuple(i["input_ids"][:int((i["labels"] == -100).sum()) or 3].tolist())
                 for i in text + choice}
    for w in written:
        context = int((w["labels"] == -100).sum())
        assert tuple(w["input_ids"][:context].tolist()) in originals
        assert torch.equal(w["labels"][context:], w["input_ids"][context:])
    # sampled: the rewrites are not the originals
    assert any(not torch.equal(w["input_ids"], i["input_ids"]) for w in written
               for i in text + choice if len(i["input_ids"]) == len(w["input_ids"]))


def test_an_image_task_is_not_attacked_with_writing():
    images = [{"pixel_values": torch.zeros(3, 8, 8), "labels": torch.tensor(0)}]
    tokens = [{"input_ids": torch.arange(4), "labels": torch.arange(4)}]
    assert set(attacks_for(tokens)) == set(ATTACKS)
    assert set(attacks_for(images)) == set(ATTACKS) - {"own generations"}


def test_the_harness_plugs_in_the_honest_adapter_and_reports_the_margin(tmp_path, pydoc_data):
    bundle, adapter = tmp_path / "bundle", tmp_path / "honest.safetensors"
    assert main(["emulator", "--model", "fl-offsite/tiny-opt", "--out", str(bundle),
                 "--emulator-layers", "2"]) == 0
    assert main(["attack", "--bundle", str(bundle), "--model", "fl-offsite/tiny-opt",
                 "--data", pydoc_data, "--max-eval", "20", "--out", str(tmp_path / "a.json"),
                 *TRAIN]) == 0
    record = json.loads((tmp_path / "a.json").read_text())
    assert set(record["attacks"]) == set(ATTACKS)
    assert record["best_attack"] in ATTACKS and record["metric"] == "ppl"
    # the honest pipeline, by hand: the same adapter, the same plug-in
    assert main(["train", "--bundle", str(bundle), "--data", pydoc_data, "--out", str(adapter),
                 *TRAIN]) == 0
    assert main(["evaluate", "--model", "fl-offsite/tiny-opt", "--adapter", str(adapter),
                 "--data", pydoc_data, "--block-size", "64", "--max-examples", "20",
                 "--out", str(tmp_path / "plugin.json")]) == 0
    by_hand = json.loads((tmp_path / "plugin.json").read_text())
    assert record["plugin"]["ppl"] == pytest.approx(by_hand["ppl"], rel=1e-6)
    best = min(a["ppl"] for a in record["attacks"].values())
    assert record["margin"] == pytest.approx(best / record["plugin"]["ppl"] - 1.0)
