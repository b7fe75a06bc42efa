"""Every shipped run config validates, and every scenario script starts (its --help)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fl_offsite import config as configs
from fl_offsite.errors import UserError
from fl_offsite.reference.reproduce import MODEL_PLANS, Plan

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = configs.load(path)
    assert cfg.rounds >= 1 and cfg.data.path


@pytest.mark.parametrize("script", sorted(p for p in (ROOT / "simulations").glob("*.py")
                                          if not p.name.startswith("_")), ids=lambda p: p.name)
def test_scenario_scripts_start(script):
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr


def test_offsite_runs_are_named_apart_from_simulate_runs(tmp_path, monkeypatch):
    from fl_offsite.federation.runtime import new_run_dir

    monkeypatch.chdir(tmp_path)
    cfg = configs.load(ROOT / "configs" / "demo.yaml")
    simulate_dir, offsite_dir = new_run_dir(cfg, None), new_run_dir(cfg, None, "offsite")
    assert simulate_dir.parent == offsite_dir.parent == Path("runs")
    assert simulate_dir.name.startswith(f"{cfg.name}-2") and \
        offsite_dir.name.startswith(f"{cfg.name}-offsite-2")
    assert (offsite_dir / "config.yaml").is_file()


@pytest.mark.parametrize("model", sorted(MODEL_PLANS))
def test_every_recommended_recipe_makes_valid_emulators(model):
    plan = Plan.for_model(model)
    assert plan.split(model, True).distill.steps > 0  # the `*_distilled` columns
    assert plan.split(model, False).distill.data  # public text, for distillation or ranking
    assert Plan.for_model(model, quick=True).split(model, False).distill.steps <= 10


def test_the_llm_recipe_is_the_one_measured_on_smollm2():
    """Sized to SmolLM2's 30 blocks, the named recipe is the split of its federated config and
    of its reproduction's main columns (one measured recipe, written three ways)."""
    from fl_offsite.emulators.pipeline import SplitConfig
    from fl_offsite.emulators.recipes import recipe_split

    recipe = SplitConfig.model_validate(recipe_split("pretrained-llm", 30))
    assert recipe == configs.load(ROOT / "configs" / "smollm2-devil.yaml").split
    measured = Plan.for_model("fl-offsite/smollm2-135m").split("fl-offsite/smollm2-135m", False)
    assert recipe.model_dump(exclude={"distill": {"max_examples"}}) == \
        measured.model_dump(exclude={"distill": {"max_examples"}})


def test_a_recipe_in_a_run_config_is_sized_to_the_model_and_written_keys_win():
    base = {"model": "fl-offsite/ref-opt", "data": {"path": "fl-offsite/devil"}}
    plain = configs.load(None, {**base, "split": {"recipe": "pretrained-llm"}}).split
    assert (plain.adapter_bottom, plain.adapter_top, plain.drop_ratio) == (4, 4, 0.0)  # 12 blocks
    assert plain.compression.name == "channels" and plain.compression.importance == "activations"
    assert (plain.distill.data, plain.distill.steps) == ("fl-offsite/public-text", 0)
    tuned = configs.load(None, {**base, "split": {
        "recipe": "pretrained-llm", "emulator_layers": 3, "distill": {"steps": 600},
        "compression": {"keep_ratio": 0.3}}}).split
    assert (tuned.emulator_layers, tuned.drop_ratio, tuned.distill.steps) == (3, None, 600)
    assert tuned.distill.nmse == "per_token" and tuned.distill.lr == plain.distill.lr
    assert (tuned.compression.name, tuned.compression.keep_ratio) == ("channels", 0.3)
    other = configs.load(None, {**base, "split": {"recipe": "pretrained-llm",
                                                  "compression": {"name": "int8"},
                                                  "distill": {"after_compression": False}}})
    assert other.split.compression.name == "int8"  # another method replaces the recipe's


def test_an_unknown_recipe_is_one_line():
    with pytest.raises(UserError, match=r"split\.recipe: unknown recipe 'llm'; known: "
                                                r"pretrained-llm"):
        configs.load(None, {"model": "fl-offsite/ref-opt", "split": {"recipe": "llm"}})
