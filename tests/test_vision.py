"""The vision side: the handwritten-digits task, the public rendered digits, the reference ViT
pretrained on printed digits, and offsite-tuning it on the handwritten ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fl_offsite.training import data
from fl_offsite.reference import digits as digit_images
from fl_offsite.reference import vision, vit
from fl_offsite.offsite.adapter import plug
from fl_offsite.models.families import resolve
from fl_offsite.offsite.emulated import EmulatedModel
from fl_offsite.training.evaluate import classification_metrics
from fl_offsite.models.loading import load_model, load_processor
from fl_offsite.offsite.owner import build_bundle
from fl_offsite.training.config import TrainConfig
from fl_offsite.training.loop import train

SPLITS = ("train", "validation", "test")


def accuracy(model, items) -> float:
    return classification_metrics(model, items)["acc"]


def rows(name: str, split: str) -> list[dict]:
    path = data.PACKAGED_DIR / name / f"{split}.jsonl"
    return [json.loads(line) for line in path.open()]


def well_formed(row: dict) -> bool:
    pixels = np.asarray(row["pixels"])
    return (pixels.shape == (8, 8) and pixels.dtype.kind == "i" and pixels.min() >= 0
            and pixels.max() <= 16 and row["label"] in range(10) and row["group"] == row["label"])


def test_digits_task_is_well_formed_with_disjoint_splits():
    splits = {s: rows("digits", s) for s in SPLITS}
    assert sum(map(len, splits.values())) == 1797  # scikit-learn's copy of the UCI digits
    assert 0.6 < len(splits["train"]) / 1797 < 0.8 and len(splits["test"]) >= 300
    for split, items in splits.items():
        assert all(map(well_formed, items)), split
        assert {r["label"] for r in items} == set(range(10)), split
    keys = {s: {json.dumps(r["pixels"]) for r in items} for s, items in splits.items()}
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["validation"]
    assert not keys["validation"] & keys["test"]
    assert data.task_kind(data.load_split("fl-offsite/digits", "test")) == "image"
    public = {s: rows("rendered-digits", s) for s in ("train", "validation")}
    assert all(well_formed(r) for items in public.values() for r in items)
    handwritten = set().union(*keys.values())
    assert not {json.dumps(r["pixels"]) for r in public["train"]} & handwritten


def test_the_documented_command_rebuilds_the_shipped_data(tmp_path):
    vision.main(["data", "--out", str(tmp_path)])
    for name in ("digits", "rendered-digits"):
        for file in sorted((data.PACKAGED_DIR / name).iterdir()):
            if file.suffix == ".jsonl":
                assert (tmp_path / name / file.name).read_bytes() == file.read_bytes(), file


def test_pretraining_feeds_what_the_processor_makes_and_is_seeded(tmp_path):
    images, labels = digit_images.render(20, seed=5)
    again, _ = digit_images.render(20, seed=5)
    assert np.array_equal(images, again) and sorted(labels) == sorted(np.arange(20) % 10)
    assert torch.equal(digit_images.pixel_values(images),
                       digit_images.processor_pixel_values(images, load_processor("fl-offsite/ref-vit")))
    cfg = vit.VitConfig(steps=4, batch=8, warmup=2, eval_every=2, held_out=20)
    cards = [vit.pretrain(tmp_path / name, cfg) for name in ("a", "b")]
    curves = [[(h["step"], h["loss"], h["held_out_acc"]) for h in c["history"]] for c in cards]
    assert curves[0] == curves[1] and len(curves[0]) == 2
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == \
        (tmp_path / "b" / "model.safetensors").read_bytes()
    assert load_processor(str(tmp_path / "a")) is not None


@pytest.fixture(scope="module")
def digits():
    processor = load_processor("fl-offsite/ref-vit")
    return (processor, data.prepare("fl-offsite/digits", "train", processor),
            data.prepare("fl-offsite/digits", "test", processor))


def test_reference_vit_knows_the_labels_and_is_above_chance_zero_shot(digits):
    processor, _, test = digits
    model = load_model("fl-offsite/ref-vit")
    assert model.config.id2label == {i: str(i) for i in range(10)}
    assert len(resolve(model).blocks(model)) == 12
    assert 0.3 < accuracy(model, test.train_items) < 0.85


def test_short_offsite_tuning_beats_zero_shot(digits, tmp_path):
    processor, train_data, test = digits
    zero_shot = accuracy(load_model("fl-offsite/ref-vit"), test.train_items)
    build_bundle("fl-offsite/ref-vit", tmp_path / "bundle")
    emulated = EmulatedModel(tmp_path / "bundle")
    emulator_zero_shot = accuracy(emulated.model, test.train_items)
    emulated.prepare("blocks", seed=0)
    train(emulated.model, train_data.train_items,
          TrainConfig(lr=1e-3, max_steps=60, batch_size=16), seed=0)
    full = load_model("fl-offsite/ref-vit")
    plugged = accuracy(plug(full, resolve(full), emulated.adapter()),
                                      test.train_items)
    assert emulator_zero_shot < zero_shot  # the emulator alone is worse than the full model
    assert plugged > zero_shot + 0.1, (zero_shot, plugged)


def test_reproduce_runs_the_image_task_on_its_own_model_and_public_data():
    from fl_offsite.reference.reproduce import SETTINGS, Plan, _table, bundle_dirs

    plan = Plan()
    plan.model = "fl-offsite/tiny-opt"  # what `reproduce --model` changes: the text tasks' model
    assert plan.by_model() == {
        "fl-offsite/tiny-opt": ["fl-offsite/devil", "fl-offsite/wordnet-define",
                                "fl-offsite/bible-cloze"],
        "fl-offsite/ref-vit": ["fl-offsite/digits"]}
    assert plan.split("fl-offsite/ref-vit", True).distill.data == "fl-offsite/rendered-digits"
    assert plan.split("fl-offsite/tiny-opt", True).distill.data == "fl-offsite/pydoc"
    assert plan.split("fl-offsite/ref-vit", False).distill.steps == 0
    assert bundle_dirs(Path("run"), "fl-offsite/ref-vit") == (
        Path("run/bundle-ref-vit"), Path("run/bundle-ref-vit-distilled"))
    names = [Path(t).name for t in plan.tasks]
    metric = {n: "acc" for n in names}
    results = {"tasks": {n: {s: {"acc": 0.5} for s in SETTINGS} for n in names},
               "spread": {n: {s: {"acc": 0.0} for s in SETTINGS} for n in names},
               "main_metric": metric}
    table = _table(results, plan)
    assert "`fl-offsite/ref-vit` (digits)" in table and "| digits (acc) |" in table
